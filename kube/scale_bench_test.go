package kube

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"

	"github.com/shardlb/shardlb/mastership"
	"github.com/shardlb/shardlb/shard"
)

// Scale of BenchmarkLeaseTraffic: members (pods) and instances (shards). The
// environment variables may shrink it for a quick run.
const (
	envScaleMembers   = "SHARDLB_SCALE_MEMBERS"
	envScaleInstances = "SHARDLB_SCALE_INSTANCES"
	scaleMembers      = 100
	scaleInstances    = 64
)

// Phases of one simulation. The bounds only fail a run that never converges; nothing
// here asserts a timing.
const (
	scaleConvergeBound = 2 * time.Minute
	scaleSettle        = 2 * time.Second  // after convergence, before the steady window
	scaleSteadyWindow  = 10 * time.Second // the steady-state measurement
	scaleCheckEvery    = 100 * time.Millisecond
)

// scaleContentType is the members' wire encoding. Run's clients speak client-go's
// default, JSON; decoding every Lease event in JSON for 100 members alone saturates
// a 2-core machine, and starved members cannot renew or demote in time, so the
// simulation speaks protobuf: the same requests and events, fewer bytes (watch-KiB/s)
// and less CPU (member-cpu-ms/s) than JSON pods.
const scaleContentType = "application/vnd.kubernetes.protobuf"

// leaseProtocol is one configuration of the mastership protocol under measure: one
// row of BenchmarkLeaseTraffic. Another configuration (timings, or an elector variant
// with a start of its own) is one more entry in leaseProtocols.
type leaseProtocol struct {
	name     string
	timings  LeaseTimings
	protocol mastership.Protocol
	// start runs one member in the background until ctx ends, tracked by wg, and
	// returns what it announces as master; the member calls stepped with the Leases
	// of its cache each time it looks at them to decide. Ending ctx must stop it as a
	// SIGKILL would: no release, no delete, its Leases stay.
	start func(ctx context.Context, wg *sync.WaitGroup, cfg *Config, client kubernetes.Interface, log *slog.Logger, stepped func([]any)) (isMaster func(instance string) bool)
}

// leaseProtocols are the configurations compared in one run: the baseline is the
// protocol in which every holder renews each instance Lease every second (Leases of
// 4 s), the other the default, member-bound one with its default timings and probes.
var leaseProtocols = []leaseProtocol{
	{name: "baseline-renewed-1s", protocol: mastership.ProtocolRenewed, start: startElector,
		timings: LeaseTimings{Duration: 4 * time.Second, Renew: time.Second, Grace: time.Second}},
	{name: "member-bound-10s", protocol: mastership.ProtocolMemberBound, start: startElector,
		timings: DefaultConfig().MemberLease},
}

// BenchmarkLeaseTraffic simulates the mastership protocol at cluster scale (by default
// 100 members and 64 instances) against the real apiserver and etcd. Every member is
// an elector in this process with a client of its own (its own connection, the QPS and
// Burst of DefaultConfig, protobuf: see scaleContentType), its own Lease informer
// (Run's list and watch) and a Router that always announces. All members join at
// once; once every instance has a master (a fresh instance Lease held by a running
// member that announces it, no handover pending, loads even), it measures, from the
// apiserver's /metrics:
//
//   - lease-writes/s, write-conflicts/s (409s among them), watch-events/s and
//     watch-KiB/s sent to watchers of Leases, over a steady window of 10 s;
//   - loss-writes/s and loss-watch-events/s from the abrupt stop of one master (its
//     context cancelled as a SIGKILL would: no release, its Leases stay) until each of
//     its instances has a new master; takeover-ms, from that stop to the last of those
//     instances' acquireTime (written by the new master, whose clock is this process's);
//   - settle-ms, from the start of the members to convergence;
//   - member-rss-KiB and member-cpu-ms/s: this process's RSS growth from before the
//     members started (memory returned to the system first) to the end of the steady
//     window and its CPU over that window, divided by the members
//     (averages: the members share one Go runtime, and the benchmark's own watch and
//     checks are counted in);
//   - member-step-gap-ms: the longest any member went between two rounds in the
//     steady window; near MemberLease.Duration this process is too loaded for the
//     figures to mean anything (a member that does not step cannot renew or demote);
//   - server-cpu-ms/s: kube-apiserver and etcd CPU over the steady window.
//
// Watch events leave out the benchmark's own watch. Lease traffic of the apiserver
// itself (its identity Lease, one write every 10 s) is counted in.
//
// It fails if convergence or a takeover never comes within 2 minutes, or if two
// running members ever announce one instance as master outside a handover: sampled
// every 100 ms; a handover lasts from the Lease write naming the old master in
// shardlb.io/handover-from until MemberLease.Duration (and 1 s for the benchmark's own
// watch) after the new master acknowledged it, and handovers in a row may overlap.
// The failure names, for each of the masters, when it last stepped, how long the
// round before took and which version of the Lease its cache held.
//
// Each iteration reruns the whole simulation in a namespace of its own and the metrics
// are means over the iterations; the timer runs throughout, so ns/op is a whole
// simulation (about 20 s) and `-benchtime=1s` (make bench) runs one, as does
// `-benchtime=1x`.
//
// Go prints the reported metrics sorted by unit and benchtab's ratio compares the
// first: every other unit must sort after lease-writes/s.
func BenchmarkLeaseTraffic(b *testing.B) {
	members := scaleFromEnv(b, envScaleMembers, scaleMembers)
	instances := scaleFromEnv(b, envScaleInstances, scaleInstances)
	if members < 2 {
		b.Fatalf("%s=%d: a takeover needs at least 2 members", envScaleMembers, members)
	}
	for _, p := range leaseProtocols {
		b.Run(p.name, func(b *testing.B) {
			var sum leaseTraffic
			for range b.N {
				sum.add(simulateLeases(b, p, members, instances))
			}
			sum.report(b, b.N)
		})
	}
}

func scaleFromEnv(b *testing.B, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		b.Fatalf("%s=%q: want a positive number", name, v)
	}
	return n
}

// startElector is today's member: Run's Lease informer and elector, nothing else.
func startElector(ctx context.Context, wg *sync.WaitGroup, cfg *Config, client kubernetes.Interface, log *slog.Logger, stepped func([]any)) func(string) bool {
	if cfg.LeaseProtocol == mastership.ProtocolMemberBound {
		// The /healthz peers probe, gone with the member as a SIGKILLed pod's is.
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) }))
		cfg.MetricsAddress = srv.Listener.Addr().String()
		wg.Go(func() {
			<-ctx.Done()
			srv.CloseClientConnections()
			srv.Close()
		})
	}
	var el *elector
	store, inf := newLeaseInformer(client, cfg.Namespace, func() { el.poke() })
	el = newElector(cfg, log, client.CoordinationV1().Leases(cfg.Namespace), steppedStore{store, stepped}, announcingRouter{}, nil, clock.RealClock{})
	wg.Go(func() { inf.Run(ctx.Done()) })
	wg.Go(func() {
		if cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
			el.run(ctx)
		}
	})
	return el.IsMaster
}

// steppedStore tells each List, which the elector makes once a round.
type steppedStore struct {
	cache.Store
	stepped func([]any)
}

func (s steppedStore) List() []any {
	l := s.Store.List()
	s.stepped(l)
	return l
}

// announcingRouter is a Router whose routes always reach the routers at once.
type announcingRouter struct{}

func (announcingRouter) SetAdvertisements(context.Context, []shard.Advertisement) error { return nil }
func (announcingRouter) Announcing() bool                                               { return true }
func (announcingRouter) Flush(context.Context) error                                    { return nil }

// leaseTraffic is what one simulation measured (or the sum of several).
type leaseTraffic struct {
	writes, conflicts, events, watchKiB float64 // steady window, per second
	lossWrites, lossEvents              float64 // member loss window, per second
	takeover, settle                    time.Duration
	stepGap                             time.Duration // the longest any member went without a step
	staleOverlaps                       int64
	rssKiB, cpuMs, serverCPUMs          float64 // per member, per member, total
}

func (t *leaseTraffic) add(o leaseTraffic) {
	t.writes += o.writes
	t.conflicts += o.conflicts
	t.events += o.events
	t.watchKiB += o.watchKiB
	t.lossWrites += o.lossWrites
	t.lossEvents += o.lossEvents
	t.takeover += o.takeover
	t.settle += o.settle
	t.stepGap += o.stepGap
	t.staleOverlaps += o.staleOverlaps
	t.rssKiB += o.rssKiB
	t.cpuMs += o.cpuMs
	t.serverCPUMs += o.serverCPUMs
}

func (t *leaseTraffic) report(b *testing.B, n int) {
	f := float64(n)
	b.ReportMetric(t.writes/f, "lease-writes/s")
	b.ReportMetric(t.conflicts/f, "write-conflicts/s")
	b.ReportMetric(t.events/f, "watch-events/s")
	b.ReportMetric(t.watchKiB/f, "watch-KiB/s")
	b.ReportMetric(t.lossWrites/f, "loss-writes/s")
	b.ReportMetric(t.lossEvents/f, "loss-watch-events/s")
	b.ReportMetric(float64(t.takeover.Milliseconds())/f, "takeover-ms")
	b.ReportMetric(float64(t.settle.Milliseconds())/f, "settle-ms")
	b.ReportMetric(t.rssKiB/f, "member-rss-KiB")
	b.ReportMetric(t.cpuMs/f, "member-cpu-ms/s")
	b.ReportMetric(float64(t.stepGap.Milliseconds())/f, "member-step-gap-ms")
	b.ReportMetric(t.serverCPUMs/f, "server-cpu-ms/s")
	b.ReportMetric(float64(t.staleOverlaps)/f, "stale-overlap-samples")
}

var leaseSimSeq atomic.Int64

// leaseSim is one simulation: the members, the benchmark's own watch of the Leases,
// and the first failure the background check found.
type leaseSim struct {
	b         *testing.B
	proto     leaseProtocol
	e         *env
	instances []string
	members   []*simMember
	byName    map[string]*simMember
	watch     *leaseWatch

	mu  sync.Mutex
	err error
	// staleOverlaps counts samples in which a member still announced an instance
	// taken from it that it had not observed yet.
	staleOverlaps atomic.Int64
}

// simMember is one member: a pod of its own but for the process.
type simMember struct {
	name     string
	isMaster func(instance string) bool
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	stopped  atomic.Bool // cancelled: it announces nothing any more, as a killed pod
	// lastStep is when it last stepped, lastGap the time from the step before,
	// maxGap the longest gap since it was last reset, all in nanoseconds; observed is
	// what its cache held at the last step.
	lastStep, lastGap, maxGap atomic.Int64
	observed                  atomic.Pointer[[]any]
}

func (m *simMember) stepped(leases []any) {
	m.observed.Store(&leases)
	now := time.Now().UnixNano()
	if last := m.lastStep.Swap(now); last != 0 {
		m.lastGap.Store(now - last)
		if now-last > m.maxGap.Load() {
			m.maxGap.Store(now - last)
		}
	}
}

// observedVersion is the version of Lease name its cache held at its last step.
func (m *simMember) observedVersion(name string) string {
	if p := m.observed.Load(); p != nil {
		for _, o := range *p {
			if l, ok := o.(*coordinationv1.Lease); ok && l.Name == name {
				return l.ResourceVersion
			}
		}
	}
	return ""
}

// lastView says how long ago it last stepped and which version of the Lease name its
// cache held then.
func (m *simMember) lastView(name string) string {
	version := "none"
	if p := m.observed.Load(); p != nil {
		for _, o := range *p {
			if l, ok := o.(*coordinationv1.Lease); ok && l.Name == name {
				version = l.ResourceVersion
			}
		}
	}
	ago := time.Since(time.Unix(0, m.lastStep.Load())).Round(time.Millisecond)
	gap := time.Duration(m.lastGap.Load()).Round(time.Millisecond)
	return fmt.Sprintf("%s stepped %v ago, %v after the step before, its cache holding version %s", m.name, ago, gap, version)
}

func simulateLeases(b *testing.B, p leaseProtocol, members, instances int) leaseTraffic {
	e := newEnv(b, fmt.Sprintf("bench-leases-%d", leaseSimSeq.Add(1)))
	s := &leaseSim{b: b, proto: p, e: e, byName: map[string]*simMember{}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	s.watch = watchLeaseHistory(ctx, b, e)
	debug.FreeOSMemory() // what earlier simulations left is not this one's
	rss0 := selfRSSKiB(b)

	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	var cfgs []Config
	var clients []kubernetes.Interface
	for i := range members {
		cfg := e.config(b, fmt.Sprintf("m%03d", i), "defaultPool=10.40.0.0/24", instances)
		cfg.MemberLease = p.timings
		cfg.LeaseProtocol = p.protocol
		rc, err := cfg.restConfig()
		if err != nil {
			b.Fatal(err)
		}
		// Any Proxy function keeps client-go from sharing one cached transport, and so
		// one HTTP/2 connection, among all members: each pod has a connection of its own.
		rc.Proxy = func(*http.Request) (*url.URL, error) { return nil, nil }
		rc.ContentType = scaleContentType
		c, err := kubernetes.NewForConfig(rc)
		if err != nil {
			b.Fatal(err)
		}
		cfgs, clients = append(cfgs, cfg), append(clients, c)
	}
	s.instances = cfgs[0].Instances.Names()
	defer s.stopAll()

	start := time.Now()
	for i := range cfgs {
		mctx, mcancel := context.WithCancel(ctx)
		m := &simMember{name: cfgs[i].NodeName, cancel: mcancel}
		m.isMaster = p.start(mctx, &m.wg, &cfgs[i], clients[i], log.With("member", m.name), m.stepped)
		s.members = append(s.members, m)
		s.byName[m.name] = m
	}
	var checks sync.WaitGroup
	checkCtx, stopChecks := context.WithCancel(ctx)
	defer func() {
		stopChecks()
		checks.Wait()
	}()
	checks.Go(func() { s.checkMasters(checkCtx) })

	var out leaseTraffic
	s.until(scaleConvergeBound, "every instance to have a master", s.converged)
	out.settle = time.Since(start)
	s.pause(scaleSettle)

	moves0 := s.watch.movesSoFar()
	for _, m := range s.members {
		m.maxGap.Store(0)
	}
	s0 := s.sample(ctx)
	s.pause(scaleSteadyWindow)
	s1 := s.sample(ctx)
	moves := s.watch.movesSoFar() - moves0
	for _, m := range s.members {
		out.stepGap = max(out.stepGap, time.Duration(m.maxGap.Load()))
	}
	out.writes, out.conflicts, out.events, out.watchKiB = rates(s0, s1)
	secs := s1.at.Sub(s0.at).Seconds()
	out.cpuMs = float64((s1.cpu - s0.cpu).Milliseconds()) / secs / float64(members)
	out.serverCPUMs = float64((s1.server - s0.server).Milliseconds()) / secs
	out.rssKiB = (selfRSSKiB(b) - rss0) / float64(members)

	// A master stops as if killed.
	var victim *simMember
	var lost []string
	for _, m := range s.members {
		for _, inst := range s.instances {
			if m.isMaster(inst) {
				lost = append(lost, inst)
			}
		}
		if len(lost) > 0 {
			victim = m
			break
		}
	}
	if victim == nil {
		b.Fatal("no member masters an instance after convergence")
	}
	l0 := s.sample(ctx)
	stopAt := time.Now()
	victim.stopped.Store(true)
	victim.cancel()
	s.until(scaleConvergeBound, fmt.Sprintf("new masters for %v of %s", lost, victim.name), func() bool {
		return s.retaken(lost, victim.name)
	})
	l1 := s.sample(ctx)
	out.lossWrites, _, out.lossEvents, _ = rates(l0, l1)
	out.takeover = s.takeover(lost, stopAt)
	out.staleOverlaps = s.staleOverlaps.Load()

	s.fatalOnFailure()
	b.Logf("%d members x %d instances: settled in %v; steady window %.1f s: %d holder changes, %.0f lists and watches ended "+
		"(%.0f watchers closed as too slow, %.0f watch cache initialisations); %s (%v) stopped, new masters after %v, window %.1f s",
		members, instances, out.settle.Round(time.Millisecond), secs, moves, s1.reads-s0.reads, s1.slowWatchers-s0.slowWatchers,
		s1.cacheInits-s0.cacheInits, victim.name, lost, out.takeover.Round(time.Millisecond), l1.at.Sub(l0.at).Seconds())
	return out
}

// stopAll stops every member still running and waits for their goroutines.
func (s *leaseSim) stopAll() {
	for _, m := range s.members {
		m.stopped.Store(true)
		m.cancel()
	}
	done := make(chan struct{})
	go func() {
		for _, m := range s.members {
			m.wg.Wait()
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		s.b.Errorf("members still running 30 s after their stop")
	}
}

// until polls cond until it holds; it fails the benchmark after timeout or as soon as
// the background check found a double master.
func (s *leaseSim) until(timeout time.Duration, what string, cond func() bool) {
	s.b.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			s.b.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		s.fatalOnFailure()
		time.Sleep(20 * time.Millisecond)
	}
	s.fatalOnFailure()
}

// pause waits d, failing as soon as the background check found a double master.
func (s *leaseSim) pause(d time.Duration) {
	s.b.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		s.fatalOnFailure()
	}
}

func (s *leaseSim) fatalOnFailure() {
	s.b.Helper()
	s.mu.Lock()
	err := s.err
	s.mu.Unlock()
	if err != nil {
		s.b.Fatal(err)
	}
}

// converged: every instance Lease is fresh, held by a running member that announces it
// as master, with no handover pending, and the loads of the running members differ by
// at most one (what shard.Rebalance settles on).
func (s *leaseSim) converged() bool {
	load := map[string]int{}
	for _, m := range s.members {
		if !m.stopped.Load() {
			load[m.name] = 0
		}
	}
	s.watch.mu.Lock()
	defer s.watch.mu.Unlock()
	for _, inst := range s.instances {
		l := s.watch.cur[InstanceLeaseName(inst)]
		if l == nil || l.Annotations[annotationHandoverFrom] != "" || l.Spec.RenewTime == nil ||
			time.Since(l.Spec.RenewTime.Time) > s.proto.timings.Duration {
			return false
		}
		h := ptr.Deref(l.Spec.HolderIdentity, "")
		if _, ok := load[h]; !ok || !s.byName[h].isMaster(inst) {
			return false
		}
		load[h]++
	}
	lo, hi := len(s.instances), 0
	for _, n := range load {
		lo, hi = min(lo, n), max(hi, n)
	}
	return hi-lo <= 1
}

// retaken: each of the instances is held by a running member other than from that
// announces it as master.
func (s *leaseSim) retaken(instances []string, from string) bool {
	s.watch.mu.Lock()
	defer s.watch.mu.Unlock()
	for _, inst := range instances {
		l := s.watch.cur[InstanceLeaseName(inst)]
		if l == nil {
			return false
		}
		h := ptr.Deref(l.Spec.HolderIdentity, "")
		m := s.byName[h]
		if h == from || m == nil || m.stopped.Load() || !m.isMaster(inst) {
			return false
		}
	}
	return true
}

// takeover is the time from stopAt to the last acquisition of the instances by their
// new masters, as the new masters wrote it in acquireTime.
func (s *leaseSim) takeover(instances []string, stopAt time.Time) time.Duration {
	s.watch.mu.Lock()
	defer s.watch.mu.Unlock()
	var worst time.Duration
	for _, inst := range instances {
		d := time.Since(stopAt) // no acquireTime: when it was seen taken, at the latest
		if l := s.watch.cur[InstanceLeaseName(inst)]; l != nil && l.Spec.AcquireTime != nil && l.Spec.AcquireTime.After(stopAt) {
			d = l.Spec.AcquireTime.Sub(stopAt)
		}
		worst = max(worst, d)
	}
	return worst
}

// checkMasters samples, every scaleCheckEvery, which running members announce each
// instance as master, and records a failure when two do outside a handover.
func (s *leaseSim) checkMasters(ctx context.Context) {
	tick := time.NewTicker(scaleCheckEvery)
	defer tick.Stop()
	// The old master demotes when it sees the acknowledgement; allow it the time a
	// Lease takes to expire, in which it would stop anyway.
	allow := s.proto.timings.Duration + time.Second
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		now := time.Now()
		for _, inst := range s.instances {
			var masters []string
			for _, m := range s.members {
				if !m.stopped.Load() && m.isMaster(inst) {
					masters = append(masters, m.name)
				}
			}
			if len(masters) < 2 || s.watch.handingOver(inst, masters, now, allow) {
				continue
			}
			var views []string
			for _, m := range masters {
				views = append(views, s.byName[m].lastView(InstanceLeaseName(inst)))
			}
			// The members' watches may be ahead of the benchmark's: catch up with the
			// apiserver and judge again.
			if s.catchUp(ctx, inst) && s.watch.handingOver(inst, masters, now, allow) {
				continue
			}
			if ctx.Err() != nil {
				return
			}
			if s.notYetSeen(inst, masters) {
				// The Lease was taken from a member that has not observed it yet (the
				// watch delay): it stops when it does. Counted, not a failure.
				s.staleOverlaps.Add(1)
				continue
			}
			s.mu.Lock()
			if s.err == nil {
				s.err = fmt.Errorf("at %s instance %s announced as master by %v outside a handover (then %s; its Lease %s)",
					now.Format(time.StampMilli), inst, masters, strings.Join(views, "; "), s.watch.describe(inst))
			}
			s.mu.Unlock()
			return
		}
	}
}

// notYetSeen reports whether every member announcing inst but its holder has not
// yet observed the Lease's current version.
func (s *leaseSim) notYetSeen(inst string, masters []string) bool {
	name := InstanceLeaseName(inst)
	s.watch.mu.Lock()
	cur := s.watch.cur[name]
	s.watch.mu.Unlock()
	if cur == nil || cur.Spec.HolderIdentity == nil {
		return false
	}
	for _, m := range masters {
		if m == *cur.Spec.HolderIdentity {
			continue
		}
		if v := s.byName[m].observedVersion(name); v == "" || !rvLess(v, cur.ResourceVersion) {
			return false
		}
	}
	return true
}

// catchUp waits until the benchmark's watch has the version of the instance's Lease
// the apiserver has now.
func (s *leaseSim) catchUp(ctx context.Context, inst string) bool {
	name := InstanceLeaseName(inst)
	l, err := s.e.client.CoordinationV1().Leases(s.e.ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return false
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		s.watch.mu.Lock()
		cur := s.watch.cur[name]
		s.watch.mu.Unlock()
		if cur != nil && !rvLess(cur.ResourceVersion, l.ResourceVersion) {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return false
}

// leaseWatch is the benchmark's own view of the Leases, as any client would have it.
type leaseWatch struct {
	events atomic.Int64 // watch events received

	mu       sync.Mutex
	cur      map[string]*coordinationv1.Lease // by name
	handover map[string][]handover            // by instance Lease name: the latest few, oldest first
	moves    int                              // holder changes of instance Leases
	history  map[string][]string              // by instance Lease name: its last versions, as seen
}

// handover is one seen on an instance Lease: from handed it to to at at; acked is
// when the Lease was first seen without the annotation again, still held by to.
type handover struct {
	from, to  string
	at, acked time.Time
}

func watchLeaseHistory(ctx context.Context, b *testing.B, e *env) *leaseWatch {
	w := &leaseWatch{cur: map[string]*coordinationv1.Lease{}, handover: map[string][]handover{}, history: map[string][]string{}}
	// In the members' encoding, so that its events weigh what theirs do (see rates).
	rc := e.srv.RESTConfig()
	rc.ContentType = scaleContentType
	c, err := kubernetes.NewForConfig(rc)
	if err != nil {
		b.Fatal(err)
	}
	lw := cache.NewFilteredListWatchFromClient(c.CoordinationV1().RESTClient(), "leases", e.ns, func(o *metav1.ListOptions) {
		o.LabelSelector = labels.SelectorFromSet(labels.Set{labelPartOf: "shardlb"}).String()
	})
	_, inf := cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: lw,
		ObjectType:    &coordinationv1.Lease{},
		Transform:     toLease,
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc:    func(o any) { w.seen(o) },
			UpdateFunc: func(_, o any) { w.seen(o) },
			DeleteFunc: func(any) { w.events.Add(1) },
		},
	})
	go inf.Run(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		b.Fatal("lease watch never synced")
	}
	return w
}

func (w *leaseWatch) seen(o any) {
	l, ok := o.(*coordinationv1.Lease)
	if !ok {
		return
	}
	w.events.Add(1)
	now := time.Now()
	holder := ptr.Deref(l.Spec.HolderIdentity, "")
	w.mu.Lock()
	defer w.mu.Unlock()
	prev := w.cur[l.Name]
	w.cur[l.Name] = l
	if !strings.HasPrefix(l.Name, InstanceLeaseName("")) {
		return
	}
	if prev != nil && ptr.Deref(prev.Spec.HolderIdentity, "") != holder {
		w.moves++
	}
	hist := append(w.history[l.Name], fmt.Sprintf("%s: version %s holder %q handover-from %q renewed %s acquired %s",
		now.Format(time.StampMilli), l.ResourceVersion, holder, l.Annotations[annotationHandoverFrom],
		stampMilli(l.Spec.RenewTime), stampMilli(l.Spec.AcquireTime)))
	w.history[l.Name] = hist[max(0, len(hist)-historyKept):]
	hs := w.handover[l.Name]
	var h *handover
	if len(hs) > 0 {
		h = &hs[len(hs)-1]
	}
	switch from := l.Annotations[annotationHandoverFrom]; {
	case from != "" && (h == nil || h.from != from || h.to != holder || !h.acked.IsZero()):
		hs = append(hs, handover{from: from, to: holder, at: now})
		w.handover[l.Name] = hs[max(0, len(hs)-historyKept):]
	case from == "" && h != nil && h.to == holder && h.acked.IsZero():
		h.acked = now
	}
}

func (w *leaseWatch) movesSoFar() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.moves
}

// handingOver: every one of masters (announcing inst at now) is the holder of its
// Lease or an old master in the chain of handovers that led to that holder, each
// acknowledged (or, unacknowledged, made) less than allow ago.
func (w *leaseWatch) handingOver(inst string, masters []string, now time.Time, allow time.Duration) bool {
	name := InstanceLeaseName(inst)
	w.mu.Lock()
	defer w.mu.Unlock()
	l := w.cur[name]
	if l == nil {
		return false
	}
	want := ptr.Deref(l.Spec.HolderIdentity, "")
	legit := map[string]bool{want: true}
	hs := w.handover[name]
	for i := len(hs) - 1; i >= 0; i-- {
		h := hs[i]
		if h.to != want {
			continue
		}
		last := h.at
		if !h.acked.IsZero() {
			last = h.acked
		}
		if now.Sub(last) >= allow {
			break
		}
		legit[h.from], want = true, h.from
	}
	for _, m := range masters {
		if !legit[m] {
			return false
		}
	}
	return true
}

func (w *leaseWatch) describe(inst string) string {
	name := InstanceLeaseName(inst)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.cur[name] == nil {
		return "none"
	}
	return "seen at\n\t" + strings.Join(w.history[name], "\n\t")
}

// historyKept is how many versions of each instance Lease a failure shows.
const historyKept = 8

func stampMilli(t *metav1.MicroTime) string {
	if t == nil {
		return "-"
	}
	return t.Format(time.StampMilli)
}

// leaseSample is the counters at one moment.
type leaseSample struct {
	at time.Time
	leaseCounts
	own    int64         // watch events the benchmark's own watch received
	cpu    time.Duration // this process
	server time.Duration // kube-apiserver + etcd
}

// leaseCounts are the apiserver's counters for Leases: write requests (create,
// update, patch, delete), those answered 409 Conflict, list and watch requests
// completed (a watch completes when it ends: an informer that lost its watch
// lists and watches again), watchers the apiserver closed as too slow to keep up,
// watch cache (re)initialisations, which close every watcher too, and watch events
// sent and their bytes.
type leaseCounts struct {
	writes, conflicts, reads, slowWatchers, cacheInits, events, eventBytes float64
}

func (s *leaseSim) sample(ctx context.Context) leaseSample {
	s.b.Helper()
	raw, err := s.e.client.CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		s.b.Fatalf("apiserver metrics: %v", err)
	}
	out := leaseSample{at: time.Now(), own: s.watch.events.Load(), cpu: selfCPU(s.b), server: serverCPU(s.b)}
	out.leaseCounts = leaseCounters(raw)
	return out
}

// rates between two samples, per second: writes, conflicts, watch events and their
// KiB, less the benchmark's own watch (its events are the members' ones, in the same
// encoding, so its share of the bytes is its share of the events).
func rates(from, to leaseSample) (writes, conflicts, events, kib float64) {
	secs := to.at.Sub(from.at).Seconds()
	all, own := to.events-from.events, float64(to.own-from.own)
	members := 0.0
	if all > 0 {
		members = (all - own) / all
	}
	return (to.writes - from.writes) / secs, (to.conflicts - from.conflicts) / secs,
		(all - own) / secs, (to.eventBytes - from.eventBytes) * members / 1024 / secs
}

// leaseCounters sums the apiserver's Lease counters in its /metrics text.
func leaseCounters(text []byte) leaseCounts {
	var c leaseCounts
	for line := range bytes.Lines(text) {
		name, labels, value, ok := promLine(string(bytes.TrimSpace(line)))
		if !ok || labels["group"] != "coordination.k8s.io" || labels["resource"] != "leases" {
			continue
		}
		switch name {
		case "apiserver_request_total":
			switch labels["verb"] {
			case "POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION":
				c.writes += value
				if labels["code"] == "409" {
					c.conflicts += value
				}
			case "LIST", "WATCH":
				c.reads += value
			}
		case "apiserver_terminated_watchers_total":
			c.slowWatchers += value
		case "apiserver_watch_cache_initializations_total":
			c.cacheInits += value
		case "apiserver_watch_events_total":
			c.events += value
		case "apiserver_watch_events_sizes_sum":
			c.eventBytes += value
		}
	}
	return c
}

// promLine parses one sample of the Prometheus text format: name{k="v",...} value.
func promLine(line string) (name string, labels map[string]string, value float64, ok bool) {
	if line == "" || line[0] == '#' {
		return "", nil, 0, false
	}
	i := strings.IndexAny(line, "{ ")
	if i < 0 {
		return "", nil, 0, false
	}
	name, rest := line[:i], line[i:]
	labels = map[string]string{}
	if strings.HasPrefix(rest, "{") {
		rest = rest[1:]
		for {
			rest = strings.TrimLeft(rest, ", ")
			if strings.HasPrefix(rest, "}") {
				rest = rest[1:]
				break
			}
			k, v, ok := strings.Cut(rest, `="`)
			if !ok {
				return "", nil, 0, false
			}
			var val strings.Builder
			i := 0
			for ; i < len(v) && v[i] != '"'; i++ {
				if v[i] == '\\' && i+1 < len(v) {
					i++
					if v[i] == 'n' {
						val.WriteByte('\n')
						continue
					}
				}
				val.WriteByte(v[i])
			}
			if i == len(v) {
				return "", nil, 0, false
			}
			labels[k], rest = val.String(), v[i+1:]
		}
	}
	f := strings.Fields(rest)
	if len(f) == 0 {
		return "", nil, 0, false
	}
	value, err := strconv.ParseFloat(f[0], 64)
	return name, labels, value, err == nil
}

// selfCPU is the CPU time this process used, user and system.
func selfCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// selfRSSKiB is this process's resident memory.
func selfRSSKiB(b *testing.B) float64 {
	raw, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	for line := range strings.Lines(string(raw)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				kib, err := strconv.ParseFloat(f[0], 64)
				if err == nil {
					return kib
				}
			}
		}
	}
	b.Fatal("no VmRSS in /proc/self/status")
	return 0
}

// serverCPU is the CPU time used by this process's kube-apiserver and etcd children
// (the shared test apiserver), user and system.
func serverCPU(b *testing.B) time.Duration {
	// /proc/<pid>/stat counts in clock ticks, USER_HZ, 100 on Linux (as
	// prometheus/procfs assumes too).
	const tick = 10 * time.Millisecond
	ents, err := os.ReadDir("/proc")
	if err != nil {
		b.Fatal(err)
	}
	me := os.Getpid()
	var total time.Duration
	for _, ent := range ents {
		if _, err := strconv.Atoi(ent.Name()); err != nil {
			continue
		}
		raw, err := os.ReadFile("/proc/" + ent.Name() + "/stat")
		if err != nil {
			continue // gone meanwhile
		}
		open, end := bytes.IndexByte(raw, '('), bytes.LastIndexByte(raw, ')')
		if open < 0 || end < open {
			continue
		}
		comm := string(raw[open+1 : end])
		f := strings.Fields(string(raw[end+1:]))
		// After the command: state, ppid, ..., utime (11th), stime (12th), counted from 0.
		if len(f) < 13 || (comm != "kube-apiserver" && comm != "etcd") {
			continue
		}
		if ppid, _ := strconv.Atoi(f[1]); ppid != me {
			continue
		}
		ut, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		total += time.Duration(ut+st) * tick
	}
	return total
}

func TestLeaseCountersSumOnlyLeaseTraffic(t *testing.T) {
	text := []byte(`# HELP apiserver_request_total [STABLE] Counter of apiserver requests.
# TYPE apiserver_request_total counter
apiserver_request_total{code="200",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",verb="PUT",version="v1"} 100
apiserver_request_total{code="409",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",verb="PUT",version="v1"} 3
apiserver_request_total{code="201",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",verb="POST",version="v1"} 7
apiserver_request_total{code="200",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",verb="GET",version="v1"} 50
apiserver_request_total{code="200",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="namespace",subresource="",verb="WATCH",version="v1"} 2
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="services",scope="resource",subresource="",verb="PUT",version="v1"} 1000
apiserver_watch_events_total{group="coordination.k8s.io",resource="leases",version="v1"} 2.5e+03
apiserver_watch_events_total{group="",resource="services",version="v1"} 9999
apiserver_watch_events_sizes_sum{group="coordination.k8s.io",resource="leases",version="v1"} 1.25e+06
apiserver_terminated_watchers_total{group="coordination.k8s.io",resource="leases"} 4
apiserver_watch_cache_initializations_total{group="coordination.k8s.io",resource="leases"} 1
apiserver_request_total{code="200",group="coordination.k8s.io",resource="leases",verb="DELETE",odd="a \"quoted\", value"} 5
`)
	got := leaseCounters(text)
	want := leaseCounts{writes: 115, conflicts: 3, reads: 2, slowWatchers: 4, cacheInits: 1, events: 2500, eventBytes: 1.25e6}
	if got != want {
		t.Errorf("leaseCounters = %+v, want %+v", got, want)
	}
}
