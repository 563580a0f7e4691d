package frr

import (
	"context"
	"net/netip"
	"os"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/shardlb/shardlb/internal/testenv"
)

func eventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, err := cond()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Two FRR routers peer over eBGP with BFD; one originates a prefix, the other must
// show it as best path, install it in its kernel table and report the BFD session.
func TestTwoRouters(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "ip", "vtysh", Dir+"/zebra", Dir+"/bgpd", Dir+"/bfdd")
	ns1, ns2 := testenv.NewNetNS(t, "frr1"), testenv.NewNetNS(t, "frr2")
	testenv.Veth(t, ns1, "e1", "10.0.0.1/24", ns2, "e2", "10.0.0.2/24")
	a1, a2 := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	prefix := netip.MustParsePrefix("198.51.100.1/32")
	bfd := BFDTimers{Interval: 100 * time.Millisecond, Multiplier: 3}

	StartT(t, ns1.Name, Config{
		ASN: 65001, RouterID: a1, BFD: bfd,
		Neighbors: []Neighbor{{Addr: a2, ASN: 65002, BFD: true}},
		ExtraBGP:  []string{"no bgp network import-check", "address-family ipv4 unicast", " network " + prefix.String(), "exit-address-family"},
	})
	r2 := StartT(t, ns2.Name, Config{
		ASN: 65002, RouterID: a2, BFD: bfd, MaximumPaths: 4,
		Neighbors: []Neighbor{{Addr: a1, ASN: 65001, BFD: true}},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	parent := t

	t.Run("the neighbor is established with one prefix received and selected", func(t *testing.T) {
		eventually(t, 20*time.Second, "session", func() (bool, error) {
			s, err := r2.Summary(ctx)
			return s[a1].State == "Established" && s[a1].PrefixesReceived == 1, err
		})
		// bgpd counts a received prefix before its work queue runs the best-path
		// selection: the summary can show it while the path is not yet best.
		eventually(t, 5*time.Second, "best path selected", func() (bool, error) {
			_, ok, err := r2.BestPath(ctx, prefix)
			return ok, err
		})
	})
	t.Run("the best path comes from the neighbor with its AS path", func(t *testing.T) {
		best, ok, err := r2.BestPath(ctx, prefix)
		if err != nil || !ok {
			t.Fatalf("BestPath = %+v, %v, %v", best, ok, err)
		}
		if best.Peer != a1 || best.NextHop != a1 || !slices.Equal(best.ASPath, []uint32{65001}) {
			t.Fatalf("best path = %+v, want from %v with AS path [65001]", best, a1)
		}
	})
	t.Run("the route is in the kernel table via the neighbor", func(t *testing.T) {
		if _, err := r2.WaitKernelRoute(ctx, prefix, func(h []netip.Addr) bool { return slices.Equal(h, []netip.Addr{a1}) }); err != nil {
			t.Fatal(err)
		}
		if n, err := r2.KernelBGPRoutes(); err != nil || n != 1 {
			t.Fatalf("KernelBGPRoutes = %d, %v; want 1", n, err)
		}
	})
	t.Run("the BFD session is up with the configured timers", func(t *testing.T) {
		eventually(t, 10*time.Second, "BFD up", func() (bool, error) {
			ps, err := r2.BFDPeers(ctx)
			return len(ps) == 1 && ps[0].Status == "up" && ps[0].Peer == a1 && ps[0].TxInterval == bfd.Interval, err
		})
	})
	t.Run("an unknown prefix has no path and no kernel route", func(t *testing.T) {
		other := netip.MustParsePrefix("203.0.113.9/32")
		paths, err := r2.Paths(ctx, other)
		if err != nil || len(paths) != 0 {
			t.Fatalf("Paths = %v, %v; want none", paths, err)
		}
		if hops, err := r2.KernelRoute(other); err != nil || hops != nil {
			t.Fatalf("KernelRoute = %v, %v; want none", hops, err)
		}
	})
	t.Run("stop kills every daemon and removes the run directory", func(t *testing.T) {
		pids, dir := r2.PIDs(), r2.Dir
		if parent.Failed() {
			// Stop removes the logs StartT's cleanup would print.
			t.Logf("FRR in %s:\n%s", r2.NS, r2.Logs())
		}
		r2.Stop()
		for _, pid := range pids {
			if processAlive(pid) {
				t.Errorf("daemon %d still running", pid)
			}
		}
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("run directory %s left behind", dir)
		}
	})
}

func processAlive(pid int) bool { return syscall.Kill(pid, 0) == nil }
