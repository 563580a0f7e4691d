package kube

import (
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/clock"

	"github.com/shardlb/shardlb/shard"
)

// BenchmarkNodePlan is the cost of one node-loop recompute (gather inputs from the
// caches, BuildPlan), which every debounced change pays in full.
func BenchmarkNodePlan(b *testing.B) {
	for _, c := range []struct {
		name string
		n    int
	}{{"baseline", 100}, {"services-10000", 10000}} {
		b.Run(c.name, func(b *testing.B) {
			insts, err := shard.NewInstances("llb", 3)
			if err != nil {
				b.Fatal(err)
			}
			cfg := DefaultConfig()
			cfg.NodeName, cfg.Instances, cfg.Roles = "n1", insts, true
			svcs := cache.NewStore(cache.MetaNamespaceKeyFunc)
			slices := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{indexByService: sliceServiceIndex})
			for i := range c.n {
				name := fmt.Sprintf("svc-%05d", i)
				_ = svcs.Add(&service{
					ObjectMeta:   metav1.ObjectMeta{Name: name, Namespace: "ns", Annotations: map[string]string{AnnotationInstance: insts.Name(i % 3)}},
					LoadBalancer: true, Class: cfg.LoadBalancerClass,
					Ports:   []servicePort{{Name: "http", Protocol: "TCP", Port: 80}},
					Ingress: []netip.Addr{netip.AddrFrom4([4]byte{10, 30, byte(i >> 8), byte(i)})},
				})
				_ = slices.Add(&endpointSlice{
					ObjectMeta: metav1.ObjectMeta{Name: name + "-1", Namespace: "ns"}, Service: "ns/" + name,
					Ports: []endpointPort{{Name: "http", Protocol: "TCP", Port: 8080}},
					Ready: []netip.Addr{netip.AddrFrom4([4]byte{10, 100, byte(i >> 8), byte(i)})},
				})
			}
			masters := func() map[string]string { return map[string]string{"default": "n1"} }
			n := newNode(&cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), &recorder{}, &recorder{}, svcs, slices, masters, clock.RealClock{}, newMetrics())
			b.ResetTimer()
			for range b.N {
				p := shard.BuildPlan(n.input())
				if len(p.Frontends) != c.n {
					b.Fatalf("%d frontends, want %d", len(p.Frontends), c.n)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/1000, "ms/plan")
		})
	}
}
