package datapath

import (
	"bytes"
	"fmt"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/shardlb/shardlb/shard"
)

// fixture is one packet through the program: the maps are whatever the fixtures before
// it in the same list left (services set up front, conntrack filled by earlier packets).
type fixture struct {
	name       string
	in         pkt
	wantAction uint32 // actOK unless set
	want       *pkt   // expected output; nil means the input, untouched
	wantDrop   string // drop counter that must go up by one, if any
}

// ipFamily holds the addresses of one IP family's fixtures.
type ipFamily struct {
	name                      string
	client, vip, other, ep    netip.Addr
	node                      netip.Addr
	client2, stranger, epPeer netip.Addr
	// nodeNet is the node's address on the endpoints' network, clientNet the clients'
	// network, for tests whose route lookups must succeed (harness.link).
	nodeNet, clientNet string
}

var families = []ipFamily{
	{
		name:   "IPv4",
		client: netip.MustParseAddr("10.0.1.2"), client2: netip.MustParseAddr("10.0.1.3"),
		vip: netip.MustParseAddr("192.0.2.10"), other: netip.MustParseAddr("192.0.2.99"),
		ep: netip.MustParseAddr("10.0.2.11"), node: netip.MustParseAddr("10.0.2.1"),
		stranger: netip.MustParseAddr("10.0.3.7"), epPeer: netip.MustParseAddr("10.0.3.8"),
		nodeNet: "10.0.2.1/24", clientNet: "10.0.1.0/24",
	},
	{
		name:   "IPv6",
		client: netip.MustParseAddr("fd00:1::2"), client2: netip.MustParseAddr("fd00:1::3"),
		vip: netip.MustParseAddr("2001:db8::10"), other: netip.MustParseAddr("2001:db8::99"),
		ep: netip.MustParseAddr("fd00:2::11"), node: netip.MustParseAddr("fd00:2::1"),
		stranger: netip.MustParseAddr("fd00:3::7"), epPeer: netip.MustParseAddr("fd00:3::8"),
		nodeNet: "fd00:2::1/64", clientNet: "fd00:1::/64",
	},
}

var (
	modes  = []shard.Mode{shard.ModeDefault, shard.ModeOneArm, shard.ModeFullNAT}
	protos = []shard.Protocol{shard.TCP, shard.UDP}
)

const (
	vipPort  = 80
	epPort   = 8080
	cliPort  = 40000
	cliPort2 = 40001
)

// snatSource is where a mode makes a flow come from toward its endpoint, given the
// client's address and port: the prediction follows flow_hash in the program.
func snatSource(m shard.Mode, f ipFamily, client netip.AddrPort, proto shard.Protocol) netip.AddrPort {
	var addr netip.Addr
	switch m {
	case shard.ModeDefault:
		return client
	case shard.ModeOneArm:
		addr = f.node
	case shard.ModeFullNAT:
		addr = f.vip
	}
	h := flowHash(client, netip.AddrPortFrom(f.vip, vipPort), proto)
	count := uint32(DefaultSNATPortMax - DefaultSNATPortMin + 1)
	return netip.AddrPortFrom(addr, uint16(DefaultSNATPortMin+h%count))
}

func fixturesFor(m shard.Mode, f ipFamily, proto shard.Protocol) []fixture {
	client := netip.AddrPortFrom(f.client, cliPort)
	vip := netip.AddrPortFrom(f.vip, vipPort)
	ep := netip.AddrPortFrom(f.ep, epPort)
	src := snatSource(m, f, client, proto)
	epMAC := [6]byte{0x02, 0, 0, 0, 0, 0x0b}

	fwd := pkt{src: client, dst: vip, proto: proto}
	fwdOut := pkt{src: src, dst: ep, proto: proto}
	reply := pkt{src: ep, dst: src, proto: proto, srcMAC: epMAC, tcpFlags: 0x12}
	replyOut := pkt{src: vip, dst: client, proto: proto, srcMAC: epMAC, tcpFlags: 0x12}
	data := fwd
	data.tcpFlags, data.payload = 0x18, []byte("GET / HTTP/1.1\r\n\r\n")
	dataOut := fwdOut
	dataOut.tcpFlags, dataOut.payload = data.tcpFlags, data.payload

	fx := []fixture{
		{name: "a new flow is translated to the endpoint", in: fwd, want: &fwdOut},
		{name: "a reply is translated back to come from the VIP", in: reply, want: &replyOut},
		{name: "an established flow keeps its translation", in: data, want: &dataOut},
		{name: "a packet to an unknown VIP passes untouched", in: pkt{src: client, dst: netip.AddrPortFrom(f.other, vipPort), proto: proto}, wantAction: actPass},
		{name: "a packet to another port of the VIP passes untouched", in: pkt{src: client, dst: netip.AddrPortFrom(f.vip, 81), proto: proto}, wantAction: actPass},
		{name: "a packet between two other hosts passes untouched", in: pkt{src: netip.AddrPortFrom(f.stranger, 5000), dst: netip.AddrPortFrom(f.epPeer, 80), proto: proto}, wantAction: actPass},
		{name: "a truncated packet to the VIP is dropped and counted", in: withTruncate(fwd, 14+ipHeaderLen(f)+6), wantAction: actShot, wantDrop: "truncated"},
		{name: "a truncated packet to another host passes untouched", in: withTruncate(pkt{src: client, dst: netip.AddrPortFrom(f.other, vipPort), proto: proto}, 14+ipHeaderLen(f)+6), wantAction: actPass},
		{name: "a fragment to the VIP is dropped and counted", in: withFragment(fwd), wantAction: actShot, wantDrop: "fragment"},
		{name: "a fragment to another host passes untouched", in: withFragment(pkt{src: client, dst: netip.AddrPortFrom(f.other, vipPort), proto: proto}), wantAction: actPass},
	}
	if f.client.Is4() {
		c2 := netip.AddrPortFrom(f.client2, cliPort2)
		in := pkt{src: c2, dst: vip, proto: proto, ipOptions: []byte{1, 1, 1, 0}} // NOP NOP NOP EOL
		out := pkt{src: snatSource(m, f, c2, proto), dst: ep, proto: proto, ipOptions: in.ipOptions}
		fx = append(fx, fixture{name: "a packet with IP options is translated and keeps them", in: in, want: &out})
		if proto == shard.UDP {
			c3 := netip.AddrPortFrom(f.client2, cliPort2+1)
			in := pkt{src: c3, dst: vip, proto: proto, udpNoCsum: true}
			out := pkt{src: snatSource(m, f, c3, proto), dst: ep, proto: proto, udpNoCsum: true}
			fx = append(fx, fixture{name: "a UDP packet without checksum keeps none", in: in, want: &out})
		}
	} else {
		in := fwd
		in.hopByHop = true
		fx = append(fx, fixture{name: "an extension header to the VIP is dropped and counted", in: in, wantAction: actShot, wantDrop: "ipv6_extension_header"})
	}
	return fx
}

func ipHeaderLen(f ipFamily) int {
	if f.client.Is4() {
		return 20
	}
	return 40
}

func withTruncate(p pkt, n int) pkt { p.truncate = n; return p }
func withFragment(p pkt) pkt        { p.fragment = true; return p }

// TestFixtures runs every mode x protocol x family through its fixtures: each output
// must be the expected packet byte for byte, with every checksum right.
func TestFixtures(t *testing.T) { forEachVariant(t, testFixtures) }

func testFixtures(t *testing.T, v variant) {
	h := newHarness(t, Config{NodeIPv4: families[0].node, NodeIPv6: families[1].node, variant: v})
	for _, m := range modes {
		for _, f := range families {
			for _, proto := range protos {
				t.Run(fmt.Sprintf("%s %s over %s", m, proto, f.name), func(t *testing.T) {
					h.t = t
					// A fresh service per case: its flows cannot meet another case's.
					h.set(shard.Frontend{
						Service: "ns/fixture", VIP: f.vip, Port: vipPort, Protocol: proto, Mode: m,
						Endpoints: []shard.Endpoint{{Addr: f.ep, Port: epPort}},
					})
					clearConntrack(t, h.d)
					for _, fx := range fixturesFor(m, f, proto) {
						runFixture(t, h, fx)
					}
				})
			}
		}
	}
	t.Run("a service without endpoints drops new flows and counts them", func(t *testing.T) {
		h.t = t
		f := families[0]
		h.set(shard.Frontend{Service: "ns/empty", VIP: f.vip, Port: vipPort, Protocol: shard.TCP})
		clearConntrack(t, h.d)
		runFixture(t, h, fixture{
			name: "new flow", in: pkt{src: netip.AddrPortFrom(f.client, cliPort), dst: netip.AddrPortFrom(f.vip, vipPort), proto: shard.TCP},
			wantAction: actShot, wantDrop: "no_endpoint",
		})
	})
}

func runFixture(t *testing.T, h *harness, fx fixture) {
	t.Helper()
	in := fx.in.bytes()
	want := in
	if fx.want != nil {
		want = fx.want.bytes()
	}
	var before uint64
	if fx.wantDrop != "" {
		before = h.d.Stats().Drops[fx.wantDrop]
	}
	act, out := h.lb(in)
	if act != fx.wantAction {
		t.Errorf("%s: action %d, want %d", fx.name, act, fx.wantAction)
	}
	if err := verifyChecksums(out); err != nil {
		t.Errorf("%s: %v\n%s", fx.name, err, dumpPair(out, want))
	}
	if !bytes.Equal(out, want) {
		t.Errorf("%s: output differs\n%s", fx.name, dumpPair(out, want))
	}
	if fx.wantDrop != "" {
		if after := h.d.Stats().Drops[fx.wantDrop]; after != before+1 {
			t.Errorf("%s: drop counter %s went from %d to %d, want +1", fx.name, fx.wantDrop, before, after)
		}
	}
}

func clearConntrack(t testing.TB, d *Datapath) {
	t.Helper()
	clearMap[lbFlow4](t, d.objs.Conntrack4Tcp)
	clearMap[lbFlow4](t, d.objs.Conntrack4Udp)
	clearMap[lbFlow](t, d.objs.Conntrack6)
}

// clearMap deletes every entry of a conntrack map whose keys are K.
func clearMap[K any](t testing.TB, m *ebpf.Map) {
	t.Helper()
	var k K
	var keys []K
	var v lbCtEntry
	it := m.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		t.Fatalf("iterate conntrack: %v", err)
	}
	if len(keys) == 0 {
		return
	}
	if _, err := m.BatchDelete(keys, nil); err != nil {
		t.Fatalf("clear conntrack: %v", err)
	}
}
