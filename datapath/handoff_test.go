package datapath

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/shardlb/shardlb/shard"
)

// TestHandoff checks what a node does with a VIP's packets while its previous master
// still serves the connections in flight: TCP segments without state here go to the
// previous master unchanged but for MACs and TTL; everything else is balanced here
// exactly as without a handoff.
func TestHandoff(t *testing.T) {
	for _, fam := range []struct {
		name                      string
		lbAddr, net, gwNet        string
		node, peer, ep, vip, far  netip.Addr
		client                    netip.Addr
		clientNet                 string
		ttlOffset, checksumOffset int // within the IP header; checksum -1: none
	}{
		{
			name: "IPv4", lbAddr: "10.2.0.1/16", gwNet: "10.9.0.0/16", clientNet: "10.1.0.0/16",
			node: netip.MustParseAddr("10.2.0.1"), peer: netip.MustParseAddr("10.2.0.9"),
			ep: netip.MustParseAddr("10.2.0.11"), vip: netip.MustParseAddr("192.0.2.10"),
			far: netip.MustParseAddr("10.9.0.9"), client: netip.MustParseAddr("10.1.0.2"),
			ttlOffset: 8, checksumOffset: 10,
		},
		{
			name: "IPv6", lbAddr: "fd00:2::1/64", gwNet: "fd00:9::/64", clientNet: "fd00:1::/64",
			node: netip.MustParseAddr("fd00:2::1"), peer: netip.MustParseAddr("fd00:2::9"),
			ep: netip.MustParseAddr("fd00:2::11"), vip: netip.MustParseAddr("2001:db8::10"),
			far: netip.MustParseAddr("fd00:9::9"), client: netip.MustParseAddr("fd00:1::2"),
			ttlOffset: 7, checksumOffset: -1,
		},
	} {
		t.Run(fam.name, func(t *testing.T) {
			cfg := Config{NodeIPv4: fam.node}
			if fam.node.Is6() {
				cfg = Config{NodeIPv6: fam.node}
			}
			h := newHarness(t, cfg)
			peerMAC, epMAC := [6]byte{0x02, 0, 0, 0, 0, 0x99}, [6]byte{0x02, 0, 0, 0, 0, 0x11}
			gw := netip.MustParseAddr("10.2.0.254")
			if fam.node.Is6() {
				gw = netip.MustParseAddr("fd00:2::fe")
			}
			d0 := h.link(fam.lbAddr, []string{fam.clientNet}, map[netip.Addr][6]byte{fam.peer: peerMAC, fam.ep: epMAC, gw: peerMAC})
			h.nn.Run(t, "ip", "route", "add", fam.gwNet, "via", gw.String(), "dev", "d0")

			ep := []shard.Endpoint{{Addr: fam.ep, Port: epPort}}
			tcp := shard.Frontend{Service: "ns/tcp", VIP: fam.vip, Port: vipPort, Protocol: shard.TCP, Mode: shard.ModeOneArm, Endpoints: ep, Handoff: fam.peer}
			udp := shard.Frontend{Service: "ns/udp", VIP: fam.vip, Port: vipPort, Protocol: shard.UDP, Mode: shard.ModeOneArm, Endpoints: ep, Handoff: fam.peer}
			h.set(tcp, udp)
			vip := netip.AddrPortFrom(fam.vip, vipPort)
			from := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(fam.client, port) }
			stats := func() ServiceStats {
				for _, s := range h.d.Stats().Services {
					if s.Service == "ns/tcp" {
						return s
					}
				}
				t.Fatal("no stats for ns/tcp")
				return ServiceStats{}
			}
			// redirected runs in and asserts a redirect with correct checksums.
			redirected := func(t *testing.T, in []byte) []byte {
				t.Helper()
				ret, out := h.lb(in)
				if ret != actRedirect {
					t.Fatalf("action %d, want redirect %d", ret, actRedirect)
				}
				if err := verifyChecksums(out); err != nil {
					t.Fatal(err)
				}
				return out
			}
			// handedOffVia asserts that in went to the previous master: same packet, TTL
			// one less, checksums right; if the peer's neighbour entry is known
			// (resolved), with the peer's MAC and this node's MAC as source, else with
			// the MACs left for the neighbour subsystem to write.
			handedOffVia := func(t *testing.T, in []byte, resolved bool) {
				t.Helper()
				before := stats()
				out := redirected(t, in)
				want := bytes.Clone(in)
				if resolved {
					copy(want[0:6], peerMAC[:])
					copy(want[6:12], d0.HardwareAddr)
				}
				want[14+fam.ttlOffset]--
				if fam.checksumOffset >= 0 {
					copy(want[14+fam.checksumOffset:], out[14+fam.checksumOffset:14+fam.checksumOffset+2])
				}
				if !bytes.Equal(out, want) {
					t.Fatalf("handed-off packet differs:\n%s", dumpPair(out, want))
				}
				after := stats()
				if after.HandoffPackets != before.HandoffPackets+1 || after.NewFlows != before.NewFlows {
					t.Fatalf("handoff packets %d -> %d, new flows %d -> %d: want one handoff, no new flow",
						before.HandoffPackets, after.HandoffPackets, before.NewFlows, after.NewFlows)
				}
			}
			handedOff := func(t *testing.T, in []byte) { handedOffVia(t, in, true) }
			// balancedHere asserts that in was translated toward the endpoint here.
			balancedHere := func(t *testing.T, in []byte, wantNew bool) {
				t.Helper()
				before := stats()
				out := redirected(t, in)
				if got := endpointOf(t, out); got != netip.AddrPortFrom(fam.ep, epPort) {
					t.Fatalf("sent to %v, want the endpoint", got)
				}
				if !bytes.Equal(out[0:6], epMAC[:]) {
					t.Fatalf("sent to MAC % x, want the endpoint's", out[0:6])
				}
				after := stats()
				if after.HandoffPackets != before.HandoffPackets {
					t.Fatal("counted as handed off")
				}
				if got := after.NewFlows - before.NewFlows; got != map[bool]uint64{true: 1}[wantNew] {
					t.Fatalf("%d new flows, want new=%v", got, wantNew)
				}
			}
			ack := func(port uint16) []byte {
				return pkt{src: from(port), dst: vip, proto: shard.TCP, tcpFlags: 0x10}.bytes()
			}
			fin := func(port uint16) []byte {
				return pkt{src: from(port), dst: vip, proto: shard.TCP, tcpFlags: 0x11}.bytes()
			}

			t.Run("a segment of a connection unknown here goes to the previous master", func(t *testing.T) {
				handedOff(t, ack(41000))
				handedOff(t, fin(41000))
				handedOff(t, pkt{src: from(41001), dst: vip, proto: shard.TCP, tcpFlags: 0x04}.bytes()) // RST
			})
			t.Run("and leaves no state here", func(t *testing.T) {
				handedOff(t, ack(41000))
			})
			t.Run("a SYN starts a connection here, whose segments then stay here", func(t *testing.T) {
				balancedHere(t, pkt{src: from(42000), dst: vip, proto: shard.TCP, tcpFlags: 0x02}.bytes(), true)
				balancedHere(t, ack(42000), false)
				balancedHere(t, fin(42000), false)
			})
			t.Run("UDP is balanced here", func(t *testing.T) {
				ret, out := h.lb(pkt{src: from(43000), dst: vip, proto: shard.UDP}.bytes())
				if ret != actRedirect || endpointOf(t, out) != netip.AddrPortFrom(fam.ep, epPort) {
					t.Fatalf("action %d to %v, want redirect to the endpoint", ret, endpointOf(t, out))
				}
			})
			t.Run("a spent TTL is not handed off", func(t *testing.T) {
				before := stats()
				ret, _ := h.lb(pkt{src: from(44000), dst: vip, proto: shard.TCP, tcpFlags: 0x10, ttl: 1}.bytes())
				if ret == actRedirect || stats().HandoffPackets != before.HandoffPackets {
					t.Fatalf("action %d, handoffs %d -> %d: a TTL 1 packet must not be sent on", ret, before.HandoffPackets, stats().HandoffPackets)
				}
			})
			t.Run("a previous master behind a router is not handed to", func(t *testing.T) {
				far := tcp
				far.Handoff = fam.far
				h.set(far, udp)
				balancedHere(t, ack(45000), true)
			})
			t.Run("a previous master whose neighbour is unresolved is reached through the neighbour subsystem", func(t *testing.T) {
				unresolved := tcp
				unresolved.Handoff = fam.peer.Prev() // on d0's network, no neighbour entry
				h.set(unresolved, udp)
				handedOffVia(t, ack(45500), false)
			})
			t.Run("default mode never hands off", func(t *testing.T) {
				def := tcp
				def.Mode = shard.ModeDefault
				h.set(def, udp)
				balancedHere(t, ack(46000), true)
			})
			t.Run("clearing the handoff balances segments here again", func(t *testing.T) {
				h.set(tcp, udp)
				handedOff(t, ack(47000))
				none := tcp
				none.Handoff = netip.Addr{}
				h.set(none, udp)
				balancedHere(t, ack(47000), true)
			})
		})
	}
}
