package datapath

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/shardlb/shardlb/shard"
)

// svcSourceRanges is the service entry's flag SVC_SOURCE_RANGES (bpf/consts.h).
const svcSourceRanges = 1

// sourceRanges is how a frontend's source ranges are written: the service entry's flag
// and the trie entries of the VIP's family.
type sourceRanges struct {
	// restricted: the frontend has source ranges, of whatever family. One whose
	// ranges are all of the other family lets no client of its own family through.
	restricted bool
	// prefixes are those of the VIP's family, masked, sorted, without duplicates.
	prefixes []netip.Prefix
}

// rangesOf is what the maps must hold for a normalized frontend.
func rangesOf(fe shard.Frontend) sourceRanges {
	r := sourceRanges{restricted: len(fe.SourceRanges) > 0}
	for _, p := range fe.SourceRanges {
		if p.Addr().Is4() == fe.VIP.Is4() {
			r.prefixes = append(r.prefixes, p)
		}
	}
	return r
}

// sameRanges reports whether a's service entry, endpoints and tries hold r already.
func (a *applied) sameRanges(r sourceRanges) bool {
	return !a.rangesDirty && a.restricted == r.restricted && slices.Equal(a.ranges, r.prefixes)
}

// normalizeRanges makes equal source ranges compare equal: IPv4-mapped IPv6 prefixes
// as the IPv4 ones they hold, host bits cleared, sorted, without duplicates. Invalid
// prefixes are left for validate to refuse.
func normalizeRanges(ranges []netip.Prefix) []netip.Prefix {
	if len(ranges) == 0 {
		return nil
	}
	out := make([]netip.Prefix, 0, len(ranges))
	for _, p := range ranges {
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		out = append(out, p.Masked())
	}
	slices.SortFunc(out, comparePrefixes)
	return slices.Compact(out)
}

func comparePrefixes(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

// validateRanges refuses source ranges the datapath cannot enforce as asked.
func (d *Datapath) validateRanges(fe shard.Frontend) error {
	for i, p := range fe.SourceRanges {
		if !p.IsValid() {
			return fmt.Errorf("source range %d of %d is not a valid prefix (%q)", i+1, len(fe.SourceRanges), p)
		}
	}
	fe.VIP = fe.VIP.Unmap()
	fe.SourceRanges = normalizeRanges(fe.SourceRanges)
	if n := len(rangesOf(fe).prefixes); n > d.cfg.MaxSourceRanges {
		return fmt.Errorf("%d source ranges of the VIP's family, more than %d (raise Config.MaxSourceRanges)", n, d.cfg.MaxSourceRanges)
	}
	return nil
}

// rangeFamily indexes Datapath.rangeCount: 0 for IPv4, 1 for IPv6.
func rangeFamily(a netip.Addr) int {
	if a.Is4() {
		return 0
	}
	return 1
}

// rangeRoom checks that the tries can hold r for a frontend of vip whose entries are
// now have, within Config.SourceRangeEntries.
func (d *Datapath) rangeRoom(vip netip.Addr, have []netip.Prefix, r sourceRanges) error {
	add, del := diffPrefixes(have, r.prefixes)
	fam := rangeFamily(vip)
	// Only growth is refused: adopted maps may hold more, left by an interrupted change.
	if used := d.rangeCount[fam]; len(add) > len(del) && used-len(del)+len(add) > d.cfg.SourceRangeEntries {
		return fmt.Errorf("source ranges: %d more prefixes do not fit, %d of the %d of the VIP's family are in use (raise Config.SourceRangeEntries)",
			len(add)-len(del), used, d.cfg.SourceRangeEntries)
	}
	return nil
}

// diffPrefixes returns the prefixes of want that have lacks and those of have that
// want lacks.
func diffPrefixes(have, want []netip.Prefix) (add, del []netip.Prefix) {
	for _, p := range want {
		if !slices.Contains(have, p) {
			add = append(add, p)
		}
	}
	for _, p := range have {
		if !slices.Contains(want, p) {
			del = append(del, p)
		}
	}
	return add, del
}

// A frontend's source ranges change around the switch of its service entry, which
// carries the flag and a new generation:
//
//  1. rangesBefore adds the new prefixes and, when the frontend stays restricted,
//     removes the old ones: a client both allow is never refused, and a new flow
//     checked while both were there took the old generation, so it is checked again;
//  2. the service entry switches (flag and generation);
//  3. rangesAfter removes what is left of the old prefixes: those of a frontend no
//     longer restricted, whose flag went first so that no client met an empty trie;
//  4. publishRangeGen gives the endpoints the new generation: each established flow
//     checks its client again on its next packet.
//
// have is the frontend's record of its trie entries, kept true to the map after each
// step, so that a step that fails is completed by the next SetServices.

func (d *Datapath) rangesBefore(id uint32, have *[]netip.Prefix, r sourceRanges) error {
	add, del := diffPrefixes(*have, r.prefixes)
	for _, p := range add {
		if err := d.putRange(id, p); err != nil {
			return err
		}
		*have = append(*have, p)
	}
	slices.SortFunc(*have, comparePrefixes)
	if !r.restricted {
		return nil
	}
	return d.dropRanges(id, have, del)
}

func (d *Datapath) rangesAfter(id uint32, have *[]netip.Prefix, r sourceRanges) error {
	_, del := diffPrefixes(*have, r.prefixes)
	return d.dropRanges(id, have, del)
}

func (d *Datapath) dropRanges(id uint32, have *[]netip.Prefix, del []netip.Prefix) error {
	var errs []error
	for _, p := range del {
		if err := d.deleteRange(id, p); err != nil {
			errs = append(errs, err)
			continue
		}
		*have = slices.DeleteFunc(*have, func(q netip.Prefix) bool { return q == p })
	}
	return errors.Join(errs...)
}

// publishRangeGen writes a's range generation into each of its endpoints.
func (d *Datapath) publishRangeGen(a *applied) error {
	for ap, id := range a.endpoints {
		v := endpointValue(a.endpointOf(ap), d.epGen[id], a.rangeGen)
		if err := d.objs.Endpoints.Put(id, &v); err != nil {
			return fmt.Errorf("write endpoint %s: %w", ap, err)
		}
	}
	return nil
}

func (d *Datapath) putRange(id uint32, p netip.Prefix) error {
	var err error
	if p.Addr().Is4() {
		k := range4Key(id, p)
		err = d.objs.SourceRanges4.Put(&k, uint32(1))
	} else {
		k := range6Key(id, p)
		err = d.objs.SourceRanges6.Put(&k, uint32(1))
	}
	if err != nil {
		return fmt.Errorf("write source range %s: %w", p, err)
	}
	d.rangeCount[rangeFamily(p.Addr())]++
	return nil
}

func (d *Datapath) deleteRange(id uint32, p netip.Prefix) error {
	var err error
	if p.Addr().Is4() {
		k := range4Key(id, p)
		err = d.objs.SourceRanges4.Delete(&k)
	} else {
		k := range6Key(id, p)
		err = d.objs.SourceRanges6.Delete(&k)
	}
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("remove source range %s: %w", p, err)
	}
	d.rangeCount[rangeFamily(p.Addr())]--
	return nil
}

// range4Key and range6Key are a service's prefix as its trie's key: the service id
// always matches whole (32 bits), then the prefix.
func range4Key(id uint32, p netip.Prefix) lbRange4Key {
	return lbRange4Key{Prefixlen: uint32(32 + p.Bits()), ServiceId: id, Addr: addrWords(p.Addr())[0]}
}

func range6Key(id uint32, p netip.Prefix) lbRange6Key {
	return lbRange6Key{Prefixlen: uint32(32 + p.Bits()), ServiceId: id, Addr: addrWords(p.Addr())}
}

// rangeOfKey is the inverse of range4Key and range6Key (addr holds the address words
// of the key's family); ok is false for a key Go never writes.
func rangeOfKey(prefixlen uint32, addr [4]uint32, fam uint8) (netip.Prefix, bool) {
	a, ok := addrOf(addr, fam)
	if !ok || prefixlen < 32 || int(prefixlen-32) > a.BitLen() {
		return netip.Prefix{}, false
	}
	p := netip.PrefixFrom(a, int(prefixlen-32))
	return p, p == p.Masked()
}
