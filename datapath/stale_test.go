package datapath

import (
	"net/netip"
	"testing"
	"time"

	"github.com/shardlb/shardlb/shard"
)

// A SYN on a closing flow's tuple (not expired yet) keeps the flow's translation. An
// endpoint that still holds a reused SNAT tuple in TIME_WAIT answers a new SYN there
// with the old connection's ACK; the client's RST ends that TIME_WAIT only if it is sent
// on the same tuple, and the SYN it retransmits 10 ms later must follow it there: a new
// translation would pick another port, maybe another TIME_WAIT, and the connection
// would wait for the next retransmission, a second later. Once the flow expired, its
// tuple starts a new flow (and may be given the same port, the old one being free).
func TestSYNOnAClosingTupleKeepsItsPort(t *testing.T) {
	f := families[0]
	h := newHarness(t, Config{NodeIPv4: f.node, SNATPortMin: 61000, SNATPortMax: 61003})
	vip := netip.AddrPortFrom(f.vip, vipPort)
	ep := netip.AddrPortFrom(f.ep, epPort)
	h.set(shard.Frontend{
		Service: "ns/reuse", VIP: f.vip, Port: vipPort, Protocol: shard.TCP, Mode: shard.ModeOneArm,
		Endpoints: []shard.Endpoint{{Addr: f.ep, Port: epPort}},
	})
	client := netip.AddrPortFrom(f.client, cliPort)
	newFlows := func() uint64 {
		for _, s := range h.d.Stats().Services {
			if s.Service == "ns/reuse" {
				return s.NewFlows
			}
		}
		t.Fatal("no stats for ns/reuse")
		return 0
	}
	send := func(flags uint8) netip.AddrPort {
		t.Helper()
		ret, out := h.lb(pkt{src: client, dst: vip, proto: shard.TCP, tcpFlags: flags}.bytes())
		if ret != actOK || endpointOf(t, out) != ep {
			t.Fatalf("flags %#x: action %d to %s, want %s", flags, ret, endpointOf(t, out), ep)
		}
		return sourceOf(t, out)
	}
	first := send(0x02)
	send(0x04) // the client's RST, after the endpoint's TIME_WAIT answered
	before := newFlows()
	if again := send(0x02); again != first || newFlows() != before {
		t.Fatalf("the SYN retransmitted after the RST left from %s as a new flow (%d), want the flow's %s",
			again, newFlows()-before, first)
	}
}

// A segment whose flow expired here (closed and idle past the closing timeout) is
// not translated by the expired entry: on a node that took a VIP over from a
// previous master, it goes to that master like any segment unknown here. Entries
// are never deleted on a timer, and an old entry (adopted across a restart, or left
// from an earlier mastership of this node) would otherwise send a new connection's
// segment to the endpoint on another connection's port.
func TestExpiredEntryIsNoFlow(t *testing.T) {
	node, peer := netip.MustParseAddr("10.2.0.1"), netip.MustParseAddr("10.2.0.9")
	epAddr, vipAddr, client := netip.MustParseAddr("10.2.0.11"), netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("10.1.0.2")
	// One jiffy: a closed flow expires within a few milliseconds.
	h := newHarness(t, Config{NodeIPv4: node, closingTimeout: 1})
	peerMAC, epMAC := [6]byte{0x02, 0, 0, 0, 0, 0x99}, [6]byte{0x02, 0, 0, 0, 0, 0x11}
	h.link("10.2.0.1/16", []string{"10.1.0.0/16"}, map[netip.Addr][6]byte{peer: peerMAC, epAddr: epMAC})
	h.set(shard.Frontend{
		Service: "ns/tcp", VIP: vipAddr, Port: vipPort, Protocol: shard.TCP, Mode: shard.ModeOneArm,
		Endpoints: []shard.Endpoint{{Addr: epAddr, Port: epPort}}, Handoff: peer,
	})
	vip, from := netip.AddrPortFrom(vipAddr, vipPort), netip.AddrPortFrom(client, 42000)
	handoffs := func() uint64 {
		for _, s := range h.d.Stats().Services {
			if s.Service == "ns/tcp" {
				return s.HandoffPackets
			}
		}
		t.Fatal("no stats for ns/tcp")
		return 0
	}
	// toEndpoint sends a client segment and asserts it was translated here.
	toEndpoint := func(flags uint8) {
		t.Helper()
		ret, out := h.lb(pkt{src: from, dst: vip, proto: shard.TCP, tcpFlags: flags}.bytes())
		if ret != actRedirect || endpointOf(t, out) != netip.AddrPortFrom(epAddr, epPort) {
			t.Fatalf("flags %#x: action %d to %v, want a redirect to the endpoint", flags, ret, endpointOf(t, out))
		}
	}
	toEndpoint(0x02) // a SYN starts the flow here
	toEndpoint(0x10)
	toEndpoint(0x11) // closing, still within its timeout
	time.Sleep(50 * time.Millisecond)
	before := handoffs()
	ret, out := h.lb(pkt{src: from, dst: vip, proto: shard.TCP, tcpFlags: 0x10}.bytes())
	if ret != actRedirect || handoffs() != before+1 {
		t.Fatalf("a segment of the expired flow: action %d to %v, handoffs %d -> %d; want it handed off to the previous master",
			ret, endpointOf(t, out), before, handoffs())
	}
}
