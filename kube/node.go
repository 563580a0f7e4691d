package kube

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"k8s.io/client-go/tools/cache"
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

// Datapath serves frontends; datapath's loader implements it, declaratively too.
type Datapath interface {
	SetServices(desired []shard.Frontend) error
}

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
	clock      clock.Clock
	metrics    *metrics

	trigger chan struct{}

	dirtyMu sync.Mutex          // taken by informer handlers: never held across an apply
	dirty   map[string]struct{} // services changed since the last apply

	mu       sync.Mutex     // serialises apply; guards what it records
	planner  *shard.Planner // nil: rebuilt from the caches by the next apply
	last     shard.Plan
	applied  bool
	lastErr  error
	warnings map[string]string // service -> annotation problem already logged
	onApply  func(shard.Plan)  // hook for the API's readiness
}

func newNode(cfg *Config, log *slog.Logger, r Router, d Datapath, services cache.Store, slices cache.Indexer, masters func() map[string]string, clk clock.Clock, m *metrics) *node {
	return &node{
		cfg: cfg, log: log, router: r, datapath: d, services: services, slices: slices,
		masters: masters, clock: clk, metrics: m,
		trigger: make(chan struct{}, 1), dirty: map[string]struct{}{}, warnings: map[string]string{}, onApply: func(shard.Plan) {},
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
	n.dirtyMu.Lock()
	dirty := n.dirty
	n.dirty = map[string]struct{}{}
	n.dirtyMu.Unlock()
	if n.planner == nil {
		n.planner = shard.NewPlanner(n.cfg.NodeName, n.cfg.Roles)
		for _, key := range n.services.ListKeys() {
			n.refresh(key)
		}
	} else {
		for key := range dirty {
			n.refresh(key)
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
	plan, delta := n.planner.Plan()

	var errs []error
	if !n.applied || delta.Frontends() {
		if err := n.datapath.SetServices(plan.Frontends); err != nil {
			errs = append(errs, err)
		}
	}
	if !n.applied || delta.Advertisements() {
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
	if !n.applied || delta.Advertisements() {
		n.metrics.observePlan(plan) // O(VIPs): only when they changed
	} else if delta.Frontends() {
		n.metrics.frontends.Set(float64(len(plan.Frontends)))
	}
	n.last, n.applied = plan, true
	n.onApply(plan)
	return nil
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
// removes it when it is gone or not served.
func (n *node) refresh(key string) {
	if o, ok, _ := n.services.GetByKey(key); ok {
		if s, ok := o.(*service); ok {
			if ps, ok := n.planService(s); ok {
				n.planner.Update(ps)
				return
			}
		}
	}
	n.planner.Remove(key)
}

// planService is s as the planner sees it, if this node serves it: ours, with a VIP
// and a recorded instance.
func (n *node) planService(s *service) (shard.Service, bool) {
	if !s.ours(n.cfg.LoadBalancerClass) || len(s.Ingress) == 0 {
		return shard.Service{}, false
	}
	inst, err := n.cfg.Instances.Canonical(s.Annotations[AnnotationInstance])
	if err != nil {
		return shard.Service{}, false // the controller has not decided yet
	}
	mode, err := shard.ParseMode(s.Annotations[AnnotationLBMode])
	if err != nil {
		mode = n.cfg.DefaultMode
		n.warnOnce(s.key(), err)
	} else if s.Annotations[AnnotationLBMode] == "" {
		mode = n.cfg.DefaultMode
	}
	sel, err := shard.ParseSelect(s.Annotations[AnnotationEPSelect])
	if err != nil {
		n.warnOnce(s.key(), err)
	}
	return shard.Service{
		Key: s.key(), Instance: inst, VIPs: slices.Clone(s.Ingress),
		Ports: n.ports(s), Mode: mode, Select: sel,
	}, true
}

// ports joins a service's ports with the ready endpoints of its EndpointSlices,
// matched by port name as the EndpointSlice API defines.
func (n *node) ports(s *service) []shard.ServicePort {
	objs, _ := n.slices.ByIndex(indexByService, s.key())
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
		out = append(out, sp)
	}
	return out
}

func (n *node) warnOnce(key string, err error) {
	if n.warnings[key] == err.Error() {
		return
	}
	n.warnings[key] = err.Error()
	n.log.Warn("node: unreadable annotation, using the default", "service", key, "err", err)
}
