package shard

import (
	"cmp"
	"net/netip"
	"slices"
)

// Input is everything a node needs to compute its Plan. Every node builds it from the
// same API objects, so nodes agree on every role.
type Input struct {
	Node    string            // this node's member name
	Roles   bool              // --setRoles: active-backup per instance; off = equal (ECMP)
	Masters map[string]string // instance -> member holding its mastership Lease
	// Handoffs are, for instances this node masters after a planned switch, the
	// previous master's node addresses (Frontend.Handoff).
	Handoffs map[string][]netip.Addr
	// Successors is instance -> the member that takes it over if its master fails
	// (mastership.Outcome.Successors); this node's backups of those instances are
	// announced as Advertisement.Successor.
	Successors map[string]string
	// Announce, when not nil, are the instances whose VIPs this node announces as a
	// backup (--maxBackups: mastership.Outcome.Announce); backups of the others
	// program their frontends but announce nothing. nil: every instance.
	Announce map[string]bool
	Services []Service // with ready endpoints only
}

// BuildPlan computes what one node announces and programs.
//
// Every node programs every frontend, master or backup, so a backup serves the moment
// routers move traffic to it. A frontend gets the endpoints of its VIP's family only,
// and a VIP is announced only while one of its services has a ready endpoint of that
// family. A VIP shared by services of different instances (shared IP mode) follows the
// instance of the service with the smallest key, so that every node derives the same
// single master for it. The master's frontends of an instance with a handoff carry the
// previous master's address of the VIP's family. Every frontend of a service carries
// the service's source ranges, all of them whatever the VIP's family (a client of a
// family no range covers is refused, as Kubernetes defines the field), masked, sorted
// and without duplicates.
func BuildPlan(in Input) Plan {
	type vipState struct {
		instance string
		owner    string // service key that decided the instance
		ready    bool
	}
	vips := map[netip.Addr]*vipState{}
	var plan Plan
	for _, s := range in.Services {
		ranges := sourceRanges(s.SourceRanges)
		for _, vip := range s.VIPs {
			if !vip.IsValid() {
				continue
			}
			vip = vip.Unmap()
			v := vips[vip]
			if v == nil {
				v = &vipState{instance: s.Instance, owner: s.Key}
				vips[vip] = v
			} else if s.Key < v.owner {
				v.instance, v.owner = s.Instance, s.Key
			}
			for _, p := range s.Ports {
				eps := endpointsOf(vip, p.Endpoints)
				v.ready = v.ready || len(eps) > 0
				plan.Frontends = append(plan.Frontends, Frontend{
					Service: s.Key, VIP: vip, Port: p.Port, Protocol: p.Protocol,
					Mode: s.Mode, Select: s.Select, Endpoints: eps, SourceRanges: ranges,
				})
			}
		}
	}
	if in.Roles && len(in.Handoffs) > 0 {
		for i := range plan.Frontends {
			fe := &plan.Frontends[i]
			inst := vips[fe.VIP].instance
			if in.Masters[inst] != in.Node {
				continue
			}
			for _, a := range in.Handoffs[inst] {
				if a.Unmap().Is4() == fe.VIP.Is4() {
					fe.Handoff = a.Unmap()
					break
				}
			}
		}
	}
	for vip, v := range vips {
		if !v.ready {
			continue
		}
		role := RoleEqual
		if in.Roles {
			role = RoleBackup
			if m, ok := in.Masters[v.instance]; ok && m == in.Node {
				role = RoleMaster
			}
		}
		if role == RoleBackup && in.Announce != nil && !in.Announce[v.instance] {
			continue
		}
		plan.Advertisements = append(plan.Advertisements, Advertisement{
			Prefix: netip.PrefixFrom(vip, vip.BitLen()), Role: role, Instance: v.instance,
			Successor: role == RoleBackup && in.Successors[v.instance] == in.Node,
		})
	}
	slices.SortFunc(plan.Advertisements, func(a, b Advertisement) int {
		return a.Prefix.Addr().Compare(b.Prefix.Addr())
	})
	slices.SortFunc(plan.Frontends, compareFrontend)
	return plan
}

// sourceRanges is Service.SourceRanges as frontends carry it: masked, sorted, without
// duplicates or invalid prefixes, nil when empty. The frontends of one service share
// the slice, which nobody changes.
func sourceRanges(in []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range in {
		if p.IsValid() {
			out = append(out, p.Masked())
		}
	}
	slices.SortFunc(out, netip.Prefix.Compare)
	return slices.Compact(out)
}

// endpointsOf returns a new list of the endpoints of the VIP's family, sorted and
// without repeats. A dual-stack service has endpoints of both families (an
// EndpointSlice per family) and each of its VIPs reaches those of its own only: the
// datapath cannot translate between families.
func endpointsOf(vip netip.Addr, eps []Endpoint) []Endpoint {
	out := slices.DeleteFunc(slices.Clone(eps), func(e Endpoint) bool { return e.Addr.Unmap().Is4() != vip.Is4() })
	slices.SortFunc(out, compareEndpoint)
	return slices.Compact(out)
}

func compareEndpoint(a, b Endpoint) int {
	return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(a.Port, b.Port), a.Node.Compare(b.Node))
}

func compareFrontend(a, b Frontend) int {
	return cmp.Or(a.VIP.Compare(b.VIP), cmp.Compare(a.Port, b.Port),
		cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Service, b.Service))
}
