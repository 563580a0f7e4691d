package kube

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"

	"github.com/shardlb/shardlb/ipam"
	"github.com/shardlb/shardlb/shard"
)

// Event reasons. Every refusal is a Warning on the service concerned and nothing else.
const (
	ReasonIPAllocated       = "IPAllocated"
	ReasonShardAssigned     = "ShardAssigned"
	ReasonIPReleased        = "IPReleased"
	ReasonPoolExhausted     = "PoolExhausted"
	ReasonUnknownInstance   = "UnknownInstance"
	ReasonInvalidAnnotation = "InvalidAnnotation"
	ReasonStaticIPConflict  = "StaticIPConflict"
	ReasonAllocationFailed  = "AllocationFailed"
	// ReasonInvalidLoadBalancerIP: spec.loadBalancerIP, the static IP request when
	// loxilb.io/staticIP is not set, cannot be read.
	ReasonInvalidLoadBalancerIP = "InvalidLoadBalancerIP"
	// ReasonLoadBalancerIPIgnored: spec.loadBalancerIP differs from loxilb.io/staticIP,
	// which wins.
	ReasonLoadBalancerIPIgnored = "LoadBalancerIPIgnored"
	// ReasonUnsupportedMode: loxilb.io/lbmode dsr with loxilb.io/epselect rr; the
	// service is not served.
	ReasonUnsupportedMode = "UnsupportedMode"
	// ReasonInvalidSourceRanges: the source ranges cannot be read; the service keeps
	// its last valid set, or is not served without one.
	ReasonInvalidSourceRanges = "InvalidSourceRanges"
	// ReasonUnsupportedAnnotation: a loxilb.io/ annotation shardlb does not implement.
	ReasonUnsupportedAnnotation = "UnsupportedAnnotation"
	// ReasonSessionAffinityIgnored: sessionAffinity ClientIP, or its timeout, is not
	// applied as written (Normal).
	ReasonSessionAffinityIgnored = "SessionAffinityIgnored"
	// ReasonClientAddressTranslated: externalTrafficPolicy Local asks for the client's
	// address at the endpoint, and the service's mode translates it (Normal).
	ReasonClientAddressTranslated = "ClientAddressTranslated"
	// ReasonVIPWithdrawn and ReasonVIPAnnounced (Normal) follow whether the nodes
	// announce a service's VIPs, and say why not.
	ReasonVIPWithdrawn = "VIPWithdrawn"
	ReasonVIPAnnounced = "VIPAnnounced"
)

// controller allocates VIPs and instances while this pod holds the controller Lease.
// Decisions are serial (the allocator is not goroutine-safe and the order decides who
// gets an address); the API writes of different services run in parallel.
//
// Services waiting for an address are served in creation order: by
// metadata.creationTimestamp, then by namespace/name, whatever the number of workers
// and whether they were created before or after this term began. A worker about to
// give a service its first address first decides, under the same lock, every older
// service of our class still without one (see decideOlder), so the first worker to
// reach the lock cannot take an older service's address. creationTimestamp has a
// granularity of one second: within a second the name decides, not the order of
// creation. The informer delivers services in creation order, so the one inversion
// left is within a second: a service created after another in the same second, but
// with a smaller name, can still be served after it.
type controller struct {
	cfg      *Config
	log      *slog.Logger
	client   kubernetes.Interface
	services cache.Store
	slices   cache.Indexer
	recorder record.EventRecorder
	metrics  *metrics

	mu        sync.Mutex // guards everything below
	queue     workqueue.TypedRateLimitingInterface[string]
	alloc     *ipam.Allocator
	instances map[string]string // service key -> instance decided
	load      map[string]int    // instance -> services
	pending   map[string]bool   // services waiting for an address to free
	// claims are the static IPs pending services wait for: released, such an address
	// goes to its claimant at once, before any dynamic allocation can take it.
	claims map[netip.Addr]ipam.Request
	// told are, per service key, the Events of its last decision (type, reason and
	// message): a retry repeats none, and one that went and came back is told again.
	told    map[string]map[notice]bool
	written map[string]writeMark
	// withdrawn is, per service holding a VIP, why the nodes do not announce it ("":
	// they do), as last told by VIPWithdrawn/VIPAnnounced; a term starts from what the
	// services are when it begins, without telling.
	withdrawn map[string]string
	// pools are the term's pools: the flags' and the IPPools' (pool.go).
	pools *poolWatch
	// dyn reads the IPPools; made on the first term.
	dyn dynamic.Interface
}

// notice is one Event the controller owes a service about its spec or annotations.
type notice struct {
	typ, reason, msg string
	// refuse: no VIP is given while it stands (one held stays).
	refuse bool
}

// writeMark is what the controller last wrote for a service and the resourceVersion the
// API returned, so that a stale informer copy does not cause a second identical write.
type writeMark struct {
	state desired
	rv    uint64
}

// desired is what a service should carry.
type desired struct {
	instance string
	ips      string // comma-joined, for comparison
	// ranges is the last valid source ranges to record (AnnotationSourceRanges); ""
	// removes the record.
	ranges string
}

func newController(cfg *Config, log *slog.Logger, client kubernetes.Interface, services cache.Store, slices cache.Indexer, rec record.EventRecorder, m *metrics) *controller {
	return &controller{cfg: cfg, log: log, client: client, services: services, slices: slices, recorder: rec, metrics: m}
}

// enqueue is the informer handlers' entry: it only signals, the workers decide.
func (c *controller) enqueue(key string) {
	c.mu.Lock()
	q := c.queue
	c.mu.Unlock()
	if q != nil {
		q.Add(key)
	}
}

// lead runs one leadership term: restore from what the services record, then
// reconcile until ctx ends.
func (c *controller) lead(ctx context.Context) {
	pools := c.watchPools(ctx)
	alloc, err := ipam.New(pools.set.specs(), c.cfg.UniqueIP)
	if err != nil {
		c.log.Error("controller: pools", "err", err) // Validate and config.Build checked them already
		return
	}
	q := workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](50*time.Millisecond, 30*time.Second),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "shardlb-controller"})
	c.mu.Lock()
	c.queue, c.alloc = q, alloc
	c.instances, c.load = map[string]string{}, map[string]int{}
	c.pending, c.told, c.written = map[string]bool{}, map[string]map[notice]bool{}, map[string]writeMark{}
	c.claims, c.withdrawn = map[netip.Addr]ipam.Request{}, map[string]string{}
	c.pools = pools
	keys := c.restore()
	adopted := pools.adoptOutside()
	c.mu.Unlock()
	pools.warnAdopted(adopted)
	c.metrics.leader.Set(1)
	c.log.Info("controller: leading", "services", len(keys))
	for _, k := range keys {
		q.Add(k)
	}
	var wg sync.WaitGroup
	wg.Go(func() { pools.run(ctx) })
	workers := max(c.cfg.ControllerWorkers, 1)
	for range workers {
		wg.Go(func() {
			for c.processNext(ctx, q) {
			}
		})
	}
	<-ctx.Done()
	q.ShutDown()
	wg.Wait()
	c.mu.Lock()
	c.queue = nil
	c.mu.Unlock()
	c.metrics.leader.Set(0)
}

// restore re-applies every allocation the services record, oldest service first (it
// keeps the address when two records conflict), and returns every service key.
func (c *controller) restore() []string {
	var svcs []*service
	for _, o := range c.services.List() {
		if s, ok := o.(*service); ok {
			svcs = append(svcs, s)
		}
	}
	slices.SortFunc(svcs, compareAge)
	keys := make([]string, 0, len(svcs))
	var allocs []ipam.Allocation
	for _, s := range svcs {
		keys = append(keys, s.key())
		if !s.ours(c.cfg.LoadBalancerClass) {
			continue
		}
		if inst, err := c.cfg.Instances.Canonical(s.Annotations[AnnotationInstance]); err == nil {
			c.instances[s.key()] = inst
			c.load[inst]++
		}
		for _, ip := range s.Ingress {
			allocs = append(allocs, ipam.Allocation{Service: s.key(), IP: ip, Ports: portKeys(s)})
		}
		if len(s.Ingress) > 0 {
			c.withdrawn[s.key()] = c.notAnnounced(s)
		}
	}
	if err := c.alloc.Restore(allocs); err != nil {
		// Refused records (conflicts, addresses now outside every pool) are decided
		// afresh by reconcile; the rest keep their VIPs.
		c.log.Warn("controller: restore refused some recorded VIPs", "err", err)
	}
	return keys
}

func (c *controller) processNext(ctx context.Context, q workqueue.TypedRateLimitingInterface[string]) bool {
	key, quit := q.Get()
	if quit {
		return false
	}
	defer q.Done(key)
	start := time.Now()
	err := c.reconcile(ctx, key)
	c.metrics.reconcile.WithLabelValues("controller").Observe(time.Since(start).Seconds())
	if err != nil {
		if ctx.Err() == nil {
			c.log.Warn("controller: reconcile failed, retrying", "service", key, "err", err)
			q.AddRateLimited(key)
		}
		return true
	}
	q.Forget(key)
	return true
}

// reconcile decides (under the lock) and then writes (outside it).
func (c *controller) reconcile(ctx context.Context, key string) error {
	obj, exists, err := c.services.GetByKey(key)
	if err != nil {
		return fmt.Errorf("service %s from cache: %w", key, err)
	}
	var s *service
	if exists {
		s, _ = obj.(*service)
	}
	if s == nil || !s.ours(c.cfg.LoadBalancerClass) {
		return c.release(ctx, key, s)
	}
	want, ok := c.decide(s)
	if !ok {
		return nil
	}
	if err := c.write(ctx, s, want); err != nil {
		return err
	}
	c.tellAnnounced(s, want.ips)
	return nil
}

// notAnnounced says why the nodes announce no VIP of s ("" when they do).
func (c *controller) notAnnounced(s *service) string {
	if why := s.notServed(c.cfg.DefaultMode); why != "" {
		return why
	}
	ports := servicePorts(s, c.slices)
	if !anyEndpoint(ports) {
		return "no ready endpoint"
	}
	if !anyEndpoint(healthyPorts(s, ports)) {
		return "every ready endpoint fails its probes (" + AnnotationLiveness + ")"
	}
	return ""
}

// tellAnnounced records VIPWithdrawn when the nodes stop announcing the VIPs of s, or
// when s has just got them and they are not announced, and VIPAnnounced when they come
// back: once per change, from the controller alone (every node could say it, N
// times). With a VIP shared by services (no --setUniqueIP) it speaks of s alone.
func (c *controller) tellAnnounced(s *service, ips string) {
	why := c.notAnnounced(s)
	c.mu.Lock()
	was, known := c.withdrawn[s.key()]
	c.withdrawn[s.key()] = why
	c.mu.Unlock()
	switch {
	case why != "" && (!known || was != why):
		c.recorder.Eventf(ref(s), corev1.EventTypeNormal, ReasonVIPWithdrawn, "VIP %s not announced: %s", ips, why)
	case why == "" && known && was != "":
		c.recorder.Eventf(ref(s), corev1.EventTypeNormal, ReasonVIPAnnounced, "VIP %s announced", ips)
	}
}

// release frees what a deleted service, or one that is no longer ours, holds, clears
// what we wrote on it if it still exists, and retries the services waiting for an
// address.
func (c *controller) release(ctx context.Context, key string, s *service) error {
	c.mu.Lock()
	held := c.alloc.Lookup(key)
	inst, hadInst := c.instances[key]
	c.alloc.Release(key)
	if hadInst {
		c.load[inst]--
		delete(c.instances, key)
	}
	delete(c.told, key)
	delete(c.written, key)
	delete(c.pending, key)
	delete(c.withdrawn, key)
	var retry []string
	for _, al := range held {
		if req, ok := c.claims[al.IP]; ok {
			delete(c.claims, al.IP)
			if c.pending[req.Service] {
				// Reserved here, under the lock that also serialises decide; the
				// claimant's retry below finds it allocated and writes it.
				_, _ = c.alloc.Allocate(req)
			}
		}
	}
	if len(held) > 0 {
		for k := range c.pending {
			retry = append(retry, k)
		}
	}
	q := c.queue
	c.mu.Unlock()
	for _, k := range retry {
		q.Add(k)
	}
	if len(held) > 0 {
		c.log.Info("controller: released", "service", key, "vips", allocIPs(held))
	}
	if s == nil || (len(held) == 0 && !hadInst) {
		return nil // never ours, or already cleaned up
	}
	// The service now belongs to nobody or to another implementation: take back our
	// annotation and our VIPs, and only ours.
	var patches []func() error
	_, hasInst := s.Annotations[AnnotationInstance]
	_, hasRanges := s.Annotations[AnnotationSourceRanges]
	if hasInst || hasRanges {
		patches = append(patches, func() error {
			_, err := c.patchAnnotations(ctx, s, map[string]any{AnnotationInstance: nil, AnnotationSourceRanges: nil})
			return err
		})
	}
	if len(held) > 0 && ingressHolds(s.Ingress, held) {
		patches = append(patches, func() error { return c.patchStatus(ctx, s, nil) })
		c.recorder.Eventf(ref(s), corev1.EventTypeNormal, ReasonIPReleased, "released %s: the service is no longer of class %s", allocIPs(held), c.cfg.LoadBalancerClass)
	}
	for _, p := range patches {
		if err := p(); err != nil && !apierrors.IsNotFound(err) {
			return err
		}
	}
	return nil
}

// compareAge orders services oldest first: by creationTimestamp (whole seconds), then
// by namespace/name, which it builds only for a tie (decideOlder calls it on every
// service).
func compareAge(a, b *service) int {
	if c := a.CreationTimestamp.Compare(b.CreationTimestamp.Time); c != 0 {
		return c
	}
	return cmp.Compare(a.key(), b.key())
}

// decide computes the instance and VIPs of s, emitting a Warning when it cannot. ok is
// false when nothing is to be written. When s is about to get its first address, the
// older services still without one are decided first (see the controller's doc comment).
func (c *controller) decide(s *service) (desired, bool) {
	c.mu.Lock()
	var served []string
	if len(c.alloc.Lookup(s.key())) == 0 && c.couldAllocate(s) {
		served = c.decideOlder(s)
	}
	want, ok := c.decideLocked(s, true)
	q := c.queue
	c.mu.Unlock()
	// Their own workers write them; Allocate is idempotent, so they find the address
	// decided here.
	for _, k := range served {
		q.Add(k)
	}
	return want, ok
}

// couldAllocate reports whether s, holding no address, would get one now, and leaves
// the allocator as it was (Release undoes Allocate). c.mu is held. A service that would
// not cannot take an older service's address, so it need not wait for them: the retries
// of the services waiting for a full pool, all requeued by each release, then cost one
// allocation attempt each, not a pass over every service.
func (c *controller) couldAllocate(s *service) bool {
	static, err := staticIP(s)
	if err != nil {
		return false // refused before any allocation
	}
	_, _, err = c.allocate(s, static)
	c.alloc.Release(s.key())
	return err == nil
}

// decideOlder decides, oldest first, every service of our class older than s that
// holds no address, and returns the keys of those that got one. c.mu is held.
//
// Cost: one pass over the informer's store for each service about to get its first
// address; the services it collects are few: those waiting for an address, and those
// another worker is about to decide.
func (c *controller) decideOlder(s *service) []string {
	var older []*service
	// The store's keys, not service.key: the pass builds no string per service.
	for _, k := range c.services.ListKeys() {
		obj, _, _ := c.services.GetByKey(k)
		o, ok := obj.(*service)
		if !ok || !o.ours(c.cfg.LoadBalancerClass) || compareAge(o, s) >= 0 || len(c.alloc.Lookup(k)) > 0 {
			continue
		}
		older = append(older, o)
	}
	slices.SortFunc(older, compareAge)
	var served []string
	for _, o := range older {
		if _, ok := c.decideLocked(o, false); ok {
			served = append(served, o.key())
		}
	}
	return served
}

// decideLocked is decide without the older services, c.mu held. own is false when s is
// decided ahead of its own worker, whose decision then counts the refusal in metrics.
func (c *controller) decideLocked(s *service, own bool) (desired, bool) {
	key := s.key()
	notes := c.check(s)
	refuse := func(n notice) (desired, bool) {
		if own {
			c.metrics.allocFailures.WithLabelValues(n.reason).Inc()
		}
		c.tell(s, append(notes, n))
		return desired{}, false
	}

	// What cannot be read gets nothing new (what the service holds stays, so a typo
	// never moves a VIP).
	static, _ := staticIP(s)
	if len(c.alloc.Lookup(key)) == 0 {
		for _, n := range notes {
			if n.refuse {
				if own {
					c.metrics.allocFailures.WithLabelValues(n.reason).Inc()
				}
				c.tell(s, notes)
				return desired{}, false
			}
		}
	}

	// What this term decided wins over the annotation, which the cache may not show yet.
	recorded := s.Annotations[AnnotationInstance]
	if mine, ok := c.instances[key]; ok {
		recorded = mine
	}
	inst, err := shard.Assign(c.cfg.Instances, s.Annotations[AnnotationZoneInstance], recorded, c.load)
	if err != nil {
		return refuse(notice{corev1.EventTypeWarning, ReasonUnknownInstance, fmt.Sprintf("%s %q: %v (instances: %v)", AnnotationZoneInstance, s.Annotations[AnnotationZoneInstance], err, c.cfg.Instances.Names()), true})
	}

	ips, reason, err := c.allocate(s, static)
	if err != nil {
		if reason == ReasonPoolExhausted || reason == ReasonStaticIPConflict {
			c.pending[key] = true
		}
		if reason == ReasonStaticIPConflict {
			fam := ipam.IPv4
			if !static.Is4() {
				fam = ipam.IPv6
			}
			c.claims[static] = ipam.Request{Service: key, Family: fam, Pool: s.Annotations[AnnotationPoolSelect], StaticIP: static, Ports: portKeys(s)}
		}
		return refuse(notice{corev1.EventTypeWarning, reason, err.Error(), true})
	}
	delete(c.pending, key)

	if old, ok := c.instances[key]; !ok || old != inst {
		if ok {
			c.load[old]--
		}
		c.instances[key] = inst
		c.load[inst]++
	}
	for i, n := range notes {
		if !n.refuse {
			continue
		}
		switch n.reason {
		case ReasonInvalidAnnotation:
			notes[i].msg += fmt.Sprintf(" (the service keeps %s; the node uses defaults for what it cannot read)", allocIPs(ips))
		case ReasonInvalidLoadBalancerIP:
			notes[i].msg += fmt.Sprintf(" (the service keeps %s)", allocIPs(ips))
		default:
			notes[i].msg += fmt.Sprintf(" (it keeps %s, unannounced)", allocIPs(ips))
		}
	}
	c.tell(s, notes)
	ranges := s.Annotations[AnnotationSourceRanges] // kept while the spec's cannot be read
	if s.SourceRangesErr == nil {
		ranges = formatSourceRanges(s.SourceRanges)
	}
	return desired{instance: inst, ips: allocIPs(ips), ranges: ranges}, true
}

// check lists what the controller must tell the owner of s about its annotations and
// spec: what cannot be read or is not supported (refuse: no new VIP, and for
// UnsupportedMode and unreadable source ranges without a recorded set, not served at
// all), and what is ignored.
func (c *controller) check(s *service) []notice {
	var notes []notice
	warn := func(reason string, refuse bool, format string, a ...any) {
		notes = append(notes, notice{corev1.EventTypeWarning, reason, fmt.Sprintf(format, a...), refuse})
	}
	var unreadable []error
	mode, err := s.mode(c.cfg.DefaultMode)
	if err != nil {
		unreadable = append(unreadable, err)
	}
	if _, err := s.selection(); err != nil {
		unreadable = append(unreadable, err)
	}
	static, err := ipam.ParseStaticIP(s.Annotations[AnnotationStaticIP])
	if err != nil {
		unreadable = append(unreadable, fmt.Errorf("%s: %w", AnnotationStaticIP, err))
	}
	if len(unreadable) > 0 {
		warn(ReasonInvalidAnnotation, true, "%v", errors.Join(unreadable...))
	}
	if sel, _ := s.selection(); mode == shard.ModeDSR && sel == shard.SelectRoundRobin {
		warn(ReasonUnsupportedMode, true, "%s %q: %v: the service is not served", AnnotationLBMode, s.Annotations[AnnotationLBMode], errDSRRoundRobin)
	}
	if lbIP := strings.TrimSpace(s.LoadBalancerIP); lbIP != "" {
		switch a, err := ipam.ParseStaticIP(lbIP); {
		case strings.TrimSpace(s.Annotations[AnnotationStaticIP]) != "":
			if err != nil || a != static {
				warn(ReasonLoadBalancerIPIgnored, false, "spec.loadBalancerIP %s is ignored: %s %s wins", lbIP, AnnotationStaticIP, s.Annotations[AnnotationStaticIP])
			}
		case err != nil:
			warn(ReasonInvalidLoadBalancerIP, true, "spec.loadBalancerIP: %v", err)
		}
	}
	if s.SourceRangesErr != nil {
		if ranges, _, ok := s.enforcedRanges(); ok {
			warn(ReasonInvalidSourceRanges, false, "%v; the service keeps its last valid ranges %s", s.SourceRangesErr, formatSourceRanges(ranges))
		} else {
			warn(ReasonInvalidSourceRanges, true, "%v; no valid ranges were recorded before: the service is not served until they are fixed", s.SourceRangesErr)
		}
	}
	for _, k := range s.unsupportedAnnotations() {
		warn(ReasonUnsupportedAnnotation, false, "%s is not implemented by shardlb and has no effect", k)
	}
	if s.LocalTraffic && !shard.KeepsClientAddr(mode) {
		notes = append(notes, notice{corev1.EventTypeNormal, ReasonClientAddressTranslated, fmt.Sprintf(
			"externalTrafficPolicy Local: mode %s gives the endpoints the load balancer's address, not the client's; "+
				"%s default keeps the client's address (the endpoints' replies must route back through the load balancer nodes)",
			mode, AnnotationLBMode), false})
	}
	if s.AffinityClientIP {
		normal := func(format string, a ...any) {
			notes = append(notes, notice{corev1.EventTypeNormal, ReasonSessionAffinityIgnored, fmt.Sprintf(format, a...), false})
		}
		if sel, err := s.selection(); err == nil && sel != shard.SelectPersist {
			normal("sessionAffinity ClientIP is not applied: %s %s wins", AnnotationEPSelect, sel)
		} else if t := s.AffinityTimeout; t != 0 && t != corev1.DefaultClientIPServiceAffinitySeconds {
			normal("sessionAffinityConfig.clientIP.timeoutSeconds %d is not applied: a client keeps its endpoint, chosen by a hash of its address, for as long as the service's endpoints do not change, with no timeout", t)
		}
	}
	return notes
}

// tell records the notices of one decision on s that did not stand after the previous
// one, c.mu held.
func (c *controller) tell(s *service, notes []notice) {
	key := s.key()
	was := c.told[key]
	now := make(map[notice]bool, len(notes))
	for _, n := range notes {
		now[n] = true
		if was[n] {
			continue
		}
		c.recorder.Event(ref(s), n.typ, n.reason, n.msg)
		if n.typ == corev1.EventTypeWarning {
			c.log.Info("controller: warned", "service", key, "reason", n.reason, "msg", n.msg)
		}
	}
	if len(now) == 0 {
		delete(c.told, key)
		return
	}
	c.told[key] = now
}

// staticIP is the address s asks for: loxilb.io/staticIP, else spec.loadBalancerIP;
// the zero address when neither is set.
func staticIP(s *service) (netip.Addr, error) {
	if v := s.Annotations[AnnotationStaticIP]; strings.TrimSpace(v) != "" {
		a, err := ipam.ParseStaticIP(v)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("%s: %w", AnnotationStaticIP, err)
		}
		return a, nil
	}
	a, err := ipam.ParseStaticIP(s.LoadBalancerIP)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("spec.loadBalancerIP: %w", err)
	}
	return a, nil
}

// allocate asks the allocator for every family of the service. An existing allocation
// that no longer fits the request (static IP or pool changed) is released first.
func (c *controller) allocate(s *service, static netip.Addr) ([]ipam.Allocation, string, error) {
	key := s.key()
	pool := s.Annotations[AnnotationPoolSelect]
	fams := families(s)
	for _, al := range c.alloc.Lookup(key) {
		// A VIP its pool let go stays, whatever the pool it was selected from.
		if (static.IsValid() && al.IP != static) || (pool != "" && al.Pool != pool && !c.pools.keptOutside(key, al.IP)) {
			c.alloc.Release(key)
			break
		}
	}
	fresh := len(c.alloc.Lookup(key)) == 0
	var out []ipam.Allocation
	for i, f := range fams {
		req := ipam.Request{Service: key, Family: f, Pool: pool, Ports: portKeys(s)}
		if static.IsValid() {
			switch {
			case static.Is4() == (f == ipam.IPv4):
				req.StaticIP = static
			case i == 0:
				req.StaticIP = static // the allocator refuses the family mismatch
			}
		}
		// A VIP held stays whatever the pools say now (Allocate gives it back).
		if reason, err := c.pools.request(s, &req, c.alloc.Lookup(key)); err != nil {
			if fresh {
				c.alloc.Release(key)
			}
			return nil, reason, err
		}
		al, err := c.alloc.Allocate(req)
		if err != nil {
			// A dual-stack service tolerates a missing secondary family.
			if i > 0 && (errors.Is(err, ipam.ErrNoPool) || errors.Is(err, ipam.ErrUnknownPool)) {
				continue
			}
			if fresh {
				c.alloc.Release(key) // undo a partial dual-stack allocation
			}
			switch {
			case errors.Is(err, ipam.ErrPoolExhausted):
				return nil, ReasonPoolExhausted, fmt.Errorf("no %v address left: %w", f, err)
			case errors.Is(err, ipam.ErrStaticIPConflict):
				return nil, ReasonStaticIPConflict, err
			case errors.Is(err, ipam.ErrUnknownPool), errors.Is(err, ipam.ErrInvalidRequest):
				return nil, ReasonInvalidAnnotation, err
			}
			return nil, ReasonAllocationFailed, err
		}
		out = append(out, al)
	}
	return out, "", nil
}

// write brings the service's annotation and status to want.
func (c *controller) write(ctx context.Context, s *service, want desired) error {
	key := s.key()
	have := desired{instance: s.Annotations[AnnotationInstance], ips: joinAddrs(s.Ingress), ranges: s.Annotations[AnnotationSourceRanges]}
	if have == want {
		c.mu.Lock()
		delete(c.written, key)
		c.mu.Unlock()
		return nil
	}
	c.mu.Lock()
	mark, marked := c.written[key]
	c.mu.Unlock()
	if marked && mark.state == want && rvOlder(s.ResourceVersion, mark.rv) {
		return nil // our write is not in the cache yet; its event reconciles again
	}
	// The two writes go out together: a node uses a service only once it carries both
	// the instance and the VIP, so their order does not matter, and a new service
	// waits one round trip instead of two.
	var wg sync.WaitGroup
	var instRV, ipRV string
	var instErr, ipErr error
	if have.instance != want.instance || have.ranges != want.ranges {
		meta := map[string]any{}
		if have.instance != want.instance {
			meta[AnnotationInstance] = want.instance
		}
		if have.ranges != want.ranges {
			meta[AnnotationSourceRanges] = want.ranges
			if want.ranges == "" {
				meta[AnnotationSourceRanges] = nil
			}
		}
		wg.Go(func() { instRV, instErr = c.patchAnnotations(ctx, s, meta) })
	}
	if have.ips != want.ips {
		wg.Go(func() { ipRV, ipErr = c.patchStatusRV(ctx, s, splitAddrs(want.ips)) })
	}
	wg.Wait()
	if have.instance != want.instance && instErr == nil {
		verb := "assigned to"
		if have.instance != "" {
			verb = "moved from " + have.instance + " to"
		}
		c.recorder.Eventf(ref(s), corev1.EventTypeNormal, ReasonShardAssigned, "%s instance %s", verb, want.instance)
	}
	if have.ips != want.ips && ipErr == nil {
		c.recorder.Eventf(ref(s), corev1.EventTypeNormal, ReasonIPAllocated, "VIP %s", want.ips)
	}
	if err := errors.Join(instErr, ipErr); err != nil {
		return err
	}
	var rv uint64
	for _, r := range []string{instRV, ipRV} {
		if n, err := strconv.ParseUint(r, 10, 64); err == nil {
			rv = max(rv, n)
		}
	}
	if rv > 0 {
		c.mu.Lock()
		c.written[key] = writeMark{state: want, rv: rv}
		c.mu.Unlock()
	}
	return nil
}

// rvOlder reports whether a cached resourceVersion predates the one our write returned.
// resourceVersions are opaque to clients in general; with etcd3 they are revisions,
// and a wrong guess only costs one redundant, idempotent write.
func rvOlder(cached string, written uint64) bool {
	n, err := strconv.ParseUint(cached, 10, 64)
	return err == nil && n < written
}

// patchAnnotations merges annotations (nil removes one) into the service's.
func (c *controller) patchAnnotations(ctx context.Context, s *service, annotations map[string]any) (string, error) {
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": annotations}})
	out, err := c.client.CoreV1().Services(s.Namespace).Patch(ctx, s.Name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: "shardlb"})
	if err != nil {
		return "", fmt.Errorf("annotate %s with %v: %w", s.key(), annotations, err)
	}
	return out.ResourceVersion, nil
}

func (c *controller) patchStatus(ctx context.Context, s *service, ips []netip.Addr) error {
	_, err := c.patchStatusRV(ctx, s, ips)
	return err
}

func (c *controller) patchStatusRV(ctx context.Context, s *service, ips []netip.Addr) (string, error) {
	ingress := []corev1.LoadBalancerIngress{}
	vip := corev1.LoadBalancerIPModeVIP
	for _, ip := range ips {
		ingress = append(ingress, corev1.LoadBalancerIngress{IP: ip.String(), IPMode: &vip})
	}
	patch, _ := json.Marshal(map[string]any{"status": map[string]any{"loadBalancer": map[string]any{"ingress": ingress}}})
	out, err := c.client.CoreV1().Services(s.Namespace).Patch(ctx, s.Name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: "shardlb"}, "status")
	if err != nil {
		return "", fmt.Errorf("write VIPs %v of %s: %w", ips, s.key(), err)
	}
	return out.ResourceVersion, nil
}

// poolStats is the allocator's view for metrics, nil when not leading: one entry per
// pool name, summed over its ranges and families (an IPPool of several addresses, or
// the IPv4 and IPv6 flag pools of one name), so each pool is one series.
func (c *controller) poolStats() []ipam.PoolStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.queue == nil || c.alloc == nil {
		return nil
	}
	var out []ipam.PoolStats
	for _, st := range c.alloc.Pools() {
		i := slices.IndexFunc(out, func(o ipam.PoolStats) bool { return o.Name == st.Name })
		if i < 0 {
			out = append(out, st)
			continue
		}
		out[i].Size = satAdd(out[i].Size, st.Size)
		out[i].Used += st.Used
		out[i].Services += st.Services
	}
	return out
}

func families(s *service) []ipam.Family {
	var out []ipam.Family
	for i, f := range s.Families {
		if i > 0 && !s.DualStack {
			break
		}
		if f == corev1.IPv6Protocol {
			out = append(out, ipam.IPv6)
		} else {
			out = append(out, ipam.IPv4)
		}
	}
	if len(out) == 0 {
		out = []ipam.Family{ipam.IPv4}
	}
	return out
}

func portKeys(s *service) []ipam.PortKey {
	out := make([]ipam.PortKey, 0, len(s.Ports))
	for _, p := range s.Ports {
		if p.Port > 0 {
			out = append(out, ipam.PortKey{Protocol: ipProtocol(p.Protocol), Port: p.Port})
		}
	}
	return out
}

func ref(s *service) *corev1.ObjectReference {
	return &corev1.ObjectReference{Kind: "Service", APIVersion: "v1", Namespace: s.Namespace, Name: s.Name, UID: s.UID, ResourceVersion: s.ResourceVersion}
}

func allocIPs(as []ipam.Allocation) string {
	ips := make([]netip.Addr, 0, len(as))
	for _, a := range as {
		ips = append(ips, a.IP)
	}
	return joinAddrs(ips)
}

func joinAddrs(ips []netip.Addr) string {
	var b []byte
	for i, ip := range ips {
		if i > 0 {
			b = append(b, ',')
		}
		b = ip.AppendTo(b)
	}
	return string(b)
}

func splitAddrs(s string) []netip.Addr {
	var out []netip.Addr
	for _, part := range strings.Split(s, ",") {
		if a, err := netip.ParseAddr(part); err == nil {
			out = append(out, a)
		}
	}
	return out
}

func ingressHolds(ingress []netip.Addr, held []ipam.Allocation) bool {
	for _, a := range held {
		if slices.Contains(ingress, a.IP) {
			return true
		}
	}
	return false
}
