package kube

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	coordclient "k8s.io/client-go/kubernetes/typed/coordination/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"

	"github.com/shardlb/shardlb/mastership"
)

// Lease names. All live in Config.Namespace.
const (
	ControllerLeaseName = "shardlb-controller"
	// annotationHandoverFrom marks an instance Lease its old holder has handed to a new
	// one. The new holder announces master routes, then clears it: that clearing is
	// the old holder's signal to demote (make-before-break).
	annotationHandoverFrom = "shardlb.io/handover-from"
	// Member Lease annotations. addresses are the node's (Config.NodeAddresses), where
	// a node that took over one of its instances in a planned switch hands off segments
	// of connections it does not know; incarnation names the process, so a handoff never
	// outlives the process that has the connections; leaving marks a pod that is
	// stopping: nobody hands it an instance.
	annotationAddresses   = "shardlb.io/addresses"
	annotationIncarnation = "shardlb.io/incarnation"
	annotationLeaving     = "shardlb.io/leaving"
	// annotationAnnouncing is "false" while the member's routes reach no router (its
	// BGP sessions are not up yet): such a member is handed no instance and takes none.
	// Absent means announcing, as written by versions that did not know it.
	annotationAnnouncing = "shardlb.io/announcing"
	// annotationMaintenance says why a member must master nothing (its Node is
	// cordoned or labelled out of external load balancers): it hands its instances
	// over make-before-break and stays a backup.
	annotationMaintenance = "shardlb.io/maintenance"
	// annotationProbe is where peers probe a member's liveness (its /healthz);
	// annotationDead lists the members its probes found dead
	// (member@incarnation@version, comma separated).
	annotationProbe = "shardlb.io/probe"
	annotationDead  = "shardlb.io/dead"
	// annotationHolderIncarnation, on an instance Lease, is its holder's process
	// incarnation: the Lease counts while that process's member Lease does.
	annotationHolderIncarnation = "shardlb.io/holder-incarnation"
	// annotationRestartTime, on a member Lease, is how long the member's forwarding
	// outlives its process (Config.RestartTime); annotationRestarting marks a member
	// taking back the instances its previous process held.
	annotationRestartTime = "shardlb.io/restart-time"
	annotationRestarting  = "shardlb.io/restarting"
	labelPartOf           = "app.kubernetes.io/part-of"
)

// MemberLeaseName is the Lease through which a member shows it is alive.
func MemberLeaseName(member string) string { return mastership.MemberLeaseName(member) }

// InstanceLeaseName is the mastership Lease of an instance.
func InstanceLeaseName(instance string) string { return mastership.InstanceLeaseName(instance) }

// elector drives this pod's mastership.Core: it observes the Leases (the informer's
// cache, or what this pod wrote if the cache has not caught up), steps the Core,
// makes the Lease writes it asks for against the API server, feeds the results back,
// and publishes the instances to announce as master to the node loop. Every decision
// is the Core's; the elector only executes.
type elector struct {
	cfg         *Config
	log         *slog.Logger
	api         coordclient.LeaseInterface
	leases      cache.Store
	clock       clock.Clock
	me          string
	router      Router
	core        *mastership.Core
	incarnation string
	// maintenance is why this node must not master now ("" when it may).
	maintenance func() string
	// applyNow applies this node's plan with the current roles and returns when the
	// Router has it: a handed-over instance is acknowledged only after that.
	applyNow func(context.Context) error
	// changed asks the node loop to recompute (debounced).
	changed func()
	wake    chan struct{}
	leaving atomic.Bool
	// restarting: instance Leases this pod's previous process wrote are still to be
	// taken back (set by each step, read by the node loop).
	restarting atomic.Bool
	// started: the first step ran, so restarting says something.
	started atomic.Bool

	mu     sync.Mutex // guards master, holders and handoffs, read by the node loop and the API
	master map[string]bool
	// until is when each of master stops counting (its Lease's expiry in this pod's
	// view): Masters and IsMaster drop it then, and a timer asks the node loop to
	// apply, even while the loop is blocked in a round of slow writes.
	until    map[string]time.Time
	untilT   clock.Timer
	holders  map[string]string       // instance -> holder of its fresh Lease
	handoffs map[string][]netip.Addr // instance -> addresses of its previous master
	// successors is instance -> the member that takes it over if its master fails, as
	// this member announces it (mastership.Outcome.AnnouncedSuccessors).
	successors map[string]string
	// announce are the instances this pod announces (nil: every one).
	announce map[string]bool

	// own is what this pod wrote last, by Lease name; owned by the loop goroutine.
	own map[string]*coordinationv1.Lease

	// probe are the members to probe (the Core's Outcome.Probe); suspects are those
	// found dead: member -> incarnation. Both guarded by mu.
	probe    []string
	suspects map[string]string
}

func newElector(cfg *Config, log *slog.Logger, api coordclient.LeaseInterface, leases cache.Store, r Router, maintenance func() string, clk clock.Clock) *elector {
	if maintenance == nil {
		maintenance = func() string { return "" }
	}
	inc := newIncarnation()
	core := mastership.New(mastership.Config{
		Me: cfg.NodeName, Instances: cfg.Instances, Excluded: cfg.Excluded,
		Renew: cfg.MemberLease.Renew, Duration: cfg.MemberLease.Duration, Grace: cfg.MemberLease.Grace,
		Protocol: cfg.LeaseProtocol, HandoverTimeout: cfg.HandoverAck, Probe: probeAddress(cfg), MaxBackups: cfg.MaxBackups,
		Addresses: cfg.NodeAddresses, Incarnation: inc, RestartTime: cfg.RestartTime,
	})
	return &elector{
		cfg: cfg, log: log, api: api, leases: leases, router: r, maintenance: maintenance, clock: clk, me: cfg.NodeName,
		core: core, incarnation: inc,
		applyNow: func(context.Context) error { return nil }, changed: func() {},
		wake:   make(chan struct{}, 1),
		master: map[string]bool{}, holders: map[string]string{}, handoffs: map[string][]netip.Addr{},
		own: map[string]*coordinationv1.Lease{},
	}
}

func newIncarnation() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// leave starts a planned stop: this pod marks its member Lease leaving and hands every
// instance it masters to the member Rebalance prefers among the others, each
// make-before-break. Holding reports when that is done.
func (e *elector) leave() {
	e.leaving.Store(true)
	e.poke()
}

// Holding is how many instances this pod announces as master.
func (e *elector) Holding() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.mastersNow())
}

// mastersNow is master without the instances whose Lease expired since; e.mu held.
func (e *elector) mastersNow() map[string]bool {
	now := e.clock.Now()
	out := make(map[string]bool, len(e.master))
	for inst := range e.master {
		if u, ok := e.until[inst]; !ok || now.Before(u) {
			out[inst] = true
		}
	}
	return out
}

// armExpiry asks the node loop to apply when the first mastership expires, should
// the elector not have stepped by then; e.mu held.
func (e *elector) armExpiry() {
	if e.untilT != nil {
		e.untilT.Stop()
		e.untilT = nil
	}
	var first time.Time
	for _, u := range e.until {
		if first.IsZero() || u.Before(first) {
			first = u
		}
	}
	dc, ok := e.clock.(clock.WithDelayedExecution)
	if first.IsZero() || !ok {
		return
	}
	e.untilT = dc.AfterFunc(first.Sub(e.clock.Now())+time.Millisecond, func() { e.changed() })
}

// Handoffs is instance -> the node addresses of the pod that handed it to this one in
// a planned switch, for the instances this pod masters while that pod's process lives
// (shard.Input.Handoffs).
func (e *elector) Handoffs() map[string][]netip.Addr {
	e.mu.Lock()
	defer e.mu.Unlock()
	return maps.Clone(e.handoffs)
}

// Successors is instance -> the member that takes it over if its master fails, the
// same on every node (shard.Input.Successors), except that this member's own entry
// waits a moment after a change of master (mastership.Config.SuccessorHold).
func (e *elector) Successors() map[string]string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return maps.Clone(e.successors)
}

// Announce is, with MaxBackups set, the instances whose VIPs this pod announces
// (shard.Input.Announce); nil: every one.
func (e *elector) Announce() map[string]bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.announce == nil {
		return nil
	}
	return maps.Clone(e.announce)
}

// poke wakes the loop; informer handlers call it.
func (e *elector) poke() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// Masters is instance -> member for BuildPlan: this pod for the instances it announces
// as master, the holders of fresh Leases for the others.
func (e *elector) Masters() map[string]string {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[string]string, len(e.holders))
	for inst, h := range e.holders {
		if h != e.me {
			out[inst] = h
		}
	}
	for inst := range e.mastersNow() {
		out[inst] = e.me
	}
	return out
}

// IsMaster reports whether this pod announces inst as master.
func (e *elector) IsMaster(inst string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.mastersNow()[inst]
}

func (e *elector) run(ctx context.Context) {
	if e.cfg.LeaseProtocol == mastership.ProtocolMemberBound {
		go e.probeLoop(ctx)
	}
	timer := e.clock.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-e.wake:
		case <-timer.C():
		}
		next := e.evaluate(ctx)
		timer.Stop()
		d := max(next.Sub(e.clock.Now()), 5*time.Millisecond)
		timer = e.clock.NewTimer(d)
	}
}

// observe is every shardlb Lease, each the freshest copy: the cache's, or what this
// pod wrote if the cache has not caught up. It returns the objects by name too, the
// bases of this round's writes.
func (e *elector) observe() ([]mastership.Lease, map[string]*coordinationv1.Lease) {
	objs := map[string]*coordinationv1.Lease{}
	for _, o := range e.leases.List() {
		if l, ok := o.(*coordinationv1.Lease); ok && l.Namespace == e.cfg.Namespace {
			objs[l.Name] = l
		}
	}
	for name, own := range e.own {
		if l := objs[name]; l == nil || rvLess(l.ResourceVersion, own.ResourceVersion) {
			objs[name] = own
		} else if l.ResourceVersion != own.ResourceVersion {
			delete(e.own, name) // the cache caught up and moved on
		}
	}
	out := make([]mastership.Lease, 0, len(objs))
	for _, name := range slices.Sorted(maps.Keys(objs)) {
		if name == ControllerLeaseName {
			continue
		}
		out = append(out, fromLease(objs[name]))
	}
	return out, objs
}

// evaluate does one round and returns when it wants the next.
func (e *elector) evaluate(ctx context.Context) time.Time {
	now := e.clock.Now()
	if ctx.Err() != nil {
		return now.Add(e.cfg.MemberLease.Renew) // shutting down: release does the last writes
	}
	leases, objs := e.observe()
	e.mu.Lock()
	suspects := maps.Clone(e.suspects)
	e.mu.Unlock()
	restarting := e.inherits(leases)
	e.restarting.Store(restarting)
	e.started.Store(true)
	writes := e.core.Step(mastership.Input{Now: now, Leases: leases, Local: mastership.Local{
		Leaving: e.leaving.Load(), Announcing: e.router.Announcing(), Maintenance: e.maintenance(),
		Suspects: suspects, Restarting: restarting,
	}})
	results := e.execute(ctx, now, writes, objs)
	out := e.core.Advance(e.clock.Now(), results)
	e.report(out.Events)
	if restarting {
		// What this round took back counts before the node loop next looks.
		after, _ := e.observe()
		e.restarting.Store(e.inherits(after))
	}

	e.mu.Lock()
	e.master, e.until, e.holders, e.handoffs, e.successors = out.Masters, out.Until, out.Holders, out.Handoffs, out.AnnouncedSuccessors
	e.probe = out.Probe
	e.announce = out.Announce
	e.armExpiry()
	e.mu.Unlock()

	next := out.Next
	if len(out.Acks) > 0 {
		// The old master demotes on the acknowledgement: the master routes must have
		// left for the routers before it, or they would briefly have none.
		err := e.applyNow(ctx)
		if err == nil {
			fctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			err = e.router.Flush(fctx)
			cancel()
		}
		if err != nil {
			e.log.Warn("elector: master routes not sent, handover not acknowledged yet", "err", err)
			return earliest(next, now.Add(100*time.Millisecond))
		}
		events, retry := e.core.Acknowledged(e.execute(ctx, now, out.Acks, objs))
		e.report(events)
		if !retry.IsZero() {
			next = earliest(next, retry)
		}
	} else if out.Changed {
		e.changed()
	}
	return next
}

// inherits reports whether, with a restart time, an instance Lease written for this
// member by an earlier process is still to be taken back.
func (e *elector) inherits(leases []mastership.Lease) bool {
	if e.cfg.RestartTime <= 0 || e.leaving.Load() {
		return false
	}
	for _, l := range leases {
		if l.Member == nil && l.Holder == e.me && l.HandoverFrom == "" && l.Incarnation != "" && l.Incarnation != e.incarnation {
			return true
		}
	}
	return false
}

// Restarting reports whether this pod is still taking back what its previous process
// held (true until its first step has looked).
func (e *elector) Restarting() bool { return !e.started.Load() || e.restarting.Load() }

func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// report logs what the Core did.
func (e *elector) report(events []mastership.Event) {
	for _, ev := range events {
		switch ev.Kind {
		case mastership.EventWriteFailed:
			if ev.Write == mastership.KindTake {
				e.log.Debug("elector: "+ev.Write.String(), "instance", ev.Instance, "err", ev.Err)
			} else {
				e.log.Warn("elector: "+ev.Write.String(), "instance", ev.Instance, "err", ev.Err)
			}
		case mastership.EventTook:
			e.log.Info("elector: took", "instance", ev.Instance, "from", ev.Member)
		case mastership.EventHandingOver:
			e.log.Info("elector: handing over", "instance", ev.Instance, "to", ev.Member)
		case mastership.EventHandoverAcknowledged:
			e.log.Info("elector: handover acknowledged", "instance", ev.Instance, "by", ev.Member)
		case mastership.EventHandoverLost:
			e.log.Warn("elector: handover never acknowledged", "instance", ev.Instance, "by", ev.Member)
		case mastership.EventTookOver:
			e.log.Info("elector: took over", "instance", ev.Instance)
		case mastership.EventReleased:
			e.log.Info("elector: released", "instance", ev.Instance)
		case mastership.EventAnnouncing:
			e.log.Info("elector: routes reach the routers", "announcing", ev.Member)
		case mastership.EventMaintenance:
			e.log.Info("elector: node maintenance", "maintenance", ev.Member)
		}
	}
}

// execute makes the writes, in order, each conditioned on the version it names.
func (e *elector) execute(ctx context.Context, now time.Time, writes []mastership.Write, objs map[string]*coordinationv1.Lease) []mastership.Result {
	out := make([]mastership.Result, 0, len(writes))
	for _, w := range writes {
		var base *coordinationv1.Lease
		if w.Base != "" {
			base = objs[w.Lease.Name]
			if base == nil || base.ResourceVersion != w.Base {
				out = append(out, mastership.Result{Err: fmt.Errorf("lease %s: version %s not observed", w.Lease.Name, w.Base)})
				continue
			}
		}
		sent := e.clock.Now()
		l, err := e.put(ctx, w.Lease.Name, base, func(l *coordinationv1.Lease) { applyWrite(l, w, now) })
		if err != nil {
			out = append(out, mastership.Result{Err: err, At: sent})
			continue
		}
		objs[l.Name] = l
		out = append(out, mastership.Result{Lease: fromLease(l), At: sent})
	}
	return out
}

// fromLease is what the protocol reads of a Lease.
func fromLease(l *coordinationv1.Lease) mastership.Lease {
	out := mastership.Lease{
		Name: l.Name, Version: l.ResourceVersion, Holder: ptr.Deref(l.Spec.HolderIdentity, ""),
		HandoverFrom: l.Annotations[annotationHandoverFrom],
		Incarnation:  l.Annotations[annotationHolderIncarnation],
	}
	if l.Spec.LeaseDurationSeconds != nil {
		out.Duration = time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second
	}
	if mastership.IsMemberLease(l.Name) {
		m := &mastership.Member{
			Incarnation: l.Annotations[annotationIncarnation],
			Leaving:     l.Annotations[annotationLeaving] != "",
			Announcing:  l.Annotations[annotationAnnouncing] != "false",
			Maintenance: l.Annotations[annotationMaintenance],
			Probe:       l.Annotations[annotationProbe],
			Restarting:  l.Annotations[annotationRestarting] != "",
		}
		if d, err := time.ParseDuration(l.Annotations[annotationRestartTime]); err == nil && d > 0 {
			m.RestartTime = d
		}
		if d := l.Annotations[annotationDead]; d != "" {
			m.Dead = strings.Split(d, ",")
		}
		for _, f := range strings.Split(l.Annotations[annotationAddresses], ",") {
			if a, err := netip.ParseAddr(strings.TrimSpace(f)); err == nil {
				m.Addresses = append(m.Addresses, a)
			}
		}
		out.Member = m
	}
	return out
}

// applyWrite applies a write to l (a copy of its base, or a new Lease).
func applyWrite(l *coordinationv1.Lease, w mastership.Write, now time.Time) {
	t := metav1.NewMicroTime(now)
	if w.Acquire {
		l.Spec.AcquireTime = &t
		l.Spec.LeaseTransitions = ptr.To(ptr.Deref(l.Spec.LeaseTransitions, 0) + 1)
	}
	l.Spec.HolderIdentity = ptr.To(w.Lease.Holder)
	l.Spec.LeaseDurationSeconds = ptr.To(leaseSeconds(w.Lease.Duration))
	if w.Lease.Holder != "" {
		l.Spec.RenewTime = &t
	}
	if l.Annotations == nil {
		l.Annotations = map[string]string{}
	}
	set := func(k, v string) {
		if v == "" {
			delete(l.Annotations, k)
		} else {
			l.Annotations[k] = v
		}
	}
	set(annotationHandoverFrom, w.Lease.HandoverFrom)
	set(annotationHolderIncarnation, w.Lease.Incarnation)
	if m := w.Lease.Member; m != nil {
		addrs := make([]string, 0, len(m.Addresses))
		for _, a := range m.Addresses {
			addrs = append(addrs, a.String())
		}
		l.Annotations[annotationAddresses] = strings.Join(addrs, ",")
		set(annotationIncarnation, m.Incarnation)
		set(annotationLeaving, map[bool]string{true: "true"}[m.Leaving])
		set(annotationAnnouncing, map[bool]string{false: "false"}[m.Announcing])
		set(annotationMaintenance, m.Maintenance)
		set(annotationProbe, m.Probe)
		set(annotationDead, strings.Join(m.Dead, ","))
		set(annotationRestarting, map[bool]string{true: "true"}[m.Restarting])
		restart := ""
		if m.RestartTime > 0 {
			restart = m.RestartTime.String()
		}
		set(annotationRestartTime, restart)
	}
}

// put creates the Lease (base nil) or updates base, conditioned on its
// resourceVersion: the compare-and-swap that makes Lease ownership exclusive.
func (e *elector) put(ctx context.Context, name string, base *coordinationv1.Lease, mutate func(*coordinationv1.Lease)) (*coordinationv1.Lease, error) {
	var l *coordinationv1.Lease
	if base == nil {
		l = &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: e.cfg.Namespace, Labels: map[string]string{labelPartOf: "shardlb"}}}
	} else {
		l = base.DeepCopy()
	}
	mutate(l)
	ctx, cancel := context.WithTimeout(ctx, e.cfg.MemberLease.Renew*2)
	defer cancel()
	var out *coordinationv1.Lease
	var err error
	if base == nil {
		out, err = e.api.Create(ctx, l, metav1.CreateOptions{FieldManager: "shardlb"})
	} else {
		out, err = e.api.Update(ctx, l, metav1.UpdateOptions{FieldManager: "shardlb"})
	}
	if err != nil {
		if apierrors.IsNotFound(err) {
			delete(e.own, name) // deleted: our copy would keep it alive
		}
		// On a conflict our copy is stale, but the cache may be staler still: observe
		// keeps whichever is newer, so a version never goes back (which would restart
		// its expiry clock).
		return nil, fmt.Errorf("lease %s: %w", name, err)
	}
	out.ManagedFields = nil
	e.own[name] = out
	return out, nil
}

// release gives up, at shutdown after the routes are withdrawn, each instance Lease
// still held (not handed over in time), so its new master need not wait for expiry.
// The member Lease stays, marked leaving, until forget: nodes that took over from this
// pod hand off to it meanwhile.
func (e *elector) release(ctx context.Context) {
	leases, objs := e.observe()
	for _, res := range e.execute(ctx, e.clock.Now(), e.core.Release(leases), objs) {
		if res.Err != nil {
			e.log.Warn("elector: release", "err", res.Err)
		}
	}
	e.mu.Lock()
	e.master = map[string]bool{}
	if e.untilT != nil {
		e.untilT.Stop()
	}
	e.mu.Unlock()
}

// forget deletes the member Lease: the last write of a stopping pod.
func (e *elector) forget(ctx context.Context) {
	if err := e.api.Delete(ctx, MemberLeaseName(e.me), metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		e.log.Warn("elector: delete member lease", "err", err)
	}
}

func leaseSeconds(d time.Duration) int32 {
	s := int32((d + time.Second - 1) / time.Second)
	return max(s, 1)
}

// rvLess orders resourceVersions; they are etcd revisions in practice (see rvOlder).
func rvLess(a, b string) bool {
	x, err1 := strconv.ParseUint(a, 10, 64)
	y, err2 := strconv.ParseUint(b, 10, 64)
	return err1 == nil && err2 == nil && x < y
}

// probeAddress is where peers probe this member: the metrics address (or the API
// address serving the probes when it is empty), with this node's first address
// when it listens on every address. "" when there is none.
func probeAddress(cfg *Config) string {
	addr := cmp.Or(cfg.MetricsAddress, cfg.APIAddress)
	host, port, err := net.SplitHostPort(addr)
	if addr == "" || err != nil {
		return ""
	}
	if ip, err := netip.ParseAddr(host); host == "" || err == nil && ip.IsUnspecified() {
		if len(cfg.NodeAddresses) == 0 {
			return ""
		}
		return net.JoinHostPort(cfg.NodeAddresses[0].String(), port)
	}
	return addr
}

// probeLoop probes, every PeerProbe.Interval, the masters this pod would take over
// (the Core's Outcome.Probe) at the address on their member Lease: GET /healthz,
// answered within the interval. PeerProbe.Failures failures in a row of one process
// (incarnation), or one refused connection (its node is up, the process is not),
// make it a suspect, which the next step takes for dead; one answer clears it.
func (e *elector) probeLoop(ctx context.Context) {
	client := &http.Client{Timeout: e.cfg.PeerProbe.Interval}
	type target struct {
		incarnation, addr string
		restarts          bool // its forwarding outlives its process
	}
	failures := map[string]int{}  // member -> failures in a row
	probed := map[string]target{} // member -> what was probed
	next := e.clock.Now()
	for {
		// A round every interval, however long the probes took (at most an interval).
		next = next.Add(e.cfg.PeerProbe.Interval)
		if now := e.clock.Now(); next.Before(now) {
			next = now
		}
		select {
		case <-ctx.Done():
			return
		case <-e.clock.After(next.Sub(e.clock.Now())):
		}
		e.mu.Lock()
		names := slices.Clone(e.probe)
		e.mu.Unlock()
		targets := map[string]target{}
		for _, m := range names {
			o, ok, _ := e.leases.GetByKey(e.cfg.Namespace + "/" + MemberLeaseName(m))
			if !ok {
				continue
			}
			if l, ok := o.(*coordinationv1.Lease); ok && l.Annotations[annotationProbe] != "" {
				targets[m] = target{l.Annotations[annotationIncarnation], l.Annotations[annotationProbe], l.Annotations[annotationRestartTime] != ""}
			}
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		for m, t := range targets {
			if probed[m] != t {
				failures[m], probed[m] = 0, t
			}
		}
		for m, t := range targets {
			wg.Go(func() {
				pctx, cancel := context.WithTimeout(ctx, e.cfg.PeerProbe.Interval)
				defer cancel()
				ok, refused := false, false
				if req, err := http.NewRequestWithContext(pctx, http.MethodGet, "http://"+t.addr+"/healthz", nil); err == nil {
					resp, err := client.Do(req)
					if err == nil {
						_, _ = io.Copy(io.Discard, resp.Body)
						_ = resp.Body.Close()
						ok = resp.StatusCode == http.StatusOK
					}
					refused = errors.Is(err, syscall.ECONNREFUSED)
				}
				mu.Lock()
				switch {
				case ok:
					failures[m] = 0
				case refused && t.restarts:
					// Its node answers and its process is gone, but its datapath
					// forwards and the routers keep its routes: a restart. Its member
					// Lease, which lasts its restart time, says when it is not.
					failures[m] = 0
				case refused:
					// Its node answers that nothing listens: that process is gone.
					failures[m] = e.cfg.PeerProbe.Failures
				default:
					failures[m]++
				}
				mu.Unlock()
			})
		}
		wg.Wait()
		suspects := map[string]string{}
		for m := range failures {
			if _, ok := targets[m]; !ok {
				delete(failures, m)
				delete(probed, m)
				continue
			}
			if failures[m] >= e.cfg.PeerProbe.Failures {
				suspects[m] = targets[m].incarnation
			}
		}
		e.mu.Lock()
		changed := !maps.Equal(e.suspects, suspects)
		e.suspects = suspects
		e.mu.Unlock()
		if changed {
			for m := range suspects {
				e.log.Warn("elector: peer probes fail, taking it for dead", "member", m, "probe", targets[m].addr)
			}
			e.poke()
		}
	}
}
