package kube

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/shardlb/shardlb/internal/testenv"
	"github.com/shardlb/shardlb/probe"
	"github.com/shardlb/shardlb/shard"
)

func TestReadLiveness(t *testing.T) {
	def := liveness{interval: defaultProbeInterval, retries: defaultProbeRetries}
	with := func(f func(*liveness)) liveness { l := def; f(&l); return l }
	for _, tc := range []struct {
		name     string
		ann      map[string]string
		want     liveness
		problems []string // annotations named by the problems, in order
	}{
		{"no annotation probes nothing", nil, def, nil},
		{"liveness yes probes each port by its protocol, every 60 s, 2 in a row", map[string]string{AnnotationLiveness: "yes"},
			with(func(l *liveness) { l.on = true }), nil},
		{"liveness no", map[string]string{AnnotationLiveness: "no"}, def, nil},
		{"every setting read", map[string]string{AnnotationLiveness: "Yes", AnnotationProbeType: "HTTP", AnnotationProbePort: "8080",
			AnnotationProbeReq: "/health", AnnotationProbeResp: "ok", AnnotationProbeTimeout: "5", AnnotationProbeRetries: "3"},
			liveness{on: true, typ: probe.HTTP, port: 8080, req: "/health", resp: "ok", interval: 5 * time.Second, retries: 3}, nil},
		{"probetype none turns liveness off", map[string]string{AnnotationLiveness: "yes", AnnotationProbeType: "none"},
			with(func(l *liveness) { l.typ = probe.None }), nil},
		{"an unknown liveness value probes nothing", map[string]string{AnnotationLiveness: "maybe"}, def, []string{AnnotationLiveness}},
		{"bad values fall back, each named", map[string]string{AnnotationLiveness: "yes", AnnotationProbeType: "sctp", AnnotationProbePort: "70000",
			AnnotationProbeTimeout: "soon", AnnotationProbeRetries: "0"},
			with(func(l *liveness) { l.on = true }),
			[]string{AnnotationProbeType, AnnotationProbePort, AnnotationProbeTimeout, AnnotationProbeRetries}},
		{"port 0 and negative numbers are refused", map[string]string{AnnotationLiveness: "yes", AnnotationProbePort: "0", AnnotationProbeTimeout: "-1", AnnotationProbeRetries: "101"},
			with(func(l *liveness) { l.on = true }),
			[]string{AnnotationProbePort, AnnotationProbeTimeout, AnnotationProbeRetries}},
		{"ping ignores port, request and response, saying so", map[string]string{AnnotationLiveness: "yes", AnnotationProbeType: "ping",
			AnnotationProbePort: "80", AnnotationProbeReq: "x", AnnotationProbeResp: "y"},
			with(func(l *liveness) { l.on, l.typ = true, probe.Ping }),
			[]string{AnnotationProbePort, AnnotationProbeReq, AnnotationProbeResp}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, problems := readLiveness(tc.ann)
			if got != tc.want {
				t.Errorf("readLiveness = %+v, want %+v", got, tc.want)
			}
			var named []string
			for _, p := range problems {
				k, _, _ := strings.Cut(p, " ")
				named = append(named, k)
			}
			if !slices.Equal(named, tc.problems) {
				t.Errorf("problems name %v, want %v: %q", named, tc.problems, problems)
			}
		})
	}
}

func ep(a string, port uint16) shard.Endpoint {
	return shard.Endpoint{Addr: netip.MustParseAddr(a), Port: port}
}

func TestHealthyPorts(t *testing.T) {
	ports := func() []shard.ServicePort {
		return []shard.ServicePort{
			{Protocol: shard.TCP, Port: 80, Endpoints: []shard.Endpoint{ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)}},
			{Protocol: shard.UDP, Port: 80, Endpoints: []shard.Endpoint{ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)}},
			{Protocol: shard.TCP, Port: 443, Endpoints: []shard.Endpoint{ep("10.0.0.1", 8443), ep("fd00::1", 8443)}},
		}
	}
	addrs := func(ps []shard.ServicePort) string {
		var out []string
		for _, p := range ps {
			var eps []string
			for _, e := range p.Endpoints {
				eps = append(eps, netip.AddrPortFrom(e.Addr, e.Port).String())
			}
			out = append(out, fmt.Sprintf("%d/%s:%s", p.Port, p.Protocol, strings.Join(eps, " ")))
		}
		return strings.Join(out, " | ")
	}
	for _, tc := range []struct {
		name string
		ann  map[string]string
		want string
	}{
		{"no record keeps every endpoint", map[string]string{AnnotationLiveness: "yes"},
			"80/TCP:10.0.0.1:8080 10.0.0.2:8080 | 80/UDP:10.0.0.1:8080 10.0.0.2:8080 | 443/TCP:10.0.0.1:8443 [fd00::1]:8443"},
		{"a recorded endpoint leaves its port and protocol only", map[string]string{AnnotationLiveness: "yes",
			AnnotationUnhealthyEndpoints: "10.0.0.2:8080/tcp,[fd00::1]:8443/tcp"},
			"80/TCP:10.0.0.1:8080 | 80/UDP:10.0.0.1:8080 10.0.0.2:8080 | 443/TCP:10.0.0.1:8443"},
		{"every endpoint recorded leaves none", map[string]string{AnnotationLiveness: "yes",
			AnnotationUnhealthyEndpoints: "10.0.0.1:8080/tcp,10.0.0.2:8080/tcp,10.0.0.1:8080/udp,10.0.0.2:8080/udp,10.0.0.1:8443/tcp,[fd00::1]:8443/tcp"},
			"80/TCP: | 80/UDP: | 443/TCP:"},
		{"a record without liveness is stale and ignored", map[string]string{AnnotationUnhealthyEndpoints: "10.0.0.2:8080/tcp"},
			"80/TCP:10.0.0.1:8080 10.0.0.2:8080 | 80/UDP:10.0.0.1:8080 10.0.0.2:8080 | 443/TCP:10.0.0.1:8443 [fd00::1]:8443"},
		{"probetype none ignores the record", map[string]string{AnnotationLiveness: "yes", AnnotationProbeType: "none", AnnotationUnhealthyEndpoints: "10.0.0.2:8080/tcp"},
			"80/TCP:10.0.0.1:8080 10.0.0.2:8080 | 80/UDP:10.0.0.1:8080 10.0.0.2:8080 | 443/TCP:10.0.0.1:8443 [fd00::1]:8443"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := ports()
			got := healthyPorts(&service{ObjectMeta: metav1.ObjectMeta{Annotations: tc.ann}}, in)
			if addrs(got) != tc.want {
				t.Errorf("healthyPorts = %s\nwant %s", addrs(got), tc.want)
			}
			if addrs(in) != addrs(ports()) {
				t.Errorf("healthyPorts changed its input: %s", addrs(in))
			}
		})
	}
}

func TestLivenessTargets(t *testing.T) {
	ports := []shard.ServicePort{
		{Protocol: shard.TCP, Port: 80, Endpoints: []shard.Endpoint{ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)}},
		{Protocol: shard.UDP, Port: 53, Endpoints: []shard.Endpoint{ep("10.0.0.1", 5353)}},
	}
	show := func(m map[probeTarget][]string) []string {
		var out []string
		for t, eps := range m {
			out = append(out, fmt.Sprintf("%s %s -> %s", t.spec.Type, t.addr, strings.Join(eps, ",")))
		}
		slices.Sort(out)
		return out
	}
	on := liveness{on: true, interval: time.Second, retries: 2}
	for _, tc := range []struct {
		name string
		lv   func(*liveness)
		want []string
	}{
		{"each port by its protocol on the endpoint's port", func(*liveness) {}, []string{
			"tcp 10.0.0.1:8080 -> 10.0.0.1:8080/tcp", "tcp 10.0.0.2:8080 -> 10.0.0.2:8080/tcp", "udp 10.0.0.1:5353 -> 10.0.0.1:5353/udp"}},
		{"a probeport probes each address once for all its ports", func(l *liveness) { l.typ, l.port = probe.HTTP, 9000 }, []string{
			"http 10.0.0.1:9000 -> 10.0.0.1:8080/tcp,10.0.0.1:5353/udp", "http 10.0.0.2:9000 -> 10.0.0.2:8080/tcp"}},
		{"ping probes addresses", func(l *liveness) { l.typ = probe.Ping }, []string{
			"ping 10.0.0.1:0 -> 10.0.0.1:8080/tcp,10.0.0.1:5353/udp", "ping 10.0.0.2:0 -> 10.0.0.2:8080/tcp"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lv := on
			tc.lv(&lv)
			if got := show(livenessTargets("ns/svc", lv, ports)); !slices.Equal(got, tc.want) {
				t.Errorf("targets\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

// localAddrs puts n addresses of a private range on a veth pair of the root namespace
// (removed when the test ends): addresses the API server accepts in an EndpointSlice,
// which loopback ones are not, that this process can serve and reach.
func localAddrs(t *testing.T, n int) []string {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "ip")
	var b [2]byte
	_, _ = rand.Read(b[:])
	a, peer := fmt.Sprintf("plv%x", b), fmt.Sprintf("plw%x", b)
	testenv.Run(t, "ip", "link", "add", a, "type", "veth", "peer", "name", peer)
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", a).Run() })
	var out []string
	for i := range n {
		addr := fmt.Sprintf("10.214.%d.%d", b[0], int(b[1])%200+1+i)
		testenv.Run(t, "ip", "addr", "add", addr+"/32", "dev", a)
		out = append(out, addr)
	}
	testenv.Run(t, "ip", "link", "set", a, "up")
	testenv.Run(t, "ip", "link", "set", peer, "up")
	return out
}

// endpointServer is an HTTP server (GET /health answers "ok") on one address that a
// test stops and starts again, as a pod whose server dies while it stays ready.
type endpointServer struct {
	t    *testing.T
	addr string
	mu   sync.Mutex
	srv  *http.Server
}

func newEndpointServer(t *testing.T, addr string) *endpointServer {
	s := &endpointServer{t: t, addr: addr}
	s.start()
	t.Cleanup(s.stop)
	return s
}

func (s *endpointServer) start() {
	s.t.Helper()
	l, err := net.Listen("tcp", s.addr)
	if err != nil {
		s.t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	s.mu.Lock()
	s.srv = srv
	s.mu.Unlock()
	go func() { _ = srv.Serve(l) }()
}

func (s *endpointServer) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		_ = s.srv.Close()
		s.srv = nil
	}
}

// healthSlice is the EndpointSlice of a service with ready endpoints on one port.
func (e *env) healthSlice(t *testing.T, service string, port int32, addrs ...string) {
	t.Helper()
	es := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: service + "-1", Namespace: e.ns,
			Labels: map[string]string{discoveryv1.LabelServiceName: service}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(port), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	for _, a := range addrs {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{a}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}})
	}
	if _, err := e.client.DiscoveryV1().EndpointSlices(e.ns).Create(context.Background(), es, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// endpointsOf lists a service's endpoints in a node's applied frontends ("none" when
// it has no frontend).
func endpointsOf(dp *datapathRecorder, key string) string {
	fes := dp.frontends(key)
	if len(fes) == 0 {
		return "none"
	}
	var out []string
	for _, e := range fes[0].Endpoints {
		out = append(out, netip.AddrPortFrom(e.Addr, e.Port).String())
	}
	return "[" + strings.Join(out, " ") + "]"
}

// An endpoint whose server stops while its pod stays ready leaves the tables of every
// node, the same on all, within a few probe intervals, and comes back when its server
// does; a service whose only endpoint fails is withdrawn everywhere and announced again.
// Services without liveness keep their endpoints, reachable or not.
func TestLivenessTakesFailingEndpointsOutOfEveryNode(t *testing.T) {
	addrs := localAddrs(t, 4)
	a, b, c, nobody := addrs[0], addrs[1], addrs[2], addrs[3]
	e := newEnv(t, "liveness")
	pools := "defaultPool=10.27.0.1-10.27.0.20"
	cfgA := e.config(t, "node-a", pools, 1)
	cfgA.MetricsAddress = freeAddr(t)
	recA, dpA := &recorder{}, &datapathRecorder{}
	startPodOn(t, cfgA, recA, dpA)
	waitFor(t, 30*time.Second, "node-a to lead", func() bool {
		return metricValue(t, cfgA.MetricsAddress, "shardlb_controller_leader") == 1
	})
	recB, dpB := &recorder{}, &datapathRecorder{}
	startPodOn(t, e.config(t, "node-b", pools, 1), recB, dpB)

	newEndpointServer(t, a+":8080")
	srvB := newEndpointServer(t, b+":8080")
	srvC := newEndpointServer(t, c+":8080")
	probed := []svcOpt{annotate(AnnotationLiveness, "yes"), annotate(AnnotationProbeTimeout, "1")}
	e.healthSlice(t, "web", 8080, a, b)
	e.create(t, e.lbService("web", append(probed, annotate(AnnotationProbeType, "http"), annotate(AnnotationProbeReq, "/health"),
		annotate(AnnotationProbeResp, "ok"), annotate(AnnotationProbeRetries, "2"))...))
	e.healthSlice(t, "only", 8080, c)
	e.create(t, e.lbService("only", append(probed, annotate(AnnotationProbeRetries, "1"))...)) // tcp, the port's protocol
	e.healthSlice(t, "plain", 8080, nobody)
	e.create(t, e.lbService("plain"))

	both := func(what, key, want string) {
		t.Helper()
		waitFor(t, 20*time.Second, what, func() bool {
			return endpointsOf(dpA, key) == want && endpointsOf(dpB, key) == want
		})
	}
	web, only, plain := e.ns+"/web", e.ns+"/only", e.ns+"/plain"
	both("web's two endpoints on both nodes", web, fmt.Sprintf("[%s:8080 %s:8080]", a, b))
	both("only's endpoint on both nodes", only, fmt.Sprintf("[%s:8080]", c))
	both("plain's unreachable endpoint on both nodes", plain, fmt.Sprintf("[%s:8080]", nobody))
	vip := func(name string) string {
		var ips []string
		waitFor(t, 10*time.Second, name+"'s VIP", func() bool { ips = ingressIPs(e.get(t, name)); return len(ips) == 1 })
		return ips[0]
	}
	onlyVIP := vip("only")
	waitFor(t, 10*time.Second, "only's VIP announced by both nodes", func() bool { return announced(recA, onlyVIP) && announced(recB, onlyVIP) })

	srvB.stop()
	both("web without b on both nodes", web, fmt.Sprintf("[%s:8080]", a))
	if got := e.get(t, "web").Annotations[AnnotationUnhealthyEndpoints]; got != b+":8080/tcp" {
		t.Errorf("web's record %q, want %s:8080/tcp", got, b)
	}
	msgs := e.waitTold(t, "web", ReasonEndpointUnhealthy)
	if !strings.Contains(msgs[0], b+":8080/tcp") {
		t.Errorf("EndpointUnhealthy %q does not name %s:8080/tcp", msgs[0], b)
	}
	srvB.start()
	both("web with b back on both nodes", web, fmt.Sprintf("[%s:8080 %s:8080]", a, b))
	e.waitTold(t, "web", ReasonEndpointHealthy)
	waitFor(t, 10*time.Second, "web's record removed", func() bool {
		_, ok := e.get(t, "web").Annotations[AnnotationUnhealthyEndpoints]
		return !ok
	})

	srvC.stop()
	both("only without its endpoint on both nodes", only, "[]")
	waitFor(t, 10*time.Second, "only's VIP withdrawn by both nodes", func() bool { return !announced(recA, onlyVIP) && !announced(recB, onlyVIP) })
	if msgs := e.waitTold(t, "only", ReasonEndpointUnhealthy); !strings.Contains(msgs[0], "VIP is withdrawn") {
		t.Errorf("EndpointUnhealthy %q does not say the VIP is withdrawn", msgs[0])
	}
	// The controller's account of the VIP agrees with the nodes: withdrawn, and why.
	if msgs := e.waitTold(t, "only", ReasonVIPWithdrawn); !strings.Contains(msgs[0], "fails its probes") {
		t.Errorf("VIPWithdrawn %q does not say every endpoint fails its probes", msgs[0])
	}
	srvC.start()
	both("only's endpoint back on both nodes", only, fmt.Sprintf("[%s:8080]", c))
	waitFor(t, 10*time.Second, "only's VIP announced again by both nodes", func() bool { return announced(recA, onlyVIP) && announced(recB, onlyVIP) })
	e.waitTold(t, "only", ReasonVIPAnnounced)

	if got := endpointsOf(dpA, plain) + " " + endpointsOf(dpB, plain); got != fmt.Sprintf("[%s:8080] [%s:8080]", nobody, nobody) {
		t.Errorf("plain, without liveness, has endpoints %s, want its unreachable endpoint on both nodes", got)
	}
	for _, name := range []string{"plain"} {
		if n, msgs := e.told(t, name, ReasonEndpointUnhealthy); n != 0 {
			t.Errorf("%s, without liveness, told %v", name, msgs)
		}
	}
	if v := metricValue(t, cfgA.MetricsAddress, `shardlb_endpoint_probe_failures_total{type="http"}`); v < 2 {
		t.Errorf("http probe failures counted %v, want at least 2", v)
	}
	// Records are written on change only: b out and back, c out and back.
	if v := metricValue(t, cfgA.MetricsAddress, "shardlb_endpoint_health_writes_total"); v != 4 {
		t.Errorf("%v record writes, want 4 (one per change)", v)
	}
}

// Probe annotations that cannot be read are named in one Warning with the fallback
// used; the service is served, probed as the fallbacks say, and no other is disturbed.
func TestInvalidProbeAnnotationsAreWarned(t *testing.T) {
	addrs := localAddrs(t, 1)
	e := newEnv(t, "badprobe")
	cfg := e.config(t, "node-a", "defaultPool=10.28.0.1-10.28.0.20", 1)
	dp := &datapathRecorder{}
	startPodOn(t, cfg, &recorder{}, dp)
	newEndpointServer(t, addrs[0]+":8080")
	e.healthSlice(t, "bad", 8080, addrs[0])
	e.create(t, e.lbService("bad", annotate(AnnotationLiveness, "yes"), annotate(AnnotationProbeType, "sctp"), annotate(AnnotationProbePort, "70000"),
		annotate(AnnotationProbeTimeout, "soon"), annotate(AnnotationProbeRetries, "0")))
	e.create(t, e.lbService("good", annotate(AnnotationLiveness, "yes")))
	msgs := e.waitTold(t, "bad", ReasonInvalidProbe)
	for _, k := range []string{AnnotationProbeType, AnnotationProbePort, AnnotationProbeTimeout, AnnotationProbeRetries} {
		if !strings.Contains(msgs[0], k) {
			t.Errorf("InvalidProbe %q does not name %s", msgs[0], k)
		}
	}
	waitFor(t, 10*time.Second, "bad served with its endpoint", func() bool {
		return endpointsOf(dp, e.ns+"/bad") == fmt.Sprintf("[%s:8080]", addrs[0])
	})
	// Repeated updates do not repeat the warning; a new bad value is told.
	for i := range 3 {
		e.update(t, "bad", func(s *corev1.Service) { s.Labels = map[string]string{"round": fmt.Sprint(i)} })
	}
	e.update(t, "bad", func(s *corev1.Service) { s.Annotations[AnnotationLiveness] = "maybe" })
	waitFor(t, 10*time.Second, "a second InvalidProbe", func() bool { n, _ := e.told(t, "bad", ReasonInvalidProbe); return n == 2 })
	time.Sleep(time.Second)
	if n, msgs := e.told(t, "bad", ReasonInvalidProbe); n != 2 {
		t.Errorf("InvalidProbe told %d times, want 2 (once per set of problems): %v", n, msgs)
	}
	for _, name := range []string{"bad", "good"} {
		if n, msgs := e.told(t, name, ReasonUnsupportedAnnotation); n != 0 {
			t.Errorf("%s: liveness annotations named unsupported: %v", name, msgs)
		}
	}
	if n, msgs := e.told(t, "good", ReasonInvalidProbe); n != 0 {
		t.Errorf("good told %v", msgs)
	}
	waitFor(t, 10*time.Second, "both VIPs", func() bool {
		return len(ingressIPs(e.get(t, "bad"))) == 1 && len(ingressIPs(e.get(t, "good"))) == 1
	})
}

// A new controller starts from the record the last one wrote: an endpoint recorded as
// failing stays out of every node, with no write, until it passes its probes again.
func TestLivenessRecordOutlivesTheController(t *testing.T) {
	addrs := localAddrs(t, 2)
	a, b := addrs[0], addrs[1]
	e := newEnv(t, "livefail")
	pools := "defaultPool=10.29.0.1-10.29.0.20"
	cfgA := e.config(t, "node-a", pools, 1)
	cfgA.MetricsAddress = freeAddr(t)
	dpA := &datapathRecorder{}
	podA := startPodOn(t, cfgA, &recorder{}, dpA)
	waitFor(t, 30*time.Second, "node-a to lead", func() bool {
		return metricValue(t, cfgA.MetricsAddress, "shardlb_controller_leader") == 1
	})
	cfgB := e.config(t, "node-b", pools, 1)
	cfgB.MetricsAddress = freeAddr(t)
	dpB := &datapathRecorder{}
	startPodOn(t, cfgB, &recorder{}, dpB)

	newEndpointServer(t, a+":8080")
	srvB := newEndpointServer(t, b+":8080")
	e.healthSlice(t, "web", 8080, a, b)
	e.create(t, e.lbService("web", annotate(AnnotationLiveness, "yes"), annotate(AnnotationProbeTimeout, "1"),
		annotate(AnnotationProbeType, "http"), annotate(AnnotationProbeReq, "/health")))
	web := e.ns + "/web"
	waitFor(t, 20*time.Second, "web's two endpoints on node-b", func() bool {
		return endpointsOf(dpB, web) == fmt.Sprintf("[%s:8080 %s:8080]", a, b)
	})
	srvB.stop()
	waitFor(t, 20*time.Second, "b out on node-b", func() bool { return endpointsOf(dpB, web) == fmt.Sprintf("[%s:8080]", a) })

	podA.stop(t)
	waitFor(t, 30*time.Second, "node-b to lead", func() bool {
		return metricValue(t, cfgB.MetricsAddress, "shardlb_controller_leader") == 1
	})
	waitFor(t, 20*time.Second, "node-b's prober to fail b three times", func() bool {
		return metricValue(t, cfgB.MetricsAddress, `shardlb_endpoint_probe_failures_total{type="http"}`) >= 3
	})
	if v := metricValue(t, cfgB.MetricsAddress, "shardlb_endpoint_health_writes_total"); v != 0 {
		t.Errorf("node-b wrote the record %v times while b stayed down, want 0", v)
	}
	if got := endpointsOf(dpB, web); got != fmt.Sprintf("[%s:8080]", a) {
		t.Errorf("node-b serves %s while b is down", got)
	}
	srvB.start()
	waitFor(t, 20*time.Second, "b back on node-b", func() bool {
		return endpointsOf(dpB, web) == fmt.Sprintf("[%s:8080 %s:8080]", a, b)
	})
	if v := metricValue(t, cfgB.MetricsAddress, "shardlb_endpoint_health_writes_total"); v != 1 {
		t.Errorf("node-b wrote the record %v times, want 1 (b back)", v)
	}
}
