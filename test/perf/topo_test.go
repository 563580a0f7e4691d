package perf

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/shardlb/shardlb/internal/testenv"
)

// Addresses inside the namespaces this package creates (never outside them).
var (
	clientAddr  = netip.MustParseAddr("10.90.1.2") // client c0, toward the LB
	lbFront     = netip.MustParseAddr("10.90.1.1") // LB l0
	lbBack      = netip.MustParseAddr("10.90.2.1") // LB l1, the node address toward endpoints
	backendAddr = netip.MustParseAddr("10.90.2.2") // backend b0, the endpoint
	directLocal = netip.MustParseAddr("10.90.3.1") // client c1, straight to the backend
	directAddr  = netip.MustParseAddr("10.90.3.2") // backend b1
	vip         = netip.MustParseAddr("10.90.100.1")
)

const (
	udpPort  = 9000
	httpPort = 80
)

// topology is client -> LB -> backend over veth, plus a second veth pair that joins
// client and backend directly: the same sender and receiver without the LB hop.
//
//	client c0 ---- l0  LB  l1 ---- b0 backend
//	client c1 ------------------- b1 backend
type topology struct {
	client, lb, backend testenv.NetNS
	lbFrontMAC          net.HardwareAddr // l0: where the client's frames to the VIP go
	directMAC           net.HardwareAddr // b1: where the client's direct frames go
	clientMAC, c1MAC    net.HardwareAddr
	nginxPID            int // set by startNginx
}

func newTopology(t testing.TB) *topology {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "ip", "nft", "ethtool")
	tp := &topology{
		client:  testenv.NewNetNS(t, "perf-cli"),
		lb:      testenv.NewNetNS(t, "perf-lb"),
		backend: testenv.NewNetNS(t, "perf-be"),
	}
	testenv.Veth(t, tp.client, "c0", clientAddr.String()+"/24", tp.lb, "l0", lbFront.String()+"/24")
	testenv.Veth(t, tp.lb, "l1", lbBack.String()+"/24", tp.backend, "b0", backendAddr.String()+"/24")
	testenv.Veth(t, tp.client, "c1", directLocal.String()+"/24", tp.backend, "b1", directAddr.String()+"/24")

	tp.client.Run(t, "ip", "route", "add", "default", "via", lbFront.String())
	tp.backend.Run(t, "ip", "route", "add", "default", "via", lbBack.String())
	for _, kv := range []string{"net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"} {
		tp.lb.Run(t, "sysctl", "-qw", kv)
	}
	// A client opening thousands of connections per second must not run out of ports.
	tp.client.Run(t, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
	tp.client.Run(t, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")

	tp.clientMAC = mac(t, tp.client, "c0")
	tp.c1MAC = mac(t, tp.client, "c1")
	tp.lbFrontMAC = mac(t, tp.lb, "l0")
	tp.directMAC = mac(t, tp.backend, "b1")
	// Permanent neighbours: a flood of one-way UDP never confirms a neighbour, and a
	// re-probe in the middle of a round would be measured as the load balancer's cost.
	neigh := func(ns testenv.NetNS, addr netip.Addr, lladdr net.HardwareAddr, dev string) {
		ns.Run(t, "ip", "neigh", "replace", addr.String(), "lladdr", lladdr.String(), "dev", dev, "nud", "permanent")
	}
	neigh(tp.lb, backendAddr, mac(t, tp.backend, "b0"), "l1")
	neigh(tp.lb, clientAddr, tp.clientMAC, "l0")
	neigh(tp.backend, lbBack, mac(t, tp.lb, "l1"), "b0")
	neigh(tp.backend, directLocal, tp.c1MAC, "b1")
	neigh(tp.client, lbFront, tp.lbFrontMAC, "c0")
	neigh(tp.client, directAddr, tp.directMAC, "c1")
	return tp
}

func mac(t testing.TB, ns testenv.NetNS, dev string) net.HardwareAddr {
	t.Helper()
	var links []struct {
		Address string `json:"address"`
	}
	out := ns.Run(t, "ip", "-j", "link", "show", "dev", dev)
	if err := json.Unmarshal([]byte(out), &links); err != nil || len(links) != 1 {
		t.Fatalf("ip link show %s in %s: %v: %s", dev, ns.Name, err, out)
	}
	hw, err := net.ParseMAC(links[0].Address)
	if err != nil {
		t.Fatal(err)
	}
	return hw
}

// The main goroutine keeps the main thread, so inNetNS never moves the main thread
// into a namespace: Go cannot discard the main thread, and the process would then
// appear to live in that namespace (and be killed when it is removed).
func init() { runtime.LockOSThread() }

// inNetNS runs fn on an OS thread that has joined the named network namespace. The
// thread is never unlocked, so Go discards it when fn returns instead of reusing a
// thread that lives in another namespace.
func inNetNS(name string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open("/run/netns/" + name)
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", name, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}
