package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/shardlb/shardlb/internal/labsys"
	"github.com/shardlb/shardlb/internal/testenv"
)

// The benchmarks share one lab: starting one takes longer than most measurements.
var (
	benchMu   sync.Mutex
	benchDone bool // started, or failed to
	bench     *Lab
	benchVIPs map[netip.Addr]string
	benchErr  error
)

// closeSharedLab closes the benchmarks' lab, for a benchmark that needs a lab of its
// own (only one lab runs at a time); the next sharedLab starts it again.
func closeSharedLab() {
	benchMu.Lock()
	defer benchMu.Unlock()
	if bench != nil {
		bench.Close()
	}
	bench, benchVIPs, benchErr, benchDone = nil, nil, nil, false
}

// sharedLab starts the benchmarks' lab on first use; TestMain closes it.
func sharedLab(b *testing.B) (*Lab, map[netip.Addr]string) {
	b.Helper()
	benchMu.Lock()
	defer benchMu.Unlock()
	start := func() {
		// A throwaway testing.TB would end the lab with the first benchmark; this one
		// lives until TestMain closes it.
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		l, err := Start(ctx, Options{})
		if err != nil {
			benchErr = err
			return
		}
		bench = l
		if benchErr = l.StartNodes(ctx); benchErr != nil {
			return
		}
		if benchErr = l.ApplyExamples(ctx); benchErr != nil {
			return
		}
		benchVIPs = map[netip.Addr]string{}
		for _, svc := range []string{"tcp-lb", "tcp-lb2"} {
			vip, err := l.WaitVIP(ctx, svc, 30*time.Second)
			if err != nil {
				benchErr = err
				return
			}
			inst, err := l.WaitInstance(ctx, svc, 30*time.Second)
			if err != nil {
				benchErr = err
				return
			}
			benchVIPs[vip] = inst
		}
		benchErr = l.WaitSettled(ctx, benchVIPs, 60*time.Second)
	}
	if !benchDone {
		benchDone = true
		start()
	}
	if bench == nil && benchErr != nil {
		// Prerequisites first: the same skip-or-fail rule as the tests.
		startLab(b, 0)
	}
	if benchErr != nil {
		b.Fatalf("lab: %v", benchErr)
	}
	return bench, benchVIPs
}

func TestMain(m *testing.M) {
	code := m.Run()
	if bench != nil {
		bench.Close()
	}
	os.Exit(code)
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// failoverRounds is the "median of 5".
const failoverRounds = 5

// BenchmarkFailover takes the master of tcp-lb's instance out five times per case
// while the client probes both VIPs every 10 ms, and reports the median gap and the
// median number of failed probes of that VIP. Every case runs its five rounds once,
// whatever b.N: a round takes seconds, and the median of five is the measurement.
//
// Each case starts with a rolling restart, outside the measurement, so that every
// case begins from freshly started nodes.
func BenchmarkFailover(b *testing.B) {
	l, vips := sharedLab(b)
	for _, c := range []struct {
		name string
		f    Failure
	}{{"baseline=clean-stop", CleanStop}, {"sigkill", Kill}, {"link-cut", LinkCut}} {
		b.Run(c.name, func(b *testing.B) {
			ctx := context.Background()
			var vip netip.Addr
			for v, inst := range vips {
				if inst == "default" {
					vip = v
				}
			}
			if _, _, err := l.RollingRestart(ctx, vips); err != nil {
				b.Fatal(err)
			}
			var gaps, failed []float64
			for range failoverRounds {
				res, err := l.Failover(ctx, c.f, "default", vips)
				if err != nil {
					b.Fatal(err)
				}
				o := res.Outage[vip]
				b.Logf("%s of %s: %s: %s; errors %v", c.f, res.Master, vip, o, o.Errors)
				if o.Failed > 0 && (c.f == CleanStop || o.Gap > 500*time.Millisecond) {
					b.Logf("timeline:\n%s", strings.Join(res.Timeline, "\n"))
				}
				gaps = append(gaps, float64(o.Gap)/float64(time.Millisecond))
				failed = append(failed, float64(o.Failed))
			}
			// Go prints custom metrics sorted by unit, and benchtab compares the first:
			// the units are named so that the median gap comes first.
			b.ReportMetric(median(gaps), "gap-ms")
			b.ReportMetric(slices.Max(gaps), "worst-gap-ms")
			b.ReportMetric(median(failed), "lost-probes")
			b.ReportMetric(0, "ns/op") // the time of five rounds says nothing
		})
	}
}

var wrkRate = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)

// wrk runs wrk from the client namespace for d and returns requests per second.
func wrk(target netip.AddrPort, d time.Duration) (float64, error) {
	out, err := labsys.NSRun(clientNS, "wrk", "-t1", "-c16", fmt.Sprintf("-d%ds", int(d.Seconds())), "http://"+target.String()+"/")
	if err != nil {
		return 0, err
	}
	m := wrkRate.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("no rate in wrk's output: %s", out)
	}
	return strconv.ParseFloat(m[1], 64)
}

// BenchmarkRequests measures HTTP requests per second from the client (16 keep-alive
// connections) straight to the pod (baseline: through the router only) and through
// tcp-lb's VIP (router, then the master node's eBPF datapath). Runs alternate, three
// of two seconds each, and the median counts.
func BenchmarkRequests(b *testing.B) {
	l, vips := sharedLab(b)
	testenv.RequireTool(b, "wrk")
	var vip netip.Addr
	for v, inst := range vips {
		if inst == "default" {
			vip = v
		}
	}
	pod := l.pods["tcp-test"]
	cases := []struct {
		name   string
		target netip.AddrPort
	}{
		{"baseline=direct-to-pod", netip.AddrPortFrom(pod.addr, pod.port)},
		{"through-vip", netip.AddrPortFrom(vip, vipPort)},
	}
	rates := make([][]float64, len(cases))
	for range 3 {
		for i, c := range cases {
			r, err := wrk(c.target, 2*time.Second)
			if err != nil {
				b.Fatal(err)
			}
			rates[i] = append(rates[i], r)
		}
	}
	for i, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			b.ReportMetric(median(rates[i]), "req/s")
			b.ReportMetric(0, "ns/op") // measured above, not per b.N
		})
	}
}

// BenchmarkServiceCreate measures, five times, from creating a LoadBalancer Service
// (its pod already running, its EndpointSlice written right after, as the
// controller-manager would) until its VIP is in the Service's status (baseline: the
// controller's part) and until the client first gets the page through the VIP
// (routes announced, the router's FIB and the datapath programmed).
func BenchmarkServiceCreate(b *testing.B) {
	l, _ := sharedLab(b)
	ctx := context.Background()
	pods := l.Kube.CoreV1().Pods(namespace)
	if _, err := pods.Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "bench", Labels: map[string]string{"what": "bench"}},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "nginx", Image: "nginx", Ports: []corev1.ContainerPort{{ContainerPort: 80}}}}},
	}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	if err := l.RunPods(ctx); err != nil {
		b.Fatal(err)
	}
	var toStatus, toReachable []float64
	for i := range failoverRounds {
		name := fmt.Sprintf("bench-%d", i)
		svcs := l.Kube.CoreV1().Services(namespace)
		start := time.Now()
		_, err := svcs.Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{"loxilb.io/lbmode": "onearm"}},
			Spec: corev1.ServiceSpec{
				Type: corev1.ServiceTypeLoadBalancer, LoadBalancerClass: ptr("loxilb.io/loxilb"),
				Selector: map[string]string{"what": "bench"},
				Ports:    []corev1.ServicePort{{Port: vipPort, TargetPort: intstr.FromInt32(80), Protocol: corev1.ProtocolTCP}},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			b.Fatal(err)
		}
		if err := l.syncEndpointSlices(ctx); err != nil {
			b.Fatal(err)
		}
		vip, err := l.WaitVIP(ctx, name, 30*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		toStatus = append(toStatus, float64(time.Since(start))/float64(time.Millisecond))
		err = waitFor(ctx, 30*time.Second, "the page through "+vip.String(), func() error {
			_, err := l.client.get(ctx, netip.AddrPortFrom(vip, vipPort), 200*time.Millisecond)
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
		toReachable = append(toReachable, float64(time.Since(start))/float64(time.Millisecond))
		if err := svcs.Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			b.Fatal(err)
		}
		_ = l.Kube.DiscoveryV1().EndpointSlices(namespace).Delete(ctx, name+"-lab", metav1.DeleteOptions{})
		// The VIP goes back to the pool: wait until the router has dropped it.
		if err := waitFor(ctx, 30*time.Second, "the route of "+vip.String()+" to go", func() error {
			hops, err := l.Router.KernelRoute(netip.PrefixFrom(vip, 32))
			if err == nil && len(hops) > 0 {
				err = fmt.Errorf("still via %v", hops)
			}
			return err
		}); err != nil {
			b.Fatal(err)
		}
	}
	for _, c := range []struct {
		name string
		ms   []float64
	}{{"baseline=vip-in-status", toStatus}, {"reachable-from-client", toReachable}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportMetric(median(c.ms), "ms")
			b.ReportMetric(0, "ns/op") // measured above, not per b.N
		})
	}
}
