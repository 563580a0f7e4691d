// Package config combines the flags with shardlb's configuration objects (IPPool,
// BGPPeer, BFDProfile, BGPAdvertisement) into the configuration one node applies, and
// says of every object whether it was accepted and why not. It is pure: objects and
// flags in, a Desired value and verdicts out.
//
// Rules, documented for users in the README:
//   - Flags and objects add up. --extBGPPeers peers and --cidrPools pools are kept,
//     as on every node; objects add peers and pools. An object that names the same
//     peer address or pool name as a flag is refused (Conflict): the flag wins, so a
//     cluster that works from flags cannot be broken by an object.
//   - Between objects, the first by name wins a conflict (two BGPPeers for one
//     address, IPPools that overlap); the others are refused with the winner named.
//   - A BGPPeer applies to the nodes that match any of its nodeSelectors (all nodes
//     without one). A BGPPeer naming a BFDProfile that does not exist or is refused
//     is refused itself (UnknownBFDProfile) until the profile is there.
//   - Overlapping BGPAdvertisements combine per pool and peer: communities and large
//     communities are unioned; per role the highest LOCAL_PREF and the lowest MED win.
//     Each advertisement's values, completed with the speaker's, are ordered (master
//     above successor above backup for LOCAL_PREF, the reverse for MED), and the
//     elementwise maximum (minimum) of ordered triples is ordered, so a combination
//     never makes a backup preferred over its master.
package config

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/shardlb/shardlb/api/v1alpha1"
	"github.com/shardlb/shardlb/ipam"
)

// Peer is one BGP router this node peers with.
type Peer struct {
	// Name is the BGPPeer's name; empty for a peer from --extBGPPeers.
	Name string
	Addr netip.Addr
	ASN  uint32
	// Port 0 is 179.
	Port       uint16
	SourceAddr netip.Addr
	// HoldTime and Keepalive: zero keeps the speaker's.
	HoldTime, Keepalive time.Duration
	EBGPMultiHop        bool
	// Password is the TCP MD5 password, from the Secret the BGPPeer names.
	Password string
	// BFD: nil keeps the speaker's (--bgpBFD).
	BFD *BFD
}

// BFD is a BFD profile's timers.
type BFD struct {
	Name              string
	Receive, Transmit time.Duration
	DetectMultiplier  uint8
}

// Pool is one named VIP pool: one or more ranges (one PoolSpec each, all with the
// pool's name).
type Pool struct {
	// Name is the IPPool's (or the flag's) pool name.
	Name string
	// FromFlag is true for --cidrPools/--cidr6Pools pools.
	FromFlag   bool
	Ranges     []ipam.PoolSpec
	AutoAssign bool
	Priority   int32
	Labels     map[string]string
	// Namespaces, NamespaceSelectors and ServiceSelectors are the IPPool's
	// serviceAllocation: which services may use the pool (see Admits).
	Namespaces         []string
	NamespaceSelectors []metav1.LabelSelector
	ServiceSelectors   []metav1.LabelSelector
}

// Restricted reports whether the pool serves only some services.
func (p Pool) Restricted() bool {
	return len(p.Namespaces) > 0 || len(p.NamespaceSelectors) > 0 || len(p.ServiceSelectors) > 0
}

// Admits reports whether a service in namespace ns (whose labels are nsLabels) with
// labels svcLabels may use the pool, as MetalLB's serviceAllocation: its namespace is
// listed or matches a namespace selector, when either is given, and its labels match
// a service selector, when one is given.
func (p Pool) Admits(ns string, nsLabels, svcLabels map[string]string) bool {
	if len(p.Namespaces) > 0 || len(p.NamespaceSelectors) > 0 {
		if !slices.Contains(p.Namespaces, ns) && (len(p.NamespaceSelectors) == 0 || !matchesAny(p.NamespaceSelectors, nsLabels)) {
			return false
		}
	}
	return matchesAny(p.ServiceSelectors, svcLabels)
}

// Attrs are the attributes of one role.
type Attrs struct {
	LocalPref, MED uint32
}

// RoleAttrs are the route attributes by role for one pool toward one peer.
type RoleAttrs struct {
	Master, Successor, Backup Attrs
	// Communities and LargeCommunities are sorted and without duplicates.
	Communities      []string
	LargeCommunities []string
}

// Defaults are the speaker's attributes by role (from the flags).
type Defaults struct {
	Master, Successor, Backup Attrs
}

// Flags is the part of the flags the objects add to.
type Flags struct {
	Peers    []Peer
	Pools    []ipam.PoolSpec
	Defaults Defaults
}

// Objects are the configuration objects as read from the API.
type Objects struct {
	Pools          []v1alpha1.IPPool
	Peers          []v1alpha1.BGPPeer
	BFDProfiles    []v1alpha1.BFDProfile
	Advertisements []v1alpha1.BGPAdvertisement
	// Passwords are the "password" keys of the kubernetes.io/basic-auth Secrets in
	// Namespace, by Secret name.
	Passwords map[string]string
	// Namespace is shardlb's own: the only one whose Secrets it reads.
	Namespace string
	// NoSecretAccess says shardlb may not read Secrets there (RBAC): peers with a
	// passwordSecret are refused with that reason.
	NoSecretAccess bool
}

// Node is the node the configuration is for.
type Node struct {
	Name   string
	Labels map[string]string
}

// Desired is what one node applies.
type Desired struct {
	// Peers of this node, sorted by address.
	Peers []Peer
	// Pools of the cluster, sorted by name: flags' first, in flag order, then objects'.
	Pools []Pool
	// Advertisements are the combined attributes per pool name and peer address;
	// a pool or peer absent from it gets the Defaults and no community.
	Advertisements map[PoolPeer]RoleAttrs
	// PoolCommunities are, per pool name, the communities of the advertisements that
	// apply to every peer and set nothing else (see Unapplied): what the speaker
	// announces today. Unioned, sorted, without repeats.
	PoolCommunities map[string]Communities
}

// Communities are standard and large communities.
type Communities struct {
	Communities, LargeCommunities []string
}

// PoolPeer keys Desired.Advertisements.
type PoolPeer struct {
	Pool string
	Peer netip.Addr
}

// Kind names an object kind in a Verdict.
type Kind string

const (
	KindIPPool           Kind = "IPPool"
	KindBGPPeer          Kind = "BGPPeer"
	KindBFDProfile       Kind = "BFDProfile"
	KindBGPAdvertisement Kind = "BGPAdvertisement"
)

// Verdict says whether one object is accepted. Reason is a CamelCase constant of
// package v1alpha1; Message is for people.
type Verdict struct {
	Kind       Kind
	Name       string
	Generation int64
	Accepted   bool
	Reason     string
	Message    string
}

// Attributes returns the attributes for a VIP of pool toward peer.
func (d Desired) Attributes(defaults Defaults, pool string, peer netip.Addr) RoleAttrs {
	if a, ok := d.Advertisements[PoolPeer{pool, peer}]; ok {
		return a
	}
	return RoleAttrs{Master: defaults.Master, Successor: defaults.Successor, Backup: defaults.Backup}
}

// Build validates objs, combines them with flags and returns what node applies, and a
// verdict for every object (sorted by kind and name). It is deterministic: every
// node gets the same verdicts and the same pools.
func Build(flags Flags, objs Objects, node Node) (Desired, []Verdict) {
	b := builder{flags: flags}
	b.profiles(objs.BFDProfiles)
	b.pools(objs.Pools)
	b.objs = objs
	b.peers(objs.Peers, node)
	b.advertisements(objs.Advertisements)
	slices.SortFunc(b.verdicts, func(x, y Verdict) int {
		return cmp.Or(cmp.Compare(x.Kind, y.Kind), cmp.Compare(x.Name, y.Name))
	})
	slices.SortFunc(b.desired.Peers, func(x, y Peer) int { return x.Addr.Compare(y.Addr) })
	return b.desired, b.verdicts
}

type builder struct {
	flags    Flags
	objs     Objects
	desired  Desired
	verdicts []Verdict
	bfd      map[string]BFD
	// allPeers are the accepted peers of every node, by name, for advertisements.
	allPeers map[string]netip.Addr
	// nodePeers are this node's peer addresses.
	nodePeers []netip.Addr
}

func (b *builder) verdict(k Kind, meta metav1.ObjectMeta, err error, reason string) {
	v := Verdict{Kind: k, Name: meta.Name, Generation: meta.Generation, Accepted: err == nil, Reason: v1alpha1.ReasonAccepted}
	if err != nil {
		v.Reason, v.Message = reason, err.Error()
	}
	b.verdicts = append(b.verdicts, v)
}

func byName[T any](items []T, name func(*T) string) []*T {
	out := make([]*T, len(items))
	for i := range items {
		out[i] = &items[i]
	}
	slices.SortFunc(out, func(x, y *T) int { return cmp.Compare(name(x), name(y)) })
	return out
}

func (b *builder) profiles(ps []v1alpha1.BFDProfile) {
	b.bfd = make(map[string]BFD)
	for _, p := range byName(ps, func(p *v1alpha1.BFDProfile) string { return p.Name }) {
		f, err := ParseBFDProfile(p)
		if err == nil {
			b.bfd[p.Name] = f
		}
		b.verdict(KindBFDProfile, p.ObjectMeta, err, v1alpha1.ReasonInvalid)
	}
}

// ParseBFDProfile checks a profile and fills in the schema's defaults (300 ms x 3),
// so that an object written before the schema had them means the same.
func ParseBFDProfile(p *v1alpha1.BFDProfile) (BFD, error) {
	val := func(v *uint32, def uint32) uint32 {
		if v == nil {
			return def
		}
		return *v
	}
	rx, tx, m := val(p.Spec.ReceiveInterval, 300), val(p.Spec.TransmitInterval, 300), val(p.Spec.DetectMultiplier, 3)
	switch {
	case rx < 10 || rx > 60000:
		return BFD{}, fmt.Errorf("receiveInterval %d ms: want 10 to 60000", rx)
	case tx < 10 || tx > 60000:
		return BFD{}, fmt.Errorf("transmitInterval %d ms: want 10 to 60000", tx)
	case m < 2 || m > 255:
		return BFD{}, fmt.Errorf("detectMultiplier %d: want 2 to 255", m)
	case p.Spec.EchoMode != nil && *p.Spec.EchoMode:
		return BFD{}, fmt.Errorf("echoMode: not supported, the speaker's BFD has no echo function")
	}
	return BFD{Name: p.Name, Receive: time.Duration(rx) * time.Millisecond, Transmit: time.Duration(tx) * time.Millisecond, DetectMultiplier: uint8(m)}, nil
}

func (b *builder) pools(ps []v1alpha1.IPPool) {
	// Flag pools come first and always stay.
	var taken []ipam.PoolSpec
	flagNames := make(map[string]bool)
	for _, s := range b.flags.Pools {
		if i := slices.IndexFunc(b.desired.Pools, func(p Pool) bool { return p.Name == s.Name }); i >= 0 {
			b.desired.Pools[i].Ranges = append(b.desired.Pools[i].Ranges, s)
		} else {
			b.desired.Pools = append(b.desired.Pools, Pool{Name: s.Name, FromFlag: true, Ranges: []ipam.PoolSpec{s}, AutoAssign: true})
		}
		flagNames[s.Name] = true
		taken = append(taken, s)
	}
	owner := make(map[ipam.PoolSpec]string) // range -> pool object name, for messages
	for _, p := range byName(ps, func(p *v1alpha1.IPPool) string { return p.Name }) {
		if flagNames[p.Name] {
			b.verdict(KindIPPool, p.ObjectMeta, fmt.Errorf("a pool named %q is set by --cidrPools/--cidr6Pools, which wins", p.Name), v1alpha1.ReasonConflict)
			continue
		}
		ranges, err := ParsePoolAddresses(p.Name, p.Spec.Addresses)
		if err != nil {
			b.verdict(KindIPPool, p.ObjectMeta, err, v1alpha1.ReasonInvalid)
			continue
		}
		if other, ok := overlap(ranges, taken); ok {
			by := "--cidrPools/--cidr6Pools"
			if n, ok := owner[other]; ok {
				by = "IPPool " + n
			}
			b.verdict(KindIPPool, p.ObjectMeta, fmt.Errorf("addresses overlap %s-%s of %s", other.First, other.Last, by), v1alpha1.ReasonConflict)
			continue
		}
		if a := p.Spec.ServiceAllocation; a != nil {
			if err := checkSelectors("serviceAllocation.namespaceSelectors", a.NamespaceSelectors); err != nil {
				b.verdict(KindIPPool, p.ObjectMeta, err, v1alpha1.ReasonInvalid)
				continue
			}
			if err := checkSelectors("serviceAllocation.serviceSelectors", a.ServiceSelectors); err != nil {
				b.verdict(KindIPPool, p.ObjectMeta, err, v1alpha1.ReasonInvalid)
				continue
			}
		}
		for _, r := range ranges {
			owner[r] = p.Name
		}
		taken = append(taken, ranges...)
		pool := Pool{Name: p.Name, Ranges: ranges, AutoAssign: p.Spec.AutoAssign == nil || *p.Spec.AutoAssign, Labels: p.Labels}
		if a := p.Spec.ServiceAllocation; a != nil {
			pool.Priority = a.Priority
			pool.Namespaces, pool.NamespaceSelectors, pool.ServiceSelectors = a.Namespaces, a.NamespaceSelectors, a.ServiceSelectors
		}
		b.desired.Pools = append(b.desired.Pools, pool)
		b.verdict(KindIPPool, p.ObjectMeta, nil, "")
	}
}

// ParsePoolAddresses reads an IPPool's addresses, in the syntax of --cidrPools
// without the name, into one range each; the ranges must not overlap.
func ParsePoolAddresses(name string, addrs []string) ([]ipam.PoolSpec, error) {
	if len(addrs) == 0 {
		return nil, fmt.Errorf("addresses: none")
	}
	var out []ipam.PoolSpec
	for _, a := range addrs {
		ps, err := ipam.ParsePools(name + "=" + strings.TrimSpace(a))
		if err != nil || len(ps) != 1 {
			if err == nil {
				err = fmt.Errorf("want one CIDR or range")
			}
			return nil, fmt.Errorf("address %q: %w", a, err)
		}
		if other, ok := overlap(ps, out); ok {
			return nil, fmt.Errorf("address %q overlaps %s-%s of the same pool", a, other.First, other.Last)
		}
		out = append(out, ps[0])
	}
	return out, nil
}

// overlap returns a range of taken that one of rs overlaps.
func overlap(rs, taken []ipam.PoolSpec) (ipam.PoolSpec, bool) {
	for _, r := range rs {
		for _, t := range taken {
			if r.First.Is4() == t.First.Is4() && !r.Last.Less(t.First) && !t.Last.Less(r.First) {
				return t, true
			}
		}
	}
	return ipam.PoolSpec{}, false
}

func checkSelectors(field string, sels []metav1.LabelSelector) error {
	for i := range sels {
		if _, err := metav1.LabelSelectorAsSelector(&sels[i]); err != nil {
			return fmt.Errorf("%s[%d]: %w", field, i, err)
		}
	}
	return nil
}

// matchesAny reports whether set matches any selector; no selector matches all.
func matchesAny(sels []metav1.LabelSelector, set map[string]string) bool {
	if len(sels) == 0 {
		return true
	}
	for i := range sels {
		s, err := metav1.LabelSelectorAsSelector(&sels[i])
		if err == nil && s.Matches(labels.Set(set)) {
			return true
		}
	}
	return false
}

func (b *builder) peers(ps []v1alpha1.BGPPeer, node Node) {
	b.allPeers = make(map[string]netip.Addr)
	flagPeers := make(map[netip.Addr]bool)
	for _, p := range b.flags.Peers {
		flagPeers[p.Addr] = true
		b.desired.Peers = append(b.desired.Peers, p)
		b.nodePeers = append(b.nodePeers, p.Addr)
	}
	owner := make(map[netip.Addr]string)
	for _, o := range byName(ps, func(p *v1alpha1.BGPPeer) string { return p.Name }) {
		p, reason, err := b.parsePeer(o)
		if err == nil && flagPeers[p.Addr] {
			reason, err = v1alpha1.ReasonConflict, fmt.Errorf("peer %v is set by --extBGPPeers, which wins", p.Addr)
		}
		if err == nil && owner[p.Addr] != "" {
			reason, err = v1alpha1.ReasonConflict, fmt.Errorf("peer %v is already BGPPeer %s", p.Addr, owner[p.Addr])
		}
		b.verdict(KindBGPPeer, o.ObjectMeta, err, reason)
		if err != nil {
			continue
		}
		owner[p.Addr] = o.Name
		b.allPeers[o.Name] = p.Addr
		if matchesAny(o.Spec.NodeSelectors, node.Labels) {
			b.desired.Peers = append(b.desired.Peers, p)
			b.nodePeers = append(b.nodePeers, p.Addr)
		}
	}
}

func (b *builder) parsePeer(o *v1alpha1.BGPPeer) (Peer, string, error) {
	s := o.Spec
	p := Peer{Name: o.Name, ASN: s.PeerASN, Port: s.PeerPort, EBGPMultiHop: s.EBGPMultiHop}
	var err error
	if p.Addr, err = netip.ParseAddr(s.PeerAddress); err != nil || p.Addr.Zone() != "" || p.Addr.Is4In6() {
		return Peer{}, v1alpha1.ReasonInvalid, fmt.Errorf("peerAddress %q: not an IPv4 or IPv6 address", s.PeerAddress)
	}
	if _, err := ParseASN(strconv.FormatUint(uint64(s.PeerASN), 10)); err != nil {
		return Peer{}, v1alpha1.ReasonInvalid, fmt.Errorf("peerASN: %w", err)
	}
	if s.SourceAddress != "" {
		if p.SourceAddr, err = netip.ParseAddr(s.SourceAddress); err != nil || p.SourceAddr.Is4() != p.Addr.Is4() {
			return Peer{}, v1alpha1.ReasonInvalid, fmt.Errorf("sourceAddress %q: not an address of the peer's family", s.SourceAddress)
		}
	}
	if s.HoldTime != nil {
		p.HoldTime = s.HoldTime.Duration
		if p.HoldTime < 3*time.Second || p.HoldTime%time.Second != 0 {
			return Peer{}, v1alpha1.ReasonInvalid, fmt.Errorf("holdTime %v: want whole seconds, at least 3s", p.HoldTime)
		}
	}
	if s.KeepaliveTime != nil {
		p.Keepalive = s.KeepaliveTime.Duration
		if p.Keepalive < time.Second || p.Keepalive%time.Second != 0 {
			return Peer{}, v1alpha1.ReasonInvalid, fmt.Errorf("keepaliveTime %v: want whole seconds, at least 1s", p.Keepalive)
		}
	}
	if p.HoldTime != 0 && p.Keepalive != 0 && p.Keepalive >= p.HoldTime {
		return Peer{}, v1alpha1.ReasonInvalid, fmt.Errorf("keepaliveTime %v: must be below holdTime %v", p.Keepalive, p.HoldTime)
	}
	if err := checkSelectors("nodeSelectors", s.NodeSelectors); err != nil {
		return Peer{}, v1alpha1.ReasonInvalid, err
	}
	if ref := s.PasswordSecret; ref != nil {
		if ref.Namespace != "" && ref.Namespace != b.objs.Namespace {
			return Peer{}, v1alpha1.ReasonInvalid, fmt.Errorf("passwordSecret %s/%s: must be in shardlb's namespace %s", ref.Namespace, ref.Name, b.objs.Namespace)
		}
		if b.objs.NoSecretAccess {
			return Peer{}, v1alpha1.ReasonSecretNotFound, fmt.Errorf("passwordSecret %s: shardlb may not read Secrets in %s; grant list and watch on secrets there (README, BGP passwords)", ref.Name, b.objs.Namespace)
		}
		pw, ok := b.objs.Passwords[ref.Name]
		if !ok {
			return Peer{}, v1alpha1.ReasonSecretNotFound, fmt.Errorf("passwordSecret %s: no Secret of type kubernetes.io/basic-auth with a password key in %s", ref.Name, b.objs.Namespace)
		}
		if pw == "" || strings.ContainsAny(pw, " \t\r\n") {
			return Peer{}, v1alpha1.ReasonInvalid, fmt.Errorf("passwordSecret %s: the password is empty or holds whitespace", ref.Name)
		}
		p.Password = pw
	}
	if s.BFDProfile != "" {
		f, ok := b.bfd[s.BFDProfile]
		if !ok {
			return Peer{}, v1alpha1.ReasonUnknownProfile, fmt.Errorf("bfdProfile %q: no accepted BFDProfile of that name", s.BFDProfile)
		}
		p.BFD = &f
	}
	return p, "", nil
}

// ParseASN checks an AS number: 1 to 4294967294 but 23456 (AS_TRANS).
func ParseASN(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	switch {
	case err != nil:
		return 0, fmt.Errorf("AS number %q: not a number of 1-4294967294", s)
	case n == 0 || n == 1<<32-1:
		return 0, fmt.Errorf("AS number %d is reserved", n)
	case n == 23456:
		return 0, fmt.Errorf("AS number 23456 is AS_TRANS, reserved")
	}
	return uint32(n), nil
}
