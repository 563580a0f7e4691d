package kube

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	coordclient "k8s.io/client-go/kubernetes/typed/coordination/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"

	"github.com/shardlb/shardlb/shard"
)

// Lease names. All live in Config.Namespace.
const (
	ControllerLeaseName = "shardlb-controller"
	memberLeasePrefix   = "shardlb-member-"
	instanceLeasePrefix = "shardlb-instance-"
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
	labelPartOf           = "app.kubernetes.io/part-of"
)

// MemberLeaseName is the Lease through which a member shows it is alive.
func MemberLeaseName(member string) string { return memberLeasePrefix + member }

// InstanceLeaseName is the mastership Lease of an instance.
func InstanceLeaseName(instance string) string { return instanceLeasePrefix + instance }

// elector keeps this pod's member Lease fresh and takes, renews and hands over
// instance mastership Leases as shard.Rebalance says. Mutual exclusion is the API's:
// every take is an update conditioned on the resourceVersion read (or a create), so
// two pods can never both hold a Lease; the make-before-break overlap during a handover
// is deliberate and bounded by one acknowledgement.
//
// Expiry is judged by the local time a Lease's resourceVersion was first seen, not by
// the holder's renewTime, so clock skew between nodes does not matter (as in client-go
// leaderelection).
type elector struct {
	cfg      *Config
	log      *slog.Logger
	api      coordclient.LeaseInterface
	leases   cache.Store
	clock    clock.Clock
	me       string
	excluded map[string]bool
	router   Router
	// maintenance is why this node must not master now ("" when it may).
	maintenance func() string
	// applyNow applies this node's plan with the current roles and returns when the
	// Router has it: a handed-over instance is acknowledged only after that.
	applyNow func(context.Context) error
	// changed asks the node loop to recompute (debounced).
	changed func()
	wake    chan struct{}
	// incarnation is this process's, on its member Lease; leaving is set at shutdown.
	incarnation string
	leaving     atomic.Bool

	mu       sync.Mutex // guards master, holders and handoffs, read by the node loop and the API
	master   map[string]bool
	holders  map[string]string       // instance -> holder of its fresh Lease
	handoffs map[string][]netip.Addr // instance -> addresses of its previous master

	// Owned by the loop goroutine.
	seen          map[string]seenLease
	own           map[string]*coordinationv1.Lease // what this pod wrote last
	handover      map[string]string                // instance -> member handed to, until it acks
	missingSince  map[string]time.Time
	memberRenewed time.Time
	leaveWritten  bool
	// announcingWritten and maintenanceWritten are what the member Lease says.
	announcingWritten  bool
	maintenanceWritten string
	previous           map[string]previousMaster // instance -> who handed it to this pod
}

// previousMaster is the process that handed an instance to this pod.
type previousMaster struct{ member, incarnation string }

type seenLease struct {
	rv string
	at time.Time
}

func newElector(cfg *Config, log *slog.Logger, api coordclient.LeaseInterface, leases cache.Store, r Router, maintenance func() string, clk clock.Clock) *elector {
	if maintenance == nil {
		maintenance = func() string { return "" }
	}
	ex := map[string]bool{}
	for _, m := range cfg.Excluded {
		ex[m] = true
	}
	return &elector{
		cfg: cfg, log: log, api: api, leases: leases, router: r, maintenance: maintenance, clock: clk, me: cfg.NodeName, excluded: ex,
		applyNow: func(context.Context) error { return nil }, changed: func() {},
		wake:   make(chan struct{}, 1),
		master: map[string]bool{}, holders: map[string]string{},
		seen: map[string]seenLease{}, own: map[string]*coordinationv1.Lease{},
		handover: map[string]string{}, missingSince: map[string]time.Time{},
		previous: map[string]previousMaster{}, handoffs: map[string][]netip.Addr{},
		incarnation: newIncarnation(),
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
	n := 0
	for _, m := range e.master {
		if m {
			n++
		}
	}
	return n
}

// Handoffs is instance -> the node addresses of the pod that handed it to this one in
// a planned switch, for the instances this pod masters while that pod's process lives
// (shard.Input.Handoffs).
func (e *elector) Handoffs() map[string][]netip.Addr {
	e.mu.Lock()
	defer e.mu.Unlock()
	return maps.Clone(e.handoffs)
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
	for inst, m := range e.master {
		if m {
			out[inst] = e.me
		} else if out[inst] == e.me {
			delete(out, inst)
		}
	}
	return out
}

// IsMaster reports whether this pod announces inst as master.
func (e *elector) IsMaster(inst string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.master[inst]
}

func (e *elector) run(ctx context.Context) {
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

// view is the freshest copy of a Lease: the cache's, or what this pod wrote if the
// cache has not caught up. It records when each resourceVersion was first seen.
func (e *elector) view(name string, now time.Time) *coordinationv1.Lease {
	var l *coordinationv1.Lease
	if o, ok, _ := e.leases.GetByKey(e.cfg.Namespace + "/" + name); ok {
		l, _ = o.(*coordinationv1.Lease)
	}
	if own := e.own[name]; own != nil && (l == nil || rvLess(l.ResourceVersion, own.ResourceVersion)) {
		l = own
	}
	if l == nil {
		delete(e.seen, name)
		return nil
	}
	if s, ok := e.seen[name]; !ok || s.rv != l.ResourceVersion {
		e.seen[name] = seenLease{rv: l.ResourceVersion, at: now}
	}
	return l
}

// expiry is when a Lease stops counting; a released Lease (no holder) has expired.
func (e *elector) expiry(l *coordinationv1.Lease) time.Time {
	s := e.seen[l.Name]
	if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity == "" {
		return s.at
	}
	d := e.cfg.MemberLease.Duration
	if l.Spec.LeaseDurationSeconds != nil {
		d = time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second
	}
	return s.at.Add(d)
}

func holder(l *coordinationv1.Lease) string {
	if l == nil || l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

// evaluate does one round and returns when it wants the next.
func (e *elector) evaluate(ctx context.Context) time.Time {
	now := e.clock.Now()
	renew, grace := e.cfg.MemberLease.Renew, e.cfg.MemberLease.Grace
	if ctx.Err() != nil {
		return now.Add(renew) // shutting down: release does the last writes
	}
	next := now.Add(renew)
	soon := func(t time.Time) {
		if t.Before(next) {
			next = t
		}
	}

	leaving := e.leaving.Load()
	announcing := e.router.Announcing()
	maint := e.maintenance()
	if now.Sub(e.memberRenewed) >= renew || leaving && !e.leaveWritten || announcing != e.announcingWritten || maint != e.maintenanceWritten {
		if err := e.renewMember(ctx, now, leaving, announcing, maint); err != nil {
			e.log.Warn("elector: member lease", "err", err)
		} else {
			if announcing != e.announcingWritten {
				e.log.Info("elector: routes reach the routers", "announcing", announcing)
			}
			if maint != e.maintenanceWritten {
				e.log.Info("elector: node maintenance", "maintenance", cmp.Or(maint, "none"))
			}
			e.memberRenewed = now
			e.leaveWritten, e.announcingWritten, e.maintenanceWritten = leaving, announcing, maint
		}
	}
	meLive := now.Sub(e.memberRenewed) < e.cfg.MemberLease.Duration
	eligible := meLive && !e.excluded[e.me] && !leaving && maint == ""
	// A member takes mastership only when its master routes would reach the routers:
	// while a restarted member's sessions come up, the routers would otherwise see no
	// master route and spread the VIP over the backups, which do not know the
	// connections in flight (the old master demotes on the new one's word).
	canTake := eligible && announcing

	// Who is alive, and who masters what.
	names := e.cfg.Instances.Names()
	leases := make(map[string]*coordinationv1.Lease, len(names))
	current := map[string]string{}
	stale := map[string]bool{} // holders of an expired instance Lease: not live
	for _, inst := range names {
		l := e.view(InstanceLeaseName(inst), now)
		leases[inst] = l
		if h := holder(l); h != "" {
			if exp := e.expiry(l); now.Before(exp) {
				current[inst] = h
				if h != e.me {
					soon(exp.Add(10 * time.Millisecond))
				}
			} else if h != e.me {
				stale[h] = true
			}
		}
	}
	// Members Rebalance may give instances to: alive, not leaving, and announcing or
	// already holding an instance (so a session flap does not move mastership).
	holds := map[string]bool{}
	for _, h := range current {
		holds[h] = true
	}
	live := map[string]bool{}
	for _, o := range e.leases.List() {
		l, ok := o.(*coordinationv1.Lease)
		if !ok || !strings.HasPrefix(l.Name, memberLeasePrefix) {
			continue
		}
		l = e.view(l.Name, now)
		h := holder(l)
		if h == "" || h == e.me || stale[h] || l.Annotations[annotationLeaving] != "" {
			continue
		}
		if exp := e.expiry(l); now.Before(exp) {
			live[h] = l.Annotations[annotationMaintenance] == "" && (l.Annotations[annotationAnnouncing] != "false" || holds[h])
			soon(exp.Add(10 * time.Millisecond))
		}
	}
	if meLive && !leaving {
		live[e.me] = maint == "" && (announcing || holds[e.me])
	}
	members := make([]string, 0, len(live))
	for m, ok := range live {
		if ok {
			members = append(members, m)
		}
	}
	pref := shard.Rebalance(e.cfg.Instances, members, e.excluded, current)

	master := map[string]bool{}
	var ack []string
	for _, inst := range names {
		name := InstanceLeaseName(inst)
		l := leases[inst]
		h := holder(l)
		switch {
		case h == e.me && l.Annotations[annotationHandoverFrom] != "":
			// Handed to us: announce as master first, acknowledge after. Segments of
			// connections the previous master still serves are handed back to it.
			master[inst] = true
			ack = append(ack, inst)
			from := l.Annotations[annotationHandoverFrom]
			if ml := e.view(MemberLeaseName(from), now); ml != nil && ml.Annotations[annotationIncarnation] != "" {
				e.previous[inst] = previousMaster{member: from, incarnation: ml.Annotations[annotationIncarnation]}
			}
			continue
		case h == e.me:
			master[inst] = true
			target := pref[inst]
			heldFor := now.Sub(e.seen[name].at)
			if target != "" && target != e.me && live[target] && (heldFor >= renew || !eligible) {
				if err := e.handTo(ctx, l, target, now); err != nil {
					e.log.Warn("elector: hand over", "instance", inst, "to", target, "err", err)
				} else {
					e.handover[inst] = target
					e.log.Info("elector: handing over", "instance", inst, "to", target)
				}
				continue
			}
			if !eligible && target == "" {
				if err := e.releaseInstance(ctx, l); err == nil {
					master[inst] = false
				}
				continue
			}
			if now.Sub(e.seen[name].at) >= renew {
				if err := e.put(ctx, name, l, func(l *coordinationv1.Lease) { e.stamp(l, now, false) }); err != nil {
					e.log.Warn("elector: renew", "instance", inst, "err", err)
				}
			}
			// Renewals failing for a whole lease duration: others may hold it by now.
			if l := e.view(name, now); holder(l) != e.me || !now.Before(e.expiry(l)) {
				master[inst] = false
			}
			continue
		case h != "" && e.handover[inst] == h:
			switch {
			case !now.Before(e.expiry(l)):
				// The new holder never acknowledged: it is gone.
				delete(e.handover, inst)
			case l.Annotations[annotationHandoverFrom] == e.me:
				master[inst] = true // keep announcing until the new master does
				soon(now.Add(50 * time.Millisecond))
				continue
			default:
				delete(e.handover, inst)
				e.log.Info("elector: handover acknowledged", "instance", inst, "by", h)
			}
		default:
			delete(e.handover, inst)
		}

		// Not ours: take it when it has no master, if we are the preferred member or
		// the preferred member let the grace pass.
		if !canTake {
			continue
		}
		if l == nil {
			since, ok := e.missingSince[inst]
			if !ok {
				since = now
				e.missingSince[inst] = now
			}
			if pref[inst] == e.me || !now.Before(since.Add(grace)) {
				if err := e.put(ctx, name, nil, func(l *coordinationv1.Lease) { e.stamp(l, now, true) }); err != nil {
					e.log.Debug("elector: create", "instance", inst, "err", err)
				} else {
					master[inst] = true
					e.log.Info("elector: took", "instance", inst)
				}
			} else {
				soon(since.Add(grace))
			}
			continue
		}
		delete(e.missingSince, inst)
		exp := e.expiry(l)
		if now.Before(exp) {
			continue
		}
		if pref[inst] == e.me || !now.Before(exp.Add(grace)) {
			if err := e.put(ctx, name, l, func(l *coordinationv1.Lease) { e.stamp(l, now, true) }); err != nil {
				e.log.Debug("elector: take", "instance", inst, "err", err)
			} else {
				master[inst] = true
				e.log.Info("elector: took", "instance", inst, "from", h)
			}
		} else {
			soon(exp.Add(grace))
		}
	}

	holders := map[string]string{}
	for _, inst := range names {
		if l := e.view(InstanceLeaseName(inst), now); l != nil && now.Before(e.expiry(l)) {
			holders[inst] = holder(l)
		}
	}
	handoffs := e.handoffTargets(master, now, soon)
	e.mu.Lock()
	changed := !maps.Equal(e.master, master) || !maps.EqualFunc(e.handoffs, handoffs, slices.Equal)
	e.master, e.holders, e.handoffs = master, holders, handoffs
	e.mu.Unlock()

	if len(ack) > 0 {
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
			return now.Add(100 * time.Millisecond)
		}
		for _, inst := range ack {
			name := InstanceLeaseName(inst)
			if err := e.put(ctx, name, leases[inst], func(l *coordinationv1.Lease) { e.stamp(l, now, false) }); err != nil {
				e.log.Warn("elector: acknowledge handover", "instance", inst, "err", err)
				soon(now.Add(100 * time.Millisecond))
			} else {
				e.log.Info("elector: took over", "instance", inst)
			}
		}
	} else if changed {
		e.changed()
	}
	return next
}

// handoffTargets keeps the previous master of each instance this pod masters while
// that process lives (its member Lease, same incarnation, not expired), and not while
// this pod hands the instance on itself: then two pods could send a segment neither
// knows back and forth.
func (e *elector) handoffTargets(master map[string]bool, now time.Time, soon func(time.Time)) map[string][]netip.Addr {
	out := map[string][]netip.Addr{}
	for inst, p := range e.previous {
		ml := e.view(MemberLeaseName(p.member), now)
		if !master[inst] || e.handover[inst] != "" || ml == nil ||
			ml.Annotations[annotationIncarnation] != p.incarnation || !now.Before(e.expiry(ml)) {
			delete(e.previous, inst)
			continue
		}
		soon(e.expiry(ml).Add(10 * time.Millisecond))
		var addrs []netip.Addr
		for _, f := range strings.Split(ml.Annotations[annotationAddresses], ",") {
			if a, err := netip.ParseAddr(strings.TrimSpace(f)); err == nil {
				addrs = append(addrs, a)
			}
		}
		if len(addrs) > 0 {
			out[inst] = addrs
		}
	}
	return out
}

// stamp makes l held and renewed by this pod; take counts a new acquisition.
func (e *elector) stamp(l *coordinationv1.Lease, now time.Time, take bool) {
	t := metav1.NewMicroTime(now)
	if take || holder(l) != e.me {
		l.Spec.AcquireTime = &t
		l.Spec.LeaseTransitions = ptr.To(ptr.Deref(l.Spec.LeaseTransitions, 0) + 1)
	}
	l.Spec.HolderIdentity = ptr.To(e.me)
	l.Spec.LeaseDurationSeconds = ptr.To(leaseSeconds(e.cfg.MemberLease.Duration))
	l.Spec.RenewTime = &t
	delete(l.Annotations, annotationHandoverFrom)
}

func (e *elector) handTo(ctx context.Context, l *coordinationv1.Lease, target string, now time.Time) error {
	return e.put(ctx, l.Name, l, func(l *coordinationv1.Lease) {
		t := metav1.NewMicroTime(now)
		l.Spec.HolderIdentity = ptr.To(target)
		l.Spec.AcquireTime, l.Spec.RenewTime = &t, &t
		l.Spec.LeaseTransitions = ptr.To(ptr.Deref(l.Spec.LeaseTransitions, 0) + 1)
		if l.Annotations == nil {
			l.Annotations = map[string]string{}
		}
		l.Annotations[annotationHandoverFrom] = e.me
	})
}

func (e *elector) releaseInstance(ctx context.Context, l *coordinationv1.Lease) error {
	return e.put(ctx, l.Name, l, func(l *coordinationv1.Lease) {
		l.Spec.HolderIdentity = ptr.To("")
		l.Spec.LeaseDurationSeconds = ptr.To[int32](1)
		delete(l.Annotations, annotationHandoverFrom)
	})
}

func (e *elector) renewMember(ctx context.Context, now time.Time, leaving, announcing bool, maint string) error {
	name := MemberLeaseName(e.me)
	return e.put(ctx, name, e.view(name, now), func(l *coordinationv1.Lease) {
		e.stamp(l, now, false)
		if l.Annotations == nil {
			l.Annotations = map[string]string{}
		}
		addrs := make([]string, 0, len(e.cfg.NodeAddresses))
		for _, a := range e.cfg.NodeAddresses {
			addrs = append(addrs, a.String())
		}
		l.Annotations[annotationAddresses] = strings.Join(addrs, ",")
		l.Annotations[annotationIncarnation] = e.incarnation
		if leaving {
			l.Annotations[annotationLeaving] = "true"
		} else {
			delete(l.Annotations, annotationLeaving)
		}
		if announcing {
			delete(l.Annotations, annotationAnnouncing)
		} else {
			l.Annotations[annotationAnnouncing] = "false"
		}
		if maint != "" {
			l.Annotations[annotationMaintenance] = maint
		} else {
			delete(l.Annotations, annotationMaintenance)
		}
	})
}

// put creates the Lease (base nil) or updates base, conditioned on its
// resourceVersion: the compare-and-swap that makes Lease ownership exclusive.
func (e *elector) put(ctx context.Context, name string, base *coordinationv1.Lease, mutate func(*coordinationv1.Lease)) error {
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
		if apierrors.IsConflict(err) || apierrors.IsAlreadyExists(err) || apierrors.IsNotFound(err) {
			delete(e.own, name) // our copy is stale: read the cache next round
		}
		return fmt.Errorf("lease %s: %w", name, err)
	}
	out.ManagedFields = nil
	e.own[name] = out
	return nil
}

// release gives up, at shutdown after the routes are withdrawn, each instance Lease
// still held (not handed over in time), so its new master need not wait for expiry.
// The member Lease stays, marked leaving, until forget: nodes that took over from this
// pod hand off to it meanwhile.
func (e *elector) release(ctx context.Context) {
	now := e.clock.Now()
	for _, inst := range e.cfg.Instances.Names() {
		l := e.view(InstanceLeaseName(inst), now)
		if holder(l) != e.me {
			continue
		}
		if err := e.releaseInstance(ctx, l); err != nil {
			e.log.Warn("elector: release", "instance", inst, "err", err)
		}
	}
	e.mu.Lock()
	e.master = map[string]bool{}
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
