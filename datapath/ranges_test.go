package datapath

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/shardlb/shardlb/shard"
)

func prefixes(ss ...string) []netip.Prefix {
	ps := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		ps[i] = netip.MustParsePrefix(s)
	}
	return ps
}

// rangeFamily holds one family's addresses for the source-range fixtures.
type rangeFamilyCase struct {
	f ipFamily
	// ranges: inside is in ranges' first prefix only through a longer prefix that is
	// not listed; the list also holds a prefix of the other family.
	ranges          []netip.Prefix
	inside, outside netip.Addr
	// narrowed lists outside and not inside; elsewhere lists neither.
	narrowed, elsewhere []netip.Prefix
	// otherFamily is a list of prefixes of the other family only.
	otherFamily []netip.Prefix
}

var rangeFamilies = []rangeFamilyCase{
	{
		f:      families[0],
		ranges: prefixes("10.0.0.0/8", "10.9.0.0/16", "2001:db8:1::/48"),
		inside: netip.MustParseAddr("10.1.2.3"), outside: netip.MustParseAddr("172.16.0.5"),
		narrowed: prefixes("172.16.0.0/12"), elsewhere: prefixes("192.168.0.0/16"),
		otherFamily: prefixes("fd00::/16"),
	},
	{
		f:      families[1],
		ranges: prefixes("fd00::/16", "fd00:9::/32", "10.0.0.0/8"),
		inside: netip.MustParseAddr("fd00:1:2::3"), outside: netip.MustParseAddr("2001:db8:9::5"),
		narrowed: prefixes("2001:db8:9::/48"), elsewhere: prefixes("fd10::/16"),
		otherFamily: prefixes("10.0.0.0/8"),
	},
}

// frontendStats returns the counters of the frontend at vip:port/proto.
func (h *harness) frontendStats(vip netip.Addr, port uint16, proto shard.Protocol) ServiceStats {
	h.t.Helper()
	for _, s := range h.d.Stats().Services {
		if s.VIP == vip && s.Port == port && s.Protocol == proto {
			return s
		}
	}
	h.t.Fatalf("no frontend %s/%s", netip.AddrPortFrom(vip, port), proto)
	return ServiceStats{}
}

// rangeFixture is a packet of the frontend at in's destination (or, for a reply, at
// frontend): translated to want, or, when want is nil, dropped untouched and counted as
// a source-range drop of that frontend.
type rangeFixture struct {
	name     string
	in       pkt
	want     *pkt
	frontend netip.AddrPort
}

func runRangeFixture(t *testing.T, h *harness, fx rangeFixture) {
	t.Helper()
	vip, port := fx.in.dst.Addr(), fx.in.dst.Port()
	if fx.frontend.IsValid() {
		vip, port = fx.frontend.Addr(), fx.frontend.Port()
	}
	before := h.frontendStats(vip, port, fx.in.proto)
	f := fixture{name: fx.name, in: fx.in, want: fx.want}
	if fx.want == nil {
		f.wantAction = actShot
	}
	runFixture(t, h, f)
	after := h.frontendStats(vip, port, fx.in.proto)
	wantDrops := before.SourceRangeDrops
	if fx.want == nil {
		wantDrops++
	}
	if after.SourceRangeDrops != wantDrops {
		t.Errorf("%s: SourceRangeDrops of %s went from %d to %d, want %d", fx.name, netip.AddrPortFrom(vip, port), before.SourceRangeDrops, after.SourceRangeDrops, wantDrops)
	}
}

// TestSourceRanges runs clients inside and outside a frontend's source ranges through
// the program, in both families, while the ranges change: new connections follow a
// change at once, established ones on their next packet.
func TestSourceRanges(t *testing.T) {
	h := newHarness(t, Config{NodeIPv4: families[0].node, NodeIPv6: families[1].node})
	for _, rf := range rangeFamilies {
		t.Run(rf.f.name, func(t *testing.T) {
			h.t = t
			f := rf.f
			ep := netip.AddrPortFrom(f.ep, epPort)
			fe := func(name string, port uint16, ranges []netip.Prefix) shard.Frontend {
				return shard.Frontend{Service: name, VIP: f.vip, Port: port, Protocol: shard.TCP,
					Endpoints: []shard.Endpoint{{Addr: ep.Addr(), Port: ep.Port()}}, SourceRanges: ranges}
			}
			// Frontend 81's prefix does not hold inside; 82 has no ranges.
			set := func(ranges []netip.Prefix) {
				t.Helper()
				h.set(fe("ns/restricted", vipPort, ranges), fe("ns/elsewhere", 81, rf.elsewhere), fe("ns/open", 82, nil))
			}
			set(rf.ranges)
			clearConntrack(t, h.d)

			to := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(f.vip, port) }
			from := func(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }
			syn := func(src netip.AddrPort, port uint16) pkt { return pkt{src: src, dst: to(port), proto: shard.TCP} }
			ack := func(src netip.AddrPort, port uint16) pkt {
				return pkt{src: src, dst: to(port), proto: shard.TCP, tcpFlags: 0x10}
			}
			toEP := func(p pkt) *pkt { p.dst = ep; return &p }
			epMAC := [6]byte{0x02, 0, 0, 0, 0, 0x0b}
			reply := func(client netip.AddrPort) pkt {
				return pkt{src: ep, dst: client, proto: shard.TCP, srcMAC: epMAC, tcpFlags: 0x12}
			}
			replyOut := func(client netip.AddrPort, port uint16) *pkt {
				return &pkt{src: to(port), dst: client, proto: shard.TCP, srcMAC: epMAC, tcpFlags: 0x12}
			}
			in1, in2, in3 := from(rf.inside, cliPort), from(rf.inside, cliPort+1), from(rf.inside, cliPort+2)
			out1, out2 := from(rf.outside, cliPort), from(rf.outside, cliPort+1)

			for _, fx := range []rangeFixture{
				{name: "a client in an unlisted longer prefix of a listed one gets through", in: syn(in1, vipPort), want: toEP(syn(in1, vipPort))},
				{name: "its flow's replies come back", in: reply(in1), want: replyOut(in1, vipPort), frontend: to(vipPort)},
				{name: "a client outside every range is dropped and counted", in: syn(out1, vipPort)},
				{name: "another frontend's ranges let no client through this one", in: syn(in1, 81)},
				{name: "a frontend without ranges lets every client through", in: syn(out1, 82), want: toEP(syn(out1, 82))},
			} {
				runRangeFixture(t, h, fx)
			}

			set(rf.narrowed)
			for _, fx := range []rangeFixture{
				{name: "after the ranges changed, a new connection of a client no longer listed is dropped", in: syn(in2, vipPort)},
				{name: "after the ranges changed, a new connection of a client now listed gets through", in: syn(out2, vipPort), want: toEP(syn(out2, vipPort))},
				{name: "the established flow of a client no longer listed is cut on its next packet", in: ack(in1, vipPort)},
				{name: "and its endpoint's replies are dropped too", in: reply(in1), frontend: to(vipPort)},
			} {
				runRangeFixture(t, h, fx)
			}

			set(rf.ranges)
			for _, fx := range []rangeFixture{
				{name: "the cut flow resumes with its translation once its client is listed again", in: ack(in1, vipPort), want: toEP(ack(in1, vipPort))},
				{name: "and so do its replies", in: reply(in1), want: replyOut(in1, vipPort), frontend: to(vipPort)},
				{name: "the flow of the client listed only in the meantime is cut", in: ack(out2, vipPort)},
			} {
				runRangeFixture(t, h, fx)
			}

			set(nil)
			for _, fx := range []rangeFixture{
				{name: "removing the ranges opens the frontend to new connections", in: syn(out1, vipPort), want: toEP(syn(out1, vipPort))},
				{name: "and to established flows that were cut", in: ack(out2, vipPort), want: toEP(ack(out2, vipPort))},
			} {
				runRangeFixture(t, h, fx)
			}

			set(rf.ranges)
			runRangeFixture(t, h, rangeFixture{name: "ranges given to an open frontend cut its established flows outside them", in: ack(out1, vipPort)})

			set(rf.otherFamily)
			for _, fx := range []rangeFixture{
				{name: "ranges of the other family only let no client of the VIP's family through", in: syn(in3, vipPort)},
				{name: "nor its established flows", in: ack(in1, vipPort)},
			} {
				runRangeFixture(t, h, fx)
			}

			if st := h.d.Stats(); st.Drops != nil {
				for reason, n := range st.Drops {
					if n != 0 {
						t.Errorf("%d packets counted as dropped for %s: source-range drops belong to the frontend", n, reason)
					}
				}
			}
		})
	}

	t.Run("a segment from outside the ranges is dropped, not handed off to the previous master", func(t *testing.T) {
		// A harness of its own, where the previous master is on a connected network,
		// so that a segment the ranges let through is handed off.
		node, peer := netip.MustParseAddr("10.2.0.1"), netip.MustParseAddr("10.2.0.9")
		h := newHarness(t, Config{NodeIPv4: node})
		h.link("10.2.0.1/16", nil, map[netip.Addr][6]byte{peer: {0x02, 0, 0, 0, 0, 0x99}})
		f, rf := families[0], rangeFamilies[0]
		h.set(shard.Frontend{Service: "ns/handoff", VIP: f.vip, Port: vipPort, Protocol: shard.TCP, Mode: shard.ModeOneArm,
			Endpoints: []shard.Endpoint{{Addr: f.ep, Port: epPort}}, Handoff: peer, SourceRanges: rf.ranges})
		segment := func(client netip.Addr) []byte {
			return pkt{src: netip.AddrPortFrom(client, cliPort), dst: netip.AddrPortFrom(f.vip, vipPort), proto: shard.TCP, tcpFlags: 0x10}.bytes()
		}
		if act, _ := h.lb(segment(rf.inside)); act != actRedirect {
			t.Fatalf("a segment of a client in the ranges: action %d, want it handed off (%d)", act, actRedirect)
		}
		runRangeFixture(t, h, rangeFixture{name: "a segment of a client outside the ranges",
			in: pkt{src: netip.AddrPortFrom(rf.outside, cliPort), dst: netip.AddrPortFrom(f.vip, vipPort), proto: shard.TCP, tcpFlags: 0x10}})
		if n := h.frontendStats(f.vip, vipPort, shard.TCP).HandoffPackets; n != 1 {
			t.Errorf("%d segments handed off, want the allowed client's one", n)
		}
	})
}

// trieState lists the source ranges the tries hold, by service id.
func trieState(t *testing.T, d *Datapath) map[uint32][]netip.Prefix {
	t.Helper()
	out := map[uint32][]netip.Prefix{}
	var k4 lbRange4Key
	var k6 lbRange6Key
	var v uint32
	it := d.objs.SourceRanges4.Iterate()
	for it.Next(&k4, &v) {
		p, ok := rangeOfKey(k4.Prefixlen, [4]uint32{k4.Addr}, afInet)
		if !ok {
			t.Fatalf("trie key %+v is not a prefix", k4)
		}
		out[k4.ServiceId] = append(out[k4.ServiceId], p)
	}
	it6 := d.objs.SourceRanges6.Iterate()
	for it6.Next(&k6, &v) {
		p, ok := rangeOfKey(k6.Prefixlen, k6.Addr, afInet6)
		if !ok {
			t.Fatalf("trie key %+v is not a prefix", k6)
		}
		out[k6.ServiceId] = append(out[k6.ServiceId], p)
	}
	if err := errors.Join(it.Err(), it6.Err()); err != nil {
		t.Fatal(err)
	}
	for id := range out {
		slices.SortFunc(out[id], comparePrefixes)
	}
	return out
}

// TestSourceRangesSetServices checks what SetServices writes for source ranges, what
// it refuses and that a refusal disturbs no other frontend.
func TestSourceRangesSetServices(t *testing.T) {
	h := newHarness(t, Config{MaxSourceRanges: 4, SourceRangeEntries: 6})
	vip := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}) }
	fe := func(i int, ranges ...string) shard.Frontend {
		return shard.Frontend{Service: fmt.Sprintf("ns/svc%d", i), VIP: vip(i), Port: 80, Protocol: shard.TCP,
			Endpoints:    []shard.Endpoint{{Addr: netip.MustParseAddr("10.0.2.11"), Port: 8080}, {Addr: netip.MustParseAddr("10.0.2.12"), Port: 8080}},
			SourceRanges: prefixes(ranges...)}
	}
	// check compares the tries and the service entries with the frontends that must be
	// applied, given by index with the prefixes the tries must hold.
	check := func(t *testing.T, want map[int][]string) {
		t.Helper()
		h.d.mu.Lock()
		defer h.d.mu.Unlock()
		got := trieState(t, h.d)
		total := 0
		for i, ps := range want {
			k := frontendKey{vip(i), 80, shard.TCP}
			a := h.d.applied[k]
			if a == nil {
				t.Errorf("frontend %s not applied", k)
				continue
			}
			if g := got[a.id]; !slices.Equal(g, prefixes(ps...)) {
				t.Errorf("frontend %s: tries hold %v, want %v", k, g, ps)
			}
			delete(got, a.id)
			total += len(ps)
			key := serviceKey(k.vip, k.port, k.proto)
			var svc lbService
			if err := h.d.objs.Services.Lookup(&key, &svc); err != nil {
				t.Errorf("frontend %s: %v", k, err)
				continue
			}
			if svc.RangeGen != a.rangeGen || (svc.Flags&svcSourceRanges != 0) != a.restricted {
				t.Errorf("frontend %s: service entry flags %d generation %d, Go has restricted %v generation %d", k, svc.Flags, svc.RangeGen, a.restricted, a.rangeGen)
			}
			for ap, id := range a.endpoints {
				var e lbEndpoint
				if err := h.d.objs.Endpoints.Lookup(id, &e); err != nil || e.RangeGen != svc.RangeGen {
					t.Errorf("frontend %s: endpoint %s has range generation %d (%v), the service %d", k, ap, e.RangeGen, err, svc.RangeGen)
				}
			}
		}
		if len(h.d.applied) != len(want) {
			t.Errorf("%d frontends applied, want %d", len(h.d.applied), len(want))
		}
		if len(got) != 0 {
			t.Errorf("trie entries of no applied frontend: %v", got)
		}
		if h.d.rangeCount[0] != total || h.d.rangeCount[1] != 0 {
			t.Errorf("Go counts %v trie entries, the tries hold %d IPv4 and none IPv6", h.d.rangeCount, total)
		}
	}
	wantErr := func(t *testing.T, err error, parts ...string) {
		t.Helper()
		if err == nil {
			t.Fatalf("SetServices: no error, want one with %q", parts)
		}
		for _, p := range parts {
			if !strings.Contains(err.Error(), p) {
				t.Errorf("SetServices: %v\nwant it to say %q", err, p)
			}
		}
	}
	gen := func(i int) uint32 {
		h.d.mu.Lock()
		defer h.d.mu.Unlock()
		return h.d.applied[frontendKey{vip(i), 80, shard.TCP}].rangeGen
	}

	t.Run("ranges are normalized: host bits, duplicates, IPv4-mapped prefixes and the other family's do not count", func(t *testing.T) {
		h.t = t
		h.set(fe(1, "10.1.2.3/8", "10.0.0.0/8", "::ffff:172.16.0.0/108", "2001:db8::/32", "2001:db8:1::/48", "fd00::/8", "fd01::/16", "192.168.1.0/24"))
		check(t, map[int][]string{1: {"10.0.0.0/8", "172.16.0.0/12", "192.168.1.0/24"}})
	})

	t.Run("the same ranges in another form write nothing and keep the generation", func(t *testing.T) {
		h.t = t
		g := gen(1)
		h.set(fe(1, "192.168.1.7/24", "172.16.0.0/12", "10.0.0.0/8"))
		if gen(1) != g {
			t.Errorf("range generation went from %d to %d for the same ranges", g, gen(1))
		}
		check(t, map[int][]string{1: {"10.0.0.0/8", "172.16.0.0/12", "192.168.1.0/24"}})
	})

	t.Run("changed ranges are written declaratively and bump the generation", func(t *testing.T) {
		h.t = t
		g := gen(1)
		h.set(fe(1, "10.0.0.0/8", "198.51.100.0/24"), fe(2, "203.0.113.0/24"))
		if gen(1) != g+1 {
			t.Errorf("range generation went from %d to %d for changed ranges, want +1", g, gen(1))
		}
		check(t, map[int][]string{1: {"10.0.0.0/8", "198.51.100.0/24"}, 2: {"203.0.113.0/24"}})
		h.set(fe(1, "10.0.0.0/8", "198.51.100.0/24"), fe(2))
		check(t, map[int][]string{1: {"10.0.0.0/8", "198.51.100.0/24"}, 2: nil})
	})

	t.Run("an invalid prefix refuses its frontend, naming it, and removes it when it was applied; others stay", func(t *testing.T) {
		h.t = t
		for _, bad := range []netip.Prefix{{}, netip.PrefixFrom(netip.MustParseAddr("10.0.0.0"), 33)} {
			b := fe(2, "203.0.113.0/24")
			b.SourceRanges = append(b.SourceRanges, bad)
			wantErr(t, h.d.SetServices([]shard.Frontend{fe(1, "10.0.0.0/8", "198.51.100.0/24"), b}),
				"frontend 192.0.2.2:80/TCP of ns/svc2", "source range 2 of 2 is not a valid prefix")
			check(t, map[int][]string{1: {"10.0.0.0/8", "198.51.100.0/24"}})
			h.set(fe(1, "10.0.0.0/8", "198.51.100.0/24"), fe(2, "203.0.113.0/24"))
		}
	})

	t.Run("more prefixes of the VIP's family than MaxSourceRanges refuse the frontend", func(t *testing.T) {
		h.t = t
		wantErr(t, h.d.SetServices([]shard.Frontend{fe(1, "10.0.0.0/8"), fe(3, "10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16", "10.4.0.0/16", "10.5.0.0/16", "fd00::/8")}),
			"frontend 192.0.2.3:80/TCP of ns/svc3", "5 source ranges of the VIP's family, more than 4 (raise Config.MaxSourceRanges)")
		check(t, map[int][]string{1: {"10.0.0.0/8"}})
	})

	t.Run("ranges that do not fit in SourceRangeEntries refuse the frontend; the one applied before is removed", func(t *testing.T) {
		h.t = t
		four := []string{"10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16", "10.4.0.0/16"}
		wantErr(t, h.d.SetServices([]shard.Frontend{fe(1, four...), fe(2, "198.51.100.0/24", "203.0.113.0/24", "192.168.0.0/16")}),
			"frontend 192.0.2.2:80/TCP of ns/svc2", "source ranges: 3 more prefixes do not fit, 4 of the 6 of the VIP's family are in use (raise Config.SourceRangeEntries)")
		check(t, map[int][]string{1: four})
		h.set(fe(1, four...), fe(2, "198.51.100.0/24", "203.0.113.0/24"))
		check(t, map[int][]string{1: four, 2: {"198.51.100.0/24", "203.0.113.0/24"}})
		wantErr(t, h.d.SetServices([]shard.Frontend{fe(1, four...), fe(2, "198.51.100.0/24", "203.0.113.0/24", "192.168.0.0/16")}),
			"frontend 192.0.2.2:80/TCP of ns/svc2", "(raise Config.SourceRangeEntries)")
		check(t, map[int][]string{1: four})
		// Frontend 1 shrinks first (frontends are applied in order): 2 fits.
		h.set(fe(1, "10.1.0.0/16"), fe(2, "198.51.100.0/24", "203.0.113.0/24", "192.168.0.0/16"))
		check(t, map[int][]string{1: {"10.1.0.0/16"}, 2: {"192.168.0.0/16", "198.51.100.0/24", "203.0.113.0/24"}})
		// A frontend removed in the same call frees its room for the others.
		h.set(fe(1, "10.1.0.0/16"), fe(4, four...))
		check(t, map[int][]string{1: {"10.1.0.0/16"}, 4: four})
	})

	t.Run("a frontend whose endpoints change keeps or changes its ranges with them", func(t *testing.T) {
		h.t = t
		a := fe(1, "10.1.0.0/16")
		a.Endpoints = a.Endpoints[:1]
		h.set(a, fe(2, "192.168.0.0/16"))
		check(t, map[int][]string{1: {"10.1.0.0/16"}, 2: {"192.168.0.0/16"}})
		a.Endpoints = append(a.Endpoints, shard.Endpoint{Addr: netip.MustParseAddr("10.0.2.13"), Port: 8080})
		a.SourceRanges = prefixes("10.2.0.0/16")
		h.set(a, fe(2, "192.168.0.0/16"))
		check(t, map[int][]string{1: {"10.2.0.0/16"}, 2: {"192.168.0.0/16"}})
	})

	t.Run("removed frontends take their ranges with them", func(t *testing.T) {
		h.t = t
		h.set()
		check(t, map[int][]string{})
	})
}

// TestSourceRangesTraffic runs HTTP through a restricted VIP from two addresses of the
// client's namespace: the one in the ranges gets through, the other's connections time
// out, and a change of the ranges cuts the established connection of a client no
// longer listed.
func TestSourceRangesTraffic(t *testing.T) {
	l := newLab(t)
	inside, outside := netip.MustParseAddr("10.10.1.2"), netip.MustParseAddr("10.10.1.3")
	l.clientNS.Run(t, "ip", "addr", "add", outside.String()+"/24", "dev", "c0")
	d := attached(t, Config{Interfaces: l.lbIfs, NetNS: l.lbPath, NodeIPv4: netip.MustParseAddr("10.10.1.1")})
	set := func(t *testing.T, ranges ...string) {
		t.Helper()
		fe := shard.Frontend{Service: "ns/web", VIP: labVIP, Port: 80, Protocol: shard.TCP, Endpoints: l.backends, SourceRanges: prefixes(ranges...)}
		if err := d.SetServices([]shard.Frontend{fe}); err != nil {
			t.Fatal(err)
		}
	}
	// client dials from src; its requests give up after timeout.
	client := func(t *testing.T, src netip.Addr, keepAlive bool, timeout time.Duration) *http.Client {
		tr := &http.Transport{
			DisableKeepAlives: !keepAlive,
			MaxConnsPerHost:   1,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				var c net.Conn
				var err error
				inNetNS(t, l.client, func() {
					dialer := net.Dialer{Timeout: timeout, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))}
					c, err = dialer.DialContext(ctx, network, addr)
				})
				return c, err
			},
		}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Transport: tr, Timeout: timeout}
	}
	getsThrough := func(t *testing.T, c *http.Client, src netip.Addr, n int) {
		t.Helper()
		for i := range n {
			body, err := get(c)
			if err != nil {
				t.Fatalf("request %d from %s: %v", i, src, err)
			}
			if _, from, _ := strings.Cut(body, " "); from != src.String() {
				t.Fatalf("request %d from %s reached a backend from %s", i, src, from)
			}
		}
	}
	timesOut := func(t *testing.T, c *http.Client, src netip.Addr, what string) {
		t.Helper()
		before := d.Stats().Services[0].SourceRangeDrops
		_, err := get(c)
		var nerr net.Error
		if !errors.As(err, &nerr) || !nerr.Timeout() {
			t.Fatalf("%s from %s: err %v, want a timeout", what, src, err)
		}
		if after := d.Stats().Services[0].SourceRangeDrops; after == before {
			t.Errorf("%s from %s timed out with no source-range drop counted", what, src)
		}
	}

	set(t, "10.10.1.2/32", "2001:db8::/32")
	t.Run("a client in the ranges gets through", func(t *testing.T) {
		getsThrough(t, client(t, inside, false, 5*time.Second), inside, 10)
	})
	t.Run("a client outside them times out, its packets dropped and counted", func(t *testing.T) {
		timesOut(t, client(t, outside, false, 1500*time.Millisecond), outside, "a new connection")
	})
	t.Run("a change of the ranges cuts the established connection of a client no longer listed", func(t *testing.T) {
		kept := client(t, inside, true, 2*time.Second)
		getsThrough(t, kept, inside, 3)
		set(t, "10.10.1.3/32")
		timesOut(t, kept, inside, "a request on the established connection")
		getsThrough(t, client(t, outside, false, 5*time.Second), outside, 3)
	})
	t.Run("without ranges every client gets through", func(t *testing.T) {
		set(t)
		getsThrough(t, client(t, inside, false, 5*time.Second), inside, 3)
		getsThrough(t, client(t, outside, false, 5*time.Second), outside, 3)
	})
}
