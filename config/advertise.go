package config

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/shardlb/shardlb/api/v1alpha1"
)

// ReasonUnknownReference refuses an advertisement naming a pool or peer that is not
// there (or not accepted); it is accepted once they are.
const ReasonUnknownReference = "UnknownReference"

// advertisement is one accepted BGPAdvertisement, resolved.
type advertisement struct {
	pools []string // pool names it applies to
	peers []netip.Addr
	attrs RoleAttrs
	// applied: Unapplied says nothing of it.
	applied bool
}

// Unapplied says what of an advertisement the speaker does not announce yet ("": it
// announces all of it). The speaker announces one route per VIP to every peer, with
// the role's LOCAL_PREF keying the eBGP prepend, so per-peer attributes and LOCAL_PREF
// or MED by advertisement wait for per-peer export policies; communities are announced.
func Unapplied(s v1alpha1.BGPAdvertisementSpec) string {
	var fields []string
	if len(s.Peers) > 0 {
		fields = append(fields, "peers")
	}
	if s.LocalPref != nil {
		fields = append(fields, "localPref")
	}
	if s.MED != nil {
		fields = append(fields, "med")
	}
	if len(fields) == 0 {
		return ""
	}
	return fmt.Sprintf("valid, but %s not announced yet: only communities for every peer are; nothing of this advertisement is applied", strings.Join(fields, ", "))
}

func (b *builder) advertisements(as []v1alpha1.BGPAdvertisement) {
	var accepted []advertisement
	for _, o := range byName(as, func(a *v1alpha1.BGPAdvertisement) string { return a.Name }) {
		a, reason, err := b.parseAdvertisement(o)
		b.verdict(KindBGPAdvertisement, o.ObjectMeta, err, reason)
		if err == nil {
			a.applied = Unapplied(o.Spec) == ""
			accepted = append(accepted, a)
		}
	}
	if len(accepted) == 0 {
		return
	}
	b.desired.PoolCommunities = make(map[string]Communities)
	for _, a := range accepted {
		if !a.applied {
			continue
		}
		for _, pool := range a.pools {
			cur := b.desired.PoolCommunities[pool]
			b.desired.PoolCommunities[pool] = Communities{
				Communities:      union(cur.Communities, a.attrs.Communities),
				LargeCommunities: union(cur.LargeCommunities, a.attrs.LargeCommunities),
			}
		}
	}
	b.desired.Advertisements = make(map[PoolPeer]RoleAttrs)
	for _, a := range accepted {
		for _, pool := range a.pools {
			for _, peer := range a.peers {
				if !slices.Contains(b.nodePeers, peer) {
					continue
				}
				k := PoolPeer{pool, peer}
				if cur, ok := b.desired.Advertisements[k]; ok {
					b.desired.Advertisements[k] = combine(cur, a.attrs)
				} else {
					b.desired.Advertisements[k] = a.attrs
				}
			}
		}
	}
}

// combine merges two advertisements' attributes for one pool and peer (rules in the
// package doc).
func combine(x, y RoleAttrs) RoleAttrs {
	pick := func(a, b Attrs) Attrs { return Attrs{LocalPref: max(a.LocalPref, b.LocalPref), MED: min(a.MED, b.MED)} }
	return RoleAttrs{
		Master:           pick(x.Master, y.Master),
		Successor:        pick(x.Successor, y.Successor),
		Backup:           pick(x.Backup, y.Backup),
		Communities:      union(x.Communities, y.Communities),
		LargeCommunities: union(x.LargeCommunities, y.LargeCommunities),
	}
}

func union(a, b []string) []string {
	out := append(slices.Clone(a), b...)
	slices.Sort(out)
	return slices.Compact(out)
}

func (b *builder) parseAdvertisement(o *v1alpha1.BGPAdvertisement) (advertisement, string, error) {
	s := o.Spec
	var a advertisement
	if err := checkSelectors("ipPoolSelectors", s.IPPoolSelectors); err != nil {
		return a, v1alpha1.ReasonInvalid, err
	}
	for _, c := range s.Communities {
		if _, err := ParseCommunity(c); err != nil {
			return a, v1alpha1.ReasonInvalid, err
		}
	}
	for _, c := range s.LargeCommunities {
		if _, err := ParseLargeCommunity(c); err != nil {
			return a, v1alpha1.ReasonInvalid, err
		}
	}
	a.attrs.Communities = union(nil, normalizeCommunities(s.Communities))
	a.attrs.LargeCommunities = union(nil, s.LargeCommunities)

	d := b.flags.Defaults
	a.attrs.Master, a.attrs.Successor, a.attrs.Backup = d.Master, d.Successor, d.Backup
	set := func(dst *uint32, v *uint32) {
		if v != nil {
			*dst = *v
		}
	}
	if lp := s.LocalPref; lp != nil {
		set(&a.attrs.Master.LocalPref, lp.Master)
		set(&a.attrs.Successor.LocalPref, lp.Successor)
		set(&a.attrs.Backup.LocalPref, lp.Backup)
	}
	if med := s.MED; med != nil {
		set(&a.attrs.Master.MED, med.Master)
		set(&a.attrs.Successor.MED, med.Successor)
		set(&a.attrs.Backup.MED, med.Backup)
	}
	m, sc, bk := a.attrs.Master, a.attrs.Successor, a.attrs.Backup
	// The flags' own values are checked where they are parsed; an advertisement that
	// sets none keeps them as they are.
	if s.LocalPref != nil && !(m.LocalPref > sc.LocalPref && sc.LocalPref > bk.LocalPref) {
		return a, v1alpha1.ReasonInvalid, fmt.Errorf("localPref master %d, successor %d, backup %d (unset ones are the speaker's): want master > successor > backup", m.LocalPref, sc.LocalPref, bk.LocalPref)
	}
	if s.MED != nil && !(m.MED <= sc.MED && sc.MED <= bk.MED) {
		return a, v1alpha1.ReasonInvalid, fmt.Errorf("med master %d, successor %d, backup %d (unset ones are the speaker's): want master <= successor <= backup", m.MED, sc.MED, bk.MED)
	}

	for _, name := range s.IPPools {
		if !slices.ContainsFunc(b.desired.Pools, func(p Pool) bool { return p.Name == name }) {
			return a, ReasonUnknownReference, fmt.Errorf("ipPools: no accepted pool %q", name)
		}
		a.pools = append(a.pools, name)
	}
	if len(s.IPPoolSelectors) > 0 {
		for _, p := range b.desired.Pools {
			if !p.FromFlag && matchesAny(s.IPPoolSelectors, p.Labels) {
				a.pools = append(a.pools, p.Name)
			}
		}
	}
	if len(s.IPPools) == 0 && len(s.IPPoolSelectors) == 0 {
		for _, p := range b.desired.Pools {
			a.pools = append(a.pools, p.Name)
		}
	}
	slices.Sort(a.pools)
	a.pools = slices.Compact(a.pools)

	for _, name := range s.Peers {
		addr, ok := b.allPeers[name]
		if !ok {
			return a, ReasonUnknownReference, fmt.Errorf("peers: no accepted BGPPeer %q", name)
		}
		a.peers = append(a.peers, addr)
	}
	if len(s.Peers) == 0 {
		a.peers = slices.Clone(b.nodePeers)
	}
	return a, "", nil
}

var wellKnown = map[string]uint32{
	"no-export":           0xFFFFFF01,
	"no-advertise":        0xFFFFFF02,
	"no-export-subconfed": 0xFFFFFF03,
	"blackhole":           0xFFFF029A,
}

// ParseCommunity reads "ASN:VALUE" (16 bits each) or a well-known name.
func ParseCommunity(s string) (uint32, error) {
	if v, ok := wellKnown[strings.ToLower(s)]; ok {
		return v, nil
	}
	hi, lo, ok := strings.Cut(s, ":")
	h, err1 := strconv.ParseUint(hi, 10, 16)
	l, err2 := strconv.ParseUint(lo, 10, 16)
	if !ok || err1 != nil || err2 != nil {
		return 0, fmt.Errorf("community %q: want ASN:VALUE (0-65535 each) or no-export, no-advertise, no-export-subconfed, blackhole", s)
	}
	return uint32(h)<<16 | uint32(l), nil
}

// ParseLargeCommunity reads "ASN:DATA1:DATA2" (32 bits each, RFC 8092).
func ParseLargeCommunity(s string) ([3]uint32, error) {
	parts := strings.Split(s, ":")
	var out [3]uint32
	if len(parts) != 3 {
		return out, fmt.Errorf("large community %q: want ASN:DATA1:DATA2", s)
	}
	for i, p := range parts {
		v, err := strconv.ParseUint(p, 10, 32)
		if err != nil {
			return out, fmt.Errorf("large community %q: %q is not a number of 0-4294967295", s, p)
		}
		out[i] = uint32(v)
	}
	return out, nil
}

// normalizeCommunities writes well-known names in lower case, so that a union does
// not keep NO-EXPORT and no-export apart.
func normalizeCommunities(cs []string) []string {
	out := make([]string, len(cs))
	for i, c := range cs {
		if _, ok := wellKnown[strings.ToLower(c)]; ok {
			c = strings.ToLower(c)
		}
		out[i] = c
	}
	return out
}
