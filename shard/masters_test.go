package shard

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"sort"
	"testing"
)

func loads(m map[string]string) map[string]int {
	l := map[string]int{}
	for _, member := range m {
		l[member]++
	}
	return l
}

func moved(before, after map[string]string) int {
	n := 0
	for inst, m := range after {
		if before[inst] != m {
			n++
		}
	}
	return n
}

func ceilDiv(a, b int) int { return (a + b - 1) / b }

// checkBalanced asserts every instance has an eligible master and loads differ by at
// most one, which implies no member masters more than ceil(instances/members).
func checkBalanced(t *testing.T, in Instances, members []string, excluded map[string]bool, got map[string]string) {
	t.Helper()
	var eligible []string
	for _, m := range members {
		if !excluded[m] {
			eligible = append(eligible, m)
		}
	}
	if len(eligible) == 0 {
		if len(got) != 0 {
			t.Fatalf("no eligible member, yet masters %v", got)
		}
		return
	}
	if len(got) != in.Count() {
		t.Fatalf("%d of %d instances have a master: %v", len(got), in.Count(), got)
	}
	l := loads(got)
	for inst, m := range got {
		if excluded[m] || !contains(eligible, m) {
			t.Fatalf("instance %s mastered by ineligible member %q", inst, m)
		}
	}
	lo, hi := in.Count(), 0
	for _, m := range eligible {
		lo, hi = min(lo, l[m]), max(hi, l[m])
	}
	if hi-lo > 1 || hi > ceilDiv(in.Count(), len(eligible)) {
		t.Fatalf("unbalanced: loads %v over %d eligible members, %d instances", l, len(eligible), in.Count())
	}
}

func contains(s []string, x string) bool {
	for _, v := range s {
		if v == x {
			return true
		}
	}
	return false
}

func TestMastershipScenarios(t *testing.T) {
	in, _ := NewInstances("llb", 3)
	pods := []string{"loxilb-lb-ktq55", "loxilb-lb-n5zfk", "loxilb-lb-vp25b"}

	t.Run("three pods for three instances master one each", func(t *testing.T) {
		got := PreferredMasters(in, pods, nil)
		checkBalanced(t, in, pods, nil, got)
		if l := loads(got); len(l) != 3 {
			t.Fatalf("want every pod to master one instance, got %v", got)
		}
	})
	t.Run("an excluded pod never masters", func(t *testing.T) {
		ex := map[string]bool{pods[0]: true}
		got := PreferredMasters(in, pods, ex)
		checkBalanced(t, in, pods, ex, got)
	})
	t.Run("with every pod excluded nobody masters", func(t *testing.T) {
		ex := map[string]bool{pods[0]: true, pods[1]: true, pods[2]: true}
		if got := PreferredMasters(in, pods, ex); len(got) != 0 {
			t.Fatalf("got %v", got)
		}
	})
	t.Run("a balanced current assignment is kept as it is", func(t *testing.T) {
		cur := map[string]string{"default": pods[2], "llb-inst1": pods[0], "llb-inst2": pods[1]}
		if got := Rebalance(in, pods, nil, cur); !reflect.DeepEqual(got, cur) {
			t.Fatalf("Rebalance moved masters: %v -> %v", cur, got)
		}
	})
	t.Run("a dead master's instance goes to the pod with nothing", func(t *testing.T) {
		cur := map[string]string{"default": pods[2], "llb-inst1": pods[0], "llb-inst2": pods[1]}
		two := []string{pods[0], pods[2]}
		got := Rebalance(in, two, nil, cur)
		checkBalanced(t, in, two, nil, got)
		if moved(cur, got) != 1 || got["default"] != pods[2] || got["llb-inst1"] != pods[0] {
			t.Fatalf("survivors must keep their instances: %v -> %v", cur, got)
		}
		t.Run("and when it returns it gets exactly one back", func(t *testing.T) {
			back := Rebalance(in, pods, nil, got)
			checkBalanced(t, in, pods, nil, back)
			if n := moved(got, back); n != 1 {
				t.Fatalf("return moved %d masterships: %v -> %v", n, got, back)
			}
		})
	})
	t.Run("duplicate and empty member names count once", func(t *testing.T) {
		got := PreferredMasters(in, []string{"a", "a", "", "b"}, nil)
		checkBalanced(t, in, []string{"a", "b"}, nil, got)
	})
}

// TestMastershipProperties runs random membership histories and checks, after every
// step: balance, eligibility, determinism regardless of member order, and that one
// member joining or leaving moves at most ceil(instances/members) masterships.
func TestMastershipProperties(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for seq := 0; seq < 300; seq++ {
		in, _ := NewInstances("llb", 1+r.IntN(24))
		pool := make([]string, 1+r.IntN(30))
		for i := range pool {
			pool[i] = fmt.Sprintf("node-%02d", i)
		}
		live := map[string]bool{}
		for _, m := range pool {
			if r.IntN(2) == 0 {
				live[m] = true
			}
		}
		excluded := map[string]bool{}
		if r.IntN(4) == 0 {
			excluded[pool[r.IntN(len(pool))]] = true
		}
		members := func() []string {
			var out []string
			for m := range live {
				out = append(out, m)
			}
			sort.Strings(out)
			return out
		}
		cur := Rebalance(in, members(), excluded, nil)
		for step := 0; step < 40; step++ {
			before := members()
			flip := pool[r.IntN(len(pool))]
			live[flip] = !live[flip]
			after := members()

			ms := append([]string(nil), after...)
			r.Shuffle(len(ms), func(i, j int) { ms[i], ms[j] = ms[j], ms[i] })
			next := Rebalance(in, ms, excluded, cur)
			if again := Rebalance(in, after, excluded, cur); !reflect.DeepEqual(next, again) {
				t.Fatalf("seq %d step %d: result depends on member order: %v vs %v", seq, step, next, again)
			}
			checkBalanced(t, in, after, excluded, next)

			eb, ea := eligibleCount(before, excluded), eligibleCount(after, excluded)
			if eb > 0 && ea > 0 {
				bound := ceilDiv(in.Count(), max(eb, ea))
				if n := moved(cur, next); n > bound {
					t.Fatalf("seq %d step %d: %s %v moved %d masterships (bound %d, %d instances, %d -> %d members)\n%v\n-> %v",
						seq, step, flip, live[flip], n, bound, in.Count(), eb, ea, cur, next)
				}
			}
			cur = next
		}
	}
}

func eligibleCount(members []string, excluded map[string]bool) int {
	n := 0
	for _, m := range members {
		if !excluded[m] {
			n++
		}
	}
	return n
}
