package kube

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/clock"

	"github.com/shardlb/shardlb/shard"
)

// discard is a Router and a Datapath that cost nothing, so that a benchmark measures
// the node loop's own work.
type discard struct{}

func (discard) SetAdvertisements(context.Context, []shard.Advertisement) error { return nil }
func (discard) Announcing() bool                                               { return true }
func (discard) Flush(context.Context) error                                    { return nil }
func (discard) SetServices([]shard.Frontend) error                             { return nil }

// benchNode is a node over n services of three instances, each with one VIP and one
// EndpointSlice with one ready endpoint; this node masters "default".
type benchNode struct {
	*node
	svcs       cache.Store
	slices     cache.Indexer
	masters    map[string]string
	svcEvents  cache.ResourceEventHandler
	sliceEvent cache.ResourceEventHandler
}

func newBenchNode(tb testing.TB, n int, r Router, d Datapath) *benchNode {
	tb.Helper()
	insts, err := shard.NewInstances("llb", 3)
	if err != nil {
		tb.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.NodeName, cfg.Instances, cfg.Roles = "n1", insts, true
	bn := &benchNode{
		svcs:    cache.NewStore(cache.MetaNamespaceKeyFunc),
		slices:  cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{indexByService: sliceServiceIndex}),
		masters: map[string]string{"default": "n1", "llb-inst1": "n2", "llb-inst2": "n3"},
	}
	for i := range n {
		_ = bn.svcs.Add(benchService(&cfg, i))
		_ = bn.slices.Add(benchSlice(i, 0))
	}
	masters := func() map[string]string { return maps.Clone(bn.masters) }
	bn.node = newNode(&cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), r, d, bn.svcs, bn.slices, masters, clock.RealClock{}, newMetrics())
	bn.svcEvents, bn.sliceEvent = keyHandler(bn.touch), sliceHandler(bn.touch)
	return bn
}

func benchService(cfg *Config, i int) *service {
	return &service{
		ObjectMeta:   metav1.ObjectMeta{Name: fmt.Sprintf("svc-%05d", i), Namespace: "ns", Annotations: map[string]string{AnnotationInstance: cfg.Instances.Name(i % 3)}},
		LoadBalancer: true, Class: cfg.LoadBalancerClass,
		Ports:   []servicePort{{Name: "http", Protocol: "TCP", Port: 80}},
		Ingress: []netip.Addr{netip.AddrFrom4([4]byte{10, 30, byte(i >> 8), byte(i)})},
	}
}

// benchSlice is service i's EndpointSlice in version v: its endpoint moves with v.
func benchSlice(i, v int) *endpointSlice {
	name := fmt.Sprintf("svc-%05d", i)
	return &endpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: name + "-1", Namespace: "ns"}, Service: "ns/" + name,
		Ports: []endpointPort{{Name: "http", Protocol: "TCP", Port: 8080}},
		Ready: []netip.Addr{netip.AddrFrom4([4]byte{10, 100 + byte(v%2), byte(i >> 8), byte(i)})},
	}
}

// input is the whole input of shard.BuildPlan over the caches, as the node loop
// gathered it before the Planner: the reference the Planner's Plan must equal.
func (n *node) input() shard.Input {
	in := shard.Input{Node: n.cfg.NodeName, Roles: n.cfg.Roles, Masters: n.masters()}
	if n.handoffs != nil {
		in.Handoffs = n.handoffs()
	}
	for _, o := range n.services.List() {
		if s, ok := o.(*service); ok {
			if ps, ok := n.planService(s); ok {
				in.Services = append(in.Services, ps)
			}
		}
	}
	return in
}

// fullApply is the node loop as it was before the Planner: the whole input gathered,
// BuildPlan, each half compared with reflect.DeepEqual with what was applied.
func (bn *benchNode) fullApply(ctx context.Context, last *shard.Plan) {
	plan := shard.BuildPlan(bn.input())
	if !reflect.DeepEqual(plan.Frontends, last.Frontends) {
		_ = bn.datapath.SetServices(plan.Frontends)
	}
	if !reflect.DeepEqual(plan.Advertisements, last.Advertisements) {
		_ = bn.router.SetAdvertisements(ctx, plan.Advertisements)
	}
	bn.metrics.observePlan(plan)
	*last = plan
}

// cpuTime is the CPU time this process has used (garbage collection included).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkNodePlan is the node loop's cost of one change at 10,000 services, the
// Router and the Datapath costing nothing (each row's cpu-us/change counts garbage
// collection). The baseline is the loop's floor: one EndpointSlice's endpoints
// changed, applied incrementally (shard.Planner). full-recompute-endpoints is the
// same change through the loop as it was before the Planner (gather every service,
// BuildPlan, compare whole plans), so its ratio is what the Planner saves; the other
// rows are one service removed or added back, and the masters of one instance (a
// third of the VIPs change role) changed.
func BenchmarkNodePlan(b *testing.B) {
	const n = 10000
	ctx := context.Background()
	for _, c := range []struct {
		name   string
		change func(bn *benchNode, i int)
		full   bool
	}{
		{"baseline=endpoints", changeEndpoints, false},
		{"full-recompute-endpoints", changeEndpoints, true},
		{"service-removed-added", changeService, false},
		{"masters-of-one-instance", changeMasters, false},
	} {
		b.Run(c.name, func(b *testing.B) {
			bn := newBenchNode(b, n, discard{}, discard{})
			var last shard.Plan
			if c.full {
				bn.fullApply(ctx, &last)
			} else if err := bn.apply(ctx); err != nil {
				b.Fatal(err)
			}
			i := 0
			cpu := cpuTime()
			b.ResetTimer()
			for b.Loop() {
				i++
				c.change(bn, i)
				if c.full {
					bn.fullApply(ctx, &last)
				} else if err := bn.apply(ctx); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			ops := float64(b.N)
			b.ReportMetric(float64((cpuTime()-cpu).Microseconds())/ops, "cpu-us/change")
			b.ReportMetric(float64(b.Elapsed().Microseconds())/ops, "us/change")
			b.ReportMetric(0, "ns/op") // us/change says it
			if p, _ := bn.plan(); !c.full && len(p.Frontends) < n-1 {
				b.Fatalf("%d frontends, want about %d", len(p.Frontends), n)
			}
		})
	}
}

func changeEndpoints(bn *benchNode, i int) {
	old := benchSlice(4242, i-1)
	upd := benchSlice(4242, i)
	_ = bn.slices.Update(upd)
	bn.sliceEvent.OnUpdate(old, upd)
}

func changeService(bn *benchNode, i int) {
	s := benchService(bn.cfg, 4242)
	if i%2 == 1 {
		_ = bn.svcs.Delete(s)
		bn.svcEvents.OnDelete(s)
	} else {
		_ = bn.svcs.Add(s)
		bn.svcEvents.OnAdd(s, false)
	}
}

func changeMasters(bn *benchNode, i int) {
	bn.masters["default"] = []string{"n1", "n2"}[i%2]
}

// failingDatapath refuses every SetServices while fail is set, and otherwise records.
type failingDatapath struct {
	recorder
	fail bool
}

func (d *failingDatapath) SetServices(desired []shard.Frontend) error {
	if d.fail {
		return errors.New("datapath refused")
	}
	return d.recorder.SetServices(desired)
}

// TestNodePlanFollowsEveryChange drives the node loop through random histories of
// Service and EndpointSlice events (the informers' handlers marking services dirty),
// master and handoff changes and failed applies, and checks after every apply that
// the Datapath and the Router hold exactly BuildPlan's Plan over the caches. Services
// share VIPs across instances, and EndpointSlices move from one service to another.
func TestNodePlanFollowsEveryChange(t *testing.T) {
	ctx := context.Background()
	for seed := range uint64(40) {
		r := rand.New(rand.NewPCG(seed, 5))
		dp := &failingDatapath{}
		rt := &recorder{}
		bn := newBenchNode(t, 0, rt, dp)
		var handoffs map[string][]netip.Addr
		bn.handoffs = func() map[string][]netip.Addr { return handoffs }
		name := func() string { return fmt.Sprintf("svc-%05d", r.IntN(8)) }
		vips := []netip.Addr{netip.MustParseAddr("10.30.0.1"), netip.MustParseAddr("10.30.0.2"), netip.MustParseAddr("10.30.0.3"), netip.MustParseAddr("fd00::1")}
		for step := range 300 {
			switch op := r.IntN(10); {
			case op < 3: // a service added, changed or deleted
				s := benchService(bn.cfg, r.IntN(8))
				s.Name = name()
				s.Ingress = []netip.Addr{vips[r.IntN(len(vips))]}
				s.Annotations[AnnotationInstance] = []string{"default", "llb-inst1", "llb-inst2", ""}[r.IntN(4)]
				if r.IntN(6) == 0 {
					s.Class = "someone-else"
				}
				if r.IntN(4) == 0 {
					_ = bn.svcs.Delete(s)
					bn.svcEvents.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/" + s.Name, Obj: s})
				} else {
					_ = bn.svcs.Update(s)
					bn.svcEvents.OnUpdate(nil, s)
				}
			case op < 6: // an EndpointSlice added, moved to another service, or deleted
				es := benchSlice(0, r.IntN(2))
				es.Name = fmt.Sprintf("slice-%d", r.IntN(10))
				es.Service = "ns/" + name()
				var old any = es
				if o, ok, _ := bn.slices.Get(es); ok {
					old = o
				}
				if r.IntN(4) == 0 {
					_ = bn.slices.Delete(es)
					bn.sliceEvent.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/" + es.Name, Obj: old})
				} else {
					_ = bn.slices.Update(es)
					bn.sliceEvent.OnUpdate(old, es)
				}
			case op < 7:
				bn.masters["default"] = []string{"n1", "n2"}[r.IntN(2)]
				bn.masters["llb-inst1"] = []string{"n1", "n3"}[r.IntN(2)]
				handoffs = nil
				if r.IntN(2) == 0 {
					handoffs = map[string][]netip.Addr{[]string{"default", "llb-inst1"}[r.IntN(2)]: {netip.MustParseAddr("192.0.2.7")}}
				}
			case op < 8:
				dp.fail = r.IntN(3) == 0
			default:
				// A failing datapath fails the apply only if the frontends changed.
				if err := bn.apply(ctx); err != nil {
					if !dp.fail {
						t.Fatalf("seed %d, step %d: apply: %v", seed, step, err)
					}
					continue
				}
				want := shard.BuildPlan(bn.input())
				got := shard.Plan{Advertisements: rt.advertisements(), Frontends: dp.frontends}
				if !reflect.DeepEqual(normalPlan(got), normalPlan(want)) {
					t.Fatalf("seed %d, step %d: applied\n%+v\nwant BuildPlan's\n%+v", seed, step, got, want)
				}
			}
		}
	}
}

func normalPlan(p shard.Plan) shard.Plan {
	if len(p.Advertisements) == 0 {
		p.Advertisements = nil
	}
	if len(p.Frontends) == 0 {
		p.Frontends = nil
	}
	return p
}
