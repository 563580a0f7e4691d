package shard

import (
	"hash/fnv"
	"slices"
	"sort"
	"strings"
)

// score is the rendezvous weight of a member for an instance: a fixed hash, so every
// node ranks members the same way.
func score(instance, member string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(instance))
	h.Write([]byte{0})
	h.Write([]byte(member))
	// fnv's low bits mix poorly for similar inputs; finalise like splitmix64.
	x := h.Sum64()
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// Rank orders members for an instance by their rendezvous score, best first: the
// same order on every node, and a member joining or leaving moves no other member
// relative to the rest.
func Rank(instance string, members []string) []string {
	out := slices.Clone(members)
	slices.SortFunc(out, func(a, b string) int {
		sa, sb := score(instance, a), score(instance, b)
		switch {
		case sa > sb:
			return -1
		case sa < sb:
			return 1
		}
		return strings.Compare(a, b)
	})
	return out
}

// PreferredMasters says which member should master each instance, from scratch: the
// same as Rebalance with no current masters.
func PreferredMasters(in Instances, members []string, excluded map[string]bool) map[string]string {
	return Rebalance(in, members, excluded, nil)
}

// Rebalance says which member should master each instance, given who masters them now
// (instance -> member, from the mastership Leases). It moves as little as it can:
//
//   - a current master that is live, eligible and not above its share keeps its instance;
//   - instances without an eligible master, and the excess of members above
//     ceil(instances/members), go to the least loaded member, ties to the highest
//     rendezvous score of instance x member;
//   - then, while one member has two or more masterships more than another, the most
//     loaded hands one instance (the one the receiver scores highest) to the least loaded.
//
// So every member ends with floor or ceil of instances/members masterships, a member
// joining takes at most its share, and a member leaving moves only its own instances.
// Excluded members (--excludeRoleList) never master. The result is deterministic:
// every node computing it from the same inputs gets the same map. It is empty when no
// member is eligible.
func Rebalance(in Instances, members []string, excluded map[string]bool, current map[string]string) map[string]string {
	eligible := map[string]bool{}
	var names []string
	for _, m := range members {
		if m != "" && !excluded[m] && !eligible[m] {
			eligible[m] = true
			names = append(names, m)
		}
	}
	out := make(map[string]string, in.n)
	if len(names) == 0 {
		return out
	}
	sort.Strings(names)
	ceil := (in.n + len(names) - 1) / len(names)

	load := make(map[string]int, len(names))
	held := make(map[string][]int, len(names)) // member -> instance indexes, ascending
	for i := 0; i < in.n; i++ {
		inst := in.Name(i)
		if m, ok := current[inst]; ok && eligible[m] {
			out[inst] = m
			load[m]++
			held[m] = append(held[m], i)
		}
	}
	// Members above their share give up the instances they score lowest.
	for _, m := range names {
		for load[m] > ceil {
			worst := 0
			for k, i := range held[m] {
				if score(in.Name(i), m) < score(in.Name(held[m][worst]), m) {
					worst = k
				}
			}
			delete(out, in.Name(held[m][worst]))
			held[m] = append(held[m][:worst], held[m][worst+1:]...)
			load[m]--
		}
	}
	leastLoaded := func(inst string) string {
		best := ""
		for _, m := range names {
			if best == "" || load[m] < load[best] || (load[m] == load[best] && score(inst, m) > score(inst, best)) {
				best = m
			}
		}
		return best
	}
	for i := 0; i < in.n; i++ {
		inst := in.Name(i)
		if _, ok := out[inst]; ok {
			continue
		}
		m := leastLoaded(inst)
		out[inst] = m
		load[m]++
		held[m] = append(held[m], i)
	}
	// Even out: a newcomer with nothing takes from the busiest.
	for {
		lo, hi := names[0], names[0]
		for _, m := range names {
			if load[m] < load[lo] {
				lo = m
			}
			if load[m] > load[hi] {
				hi = m
			}
		}
		if load[hi]-load[lo] <= 1 {
			break
		}
		best := 0
		for k, i := range held[hi] {
			if score(in.Name(i), lo) > score(in.Name(held[hi][best]), lo) {
				best = k
			}
		}
		i := held[hi][best]
		held[hi] = append(held[hi][:best], held[hi][best+1:]...)
		load[hi]--
		out[in.Name(i)] = lo
		held[lo] = append(held[lo], i)
		load[lo]++
	}
	return out
}
