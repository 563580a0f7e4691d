package kube

// This file makes IPPool objects live for the controller: the VIPs are allocated from
// the union of the flag pools and the accepted IPPools, and a change of either is
// applied without a restart (ipam.Allocator.Reconfigure, which moves no VIP).
//
// Which pools an object adds is what config.Build says, the same verdicts every pod
// writes as the Accepted condition (crd.go), so the controller never allocates from a
// pool that shows refused, and a refused object changes nothing.
//
// The rules, written for users in the README:
//   - A service that names a pool (loxilb.io/poolSelect) or asks for an address
//     (loxilb.io/staticIP, spec.loadBalancerIP) gets it from that pool whatever its
//     autoAssign, if the pool's serviceAllocation admits the service; otherwise it is
//     refused with PoolNotAllowed and waits.
//   - Any other service takes the first pool of its family with a free address among
//     those that auto-assign and admit it, ordered by serviceAllocation.priority
//     (lowest first, 0 or unset last), then pools restricted by serviceAllocation
//     before unrestricted ones (MetalLB's pinned pools), then the flags' before the
//     objects', then by name. Of the flag pools only the first of each family
//     auto-assigns, as kube-loxilb's default pool; the others serve poolSelect.
//   - A pool that shrinks or goes under allocated VIPs keeps them, held outside every
//     pool so that no one else gets them, with a Warning Event (VIPOutsidePool) on the
//     service and on the pool and the pool's VIPsOutside condition naming them, until
//     the services let them go. A changed serviceAllocation moves no VIP either.
//   - A new or grown pool serves the services waiting for a VIP, oldest first.
//
// The controller writes each IPPool's status counts and its VIPsOutside condition
// (every pod writes Accepted), only where they differ from what the object shows,
// with the resourceVersion it read.

import (
	"cmp"
	"context"
	"fmt"
	"math"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/cache"

	"github.com/shardlb/shardlb/api/v1alpha1"
	"github.com/shardlb/shardlb/config"
	"github.com/shardlb/shardlb/ipam"
)

// Event reasons of the pools.
const (
	// ReasonPoolNotAllowed: the service names a pool, or an address of a pool, whose
	// serviceAllocation does not admit it.
	ReasonPoolNotAllowed = "PoolNotAllowed"
	// ReasonVIPOutsidePool: a pool shrank or went under the service's VIP, which the
	// service keeps (on the service and on the pool).
	ReasonVIPOutsidePool = "VIPOutsidePool"
)

// poolRetry is how often the controller looks for the CRDs when they are not
// installed.
var poolRetry = 10 * time.Second

// poolStatusEvery bounds how often the pools' status is brought up to date: the
// counts change with every allocation, the writes follow at this pace at most.
var poolStatusEvery = time.Second

// poolSet is the pools the controller allocates from, decided by config.Build.
type poolSet struct {
	pools []config.Pool
	// firstFlag is, per family, the name of the first flag pool (kube-loxilb's
	// default pool, the only flag pool that auto-assigns).
	firstFlag map[ipam.Family]string
}

func newPoolSet(pools []config.Pool, flags []ipam.PoolSpec) poolSet {
	ps := poolSet{pools: pools, firstFlag: map[ipam.Family]string{}}
	for _, s := range flags {
		if _, ok := ps.firstFlag[s.Family()]; !ok {
			ps.firstFlag[s.Family()] = s.Name
		}
	}
	return ps
}

// specs are the allocator's ranges: the flags' first, in flag order, then the
// objects' by name.
func (ps poolSet) specs() []ipam.PoolSpec {
	var out []ipam.PoolSpec
	for _, p := range ps.pools {
		out = append(out, p.Ranges...)
	}
	return out
}

func (ps poolSet) byName(name string) *config.Pool {
	for i := range ps.pools {
		if ps.pools[i].Name == name {
			return &ps.pools[i]
		}
	}
	return nil
}

// containing is the pool one of whose ranges holds ip, nil when none does.
func (ps poolSet) containing(ip netip.Addr) *config.Pool {
	for i := range ps.pools {
		for _, r := range ps.pools[i].Ranges {
			if r.First.Is4() == ip.Is4() && !ip.Less(r.First) && !r.Last.Less(ip) {
				return &ps.pools[i]
			}
		}
	}
	return nil
}

func hasFamily(p *config.Pool, f ipam.Family) bool {
	return slices.ContainsFunc(p.Ranges, func(r ipam.PoolSpec) bool { return r.Family() == f })
}

// candidates are the pools of family f that may serve a service without a pool or
// address of its own choosing, in the order to try them (see the file comment).
func (ps poolSet) candidates(f ipam.Family, admits func(*config.Pool) bool) []string {
	var eligible []*config.Pool
	for i := range ps.pools {
		p := &ps.pools[i]
		auto := p.AutoAssign
		if p.FromFlag {
			auto = ps.firstFlag[f] == p.Name
		}
		if auto && hasFamily(p, f) && admits(p) {
			eligible = append(eligible, p)
		}
	}
	rank := func(p *config.Pool) int64 {
		if p.Priority <= 0 {
			return math.MaxInt64
		}
		return int64(p.Priority)
	}
	flagIndex := func(p *config.Pool) int {
		if !p.FromFlag {
			return len(ps.pools)
		}
		return slices.IndexFunc(ps.pools, func(q config.Pool) bool { return q.Name == p.Name })
	}
	slices.SortStableFunc(eligible, func(a, b *config.Pool) int {
		return cmp.Or(
			cmp.Compare(rank(a), rank(b)),
			-cmpBool(a.Restricted(), b.Restricted()),
			cmp.Compare(flagIndex(a), flagIndex(b)),
			cmp.Compare(a.Name, b.Name))
	})
	out := make([]string, 0, len(eligible))
	for _, p := range eligible {
		out = append(out, p.Name)
	}
	return out
}

func cmpBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}

// outsideVIP is a VIP a service keeps after its pool let it go. It is remembered until
// the service lets it go, also once another pool holds the address again: the service
// still keeps it whatever pool it names (controller.allocate).
type outsideVIP struct {
	pool string
	ip   netip.Addr
}

// poolWatch is one leadership term's view of the IPPools, and the namespaces' and
// services' labels their serviceAllocation reads. Its fields below the stores are
// guarded by the controller's mu.
type poolWatch struct {
	c *controller
	// pools and namespaces are nil until the CRDs are seen; namespaces stays nil
	// when the RBAC does not allow reading them (namespace selectors then match no
	// namespace).
	pools, namespaces cache.Store
	kick              chan struct{}
	// nsChanged: a namespace's labels changed, so a waiting service may now be
	// admitted by a pool.
	nsChanged atomic.Bool

	set poolSet
	// outside are, per service key, the VIPs it keeps after their pool let them go.
	outside map[string][]outsideVIP
	// objects are the IPPools last seen, by name, for the Events of one deleted.
	objects map[string]*v1alpha1.IPPool
}

// admits reports whether pool p may serve s. c.mu is held.
func (w *poolWatch) admits(s *service, p *config.Pool) bool {
	if !p.Restricted() {
		return true
	}
	var nsLabels map[string]string
	if w.namespaces != nil {
		if o, ok, _ := w.namespaces.GetByKey(s.Namespace); ok {
			if m, ok := o.(*metav1.PartialObjectMetadata); ok {
				nsLabels = m.Labels
			}
		}
	}
	return p.Admits(s.Namespace, nsLabels, s.Labels)
}

// request completes the allocation request of s for one family: the pools it may use,
// or why the pool or address it names is not allowed. held is what s holds: a family
// it holds an address of is left as it is. c.mu is held.
func (w *poolWatch) request(s *service, req *ipam.Request, held []ipam.Allocation) (string, error) {
	if w == nil || slices.ContainsFunc(held, func(al ipam.Allocation) bool { return al.IP.Is4() == (req.Family == ipam.IPv4) }) {
		return "", nil
	}
	if req.Pool != "" {
		if p := w.set.byName(req.Pool); p != nil && !w.admits(s, p) {
			return ReasonPoolNotAllowed, fmt.Errorf("pool %q (%s) does not admit service %s: its serviceAllocation leaves it out", req.Pool, AnnotationPoolSelect, s.key())
		}
		return "", nil
	}
	if req.StaticIP.IsValid() {
		if p := w.set.containing(req.StaticIP); p != nil && !w.admits(s, p) {
			return ReasonPoolNotAllowed, fmt.Errorf("static IP %s is in pool %q, whose serviceAllocation does not admit service %s", req.StaticIP, p.Name, s.key())
		}
		return "", nil
	}
	req.Pools = w.set.candidates(req.Family, func(p *config.Pool) bool { return w.admits(s, p) })
	return "", nil
}

// watchPools starts the term's pool view: the flag pools at once, the IPPools when
// the CRDs are there (waited for a while, so that the first allocations already see
// them). It runs until ctx ends.
func (c *controller) watchPools(ctx context.Context) *poolWatch {
	w := &poolWatch{c: c, kick: make(chan struct{}, 1), outside: map[string][]outsideVIP{}, objects: map[string]*v1alpha1.IPPool{}}
	w.set = newPoolSet(c.flagPools(), c.cfg.Pools)
	if c.dyn == nil {
		rc, err := c.cfg.restConfig()
		if err == nil {
			c.dyn, err = dynamic.NewForConfig(rc)
		}
		if err != nil {
			c.log.Error("controller: no client for IPPools: pools from flags only", "err", err)
			return w
		}
	}
	if installed(c.client) {
		w.start(ctx)
	} else {
		c.log.Info("controller: shardlb.io CRDs not installed: pools from flags only; checking again", "every", poolRetry)
		go func() {
			for !installed(c.client) {
				select {
				case <-ctx.Done():
					return
				case <-time.After(poolRetry):
				}
			}
			w.start(ctx)
			w.poke()
		}()
	}
	return w
}

// flagPools is config.Build's view of the flag pools alone.
func (c *controller) flagPools() []config.Pool {
	d, _ := config.Build(config.Flags{Pools: c.cfg.Pools}, config.Objects{}, config.Node{})
	return d.Pools
}

func (w *poolWatch) poke() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// start runs the informers and waits for them (bounded: without them the flag pools
// serve, and the objects are applied when they come).
func (w *poolWatch) start(ctx context.Context) {
	c := w.c
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { w.poke() }, UpdateFunc: func(_, _ any) { w.poke() }, DeleteFunc: func(any) { w.poke() },
	}
	pools, poolInf := cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: dynamicListWatch(c.dyn.Resource(v1alpha1.IPPools)),
		ObjectType:    &unstructured.Unstructured{},
		Transform:     typedTransform(func() runtime.Object { return &v1alpha1.IPPool{} }),
		Handler:       handler,
	})
	// A service's own label change requeues it through the services' informer; a
	// namespace's is retried here.
	informers := []cache.Controller{poolInf}
	var namespaces cache.Store
	if mayWatch(ctx, c, "namespaces") {
		var nsInf cache.Controller
		changed := func() { w.nsChanged.Store(true); w.poke() }
		namespaces, nsInf = cache.NewInformerWithOptions(cache.InformerOptions{
			ListerWatcher: cache.NewListWatchFromClient(c.client.CoreV1().RESTClient(), "namespaces", corev1.NamespaceAll, fields.Everything()),
			ObjectType:    &corev1.Namespace{},
			Transform:     labelsOnly,
			Handler: cache.ResourceEventHandlerFuncs{
				AddFunc: func(any) { changed() },
				UpdateFunc: func(old, cur any) {
					if !reflect.DeepEqual(metaLabels(old), metaLabels(cur)) {
						changed()
					}
				},
			},
		})
		informers = append(informers, nsInf)
	} else {
		c.log.Warn("controller: shardlb may not list and watch namespaces: IPPool namespaceSelectors match no namespace (grant list and watch on namespaces)")
	}
	var synced []cache.InformerSynced
	for _, inf := range informers {
		go inf.Run(ctx.Done())
		synced = append(synced, inf.HasSynced)
	}
	syncCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if !cache.WaitForCacheSync(syncCtx.Done(), synced...) && ctx.Err() == nil {
		c.log.Warn("controller: IPPools not read in time: pools from flags until they are")
	}
	c.mu.Lock()
	w.pools, w.namespaces = pools, namespaces
	w.set = w.build()
	c.mu.Unlock()
}

// mayWatch asks the API whether this pod may list and watch a cluster-wide resource.
func mayWatch(ctx context.Context, c *controller, resource string) bool {
	for _, verb := range []string{"list", "watch"} {
		r, err := c.client.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx, &authorizationv1.SelfSubjectAccessReview{
			Spec: authorizationv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &authorizationv1.ResourceAttributes{Verb: verb, Resource: resource}},
		}, metav1.CreateOptions{})
		if err != nil || !r.Status.Allowed {
			return false
		}
	}
	return true
}

// labelsOnly keeps an object's name, namespace and labels.
func labelsOnly(obj any) (any, error) {
	m, err := meta.Accessor(obj)
	if err != nil {
		return obj, nil
	}
	return &metav1.PartialObjectMetadata{ObjectMeta: metav1.ObjectMeta{
		Name: m.GetName(), Namespace: m.GetNamespace(), ResourceVersion: m.GetResourceVersion(), Labels: m.GetLabels()}}, nil
}

func metaLabels(o any) map[string]string {
	if m, ok := o.(*metav1.PartialObjectMetadata); ok {
		return m.Labels
	}
	return nil
}

// ipPools lists the IPPools seen. c.mu is held or the stores are not yet shared.
func (w *poolWatch) ipPools() []v1alpha1.IPPool {
	if w.pools == nil {
		return nil
	}
	var out []v1alpha1.IPPool
	for _, o := range w.pools.List() {
		if p, ok := o.(*v1alpha1.IPPool); ok {
			out = append(out, *p)
		}
	}
	return out
}

// build is the pool set the flags and the IPPools make (config.Build, as every pod
// judges them).
func (w *poolWatch) build() poolSet {
	d, _ := config.Build(config.Flags{Pools: w.c.cfg.Pools}, config.Objects{Pools: w.ipPools()}, config.Node{})
	return newPoolSet(d.Pools, w.c.cfg.Pools)
}

// run applies every change of the pools and keeps their status up to date, until ctx
// ends.
func (w *poolWatch) run(ctx context.Context) {
	tick := time.NewTicker(poolStatusEvery)
	defer tick.Stop()
	w.poke()
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.kick:
			w.reconfigure()
		case <-tick.C:
		}
		w.writeStatus(ctx)
	}
}

// reconfigure brings the allocator to the pools now accepted, keeping every VIP, tells
// the services and pools whose VIPs are now outside every pool, and retries the
// services waiting for a VIP (the oldest is served first, see controller).
func (w *poolWatch) reconfigure() {
	c := w.c
	c.mu.Lock()
	if c.alloc == nil || c.queue == nil {
		c.mu.Unlock()
		return
	}
	prev := w.objects
	w.objects = map[string]*v1alpha1.IPPool{}
	for _, p := range w.ipPools() {
		w.objects[p.Name] = &p
	}
	next := w.build()
	changed := !reflect.DeepEqual(next.specs(), w.set.specs())
	admission := !reflect.DeepEqual(next, w.set)
	var orphaned []ipam.Allocation
	if changed {
		alloc, lost, err := c.alloc.Reconfigure(next.specs())
		if err != nil {
			// config.Build refuses every overlap, so only a bug gets here: the old
			// pools stay.
			c.mu.Unlock()
			c.log.Error("controller: pools refused by the allocator, the previous pools stay", "err", err)
			return
		}
		c.alloc, orphaned = alloc, lost
	}
	w.set = next
	for _, al := range orphaned {
		vips := slices.DeleteFunc(w.outside[al.Service], func(v outsideVIP) bool { return v.ip == al.IP })
		w.outside[al.Service] = append(vips, outsideVIP{pool: al.Pool, ip: al.IP})
	}
	w.prune()
	var retry []string
	if changed || admission || w.nsChanged.Swap(false) {
		for _, k := range c.services.ListKeys() {
			obj, _, _ := c.services.GetByKey(k)
			if s, ok := obj.(*service); ok && s.ours(c.cfg.LoadBalancerClass) && len(c.alloc.Lookup(k)) == 0 {
				retry = append(retry, k)
			}
		}
	}
	q := c.queue
	c.mu.Unlock()

	if changed {
		c.log.Info("controller: pools changed", "ranges", len(next.specs()), "retried", len(retry), "vipsOutside", len(orphaned))
	}
	for _, al := range orphaned {
		msg := fmt.Sprintf("VIP %s is no longer in pool %q (it shrank or was deleted): the service keeps it, and no other service gets it", al.IP, al.Pool)
		c.log.Warn("controller: VIP kept outside its pool", "service", al.Service, "vip", al.IP, "pool", al.Pool)
		if obj, ok, _ := c.services.GetByKey(al.Service); ok {
			if s, ok := obj.(*service); ok {
				c.recorder.Event(ref(s), corev1.EventTypeWarning, ReasonVIPOutsidePool, msg)
			}
		}
		p := w.objects[al.Pool]
		if p == nil {
			p = prev[al.Pool]
		}
		if p != nil {
			c.recorder.Event(poolRef(p), corev1.EventTypeWarning, ReasonVIPOutsidePool,
				fmt.Sprintf("service %s keeps VIP %s, no longer in the pool; it is handed out again only once the service lets it go and the pool holds it", al.Service, al.IP))
		}
	}
	for _, k := range retry {
		q.Add(k)
	}
}

// keptOutside reports whether service key holds ip outside every pool because its
// pool let it go. c.mu is held.
func (w *poolWatch) keptOutside(key string, ip netip.Addr) bool {
	if w == nil {
		return false
	}
	return slices.ContainsFunc(w.outside[key], func(v outsideVIP) bool { return v.ip == ip })
}

// adoptOutside records, at the start of a term, the VIPs the services restored
// outside every pool without asking for them (their pool went while no controller
// led, or before this term's controller restarted): they are kept as a pool's are,
// and returned so that each is told again (warnAdopted). c.mu is held.
func (w *poolWatch) adoptOutside() []ipam.Allocation {
	var adopted []ipam.Allocation
	for _, obj := range w.c.services.List() {
		s, ok := obj.(*service)
		if !ok || !s.ours(w.c.cfg.LoadBalancerClass) {
			continue
		}
		for _, al := range w.c.alloc.Lookup(s.key()) {
			if al.Pool != "" {
				continue
			}
			if static, err := staticIP(s); err == nil && static == al.IP {
				continue
			}
			w.outside[al.Service] = append(w.outside[al.Service], outsideVIP{ip: al.IP})
			adopted = append(adopted, al)
		}
	}
	return adopted
}

// warnAdopted tells each service that holds a VIP outside every pool at the start of
// a term so, with a Warning Event: an operator who missed the Warning of the term in
// which its pool went (or whose pool went while no controller led) sees it again.
func (w *poolWatch) warnAdopted(adopted []ipam.Allocation) {
	c := w.c
	for _, al := range adopted {
		c.log.Warn("controller: VIP outside every pool, kept", "service", al.Service, "vip", al.IP)
		if obj, ok, _ := c.services.GetByKey(al.Service); ok {
			if s, ok := obj.(*service); ok {
				c.recorder.Event(ref(s), corev1.EventTypeWarning, ReasonVIPOutsidePool,
					fmt.Sprintf("VIP %s is in no pool (its pool shrank or was deleted): the service keeps it, and no other service gets it", al.IP))
			}
		}
	}
}

// prune forgets the kept VIPs that their services no longer hold. c.mu is held.
func (w *poolWatch) prune() {
	for key, vips := range w.outside {
		held := w.c.alloc.Lookup(key)
		vips = slices.DeleteFunc(vips, func(v outsideVIP) bool {
			return !slices.ContainsFunc(held, func(al ipam.Allocation) bool { return al.IP == v.ip })
		})
		if len(vips) == 0 {
			delete(w.outside, key)
		} else {
			w.outside[key] = vips
		}
	}
}

func poolRef(p *v1alpha1.IPPool) *corev1.ObjectReference {
	return &corev1.ObjectReference{APIVersion: v1alpha1.GroupVersion.String(), Kind: string(config.KindIPPool), Name: p.Name, UID: p.UID, ResourceVersion: p.ResourceVersion}
}

// poolStatus is what the controller writes on one IPPool.
type poolStatus struct {
	counts  v1alpha1.IPPoolStatus // without conditions
	outside metav1.Condition
}

// statuses computes the status of every IPPool object seen. c.mu is held.
func (w *poolWatch) statuses() map[string]poolStatus {
	w.prune()
	type usage struct{ size, used uint64 }
	use := map[string]map[ipam.Family]*usage{}
	services := map[string]int64{}
	for _, st := range w.c.alloc.Pools() {
		if use[st.Name] == nil {
			use[st.Name] = map[ipam.Family]*usage{}
		}
		u := use[st.Name][st.Family]
		if u == nil {
			u = &usage{}
			use[st.Name][st.Family] = u
		}
		u.size = satAdd(u.size, st.Size)
		u.used += uint64(st.Used)
		services[st.Name] += int64(st.Services)
	}
	byPool := map[string][]string{} // the kept VIPs still outside every pool
	for key, vips := range w.outside {
		held := w.c.alloc.Lookup(key)
		for _, v := range vips {
			if slices.ContainsFunc(held, func(al ipam.Allocation) bool { return al.IP == v.ip && al.Pool == "" }) {
				byPool[v.pool] = append(byPool[v.pool], key+" ("+v.ip.String()+")")
			}
		}
	}
	out := map[string]poolStatus{}
	for name, p := range w.objects {
		var st poolStatus
		if w.set.byName(name) != nil && !w.set.byName(name).FromFlag {
			if u := use[name][ipam.IPv4]; u != nil {
				st.counts.AssignedIPv4, st.counts.AvailableIPv4 = clampInt64(u.used), clampInt64(u.size-u.used)
			}
			if u := use[name][ipam.IPv6]; u != nil {
				st.counts.AssignedIPv6, st.counts.AvailableIPv6 = clampInt64(u.used), clampInt64(u.size-u.used)
			}
			st.counts.Services = services[name]
		}
		st.outside = metav1.Condition{Type: v1alpha1.ConditionVIPsOutside, Status: metav1.ConditionFalse, Reason: v1alpha1.ReasonAllInside,
			Message: "every VIP handed out from the pool is in it", ObservedGeneration: p.Generation}
		if held := byPool[name]; len(held) > 0 {
			slices.Sort(held)
			more := ""
			if len(held) > 10 {
				more = fmt.Sprintf(" and %d more", len(held)-10)
				held = held[:10]
			}
			st.outside.Status, st.outside.Reason = metav1.ConditionTrue, v1alpha1.ReasonVIPsKept
			st.outside.Message = fmt.Sprintf("services keep VIPs the pool no longer holds: %s%s", strings.Join(held, ", "), more)
		}
		out[name] = st
	}
	return out
}

func sameCounts(a, b v1alpha1.IPPoolStatus) bool {
	return a.AssignedIPv4 == b.AssignedIPv4 && a.AvailableIPv4 == b.AvailableIPv4 &&
		a.AssignedIPv6 == b.AssignedIPv6 && a.AvailableIPv6 == b.AvailableIPv6 && a.Services == b.Services
}

func satAdd(a, b uint64) uint64 {
	if s := a + b; s >= a {
		return s
	}
	return math.MaxUint64
}

func clampInt64(v uint64) int64 {
	if v > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(v)
}

// writeStatus writes the status of every IPPool whose counts or VIPsOutside condition
// differ from what it shows. A conflict is left to the next round, which reads the
// newer object.
func (w *poolWatch) writeStatus(ctx context.Context) {
	c := w.c
	c.mu.Lock()
	if c.alloc == nil || w.pools == nil {
		c.mu.Unlock()
		return
	}
	want := w.statuses()
	objs := w.objects
	c.mu.Unlock()
	for name, st := range want {
		p := objs[name]
		o, ok, _ := w.pools.GetByKey(name)
		if !ok {
			continue
		}
		if cur, ok := o.(*v1alpha1.IPPool); ok {
			p = cur
		}
		cond := meta.FindStatusCondition(p.Status.Conditions, st.outside.Type)
		if sameCounts(p.Status, st.counts) && cond != nil && cond.Status == st.outside.Status && cond.Reason == st.outside.Reason &&
			cond.Message == st.outside.Message && cond.ObservedGeneration == st.outside.ObservedGeneration {
			continue
		}
		next := p.DeepCopy()
		conds := next.Status.Conditions
		next.Status = st.counts
		meta.SetStatusCondition(&conds, st.outside)
		next.Status.Conditions = conds
		u, err := runtime.DefaultUnstructuredConverter.ToUnstructured(next)
		if err != nil {
			continue
		}
		uo := &unstructured.Unstructured{Object: u}
		uo.SetAPIVersion(v1alpha1.GroupVersion.String())
		uo.SetKind(string(config.KindIPPool))
		_, err = c.dyn.Resource(v1alpha1.IPPools).UpdateStatus(ctx, uo, metav1.UpdateOptions{FieldManager: "shardlb-controller"})
		switch {
		case err == nil:
			if (cond == nil || cond.Status != st.outside.Status) && st.outside.Status == metav1.ConditionTrue {
				c.log.Warn("controller: pool holds VIPs outside its addresses", "pool", name, "message", st.outside.Message)
			}
		case apierrors.IsConflict(err) || apierrors.IsNotFound(err):
		default:
			c.log.Warn("controller: write pool status", "pool", name, "err", err)
		}
	}
}
