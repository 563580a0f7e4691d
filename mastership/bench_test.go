package mastership

import (
	"fmt"
	"testing"
	"time"

	"github.com/shardlb/shardlb/shard"
)

// BenchmarkStep is one member's step with 100 live members and 64 instances, each
// held by a member: baseline with the successors cached (steady state), then with
// them recomputed on every step (a membership change each time).
func BenchmarkStep(b *testing.B) {
	in, _ := shard.NewInstances("llb", 64)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var leases []Lease
	for i := range 100 {
		m := fmt.Sprintf("m%03d", i)
		leases = append(leases, Lease{Name: MemberLeaseName(m), Version: fmt.Sprint(i + 1), Holder: m, Member: &Member{Announcing: true}})
	}
	for i, inst := range in.Names() {
		leases = append(leases, Lease{Name: InstanceLeaseName(inst), Version: fmt.Sprint(1000 + i), Holder: fmt.Sprintf("m%03d", i)})
	}
	for _, tc := range []struct {
		name  string
		churn bool
	}{{"baseline-cached", false}, {"membership-changes", true}} {
		b.Run(tc.name, func(b *testing.B) {
			c := New(Config{Me: "m099", Instances: in, Renew: time.Second, Duration: 4 * time.Second, Grace: time.Second})
			c.memberRenewed = now
			b.ResetTimer()
			for i := range b.N {
				if tc.churn {
					c.succMemo = nil
				}
				c.lastStep = time.Time{}
				c.Step(Input{Now: now.Add(time.Duration(i%100) * time.Millisecond), Leases: leases, Local: Local{Announcing: true}})
				c.Advance(now, nil)
			}
		})
	}
}
