package shard

import (
	"maps"
	"net/netip"
	"slices"
)

// Planner keeps one node's Plan up to date as services change, at a cost in proportion
// to the change rather than to the number of services: it gives, at every step, exactly
// what BuildPlan gives for the same services and masters (property-tested), so
// BuildPlan is its reference.
//
// It holds each service's contribution (its frontends, sorted) and, per VIP, the
// services on it (sorted keys: the smallest decides the instance), how many of them
// have a ready endpoint of its family, and the handoff address its frontends carry.
// Update and Remove change one service's contribution and mark it and its VIPs dirty;
// SetMasters marks dirty the VIPs of the instances whose role or handoff on this node
// changed (a scan of the VIPs, as rare as a master change). Plan then recomputes only
// what is dirty: a dirty VIP whose handoff address changed (its deciding service
// changed instance, or its instance's handoff did) marks every service on it dirty,
// since their frontends carry it. The Plan's two sorted slices are patched in place: a
// changed entry is overwritten where binary search finds it, and only an entry added or
// removed moves the ones after it; nothing is re-sorted or compared whole.
type Planner struct {
	node  string
	roles bool

	masters    map[string]string
	handoffs   map[string][]netip.Addr
	successors map[string]string
	announce   map[string]bool // nil: every instance

	services map[string]*planned
	vips     map[netip.Addr]*vipState

	dirtyServices map[string]struct{}
	dirtyVIPs     map[netip.Addr]struct{}

	plan Plan // as last returned
}

// planned is one service's contribution.
type planned struct {
	instance string
	vips     []netip.Addr // distinct, valid, unmapped
	ready    []bool       // per VIP of vips: a port has an endpoint of its family
	// frontends as BuildPlan makes them, sorted, without Handoff (a VIP's, set by Plan).
	frontends []Frontend
	published []Frontend // as in the last Plan
	removed   bool       // by Remove; forgotten by the next Plan
}

// vipState is what decides one VIP's advertisement and handoff.
type vipState struct {
	keys  []string // services on the VIP, sorted: keys[0] decides the instance
	ready int      // how many of them have a ready endpoint of its family
	// As in the last Plan: the instance (of keys[0] then), the frontends' Handoff and
	// the advertisement, if any.
	instance   string
	handoff    netip.Addr
	adv        Advertisement
	advertised bool
}

// Delta is what one Planner.Plan call changed since the previous one: the entries
// removed (as they were) and added (as they are now); a changed entry is in both.
type Delta struct {
	RemovedFrontends, AddedFrontends           []Frontend
	RemovedAdvertisements, AddedAdvertisements []Advertisement
}

// Frontends reports whether the Plan's frontends changed.
func (d Delta) Frontends() bool { return len(d.RemovedFrontends)+len(d.AddedFrontends) > 0 }

// Advertisements reports whether the Plan's advertisements changed.
func (d Delta) Advertisements() bool {
	return len(d.RemovedAdvertisements)+len(d.AddedAdvertisements) > 0
}

// NewPlanner is a Planner for node with no services and no masters; roles is
// Input.Roles.
func NewPlanner(node string, roles bool) *Planner {
	return &Planner{
		node: node, roles: roles,
		services:      map[string]*planned{},
		vips:          map[netip.Addr]*vipState{},
		dirtyServices: map[string]struct{}{},
		dirtyVIPs:     map[netip.Addr]struct{}{},
	}
}

// Update adds the service s or replaces the one with its key. The Planner keeps no
// reference to s.
func (p *Planner) Update(s Service) {
	e := p.services[s.Key]
	if e == nil {
		e = &planned{}
		p.services[s.Key] = e
	} else if !e.removed {
		p.leave(s.Key, e)
	}
	e.instance, e.removed = s.Instance, false
	e.vips, e.ready = nil, nil
	e.frontends = nil
	ranges := sourceRanges(s.SourceRanges)
	for _, vip := range s.VIPs {
		if !vip.IsValid() {
			continue
		}
		vip = vip.Unmap()
		j := slices.Index(e.vips, vip)
		if j < 0 {
			j = len(e.vips)
			e.vips, e.ready = append(e.vips, vip), append(e.ready, false)
		}
		// As BuildPlan: a VIP listed twice gives its frontends twice.
		for _, sp := range s.Ports {
			eps := endpointsOf(vip, sp.Endpoints)
			e.ready[j] = e.ready[j] || len(eps) > 0
			e.frontends = append(e.frontends, Frontend{
				Service: s.Key, VIP: vip, Port: sp.Port, Protocol: sp.Protocol,
				Mode: s.Mode, Select: s.Select, Endpoints: eps, SourceRanges: ranges,
			})
		}
	}
	slices.SortFunc(e.frontends, compareFrontend)
	for j, vip := range e.vips {
		v := p.vips[vip]
		if v == nil {
			v = &vipState{}
			p.vips[vip] = v
		}
		i, _ := slices.BinarySearch(v.keys, s.Key)
		v.keys = slices.Insert(v.keys, i, s.Key)
		if e.ready[j] {
			v.ready++
		}
		p.dirtyVIPs[vip] = struct{}{}
	}
	p.dirtyServices[s.Key] = struct{}{}
}

// Remove forgets the service with key; an unknown key is ignored.
func (p *Planner) Remove(key string) {
	e := p.services[key]
	if e == nil || e.removed {
		return
	}
	p.leave(key, e)
	e.removed = true
	p.dirtyServices[key] = struct{}{}
}

// leave takes the service key off its VIPs.
func (p *Planner) leave(key string, e *planned) {
	for j, vip := range e.vips {
		v := p.vips[vip]
		if i, ok := slices.BinarySearch(v.keys, key); ok {
			v.keys = slices.Delete(v.keys, i, i+1)
		}
		if e.ready[j] {
			v.ready--
		}
		p.dirtyVIPs[vip] = struct{}{}
	}
}

// SetMasters sets Input.Masters and Input.Handoffs. A call that changes no role or
// handoff on this node costs nothing more than the comparison; otherwise the VIPs are
// scanned for those of the instances that changed, which the next Plan recomputes.
// The Planner keeps no reference to either map.
func (p *Planner) SetMasters(masters map[string]string, handoffs map[string][]netip.Addr) {
	changed := map[string]bool{}
	for _, m := range []map[string]string{p.masters, masters} {
		for inst := range m {
			if p.masterOf(p.masters, inst) != p.masterOf(masters, inst) {
				changed[inst] = true
			}
		}
	}
	for _, h := range []map[string][]netip.Addr{p.handoffs, handoffs} {
		for inst := range h {
			for _, is4 := range []bool{true, false} {
				if p.handoffOf(p.masters, p.handoffs, inst, is4) != p.handoffOf(masters, handoffs, inst, is4) {
					changed[inst] = true
				}
			}
		}
	}
	p.masters, p.handoffs = maps.Clone(masters), maps.Clone(handoffs)
	for inst, addrs := range p.handoffs {
		p.handoffs[inst] = slices.Clone(addrs)
	}
	if len(changed) == 0 {
		return
	}
	// A VIP whose instance changed since the last Plan is dirty already.
	for vip, v := range p.vips {
		if changed[v.instance] {
			p.dirtyVIPs[vip] = struct{}{}
		}
	}
}

// SetSuccessors sets Input.Successors; like SetMasters, only the instances whose
// successor flag on this node changed are replanned.
func (p *Planner) SetSuccessors(successors map[string]string) {
	changed := map[string]bool{}
	for _, m := range []map[string]string{p.successors, successors} {
		for inst := range m {
			if (p.successors[inst] == p.node) != (successors[inst] == p.node) {
				changed[inst] = true
			}
		}
	}
	p.successors = maps.Clone(successors)
	if len(changed) == 0 {
		return
	}
	for vip, v := range p.vips {
		if changed[v.instance] {
			p.dirtyVIPs[vip] = struct{}{}
		}
	}
}

// SetAnnounce sets Input.Announce (nil: every instance); only the instances whose
// announcement by this node changed are replanned.
func (p *Planner) SetAnnounce(announce map[string]bool) {
	if (p.announce == nil) == (announce == nil) && maps.Equal(p.announce, announce) {
		return
	}
	old := p.announce
	if announce != nil {
		announce = maps.Clone(announce)
	}
	p.announce = announce
	for vip, v := range p.vips {
		if old == nil || announce == nil || old[v.instance] != announce[v.instance] {
			p.dirtyVIPs[vip] = struct{}{}
		}
	}
}

// masterOf is whether this node masters inst, as BuildPlan reads it for roles.
func (p *Planner) masterOf(masters map[string]string, inst string) bool {
	m, ok := masters[inst]
	return ok && m == p.node
}

// handoffOf is the Handoff that the frontends of a VIP of inst and of the given family
// carry, as BuildPlan chooses it.
func (p *Planner) handoffOf(masters map[string]string, handoffs map[string][]netip.Addr, inst string, is4 bool) netip.Addr {
	if !p.roles || masters[inst] != p.node {
		return netip.Addr{}
	}
	for _, a := range handoffs[inst] {
		if a.Unmap().Is4() == is4 {
			return a.Unmap()
		}
	}
	return netip.Addr{}
}

// Plan returns the Plan for the services and masters given so far and what changed
// since the previous call. The Plan's slices are the Planner's own, changed in place
// by the next call: a caller that keeps a Plan past it keeps a copy. The Delta is the
// caller's.
func (p *Planner) Plan() (Plan, Delta) {
	var d Delta
	if len(p.dirtyVIPs) == 0 && len(p.dirtyServices) == 0 {
		return p.plan, d
	}
	// VIPs first: a new handoff address makes every service on the VIP dirty.
	for vip := range p.dirtyVIPs {
		v := p.vips[vip]
		var adv Advertisement
		advertised := false
		if len(v.keys) > 0 {
			inst := p.services[v.keys[0]].instance
			v.instance = inst
			if h := p.handoffOf(p.masters, p.handoffs, inst, vip.Is4()); h != v.handoff {
				v.handoff = h
				for _, k := range v.keys {
					p.dirtyServices[k] = struct{}{}
				}
			}
			if v.ready > 0 {
				role := RoleEqual
				if p.roles {
					role = RoleBackup
					if p.masterOf(p.masters, inst) {
						role = RoleMaster
					}
				}
				adv = Advertisement{Prefix: netip.PrefixFrom(vip, vip.BitLen()), Role: role, Instance: inst,
					Successor: role == RoleBackup && p.successors[inst] == p.node}
				advertised = role != RoleBackup || p.announce == nil || p.announce[inst]
				if !advertised {
					adv = Advertisement{}
				}
			}
		}
		if advertised != v.advertised || adv != v.adv {
			if v.advertised {
				d.RemovedAdvertisements = append(d.RemovedAdvertisements, v.adv)
			}
			if advertised {
				d.AddedAdvertisements = append(d.AddedAdvertisements, adv)
			}
		}
		v.adv, v.advertised = adv, advertised
		if len(v.keys) == 0 {
			delete(p.vips, vip)
		}
	}
	for key := range p.dirtyServices {
		e := p.services[key]
		if e.removed {
			d.RemovedFrontends = append(d.RemovedFrontends, e.published...)
			delete(p.services, key)
			continue
		}
		fes := slices.Clone(e.frontends)
		for i := range fes {
			fes[i].Handoff = p.vips[fes[i].VIP].handoff
		}
		if !slices.EqualFunc(fes, e.published, equalFrontend) {
			d.RemovedFrontends = append(d.RemovedFrontends, e.published...)
			d.AddedFrontends = append(d.AddedFrontends, fes...)
			e.published = fes
		}
	}
	clear(p.dirtyVIPs)
	clear(p.dirtyServices)

	compareAdv := func(a, b Advertisement) int { return a.Prefix.Addr().Compare(b.Prefix.Addr()) }
	slices.SortFunc(d.RemovedAdvertisements, compareAdv)
	slices.SortFunc(d.AddedAdvertisements, compareAdv)
	slices.SortFunc(d.RemovedFrontends, compareFrontend)
	slices.SortFunc(d.AddedFrontends, compareFrontend)
	p.plan.Advertisements = patch(p.plan.Advertisements, d.RemovedAdvertisements, d.AddedAdvertisements, compareAdv)
	p.plan.Frontends = patch(p.plan.Frontends, d.RemovedFrontends, d.AddedFrontends, compareFrontend)
	return p.plan, d
}

// equalFrontend is reflect.DeepEqual for frontends, which tells a nil list of endpoints
// from an empty one.
func equalFrontend(a, b Frontend) bool {
	return a.Service == b.Service && a.VIP == b.VIP && a.Port == b.Port && a.Protocol == b.Protocol &&
		a.Mode == b.Mode && a.Select == b.Select && a.Handoff == b.Handoff &&
		(a.Endpoints == nil) == (b.Endpoints == nil) && slices.Equal(a.Endpoints, b.Endpoints) &&
		slices.Equal(a.SourceRanges, b.SourceRanges)
}

// patch makes cur, sorted by cmp, into cur without del and with add, in place: del
// and add are sorted by cmp and every element of del is in cur. A removed entry with
// the same key as an added one (a changed entry) is overwritten where it is; the other
// removals close their gaps and the other additions open theirs by moving the runs of
// entries between them, found by binary search. An entry changed costs O(log n), one
// added or removed a move of the entries after it.
func patch[T any](cur, del, add []T, cmp func(a, b T) int) []T {
	// Where each removed entry is; equal keys (a service listing a VIP twice) are
	// adjacent in both cur and del. -1: not there, or overwritten below.
	at := make([]int, len(del))
	for i, d := range del {
		k, found := 0, false
		if i > 0 && at[i-1] >= 0 && cmp(del[i-1], d) == 0 {
			k = at[i-1] + 1
			found = k < len(cur) && cmp(cur[k], d) == 0
		} else {
			k, found = slices.BinarySearchFunc(cur, d, cmp)
		}
		at[i] = -1
		if found {
			at[i] = k
		}
	}
	var ins []T // additions not written over a removal
	i := 0
	for _, a := range add {
		for i < len(del) && cmp(del[i], a) < 0 {
			i++
		}
		if i < len(del) && at[i] >= 0 && cmp(del[i], a) == 0 {
			cur[at[i]], at[i] = a, -1
			i++
			continue
		}
		ins = append(ins, a)
	}

	// Removals, front to back: each run after a gap moves left.
	w, r := -1, 0
	for _, k := range at {
		if k < 0 {
			continue
		}
		if w < 0 {
			w = k
		} else {
			w += copy(cur[w:], cur[r:k])
		}
		r = k + 1
	}
	if w >= 0 {
		w += copy(cur[w:], cur[r:])
		clear(cur[w:]) // no references kept past the end
		cur = cur[:w]
	}

	// Additions, back to front: each run before a gap moves right.
	n := len(cur)
	cur = slices.Grow(cur, len(ins))[:n+len(ins)]
	r, w = n, len(cur)
	for k := len(ins) - 1; k >= 0; k-- {
		j, _ := slices.BinarySearchFunc(cur[:r], ins[k], cmp)
		w -= copy(cur[w-(r-j):w], cur[j:r])
		w--
		cur[w] = ins[k]
		r = j
	}
	return cur
}
