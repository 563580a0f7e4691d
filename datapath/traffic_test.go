package datapath

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/shardlb/shardlb/internal/testenv"
	"github.com/shardlb/shardlb/shard"
	"github.com/vishvananda/netns"
)

// lab is a client, a load balancer and three backends, each in its own namespace,
// joined by veth pairs with checksum offload off:
//
//	client 10.10.1.2 -- 10.10.1.1 lb 10.10.1N.1 -- 10.10.1N.2 backend N (N = 1..3)
//
// Every backend runs an HTTP server that answers with its own name and the address the
// connection came from.
type lab struct {
	client   netns.NsHandle
	clientNS testenv.NetNS // the client's namespace, for commands run there
	lbPath   string
	lbIfs    []string
	backends []shard.Endpoint
	names    map[netip.AddrPort]string
	// backendNS are the backends' namespaces, in the order of backends.
	backendNS []netns.NsHandle
}

var labVIP = netip.MustParseAddr("10.10.100.1")

func newLab(t *testing.T) *lab {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "ip", "ethtool", "sysctl")
	client := testenv.NewNetNS(t, "dpcli")
	lb := testenv.NewNetNS(t, "dplb")
	l := &lab{client: openNS(t, client), clientNS: client, lbPath: "/var/run/netns/" + lb.Name, names: map[netip.AddrPort]string{}}

	testenv.Veth(t, client, "c0", "10.10.1.2/24", lb, "l0", "10.10.1.1/24")
	client.Run(t, "ip", "route", "add", "default", "via", "10.10.1.1")
	lb.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	l.lbIfs = []string{"l0"}
	for i := 1; i <= 3; i++ {
		be := testenv.NewNetNS(t, fmt.Sprintf("dpbe%d", i))
		lbIf := fmt.Sprintf("l%d", i)
		testenv.Veth(t, lb, lbIf, fmt.Sprintf("10.10.1%d.1/24", i), be, "b0", fmt.Sprintf("10.10.1%d.2/24", i))
		be.Run(t, "ip", "route", "add", "default", "via", fmt.Sprintf("10.10.1%d.1", i))
		l.lbIfs = append(l.lbIfs, lbIf)
		ep := netip.AddrPortFrom(netip.MustParseAddr(fmt.Sprintf("10.10.1%d.2", i)), 8080)
		name := fmt.Sprintf("backend%d", i)
		l.names[ep] = name
		l.backends = append(l.backends, shard.Endpoint{Addr: ep.Addr(), Port: ep.Port()})
		beNS := openNS(t, be)
		l.backendNS = append(l.backendNS, beNS)
		serve(t, beNS, ep, name)
	}
	return l
}

// serve runs an HTTP server in ns on ep, answering every request with name.
func serve(t *testing.T, ns netns.NsHandle, ep netip.AddrPort, name string) {
	serveHTTP(t, ns, ep, name, func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		_, _ = io.WriteString(w, name+" "+host)
	})
}

// serveHTTP runs an HTTP server with handler in ns on ep until the test ends.
func serveHTTP(t *testing.T, ns netns.NsHandle, ep netip.AddrPort, name string, handler http.HandlerFunc) {
	var ln net.Listener
	var err error
	inNetNS(t, ns, func() { ln, err = net.Listen("tcp", ep.String()) })
	if err != nil {
		t.Fatalf("listen on %s: %v", ep, err)
	}
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("backend %s: %v", name, err)
		}
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-done
	})
}

// httpClient dials from the client namespace; keepAlive reuses one connection.
func (l *lab) httpClient(t *testing.T, keepAlive bool) *http.Client {
	return nsHTTPClient(t, l.client, keepAlive)
}

// nsHTTPClient is an HTTP client that dials from ns; keepAlive reuses one connection.
func nsHTTPClient(t *testing.T, ns netns.NsHandle, keepAlive bool) *http.Client {
	tr := &http.Transport{
		DisableKeepAlives: !keepAlive,
		MaxConnsPerHost:   1,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var c net.Conn
			var err error
			inNetNS(t, ns, func() {
				c, err = (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr)
			})
			return c, err
		},
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// attached loads a datapath attached as cfg says, closed (and checked) when the test
// ends.
func attached(t *testing.T, cfg Config) *Datapath {
	t.Helper()
	d, err := New(cfg, slog.New(slog.NewTextHandler(t.Output(), nil)))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return d
}

func get(c *http.Client) (string, error) {
	resp, err := c.Get("http://" + netip.AddrPortFrom(labVIP, 80).String() + "/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// TestRealTraffic runs HTTP through the VIP with the program at each hook: a tcx link,
// and a tc filter (forced here, where auto would take tcx), in each program variant.
func TestRealTraffic(t *testing.T) {
	for _, mode := range []AttachMode{AttachTCX, AttachTC} {
		t.Run("attach mode "+string(mode), func(t *testing.T) {
			forEachVariant(t, func(t *testing.T, v variant) { testRealTraffic(t, mode, v) })
		})
	}
}

func testRealTraffic(t *testing.T, mode AttachMode, v variant) {
	l := newLab(t)
	d := attached(t, Config{Interfaces: l.lbIfs, NetNS: l.lbPath, NodeIPv4: netip.MustParseAddr("10.10.1.1"), AttachMode: mode, variant: v})
	frontend := func(m shard.Mode, eps []shard.Endpoint) shard.Frontend {
		return shard.Frontend{Service: "ns/web", VIP: labVIP, Port: 80, Protocol: shard.TCP, Mode: m, Endpoints: eps}
	}

	for _, m := range []shard.Mode{shard.ModeDefault, shard.ModeOneArm} {
		t.Run(fmt.Sprintf("HTTP to the VIP in %s mode succeeds and spreads over the backends", m), func(t *testing.T) {
			if err := d.SetServices([]shard.Frontend{frontend(m, l.backends)}); err != nil {
				t.Fatal(err)
			}
			c := l.httpClient(t, false)
			// onearm endpoints see the node; default ones the client itself.
			wantFrom := map[shard.Mode]string{shard.ModeDefault: "10.10.1.2", shard.ModeOneArm: "10.10.1.1"}[m]
			seen := map[string]int{}
			for i := 0; i < 30; i++ {
				body, err := get(c)
				if err != nil {
					t.Fatalf("request %d: %v", i, err)
				}
				name, from, _ := strings.Cut(body, " ")
				if from != wantFrom {
					t.Errorf("request %d reached %s from %s, want from %s", i, name, from, wantFrom)
				}
				seen[name]++
			}
			t.Logf("answers: %v", seen)
			for _, name := range l.names {
				if seen[name] == 0 {
					t.Errorf("%s never answered: %v", name, seen)
				}
			}
		})
	}

	t.Run("a long-lived connection survives an endpoint being added", func(t *testing.T) {
		if err := d.SetServices([]shard.Frontend{frontend(shard.ModeDefault, l.backends[:2])}); err != nil {
			t.Fatal(err)
		}
		c := l.httpClient(t, true)
		first, err := get(c)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.SetServices([]shard.Frontend{frontend(shard.ModeDefault, l.backends)}); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 20; i++ {
			body, err := get(c)
			if err != nil {
				t.Fatalf("request %d on the same connection after the endpoint was added: %v", i, err)
			}
			if body != first {
				t.Fatalf("request %d answered by %s, the connection started on %s", i, body, first)
			}
		}
	})

	t.Run("a program after the datapath's still sees the traffic that is not the datapath's", func(t *testing.T) {
		// A tc filter at a later priority: after the tcx program, or after the datapath's
		// own filter. The datapath hands packets it does not handle on (TC_ACT_UNSPEC).
		c := newCounter(t)
		c.attach(t, l.lbPath, "l0", 100, 1, "later")
		const n = 20
		before := c.count(t)
		sendUDP(t, l.client, netip.MustParseAddrPort("10.10.1.1:9"), n)
		if got := c.count(t) - before; got < n {
			t.Errorf("the later program saw %d packets of %d sent to the node's own address", got, n)
		}
	})

	t.Run("counters show the traffic and no drops", func(t *testing.T) {
		st := d.Stats()
		if len(st.Services) != 1 || st.Services[0].Packets == 0 || st.Services[0].ReplyPackets == 0 || st.Services[0].NewFlows == 0 {
			t.Errorf("service counters: %+v", st.Services)
		}
		for reason, n := range st.Drops {
			if n != 0 {
				t.Errorf("%d packets dropped for %s", n, reason)
			}
		}
	})
}
