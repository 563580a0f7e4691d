package kube

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/tools/cache"

	"github.com/shardlb/shardlb/shard"
)

var benchSeq atomic.Int64

// latencies records, per service, when it was created and when each stage was seen.
type latencies struct {
	mu      sync.Mutex
	created map[string]time.Time
	seen    map[string]time.Time // stage reached
	vipOf   map[string]string    // VIP -> service, for the advertised stage
	advAt   map[string]time.Time // VIP -> first advertisement
}

func (l *latencies) percentiles() (p50, p99 time.Duration, n int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var ds []time.Duration
	for k, c := range l.created {
		if s, ok := l.seen[k]; ok {
			ds = append(ds, s.Sub(c))
		}
	}
	if len(ds) == 0 {
		return 0, 0, 0
	}
	slices.Sort(ds)
	at := func(q float64) time.Duration { return ds[min(len(ds)-1, int(q*float64(len(ds))))] }
	return at(0.50), at(0.99), len(ds)
}

// BenchmarkServiceLatency measures, over 1,000 services created one after another
// against a real apiserver, the time from Create to:
//   - baseline: the service reaching a watch (the apiserver's own latency),
//   - vip: its VIP in status.loadBalancer.ingress,
//   - advertised: its VIP reaching this pod's Router (the speaker's RIB).
//
// Every service has a ready endpoint (an EndpointSlice created just before it).
func BenchmarkServiceLatency(b *testing.B) {
	const n = 1000
	for _, stage := range []string{"baseline", "vip", "advertised"} {
		b.Run(stage, func(b *testing.B) {
			for range b.N {
				measureLatency(b, stage, n)
			}
		})
	}
}

func measureLatency(b *testing.B, stage string, n int) {
	b.StopTimer()
	e := newEnv(b, fmt.Sprintf("bench-lat-%d", benchSeq.Add(1)))
	lat := &latencies{created: map[string]time.Time{}, seen: map[string]time.Time{}, vipOf: map[string]string{}, advAt: map[string]time.Time{}}
	counts := &writeCounts{}
	var p *pod
	if stage != "baseline" {
		cfg := e.config(b, "bench", "defaultPool=10.20.0.0/16", 3)
		cfg.REST.WrapTransport = countWrites(counts)
		if q := os.Getenv("BENCH_QPS"); q != "" {
			f, _ := strconv.ParseFloat(q, 32)
			cfg.QPS, cfg.Burst = float32(f), int(2*f)
		}
		p = startPod(b, cfg)
		p.rec.mu.Lock()
		p.rec.onSet = func(advs []shard.Advertisement) {
			now := time.Now()
			lat.mu.Lock()
			defer lat.mu.Unlock()
			for _, a := range advs {
				vip := a.Prefix.Addr().String()
				if _, ok := lat.advAt[vip]; !ok {
					lat.advAt[vip] = now
					if svc, ok := lat.vipOf[vip]; ok {
						lat.seen[svc] = now
					}
				}
			}
		}
		p.rec.mu.Unlock()
	}

	// The watcher that observes the stages, like any client would.
	observe := func(obj any) {
		s, ok := obj.(*corev1.Service)
		if !ok {
			return
		}
		now := time.Now()
		lat.mu.Lock()
		defer lat.mu.Unlock()
		switch stage {
		case "baseline":
			if _, ok := lat.seen[s.Name]; !ok {
				lat.seen[s.Name] = now
			}
		case "vip":
			if _, ok := lat.seen[s.Name]; !ok && len(s.Status.LoadBalancer.Ingress) > 0 {
				lat.seen[s.Name] = now
			}
		case "advertised":
			for _, in := range s.Status.LoadBalancer.Ingress {
				lat.vipOf[in.IP] = s.Name
				if t, ok := lat.advAt[in.IP]; ok {
					if _, done := lat.seen[s.Name]; !done {
						lat.seen[s.Name] = t
					}
				}
			}
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, inf := cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: cache.NewListWatchFromClient(e.client.CoreV1().RESTClient(), "services", e.ns, fields.Everything()),
		ObjectType:    &corev1.Service{},
		Handler:       cache.ResourceEventHandlerFuncs{AddFunc: observe, UpdateFunc: func(_, o any) { observe(o) }},
	})
	go inf.Run(ctx.Done())
	cache.WaitForCacheSync(ctx.Done(), inf.HasSynced)
	if p != nil {
		waitFor(b, 30*time.Second, "the controller to lead", func() bool {
			l, err := e.client.CoordinationV1().Leases(e.ns).Get(ctx, ControllerLeaseName, metav1.GetOptions{})
			return err == nil && l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == "bench"
		})
	}

	b.StartTimer()
	start := time.Now()
	for i := range n {
		name := fmt.Sprintf("svc-%04d", i)
		e.createSlice(b, name, fmt.Sprintf("10.244.%d.%d", i/250, i%250+1))
		lat.mu.Lock()
		lat.created[name] = time.Now()
		lat.mu.Unlock()
		e.create(b, e.lbService(name))
	}
	rate := float64(n) / time.Since(start).Seconds()
	waitFor(b, 120*time.Second, "every service to reach "+stage, func() bool {
		_, _, got := lat.percentiles()
		return got == n
	})
	b.StopTimer()
	p50, p99, _ := lat.percentiles()
	b.ReportMetric(float64(p99.Microseconds())/1000, "ms-p99")
	b.ReportMetric(float64(p50.Microseconds())/1000, "ms-p50")
	b.ReportMetric(rate, "svc/s-created")
	if p != nil {
		// Let the Events drain before counting what the pod wrote.
		time.Sleep(2 * time.Second)
		b.ReportMetric(float64(counts.services.Load())/float64(n), "writes/svc-service")
		b.ReportMetric(float64(counts.events.Load())/float64(n), "writes/svc-event")
		p.stop(b)
	}
}

// BenchmarkRSS measures a pod's resident memory (the controller and node loop of a
// process of its own) with no services and with 10,000 services, each with a ready
// endpoint.
func BenchmarkRSS(b *testing.B) {
	for _, c := range []struct {
		name string
		n    int
	}{{"baseline", 0}, {"services-10000", 10000}} {
		b.Run(c.name, func(b *testing.B) {
			for range b.N {
				measureRSS(b, c.n)
			}
		})
	}
}

func measureRSS(b *testing.B, n int) {
	b.StopTimer()
	e := newEnv(b, fmt.Sprintf("bench-rss-%d", benchSeq.Add(1)))
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = e.nodeEnv("rss", 3, "defaultPool=10.30.0.0/16", "", "")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGKILL)
		_ = cmd.Wait()
	}()
	ctx := context.Background()
	b.StartTimer()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			name := fmt.Sprintf("svc-%05d", i)
			e.createSlice(b, name, fmt.Sprintf("10.%d.%d.%d", 100+i/62500, i/250%250, i%250+1))
			e.create(b, e.lbService(name))
		})
	}
	wg.Wait()
	waitFor(b, 10*time.Minute, fmt.Sprintf("%d VIPs in status", n), func() bool {
		list, err := e.client.CoreV1().Services(e.ns).List(ctx, metav1.ListOptions{ResourceVersion: "0"})
		if err != nil {
			return false
		}
		got := 0
		for _, s := range list.Items {
			if len(s.Status.LoadBalancer.Ingress) > 0 {
				got++
			}
		}
		if got < n {
			time.Sleep(2 * time.Second)
		}
		return got == n
	})
	time.Sleep(3 * time.Second) // let the node loop apply the last plan
	b.StopTimer()
	rss, hwm := procMemory(b, cmd.Process.Pid)
	b.ReportMetric(rss, "MiB-rss")
	b.ReportMetric(hwm, "peak-MiB")
}

// procMemory reads VmRSS and VmHWM of a process, in MiB.
func procMemory(b *testing.B, pid int) (rss, hwm float64) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		fs := strings.Fields(v)
		if len(fs) == 0 {
			continue
		}
		kb, _ := strconv.ParseFloat(fs[0], 64)
		switch k {
		case "VmRSS":
			rss = kb / 1024
		case "VmHWM":
			hwm = kb / 1024
		}
	}
	return rss, hwm
}
