package datapath

import (
	"net/netip"
	"testing"
	"time"

	"github.com/shardlb/shardlb/shard"
)

// A client that reuses the tuple of a connection it closed opens a new connection:
// its SYN is balanced as a new flow, with a SNAT port of its own, not translated by
// the closed flow's entry, whose port the endpoint may still hold in TIME_WAIT (it
// would answer with the old connection's ACK and the new one would stall). A SYN
// retransmitted while the flow is open keeps the flow's port.
func TestSYNOnAClosedTupleIsANewFlow(t *testing.T) {
	f := families[0]
	h := newHarness(t, Config{NodeIPv4: f.node, SNATPortMin: 61000, SNATPortMax: 61003})
	vip := netip.AddrPortFrom(f.vip, vipPort)
	ep := netip.AddrPortFrom(f.ep, epPort)
	h.set(shard.Frontend{
		Service: "ns/reuse", VIP: f.vip, Port: vipPort, Protocol: shard.TCP, Mode: shard.ModeOneArm,
		Endpoints: []shard.Endpoint{{Addr: f.ep, Port: epPort}},
	})
	client := netip.AddrPortFrom(f.client, cliPort)
	send := func(flags uint8) netip.AddrPort {
		t.Helper()
		ret, out := h.lb(pkt{src: client, dst: vip, proto: shard.TCP, tcpFlags: flags}.bytes())
		if ret != actOK || endpointOf(t, out) != ep {
			t.Fatalf("flags %#x: action %d to %s, want %s", flags, ret, endpointOf(t, out), ep)
		}
		return sourceOf(t, out)
	}
	first := send(0x02)
	if again := send(0x02); again != first {
		t.Fatalf("a retransmitted SYN of an open flow left from %s, want the flow's %s", again, first)
	}
	send(0x10)
	send(0x11) // the client closes
	second := send(0x02)
	if second == first {
		t.Fatalf("a new connection on the closed flow's tuple left from the old flow's %s", first)
	}
	// The new flow is tracked both ways on its own port.
	ret, out := h.lb(pkt{src: ep, dst: second, proto: shard.TCP, tcpFlags: 0x12}.bytes())
	if ret != actOK || endpointOf(t, out) != client {
		t.Fatalf("SYN-ACK to %s: action %d to %s, want the client", second, ret, endpointOf(t, out))
	}
	if got := send(0x10); got != second {
		t.Fatalf("the new connection's ACK left from %s, want %s", got, second)
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
