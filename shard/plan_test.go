package shard

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
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
	t.Run("a VIP shared by two instances follows the service with the smallest key", func(t *testing.T) {
		s := guideServices()
		s[1].VIPs = s[0].VIPs
		s[1].Ports[0].Port = 57003
		p := BuildPlan(Input{Node: "master1", Roles: true, Masters: masters, Services: s})
		if len(p.Advertisements) != 1 || p.Advertisements[0].Role != RoleMaster || p.Advertisements[0].Instance != "default" {
			t.Fatalf("advertisements %v", p.Advertisements)
		}
	})
	t.Run("IPv6 VIPs are announced as /128 and IPv4-mapped ones as /32", func(t *testing.T) {
		s := guideServices()
		s[0].VIPs = []netip.Addr{netip.MustParseAddr("2001:db8::250"), netip.MustParseAddr("::ffff:192.168.80.9")}
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

// TestEveryNodeAgreesOnOneMasterPerVIP computes the Plan from every node's point of
// view, with the same inputs, and checks that each announced VIP has exactly one
// master among the nodes and that all nodes program the same frontends.
func TestEveryNodeAgreesOnOneMasterPerVIP(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 7))
	for round := 0; round < 100; round++ {
		in, _ := NewInstances("llb", 1+r.IntN(8))
		nodes := make([]string, 1+r.IntN(8))
		for i := range nodes {
			nodes[i] = fmt.Sprintf("node-%d", i)
		}
		masters := PreferredMasters(in, nodes, nil)
		svcs := randomServices(r, in, 50)
		masterCount := map[netip.Prefix]int{}
		var first Plan
		for i, node := range nodes {
			p := BuildPlan(Input{Node: node, Roles: true, Masters: masters, Services: svcs})
			if i == 0 {
				first = p
			} else if !reflect.DeepEqual(p.Frontends, first.Frontends) || len(p.Advertisements) != len(first.Advertisements) {
				t.Fatalf("round %d: %s programs or announces differently from %s", round, node, nodes[0])
			}
			for _, a := range p.Advertisements {
				if a.Role == RoleMaster {
					masterCount[a.Prefix]++
				}
			}
		}
		for _, a := range first.Advertisements {
			if masterCount[a.Prefix] != 1 {
				t.Fatalf("round %d: VIP %s has %d masters", round, a.Prefix, masterCount[a.Prefix])
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
