// Package kube is shardlb's Kubernetes side: informers for LoadBalancer Services of our
// class, their EndpointSlices and our Leases; the controller that allocates VIPs and
// instances; the elector that holds mastership Leases; and the node loop that applies
// each node's shard.Plan to a Router and a Datapath, with a local HTTP API and metrics.
//
// Run is the whole of `shardlb run` apart from flag parsing and the concrete speaker
// and datapath, which cmd/shardlb passes in through Deps.
//
// # Lease traffic at cluster scale
//
// shardlb runs on every node, so what its Leases cost grows with the cluster. Every
// pod watches every shardlb Lease, so each Lease write is delivered to every pod.
// With every holder renewing each mastership Lease every second (Leases of 4 s,
// --leaseProtocol=renewed), 100 nodes and 64 shards write about 164 Leases per second
// and the apiserver delivers about 16,000 watch events per second. Yet failover of
// traffic never waited for Leases: routers already hold every backup's route (and
// prefer the successor's) and move on the BGP/BFD signal. A Lease only decides who
// announces the master attributes next.
//
// So by default (--leaseProtocol=member-bound, mastership.ProtocolMemberBound) a
// mastership Lease is written only when it changes hands (take, handover and its
// acknowledgement, release) and counts as held while its holder's member Lease does,
// with the holder's process incarnation recorded on it. Pods renew only their member
// Lease, every 10 s, counted for 40 s, as kubelets renew node Leases: the cluster writes
// members/10 Leases per second whatever the number of shards (10/s at 100 nodes,
// about 1,000 watch events/s delivered). A dead master must still be replaced fast, so
// the member that would take a master's shards over (its successor, the backup routers
// already prefer) probes it: GET /healthz on the metrics address it publishes on its
// member Lease, every 500 ms. A refused connection (its node is up, the process is
// gone) or three unanswered probes (a dead or hung node) make it dead in the prober's
// view, and the prober publishes that on its own member Lease (member, incarnation,
// member Lease version), so every pod counts that process as gone until its member
// Lease changes: the successor takes the shards at once: within a probe or two
// after a process dies, three after a node hangs, where the renewed protocol waited
// for a Lease to expire (BenchmarkLeaseTraffic measures both, in one run). A member that renews its member Lease is alive again, whatever was said.
//
// Trade-offs, weighed against the alternatives:
//   - Gossip (hashicorp/memberlist's SWIM, as MetalLB uses) would detect failures
//     without the apiserver too, but every pod would probe and be probed by a
//     random subset continuously, on a port of its own, and gossip its own view of
//     membership beside the Leases'. Here only successors probe, only masters are
//     probed (at most one prober per shard), over the metrics port that already
//     exists, and the Leases stay the only membership and the arbiter of mastership:
//     every take is still a compare-and-swap.
//   - Members known from the DaemonSet's Pods' readiness would cost no writes, but a
//     node that dies is marked only by the node lifecycle controller after its grace
//     period (40 s and more), and readiness says nothing about BGP.
//   - A probe is one pod's view. If a successor cannot reach a live master (a partition
//     between the two, a pod starved past three probe intervals), it takes the
//     master's shards; the master sees the Lease change on its watch and stops
//     announcing (a brief overlap of two master routes, spread by ECMP), and its next
//     member renewal (within 10 s) clears the verdict, after which the shards are
//     rebalanced make-before-break. Routers fall back to the successor on a real
//     failure first anyway, so the probe only decides who announces next.
//   - A backup that dies is not probed: it is counted live until its member Lease
//     expires (40 s), so the successor of a shard can be a dead pod meanwhile; if the
//     master then fails too, routers spread the VIP over the remaining backups and
//     the shard is taken over when the master's member Lease expires. Two failures
//     within 40 s degrade to that.
//   - The metrics address must be reachable from the other nodes (--metricsListen
//     default :9478 on the host network); a pod whose probe address is not reachable
//     is replaced when its member Lease expires.
package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/clock"

	"github.com/shardlb/shardlb/ipam"
	"github.com/shardlb/shardlb/shard"
)

// Deps are the parts Run drives but does not own.
type Deps struct {
	Router   Router   // required
	Datapath Datapath // required
	Logger   *slog.Logger
	// BGPPeers, when set, feeds `shardlb get bgp` and the BGP session metric.
	BGPPeers func() []BGPPeer
	// DatapathCounters, when set, feeds the per-frontend and per-drop-reason metrics.
	DatapathCounters func() DatapathCounters
	// Version labels shardlb_build_info ("": the module version the Go command
	// recorded, else "dev").
	Version string
	// Clock is for tests; nil is the real clock.
	Clock clock.WithTicker
	// Stopping, when set, is told once the stop begins what it is: a restart
	// (Config.StopMode), when the caller suspends the speaker (routes kept at the
	// routers) instead of shutting it down and leaves the pinned datapath, or a removal
	// for good (Stop.Removal), when the caller removes the pinned datapath too.
	Stopping func(Stop)
}

// Run serves until ctx ends, then shuts down in the order traffic needs: mastership
// handed over make-before-break, routes withdrawn, Leases released, Config.Drain
// waited, and Run returns; the caller then detaches the datapath.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if deps.Router == nil || deps.Datapath == nil {
		return fmt.Errorf("%w: Router and Datapath are required", ErrConfig)
	}
	log := deps.Logger
	if log == nil {
		log = slog.Default()
	}
	clk := deps.Clock
	if clk == nil {
		clk = clock.RealClock{}
	}
	rc, err := cfg.restConfig()
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("kube client: %w", err)
	}
	m := newMetrics()
	m.registerBuildInfo(deps.Version)

	// Informers. Handlers only signal; the loops read the stores.
	var ctl *controller
	var el *elector
	var nd *node
	onService := func(key string) {
		if ctl != nil {
			ctl.enqueue(key)
		}
		nd.touch(key)
	}
	svcStore, svcInformer := cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: cache.NewListWatchFromClient(client.CoreV1().RESTClient(), "services", corev1.NamespaceAll, fields.Everything()),
		ObjectType:    &corev1.Service{},
		Transform:     toService,
		Handler:       keyHandler(onService),
	})
	sliceStore, sliceInformer := cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: cache.NewListWatchFromClient(client.DiscoveryV1().RESTClient(), "endpointslices", corev1.NamespaceAll, fields.Everything()),
		ObjectType:    &discoveryv1.EndpointSlice{},
		Transform:     toEndpointSlice,
		Indexers:      cache.Indexers{indexByService: sliceServiceIndex},
		Handler:       sliceHandler(onService),
	})
	var book *nodeAddressBook // dsr endpoints' node addresses (dsr.go)
	leaseStore, leaseInformer := newLeaseInformer(client, cfg.Namespace, func() {
		el.poke()
		if book.refresh() {
			nd.poke()
		}
	})
	book = newNodeAddressBook(leaseStore, cfg.Namespace)
	sliceIndexer := sliceStore.(cache.Indexer)
	// This node's own Node object: cordoned or labelled out of external load
	// balancers, it hands its instances over and masters none. Not waited for: a
	// missing Node (or no RBAC for it) means no maintenance.
	nodeStore, nodeInformer := cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: cache.NewListWatchFromClient(client.CoreV1().RESTClient(), "nodes", corev1.NamespaceAll, fields.OneTermEqualSelector("metadata.name", cfg.NodeName)),
		ObjectType:    &corev1.Node{},
		Transform:     toNode,
		Handler:       cache.ResourceEventHandlerFuncs{AddFunc: func(any) { el.poke() }, UpdateFunc: func(_, _ any) { el.poke() }, DeleteFunc: func(any) { el.poke() }},
	})
	maintenance := func() string {
		if o, ok, _ := nodeStore.GetByKey(cfg.NodeName); ok {
			if n, ok := o.(*nodeMaintenance); ok {
				return n.Reason
			}
		}
		return ""
	}

	var hl *health
	// The elector reads maintenance once per round: that read is its heartbeat.
	stepping := func() string { hl.step(); return maintenance() }
	el = newElector(&cfg, log.With("part", "elector"), client.CoordinationV1().Leases(cfg.Namespace), leaseStore, deps.Router, stepping, clk)
	nd = newNode(&cfg, log.With("part", "node"), deps.Router, deps.Datapath, svcStore, sliceIndexer, el.Masters, clk, m)
	nd.handoffs = el.Handoffs
	nd.nodeAddrs = book.addresses
	nd.successors = el.Successors
	if cfg.MaxBackups > 0 {
		nd.announce = el.Announce
	}
	el.changed = nd.poke
	el.applyNow = nd.apply
	if r, ok := deps.Router.(Resumer); ok {
		nd.resume, nd.restarting = r.Resume, el.Restarting
		// Past the restart time the routers dropped the old routes anyway.
		wait := cfg.RestartTime
		if wait <= 0 {
			wait = cfg.MemberLease.Duration
		}
		nd.resumeBy = clk.Now().Add(wait)
		go func() {
			select {
			case <-clk.After(wait):
				nd.poke()
			case <-ctx.Done():
			}
		}()
	}

	// Events: the controller's, and the node loop's on the services its datapath refuses.
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	// Events get a client of their own: behind the same rate limiter they would
	// delay the status writes users wait for.
	eventClient, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("kube events client: %w", err)
	}
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: eventClient.CoreV1().Events("")})
	rec := broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "shardlb", Host: cfg.NodeName})
	nd.recorder = rec
	if cfg.Controller {
		ctl = newController(&cfg, log.With("part", "controller"), client, svcStore, sliceIndexer, rec, m)
	}

	st := &status{cfg: &cfg, node: nd, elector: el, services: svcStore, slices: sliceIndexer, peers: deps.BGPPeers}
	hl = newHealth(clk, nd.progress, st.ready.Load, deps.BGPPeers)
	st.health = hl
	pools := func() []ipam.PoolStats { return nil }
	if ctl != nil {
		pools = ctl.poolStats
	}
	m.reg.MustRegister(newStateCollector(st.ha, deps.BGPPeers, pools))
	if deps.DatapathCounters != nil {
		m.reg.MustRegister(newDatapathCollector(deps.DatapathCounters))
	}
	var first sync.Once
	nd.onApply = func(shard.Plan) { first.Do(func() { st.ready.Store(true) }) }

	// Listeners first, so a taken port fails Run before anything is announced.
	var stops []func()
	defer func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}()
	probe := st.probeHandler(m)
	if cfg.APIAddress != "" {
		h := st.apiHandler()
		if cfg.MetricsAddress == "" {
			mux := http.NewServeMux()
			mux.Handle("/v1/", h)
			mux.Handle("/", probe)
			h = mux
		}
		stop, err := serveHTTP(ctx, log, cfg.APIAddress, h)
		if err != nil {
			return err
		}
		stops = append(stops, stop)
	}
	if cfg.MetricsAddress != "" {
		stop, err := serveHTTP(ctx, log, cfg.MetricsAddress, probe)
		if err != nil {
			return err
		}
		stops = append(stops, stop)
	}

	// Each stage gets its own context so that shutdown can stop them in order.
	informCtx, stopInformers := context.WithCancel(context.WithoutCancel(ctx))
	defer stopInformers()
	nodeCtx, stopNode := context.WithCancel(informCtx)
	defer stopNode()
	ctlCtx, stopController := context.WithCancel(informCtx)
	defer stopController()
	var informers, loops, controllers sync.WaitGroup
	for _, inf := range []cache.Controller{svcInformer, sliceInformer, leaseInformer, nodeInformer} {
		informers.Go(func() { inf.Run(informCtx.Done()) })
	}
	removals := &removalCheck{client: client, namespace: cfg.Namespace, pod: cfg.PodName}
	synced := cache.WaitForCacheSync(ctx.Done(), svcInformer.HasSynced, sliceInformer.HasSynced, leaseInformer.HasSynced)
	if synced {
		log.Info("caches synced", "node", cfg.NodeName)
		if err := removals.start(ctx); err != nil {
			log.Warn("cannot read this pod and its DaemonSet: a stop cannot tell an uninstall from a restart (grant get on pods and daemonsets)", "err", err)
		}
		hl.start()
		loops.Go(func() { el.run(nodeCtx) })
		loops.Go(func() { nd.run(nodeCtx) })
		nd.poke()
		if ctl != nil {
			controllers.Go(func() { campaign(ctlCtx, &cfg, client, log, ctl) })
			controllers.Go(func() {
				newProber(&cfg, log.With("part", "liveness"), client, svcStore, sliceIndexer, rec, m, ctl.leading, clk).run(ctlCtx)
			})
		}
	}
	<-ctx.Done()

	why := maintenance()
	removed, err := removals.removal(context.WithoutCancel(ctx))
	if err != nil {
		log.Warn("cannot tell whether this pod is removed for good; stopping as --stopMode says", "stopMode", cfg.StopMode, "err", err)
	}
	if removed != "" {
		log.Info("this pod is removed for good: handing over, withdrawing and removing the pinned datapath", "reason", removed)
		why = removed
	}
	restart := synced && removed == "" && cfg.StopMode.restarts(cfg.RestartTime, why)
	if deps.Stopping != nil {
		deps.Stopping(Stop{Restart: restart, Removal: removed})
	}
	if restart {
		// A restart: nothing is handed over, withdrawn or released. The routers keep
		// this node's routes (the caller suspends the speaker), the pinned datapath
		// keeps forwarding, and the Leases keep this pod's instances for its next
		// process, which takes them back.
		log.Info("stopping for a restart: instances, routes and Leases left for the next process", "restartTime", cfg.RestartTime, "masters", el.Holding())
		stopNode()
		loops.Wait()
		stopController()
		controllers.Wait()
		broadcaster.Shutdown()
		stopInformers()
		informers.Wait()
		log.Info("stopped", "node", cfg.NodeName, "restart", true)
		return nil
	}

	// Shutdown, a planned switch: every instance this pod masters is handed to its next
	// master make-before-break (bounded by Handover), which hands segments of the
	// connections in flight back here; then the routes are withdrawn and the Leases
	// not handed over released; the member Lease stays for the drain, so the handoff
	// lasts until the caller detaches the datapath.
	if synced {
		el.leave()
		deadline := clk.Now().Add(cfg.Handover)
		for el.Holding() > 0 && clk.Now().Before(deadline) {
			<-clk.After(10 * time.Millisecond)
		}
		if n := el.Holding(); n > 0 {
			log.Warn("instances not handed over in time, released", "instances", n, "after", cfg.Handover)
		}
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second+cfg.Drain)
	defer cancel()
	stopNode()
	loops.Wait()
	var errs []error
	if err := nd.withdraw(sctx); err != nil {
		errs = append(errs, fmt.Errorf("withdraw routes: %w", err))
	}
	if synced {
		el.release(sctx)
		<-clk.After(cfg.Drain)
		el.forget(sctx)
	}
	stopController()
	controllers.Wait()
	broadcaster.Shutdown()
	stopInformers()
	informers.Wait()
	log.Info("stopped", "node", cfg.NodeName)
	return errors.Join(errs...)
}

// campaign runs the controller whenever this pod holds the controller Lease. The
// Lease is released when ctx (the process) ends so the next pod need not wait.
func campaign(ctx context.Context, cfg *Config, client kubernetes.Interface, log *slog.Logger, ctl *controller) {
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Name: ControllerLeaseName, Namespace: cfg.Namespace},
		Client:     client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: cfg.NodeName},
		Labels:     map[string]string{labelPartOf: "shardlb"},
	}
	for ctx.Err() == nil {
		le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock:            lock,
			LeaseDuration:   cfg.ControllerLease.LeaseDuration,
			RenewDeadline:   cfg.ControllerLease.RenewDeadline,
			RetryPeriod:     cfg.ControllerLease.RetryPeriod,
			ReleaseOnCancel: true,
			Name:            ControllerLeaseName,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: ctl.lead,
				OnStoppedLeading: func() { log.Info("controller: not leading", "node", cfg.NodeName) },
			},
		})
		if err != nil {
			log.Error("controller election", "err", err) // only bad timings, which Validate refuses
			return
		}
		le.Run(ctx)
	}
}

// newLeaseInformer watches shardlb's Leases in namespace (by label), slimmed, and
// calls changed on every event.
func newLeaseInformer(client kubernetes.Interface, namespace string, changed func()) (cache.Store, cache.Controller) {
	lw := cache.NewFilteredListWatchFromClient(client.CoordinationV1().RESTClient(), "leases", namespace, func(o *metav1.ListOptions) {
		o.LabelSelector = labels.SelectorFromSet(labels.Set{labelPartOf: "shardlb"}).String()
	})
	return cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: lw,
		ObjectType:    &coordinationv1.Lease{},
		Transform:     toLease,
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc: func(any) { changed() }, UpdateFunc: func(_, _ any) { changed() }, DeleteFunc: func(any) { changed() },
		},
	})
}
