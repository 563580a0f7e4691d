package bgp

import (
	"net/netip"
	"slices"

	"github.com/shardlb/shardlb/shard"
)

// attrs are the path attributes of one announcement, before per-peer rewriting:
// LOCAL_PREF only reaches iBGP peers, and the backup prepend toward eBGP peers is
// applied by the export policy that matches the backup's LOCAL_PREF.
type attrs struct {
	LocalPref   uint32
	MED         uint32
	Communities []uint32
	// LargeCommunities are ASN, DATA1, DATA2 each.
	LargeCommunities [][3]uint32
	NextHop          netip.Addr
}

// equal reports whether two announcements carry the same attributes.
func (a attrs) equal(b attrs) bool {
	return a.LocalPref == b.LocalPref && a.MED == b.MED && a.NextHop == b.NextHop &&
		slices.Equal(a.Communities, b.Communities) && slices.Equal(a.LargeCommunities, b.LargeCommunities)
}

// route is one prefix to announce with its attributes.
type route struct {
	Prefix netip.Prefix
	Attrs  attrs
}

// attrsFor maps an advertisement's role to the attributes of DESIGN.md's table; a
// backup that is its instance's successor gets the successor's.
func (c *Config) attrsFor(prefix netip.Prefix, role shard.Role, successor bool, communities []uint32) attrs {
	a := attrs{LocalPref: c.LocalPrefMaster, MED: c.MEDMaster, Communities: communities}
	if role == shard.RoleBackup {
		a.LocalPref, a.MED = c.LocalPrefBackup, c.MEDBackup
		if successor {
			a.LocalPref, a.MED = c.LocalPrefSuccessor, c.MEDSuccessor
		}
	}
	switch {
	case prefix.Addr().Is4() && c.NextHop4.IsValid():
		a.NextHop = c.NextHop4
	case prefix.Addr().Is4():
		a.NextHop = netip.IPv4Unspecified()
	case c.NextHop6.IsValid():
		a.NextHop = c.NextHop6
	default:
		a.NextHop = netip.IPv6Unspecified()
	}
	return a
}
