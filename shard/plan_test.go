package shard

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"
)

var guideNodes = []string{"master1", "master2", "master3"}

func guideServices() []Service {
	ep := func(s string) []Endpoint { return []Endpoint{{Addr: netip.MustParseAddr(s), Port: 80}} }
	return []Service{
		{Key: "default/tcp-lb", Instance: "default", VIPs: []netip.Addr{netip.MustParseAddr("192.168.80.250")},
			Ports: []ServicePort{{Protocol: TCP, Port: 57002, Endpoints: ep("10.42.1.5")}}, Mode: ModeOneArm},
		{Key: "default/tcp-lb2", Instance: "llb-inst2", VIPs: []netip.Addr{netip.MustParseAddr("192.168.80.251")},
			Ports: []ServicePort{{Protocol: TCP, Port: 57002, Endpoints: ep("10.42.2.7")}}, Mode: ModeOneArm},
	}
}

func TestPlanForTheGuidesServices(t *testing.T) {
	in, _ := NewInstances("llb", 3)
	masters := PreferredMasters(in, guideNodes, nil)
	lb2Master := masters["llb-inst2"]
	for _, node := range guideNodes {
		p := BuildPlan(Input{Node: node, Roles: true, Masters: masters, Services: guideServices()})
		if len(p.Frontends) != 2 {
			t.Fatalf("%s: every node programs every frontend, got %d", node, len(p.Frontends))
		}
		if len(p.Advertisements) != 2 {
			t.Fatalf("%s: every node announces both VIPs, got %v", node, p.Advertisements)
		}
		adv := p.Advertisements[1]
		if adv.Prefix != netip.MustParsePrefix("192.168.80.251/32") || adv.Instance != "llb-inst2" {
			t.Fatalf("%s: unexpected second advertisement %+v", node, adv)
		}
		want := RoleBackup
		if node == lb2Master {
			want = RoleMaster
		}
		if adv.Role != want {
			t.Errorf("%s announces tcp-lb2's VIP as %v, want %v (llb-inst2 master is %s)", node, adv.Role, want, lb2Master)
		}
	}
}

func TestPlanRules(t *testing.T) {
	svcs := guideServices()
	masters := map[string]string{"default": "master1", "llb-inst2": "master2"}

	t.Run("without roles every node announces with equal attributes", func(t *testing.T) {
		p := BuildPlan(Input{Node: "master1", Roles: false, Masters: masters, Services: svcs})
		for _, a := range p.Advertisements {
			if a.Role != RoleEqual {
				t.Fatalf("got %v", p.Advertisements)
			}
		}
	})
	t.Run("a VIP without ready endpoints is not announced but still programmed", func(t *testing.T) {
		s := guideServices()
		s[1].Ports[0].Endpoints = nil
		p := BuildPlan(Input{Node: "master2", Roles: true, Masters: masters, Services: s})
		if len(p.Advertisements) != 1 || p.Advertisements[0].Prefix.Addr() != s[0].VIPs[0] {
			t.Fatalf("advertisements %v", p.Advertisements)
		}
		if len(p.Frontends) != 2 {
			t.Fatalf("frontends %v", p.Frontends)
		}
	})
	t.Run("an instance without a master is announced as backup everywhere", func(t *testing.T) {
		for _, node := range guideNodes {
			p := BuildPlan(Input{Node: node, Roles: true, Masters: nil, Services: svcs})
			for _, a := range p.Advertisements {
				if a.Role != RoleBackup {
					t.Fatalf("%s: %v", node, p.Advertisements)
				}
			}
		}
	})
	t.Run("a VIP shared by services of different instances follows the service with the smallest key, whatever the input order", func(t *testing.T) {
		// Three services of three instances on one VIP, fed in every order: a rule that
		// took the first, the last or the middle service would fail in some order.
		vip := netip.MustParseAddr("192.168.80.250")
		shared := []Service{
			{Key: "default/b-lb", Instance: "llb-inst1", VIPs: []netip.Addr{vip},
				Ports: []ServicePort{{Protocol: TCP, Port: 57003, Endpoints: guideServices()[0].Ports[0].Endpoints}}},
			{Key: "default/a-lb", Instance: "llb-inst2", VIPs: []netip.Addr{vip},
				Ports: []ServicePort{{Protocol: TCP, Port: 57002, Endpoints: guideServices()[1].Ports[0].Endpoints}}},
			{Key: "default/c-lb", Instance: "default", VIPs: []netip.Addr{vip},
				Ports: []ServicePort{{Protocol: TCP, Port: 57004, Endpoints: guideServices()[0].Ports[0].Endpoints}}},
		}
		masters := map[string]string{"default": "master1", "llb-inst1": "master2", "llb-inst2": "master3"}
		for _, order := range [][]int{{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}} {
			s := make([]Service, len(order))
			var keys []string
			for i, o := range order {
				s[i] = shared[o]
				keys = append(keys, shared[o].Key)
			}
			for _, node := range guideNodes {
				p := BuildPlan(Input{Node: node, Roles: true, Masters: masters, Services: s})
				want := Advertisement{Prefix: netip.PrefixFrom(vip, 32), Instance: "llb-inst2", Role: RoleBackup}
				if node == masters["llb-inst2"] {
					want.Role = RoleMaster
				}
				if len(p.Advertisements) != 1 || p.Advertisements[0] != want {
					t.Errorf("services in order %v, %s announces %v, want [%v] (default/a-lb is in llb-inst2)", keys, node, p.Advertisements, want)
				}
			}
		}
	})
	t.Run("each VIP of a dual-stack service gets the endpoints of its family, and is announced only with one", func(t *testing.T) {
		ep := func(a string) Endpoint { return Endpoint{Addr: netip.MustParseAddr(a), Port: 80} }
		v4, v6 := netip.MustParseAddr("192.168.80.250"), netip.MustParseAddr("fd00:96::250")
		// The EndpointSlices of both families, merged in no particular order, one of
		// the IPv4 addresses as an IPv4-mapped IPv6 one.
		mixed := []Endpoint{ep("fd00:42::7"), ep("10.42.1.5"), ep("::ffff:10.42.1.6"), ep("fd00:42::5")}
		dual := Service{Key: "default/dual", Instance: "default", VIPs: []netip.Addr{v6, v4}, Mode: ModeOneArm,
			Ports: []ServicePort{{Protocol: TCP, Port: 57002, Endpoints: mixed}}}
		onlyV4 := Service{Key: "default/half", Instance: "default", VIPs: []netip.Addr{netip.MustParseAddr("192.168.80.251"), netip.MustParseAddr("fd00:96::251")},
			Ports: []ServicePort{{Protocol: TCP, Port: 57002, Endpoints: []Endpoint{ep("10.42.1.5")}}}}
		p := BuildPlan(Input{Node: "master1", Roles: true, Masters: masters, Services: []Service{dual, onlyV4}})
		want := map[netip.Addr][]Endpoint{
			v4:                                    {ep("10.42.1.5"), ep("::ffff:10.42.1.6")},
			v6:                                    {ep("fd00:42::5"), ep("fd00:42::7")},
			netip.MustParseAddr("192.168.80.251"): {ep("10.42.1.5")},
			netip.MustParseAddr("fd00:96::251"):   nil,
		}
		if len(p.Frontends) != len(want) {
			t.Fatalf("frontends %+v, want one per VIP", p.Frontends)
		}
		for _, fe := range p.Frontends {
			if !slices.Equal(fe.Endpoints, want[fe.VIP]) {
				t.Errorf("%s has endpoints %v, want %v", fe.VIP, fe.Endpoints, want[fe.VIP])
			}
		}
		var announced []string
		for _, a := range p.Advertisements {
			announced = append(announced, a.Prefix.String())
		}
		if w := []string{"192.168.80.250/32", "192.168.80.251/32", "fd00:96::250/128"}; !slices.Equal(announced, w) {
			t.Errorf("announced %v, want %v (an IPv6 VIP without an IPv6 endpoint reaches nothing)", announced, w)
		}
	})
	t.Run("IPv6 VIPs are announced as /128 and IPv4-mapped ones as /32", func(t *testing.T) {
		s := guideServices()
		s[0].VIPs = []netip.Addr{netip.MustParseAddr("2001:db8::250"), netip.MustParseAddr("::ffff:192.168.80.9")}
		s[0].Ports[0].Endpoints = append(s[0].Ports[0].Endpoints, Endpoint{Addr: netip.MustParseAddr("fd00:42::5"), Port: 80})
		p := BuildPlan(Input{Node: "master1", Roles: true, Masters: masters, Services: s})
		var bits []int
		for _, a := range p.Advertisements {
			bits = append(bits, a.Prefix.Bits())
		}
		if !reflect.DeepEqual(bits, []int{32, 32, 128}) {
			t.Fatalf("prefix lengths %v in %v", bits, p.Advertisements)
		}
	})
}

func randomServices(r *rand.Rand, in Instances, n int) []Service {
	svcs := make([]Service, n)
	for i := range svcs {
		var eps []Endpoint
		for e := r.IntN(4); e > 0; e-- {
			eps = append(eps, Endpoint{Addr: netip.AddrFrom4([4]byte{10, 42, byte(r.IntN(4)), byte(r.IntN(250))}), Port: 8080})
		}
		svcs[i] = Service{
			Key:      fmt.Sprintf("ns/svc-%05d", i),
			Instance: in.Name(r.IntN(in.Count())),
			VIPs:     []netip.Addr{netip.AddrFrom4([4]byte{192, 168, byte(i >> 8), byte(i)})},
			Ports:    []ServicePort{{Protocol: TCP, Port: 80, Endpoints: eps}},
		}
	}
	return svcs
}

// shareVIPs makes about a third of the services share the VIP of an earlier one (shared
// IP mode: one VIP, services of any instances, distinct ports).
func shareVIPs(r *rand.Rand, svcs []Service) {
	for i := 1; i < len(svcs); i++ {
		if r.IntN(3) == 0 {
			svcs[i].VIPs = slices.Clone(svcs[r.IntN(i)].VIPs)
			svcs[i].Ports[0].Port = uint16(1000 + i)
		}
	}
}

// shuffled is a deep copy of svcs in a random order, each port's endpoints shuffled
// too: what one node's informers might hand it.
func shuffled(r *rand.Rand, svcs []Service) []Service {
	out := make([]Service, len(svcs))
	for i, s := range svcs {
		s.VIPs = slices.Clone(s.VIPs)
		ports := make([]ServicePort, len(s.Ports))
		for j, p := range s.Ports {
			p.Endpoints = slices.Clone(p.Endpoints)
			r.Shuffle(len(p.Endpoints), func(a, b int) { p.Endpoints[a], p.Endpoints[b] = p.Endpoints[b], p.Endpoints[a] })
			ports[j] = p
		}
		s.Ports = ports
		out[i] = s
	}
	r.Shuffle(len(out), func(a, b int) { out[a], out[b] = out[b], out[a] })
	return out
}

// TestEveryNodeAgreesOnOneMasterPerVIP computes the Plan from every node's point of
// view, each node given the same services in its own order, a third of them sharing a
// VIP with others of any instance. All nodes must program the same frontends and
// announce the same VIPs, each in the instance of the smallest key among its services,
// and each VIP must have exactly one master: its instance's.
func TestEveryNodeAgreesOnOneMasterPerVIP(t *testing.T) {
	for round := range 100 {
		seed := uint64(round)
		r := rand.New(rand.NewPCG(seed, 7))
		in, _ := NewInstances("llb", 1+r.IntN(8))
		nodes := make([]string, 1+r.IntN(8))
		for i := range nodes {
			nodes[i] = fmt.Sprintf("node-%d", i)
		}
		masters := PreferredMasters(in, nodes, nil)
		svcs := randomServices(r, in, 50)
		shareVIPs(r, svcs)

		// The naive model: a VIP follows the smallest key among all its services, ready
		// or not, and is announced while any of them has a ready endpoint.
		owner := map[netip.Prefix]Service{}
		ready := map[netip.Prefix]bool{}
		for _, s := range svcs {
			pfx := netip.PrefixFrom(s.VIPs[0], 32)
			if o, ok := owner[pfx]; !ok || s.Key < o.Key {
				owner[pfx] = s
			}
			ready[pfx] = ready[pfx] || len(s.Ports[0].Endpoints) > 0
		}
		var wantVIPs []netip.Prefix
		for pfx := range owner {
			if ready[pfx] {
				wantVIPs = append(wantVIPs, pfx)
			}
		}
		slices.SortFunc(wantVIPs, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })

		masterOf := map[netip.Prefix][]string{}
		var first Plan
		for i, node := range nodes {
			p := BuildPlan(Input{Node: node, Roles: true, Masters: masters, Services: shuffled(r, svcs)})
			if i == 0 {
				first = p
			} else if !reflect.DeepEqual(p.Frontends, first.Frontends) {
				i := 0
				for i < min(len(p.Frontends), len(first.Frontends)) && reflect.DeepEqual(p.Frontends[i], first.Frontends[i]) {
					i++
				}
				at := func(fs []Frontend) any {
					if i < len(fs) {
						return fs[i]
					}
					return "nothing"
				}
				t.Fatalf("round %d (seed %d): %s programs %d frontends, %s %d; first difference at %d: %+v, want %+v",
					round, seed, node, len(p.Frontends), nodes[0], len(first.Frontends), i, at(p.Frontends), at(first.Frontends))
			}
			var got []netip.Prefix
			for _, a := range p.Advertisements {
				got = append(got, a.Prefix)
				if want := owner[a.Prefix].Instance; a.Instance != want {
					t.Fatalf("round %d (seed %d): %s announces %s in %s, want %s (instance of %s, the smallest key on it)",
						round, seed, node, a.Prefix, a.Instance, want, owner[a.Prefix].Key)
				}
				if a.Role == RoleMaster {
					masterOf[a.Prefix] = append(masterOf[a.Prefix], node)
				}
			}
			if !slices.Equal(got, wantVIPs) {
				t.Fatalf("round %d (seed %d): %s announces %v, want %v", round, seed, node, got, wantVIPs)
			}
		}
		for _, pfx := range wantVIPs {
			inst := owner[pfx].Instance
			if m := masterOf[pfx]; len(m) != 1 || m[0] != masters[inst] {
				t.Fatalf("round %d (seed %d): VIP %s of %s is mastered by %v, want [%s]", round, seed, pfx, inst, m, masters[inst])
			}
		}
	}
}

// BenchmarkPlan builds the Plan for 10,000 services x 16 nodes. The baseline copies the
// same input into frontends without any decision, the least any plan must do.
func BenchmarkPlan(b *testing.B) {
	r := rand.New(rand.NewPCG(3, 3))
	in, _ := NewInstances("llb", 16)
	nodes := make([]string, 16)
	for i := range nodes {
		nodes[i] = fmt.Sprintf("node-%02d", i)
	}
	svcs := randomServices(r, in, 10000)
	masters := PreferredMasters(in, nodes, nil)
	var sink []Frontend
	b.Run("baseline", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			out := make([]Frontend, 0, len(svcs))
			for _, s := range svcs {
				for _, p := range s.Ports {
					out = append(out, Frontend{Service: s.Key, VIP: s.VIPs[0], Port: p.Port, Endpoints: append([]Endpoint(nil), p.Endpoints...)})
				}
			}
			sink = out
		}
	})
	_ = sink
	b.Run("one-node-10k-services", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			BuildPlan(Input{Node: nodes[3], Roles: true, Masters: masters, Services: svcs})
		}
	})
	b.Run("masters-16-instances-16-nodes", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			Rebalance(in, nodes, nil, masters)
		}
	})
}

// TestPlanHandoff checks that only the master's frontends of the handed-over instance
// carry the previous master's address, of the VIP's family.
func TestPlanHandoff(t *testing.T) {
	in, _ := NewInstances("llb", 3)
	masters := PreferredMasters(in, guideNodes, nil)
	m2 := masters["llb-inst2"]
	prev := []netip.Addr{netip.MustParseAddr("fd00::9"), netip.MustParseAddr("10.0.0.9")}
	for _, node := range guideNodes {
		p := BuildPlan(Input{Node: node, Roles: true, Masters: masters, Services: guideServices(),
			Handoffs: map[string][]netip.Addr{"llb-inst2": prev}})
		for _, fe := range p.Frontends {
			want := netip.Addr{}
			if node == m2 && fe.Service == "default/tcp-lb2" {
				want = prev[1]
			}
			if fe.Handoff != want {
				t.Errorf("%s: %s hands off to %v, want %v", node, fe.Service, fe.Handoff, want)
			}
		}
	}
	// Without roles every node is equal: nobody hands off.
	p := BuildPlan(Input{Node: m2, Masters: masters, Services: guideServices(),
		Handoffs: map[string][]netip.Addr{"llb-inst2": prev}})
	for _, fe := range p.Frontends {
		if fe.Handoff.IsValid() {
			t.Errorf("without roles %s hands off to %v", fe.Service, fe.Handoff)
		}
	}
}

func TestOnlyTheSuccessorsBackupIsMarked(t *testing.T) {
	vip := netip.MustParseAddr("192.168.80.250")
	svc := Service{Key: "ns/a", Instance: "default", VIPs: []netip.Addr{vip},
		Ports: []ServicePort{{Protocol: TCP, Port: 80, Endpoints: []Endpoint{{Addr: netip.MustParseAddr("10.0.0.1"), Port: 80}}}}}
	for _, tc := range []struct {
		name, node string
		roles      bool
		want       Advertisement
	}{
		{"the master is not a successor even when named one", "node-a", true, Advertisement{Role: RoleMaster}},
		{"the successor's backup is marked", "node-b", true, Advertisement{Role: RoleBackup, Successor: true}},
		{"another backup is not", "node-c", true, Advertisement{Role: RoleBackup}},
		{"without roles nobody is", "node-b", false, Advertisement{Role: RoleEqual}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := BuildPlan(Input{Node: tc.node, Roles: tc.roles, Services: []Service{svc},
				Masters: map[string]string{"default": "node-a"}, Successors: map[string]string{"default": "node-b"}})
			if len(p.Advertisements) != 1 {
				t.Fatalf("advertisements %v, want one", p.Advertisements)
			}
			if a := p.Advertisements[0]; a.Role != tc.want.Role || a.Successor != tc.want.Successor {
				t.Fatalf("advertisement %+v, want role %v successor %v", a, tc.want.Role, tc.want.Successor)
			}
		})
	}
}

// Every frontend of a service carries all of its source ranges, masked, sorted and
// without duplicates, whatever the VIP's family; a service without ranges gives nil.
func TestPlanCarriesSourceRangesToEveryFrontend(t *testing.T) {
	pfx := netip.MustParsePrefix
	ep := []Endpoint{{Addr: netip.MustParseAddr("10.42.0.1"), Port: 80}}
	restricted := Service{Key: "ns/restricted", Instance: "default",
		VIPs:         []netip.Addr{netip.MustParseAddr("192.168.80.250"), netip.MustParseAddr("2001:db8::250")},
		Ports:        []ServicePort{{Protocol: TCP, Port: 80, Endpoints: ep}, {Protocol: UDP, Port: 53, Endpoints: ep}},
		SourceRanges: []netip.Prefix{pfx("192.168.1.7/24"), pfx("10.0.0.0/8"), pfx("192.168.1.0/24"), {}, pfx("2001:db8:1::/48")},
	}
	open := Service{Key: "ns/open", Instance: "default", VIPs: []netip.Addr{netip.MustParseAddr("192.168.80.251")},
		Ports: []ServicePort{{Protocol: TCP, Port: 80, Endpoints: ep}}, SourceRanges: []netip.Prefix{}}
	given := slices.Clone(restricted.SourceRanges)
	p := BuildPlan(Input{Node: "node-a", Services: []Service{restricted, open}})
	want := []netip.Prefix{pfx("10.0.0.0/8"), pfx("192.168.1.0/24"), pfx("2001:db8:1::/48")}
	if len(p.Frontends) != 5 {
		t.Fatalf("frontends %+v, want 4 of ns/restricted and 1 of ns/open", p.Frontends)
	}
	for _, fe := range p.Frontends {
		switch fe.Service {
		case "ns/restricted":
			if !slices.Equal(fe.SourceRanges, want) {
				t.Errorf("%v:%d/%v carries %v, want %v", fe.VIP, fe.Port, fe.Protocol, fe.SourceRanges, want)
			}
		case "ns/open":
			if fe.SourceRanges != nil {
				t.Errorf("a service without ranges gives %#v, want nil", fe.SourceRanges)
			}
		}
	}
	if !slices.Equal(restricted.SourceRanges, given) {
		t.Errorf("BuildPlan changed the caller's ranges: %v, was %v", restricted.SourceRanges, given)
	}
}
