package shard

import (
	"cmp"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// plannerWorld is the small universe a random history draws from: few keys and VIPs,
// so that services come back, VIPs are shared by services of different instances, and
// the smallest key on a VIP changes often.
type plannerWorld struct {
	r     *rand.Rand
	insts Instances
	nodes []string
	keys  []string
	vips  []netip.Addr
}

func newPlannerWorld(r *rand.Rand) *plannerWorld {
	w := &plannerWorld{r: r, nodes: []string{"node-a", "node-b", "node-c"}}
	w.insts, _ = NewInstances("llb", 1+r.IntN(4))
	for i := range 10 {
		w.keys = append(w.keys, fmt.Sprintf("ns/svc-%02d", i))
	}
	for i := range 5 {
		w.vips = append(w.vips, netip.AddrFrom4([4]byte{192, 168, 80, byte(250 + i)}))
	}
	w.vips = append(w.vips,
		netip.MustParseAddr("::ffff:192.168.80.250"), // the same VIP as the first, mapped
		netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::2"),
		netip.Addr{}, // invalid: ignored
	)
	return w
}

func (w *plannerWorld) service() Service {
	r := w.r
	s := Service{
		Key: w.keys[r.IntN(len(w.keys))], Instance: w.insts.Name(r.IntN(w.insts.Count())),
		Mode: Mode(r.IntN(3)), Select: Select(r.IntN(3)),
	}
	for range r.IntN(3) {
		s.VIPs = append(s.VIPs, w.vips[r.IntN(len(w.vips))]) // sometimes twice the same
	}
	// Source ranges as a caller may give them: unsorted, repeated, with host bits set,
	// of either family, empty or nil.
	switch n := r.IntN(5); n {
	case 0: // nil
	case 1:
		s.SourceRanges = []netip.Prefix{}
	default:
		for range n {
			s.SourceRanges = append(s.SourceRanges, []netip.Prefix{
				netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("10.1.2.3/8"),
				netip.MustParsePrefix("192.168.1.0/24"), netip.MustParsePrefix("2001:db8::/32"),
				netip.MustParsePrefix("0.0.0.0/0"), {},
			}[r.IntN(6)])
		}
	}
	// Distinct (port, protocol) pairs, as the API requires.
	seen := map[[2]int]bool{}
	for range r.IntN(3) {
		sp := ServicePort{Protocol: []Protocol{TCP, UDP}[r.IntN(2)], Port: []uint16{53, 80, 443}[r.IntN(3)]}
		if seen[[2]int{int(sp.Protocol), int(sp.Port)}] {
			continue
		}
		seen[[2]int{int(sp.Protocol), int(sp.Port)}] = true
		switch n := r.IntN(5); n {
		case 0: // nil
		case 1:
			sp.Endpoints = []Endpoint{}
		default:
			// Of both families, as a dual-stack service's EndpointSlices give them.
			for range n - 1 {
				sp.Endpoints = append(sp.Endpoints, Endpoint{Addr: []netip.Addr{
					netip.MustParseAddr("10.42.0.1"), netip.MustParseAddr("10.42.0.2"), netip.MustParseAddr("10.42.0.3"),
					netip.MustParseAddr("fd00:42::1"), netip.MustParseAddr("fd00:42::2"),
				}[r.IntN(5)], Port: 8080})
			}
		}
		s.Ports = append(s.Ports, sp)
	}
	return s
}

func (w *plannerWorld) masters() (map[string]string, map[string][]netip.Addr) {
	r := w.r
	masters := map[string]string{}
	handoffs := map[string][]netip.Addr{}
	for i := range w.insts.Count() {
		inst := w.insts.Name(i)
		if r.IntN(4) > 0 {
			masters[inst] = w.nodes[r.IntN(len(w.nodes))]
		}
		if r.IntN(2) == 0 {
			var addrs []netip.Addr
			for range r.IntN(3) {
				addrs = append(addrs, []netip.Addr{
					netip.MustParseAddr("10.0.0.9"), netip.MustParseAddr("10.0.0.10"),
					netip.MustParseAddr("::ffff:10.0.0.11"), netip.MustParseAddr("fd00::9"),
				}[r.IntN(4)])
			}
			handoffs[inst] = addrs
		}
	}
	if r.IntN(4) == 0 {
		handoffs = nil
	}
	return masters, handoffs
}

// deepCopyService is s with slices of its own, for the model.
func deepCopyService(s Service) Service {
	s.VIPs = slices.Clone(s.VIPs)
	s.SourceRanges = slices.Clone(s.SourceRanges)
	s.Ports = slices.Clone(s.Ports)
	for i := range s.Ports {
		s.Ports[i].Endpoints = slices.Clone(s.Ports[i].Endpoints)
	}
	return s
}

// scribble overwrites what the caller still holds after handing s to the Planner,
// which must have kept no reference to it.
func scribble(s Service) {
	for i := range s.VIPs {
		s.VIPs[i] = netip.MustParseAddr("203.0.113.1")
	}
	for i := range s.SourceRanges {
		s.SourceRanges[i] = netip.MustParsePrefix("203.0.113.0/24")
	}
	for i := range s.Ports {
		s.Ports[i].Port = 9
		for j := range s.Ports[i].Endpoints {
			s.Ports[i].Endpoints[j] = Endpoint{Addr: netip.MustParseAddr("203.0.113.2"), Port: 9}
		}
	}
}

func deepCopyPlan(p Plan) Plan {
	c := Plan{Advertisements: slices.Clone(p.Advertisements), Frontends: slices.Clone(p.Frontends)}
	for i := range c.Frontends {
		c.Frontends[i].Endpoints = slices.Clone(c.Frontends[i].Endpoints)
	}
	return c
}

// firstDifference describes where two plans differ first.
func firstDifference(got, want Plan) string {
	for _, half := range []struct {
		name      string
		got, want []any
	}{
		{"advertisement", anys(got.Advertisements), anys(want.Advertisements)},
		{"frontend", anys(got.Frontends), anys(want.Frontends)},
	} {
		for i := range max(len(half.got), len(half.want)) {
			var g, w any = "nothing", "nothing"
			if i < len(half.got) {
				g = half.got[i]
			}
			if i < len(half.want) {
				w = half.want[i]
			}
			if !reflect.DeepEqual(g, w) {
				return fmt.Sprintf("%s %d of %d: got %+v, want %+v", half.name, i, len(half.want), g, w)
			}
		}
	}
	return "none"
}

func anys[T any](s []T) []any {
	out := make([]any, len(s))
	for i, v := range s {
		out[i] = v
	}
	return out
}

// TestPlannerAgreesWithBuildPlan drives a Planner through random histories of service
// updates and removals and master and handoff changes, asking for the Plan at random
// points (so that several changes are patched in at once), and checks every Plan
// against BuildPlan over the same services and masters, and every Delta against the
// two Plans.
func TestPlannerAgreesWithBuildPlan(t *testing.T) {
	const rounds, steps = 300, 200
	for round := range rounds {
		seed := uint64(round)
		r := rand.New(rand.NewPCG(seed, 11))
		w := newPlannerWorld(r)
		node := w.nodes[r.IntN(len(w.nodes))]
		roles := r.IntN(5) > 0
		p := NewPlanner(node, roles)
		model := map[string]Service{}
		var masters map[string]string
		var handoffs map[string][]netip.Addr
		var successors map[string]string
		var announce map[string]bool
		var history []string
		var prev Plan

		check := func(step int) {
			t.Helper()
			got, d := p.Plan()
			in := Input{Node: node, Roles: roles, Masters: masters, Handoffs: handoffs, Successors: successors, Announce: announce}
			for _, k := range slices.Sorted(maps.Keys(model)) {
				in.Services = append(in.Services, model[k])
			}
			want := BuildPlan(in)
			fail := func(format string, args ...any) {
				t.Helper()
				t.Fatalf("seed %d, step %d (node %s, roles %v): %s\nhistory (latest last):\n  %s", seed, step, node, roles,
					fmt.Sprintf(format, args...), strings.Join(history[max(0, len(history)-12):], "\n  "))
			}
			if !reflect.DeepEqual(normal(got), normal(want)) {
				fail("Planner and BuildPlan differ: %s", firstDifference(got, want))
			}
			cmpAdv := func(a, b Advertisement) int { return a.Prefix.Addr().Compare(b.Prefix.Addr()) }
			if a, err := merged(prev.Advertisements, d.RemovedAdvertisements, d.AddedAdvertisements, cmpAdv); err != nil {
				fail("Delta: %v", err)
			} else if !reflect.DeepEqual(normal(Plan{Advertisements: a}), normal(Plan{Advertisements: got.Advertisements})) {
				fail("the previous advertisements with the Delta applied are not the new ones: %s", firstDifference(Plan{Advertisements: a}, got))
			}
			if f, err := merged(prev.Frontends, d.RemovedFrontends, d.AddedFrontends, compareFrontend); err != nil {
				fail("Delta: %v", err)
			} else if !reflect.DeepEqual(normal(Plan{Frontends: f}), normal(Plan{Frontends: got.Frontends})) {
				fail("the previous frontends with the Delta applied are not the new ones: %s", firstDifference(Plan{Frontends: f}, got))
			}
			if d.Frontends() == reflect.DeepEqual(normal(prev).Frontends, normal(got).Frontends) {
				fail("Delta says frontends changed: %v, but they were %v and are %v", d.Frontends(), prev.Frontends, got.Frontends)
			}
			if d.Advertisements() == reflect.DeepEqual(normal(prev).Advertisements, normal(got).Advertisements) {
				fail("Delta says advertisements changed: %v, but they were %v and are %v", d.Advertisements(), prev.Advertisements, got.Advertisements)
			}
			prev = deepCopyPlan(got) // the Planner changes got in place next time
			history = append(history, "Plan")
		}

		for step := range steps {
			switch op := r.IntN(20); {
			case op < 9:
				s := w.service()
				model[s.Key] = deepCopyService(s)
				p.Update(s)
				scribble(s)
				history = append(history, fmt.Sprintf("Update %+v", model[s.Key]))
			case op < 11:
				// The same service with other source ranges only: nothing else tells
				// its new frontends from the published ones.
				k := w.keys[r.IntN(len(w.keys))]
				s, ok := model[k]
				if !ok {
					continue
				}
				s = deepCopyService(s)
				s.SourceRanges = w.service().SourceRanges
				model[k] = deepCopyService(s)
				p.Update(s)
				scribble(s)
				history = append(history, fmt.Sprintf("Update %s with source ranges %v", k, model[k].SourceRanges))
			case op < 14:
				k := w.keys[r.IntN(len(w.keys))]
				delete(model, k)
				p.Remove(k)
				history = append(history, "Remove "+k)
			case op == 14 && r.IntN(2) == 0:
				announce = nil
				if r.IntN(3) > 0 {
					announce = map[string]bool{}
					for i := range w.insts.Count() {
						if r.IntN(2) == 0 {
							announce[w.insts.Name(i)] = true
						}
					}
				}
				p.SetAnnounce(announce)
				announce = maps.Clone(announce)
				history = append(history, fmt.Sprintf("SetAnnounce %v", announce))
			case op < 15:
				successors = map[string]string{}
				for i := range w.insts.Count() {
					if r.IntN(3) > 0 {
						successors[w.insts.Name(i)] = w.nodes[r.IntN(len(w.nodes))]
					}
				}
				p.SetSuccessors(successors)
				successors = maps.Clone(successors)
				history = append(history, fmt.Sprintf("SetSuccessors %v", successors))
			case op < 16:
				masters, handoffs = w.masters()
				p.SetMasters(masters, handoffs)
				masters, handoffs = maps.Clone(masters), maps.Clone(handoffs)
				for inst := range handoffs {
					handoffs[inst] = slices.Clone(handoffs[inst])
				}
				history = append(history, fmt.Sprintf("SetMasters %v %v", masters, handoffs))
			default:
				check(step)
			}
		}
		check(steps)
	}
}

// merged is the naive reference for patch: a new slice, cur without del and with add,
// sorted again.
func merged[T any](cur, del, add []T, cmp func(a, b T) int) ([]T, error) {
	out := slices.Clone(cur)
	for _, d := range del {
		i := slices.IndexFunc(out, func(x T) bool { return reflect.DeepEqual(x, d) })
		if i < 0 {
			return nil, fmt.Errorf("removed %+v is not in %+v", d, cur)
		}
		out = slices.Delete(out, i, i+1)
	}
	out = append(out, add...)
	slices.SortStableFunc(out, cmp)
	return out, nil
}

// TestPatchEqualsSortingAgain checks patch against merged on random sorted lists whose
// keys repeat with different payloads, each key's whole run removed (as a service's
// frontends are) and replaced by a run of any length, or left alone.
func TestPatchEqualsSortingAgain(t *testing.T) {
	type entry struct{ key, payload int }
	byKey := func(a, b entry) int { return a.key - b.key }
	byBoth := func(a, b entry) int { return cmp.Or(a.key-b.key, a.payload-b.payload) }
	for seed := range uint64(2000) {
		r := rand.New(rand.NewPCG(seed, 13))
		var cur, del, add []entry
		for key := range 12 {
			var run []entry
			for range r.IntN(3) {
				run = append(run, entry{key, r.IntN(100)})
			}
			cur = append(cur, run...)
			if len(run) > 0 && r.IntN(2) == 0 || len(run) == 0 && r.IntN(3) == 0 {
				del = append(del, run...)
				for range r.IntN(3) {
					add = append(add, entry{key, r.IntN(100)})
				}
			}
		}
		want, err := merged(cur, del, add, byKey)
		if err != nil {
			t.Fatal(err)
		}
		before := slices.Clone(cur)
		got := patch(cur, slices.Clone(del), slices.Clone(add), byKey)
		if !slices.IsSortedFunc(got, byKey) {
			t.Fatalf("seed %d: patch(%v, -%v, +%v) = %v, not sorted", seed, before, del, add, got)
		}
		slices.SortFunc(got, byBoth) // the order of equal keys is free
		slices.SortFunc(want, byBoth)
		if !slices.Equal(got, want) {
			t.Fatalf("seed %d: patch(%v, -%v, +%v) = %v, want %v", seed, before, del, add, got, want)
		}
	}
}

// normal treats nil and empty lists as equal, as they are for a Plan's halves (not
// for endpoints, which the comparison keeps exact).
func normal(p Plan) Plan {
	if len(p.Advertisements) == 0 {
		p.Advertisements = nil
	}
	if len(p.Frontends) == 0 {
		p.Frontends = nil
	}
	return p
}

// TestPlannerSharedVIPScenarios replays, step by step, the cases the incremental rules
// exist for, each Plan checked against BuildPlan.
func TestPlannerSharedVIPScenarios(t *testing.T) {
	vip := netip.MustParseAddr("192.168.80.250")
	prev := []netip.Addr{netip.MustParseAddr("10.0.0.9")}
	ep := []Endpoint{{Addr: netip.MustParseAddr("10.42.0.1"), Port: 80}}
	svc := func(key, inst string, port uint16, eps []Endpoint) Service {
		return Service{Key: key, Instance: inst, VIPs: []netip.Addr{vip}, Ports: []ServicePort{{Protocol: TCP, Port: port, Endpoints: eps}}, Mode: ModeFullNAT}
	}
	masters := map[string]string{"default": "node-a", "llb-inst1": "node-b"}
	handoffs := map[string][]netip.Addr{"default": prev}
	type step struct {
		name   string
		do     func(p *Planner, model map[string]Service)
		master Role // the VIP's role on node-a; RoleEqual: not announced
		inst   string
	}
	update := func(s Service) func(*Planner, map[string]Service) {
		return func(p *Planner, m map[string]Service) { p.Update(s); m[s.Key] = s }
	}
	remove := func(k string) func(*Planner, map[string]Service) {
		return func(p *Planner, m map[string]Service) { p.Remove(k); delete(m, k) }
	}
	steps := []step{
		{"a service of llb-inst1 without endpoints is not announced", update(svc("ns/b", "llb-inst1", 81, nil)), RoleEqual, ""},
		{"a second service with a ready endpoint makes the VIP ready, still in llb-inst1 (ns/b is smaller)", update(svc("ns/c", "default", 82, ep)), RoleBackup, "llb-inst1"},
		{"a smaller key of default moves the VIP to default, and every frontend on it hands off", update(svc("ns/a", "default", 80, nil)), RoleMaster, "default"},
		{"the smallest key removed gives the VIP back to llb-inst1, and no frontend hands off", remove("ns/a"), RoleBackup, "llb-inst1"},
		{"the only ready service gone: withdrawn", remove("ns/c"), RoleEqual, ""},
		{"ns/b gets an endpoint: announced again", update(svc("ns/b", "llb-inst1", 81, ep)), RoleBackup, "llb-inst1"},
	}
	p := NewPlanner("node-a", true)
	p.SetMasters(masters, handoffs)
	model := map[string]Service{}
	for _, s := range steps {
		s.do(p, model)
		got, _ := p.Plan()
		in := Input{Node: "node-a", Roles: true, Masters: masters, Handoffs: handoffs}
		for _, k := range slices.Sorted(maps.Keys(model)) {
			in.Services = append(in.Services, model[k])
		}
		if want := BuildPlan(in); !reflect.DeepEqual(normal(got), normal(want)) {
			t.Fatalf("%s: Planner and BuildPlan differ: %s", s.name, firstDifference(got, want))
		}
		var want []Advertisement
		if s.master != RoleEqual {
			want = []Advertisement{{Prefix: netip.PrefixFrom(vip, 32), Role: s.master, Instance: s.inst}}
		}
		if !slices.Equal(got.Advertisements, want) {
			t.Fatalf("%s: advertisements %v, want %v", s.name, got.Advertisements, want)
		}
		for _, fe := range got.Frontends {
			if handsOff := s.inst == "default"; fe.Handoff.IsValid() != handsOff {
				t.Fatalf("%s: %s hands off to %v, want a handoff: %v", s.name, fe.Service, fe.Handoff, handsOff)
			}
		}
	}
}
