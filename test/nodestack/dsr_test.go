package nodestack

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/shardlb/shardlb/internal/labsys"
)

// testDSR runs the dsr service of testdata/dsr.yaml, one backend pod per node, on the
// stack's real pod networking: every pod answers through the VIP, the one on the
// master's own node (no encapsulation) and those behind the other nodes (the packet
// encapsulated to their node, the reply translated back to the VIP there and sent
// straight to the router). Then keep-alive connections to the pods behind the other
// nodes send a request every 20 ms while the master's node is lost without a
// handover: its shardlb process SIGKILLed and restarted by the kubelet (with the
// manifest's pinned datapath and graceful restart the router keeps the route via the
// node, whose program keeps forwarding); its link cut (BFD) and mended; the
// whole node frozen and thawed. Every request on them is answered, by the
// connection's pod, and the pods see the client's own address. The same connections
// through an onearm VIP of the same pods and master are printed beside them (their
// state was on the lost node). Last, in ECMP mode (the DaemonSet rolled out without
// --setRoles, which it keeps), the node the router hashes the connections to loses its
// link.
func testDSR(ctx context.Context, t *testing.T, st *Stack) {
	out, err := st.Kubectl(ctx, "apply", "-f", "test/nodestack/testdata/dsr.yaml")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kubectl apply -f test/nodestack/testdata/dsr.yaml\n%s", out)
	const svc, sel = "dsr-web", "what=dsr-web"
	vip, err := st.WaitVIP(ctx, "default", svc)
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(vip, vipPort)
	vip2, err := st.WaitVIP(ctx, "default", "onearm-web")
	if err != nil {
		t.Fatal(err)
	}
	onearm := netip.AddrPortFrom(vip2, vipPort)
	// The network must let replies from the VIP in wherever they leave a node.
	rp, _ := labsys.NSRun(routerNS, "sysctl", "-n", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.lan.rp_filter")
	t.Logf("router: rp_filter all, lan = %s", strings.Join(strings.Fields(rp), ", "))

	nodeOf := map[string]string{}
	err = st.WaitFor(ctx, 2*time.Minute, "a Ready dsr-web pod on every node", func() error {
		pods, err := st.Pods(ctx, "default", sel)
		if err != nil {
			return err
		}
		clear(nodeOf)
		nodes := map[string]bool{}
		for _, p := range pods {
			if !Ready(&p) || p.DeletionTimestamp != nil {
				return fmt.Errorf("%s not Ready", p.Name)
			}
			nodeOf[p.Name] = p.Spec.NodeName
			nodes[p.Spec.NodeName] = true
		}
		if len(nodes) != len(st.Nodes) || len(pods) != len(st.Nodes) {
			return fmt.Errorf("%d pods on %d nodes", len(pods), len(nodes))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	master, err := st.masterOf(ctx, vip)
	if err != nil {
		t.Fatal(err)
	}
	seen, err := st.WaitAnswers(ctx, "default", sel, addr)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := st.masterOf(ctx, vip); err != nil {
		t.Fatal(err)
	} else if again != master {
		t.Fatalf("the master of %s moved from %s to %s while it was fetched", vip, master.Name, again.Name)
	}
	for pod, n := range seen {
		how := "encapsulated to its node"
		if nodeOf[pod] == master.Name {
			how = "on the master's own node, no encapsulation"
		}
		t.Logf("%s (master %s) answered %d times by %s on %s (%s)", addr, master.Name, n, pod, nodeOf[pod], how)
	}

	t.Run("1 MiB uploaded through the VIP to each pod behind another node arrives whole", func(t *testing.T) {
		// The client's segments are the ones encapsulated: full-sized ones fit the
		// links between nodes only with the MSS the endpoint's node lowered.
		behind := map[string]bool{}
		for try := 0; try < 60 && len(behind) < len(st.Nodes)-1; try++ {
			c, err := dialKeepAlive(ctx, addr)
			if err != nil {
				t.Fatal(err)
			}
			pod, _, err := c.ask()
			if err != nil || nodeOf[pod] == master.Name || behind[pod] {
				c.conn.Close()
				if err != nil {
					t.Fatal(err)
				}
				continue
			}
			behind[pod] = true
			c.pod = pod
			start := time.Now()
			err = c.upload(1<<20, 200<<10)
			mss, _ := c.mss()
			c.conn.Close()
			if err != nil {
				t.Fatalf("uploading to %s on %s: %v", pod, nodeOf[pod], err)
			}
			t.Logf("1 MiB to %s on %s in %v; the client's MSS %d", pod, nodeOf[pod], time.Since(start).Round(time.Millisecond), mss)
		}
		if len(behind) != len(st.Nodes)-1 {
			t.Fatalf("uploads reached %d pods behind other nodes than %s, want %d", len(behind), master.Name, len(st.Nodes)-1)
		}
	})
	t.Run("SIGKILL of the master's shardlb process, restarted by the kubelet", func(t *testing.T) {
		ds, err := st.Kube.AppsV1().DaemonSets(lbNS).Get(ctx, "shardlb", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		// Without --pinPath the program and its maps go with the process, and the
		// route moves; with it (the manifest's) the route stays and the program
		// forwards until the next process takes over.
		pinned := slices.ContainsFunc(ds.Spec.Template.Spec.Containers[0].Args, func(a string) bool { return strings.HasPrefix(a, "--pinPath") })
		t.Logf("datapath pinned: %v", pinned)
		dsrRound(ctx, t, st, addr, onearm, sel, nodeOf, func(master *Node) (func() error, error) {
			p, err := st.podOn(ctx, master.Name)
			if err != nil {
				return nil, err
			}
			lb, err := st.Kube.CoreV1().Pods(lbNS).Get(ctx, p, metav1.GetOptions{})
			if err != nil {
				return nil, err
			}
			pid, err := st.containerPID(lb)
			if err != nil {
				return nil, err
			}
			restarts := lb.Status.ContainerStatuses[0].RestartCount
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				return nil, fmt.Errorf("SIGKILL of %s's shardlb (pid %d): %w", master.Name, pid, err)
			}
			t.Logf("SIGKILL of %s's shardlb process (pid %d, pod %s)", master.Name, pid, p)
			// The kubelet restarts the container; its new process takes its share of
			// shards back, so the VIP may move once more.
			return func() error {
				return st.WaitFor(ctx, 3*time.Minute, "the kubelet restarting "+p, func() error {
					cur, err := st.Kube.CoreV1().Pods(lbNS).Get(ctx, p, metav1.GetOptions{})
					if err != nil {
						return err
					}
					cs := cur.Status.ContainerStatuses
					if len(cs) != 1 {
						return fmt.Errorf("%d container statuses", len(cs))
					}
					if cs[0].RestartCount <= restarts || !Ready(cur) {
						return fmt.Errorf("restarts %d, ready %v", cs[0].RestartCount, Ready(cur))
					}
					return nil
				})
			}, nil
		})
	})
	t.Run("the master's link cut for 5 s (BFD), then mended", func(t *testing.T) {
		dsrRound(ctx, t, st, addr, onearm, sel, nodeOf, cutLink(ctx, t, st))
	})
	t.Run("the master's node frozen for 5 s (every process of it, by the cgroup freezer: no FIN, no RST), then thawed", func(t *testing.T) {
		dsrRound(ctx, t, st, addr, onearm, sel, nodeOf, func(master *Node) (func() error, error) {
			state := filepath.Join(cgroupMount, "freezer", master.cgroup, "freezer.state")
			thaw := func() error { return os.WriteFile(state, []byte("THAWED"), 0o644) }
			// Frozen processes cannot die: thawed before anything is stopped.
			t.Cleanup(func() { _ = thaw() })
			if err := os.WriteFile(state, []byte("FROZEN"), 0o644); err != nil {
				return nil, err
			}
			t.Logf("froze %s (%s): kubelet, containerd, shardlb and its pods; its eBPF program still runs", master.Name, state)
			return func() error {
				time.Sleep(5 * time.Second)
				if err := thaw(); err != nil {
					return err
				}
				t.Logf("thawed %s", master.Name)
				return st.waitSessions(ctx)
			}, nil
		})
	})
	t.Run("ECMP (no --setRoles): the node the router hashed the connections to loses its link", func(t *testing.T) {
		ds, err := st.Kube.AppsV1().DaemonSets(lbNS).Get(ctx, "shardlb", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		c := &ds.Spec.Template.Spec.Containers[0]
		c.Args = slices.DeleteFunc(c.Args, func(a string) bool { return strings.HasPrefix(a, "--setRoles") })
		old, err := st.Pods(ctx, lbNS, dsSelector)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := st.Kube.AppsV1().DaemonSets(lbNS).Update(ctx, ds, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := waitDaemonSet(ctx, st, old); err != nil {
			t.Fatal(err)
		}
		err = st.WaitFor(ctx, time.Minute, "a route to "+vip.String()+" over every node", func() error {
			hops, err := st.Router.KernelRoute(netip.PrefixFrom(vip, 32))
			if err != nil {
				return err
			}
			if len(hops) != len(st.Nodes) {
				return fmt.Errorf("next hops %v", hops)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("DaemonSet without --setRoles rolled out; the router spreads %s over every node", vip)
		dsrRoundVia(ctx, t, st, st.hashedTo, addr, netip.AddrPort{}, sel, nodeOf, cutLink(ctx, t, st))
	})
	// And new connections reach every pod again.
	seen, err = st.WaitAnswers(ctx, "default", sel, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("afterwards every pod answers new connections through %s: %v", addr, seen)
}

// dsrRound opens keep-alive connections through the dsr VIP to the pods behind the
// nodes other than the VIP's master (one each), and the same through the onearm VIP
// (the same pods and master) for comparison, asks on each every 20 ms, and reads a
// 60 s stream through each VIP from a pod behind another node; it loses the master
// with lose, waits for the function it returns (the node back) to finish and 5 s
// more, and checks that every request on the dsr connections was answered by the
// connection's pod, that the dsr stream arrived whole, and that new connections through
// the dsr VIP (one every 10 ms) failed only while the master was lost. It prints each connection's longest answer, what became of the
// onearm ones, and the router's route to the VIP over time.
func dsrRound(ctx context.Context, t *testing.T, st *Stack, addr, onearm netip.AddrPort, sel string, nodeOf map[string]string, lose func(master *Node) (func() error, error)) {
	dsrRoundVia(ctx, t, st, st.masterOf, addr, onearm, sel, nodeOf, lose)
}

// dsrRoundVia is dsrRound with the node that carries the client's traffic to a VIP
// found by carrier; an invalid onearm leaves the comparison out.
func dsrRoundVia(ctx context.Context, t *testing.T, st *Stack, carrier func(context.Context, netip.Addr) (*Node, error),
	addr, onearm netip.AddrPort, sel string, nodeOf map[string]string, lose func(master *Node) (func() error, error)) {
	vip := netip.PrefixFrom(addr.Addr(), 32)
	// The two VIPs are in one shard: after a handover their routes settle on one node.
	var master *Node
	err := st.WaitFor(ctx, time.Minute, "one node carrying both VIPs", func() error {
		var err error
		if master, err = carrier(ctx, addr.Addr()); err != nil || !onearm.IsValid() {
			return err
		}
		m, err := carrier(ctx, onearm.Addr())
		if err != nil {
			return err
		}
		if m != master {
			return fmt.Errorf("carried by %s and %s", master.Name, m.Name)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	to := []netip.AddrPort{addr}
	if onearm.IsValid() {
		to = append(to, onearm)
	}
	var conns []*keepAlive
	defer func() {
		for _, c := range conns {
			c.conn.Close()
		}
	}()
	pods, err := st.Pods(ctx, "default", sel)
	if err != nil {
		t.Fatal(err)
	}
	for _, to := range to {
		// A connection to the master's own pod is closed: its node is the one lost.
		behind := map[string]bool{}
		for try := 0; try < 60 && len(behind) < len(st.Nodes)-1; try++ {
			c, err := dialKeepAlive(ctx, to)
			if err != nil {
				t.Fatal(err)
			}
			pod, _, err := c.ask()
			if err != nil {
				c.conn.Close()
				t.Fatalf("first request on a keep-alive connection to %s: %v", to, err)
			}
			if nodeOf[pod] == master.Name || behind[pod] {
				c.conn.Close()
				continue
			}
			c.pod = pod
			behind[pod] = true
			conns = append(conns, c)
		}
		if len(behind) != len(st.Nodes)-1 {
			t.Fatalf("keep-alive connections through %s to %d pods behind other nodes than %s, want %d", to, len(behind), master.Name, len(st.Nodes)-1)
		}
	}
	// What address the pods see: the client's own in dsr, the node's in onearm.
	for _, c := range conns {
		i := slices.IndexFunc(pods, func(p corev1.Pod) bool { return p.Name == c.pod })
		if i < 0 {
			t.Fatalf("no pod %s", c.pod)
		}
		peers, err := st.tcpPeers(&pods[i])
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case slices.Contains(peers, c.conn.LocalAddr().String()):
			t.Logf("%s: %s on %s holds the connection from the client's own %s", c.addr, c.pod, nodeOf[c.pod], c.conn.LocalAddr())
		case c.addr == addr:
			t.Errorf("%s: %s's connections come from %v, none from the client's %s", c.addr, c.pod, peers, c.conn.LocalAddr())
		}
	}

	// A 60 s stream through each VIP from a pod behind another node than the master,
	// read from before the loss to its end.
	var streams []*stream
	defer func() {
		for _, s := range streams {
			s.conn.Close()
		}
	}()
	for _, to := range to {
		for try := 0; ; try++ {
			s, err := openStream(ctx, to)
			if err != nil {
				t.Fatalf("a stream through %s: %v", to, err)
			}
			if nodeOf[s.pod] != master.Name {
				streams = append(streams, s)
				go s.read()
				break
			}
			s.conn.Close()
			if try == 60 {
				t.Fatalf("no stream through %s from a pod behind another node than %s in 60 tries", to, master.Name)
			}
		}
	}

	var wg sync.WaitGroup
	done := make(chan struct{})
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.run(done, 20*time.Millisecond)
		}()
	}
	routes := watchRoute(st, vip, done, &wg)
	pcap := startCapture(t, st, vip.Addr())
	// New connections through the dsr VIP all along: they may fail only while the
	// established ones wait (checked below).
	const newConnTimeout = 500 * time.Millisecond
	prober := StartProber(ctx, []netip.AddrPort{addr}, 10*time.Millisecond, newConnTimeout)
	time.Sleep(time.Second)
	lost := time.Now()
	mend, err := lose(master)
	if err == nil {
		err = mend()
	}
	back := time.Now() // the node back (or its process, restarted)
	if err == nil {
		time.Sleep(5 * time.Second)
	}
	close(done)
	wg.Wait()
	newOK, _, newFailed, perr := prober.Stop()
	if perr != nil {
		t.Error(perr)
	}
	pcap.stop()
	if err != nil {
		t.Error(err)
	}
	name := map[netip.Addr]string{}
	for _, n := range st.Nodes {
		name[n.IP] = n.Name
	}
	var tl []string
	for _, r := range *routes {
		var hops []string
		for _, h := range r.hops {
			hops = append(hops, name[h])
		}
		tl = append(tl, fmt.Sprintf("%+v %v", r.at.Sub(lost).Round(time.Millisecond), hops))
	}
	t.Logf("the router's route to %s (via %s) from the loss on: %s", vip, master.Name, strings.Join(tl, ", "))
	for _, c := range conns {
		if c.addr == onearm {
			what := "every request answered"
			if c.err != nil {
				what = fmt.Sprintf("request %d failed at %+v: %v", c.answered+1, c.failedAt.Sub(lost).Round(time.Millisecond), c.err)
			}
			t.Logf("onearm, for comparison: connection to %s on %s: %d answered after the loss; %s", c.pod, nodeOf[c.pod], c.answeredAfter(lost), what)
			continue
		}
		t.Logf("dsr: connection to %s on %s: %d requests, %d answered after the loss; longest answer %v (asked at %+v)",
			c.pod, nodeOf[c.pod], c.answered, c.answeredAfter(lost), c.longest.Round(time.Millisecond), c.longestAt.Sub(lost).Round(time.Millisecond))
		if c.err != nil {
			t.Errorf("dsr: connection to %s on %s: request %d: %v", c.pod, nodeOf[c.pod], c.answered+1, c.err)
			t.Logf("the router's packets of %s (last 60):\n%s", c.conn.LocalAddr(), pcap.packets(c.conn.LocalAddr().(*net.TCPAddr).Port, 60))
		}
		if c.answeredAfter(lost) == 0 {
			t.Errorf("dsr: connection to %s: no request answered after the loss", c.pod)
		}
	}
	for _, s := range streams {
		select {
		case <-s.done:
		case <-time.After(2 * time.Minute):
			s.conn.Close()
			<-s.done
		}
		what := fmt.Sprintf("%d of %d bytes intact, longest stall %v (from %+v)", s.got, streamBytes, s.stall.Round(time.Millisecond), s.stallAt.Sub(lost).Round(time.Millisecond))
		if s.err != nil {
			what += ": " + s.err.Error()
		}
		if s.addr == onearm {
			t.Logf("onearm, for comparison: 60 s stream from %s on %s: %s", s.pod, nodeOf[s.pod], what)
			continue
		}
		t.Logf("dsr: 60 s stream from %s on %s: %s", s.pod, nodeOf[s.pod], what)
		if s.err != nil {
			t.Errorf("dsr: the stream from %s on %s did not complete: %v", s.pod, nodeOf[s.pod], s.err)
		}
		if !s.finished.After(lost) {
			t.Errorf("dsr: the stream from %s ended before the loss", s.pod)
		}
	}
	// The failover gap of this case: when the last wait of an established dsr
	// connection or stream ended. New connections balanced to the lost node's own pod
	// fail until the node is back (no endpoint health probe is set on this service), the
	// others only within that gap: so a failure is allowed from the loss until the
	// node's return, and none after it.
	gapEnd := lost
	for _, c := range conns {
		if c.addr == addr && c.longestAt.Add(c.longest).After(gapEnd) {
			gapEnd = c.longestAt.Add(c.longest)
		}
	}
	for _, s := range streams {
		if s.addr == addr && s.stallAt.Add(s.stall).After(gapEnd) {
			gapEnd = s.stallAt.Add(s.stall)
		}
	}
	window := "none failed"
	if len(newFailed) > 0 {
		window = fmt.Sprintf("%d failed, from %+v to %+v", len(newFailed), newFailed[0].At.Sub(lost).Round(time.Millisecond), newFailed[len(newFailed)-1].At.Sub(lost).Round(time.Millisecond))
	}
	t.Logf("dsr: new connections every 10 ms: %d answered, %s (a failure is told %v after its start); the established connections' gap ends at %+v, the node was back at %+v",
		newOK[addr], window, newConnTimeout, gapEnd.Sub(lost).Round(time.Millisecond), back.Sub(lost).Round(time.Millisecond))
	for _, f := range newFailed {
		// A probe fails at its end, up to newConnTimeout (and a scheduling slack)
		// after it began.
		if f.At.Before(lost) || f.At.After(back.Add(newConnTimeout+time.Second)) {
			t.Errorf("dsr: a new connection failed at %+v, outside the loss (to %+v): %v", f.At.Sub(lost).Round(time.Millisecond), back.Sub(lost).Round(time.Millisecond), f.Err)
		}
	}
}

// cutLink returns a lose function for dsrRound that cuts the node's link for 5 s and
// mends it.
func cutLink(ctx context.Context, t *testing.T, st *Stack) func(*Node) (func() error, error) {
	return func(n *Node) (func() error, error) {
		port := n.Name // the router's bridge port of the node (topology)
		// The router's end of the node's link: the node keeps its addresses and
		// routes, as with a cable pulled.
		if _, err := labsys.NSRun(routerNS, "ip", "link", "set", port, "down"); err != nil {
			return nil, err
		}
		t.Logf("cut %s's link (the router's port %s down)", n.Name, port)
		mended := false
		t.Cleanup(func() {
			if !mended {
				_, _ = labsys.NSRun(routerNS, "ip", "link", "set", port, "up")
			}
		})
		return func() error {
			time.Sleep(5 * time.Second)
			mended = true
			if _, err := labsys.NSRun(routerNS, "ip", "link", "set", port, "up"); err != nil {
				return err
			}
			t.Logf("mended %s's link", n.Name)
			return st.waitSessions(ctx)
		}, nil
	}
}

// waitSessions waits for the router's BGP sessions with every node to be established.
func (st *Stack) waitSessions(ctx context.Context) error {
	return st.WaitFor(ctx, 2*time.Minute, "the router's sessions with every node", func() error {
		sum, err := st.Router.Summary(ctx)
		if err != nil {
			return err
		}
		for _, n := range st.Nodes {
			if s := sum[n.IP]; s.State != "Established" {
				return fmt.Errorf("%s: %s", n.Name, s.State)
			}
		}
		return nil
	})
}

// hashedTo is the node the router forwards the client's packets to vip to, by its
// kernel's multipath hash.
func (st *Stack) hashedTo(_ context.Context, vip netip.Addr) (*Node, error) {
	out, err := labsys.NSRun(routerNS, "ip", "route", "get", vip.String(), "from", ClientAddr.String(), "iif", "cli")
	if err != nil {
		return nil, err
	}
	f := strings.Fields(out)
	if i := slices.Index(f, "via"); i >= 0 && i+1 < len(f) {
		for _, n := range st.Nodes {
			if n.IP.String() == f[i+1] {
				return n, nil
			}
		}
	}
	return nil, fmt.Errorf("the router routes %s from the client by %q", vip, strings.TrimSpace(out))
}

// masterOf is the node of the router's best path to vip.
func (st *Stack) masterOf(ctx context.Context, vip netip.Addr) (*Node, error) {
	var master *Node
	err := st.WaitFor(ctx, time.Minute, "a best path to "+vip.String(), func() error {
		best, ok, err := st.Router.BestPath(ctx, netip.PrefixFrom(vip, 32))
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("no best path")
		}
		for _, n := range st.Nodes {
			if n.IP == best.NextHop {
				master = n
				return nil
			}
		}
		return fmt.Errorf("best path via %s, no node", best.NextHop)
	})
	return master, err
}

// keepAlive is one HTTP/1.1 connection from the client, asked again and again.
type keepAlive struct {
	addr netip.AddrPort
	conn net.Conn
	br   *bufio.Reader
	pod  string // the pod that answered the first request

	mu        sync.Mutex
	answered  int
	times     []time.Time // when each answer arrived
	longest   time.Duration
	longestAt time.Time
	err       error
	failedAt  time.Time
}

func dialKeepAlive(ctx context.Context, addr netip.AddrPort) (*keepAlive, error) {
	var c net.Conn
	err := inClient(func() error {
		var d net.Dialer
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		var err error
		c, err = d.DialContext(ctx, "tcp", addr.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	return &keepAlive{addr: addr, conn: c, br: bufio.NewReader(c)}, nil
}

// ask sends one request and returns the pod that answered and how long it took. An
// answer may take up to 10 s: TCP retransmits what a lost node dropped.
func (k *keepAlive) ask() (string, time.Duration, error) {
	start := time.Now()
	if err := k.conn.SetDeadline(start.Add(10 * time.Second)); err != nil {
		return "", 0, err
	}
	if _, err := fmt.Fprintf(k.conn, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", k.addr); err != nil {
		return "", 0, err
	}
	resp, err := http.ReadResponse(k.br, nil)
	if err != nil {
		return "", 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", 0, err
	}
	if resp.StatusCode != http.StatusOK || resp.Close {
		return "", 0, fmt.Errorf("%s (close %v)", resp.Status, resp.Close)
	}
	return strings.TrimSpace(string(body)), time.Since(start), nil
}

// upload sends total bytes as POST bodies of at most chunk bytes (which the backend
// reads past, as it answers without reading them) and asks once more after each: the
// server reads the next request only after the whole body, so every answer proves
// the body before it arrived.
func (k *keepAlive) upload(total, chunk int) error {
	body := make([]byte, chunk)
	for sent := 0; sent < total; sent += chunk {
		n := min(chunk, total-sent)
		if err := k.conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
			return err
		}
		if _, err := fmt.Fprintf(k.conn, "POST / HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n", k.addr, n); err != nil {
			return err
		}
		if _, err := k.conn.Write(body[:n]); err != nil {
			return err
		}
		resp, err := http.ReadResponse(k.br, nil)
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		pod, _, err := k.ask()
		if err != nil {
			return fmt.Errorf("after %d bytes: %w", sent+n, err)
		}
		if pod != k.pod {
			return fmt.Errorf("answered by %s, the connection's pod is %s", pod, k.pod)
		}
	}
	return nil
}

// mss is the connection's maximum segment size as the client's kernel holds it.
func (k *keepAlive) mss() (int, error) {
	raw, err := k.conn.(*net.TCPConn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var mss int
	var serr error
	if err := raw.Control(func(fd uintptr) {
		mss, serr = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG)
	}); err != nil {
		return 0, err
	}
	return mss, serr
}

// run asks every interval until done, or until a request fails or another pod answers.
func (k *keepAlive) run(done <-chan struct{}, interval time.Duration) {
	for {
		select {
		case <-done:
			return
		case <-time.After(interval):
		}
		pod, took, err := k.ask()
		if err == nil && pod != k.pod {
			err = fmt.Errorf("answered by %s, the connection's pod is %s", pod, k.pod)
		}
		k.mu.Lock()
		if err != nil {
			k.err, k.failedAt = err, time.Now()
			k.mu.Unlock()
			return
		}
		k.answered++
		now := time.Now()
		k.times = append(k.times, now)
		if took > k.longest {
			k.longest, k.longestAt = took, now.Add(-took)
		}
		k.mu.Unlock()
	}
}

// answeredAfter counts the answers that arrived after t.
func (k *keepAlive) answeredAfter(t time.Time) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	i, _ := slices.BinarySearchFunc(k.times, t, func(a, b time.Time) int { return a.Compare(b) })
	return len(k.times) - i
}

// tcpPeers lists the peers (address:port) of the established TCP connections in the
// pod's network namespace, as ss reads them there.
func (st *Stack) tcpPeers(p *corev1.Pod) ([]string, error) {
	pid, err := st.containerPID(p)
	if err != nil {
		return nil, err
	}
	out, err := labsys.Sh("nsenter", "-t", strconv.Itoa(pid), "-n", "ss", "-Htn", "state", "established")
	if err != nil {
		return nil, err
	}
	var peers []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		// A dual-stack listener's peers are IPv4-mapped.
		if a, err := netip.ParseAddrPort(f[3]); err == nil {
			peers = append(peers, netip.AddrPortFrom(a.Addr().Unmap(), a.Port()).String())
		}
	}
	return peers, nil
}

// capture is a tcpdump in the router's namespace, on every interface (the client's,
// the nodes' bridge ports), of the packets from or to a VIP and the encapsulated ones
// between nodes, headers only: a failed connection's packets say which hop lost or
// reset it. Its file goes with the stack's directory.
type capture struct {
	proc *labsys.Proc
	file string
}

func startCapture(t *testing.T, st *Stack, vip netip.Addr) *capture {
	file := filepath.Join(st.Dir, strings.NewReplacer("/", "-", " ", "_").Replace(t.Name())+".pcap")
	p, err := labsys.StartProc("tcpdump", file+".log", "ip", "netns", "exec", routerNS,
		"tcpdump", "-i", "any", "-n", "-s", "160", "-U", "-w", file, "host "+vip.String()+" or ip proto 4")
	if err != nil {
		t.Logf("no capture: %v", err)
		return &capture{}
	}
	time.Sleep(300 * time.Millisecond) // tcpdump opens its socket
	return &capture{proc: p, file: file}
}

func (c *capture) stop() {
	if c.proc != nil {
		c.proc.Stop(5 * time.Second)
	}
}

// packets decodes the capture's packets of the client's port (inner headers of
// encapsulated ones included), the last n of them.
func (c *capture) packets(port, n int) string {
	if c.file == "" {
		return "(no capture)"
	}
	// Read in the router's namespace, where the interface indexes name its interfaces.
	out, err := labsys.NSRun(routerNS, "tcpdump", "-r", c.file, "-n", "-tt")
	if err != nil {
		return err.Error()
	}
	var lines []string
	var last string
	repeats := 0
	p := fmt.Sprintf(".%d", port)
	for _, l := range strings.Split(out, "\n") {
		if !strings.Contains(l, p+" ") && !strings.Contains(l, p+":") {
			continue
		}
		// One packet seen on several interfaces (bridge ports, the bridge) or going
		// round a loop: one line, counted.
		f := strings.Fields(l)
		key := strings.Join(f[min(3, len(f)):], " ")
		if key == last {
			repeats++
			continue
		}
		if repeats > 0 {
			lines[len(lines)-1] += fmt.Sprintf(" (seen %d times)", repeats+1)
		}
		last, repeats = key, 0
		lines = append(lines, l)
	}
	if repeats > 0 {
		lines[len(lines)-1] += fmt.Sprintf(" (seen %d times)", repeats+1)
	}
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// routeChange is the router's kernel route to a VIP from a moment on.
type routeChange struct {
	at   time.Time
	hops []netip.Addr
}

// watchRoute records the router's kernel route to prefix every 2 ms until done.
func watchRoute(st *Stack, prefix netip.Prefix, done <-chan struct{}, wg *sync.WaitGroup) *[]routeChange {
	var changes []routeChange
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			hops, err := st.Router.KernelRoute(prefix)
			if err == nil && (len(changes) == 0 || !slices.Equal(hops, changes[len(changes)-1].hops)) {
				changes = append(changes, routeChange{at: time.Now(), hops: hops})
			}
			select {
			case <-done:
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()
	return &changes
}
