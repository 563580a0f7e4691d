package datapath

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/shardlb/shardlb/shard"
)

// sourceOf returns the source of an IPv4 packet (without options).
func sourceOf(t testing.TB, b []byte) netip.AddrPort {
	t.Helper()
	if binary.BigEndian.Uint16(b[12:]) != 0x0800 {
		t.Fatalf("not an IPv4 packet: % x", b)
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[26:30])), binary.BigEndian.Uint16(b[34:]))
}

// TestSNATPortReuse fills a four-port SNAT range, closes two of its flows (one FIN from
// the client, one from the endpoint) and checks that new flows get exactly those two
// ports once the closing timeout passed, while the two open flows keep theirs.
func TestSNATPortReuse(t *testing.T) {
	f := families[0]
	const portMin, portMax = 61000, 61003
	// One jiffy: closed flows expire within a few milliseconds.
	h := newHarness(t, Config{NodeIPv4: f.node, SNATPortMin: portMin, SNATPortMax: portMax, closingTimeout: 1})
	vip := netip.AddrPortFrom(f.vip, vipPort)
	ep := netip.AddrPortFrom(f.ep, epPort)
	h.set(shard.Frontend{
		Service: "ns/snat", VIP: f.vip, Port: vipPort, Protocol: shard.TCP, Mode: shard.ModeOneArm,
		Endpoints: []shard.Endpoint{{Addr: f.ep, Port: epPort}},
	})
	client := func(i int) netip.AddrPort { return netip.AddrPortFrom(f.client, uint16(cliPort+i)) }
	drops := func() uint64 { return h.d.Stats().Drops["snat_ports_exhausted"] }

	// open sends a SYN of client i and returns the SNAT source it was given.
	open := func(i int) netip.AddrPort {
		t.Helper()
		ret, out := h.lb(pkt{src: client(i), dst: vip, proto: shard.TCP}.bytes())
		if ret != actOK {
			t.Fatalf("client %d: action %d, want %d", i, ret, actOK)
		}
		if got := endpointOf(t, out); got != ep {
			t.Fatalf("client %d: sent to %s, want %s", i, got, ep)
		}
		return sourceOf(t, out)
	}
	exhausted := func(i int) {
		t.Helper()
		before := drops()
		if ret, _ := h.lb(pkt{src: client(i), dst: vip, proto: shard.TCP}.bytes()); ret != actShot {
			t.Fatalf("client %d: action %d, want a drop (every SNAT port taken)", i, ret)
		}
		if after := drops(); after != before+1 {
			t.Fatalf("snat_ports_exhausted went from %d to %d, want +1", before, after)
		}
	}

	used := map[uint16]int{}
	var snat [4]netip.AddrPort
	for i := range snat {
		snat[i] = open(i)
		if snat[i].Addr() != f.node || snat[i].Port() < portMin || snat[i].Port() > portMax {
			t.Fatalf("client %d: SNAT source %s, want %s:%d-%d", i, snat[i], f.node, portMin, portMax)
		}
		if j, ok := used[snat[i].Port()]; ok {
			t.Fatalf("clients %d and %d share SNAT port %d", j, i, snat[i].Port())
		}
		used[snat[i].Port()] = i
	}
	exhausted(4)

	// Client 0 closes; client 1's endpoint closes (the reply direction).
	if ret, _ := h.lb(pkt{src: client(0), dst: vip, proto: shard.TCP, tcpFlags: 0x11}.bytes()); ret != actOK {
		t.Fatalf("FIN of client 0: action %d", ret)
	}
	ret, out := h.lb(pkt{src: ep, dst: snat[1], proto: shard.TCP, tcpFlags: 0x11}.bytes())
	if ret != actOK || endpointOf(t, out) != client(1) {
		t.Fatalf("endpoint's FIN to client 1: action %d, sent to %s", ret, endpointOf(t, out))
	}
	// Closed but not idle long enough yet would be the same as open; after the
	// closing timeout the two ports are free.
	time.Sleep(100 * time.Millisecond)
	// The open flows were just used: their ports must not be given away.
	for _, i := range []int{2, 3} {
		ret, out := h.lb(pkt{src: client(i), dst: vip, proto: shard.TCP, tcpFlags: 0x10}.bytes())
		if ret != actOK || sourceOf(t, out) != snat[i] {
			t.Fatalf("open client %d: action %d, SNAT source %s, want %s", i, ret, sourceOf(t, out), snat[i])
		}
	}

	freed := map[uint16]bool{snat[0].Port(): true, snat[1].Port(): true}
	for _, i := range []int{5, 6} {
		got := open(i)
		if !freed[got.Port()] {
			t.Fatalf("client %d got SNAT port %d, want one of the closed flows' %d, %d", i, got.Port(), snat[0].Port(), snat[1].Port())
		}
		delete(freed, got.Port())
	}
	exhausted(7)

	// The open flows still translate both ways on their own ports.
	for _, i := range []int{2, 3} {
		ret, out := h.lb(pkt{src: ep, dst: snat[i], proto: shard.TCP, tcpFlags: 0x10}.bytes())
		if ret != actOK || endpointOf(t, out) != client(i) {
			t.Fatalf("reply to open client %d: action %d, sent to %s", i, ret, endpointOf(t, out))
		}
	}
}

// TestSNATOpenFlowsKeepPorts checks that without FIN or RST no port is taken over, however
// short the closing timeout: fresh open flows are never expired.
func TestSNATOpenFlowsKeepPorts(t *testing.T) {
	f := families[0]
	h := newHarness(t, Config{NodeIPv4: f.node, SNATPortMin: 61000, SNATPortMax: 61001, closingTimeout: 1})
	vip := netip.AddrPortFrom(f.vip, vipPort)
	for _, proto := range protos {
		h.set(shard.Frontend{
			Service: "ns/snat", VIP: f.vip, Port: vipPort, Protocol: proto, Mode: shard.ModeOneArm,
			Endpoints: []shard.Endpoint{{Addr: f.ep, Port: epPort}},
		})
		for i := range 2 {
			if ret, _ := h.lb(pkt{src: netip.AddrPortFrom(f.client, uint16(cliPort+i)), dst: vip, proto: proto}.bytes()); ret != actOK {
				t.Fatalf("%s client %d: action %d", proto, i, ret)
			}
		}
		time.Sleep(100 * time.Millisecond)
		if ret, _ := h.lb(pkt{src: netip.AddrPortFrom(f.client, cliPort+2), dst: vip, proto: proto}.bytes()); ret != actShot {
			t.Fatalf("%s: a third flow got a port of one of two open flows (action %d)", proto, ret)
		}
	}
}

// TestOtherHostFrames checks that a frame the device classified PACKET_OTHERHOST (not
// for this node's MAC, as a bridge floods unknown unicast) passes untranslated. The
// test-run context cannot set pkt_type (the kernel rejects a non-zero one), but it
// classifies the frame by destination MAC like a real device, so the MAC sets it.
func TestOtherHostFrames(t *testing.T) {
	f := families[0]
	h := newHarness(t, Config{NodeIPv4: f.node})
	vip := netip.AddrPortFrom(f.vip, vipPort)
	ep := netip.AddrPortFrom(f.ep, epPort)
	h.set(shard.Frontend{
		Service: "ns/host", VIP: f.vip, Port: vipPort, Protocol: shard.TCP,
		Endpoints: []shard.Endpoint{{Addr: f.ep, Port: epPort}},
	})
	other := pkt{src: netip.AddrPortFrom(f.client, cliPort), dst: vip, proto: shard.TCP, dstMAC: [6]byte{0x02, 0, 0, 0, 0, 0x99}}.bytes()
	ret, out := h.lb(other)
	if ret != actPass || !bytes.Equal(out, other) {
		t.Fatalf("frame for another host: action %d, changed %v, want passed untouched", ret, !bytes.Equal(out, other))
	}
	if st := h.d.Stats().Services; len(st) != 1 || st[0].NewFlows != 0 {
		t.Fatalf("frame for another host: service counters %+v, want no new flow", st)
	}
	// The same packet to this node's MAC is translated.
	ret, out = h.lb(pkt{src: netip.AddrPortFrom(f.client, cliPort), dst: vip, proto: shard.TCP}.bytes())
	if ret != actOK || endpointOf(t, out) != ep {
		t.Fatalf("frame for this host: action %d, sent to %s, want %s", ret, endpointOf(t, out), ep)
	}
}

// TestProtocolsTrackedApart sends a TCP and a UDP flow with the same addresses and ports
// through a VIP whose TCP and UDP services have different endpoints: each protocol's
// packets, first and later, go to its own service's endpoint, and a reply is translated
// only for the protocol whose flow it answers (IPv4 keeps TCP and UDP in separate maps
// whose keys carry no protocol).
func TestProtocolsTrackedApart(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			h := newHarness(t, Config{})
			epTCP := netip.AddrPortFrom(f.ep, epPort)
			epUDP := netip.AddrPortFrom(f.epPeer, epPort)
			h.set(
				shard.Frontend{Service: "ns/tcp", VIP: f.vip, Port: vipPort, Protocol: shard.TCP, Endpoints: []shard.Endpoint{{Addr: epTCP.Addr(), Port: epTCP.Port()}}},
				shard.Frontend{Service: "ns/udp", VIP: f.vip, Port: vipPort, Protocol: shard.UDP, Endpoints: []shard.Endpoint{{Addr: epUDP.Addr(), Port: epUDP.Port()}}},
			)
			client := netip.AddrPortFrom(f.client, cliPort)
			vip := netip.AddrPortFrom(f.vip, vipPort)
			want := map[shard.Protocol]netip.AddrPort{shard.TCP: epTCP, shard.UDP: epUDP}
			for round := range 3 {
				for _, proto := range protos {
					_, out := h.lb(pkt{src: client, dst: vip, proto: proto, tcpFlags: 0x10}.bytes())
					if got := endpointOf(t, out); got != want[proto] {
						t.Fatalf("packet %d of the %s flow went to %s, want %s", round+1, proto, got, want[proto])
					}
				}
			}
			for _, proto := range protos {
				other := shard.UDP
				if proto == shard.UDP {
					other = shard.TCP
				}
				// The endpoint of one protocol's flow answers in the other protocol: no
				// flow of that protocol went there, so the packet passes untouched.
				in := pkt{src: want[proto], dst: client, proto: other, tcpFlags: 0x10}.bytes()
				ret, out := h.lb(in)
				if ret != actPass || !bytes.Equal(out, in) {
					t.Errorf("a %s packet from the %s endpoint was changed (action %d)\n%s", other, proto, ret, dumpPair(out, in))
				}
				reply := pkt{src: want[proto], dst: client, proto: proto, tcpFlags: 0x10}.bytes()
				if _, out := h.lb(reply); bytes.Equal(out, reply) {
					t.Errorf("the %s reply was not translated", proto)
				} else if err := verifyChecksums(out); err != nil {
					t.Errorf("%s reply: %v", proto, err)
				}
			}
		})
	}
}

// TestSNATTimeWaitHold checks that a port whose endpoint closed first (and so holds the
// tuple in TIME_WAIT) is given to a new flow only when every other port is taken, and
// that doing so is counted: ports whose client closed first, or whose endpoint reset,
// go first, even to a flow whose hash tries the TIME_WAIT port first.
func TestSNATTimeWaitHold(t *testing.T) {
	f := families[0]
	const portMin, portMax = 61000, 61003
	h := newHarness(t, Config{NodeIPv4: f.node, SNATPortMin: portMin, SNATPortMax: portMax,
		closingTimeout: 1, timeWaitTimeout: 1 << 40})
	vip := netip.AddrPortFrom(f.vip, vipPort)
	ep := netip.AddrPortFrom(f.ep, epPort)
	h.set(shard.Frontend{
		Service: "ns/snat", VIP: f.vip, Port: vipPort, Protocol: shard.TCP, Mode: shard.ModeOneArm,
		Endpoints: []shard.Endpoint{{Addr: f.ep, Port: epPort}},
	})
	client := func(i int) netip.AddrPort { return netip.AddrPortFrom(f.client, uint16(cliPort+i)) }
	reuses := func() uint64 { return h.d.Stats().SNATTimeWaitReuses }
	send := func(what string, p pkt) []byte {
		t.Helper()
		ret, out := h.lb(p.bytes())
		if ret != actOK {
			t.Fatalf("%s: action %d, want %d", what, ret, actOK)
		}
		return out
	}
	open := func(i int) netip.AddrPort {
		t.Helper()
		return sourceOf(t, send(fmt.Sprintf("SYN of client %d", i), pkt{src: client(i), dst: vip, proto: shard.TCP}))
	}

	var snat [4]netip.AddrPort
	for i := range snat {
		snat[i] = open(i)
	}
	// 0: the client closes first, then the endpoint. 1: the endpoint closes first (it
	// holds TIME_WAIT). 2: the endpoint resets. 3: open.
	send("FIN of client 0", pkt{src: client(0), dst: vip, proto: shard.TCP, tcpFlags: 0x11})
	send("endpoint's FIN to client 0", pkt{src: ep, dst: snat[0], proto: shard.TCP, tcpFlags: 0x11})
	send("endpoint's FIN to client 1", pkt{src: ep, dst: snat[1], proto: shard.TCP, tcpFlags: 0x11})
	send("FIN of client 1", pkt{src: client(1), dst: vip, proto: shard.TCP, tcpFlags: 0x11})
	send("endpoint's RST to client 2", pkt{src: ep, dst: snat[2], proto: shard.TCP, tcpFlags: 0x14})
	time.Sleep(100 * time.Millisecond) // past the closing timeout (one jiffy)

	// A new client whose hash tries client 1's port first.
	next := 10
	for ; ; next++ {
		if h := flowHash(client(next), vip, shard.TCP); portMin+h%4 == uint32(snat[1].Port()) {
			break
		}
	}
	free := map[netip.AddrPort]bool{snat[0]: true, snat[2]: true}
	for range 2 {
		got := open(next)
		if !free[got] {
			t.Fatalf("client %d got %s, want one of %v (not %s, held in TIME_WAIT, nor the open %s)", next, got, free, snat[1], snat[3])
		}
		delete(free, got)
		next++
	}
	if n := reuses(); n != 0 {
		t.Fatalf("%d TIME_WAIT reuses counted while other ports were free", n)
	}
	if got := open(next); got != snat[1] {
		t.Fatalf("client %d got %s, want %s: the TIME_WAIT port is taken rather than drop the SYN when every other port is taken", next, got, snat[1])
	}
	if n := reuses(); n != 1 {
		t.Fatalf("%d TIME_WAIT reuses counted, want 1", n)
	}
	if ret, _ := h.lb(pkt{src: client(next + 1), dst: vip, proto: shard.TCP}.bytes()); ret != actShot {
		t.Fatalf("a flow beyond the four ports: action %d, want a drop", ret)
	}
}

func TestPortRangesOverlap(t *testing.T) {
	for _, c := range []struct {
		a, b, c, d uint16
		want       bool
	}{
		{1024, 32767, 32768, 60999, false},
		{61000, 65535, 32768, 60999, false},
		{1024, 32768, 32768, 60999, true},
		{40000, 40000, 32768, 60999, true},
		{1, 65535, 32768, 60999, true},
	} {
		if got := portRangesOverlap(c.a, c.b, c.c, c.d); got != c.want {
			t.Errorf("portRangesOverlap(%d-%d, %d-%d) = %v, want %v", c.a, c.b, c.c, c.d, got, c.want)
		}
	}
}
