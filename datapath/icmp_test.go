package datapath

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"testing"

	"github.com/shardlb/shardlb/shard"
)

// TestICMPErrors sends ICMP errors about packets the program translated back through
// it, for every mode, protocol and family: a router's error about a reply (sent to the
// VIP) must reach the endpoint, one about a request (sent to the request's translated
// source) the client, each quoting the packet exactly as its sender sent it, with every
// checksum right (the outer ones, the quoted IPv4 header's and the quoted TCP or UDP
// checksum). Errors about no tracked flow, and ICMP that is not an error, pass
// untouched.
func TestICMPErrors(t *testing.T) { forEachVariant(t, testICMPErrors) }

func testICMPErrors(t *testing.T, v variant) {
	for _, fam := range []struct {
		name                             string
		lbAddr, clientNet                string
		node, ep, vip, client, router    netip.Addr
		ipLen, ttlOffset                 int
		tooBigType, tooBigCode, echoType uint8
		tooBigRest                       uint32
	}{
		{
			name: "IPv4", lbAddr: "10.2.0.1/16", clientNet: "10.1.0.0/16",
			node: netip.MustParseAddr("10.2.0.1"), ep: netip.MustParseAddr("10.2.0.11"),
			vip: netip.MustParseAddr("192.0.2.10"), client: netip.MustParseAddr("10.1.0.2"),
			router: netip.MustParseAddr("10.9.0.1"), ipLen: 20, ttlOffset: 8,
			tooBigType: 3, tooBigCode: 4, tooBigRest: 1400, echoType: 8, // fragmentation needed, next-hop MTU
		},
		{
			name: "IPv6", lbAddr: "fd00:2::1/64", clientNet: "fd00:1::/64",
			node: netip.MustParseAddr("fd00:2::1"), ep: netip.MustParseAddr("fd00:2::11"),
			vip: netip.MustParseAddr("2001:db8::10"), client: netip.MustParseAddr("fd00:1::2"),
			router: netip.MustParseAddr("fd00:9::1"), ipLen: 40, ttlOffset: 7,
			tooBigType: 2, tooBigCode: 0, tooBigRest: 1400, echoType: 128, // packet too big, MTU
		},
	} {
		t.Run(fam.name, func(t *testing.T) {
			cfg := Config{NodeIPv4: fam.node, variant: v}
			if fam.node.Is6() {
				cfg = Config{NodeIPv6: fam.node, variant: v}
			}
			h := newHarness(t, cfg)
			epMAC, clientHopMAC := [6]byte{0x02, 0, 0, 0, 0, 0x11}, [6]byte{0x02, 0, 0, 0, 0, 0x22}
			h.link(fam.lbAddr, []string{fam.clientNet}, map[netip.Addr][6]byte{fam.ep: epMAC, fam.client: clientHopMAC})

			vip := netip.AddrPortFrom(fam.vip, vipPort)
			client := netip.AddrPortFrom(fam.client, cliPort)
			// quote is what a router quotes of a packet: its IP header and its TCP header
			// or the first 8 bytes of UDP (the least a quote holds).
			quote := func(frame []byte, proto shard.Protocol) []byte {
				n := 8
				if proto == shard.TCP {
					n = 20
				}
				return bytes.Clone(frame[14 : 14+fam.ipLen+n])
			}
			// asQuoted is the quote of the packet a host sent, as it looked once this node
			// had forwarded it: one TTL less (and the IPv4 header checksum to match).
			asQuoted := func(sent []byte, proto shard.Protocol) []byte {
				q := quote(sent, proto)
				q[fam.ttlOffset]--
				if fam.ipLen == 20 {
					binary.BigEndian.PutUint16(q[10:], 0)
					binary.BigEndian.PutUint16(q[10:], ^csumSum(0, q[:20]))
				}
				return q
			}
			run := func(t *testing.T, in []byte) []byte {
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
			icmpErrors := func(service string) uint64 {
				for _, s := range h.d.Stats().Services {
					if s.Service == service {
						return s.ICMPErrors
					}
				}
				t.Fatalf("no counters for %s", service)
				return 0
			}
			// translatedBack asserts that the error out goes from the router to want,
			// one TTL less, quoting sent as its sender sent it (after this node's
			// forwarding).
			translatedBack := func(t *testing.T, out []byte, want netip.Addr, wantMAC [6]byte, sent []byte, proto shard.Protocol) {
				t.Helper()
				ip := out[14:]
				src, dst := netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
				if fam.ipLen == 40 {
					src, dst = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
				}
				if src != fam.router || dst != want {
					t.Errorf("error from %s to %s, want from %s to %s", src, dst, fam.router, want)
				}
				if ip[fam.ttlOffset] != 63 {
					t.Errorf("TTL %d, want 63", ip[fam.ttlOffset])
				}
				if !bytes.Equal(out[0:6], wantMAC[:]) {
					t.Errorf("sent to MAC % x, want % x", out[0:6], wantMAC)
				}
				got, wantQuote := ip[fam.ipLen+8:], asQuoted(sent, proto)
				if !bytes.Equal(got, wantQuote) {
					t.Errorf("quoted packet differs:\n%s", dumpPair(got, wantQuote))
				}
			}

			for _, mode := range modes {
				for _, proto := range protos {
					t.Run(fmt.Sprintf("%s %s", mode, proto), func(t *testing.T) {
						service := fmt.Sprintf("ns/icmp-%s-%s", mode, proto)
						h.set(shard.Frontend{Service: service, VIP: fam.vip, Port: vipPort, Protocol: proto, Mode: mode,
							Endpoints: []shard.Endpoint{{Addr: fam.ep, Port: epPort}}})
						fwdIn := pkt{src: client, dst: vip, proto: proto, tcpFlags: 0x10}.bytes()
						fwdOut := run(t, fwdIn)
						replyIn := pkt{src: netip.AddrPortFrom(fam.ep, epPort), dst: sourceOfFrame(t, fwdOut), proto: proto, tcpFlags: 0x10}.bytes()
						replyOut := run(t, replyIn)
						before := icmpErrors(service)

						// A router between this node and the client cannot take the reply.
						out := run(t, icmpError(fam.router, fam.vip, fam.tooBigType, fam.tooBigCode, fam.tooBigRest, quote(replyOut, proto)))
						translatedBack(t, out, fam.ep, epMAC, replyIn, proto)
						// A router between this node and the endpoint cannot take the request.
						out = run(t, icmpError(fam.router, sourceOfFrame(t, fwdOut).Addr(), fam.tooBigType, fam.tooBigCode, fam.tooBigRest, quote(fwdOut, proto)))
						translatedBack(t, out, fam.client, clientHopMAC, fwdIn, proto)
						if got := icmpErrors(service) - before; got != 2 {
							t.Errorf("ICMP errors counted: %d, want 2", got)
						}
					})
				}
			}

			t.Run("ICMP that is not about a tracked flow passes untouched", func(t *testing.T) {
				h.set(shard.Frontend{Service: "ns/icmp", VIP: fam.vip, Port: vipPort, Protocol: shard.TCP,
					Endpoints: []shard.Endpoint{{Addr: fam.ep, Port: epPort}}})
				replyOut := run(t, pkt{src: netip.AddrPortFrom(fam.ep, epPort), dst: client, proto: shard.TCP, tcpFlags: 0x10}.bytes())
				run(t, pkt{src: client, dst: vip, proto: shard.TCP, tcpFlags: 0x10}.bytes())
				unknown := pkt{src: vip, dst: netip.AddrPortFrom(fam.client, cliPort+1), proto: shard.TCP, tcpFlags: 0x10}.bytes()
				for name, in := range map[string][]byte{
					"an error about an unknown flow":  icmpError(fam.router, fam.vip, fam.tooBigType, fam.tooBigCode, fam.tooBigRest, quote(unknown, shard.TCP)),
					"an echo request to the VIP":      icmpError(fam.client, fam.vip, fam.echoType, 0, 1, []byte("ping")),
					"an error sent elsewhere":         icmpError(fam.router, fam.node, fam.tooBigType, fam.tooBigCode, fam.tooBigRest, quote(replyOut, shard.TCP)),
					"an error quoting 4 bytes of TCP": icmpError(fam.router, fam.vip, fam.tooBigType, fam.tooBigCode, fam.tooBigRest, quote(replyOut, shard.TCP)[:fam.ipLen+4]),
				} {
					if ret, out := h.lb(in); ret != actPass || !bytes.Equal(out, in) {
						t.Errorf("%s: action %d, changed=%v; want it untouched", name, ret, !bytes.Equal(out, in))
					}
				}
			})
		})
	}
}

// sourceOfFrame returns the source address and port of an IPv4 or IPv6 frame's TCP or
// UDP packet.
func sourceOfFrame(t testing.TB, b []byte) netip.AddrPort {
	t.Helper()
	switch binary.BigEndian.Uint16(b[12:]) {
	case 0x0800:
		hl := int(b[14]&0xf) * 4
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[26:30])), binary.BigEndian.Uint16(b[14+hl:]))
	case 0x86dd:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[22:38])), binary.BigEndian.Uint16(b[54:]))
	}
	t.Fatalf("not an IP frame: % x", b)
	return netip.AddrPort{}
}

// TestTooBigAnswered sends packets of a tracked flow that are too big for their next
// hop (d0's MTU is 1280): one that must not be fragmented (IPv4 with DF, any IPv6) is
// answered like a router does, with "fragmentation needed" or "packet too big" from its
// destination back to its sender, out where it came in, quoting its first bytes as the
// sender sent them; an IPv4 packet without DF is translated and left to the kernel,
// which fragments it.
func TestTooBigAnswered(t *testing.T) { forEachVariant(t, testTooBigAnswered) }

func testTooBigAnswered(t *testing.T, v variant) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			cfg := Config{NodeIPv4: families[0].node, NodeIPv6: families[1].node, variant: v}
			h := newHarness(t, cfg)
			h.link(fam.nodeNet, []string{fam.clientNet}, map[netip.Addr][6]byte{fam.ep: {0x02, 0, 0, 0, 0, 0x11}, fam.client: {0x02, 0, 0, 0, 0, 0x22}})
			h.nn.Run(t, "ip", "link", "set", "d0", "mtu", "1280")
			ep := netip.AddrPortFrom(fam.ep, epPort)
			client := netip.AddrPortFrom(fam.client, cliPort)
			h.set(shard.Frontend{Service: "ns/big", VIP: fam.vip, Port: vipPort, Protocol: shard.TCP,
				Endpoints: []shard.Endpoint{{Addr: fam.ep, Port: epPort}}})
			if ret, _ := h.lb(pkt{src: client, dst: netip.AddrPortFrom(fam.vip, vipPort), proto: shard.TCP, tcpFlags: 0x10}.bytes()); ret != actRedirect {
				t.Fatalf("forward packet: action %d, want redirect", ret)
			}
			big := pkt{src: ep, dst: client, proto: shard.TCP, tcpFlags: 0x10, payload: bytes.Repeat([]byte("x"), 1400), df: true}.bytes()
			before := h.d.Stats().Services[0].ICMPErrors
			ret, out := h.lb(big)
			if ret != actRedirect {
				t.Fatalf("too big a reply: action %d, want redirect %d", ret, actRedirect)
			}
			if n := h.d.Stats().Services[0].ICMPErrors - before; n != 1 {
				t.Errorf("ICMP errors counted: %d, want 1", n)
			}
			ipLen, wantType, wantCode, proto := 20, byte(3), byte(4), byte(1)
			if fam.ep.Is6() {
				ipLen, wantType, wantCode, proto = 40, 2, 0, 58
			}
			if want := 14 + ipLen + 8 + ipLen + 8; len(out) != want {
				t.Fatalf("answer of %d bytes, want %d:\n%s", len(out), want, hex.Dump(out))
			}
			if err := verifyChecksums(out); err != nil {
				t.Fatal(err)
			}
			want := append([]byte{}, big[6:12]...) // back to the previous hop
			want = append(want, big[0:6]...)
			if !bytes.Equal(out[:12], want) {
				t.Errorf("MACs % x, want % x", out[:12], want)
			}
			ip := out[14:]
			src, dst := netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
			gotProto := ip[9]
			if ipLen == 40 {
				src, dst, gotProto = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40])), ip[6]
			}
			if src != fam.client || dst != fam.ep || gotProto != proto {
				t.Errorf("answer from %s to %s, protocol %d; want from %s to %s, protocol %d", src, dst, gotProto, fam.client, fam.ep, proto)
			}
			ic := ip[ipLen:]
			if ic[0] != wantType || ic[1] != wantCode || binary.BigEndian.Uint32(ic[4:8]) != 1280 {
				t.Errorf("ICMP type %d code %d MTU %d, want %d %d 1280", ic[0], ic[1], binary.BigEndian.Uint32(ic[4:8]), wantType, wantCode)
			}
			if q := big[14 : 14+ipLen+8]; !bytes.Equal(ic[8:], q) {
				t.Errorf("quoted packet differs:\n%s", dumpPair(ic[8:], q))
			}

			if !fam.ep.Is6() {
				frag := pkt{src: ep, dst: client, proto: shard.TCP, tcpFlags: 0x10, payload: bytes.Repeat([]byte("x"), 1400)}.bytes()
				ret, out := h.lb(frag)
				if ret != actOK || len(out) != len(frag) || sourceOfFrame(t, out) != netip.AddrPortFrom(fam.vip, vipPort) {
					t.Errorf("too big a reply without DF: action %d, %d bytes from %s; want it translated and left to the kernel", ret, len(out), sourceOfFrame(t, out))
				}
			}
		})
	}
}
