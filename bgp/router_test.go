package bgp

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/osrg/gobgp/v4/api"
	"github.com/osrg/gobgp/v4/pkg/apiutil"
	"github.com/osrg/gobgp/v4/pkg/packet/bgp"
	"github.com/osrg/gobgp/v4/pkg/server"
)

// testRouter is an upstream router for in-process tests: a plain GoBGP that
// listens on a loopback address, accepts every route and records every UPDATE.
type testRouter struct {
	t    testing.TB
	srv  *server.BgpServer
	addr netip.Addr
	port uint16
	asn  uint32

	mu      sync.Mutex
	updates []seenPath
}

// seenPath is one path as the router saw it.
type seenPath struct {
	From      netip.Addr
	Prefix    netip.Prefix
	Withdraw  bool
	Best      bool
	LocalPref uint32 // 0: absent
	MED       uint32
	ASPath    []uint32
	NextHop   netip.Addr
	// Communities and LargeCommunities as "ASN:VALUE" and "ASN:DATA1:DATA2".
	Communities, LargeCommunities []string
	At                            time.Time
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// freePort returns a TCP port that was free on addr a moment ago.
func freePort(t testing.TB, addr netip.Addr) uint16 {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(addr.String(), "0"))
	if err != nil {
		t.Fatalf("find a free port on %v: %v", addr, err)
	}
	defer l.Close()
	return uint16(l.Addr().(*net.TCPAddr).Port)
}

// newTestRouter starts a router on addr that waits for the given peers (address ->
// ASN) to connect.
func newTestRouter(t testing.TB, addr string, asn uint32, peers map[string]uint32) *testRouter {
	t.Helper()
	a := netip.MustParseAddr(addr)
	return newTestRouterAt(t, a, freePort(t, a), asn, peers)
}

// newTestRouterAt is newTestRouter on a given port.
func newTestRouterAt(t testing.TB, a netip.Addr, port uint16, asn uint32, peers map[string]uint32) *testRouter {
	t.Helper()
	addr := a.String()
	r := &testRouter{t: t, addr: a, asn: asn, port: port}
	lvl := new(slog.LevelVar)
	lvl.Set(slog.LevelWarn)
	r.srv = server.NewBgpServer(server.LoggerOption(testLogger(t).With("router", addr), lvl))
	go r.srv.Serve()
	t.Cleanup(r.srv.Stop)
	ctx := context.Background()
	err := r.srv.StartBgp(ctx, &api.StartBgpRequest{Global: &api.Global{
		Asn: asn, RouterId: addr, ListenPort: int32(r.port), ListenAddresses: []string{addr},
	}})
	if err != nil {
		t.Fatalf("start test router: %v", err)
	}
	err = r.srv.WatchEvent(ctx, server.WatchEventMessageCallbacks{OnPathUpdate: r.record}, server.WatchUpdate(false, "", ""))
	if err != nil {
		t.Fatalf("watch test router updates: %v", err)
	}
	for a, as := range peers {
		r.addPeer(a, as, "")
	}
	return r
}

func (r *testRouter) addPeer(addr string, asn uint32, password string) {
	r.t.Helper()
	err := r.srv.AddPeer(context.Background(), &api.AddPeerRequest{Peer: &api.Peer{
		Conf:      &api.PeerConf{NeighborAddress: addr, PeerAsn: asn, AuthPassword: password},
		Transport: &api.Transport{PassiveMode: true},
		AfiSafis: []*api.AfiSafi{
			{Config: &api.AfiSafiConfig{Enabled: true, Family: &api.Family{Afi: api.Family_AFI_IP, Safi: api.Family_SAFI_UNICAST}}},
			{Config: &api.AfiSafiConfig{Enabled: true, Family: &api.Family{Afi: api.Family_AFI_IP6, Safi: api.Family_SAFI_UNICAST}}},
		},
	}})
	if err != nil {
		r.t.Fatalf("add peer %s to test router: %v", addr, err)
	}
}

// peer is how a speaker configures this router as its peer.
func (r *testRouter) peer() Peer { return Peer{Addr: r.addr, ASN: r.asn, Port: r.port} }

func (r *testRouter) record(paths []*apiutil.Path, at time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, p := range paths {
		sp := toSeen(p)
		sp.At = at
		r.updates = append(r.updates, sp)
	}
}

// seen returns the UPDATEs recorded for prefix, oldest first.
func (r *testRouter) seen(prefix string) []seenPath {
	pfx := netip.MustParsePrefix(prefix)
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []seenPath
	for _, u := range r.updates {
		if u.Prefix == pfx {
			out = append(out, u)
		}
	}
	return out
}

func (r *testRouter) updateCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.updates)
}

func toSeen(p *apiutil.Path) seenPath {
	sp := seenPath{From: p.PeerAddress, Withdraw: p.Withdrawal, Best: p.Best}
	if pfx, err := netip.ParsePrefix(p.Nlri.String()); err == nil {
		sp.Prefix = pfx
	}
	for _, a := range p.Attrs {
		switch a := a.(type) {
		case *bgp.PathAttributeLocalPref:
			sp.LocalPref = a.Value
		case *bgp.PathAttributeMultiExitDisc:
			sp.MED = a.Value
		case *bgp.PathAttributeAsPath:
			for _, seg := range a.Value {
				sp.ASPath = append(sp.ASPath, seg.GetAS()...)
			}
		case *bgp.PathAttributeNextHop:
			sp.NextHop = a.Value
		case *bgp.PathAttributeMpReachNLRI:
			sp.NextHop = a.Nexthop
		case *bgp.PathAttributeCommunities:
			for _, c := range a.Value {
				sp.Communities = append(sp.Communities, fmt.Sprintf("%d:%d", c>>16, c&0xffff))
			}
		case *bgp.PathAttributeLargeCommunities:
			for _, c := range a.Values {
				sp.LargeCommunities = append(sp.LargeCommunities, fmt.Sprintf("%d:%d:%d", c.ASN, c.LocalData1, c.LocalData2))
			}
		}
	}
	return sp
}

// rib returns the router's paths for prefix, one per speaker that announces it.
func (r *testRouter) rib(prefix string) []seenPath {
	r.t.Helper()
	pfx := netip.MustParsePrefix(prefix)
	family := bgp.RF_IPv4_UC
	if pfx.Addr().Is6() {
		family = bgp.RF_IPv6_UC
	}
	var out []seenPath
	err := r.srv.ListPath(apiutil.ListPathRequest{
		TableType: api.TableType_TABLE_TYPE_GLOBAL,
		Family:    family,
		Prefixes:  []*apiutil.LookupPrefix{{Prefix: prefix}},
	}, func(_ bgp.NLRI, paths []*apiutil.Path) {
		for _, p := range paths {
			out = append(out, toSeen(p))
		}
	})
	if err != nil {
		r.t.Fatalf("list router paths for %s: %v", prefix, err)
	}
	return out
}

func (r *testRouter) best(prefix string) (seenPath, bool) {
	for _, p := range r.rib(prefix) {
		if p.Best {
			return p, true
		}
	}
	return seenPath{}, false
}

// announce makes the router send a route to its peers, for import tests.
func (r *testRouter) announce(prefix string) {
	r.t.Helper()
	pfx := netip.MustParsePrefix(prefix)
	nlri, _ := bgp.NewIPAddrPrefix(pfx)
	nh, _ := bgp.NewPathAttributeNextHop(r.addr)
	_, err := r.srv.AddPath(apiutil.AddPathRequest{Paths: []*apiutil.Path{{
		Family: bgp.RF_IPv4_UC, Nlri: nlri,
		Attrs: []bgp.PathAttributeInterface{bgp.NewPathAttributeOrigin(0), nh},
	}}})
	if err != nil {
		r.t.Fatalf("router announce %s: %v", prefix, err)
	}
}

// eventually polls cond every 20 ms until it holds or timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// testConfig is a speaker on local (127.0.0.x) peering with the routers, dialling
// out, with no gRPC API.
func testConfig(local string, asn uint32, routers ...*testRouter) Config {
	cfg := DefaultConfig()
	cfg.LocalASN = asn
	cfg.RouterID = netip.MustParseAddr(local)
	cfg.LocalAddr = cfg.RouterID
	cfg.GRPCListen = ""
	cfg.ConnectRetry = time.Second
	for _, r := range routers {
		cfg.Peers = append(cfg.Peers, r.peer())
	}
	return cfg
}

func startSpeaker(t testing.TB, cfg Config) *Speaker {
	t.Helper()
	s, err := New(context.Background(), cfg, testLogger(t).With("speaker", cfg.RouterID))
	if err != nil {
		t.Fatalf("start speaker %v: %v", cfg.RouterID, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
	})
	return s
}

func waitEstablished(t testing.TB, s *Speaker, peers ...netip.Addr) {
	t.Helper()
	eventually(t, 15*time.Second, "sessions established", func() bool {
		up := 0
		for _, p := range s.Peers() {
			if p.Established && slices.Contains(peers, p.Addr) {
				up++
			}
		}
		return up == len(peers)
	})
}

func itoa(n int) string { return strconv.Itoa(n) }
