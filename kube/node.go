package kube

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/clock"

	"github.com/shardlb/shardlb/shard"
)

// Router announces VIPs; bgp's speaker implements it. SetAdvertisements is declarative:
// it makes the announced set equal to desired (nil withdraws everything).
type Router interface {
	SetAdvertisements(ctx context.Context, desired []shard.Advertisement) error
	// Announcing reports whether routes set reach the upstream routers (the BGP
	// sessions are up): only then may this node take mastership.
	Announcing() bool
	// Flush returns once the routes set have been sent to the routers, or an error
	// when they reach none: a handover is acknowledged only after it.
	Flush(ctx context.Context) error
}

// Resumer is a Router that, after a restart, waits to dial its peers until the plan
// is in place (bgp's Speaker with Config.Restarting): the routers, which kept the
// previous process's routes, then get the whole plan at once.
type Resumer interface {
	Resume(ctx context.Context) error
}

// Datapath serves frontends; datapath's loader implements it, declaratively too.
//
// A Datapath that cannot serve some frontends should apply the others and return one
// error per refused frontend, joined with errors.Join, each naming its service: by a
// RefusedService method (ServiceRefusal), or worded as the datapath package does,
// "frontend VIP:PORT/PROTO of NAMESPACE/NAME: why". The node then leaves those services
// out (their VIPs unannounced, a Warning DatapathRefused on each) and the rest of the
// Plan counts as applied. Any other error fails the whole apply, which is retried.
type Datapath interface {
	SetServices(desired []shard.Frontend) error
}

// ServiceRefusal is the error a Datapath may return, joined, for each service it
// refuses.
type ServiceRefusal interface {
	error
	RefusedService() string // namespace/name
}

// ReasonDatapathRefused is the Warning a node records on a service its datapath refused.
const ReasonDatapathRefused = "DatapathRefused"

// maxRefusalRounds bounds the applies of one Plan from which refused services are
// taken out; a Datapath that keeps refusing services it did not name before fails the
// apply.
const maxRefusalRounds = 3

// node turns the cluster's state into this node's Plan and applies it. It keeps the
// Plan in a shard.Planner and feeds it only the services the informers marked dirty
// (touch): one service changed at 10,000 costs microseconds, not a recompute of all.
type node struct {
	cfg      *Config
	log      *slog.Logger
	router   Router
	datapath Datapath
	services cache.Store
	slices   cache.Indexer
	masters  func() map[string]string
	handoffs func() map[string][]netip.Addr // nil: none
	// successors is instance -> the member that takes it over if its master fails
	// (nil: none).
	successors func() map[string]string
	// announce is, with --maxBackups, the instances this node announces (nil: none
	// set, every instance).
	announce func() map[string]bool
	clock    clock.Clock
	metrics  *metrics

	// nodeAddrs is member name -> node addresses, for dsr endpoints (dsr.go; nil:
	// none); lastNodeAddrs is what the last apply planned with.
	nodeAddrs     func() map[string][]netip.Addr
	lastNodeAddrs map[string][]netip.Addr

	trigger chan struct{}
	// waitingSince is when the oldest change not yet picked up by an apply arrived, and
	// applyingSince when the apply under way started (unix ns, 0: none): /healthz
	// reads them without taking mu, which a stuck apply holds.
	waitingSince, applyingSince atomic.Int64

	dirtyMu sync.Mutex          // taken by informer handlers: never held across an apply
	dirty   map[string]struct{} // services changed since the last apply

	mu       sync.Mutex     // serialises apply; guards what it records
	planner  *shard.Planner // nil: rebuilt from the caches by the next apply
	last     shard.Plan
	applied  bool
	lastErr  error
	warnings map[string]string // service -> annotation problem already logged
	onApply  func(shard.Plan)  // hook for the API's readiness
	// resume dials the BGP peers of a restarting speaker (Resumer), once an apply has
	// the plan with the instances this pod's previous process mastered taken back
	// (restarting false) or at resumeBy at the latest; nil once done or when there
	// is nothing to resume.
	resume     func(context.Context) error
	restarting func() bool
	resumeBy   time.Time
	// refused are the services this node's datapath refused, as they were given to the
	// Planner then: left out of it until they change. told is the refusal last
	// recorded as an Event on each, until the service is served again.
	refused  map[string]refusal
	told     map[string]string
	recorder record.EventRecorder
}

// refusal is one service the datapath refused.
type refusal struct {
	svc shard.Service
	msg string
}

func newNode(cfg *Config, log *slog.Logger, r Router, d Datapath, services cache.Store, slices cache.Indexer, masters func() map[string]string, clk clock.Clock, m *metrics) *node {
	return &node{
		cfg: cfg, log: log, router: r, datapath: d, services: services, slices: slices,
		masters: masters, clock: clk, metrics: m,
		trigger: make(chan struct{}, 1), dirty: map[string]struct{}{}, warnings: map[string]string{}, onApply: func(shard.Plan) {},
		refused: map[string]refusal{}, told: map[string]string{}, recorder: &record.FakeRecorder{},
	}
}

// touch marks the service with key changed (itself or one of its EndpointSlices) and
// asks for a recompute.
func (n *node) touch(key string) {
	n.dirtyMu.Lock()
	n.dirty[key] = struct{}{}
	n.dirtyMu.Unlock()
	n.poke()
}

// sliceHandler calls f with the service key of every added, updated or deleted
// EndpointSlice (sliceServiceIndex's), both the old and the new one of an update.
func sliceHandler(f func(key string)) cache.ResourceEventHandler {
	call := func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		keys, _ := sliceServiceIndex(obj)
		for _, k := range keys {
			f(k)
		}
	}
	return cache.ResourceEventHandlerFuncs{
		AddFunc:    call,
		UpdateFunc: func(old, obj any) { call(old); call(obj) },
		DeleteFunc: call,
	}
}

// poke asks for a recompute; bursts coalesce.
func (n *node) poke() {
	n.waitingSince.CompareAndSwap(0, n.clock.Now().UnixNano())
	select {
	case n.trigger <- struct{}{}:
	default:
	}
}

// run recomputes after each change, waiting Debounce so that a burst of events costs
// one apply; a failed apply is retried with backoff. The wait is at least as long as
// the last apply took, which keeps the loop below half a core under constant churn
// whatever an apply costs (a full recompute, after a failure, is O(services)).
func (n *node) run(ctx context.Context) {
	backoff := 100 * time.Millisecond
	var took time.Duration
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.trigger:
		}
		if wait := max(n.cfg.Debounce, took); wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-n.clock.After(wait):
			}
		}
		start := n.clock.Now()
		err := n.apply(ctx)
		took = n.clock.Since(start)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			n.log.Warn("node: apply failed, retrying", "err", err, "in", backoff)
			select {
			case <-ctx.Done():
				return
			case <-n.clock.After(backoff):
			}
			backoff = min(backoff*2, 5*time.Second)
			n.poke()
			continue
		}
		backoff = 100 * time.Millisecond
	}
}

// apply brings the Plan up to date and hands it to the Datapath, then the Router: a VIP
// is announced only once this node can serve it. Only the services marked dirty are
// read again, and only the instances whose masters or handoffs changed are replanned
// (shard.Planner); after a failed apply everything is rebuilt from the caches.
func (n *node) apply(ctx context.Context) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	start := n.clock.Now()
	n.applyingSince.Store(start.UnixNano())
	defer n.applyingSince.Store(0)
	n.waitingSince.Store(0)
	n.dirtyMu.Lock()
	dirty := n.dirty
	n.dirty = map[string]struct{}{}
	n.dirtyMu.Unlock()
	n.dsrNodesChanged(dirty)
	// given is what this apply hands the Planner, so that a refusal records the
	// service as it was refused.
	given := map[string]shard.Service{}
	if n.planner == nil {
		n.planner = shard.NewPlanner(n.cfg.NodeName, n.cfg.Roles)
		for _, key := range n.services.ListKeys() {
			n.refresh(key, given)
		}
	} else {
		for key := range dirty {
			n.refresh(key, given)
		}
	}
	var handoffs map[string][]netip.Addr
	if n.handoffs != nil {
		handoffs = n.handoffs()
	}
	n.planner.SetMasters(n.masters(), handoffs)
	if n.successors != nil {
		n.planner.SetSuccessors(n.successors())
	}
	if n.announce != nil {
		n.planner.SetAnnounce(n.announce())
	}
	plan, delta := n.planner.Plan()
	frontends, advertisements := delta.Frontends(), delta.Advertisements()

	var errs []error
	if !n.applied || frontends {
		err := n.datapath.SetServices(plan.Frontends)
		// Services the datapath refused are taken out of the Plan, which is applied
		// again without them (the datapath applied the others already): their VIPs
		// are not announced, and the rest of the Plan counts as applied.
		for round := 0; err != nil && round < maxRefusalRounds; round++ {
			refused := refusedServices(err, plan.Frontends)
			if refused == nil {
				break
			}
			for key, msg := range refused {
				n.refuse(key, msg, given)
			}
			var d shard.Delta
			plan, d = n.planner.Plan()
			advertisements = advertisements || d.Advertisements()
			err = n.datapath.SetServices(plan.Frontends)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	if !n.applied || advertisements {
		if err := n.router.SetAdvertisements(ctx, plan.Advertisements); err != nil {
			errs = append(errs, err)
		}
	}
	n.metrics.reconcile.WithLabelValues("node").Observe(n.clock.Since(start).Seconds())
	n.lastErr = errors.Join(errs...)
	if n.lastErr != nil {
		n.applied = false // retry both halves
		n.planner = nil   // rebuilt from the caches: a retry owes nothing to this Plan
		return n.lastErr
	}
	if !n.applied || advertisements {
		n.metrics.observePlan(plan) // O(VIPs): only when they changed
	} else if frontends {
		n.metrics.frontends.Set(float64(len(plan.Frontends)))
	}
	// A service applied is served again: its next refusal is told anew.
	for key := range given {
		if _, ok := n.refused[key]; !ok {
			delete(n.told, key)
		}
	}
	n.last, n.applied = plan, true
	n.onApply(plan)
	if n.resume != nil && (!n.restarting() || !n.clock.Now().Before(n.resumeBy)) {
		if err := n.resume(ctx); err != nil {
			// A peer the speaker refused is left for the next change of peers.
			n.log.Warn("node: dialling the BGP peers after a restart", "err", err)
		} else {
			n.log.Info("node: plan in place after a restart, BGP peers dialled", "advertisements", len(plan.Advertisements), "leasesStillInherited", n.restarting())
		}
		n.resume = nil
	}
	return nil
}

// progress is when the oldest change still waiting for an apply arrived and when the
// apply under way started (zero: none).
func (n *node) progress() (waiting, applying time.Time) {
	if ns := n.waitingSince.Load(); ns != 0 {
		waiting = time.Unix(0, ns)
	}
	if ns := n.applyingSince.Load(); ns != 0 {
		applying = time.Unix(0, ns)
	}
	return waiting, applying
}

// withdraw removes every route at shutdown; the datapath stays until the caller
// detaches it, so packets already on their way are still served.
func (n *node) withdraw(ctx context.Context) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.applied = false
	n.last.Advertisements = nil
	return n.router.SetAdvertisements(ctx, nil)
}

// plan is a copy of the last applied Plan: the Planner changes its own in place.
func (n *node) plan() (shard.Plan, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return shard.Plan{Advertisements: slices.Clone(n.last.Advertisements), Frontends: slices.Clone(n.last.Frontends)}, n.applied
}

// refresh gives the Planner the service with key as the caches hold it now, or
// removes it when it is gone, not served, or refused by the datapath as it is; what it
// gives is added to given.
func (n *node) refresh(key string, given map[string]shard.Service) {
	if o, ok, _ := n.services.GetByKey(key); ok {
		if s, ok := o.(*service); ok {
			if ps, ok := n.planService(s); ok {
				if r, ok := n.refused[key]; ok {
					if reflect.DeepEqual(r.svc, ps) {
						n.planner.Remove(key)
						return
					}
					delete(n.refused, key) // changed: the datapath may take it now
				}
				n.planner.Update(ps)
				given[key] = ps
				return
			}
		}
	}
	delete(n.refused, key)
	delete(n.told, key)
	n.planner.Remove(key)
}

// refuse takes the service with key, which the datapath refused, out of the Planner
// and records a Warning on it, once per refusal.
func (n *node) refuse(key, msg string, given map[string]shard.Service) {
	ps, ok := given[key]
	if !ok {
		// Refused though this apply did not change it: as the caches hold it.
		if o, found, _ := n.services.GetByKey(key); found {
			if s, isSvc := o.(*service); isSvc {
				ps, ok = n.planService(s)
			}
		}
	}
	n.planner.Remove(key)
	if !ok {
		return
	}
	n.refused[key] = refusal{svc: ps, msg: msg}
	if n.told[key] == msg {
		return
	}
	n.told[key] = msg
	n.log.Warn("node: the datapath refused a service; not served or announced here", "service", key, "err", msg)
	if o, found, _ := n.services.GetByKey(key); found {
		if s, isSvc := o.(*service); isSvc {
			n.recorder.Eventf(ref(s), corev1.EventTypeWarning, ReasonDatapathRefused,
				"node %s neither serves nor announces it: its datapath refused %s", n.cfg.NodeName, msg)
		}
	}
}

// refusedServices reads from a Datapath's error which services of the frontends given
// it refused, with why: every error it joins must name one of them (see Datapath). nil
// when one does not: the apply failed as a whole.
func refusedServices(err error, fes []shard.Frontend) map[string]string {
	given := map[string]bool{}
	for _, fe := range fes {
		given[fe.Service] = true
	}
	out := map[string]string{}
	var walk func(error) bool
	walk = func(e error) bool {
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			for _, e := range j.Unwrap() {
				if !walk(e) {
					return false
				}
			}
			return true
		}
		key := ""
		if r, ok := e.(ServiceRefusal); ok {
			key = r.RefusedService()
		} else if rest, ok := strings.CutPrefix(e.Error(), "frontend "); ok {
			if _, after, ok := strings.Cut(rest, " of "); ok {
				key, _, _ = strings.Cut(after, ": ")
			}
		}
		if !given[key] {
			return false
		}
		if out[key] != "" {
			out[key] += "; "
		}
		out[key] += e.Error()
		return true
	}
	if !walk(err) || len(out) == 0 {
		return nil
	}
	return out
}

// planService is s as the planner sees it, if this node serves it: ours, with a VIP
// and a recorded instance, in a mode the datapath implements, and with source ranges
// it can read (its own or the recorded last valid set).
func (n *node) planService(s *service) (shard.Service, bool) {
	if !s.ours(n.cfg.LoadBalancerClass) || len(s.Ingress) == 0 {
		return shard.Service{}, false
	}
	inst, err := n.cfg.Instances.Canonical(s.Annotations[AnnotationInstance])
	if err != nil {
		return shard.Service{}, false // the controller has not decided yet
	}
	if why := s.notServed(n.cfg.DefaultMode); why != "" {
		n.warnOnce(s.key(), errors.New(why))
		return shard.Service{}, false
	}
	mode, err := s.mode(n.cfg.DefaultMode)
	if err != nil {
		n.warnOnce(s.key(), err)
	}
	ranges, _, _ := s.enforcedRanges()
	sel, err := s.selection()
	if err != nil {
		n.warnOnce(s.key(), err)
	}
	ports := n.ports(s)
	if mode == shard.ModeDSR {
		endpointNodes(s, n.slices, ports, n.lastNodeAddrs)
	}
	return shard.Service{
		Key: s.key(), Instance: inst, VIPs: slices.Clone(s.Ingress),
		Ports: ports, Mode: mode, Select: sel, SourceRanges: ranges,
	}, true
}

// ports is the service's ports with their ready endpoints (servicePorts), less those
// recorded as failing their probes (healthyPorts).
func (n *node) ports(s *service) []shard.ServicePort {
	return healthyPorts(s, servicePorts(s, n.slices))
}

// anyEndpoint reports whether a port has an endpoint: without a ready and healthy one
// (servicePorts, healthyPorts), no node announces the service's VIPs.
func anyEndpoint(ports []shard.ServicePort) bool {
	for _, p := range ports {
		if len(p.Endpoints) > 0 {
			return true
		}
	}
	return false
}

// servicePorts joins a service's ports with the ready endpoints of its EndpointSlices,
// matched by port name as the EndpointSlice API defines, each port's endpoints in the
// order of shard.Endpoint addresses (the index gives the slices in no fixed order).
func servicePorts(s *service, sliceIndex cache.Indexer) []shard.ServicePort {
	objs, _ := sliceIndex.ByIndex(indexByService, s.key())
	var out []shard.ServicePort
	for _, p := range s.Ports {
		proto, ok := protocol(p.Protocol)
		if !ok {
			continue
		}
		sp := shard.ServicePort{Protocol: proto, Port: p.Port}
		for _, o := range objs {
			es, ok := o.(*endpointSlice)
			if !ok {
				continue
			}
			for _, ep := range es.Ports {
				if ep.Name != p.Name || ep.Protocol != p.Protocol && !(ep.Protocol == "" || p.Protocol == "") {
					continue
				}
				for _, a := range es.Ready {
					sp.Endpoints = append(sp.Endpoints, shard.Endpoint{Addr: a, Port: ep.Port})
				}
			}
		}
		sortEndpoints(sp.Endpoints)
		out = append(out, sp)
	}
	return out
}

func sortEndpoints(eps []shard.Endpoint) {
	if len(eps) < 2 {
		return
	}
	slices.SortFunc(eps, func(a, b shard.Endpoint) int {
		return netip.AddrPortFrom(a.Addr, a.Port).Compare(netip.AddrPortFrom(b.Addr, b.Port))
	})
}

func (n *node) warnOnce(key string, err error) {
	if n.warnings[key] == err.Error() {
		return
	}
	n.warnings[key] = err.Error()
	n.log.Warn("node: service not served as written", "service", key, "err", err)
}
