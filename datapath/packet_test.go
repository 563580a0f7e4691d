package datapath

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"

	"github.com/shardlb/shardlb/shard"
)

// pkt describes a test packet; bytes() builds it with every checksum computed from
// scratch, so expected packets never share code with the program's incremental updates.
type pkt struct {
	src, dst  netip.AddrPort
	proto     shard.Protocol
	ttl       uint8   // 64 if zero
	ipOptions []byte  // IPv4 options, a multiple of 4 bytes
	fragment  bool    // IPv4: more-fragments set; IPv6: a fragment header
	df        bool    // IPv4: don't fragment set
	hopByHop  bool    // IPv6: a hop-by-hop options header before L4
	udpNoCsum bool    // IPv4 UDP without checksum (0)
	payload   []byte  // "hello" if nil
	truncate  int     // cut the packet to this many bytes after building
	srcMAC    [6]byte // clientMAC if zero
	dstMAC    [6]byte // lbMAC if zero
	tcpFlags  uint8   // SYN if zero
	mss       uint16  // TCP: an MSS option (the only option) when not zero
}

var (
	clientMAC = [6]byte{0x02, 0, 0, 0, 0, 0x01}
	lbMAC     = [6]byte{0x02, 0, 0, 0, 0, 0x02}
)

func (p pkt) bytes() []byte {
	payload := p.payload
	if payload == nil {
		payload = []byte("hello")
	}
	ttl := p.ttl
	if ttl == 0 {
		ttl = 64
	}
	srcMAC, dstMAC := p.srcMAC, p.dstMAC
	if srcMAC == ([6]byte{}) {
		srcMAC = clientMAC
	}
	if dstMAC == ([6]byte{}) {
		dstMAC = lbMAC
	}

	// L4 header and payload, checksum filled in once the pseudo-header is known.
	var l4 []byte
	if p.proto == shard.TCP {
		l4 = make([]byte, 20)
		binary.BigEndian.PutUint16(l4[0:], p.src.Port())
		binary.BigEndian.PutUint16(l4[2:], p.dst.Port())
		binary.BigEndian.PutUint32(l4[4:], 1000)
		l4[12] = 5 << 4
		if p.mss != 0 {
			l4 = append(l4, 2, 4, byte(p.mss>>8), byte(p.mss))
			l4[12] = 6 << 4
		}
		l4[13] = p.tcpFlags
		if l4[13] == 0 {
			l4[13] = 0x02
		}
		binary.BigEndian.PutUint16(l4[14:], 65535)
	} else {
		l4 = make([]byte, 8)
		binary.BigEndian.PutUint16(l4[0:], p.src.Port())
		binary.BigEndian.PutUint16(l4[2:], p.dst.Port())
		binary.BigEndian.PutUint16(l4[4:], uint16(8+len(payload)))
	}
	l4 = append(l4, payload...)
	csumOff := 16
	if p.proto == shard.UDP {
		csumOff = 6
	}
	src, dst := p.src.Addr().AsSlice(), p.dst.Addr().AsSlice()
	if !(p.proto == shard.UDP && p.udpNoCsum && p.src.Addr().Is4()) {
		c := ^csumSum(pseudoSum(src, dst, uint8(p.proto), len(l4)), l4)
		if c == 0 && p.proto == shard.UDP {
			c = 0xffff
		}
		binary.BigEndian.PutUint16(l4[csumOff:], c)
	}

	b := append([]byte{}, dstMAC[:]...)
	b = append(b, srcMAC[:]...)
	if p.src.Addr().Is4() {
		b = binary.BigEndian.AppendUint16(b, 0x0800)
		hl := 20 + len(p.ipOptions)
		ip := make([]byte, hl)
		ip[0] = 0x40 | byte(hl/4)
		binary.BigEndian.PutUint16(ip[2:], uint16(hl+len(l4)))
		binary.BigEndian.PutUint16(ip[4:], 0x1234)
		if p.fragment {
			binary.BigEndian.PutUint16(ip[6:], 0x2000)
		}
		if p.df {
			binary.BigEndian.PutUint16(ip[6:], 0x4000)
		}
		ip[8] = ttl
		ip[9] = uint8(p.proto)
		copy(ip[12:], src)
		copy(ip[16:], dst)
		copy(ip[20:], p.ipOptions)
		binary.BigEndian.PutUint16(ip[10:], ^csumSum(0, ip))
		b = append(b, ip...)
	} else {
		b = binary.BigEndian.AppendUint16(b, 0x86dd)
		var ext []byte
		next := uint8(p.proto)
		if p.fragment {
			ext = []byte{next, 0, 0, 1, 0, 0, 0, 42} // offset 0, more fragments
			next = 44
		}
		if p.hopByHop {
			ext = append([]byte{next, 0, 1, 4, 0, 0, 0, 0}, ext...) // PadN
			next = 0
		}
		ip := make([]byte, 40)
		ip[0] = 0x60
		binary.BigEndian.PutUint16(ip[4:], uint16(len(ext)+len(l4)))
		ip[6] = next
		ip[7] = ttl
		copy(ip[8:], src)
		copy(ip[24:], dst)
		b = append(b, ip...)
		b = append(b, ext...)
	}
	b = append(b, l4...)
	if p.truncate > 0 && p.truncate < len(b) {
		b = b[:p.truncate]
	}
	return b
}

func csumSum(sum uint32, b []byte) uint16 {
	for len(b) >= 2 {
		sum += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return uint16(sum)
}

func pseudoSum(src, dst []byte, proto uint8, n int) uint32 {
	var s uint32
	for _, a := range [][]byte{src, dst} {
		for i := 0; i+1 < len(a); i += 2 {
			s += uint32(binary.BigEndian.Uint16(a[i:]))
		}
	}
	return s + uint32(proto) + uint32(n)
}

// verifyChecksums checks the IPv4 header checksum and the TCP, UDP, ICMP or ICMPv6
// checksum of an Ethernet frame from scratch. Packets it cannot parse are not its business.
func verifyChecksums(b []byte) error {
	if len(b) < 14 {
		return nil
	}
	var src, dst, seg []byte
	var proto uint8
	switch binary.BigEndian.Uint16(b[12:]) {
	case 0x0800:
		ip := b[14:]
		if len(ip) < 20 {
			return nil
		}
		hl := int(ip[0]&0xf) * 4
		if len(ip) < hl {
			return nil
		}
		if c := csumSum(0, ip[:hl]); c != 0xffff {
			return fmt.Errorf("IPv4 header checksum wrong (sum %#04x)", c)
		}
		if binary.BigEndian.Uint16(ip[6:])&0x3fff != 0 {
			return nil
		}
		total := int(binary.BigEndian.Uint16(ip[2:]))
		if total > len(ip) {
			return nil
		}
		src, dst, proto, seg = ip[12:16], ip[16:20], ip[9], ip[hl:total]
		if proto == 17 && len(seg) >= 8 && binary.BigEndian.Uint16(seg[6:]) == 0 {
			return nil
		}
		if proto == 1 { // ICMP: no pseudo-header
			if c := csumSum(0, seg); c != 0xffff {
				return fmt.Errorf("ICMP checksum wrong (sum %#04x)", c)
			}
			return nil
		}
	case 0x86dd:
		ip := b[14:]
		if len(ip) < 40 || (ip[6] != 6 && ip[6] != 17 && ip[6] != 58) {
			return nil
		}
		n := int(binary.BigEndian.Uint16(ip[4:]))
		if 40+n > len(ip) {
			return nil
		}
		src, dst, proto, seg = ip[8:24], ip[24:40], ip[6], ip[40:40+n]
		if proto == 17 && len(seg) >= 8 && binary.BigEndian.Uint16(seg[6:]) == 0 {
			return errors.New("IPv6 UDP checksum is 0")
		}
	default:
		return nil
	}
	if proto != 6 && proto != 17 && proto != 58 {
		return nil
	}
	if c := csumSum(pseudoSum(src, dst, proto, len(seg)), seg); c != 0xffff {
		return fmt.Errorf("%s checksum wrong (sum %#04x)", map[uint8]string{6: "TCP", 17: "UDP", 58: "ICMPv6"}[proto], c)
	}
	return nil
}

// dumpPair prints two packets one above the other for a failure message.
func dumpPair(got, want []byte) string {
	return fmt.Sprintf("got:\n%swant:\n%s", hex.Dump(got), hex.Dump(want))
}

// icmpError builds an Ethernet frame carrying an ICMP (IPv4) or ICMPv6 error from src to
// dst of the given type and code, whose four type-specific bytes are rest, quoting
// quote (an IP packet's first bytes), with every checksum computed from scratch.
func icmpError(src, dst netip.Addr, typ, code uint8, rest uint32, quote []byte) []byte {
	msg := []byte{typ, code, 0, 0}
	msg = binary.BigEndian.AppendUint32(msg, rest)
	msg = append(msg, quote...)
	b := append([]byte{}, lbMAC[:]...)
	b = append(b, clientMAC[:]...)
	if src.Is4() {
		binary.BigEndian.PutUint16(msg[2:], ^csumSum(0, msg))
		b = binary.BigEndian.AppendUint16(b, 0x0800)
		ip := make([]byte, 20)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(msg)))
		ip[8] = 64
		ip[9] = 1
		copy(ip[12:], src.AsSlice())
		copy(ip[16:], dst.AsSlice())
		binary.BigEndian.PutUint16(ip[10:], ^csumSum(0, ip))
		return append(append(b, ip...), msg...)
	}
	binary.BigEndian.PutUint16(msg[2:], ^csumSum(pseudoSum(src.AsSlice(), dst.AsSlice(), 58, len(msg)), msg))
	b = binary.BigEndian.AppendUint16(b, 0x86dd)
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(msg)))
	ip[6] = 58
	ip[7] = 64
	copy(ip[8:], src.AsSlice())
	copy(ip[24:], dst.AsSlice())
	return append(append(b, ip...), msg...)
}
