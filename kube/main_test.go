package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/shardlb/shardlb/internal/testenv"
	"github.com/shardlb/shardlb/ipam"
	"github.com/shardlb/shardlb/shard"
	"github.com/shardlb/shardlb/test/kubeapi"
)

// envNode turns the test binary into one shardlb pod (see nodeMain), so that tests can
// run several and SIGKILL one.
const envNode = "SHARDLB_KUBE_TEST_NODE"

var apiserver struct {
	once sync.Once
	srv  *kubeapi.Server
	err  error
}

func TestMain(m *testing.M) {
	if os.Getenv(envNode) != "" {
		os.Exit(nodeMain())
	}
	code := m.Run()
	if apiserver.srv != nil {
		if err := apiserver.srv.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
	}
	os.Exit(code)
}

// sharedAPIServer is one real etcd + kube-apiserver for the whole package (started on
// first use, stopped by TestMain); tests isolate themselves by namespace and by
// loadBalancerClass, since every controller watches all namespaces.
func sharedAPIServer(tb testing.TB) *kubeapi.Server {
	tb.Helper()
	apiserver.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		apiserver.srv, apiserver.err = kubeapi.Start(ctx, kubeapi.Options{})
	})
	if errors.Is(apiserver.err, kubeapi.ErrBinariesMissing) {
		testenv.Unavailable(tb, "%v (set %s or run make k8s-bins)", apiserver.err, kubeapi.BinDirEnv)
	}
	if apiserver.err != nil {
		tb.Fatal(apiserver.err)
	}
	return apiserver.srv
}

// env is one test's slice of the shared apiserver.
type env struct {
	srv    *kubeapi.Server
	client kubernetes.Interface
	ns     string
	class  string
}

func newEnv(tb testing.TB, name string) *env {
	tb.Helper()
	srv := sharedAPIServer(tb)
	c, err := srv.Client()
	if err != nil {
		tb.Fatal(err)
	}
	e := &env{srv: srv, client: c, ns: name, class: "test.shardlb.io/" + name}
	_, err = c.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil {
		tb.Fatalf("namespace %s: %v", name, err)
	}
	return e
}

func (e *env) config(tb testing.TB, node, pools string, instances int) Config {
	tb.Helper()
	cfg := DefaultConfig()
	cfg.NodeName, cfg.Namespace, cfg.LoadBalancerClass = node, e.ns, e.class
	cfg.REST = e.srv.RESTConfig()
	cfg.Roles, cfg.UniqueIP = true, true
	cfg.APIAddress, cfg.MetricsAddress = "", ""
	cfg.ControllerLease = LeaderTimings{LeaseDuration: 4 * time.Second, RenewDeadline: 3 * time.Second, RetryPeriod: 500 * time.Millisecond}
	var err error
	if cfg.Instances, err = shard.NewInstances("llb", instances); err != nil {
		tb.Fatal(err)
	}
	if cfg.Pools, err = ipam.ParsePools(pools); err != nil {
		tb.Fatal(err)
	}
	return cfg
}

type svcOpt func(*corev1.Service)

func annotate(k, v string) svcOpt {
	return func(s *corev1.Service) {
		if s.Annotations == nil {
			s.Annotations = map[string]string{}
		}
		s.Annotations[k] = v
	}
}

// lbService is a LoadBalancer Service of the env's class on TCP port 57002 -> 80, as in
// the guide, without NodePorts (thousands of services would exhaust their range).
func (e *env) lbService(name string, opts ...svcOpt) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: e.ns},
		Spec: corev1.ServiceSpec{
			Type:                          corev1.ServiceTypeLoadBalancer,
			LoadBalancerClass:             ptr.To(e.class),
			AllocateLoadBalancerNodePorts: ptr.To(false),
			Selector:                      map[string]string{"what": name},
			Ports:                         []corev1.ServicePort{{Name: "http", Port: 57002, Protocol: corev1.ProtocolTCP}},
		},
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func (e *env) create(tb testing.TB, s *corev1.Service) *corev1.Service {
	tb.Helper()
	out, err := e.client.CoreV1().Services(e.ns).Create(context.Background(), s, metav1.CreateOptions{})
	if err != nil {
		tb.Fatalf("create service %s: %v", s.Name, err)
	}
	return out
}

// slice is the EndpointSlice a kube-controller-manager would write (none runs here):
// one ready endpoint for the service's "http" port.
func (e *env) slice(service string, addr string) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: service + "-1", Namespace: e.ns,
			Labels: map[string]string{discoveryv1.LabelServiceName: service}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{addr}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}}},
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](80), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
}

func (e *env) createSlice(tb testing.TB, service, addr string) {
	tb.Helper()
	if _, err := e.client.DiscoveryV1().EndpointSlices(e.ns).Create(context.Background(), e.slice(service, addr), metav1.CreateOptions{}); err != nil {
		tb.Fatalf("create endpointslice for %s: %v", service, err)
	}
}

func (e *env) get(tb testing.TB, name string) *corev1.Service {
	tb.Helper()
	s, err := e.client.CoreV1().Services(e.ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		tb.Fatalf("get service %s: %v", name, err)
	}
	return s
}

func ingressIPs(s *corev1.Service) []string {
	var out []string
	for _, in := range s.Status.LoadBalancer.Ingress {
		out = append(out, in.IP)
	}
	return out
}

// waitFor polls cond until it holds or the timeout passes.
func waitFor(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// events lists the Events shardlb recorded on one service as "Type Reason". Events of
// other components are left out: the apiserver's own repair loop may record one on any
// Service (ClusterIPNotAllocated when it checks a ClusterIP allocated a moment ago).
func (e *env) events(tb testing.TB, name string) []string {
	tb.Helper()
	list, err := e.client.CoreV1().Events(e.ns).List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=" + name})
	if err != nil {
		tb.Fatal(err)
	}
	var out []string
	for _, ev := range list.Items {
		if ev.Source.Component == "shardlb" {
			out = append(out, ev.Type+" "+ev.Reason)
		}
	}
	slices.Sort(out)
	return out
}

// recorder is a Router and a Datapath that remember what they were given. While
// silent is set it behaves as a speaker whose BGP sessions are down: what it is given
// reaches no router.
type recorder struct {
	silent    atomic.Bool
	mu        sync.Mutex
	advs      []shard.Advertisement
	frontends []shard.Frontend
	calls     int
	onSet     func([]shard.Advertisement)
	onFronts  func([]shard.Frontend)
}

func (r *recorder) SetAdvertisements(_ context.Context, desired []shard.Advertisement) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.advs = slices.Clone(desired)
	r.calls++
	if r.onSet != nil {
		r.onSet(r.advs)
	}
	return nil
}

func (r *recorder) Announcing() bool { return !r.silent.Load() }

func (r *recorder) Flush(context.Context) error {
	if r.silent.Load() {
		return errors.New("no BGP session is established")
	}
	return nil
}

func (r *recorder) SetServices(desired []shard.Frontend) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.frontends = slices.Clone(desired)
	if r.onFronts != nil {
		r.onFronts(r.frontends)
	}
	return nil
}

func (r *recorder) advertisements() []shard.Advertisement {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.advs)
}

// pod is one in-process Run.
type pod struct {
	rec    *recorder
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

func startPod(tb testing.TB, cfg Config) *pod {
	tb.Helper()
	return startPodWith(tb, cfg, &recorder{}, nil)
}

// startPodWith runs a pod with a given recorder and BGP status provider.
func startPodWith(tb testing.TB, cfg Config, rec *recorder, peers func() []BGPPeer) *pod {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	p := &pod{rec: rec, cancel: cancel, done: make(chan error, 1)}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("pod", cfg.NodeName)
	}
	go func() { p.done <- Run(ctx, cfg, Deps{Router: p.rec, Datapath: p.rec, Logger: log, BGPPeers: peers}) }()
	tb.Cleanup(func() { p.stop(tb) })
	return p
}

// stop cancels the pod and waits for Run to return; a second call is a no-op.
func (p *pod) stop(tb testing.TB) {
	tb.Helper()
	p.once.Do(func() {
		p.cancel()
		select {
		case err := <-p.done:
			if err != nil {
				tb.Errorf("Run: %v", err)
			}
		case <-time.After(20 * time.Second):
			tb.Errorf("Run did not return 20 s after cancel")
		}
	})
}

func freeAddr(tb testing.TB) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// nodeLine is what a node process prints each time its Router is set.
type nodeLine struct {
	T       int64    `json:"t"` // unix nanoseconds
	Node    string   `json:"node"`
	Masters []string `json:"masters"` // instances announced with the master role
	VIPs    int      `json:"vips"`
	// Lines from the Datapath instead: Frontends is set, Handoffs maps each frontend's
	// service to its handoff address.
	Frontends bool              `json:"frontends,omitempty"`
	Handoffs  map[string]string `json:"handoffs,omitempty"`
	// Announcing marks the moment a node started with $NODE_SILENT gets its BGP
	// sessions: from then on what its Router is given reaches the routers.
	Announcing bool `json:"announcing,omitempty"`
}

// nodeMain is one shardlb pod in its own process: kube.Run against the apiserver in
// $KUBECONFIG, with a Router that prints each advertisement set as a JSON line. It
// stops cleanly on SIGTERM and can be SIGKILLed.
func nodeMain() int {
	cfg := DefaultConfig()
	cfg.NodeName = os.Getenv(envNode)
	cfg.Namespace = os.Getenv("NODE_NAMESPACE")
	cfg.LoadBalancerClass = os.Getenv("NODE_CLASS")
	cfg.Kubeconfig = os.Getenv("KUBECONFIG")
	cfg.Roles, cfg.UniqueIP = true, true
	cfg.APIAddress = os.Getenv("NODE_API")
	cfg.MetricsAddress = ""
	cfg.QPS, cfg.Burst = 500, 1000
	n, _ := strconv.Atoi(os.Getenv("NODE_INSTANCES"))
	var err error
	if cfg.Instances, err = shard.NewInstances("llb", n); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if cfg.Pools, err = ipam.ParsePools(os.Getenv("NODE_POOLS")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if d, err := time.ParseDuration(os.Getenv("NODE_LEASE")); err == nil {
		cfg.MemberLease.Duration = d
	}
	if d, err := time.ParseDuration(os.Getenv("NODE_RESTART")); err == nil {
		// Its forwarding outlives it (a pinned datapath and BGP graceful restart):
		// a stop is a restart, and peers leave its instances to its next process.
		cfg.RestartTime = d
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var mu sync.Mutex
	enc := json.NewEncoder(os.Stdout)
	rec := &recorder{onSet: func(advs []shard.Advertisement) {
		line := nodeLine{T: time.Now().UnixNano(), Node: cfg.NodeName, Masters: []string{}, VIPs: len(advs)}
		for _, a := range advs {
			if a.Role == shard.RoleMaster && !slices.Contains(line.Masters, a.Instance) {
				line.Masters = append(line.Masters, a.Instance)
			}
		}
		slices.Sort(line.Masters)
		mu.Lock()
		_ = enc.Encode(line)
		mu.Unlock()
	}}
	rec.onFronts = func(fes []shard.Frontend) {
		line := nodeLine{T: time.Now().UnixNano(), Node: cfg.NodeName, Frontends: true, Handoffs: map[string]string{}}
		for _, fe := range fes {
			if fe.Handoff.IsValid() {
				line.Handoffs[fe.Service] = fe.Handoff.String()
			}
		}
		mu.Lock()
		_ = enc.Encode(line)
		mu.Unlock()
	}
	if a, err := netip.ParseAddr(os.Getenv("NODE_ADDR")); err == nil {
		cfg.NodeAddresses = []netip.Addr{a}
	}
	if d, err := time.ParseDuration(os.Getenv("NODE_SILENT")); err == nil {
		// The BGP sessions of a restarted node come up a while after it runs.
		rec.silent.Store(true)
		time.AfterFunc(d, func() {
			mu.Lock()
			_ = enc.Encode(nodeLine{T: time.Now().UnixNano(), Node: cfg.NodeName, Announcing: true})
			mu.Unlock()
			rec.silent.Store(false)
		})
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("pod", cfg.NodeName)
	if err := Run(ctx, cfg, Deps{Router: rec, Datapath: rec, Logger: log}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// nodeEnv is the environment of a node process for this env.
func (e *env) nodeEnv(node string, instances int, pools, lease, api string) []string {
	return append(os.Environ(),
		envNode+"="+node, "NODE_NAMESPACE="+e.ns, "NODE_CLASS="+e.class,
		"KUBECONFIG="+e.srv.Kubeconfig(), "NODE_INSTANCES="+strconv.Itoa(instances),
		"NODE_POOLS="+pools, "NODE_LEASE="+lease, "NODE_API="+api, "NODE_ADDR="+nodeAddr(node))
}

// nodeAddr is the address a node process publishes on its member Lease.
func nodeAddr(node string) string {
	return "10.255.0." + strconv.Itoa(1+int(node[len(node)-1]-'a'))
}
