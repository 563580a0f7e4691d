package kube

import (
	"slices"
	"testing"

	"github.com/shardlb/shardlb/config"
	"github.com/shardlb/shardlb/ipam"
)

// TestPoolCandidatesOrder: the order in which a service without a pool of its own
// choosing tries the pools (pool.go).
func TestPoolCandidatesOrder(t *testing.T) {
	flags, err := ipam.ParsePools("defaultPool=10.0.0.0/24,extra=10.0.1.0/24")
	if err != nil {
		t.Fatal(err)
	}
	v6, err := ipam.ParsePools("defaultPool=fd00::/120")
	if err != nil {
		t.Fatal(err)
	}
	flags = append(flags, v6...)
	obj := func(name string, prio int32, restricted, auto bool) config.Pool {
		p := config.Pool{Name: name, AutoAssign: auto, Priority: prio,
			Ranges: []ipam.PoolSpec{{Name: name, First: flags[0].First, Last: flags[0].First}}}
		if restricted {
			p.Namespaces = []string{"ns"}
		}
		return p
	}
	d, _ := config.Build(config.Flags{Pools: flags}, config.Objects{}, config.Node{})
	all := func(*config.Pool) bool { return true }
	for _, tc := range []struct {
		desc    string
		objects []config.Pool
		fam     ipam.Family
		admits  func(*config.Pool) bool
		want    []string
	}{
		{"flags alone: the first flag pool of the family, as kube-loxilb's default pool", nil, ipam.IPv4, all, []string{"defaultPool"}},
		{"flags alone, IPv6", nil, ipam.IPv6, all, []string{"defaultPool"}},
		{"a pool without priority comes after the flags'", []config.Pool{obj("a", 0, false, true)}, ipam.IPv4, all, []string{"defaultPool", "a"}},
		{"a priority comes first, lowest first", []config.Pool{obj("a", 0, false, true), obj("b", 20, false, true), obj("c", 10, false, true)}, ipam.IPv4, all, []string{"c", "b", "defaultPool", "a"}},
		{"a restricted pool comes before unrestricted ones of its priority", []config.Pool{obj("a", 0, false, true), obj("z", 0, true, true)}, ipam.IPv4, all, []string{"z", "defaultPool", "a"}},
		{"a pool that does not auto-assign is never a candidate", []config.Pool{obj("a", 1, false, false)}, ipam.IPv4, all, []string{"defaultPool"}},
		{"a pool that does not admit the service is never a candidate", []config.Pool{obj("z", 1, true, true)}, ipam.IPv4, func(p *config.Pool) bool { return !p.Restricted() }, []string{"defaultPool"}},
		{"a pool of the other family is not a candidate", []config.Pool{obj("a", 1, false, true)}, ipam.IPv6, all, []string{"defaultPool"}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			set := newPoolSet(append(slices.Clone(d.Pools), tc.objects...), flags)
			if got := set.candidates(tc.fam, tc.admits); !slices.Equal(got, tc.want) {
				t.Errorf("candidates = %v, want %v", got, tc.want)
			}
		})
	}
}
