package datapath

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/shardlb/shardlb/internal/testenv"
	"github.com/shardlb/shardlb/shard"
	"github.com/vishvananda/netns"
)

// dsrLab is a client behind a router, two load-balancing nodes and a node running a
// pod, each in a namespace of its own, in one address family:
//
//	client .1.2 -- .1.1 router .11.1 -- .11.2 node A (load balancer)
//	                       .12.1 -- .12.2 node B (load balancer)
//	                       .13.1 -- .13.2 node E -- .100.1 | .100.2 pod
//
// The router sends the VIP to node A (as BGP would) and to node B when told. The pod
// answers HTTP with its name, the address and port the connection came from and, for
// a request with a body, the body's length.
type dsrLab struct {
	fam                  string
	client               netns.NsHandle
	router               testenv.NetNS
	vip                  netip.AddrPort
	nodeA, nodeB, nodeE  netip.Addr
	lbA, lbB, epNode     string // namespace paths
	clientAddr, podAddr  netip.Addr
	pod                  shard.Endpoint
	nsA, nsB, nsE, nsPod testenv.NetNS
}

func newDSRLab(t *testing.T, v6 bool) *dsrLab {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "ip", "ethtool", "sysctl")
	addr := func(n, host int) string {
		if v6 {
			return fmt.Sprintf("fd20:%d::%d", n, host)
		}
		return fmt.Sprintf("10.20.%d.%d", n, host)
	}
	bits := "/24"
	if v6 {
		bits = "/64"
	}
	l := &dsrLab{fam: "IPv4"}
	if v6 {
		l.fam = "IPv6"
	}
	client := testenv.NewNetNS(t, "dsrcli")
	l.router = testenv.NewNetNS(t, "dsrrt")
	l.nsA, l.nsB, l.nsE = testenv.NewNetNS(t, "dsrlba"), testenv.NewNetNS(t, "dsrlbb"), testenv.NewNetNS(t, "dsrep")
	l.nsPod = testenv.NewNetNS(t, "dsrpod")
	all := []testenv.NetNS{client, l.router, l.nsA, l.nsB, l.nsE, l.nsPod}
	for _, ns := range all {
		ns.Run(t, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
		ns.Run(t, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
	}
	for _, ns := range []testenv.NetNS{l.router, l.nsA, l.nsB, l.nsE} {
		ns.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
		ns.Run(t, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	}
	// Replies leave node E from the VIP while the router's route to the VIP points at
	// node A: a strict reverse-path filter on the router would drop them. This is what
	// dsr asks of the network (loose or no filter for VIP sources), set explicitly
	// rather than inherited from the host.
	l.router.Run(t, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2")
	l.router.Run(t, "sysctl", "-qw", "net.ipv4.conf.default.rp_filter=2")

	testenv.Veth(t, client, "c0", addr(1, 2)+bits, l.router, "r0", addr(1, 1)+bits)
	testenv.Veth(t, l.router, "r1", addr(11, 1)+bits, l.nsA, "n0", addr(11, 2)+bits)
	testenv.Veth(t, l.router, "r2", addr(12, 1)+bits, l.nsB, "n0", addr(12, 2)+bits)
	testenv.Veth(t, l.router, "r3", addr(13, 1)+bits, l.nsE, "n0", addr(13, 2)+bits)
	testenv.Veth(t, l.nsE, "pod0", addr(100, 1)+bits, l.nsPod, "eth0", addr(100, 2)+bits)
	client.Run(t, "ip", "route", "add", "default", "via", addr(1, 1))
	l.nsA.Run(t, "ip", "route", "add", "default", "via", addr(11, 1))
	l.nsB.Run(t, "ip", "route", "add", "default", "via", addr(12, 1))
	l.nsE.Run(t, "ip", "route", "add", "default", "via", addr(13, 1))
	l.nsPod.Run(t, "ip", "route", "add", "default", "via", addr(100, 1))

	l.client = openNS(t, client)
	l.clientAddr = netip.MustParseAddr(addr(1, 2))
	l.nodeA, l.nodeB, l.nodeE = netip.MustParseAddr(addr(11, 2)), netip.MustParseAddr(addr(12, 2)), netip.MustParseAddr(addr(13, 2))
	l.podAddr = netip.MustParseAddr(addr(100, 2))
	l.pod = shard.Endpoint{Addr: l.podAddr, Port: 8080, Node: l.nodeE}
	l.vip = netip.AddrPortFrom(netip.MustParseAddr(addr(200, 1)), 80)
	l.lbA, l.lbB, l.epNode = "/var/run/netns/"+l.nsA.Name, "/var/run/netns/"+l.nsB.Name, "/var/run/netns/"+l.nsE.Name

	serveHTTP(t, openNS(t, l.nsPod), netip.AddrPortFrom(l.podAddr, 8080), "pod", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		_, _ = fmt.Fprintf(w, "pod %s %d", r.RemoteAddr, n)
	})
	l.routeVIP(t, 11)
	return l
}

// routeVIP points the router's route to the VIP at the node on network n (11: A, 12: B).
func (l *dsrLab) routeVIP(t *testing.T, n int) {
	t.Helper()
	via := l.nodeA
	if n == 12 {
		via = l.nodeB
	}
	l.router.Run(t, "ip", "route", "replace", netip.PrefixFrom(l.vip.Addr(), l.vip.Addr().BitLen()).String(), "via", via.String())
}

func (l *dsrLab) frontend() shard.Frontend {
	return shard.Frontend{Service: "ns/dsr", VIP: l.vip.Addr(), Port: l.vip.Port(), Protocol: shard.TCP, Mode: shard.ModeDSR,
		Endpoints: []shard.Endpoint{l.pod}}
}

// node loads a datapath in the namespace at path, on its interfaces, serving the lab's
// frontend with node as its address.
func (l *dsrLab) node(t *testing.T, path string, node netip.Addr, ifs ...string) *Datapath {
	cfg := Config{Interfaces: ifs, NetNS: path, AttachMode: AttachTCX}
	if node.Is4() {
		cfg.NodeIPv4 = node
	} else {
		cfg.NodeIPv6 = node
	}
	d := attached(t, cfg)
	if err := d.SetServices([]shard.Frontend{l.frontend()}); err != nil {
		t.Fatal(err)
	}
	return d
}

func (l *dsrLab) url() string { return "http://" + l.vip.String() + "/" }

// ask sends one request on c (a body of n bytes when n > 0) and returns the answer:
// the pod's name, the connection's source as the pod saw it and the body's length.
func (l *dsrLab) ask(c *http.Client, n int) (string, error) {
	var resp *http.Response
	var err error
	if n > 0 {
		resp, err = c.Post(l.url(), "application/octet-stream", bytes.NewReader(make([]byte, n)))
	} else {
		resp, err = c.Get(l.url())
	}
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// TestDSRSurvivesLosingTheLoadBalancer is dsr's purpose: a connection through node A
// to a pod on node E keeps working when node A's program is gone, or its link cut, and
// the router sends the VIP to node B, which has never seen the connection; and the
// same with the router spreading the VIP over A and B by ECMP, when the node it chose
// loses its link. The pod sees the client's address; an upload larger than the
// links' MTU completes without a single "packet too big" (the MSS the pod announces
// was lowered by the encapsulation's overhead).
func TestDSRSurvivesLosingTheLoadBalancer(t *testing.T) {
	const (
		programRemoved = "node A's program removed"
		linkCut        = "node A's link cut"
		// ecmp: the router spreads the VIP over both nodes (shardlb without
		// --setRoles) and the node it hashed the connection to loses its link.
		ecmp = "ECMP, the chosen node's link cut"
	)
	for _, c := range []struct {
		v6   bool
		loss string
	}{{false, programRemoved}, {true, programRemoved}, {false, linkCut}, {true, linkCut}, {false, ecmp}, {true, ecmp}} {
		name := "IPv4"
		if c.v6 {
			name = "IPv6"
		}
		t.Run(name+", "+c.loss, func(t *testing.T) {
			v6 := c.v6
			l := newDSRLab(t, v6)
			epNode := l.node(t, l.epNode, l.nodeE, "n0", "pod0")
			lbA := l.node(t, l.lbA, l.nodeA, "n0")
			lbB := l.node(t, l.lbB, l.nodeB, "n0")
			if c.loss == ecmp {
				l.router.Run(t, "ip", "route", "replace", netip.PrefixFrom(l.vip.Addr(), l.vip.Addr().BitLen()).String(),
					"nexthop", "via", l.nodeA.String(), "nexthop", "via", l.nodeB.String())
			}

			cl := nsHTTPClient(t, l.client, true)
			first, err := l.ask(cl, 0)
			if err != nil {
				t.Fatalf("first request through node A: %v", err)
			}
			fields := strings.Fields(first)
			if len(fields) != 3 {
				t.Fatalf("answer %q", first)
			}
			src, err := netip.ParseAddrPort(fields[1])
			if err != nil || src.Addr() != l.clientAddr {
				t.Fatalf("the pod saw the connection from %s, want the client's address %s", fields[1], l.clientAddr)
			}
			const upload = 1 << 20
			answer, err := l.ask(cl, upload)
			if err != nil {
				t.Fatalf("upload of %d bytes: %v", upload, err)
			}
			if want := fmt.Sprintf("pod %s %d", src, upload); answer != want {
				t.Fatalf("upload answered %q, want %q", answer, want)
			}
			// The node the router chose (always A but with ECMP) and the other one.
			chosen, other, link := lbA, lbB, "r1"
			if c.loss == ecmp && serviceStats(t, lbA).Packets == 0 {
				chosen, other, link = lbB, lbA, "r2"
			}
			st := serviceStats(t, chosen)
			t.Logf("the chosen node after the upload: %+v", st)
			if st.ICMPErrors != 0 {
				t.Errorf("the chosen node answered %d packets as too big: the MSS was not lowered for the outer header", st.ICMPErrors)
			}
			if st.Packets < upload/1500 {
				t.Errorf("the chosen node sent %d packets on, fewer than the upload needs", st.Packets)
			}
			if n := serviceStats(t, other).Packets; n != 0 {
				t.Fatalf("the other node saw %d packets of the connection before the loss", n)
			}

			// The chosen node is lost: its program is gone, or its link, and the
			// router moves the VIP (by itself with ECMP).
			switch c.loss {
			case programRemoved:
				if err := lbA.Close(); err != nil {
					t.Fatal(err)
				}
				l.routeVIP(t, 12)
			case linkCut:
				l.router.Run(t, "ip", "link", "set", link, "down")
				l.routeVIP(t, 12)
			case ecmp:
				l.router.Run(t, "ip", "link", "set", link, "down")
			}
			for i := 0; i < 20; i++ {
				answer, err := l.ask(cl, 0)
				if err != nil {
					t.Fatalf("request %d on the connection after the chosen node was lost: %v", i, err)
				}
				if answer != first {
					t.Fatalf("request %d answered %q on the connection that was answered %q", i, answer, first)
				}
			}
			answer, err = l.ask(cl, upload)
			if err != nil || answer != fmt.Sprintf("pod %s %d", src, upload) {
				t.Fatalf("upload through node B: %q, %v", answer, err)
			}
			t.Logf("the other node: %+v; node E: %+v", serviceStats(t, other), serviceStats(t, epNode))
			if st := serviceStats(t, other); st.Packets == 0 || st.ReplyPackets != 0 {
				t.Errorf("the other node's counters: %+v (want packets toward the endpoint and no reply through it)", st)
			}
			if st := serviceStats(t, epNode); st.NewFlows != 1 {
				t.Errorf("node E balanced %d new flows, want the one connection", st.NewFlows)
			}

			fresh := nsHTTPClient(t, l.client, false)
			answer, err = l.ask(fresh, 0)
			if err != nil {
				t.Errorf("a new connection through node B: %v", err)
			} else if f := strings.Fields(answer); len(f) != 3 || !strings.HasPrefix(f[1], clientPrefix(l.clientAddr)) {
				t.Errorf("a new connection through node B answered %q, want the client's address %s", answer, l.clientAddr)
			}
			for _, d := range []*Datapath{epNode, other} {
				for reason, n := range d.Stats().Drops {
					if n != 0 {
						t.Errorf("%d packets dropped for %s", n, reason)
					}
				}
			}
		})
	}
}

// clientPrefix is how an address starts in an HTTP request's RemoteAddr.
func clientPrefix(a netip.Addr) string {
	if a.Is6() {
		return "[" + a.String() + "]:"
	}
	return a.String() + ":"
}

// serviceStats is the one frontend's counters of d.
func serviceStats(t *testing.T, d *Datapath) ServiceStats {
	t.Helper()
	st := d.Stats().Services
	if len(st) != 1 {
		t.Fatalf("%d frontends' counters, want 1", len(st))
	}
	return st[0]
}
