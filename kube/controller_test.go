package kube

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	"github.com/shardlb/shardlb/shard"
)

// The guide's example: --cidrPools=defaultPool=192.168.80.250/24 --setUniqueIP
// --numZoneInstances=3 --setRoles=0.0.0.0, then tcp-lb and tcp-lb2 pinned to llb-inst2.
func TestGuideServicesGetVIPsAndInstances(t *testing.T) {
	e := newEnv(t, "guide")
	cfg := e.config(t, "master1", "defaultPool=192.168.80.250/24", 3)
	cfg.APIAddress, cfg.MetricsAddress = freeAddr(t), freeAddr(t)
	peers := func() []BGPPeer {
		return []BGPPeer{{Peer: "192.168.80.1", AS: 64512, State: "ESTABLISHED", Uptime: "00:01:02"}}
	}
	// The shutdown order is checked where it happens: when the routes are withdrawn,
	// this pod's member Lease must still exist.
	var withdrawnWithLease atomic.Int32 // 0 not yet, 1 lease present, 2 lease gone
	announced := false                  // guarded by the recorder's lock, like onSet
	rec := &recorder{onSet: func(advs []shard.Advertisement) {
		if len(advs) > 0 {
			announced = true
		}
		if !announced || len(advs) > 0 || withdrawnWithLease.Load() != 0 {
			return
		}
		_, err := e.client.CoordinationV1().Leases(e.ns).Get(context.Background(), MemberLeaseName("master1"), metav1.GetOptions{})
		if err == nil {
			withdrawnWithLease.Store(1)
		} else {
			withdrawnWithLease.Store(2)
		}
	}}
	p := startPodWith(t, cfg, rec, peers)

	e.createSlice(t, "tcp-lb", "10.244.1.10")
	local := func(s *corev1.Service) { s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal }
	e.create(t, e.lbService("tcp-lb", annotate(AnnotationLBMode, "onearm"), local))
	waitFor(t, 10*time.Second, "tcp-lb's VIP", func() bool { return len(ingressIPs(e.get(t, "tcp-lb"))) > 0 })
	e.createSlice(t, "tcp-lb2", "10.244.2.10")
	e.create(t, e.lbService("tcp-lb2", annotate(AnnotationLBMode, "onearm"), annotate(AnnotationZoneInstance, "llb-inst2"), local))
	waitFor(t, 10*time.Second, "tcp-lb2's VIP", func() bool { return len(ingressIPs(e.get(t, "tcp-lb2"))) > 0 })

	for _, want := range []struct{ name, vip, instance string }{
		{"tcp-lb", "192.168.80.250", "default"},
		{"tcp-lb2", "192.168.80.251", "llb-inst2"},
	} {
		s := e.get(t, want.name)
		if got := ingressIPs(s); !slices.Equal(got, []string{want.vip}) {
			t.Errorf("%s: status ingress %v, want [%s]", want.name, got, want.vip)
		}
		if got := s.Annotations[AnnotationInstance]; got != want.instance {
			t.Errorf("%s: %s = %q, want %q", want.name, AnnotationInstance, got, want.instance)
		}
		waitFor(t, 5*time.Second, want.name+"'s events", func() bool {
			ev := e.events(t, want.name)
			return slices.Contains(ev, "Normal "+ReasonIPAllocated) && slices.Contains(ev, "Normal "+ReasonShardAssigned)
		})
	}

	// Alone, this pod masters every instance and announces both VIPs as master.
	waitFor(t, 10*time.Second, "both VIPs announced as master", func() bool {
		advs := p.rec.advertisements()
		return len(advs) == 2 && advs[0].Role == shard.RoleMaster && advs[1].Role == shard.RoleMaster &&
			advs[0].Instance == "default" && advs[1].Instance == "llb-inst2"
	})

	var out bytes.Buffer
	if err := Get(context.Background(), cfg.APIAddress, "services", "table", &out); err != nil {
		t.Fatal(err)
	}
	want := `| SERVICE       | VIP            | INSTANCE  | MASTER  |
|---------------|----------------|-----------|---------|
| guide/tcp-lb  | 192.168.80.250 | default   | master1 |
| guide/tcp-lb2 | 192.168.80.251 | llb-inst2 | master1 |
`
	if out.String() != want {
		t.Errorf("get services:\n%s\nwant:\n%s", out.String(), want)
	}
	out.Reset()
	if err := Get(context.Background(), cfg.APIAddress, "ha", "table", &out); err != nil {
		t.Fatal(err)
	}
	want = `| INSTANCE  | HASTATE |
|-----------|---------|
| default   | MASTER  |
| llb-inst1 | MASTER  |
| llb-inst2 | MASTER  |
`
	if out.String() != want {
		t.Errorf("get ha:\n%s\nwant:\n%s", out.String(), want)
	}
	out.Reset()
	if err := Get(context.Background(), cfg.APIAddress, "lb", "json", &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), `"mode": "onearm"`) || !strings.Contains(out.String(), `"10.244.2.10:80"`) {
		t.Errorf("get lb -o json lacks the onearm mode or the endpoint:\n%s", out.String())
	}
	out.Reset()
	if err := Get(context.Background(), cfg.APIAddress, "bgp", "table", &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "| 192.168.80.1 | 64512 | 00:01:02 | ESTABLISHED |") {
		t.Errorf("get bgp:\n%s", out.String())
	}

	for _, series := range []string{
		`shardlb_instance_role{role="MASTER",shard="llb-inst2"}`,
		`shardlb_bgp_session_state{peer="192.168.80.1",state="ESTABLISHED"}`,
		`shardlb_vips{role="MASTER"}`,
		`shardlb_pool_used_addresses{pool="defaultPool"}`,
	} {
		want := 1.0
		if strings.HasPrefix(series, "shardlb_vips") || strings.HasPrefix(series, "shardlb_pool") {
			want = 2
		}
		if got := metricValue(t, cfg.MetricsAddress, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get("http://" + cfg.MetricsAddress + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("%s: %s", path, resp.Status)
		}
	}

	// Shutdown: routes withdrawn while the Leases still exist, then the Leases let go.
	p.stop(t)
	if got := withdrawnWithLease.Load(); got != 1 {
		t.Errorf("routes withdrawn with member lease state %d, want 1 (still held)", got)
	}
	if _, err := e.client.CoordinationV1().Leases(e.ns).Get(context.Background(), MemberLeaseName("master1"), metav1.GetOptions{}); err == nil {
		t.Errorf("member lease still exists after shutdown")
	}
	for _, inst := range []string{"default", "llb-inst1", "llb-inst2"} {
		l, err := e.client.CoordinationV1().Leases(e.ns).Get(context.Background(), InstanceLeaseName(inst), metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if h := ptr.Deref(l.Spec.HolderIdentity, ""); h != "" {
			t.Errorf("lease of %s still held by %q after shutdown", inst, h)
		}
	}
}

// Every refusal is a Warning Event on the service concerned, and nothing else moves.
func TestRefusalsWarnOnTheirServiceOnly(t *testing.T) {
	e := newEnv(t, "refusals")
	cfg := e.config(t, "node-a", "defaultPool=10.10.0.1-10.10.0.3", 3)
	startPod(t, cfg)

	for _, n := range []string{"good1", "good2", "good3"} {
		e.create(t, e.lbService(n))
		waitFor(t, 10*time.Second, n+"'s VIP", func() bool { return len(ingressIPs(e.get(t, n))) > 0 })
	}
	before := map[string]*corev1.Service{}
	for _, n := range []string{"good1", "good2", "good3"} {
		before[n] = e.get(t, n)
	}
	good1IP := ingressIPs(before["good1"])[0]

	bad := []struct {
		name   string
		opts   []svcOpt
		reason string
	}{
		{"bad-lbmode", []svcOpt{annotate(AnnotationLBMode, "sideways")}, ReasonInvalidAnnotation},
		{"bad-static", []svcOpt{annotate(AnnotationStaticIP, "10.10.0.999")}, ReasonInvalidAnnotation},
		{"bad-instance", []svcOpt{annotate(AnnotationZoneInstance, "llb-inst9")}, ReasonUnknownInstance},
		{"conflict", []svcOpt{annotate(AnnotationStaticIP, good1IP)}, ReasonStaticIPConflict},
		{"exhausted", nil, ReasonPoolExhausted},
	}
	for _, b := range bad {
		e.create(t, e.lbService(b.name, b.opts...))
	}
	for _, b := range bad {
		t.Run(b.name+" gets a "+b.reason+" warning and no VIP", func(t *testing.T) {
			waitFor(t, 10*time.Second, b.name+"'s warning", func() bool {
				return slices.Contains(e.events(t, b.name), "Warning "+b.reason)
			})
			s := e.get(t, b.name)
			if len(ingressIPs(s)) != 0 || s.Annotations[AnnotationInstance] != "" {
				t.Errorf("%s: got VIP %v instance %q, want neither", b.name, ingressIPs(s), s.Annotations[AnnotationInstance])
			}
			for _, ev := range e.events(t, b.name) {
				if ev != "Warning "+b.reason {
					t.Errorf("%s: unexpected event %q", b.name, ev)
				}
			}
		})
	}
	for n, was := range before {
		now := e.get(t, n)
		if now.ResourceVersion != was.ResourceVersion {
			t.Errorf("%s was written to (resourceVersion %s -> %s) while others were refused", n, was.ResourceVersion, now.ResourceVersion)
		}
	}

	// Freeing addresses serves the waiting services at once: good1's address goes to
	// the service that asked for it statically, good2's to the one that found the pool
	// empty.
	ctx := context.Background()
	for _, n := range []string{"good1", "good2"} {
		if err := e.client.CoreV1().Services(e.ns).Delete(ctx, n, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, "conflict to get "+good1IP, func() bool {
		return slices.Equal(ingressIPs(e.get(t, "conflict")), []string{good1IP})
	})
	waitFor(t, 10*time.Second, "exhausted to get good2's address", func() bool {
		return slices.Equal(ingressIPs(e.get(t, "exhausted")), ingressIPs(before["good2"]))
	})
	if now := e.get(t, "good3"); now.ResourceVersion != before["good3"].ResourceVersion {
		t.Errorf("good3 was written to while others were served")
	}
}

// A service that stops being ours (type change) loses what we wrote and frees its VIP.
func TestTypeChangeReleasesTheVIP(t *testing.T) {
	e := newEnv(t, "typechange")
	cfg := e.config(t, "node-a", "defaultPool=10.11.0.1-10.11.0.1", 1)
	startPod(t, cfg)
	e.create(t, e.lbService("first"))
	waitFor(t, 10*time.Second, "first's VIP", func() bool { return len(ingressIPs(e.get(t, "first"))) > 0 })
	e.create(t, e.lbService("second"))
	waitFor(t, 10*time.Second, "second to find the pool empty", func() bool {
		return slices.Contains(e.events(t, "second"), "Warning "+ReasonPoolExhausted)
	})

	patch := []byte(`{"spec":{"type":"ClusterIP","loadBalancerClass":null,"allocateLoadBalancerNodePorts":null,"externalTrafficPolicy":null}}`)
	if _, err := e.client.CoreV1().Services(e.ns).Patch(context.Background(), "first", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "second to get the freed VIP", func() bool {
		return slices.Equal(ingressIPs(e.get(t, "second")), []string{"10.11.0.1"})
	})
	waitFor(t, 10*time.Second, "first to lose our annotation and VIP", func() bool {
		s := e.get(t, "first")
		return len(ingressIPs(s)) == 0 && s.Annotations[AnnotationInstance] == ""
	})
}

// writeCounts counts the API writes a client makes, by resource.
type writeCounts struct {
	services atomic.Int64 // writes to Services (metadata or status)
	events   atomic.Int64
	leases   atomic.Int64
}

type countingTransport struct {
	next http.RoundTripper
	c    *writeCounts
}

func (t *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method != http.MethodGet {
		switch {
		case strings.Contains(r.URL.Path, "/services"):
			t.c.services.Add(1)
		case strings.Contains(r.URL.Path, "/events"):
			t.c.events.Add(1)
		case strings.Contains(r.URL.Path, "/leases"):
			t.c.leases.Add(1)
		}
	}
	return t.next.RoundTrip(r)
}

func countWrites(c *writeCounts) func(http.RoundTripper) http.RoundTripper {
	return func(rt http.RoundTripper) http.RoundTripper { return &countingTransport{next: rt, c: c} }
}

// A restarted controller rebuilds its state from the services and changes nothing.
func TestRestartedControllerChangesNothing(t *testing.T) {
	const n = 200
	e := newEnv(t, "restart")
	cfg := e.config(t, "node-a", "defaultPool=10.12.0.0/24", 3)
	firstWrites := &writeCounts{}
	cfg.REST.WrapTransport = countWrites(firstWrites)
	first := startPod(t, cfg)

	// Created in parallel so that the order of allocation is not the order of names.
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			opts := []svcOpt{}
			if i%10 == 0 {
				opts = append(opts, annotate(AnnotationZoneInstance, "llb-inst2"))
			}
			e.create(t, e.lbService(fmt.Sprintf("svc-%03d", i), opts...))
		})
	}
	wg.Wait()
	snapshot := func() map[string]string {
		list, err := e.client.CoreV1().Services(e.ns).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, s := range list.Items {
			if len(s.Status.LoadBalancer.Ingress) > 0 && s.Annotations[AnnotationInstance] != "" {
				out[s.Name] = fmt.Sprintf("%v %s rv=%s", ingressIPs(&s), s.Annotations[AnnotationInstance], s.ResourceVersion)
			}
		}
		return out
	}
	var before map[string]string
	waitFor(t, 60*time.Second, "every service allocated", func() bool { before = snapshot(); return len(before) == n })
	first.stop(t)
	// One annotation and one status write per service: no decision was taken twice.
	if w := firstWrites.services.Load(); w != 2*n {
		t.Errorf("the first controller wrote %d times to services, want %d", w, 2*n)
	}

	counter := &writeCounts{}
	cfg2 := e.config(t, "node-b", "defaultPool=10.12.0.0/24", 3)
	cfg2.REST.WrapTransport = countWrites(counter)
	cfg2.MetricsAddress = freeAddr(t)
	startPod(t, cfg2)
	// The new controller has reconciled every service once it reports n reconciles.
	waitFor(t, 30*time.Second, "the new controller to reconcile every service", func() bool {
		return metricValue(t, cfg2.MetricsAddress, `shardlb_reconcile_duration_seconds_count{loop="controller"}`) >= n &&
			metricValue(t, cfg2.MetricsAddress, "shardlb_controller_leader") == 1
	})
	after := snapshot()
	for k, v := range before {
		if after[k] != v {
			t.Errorf("%s changed across the restart: %s -> %s", k, v, after[k])
		}
	}
	if w := counter.services.Load(); w != 0 {
		t.Errorf("the restarted controller wrote %d times to services, want 0", w)
	}
	if w := counter.events.Load(); w != 0 {
		t.Errorf("the restarted controller recorded %d events, want 0", w)
	}

	// And it still allocates: a new service gets a VIP nobody holds.
	e.create(t, e.lbService("newcomer"))
	waitFor(t, 10*time.Second, "newcomer's VIP", func() bool { return len(ingressIPs(e.get(t, "newcomer"))) > 0 })
	vip := ingressIPs(e.get(t, "newcomer"))[0]
	for k, v := range before {
		if strings.Contains(v, "["+vip+"]") {
			t.Errorf("newcomer got %s, already held by %s", vip, k)
		}
	}
}

// metricValue reads one sample from a pod's /metrics; -1 when absent.
func metricValue(t *testing.T, addr, series string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			var v float64
			if _, err := fmt.Sscan(rest, &v); err == nil {
				return v
			}
		}
	}
	return -1
}

var orderSeq atomic.Int64

// Services waiting for a VIP are served in creation order whatever the interleaving of
// the workers, whether they were created before, while or after the controller started
// leading: the n-th service created gets the n-th address and the n-th instance in
// turn. creationTimestamp has whole seconds, so ties are broken by name; the names here
// sort in creation order. One worker per service makes every worker race for the
// services restored at once.
func TestVIPsFollowCreationOrder(t *testing.T) {
	const n = 20
	instances := []string{"default", "llb-inst1", "llb-inst2"}
	for _, workers := range []int{DefaultConfig().ControllerWorkers, n} {
		for _, c := range []struct {
			when   string
			before int // services created before the pod starts; the rest once it leads
		}{
			{"after the controller leads", 0},
			{"before and after the controller starts leading", n / 2},
			{"before the controller leads", n},
		} {
			t.Run(fmt.Sprintf("with %d workers, services created %s get VIPs in creation order", workers, c.when), func(t *testing.T) {
				e := newEnv(t, fmt.Sprintf("order-%d", orderSeq.Add(1)))
				cfg := e.config(t, "node-a", fmt.Sprintf("defaultPool=10.13.0.1-10.13.0.%d", n), len(instances))
				cfg.MetricsAddress, cfg.ControllerWorkers = freeAddr(t), workers
				names := make([]string, n)
				for i := range names {
					names[i] = fmt.Sprintf("svc-%02d", i)
				}
				for _, name := range names[:c.before] {
					e.create(t, e.lbService(name))
				}
				startPod(t, cfg)
				waitFor(t, 30*time.Second, "the controller to lead", func() bool {
					return metricValue(t, cfg.MetricsAddress, "shardlb_controller_leader") == 1
				})
				for _, name := range names[c.before:] {
					e.create(t, e.lbService(name))
				}

				var got []*corev1.Service
				waitFor(t, 30*time.Second, "every service's VIP and instance", func() bool {
					got = got[:0]
					for _, name := range names {
						s := e.get(t, name)
						if len(ingressIPs(s)) == 0 || s.Annotations[AnnotationInstance] == "" {
							return false
						}
						got = append(got, s)
					}
					return true
				})
				var table strings.Builder
				wrong := false
				for i, s := range got {
					wantVIP, wantInst := fmt.Sprintf("10.13.0.%d", i+1), instances[i%len(instances)]
					vips, inst := ingressIPs(s), s.Annotations[AnnotationInstance]
					mark := ""
					if !slices.Equal(vips, []string{wantVIP}) || inst != wantInst {
						wrong, mark = true, fmt.Sprintf("  want %s %s", wantVIP, wantInst)
					}
					fmt.Fprintf(&table, "%s created %s: %v %s%s\n", s.Name, s.CreationTimestamp.UTC().Format(time.TimeOnly), vips, inst, mark)
				}
				if wrong {
					t.Errorf("services were not served in creation order:\n%s", table.String())
				}
			})
		}
	}
}

// An address freed while services wait for one goes to the oldest of them, though the
// controller retries the waiting services in no particular order; and each is warned
// once however often it is refused again.
func TestFreedVIPGoesToTheOldestWaitingService(t *testing.T) {
	const n = 10
	e := newEnv(t, fmt.Sprintf("order-%d", orderSeq.Add(1)))
	cfg := e.config(t, "node-a", fmt.Sprintf("defaultPool=10.14.0.1-10.14.0.%d", n), 3)
	cfg.MetricsAddress = freeAddr(t)
	startPod(t, cfg)
	waitFor(t, 30*time.Second, "the controller to lead", func() bool {
		return metricValue(t, cfg.MetricsAddress, "shardlb_controller_leader") == 1
	})
	holders, waiting := make([]string, n), make([]string, n)
	for i := range n {
		holders[i], waiting[i] = fmt.Sprintf("holder-%d", i), fmt.Sprintf("waiting-%d", i)
		e.create(t, e.lbService(holders[i]))
	}
	for _, h := range holders {
		waitFor(t, 10*time.Second, h+"'s VIP", func() bool { return len(ingressIPs(e.get(t, h))) > 0 })
	}
	// Names sort in creation order, which ties within a creationTimestamp second follow.
	for _, w := range waiting {
		e.create(t, e.lbService(w))
	}
	for _, w := range waiting {
		waitFor(t, 10*time.Second, w+" to find the pool empty", func() bool {
			return slices.Contains(e.events(t, w), "Warning "+ReasonPoolExhausted)
		})
	}

	served := func() []string {
		list, err := e.client.CoreV1().Services(e.ns).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, s := range list.Items {
			if strings.HasPrefix(s.Name, "waiting-") && len(s.Status.LoadBalancer.Ingress) > 0 {
				out = append(out, s.Name)
			}
		}
		slices.Sort(out)
		return out
	}
	for i, h := range holders {
		vip := ingressIPs(e.get(t, h))
		if err := e.client.CoreV1().Services(e.ns).Delete(context.Background(), h, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		var got []string
		waitFor(t, 10*time.Second, h+"'s address to be taken", func() bool { got = served(); return len(got) > i })
		if !slices.Equal(got, waiting[:i+1]) {
			t.Fatalf("after %d addresses were freed, served %v, want %v", i+1, got, waiting[:i+1])
		}
		if ips := ingressIPs(e.get(t, waiting[i])); !slices.Equal(ips, vip) {
			t.Errorf("%s got %v, want %v freed by %s", waiting[i], ips, vip, h)
		}
	}
	for _, w := range waiting {
		list, err := e.client.CoreV1().Events(e.ns).List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=" + w})
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range list.Items {
			if ev.Source.Component == "shardlb" && ev.Type == corev1.EventTypeWarning && (ev.Reason != ReasonPoolExhausted || ev.Count != 1) {
				t.Errorf("%s: Warning %s recorded %d times (%s), want one PoolExhausted once", w, ev.Reason, ev.Count, ev.Message)
			}
		}
	}
}
