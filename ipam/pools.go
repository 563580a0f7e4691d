package ipam

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Family is an IP address family. The zero value is no family, so a Request that forgot
// to say which family it wants is rejected instead of silently getting IPv4.
type Family uint8

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) String() string {
	switch f {
	case IPv4:
		return "IPv4"
	case IPv6:
		return "IPv6"
	}
	return fmt.Sprintf("Family(%d)", uint8(f))
}

func familyOf(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}

// PoolSpec is a named, inclusive range of addresses that VIPs are handed out from.
type PoolSpec struct {
	Name        string
	First, Last netip.Addr
}

// Family is the family of the pool's addresses.
func (p PoolSpec) Family() Family { return familyOf(p.First) }

// String gives the pool in the range syntax ParsePools reads back.
func (p PoolSpec) String() string {
	return p.Name + "=" + p.First.String() + "-" + p.Last.String()
}

// ErrInvalidPool is wrapped by every error about a pool definition.
var ErrInvalidPool = errors.New("invalid pool")

const maxPoolName = 63

// ParsePools reads kube-loxilb's --cidrPools / --cidr6Pools syntax: a comma list of
// name=CIDR or name=startIP-endIP. A CIDR written with host bits set starts the pool at
// that address, as kube-loxilb does ("p=192.168.80.250/24" is .250 to .254).
//
// Prefixes never yield addresses a host cannot use as a VIP: for IPv4 shorter than /31 the
// network and broadcast addresses, for IPv6 shorter than /127 the subnet-router anycast
// address (RFC 4291, all host bits zero). An explicit range is taken as written.
// An empty spec is no pools. The caller checks that every pool has the family its flag
// expects (PoolSpec.Family).
func ParsePools(spec string) ([]PoolSpec, error) {
	if strings.TrimSpace(spec) == "" {
		return nil, nil
	}
	var pools []PoolSpec
	for i, entry := range strings.Split(spec, ",") {
		p, err := parsePool(strings.TrimSpace(entry))
		if err != nil {
			return nil, fmt.Errorf("pool entry %d %q: %w", i+1, entry, err)
		}
		pools = append(pools, p)
	}
	if err := checkPools(pools); err != nil {
		return nil, err
	}
	return pools, nil
}

func parsePool(entry string) (PoolSpec, error) {
	const want = "expected name=CIDR or name=startIP-endIP"
	if entry == "" {
		return PoolSpec{}, fmt.Errorf("%w: empty entry, %s", ErrInvalidPool, want)
	}
	name, value, ok := strings.Cut(entry, "=")
	if !ok {
		return PoolSpec{}, fmt.Errorf("%w: no '=', %s", ErrInvalidPool, want)
	}
	name, value = strings.TrimSpace(name), strings.TrimSpace(value)
	if err := checkName(name); err != nil {
		return PoolSpec{}, err
	}
	p := PoolSpec{Name: name}
	switch {
	case strings.Contains(value, "/"):
		pfx, err := netip.ParsePrefix(value)
		if err != nil {
			return PoolSpec{}, fmt.Errorf("%w: %q is not a CIDR (%w), %s", ErrInvalidPool, value, err, want)
		}
		if err := checkAddr(pfx.Addr()); err != nil {
			return PoolSpec{}, err
		}
		p.First, p.Last, ok = prefixRange(pfx)
		if !ok {
			return PoolSpec{}, fmt.Errorf("%w: %s has no usable address from %s on (network, broadcast and anycast addresses are never handed out)",
				ErrInvalidPool, pfx.Masked(), pfx.Addr())
		}
	case strings.Contains(value, "-"):
		lo, hi, _ := strings.Cut(value, "-")
		var err error
		if p.First, err = parseAddr(lo); err != nil {
			return PoolSpec{}, err
		}
		if p.Last, err = parseAddr(hi); err != nil {
			return PoolSpec{}, err
		}
		if p.First.Is4() != p.Last.Is4() {
			return PoolSpec{}, fmt.Errorf("%w: range %s mixes IPv4 and IPv6", ErrInvalidPool, value)
		}
		if p.Last.Less(p.First) {
			return PoolSpec{}, fmt.Errorf("%w: range %s ends before it starts (empty range)", ErrInvalidPool, value)
		}
	default:
		return PoolSpec{}, fmt.Errorf("%w: %q is neither a CIDR nor a range, %s", ErrInvalidPool, value, want)
	}
	return p, nil
}

func parseAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(strings.TrimSpace(s))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%w: %q is not an IP address (%w)", ErrInvalidPool, s, err)
	}
	return a, checkAddr(a)
}

// checkAddr refuses addresses that have two spellings in one pool table: a zone makes
// an address compare unequal to the same address without it, and an IPv4-mapped IPv6
// address would fall outside both the IPv4 and the IPv6 pools.
func checkAddr(a netip.Addr) error {
	if a.Zone() != "" {
		return fmt.Errorf("%w: %s has a zone, expected a plain address", ErrInvalidPool, a)
	}
	if a.Is4In6() {
		return fmt.Errorf("%w: %s is an IPv4-mapped IPv6 address, write it as IPv4", ErrInvalidPool, a)
	}
	return nil
}

// prefixRange is the usable range of a prefix, starting at the written address.
func prefixRange(p netip.Prefix) (first, last netip.Addr, ok bool) {
	base := p.Masked().Addr()
	last = lastOf(p)
	lo := base
	switch {
	case base.Is4() && p.Bits() < 31:
		lo, last = base.Next(), last.Prev()
	case base.Is6() && p.Bits() < 127:
		lo = base.Next()
	}
	first = p.Addr()
	if first.Less(lo) {
		first = lo
	}
	return first, last, !last.Less(first)
}

func lastOf(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As16()
	off := 0
	if p.Addr().Is4() {
		off = 96
	}
	for i := off + p.Bits(); i < 128; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a := netip.AddrFrom16(b)
	if p.Addr().Is4() {
		a = a.Unmap()
	}
	return a
}

func checkName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: empty pool name, expected name=CIDR or name=startIP-endIP", ErrInvalidPool)
	}
	if len(name) > maxPoolName {
		return fmt.Errorf("%w: pool name %.20q... is longer than %d characters", ErrInvalidPool, name, maxPoolName)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("%w: pool name %q may hold only letters, digits, '-', '_' and '.'", ErrInvalidPool, name)
		}
	}
	return nil
}

// checkPools validates a pool table written in the flags' syntax: names unique within
// a family (kube-loxilb setups name both their IPv4 and IPv6 pool "defaultPool"), ranges
// non-empty and disjoint.
func checkPools(pools []PoolSpec) error {
	type nameKey struct {
		f    Family
		name string
	}
	seen := make(map[nameKey]bool, len(pools))
	for _, p := range pools {
		k := nameKey{p.Family(), p.Name}
		if p.First.IsValid() && seen[k] {
			return fmt.Errorf("%w: two %s pools are named %q", ErrInvalidPool, k.f, p.Name)
		}
		seen[k] = true
	}
	return checkRanges(pools)
}

// checkRanges validates the ranges an allocator is made of: named, non-empty and
// disjoint. Several ranges may share a name: together they are one pool (an IPPool
// with several addresses).
func checkRanges(pools []PoolSpec) error {
	for _, p := range pools {
		if err := checkName(p.Name); err != nil {
			return err
		}
		if !p.First.IsValid() || !p.Last.IsValid() {
			return fmt.Errorf("%w: pool %q has no first or last address", ErrInvalidPool, p.Name)
		}
		if err := errors.Join(checkAddr(p.First), checkAddr(p.Last)); err != nil {
			return fmt.Errorf("pool %q: %w", p.Name, err)
		}
		if p.First.Is4() != p.Last.Is4() {
			return fmt.Errorf("%w: pool %q mixes IPv4 and IPv6", ErrInvalidPool, p.Name)
		}
		if p.Last.Less(p.First) {
			return fmt.Errorf("%w: pool %q is empty (%s is after %s)", ErrInvalidPool, p.Name, p.First, p.Last)
		}
	}
	sorted := slices.Clone(pools)
	slices.SortFunc(sorted, func(a, b PoolSpec) int { return a.First.Compare(b.First) })
	for i := 1; i < len(sorted); i++ {
		prev, cur := sorted[i-1], sorted[i]
		if prev.First.Is4() == cur.First.Is4() && !prev.Last.Less(cur.First) {
			return fmt.Errorf("%w: pools %q (%s-%s) and %q (%s-%s) overlap", ErrInvalidPool,
				prev.Name, prev.First, prev.Last, cur.Name, cur.First, cur.Last)
		}
	}
	return nil
}

// ParseStaticIP reads the loxilb.io/staticIP annotation. An empty value is no static IP
// (the zero Addr).
func ParseStaticIP(s string) (netip.Addr, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return netip.Addr{}, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%w: static IP %q: expected one IPv4 or IPv6 address (%w)", ErrInvalidRequest, s, err)
	}
	if err := checkAddr(a); err != nil {
		return netip.Addr{}, fmt.Errorf("%w: static IP: %w", ErrInvalidRequest, err)
	}
	return a, nil
}

// PortKey is one (protocol, port) of a service; in shared mode two services may share an
// IP only when no PortKey of one is a PortKey of the other.
type PortKey struct {
	Protocol uint8 // IANA number: 6 TCP, 17 UDP, 132 SCTP
	Port     uint16
}

func (k PortKey) String() string {
	switch k.Protocol {
	case 6:
		return fmt.Sprintf("%d/TCP", k.Port)
	case 17:
		return fmt.Sprintf("%d/UDP", k.Port)
	case 132:
		return fmt.Sprintf("%d/SCTP", k.Port)
	}
	return fmt.Sprintf("%d/proto%d", k.Port, k.Protocol)
}

func comparePorts(a, b PortKey) int {
	return cmp.Or(cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Port, b.Port))
}
