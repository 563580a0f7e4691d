package datapath

import (
	"encoding/binary"
	"net/netip"

	"github.com/shardlb/shardlb/shard"
)

// Address families as the kernel numbers them (AF_INET, AF_INET6).
const (
	afInet  = 2
	afInet6 = 10
)

// addrWords lays out an address as the C structs hold it: network byte order, IPv4 in
// the first word and the rest zero.
func addrWords(a netip.Addr) [4]uint32 {
	var w [4]uint32
	if a.Is4() {
		b := a.As4()
		w[0] = binary.NativeEndian.Uint32(b[:])
		return w
	}
	b := a.As16()
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w
}

// htons turns a port into the value whose in-memory bytes are in network order.
func htons(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func family(a netip.Addr) uint8 {
	if a.Is4() {
		return afInet
	}
	return afInet6
}

func serviceKey(vip netip.Addr, port uint16, proto shard.Protocol) lbServiceKey {
	return lbServiceKey{Vip: addrWords(vip), Port: htons(port), Proto: uint8(proto), Family: family(vip)}
}

// addrOf is the inverse of addrWords for an address of the given family; ok is false
// for a family the datapath does not write.
func addrOf(w [4]uint32, fam uint8) (netip.Addr, bool) {
	var b [16]byte
	for i := range w {
		binary.NativeEndian.PutUint32(b[4*i:], w[i])
	}
	switch fam {
	case afInet:
		return netip.AddrFrom4([4]byte(b[:4])), true
	case afInet6:
		return netip.AddrFrom16(b), true
	}
	return netip.Addr{}, false
}

// ntohs is the inverse of htons.
func ntohs(p uint16) uint16 { return htons(p) }
