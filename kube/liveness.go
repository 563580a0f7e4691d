package kube

// Endpoint health: loxilb.io/liveness and the probe annotations.
//
// The controller pod probes, and records the verdict on the Service, where every node
// reads it: AnnotationUnhealthyEndpoints lists the endpoints failing their probes, and
// each node leaves them out of the service's ports before planning (healthyPorts, the
// one hook in the node loop). All nodes read the same record, so all build the same
// Maglev tables, whatever each could reach itself; a record is written only when the
// verdict changes, so a healthy cluster writes nothing whatever the probe interval.
//
// Failure modes, as decided:
//   - The prober dies with the controller: the record stays as it was (every node
//     keeps the same, last known, tables), and the next controller, within the
//     controller Lease's duration, starts from the record (a recorded endpoint counts
//     as failed until it passes proberetries probes in a row) and probes at once.
//   - A probe flaps: a healthy endpoint is taken out after proberetries failures in a
//     row, and a failed one comes back after as many successes in a row (probe.Health).
//   - Every endpoint fails: none is kept and the VIP is withdrawn, as for a service
//     without ready endpoints (loxilb drops too). Serving every endpoint anyway, as
//     Envoy's panic threshold does, would make the probe of a single-endpoint service
//     mean nothing; the Warning EndpointUnhealthy says the VIP is withdrawn.
//   - The verdict is the controller's view: an endpoint the controller's node cannot
//     reach is taken out of every node. Probing from every node and agreeing would
//     cost N times the probes and a consensus the API server already gives.
//   - Turning liveness off (or probetype none) serves every ready endpoint at once on
//     every node, before the controller removes the record.

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/clock"

	"github.com/shardlb/shardlb/probe"
	"github.com/shardlb/shardlb/shard"
)

// kube-loxilb's liveness annotations, and the record shardlb writes.
const (
	AnnotationLiveness     = "loxilb.io/liveness"
	AnnotationProbeType    = "loxilb.io/probetype"
	AnnotationProbePort    = "loxilb.io/probeport"
	AnnotationProbeReq     = "loxilb.io/probereq"
	AnnotationProbeResp    = "loxilb.io/proberesp"
	AnnotationProbeTimeout = "loxilb.io/probetimeout"
	AnnotationProbeRetries = "loxilb.io/proberetries"
	// AnnotationUnhealthyEndpoints records, written by the controller, the endpoints
	// failing their probes, as ADDR:PORT/PROTO (the endpoint's own port and the
	// service port's protocol), comma separated and sorted.
	AnnotationUnhealthyEndpoints = "shardlb.io/unhealthy-endpoints"
)

// Event reasons of endpoint health.
const (
	// ReasonInvalidProbe (Warning): a probe annotation cannot be read; the message
	// names it and the fallback used.
	ReasonInvalidProbe = "InvalidProbe"
	// ReasonEndpointUnhealthy (Warning): endpoints fail their probes and every node
	// leaves them out.
	ReasonEndpointUnhealthy = "EndpointUnhealthy"
	// ReasonEndpointHealthy (Normal): endpoints pass their probes again.
	ReasonEndpointHealthy = "EndpointHealthy"
)

const (
	// defaultProbeInterval and defaultProbeRetries are kube-loxilb's defaults of
	// probetimeout (seconds between probes) and proberetries.
	defaultProbeInterval = 60 * time.Second
	defaultProbeRetries  = 2
	maxProbeInterval     = 24 * time.Hour
	maxProbeRetries      = 100
	// maxProbeDeadline bounds one probe; a shorter interval bounds it too.
	maxProbeDeadline = 3 * time.Second
	// livenessTick is how often the prober looks for due probes and records verdicts.
	livenessTick = 200 * time.Millisecond
	// maxProbesInFlight bounds the probes running at once.
	maxProbesInFlight = 64
	// rewriteAfter is how long a record written but not yet seen by the informer is
	// not written again.
	rewriteAfter = 10 * time.Second
	// writeTimeout bounds one write of a record.
	writeTimeout = 10 * time.Second
)

// livenessAnnotations are the annotations that make the prober look at a service.
var livenessAnnotations = []string{AnnotationLiveness, AnnotationProbeType, AnnotationProbePort, AnnotationProbeReq,
	AnnotationProbeResp, AnnotationProbeTimeout, AnnotationProbeRetries, AnnotationUnhealthyEndpoints}

// liveness is how a service asks for its endpoints to be probed.
type liveness struct {
	on       bool       // loxilb.io/liveness "yes" and probetype not none
	typ      probe.Type // "": each service port's protocol (tcp or udp)
	port     uint16     // 0: each endpoint's own port
	req      string
	resp     string
	interval time.Duration
	retries  int
}

// readLiveness reads a service's liveness annotations as kube-loxilb documents them.
// A value that cannot be read is a problem naming the annotation and the fallback
// used; the rest still applies.
func readLiveness(ann map[string]string) (liveness, []string) {
	lv := liveness{interval: defaultProbeInterval, retries: defaultProbeRetries}
	var problems []string
	bad := func(key, why, fallback string) {
		problems = append(problems, fmt.Sprintf("%s %q %s: %s", key, ann[key], why, fallback))
	}
	switch strings.ToLower(strings.TrimSpace(ann[AnnotationLiveness])) {
	case "yes":
		lv.on = true
	case "", "no":
	default:
		bad(AnnotationLiveness, `is neither "yes" nor "no"`, "endpoints are not probed")
	}
	if v, ok := ann[AnnotationProbeType]; ok {
		if t, err := probe.ParseType(v); err != nil {
			bad(AnnotationProbeType, "is not tcp, udp, http, https, ping or none", "each port is probed with its own protocol")
		} else {
			lv.typ = t
		}
	}
	if lv.typ == probe.None {
		lv.on = false
	}
	number := func(key string, lo, hi int) (int, bool) {
		v, ok := ann[key]
		if !ok {
			return 0, false
		}
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n < lo || n > hi {
			return 0, true
		}
		return n, false
	}
	if n, wrong := number(AnnotationProbePort, 1, 65535); wrong {
		bad(AnnotationProbePort, "is not a port (1-65535)", "each endpoint is probed on its own port")
	} else if n > 0 {
		lv.port = uint16(n)
	}
	if n, wrong := number(AnnotationProbeTimeout, 1, int(maxProbeInterval/time.Second)); wrong {
		bad(AnnotationProbeTimeout, fmt.Sprintf("is not a number of seconds between probes (1-%d)", int(maxProbeInterval/time.Second)), fmt.Sprintf("probes run every %v", defaultProbeInterval))
	} else if n > 0 {
		lv.interval = time.Duration(n) * time.Second
	}
	if n, wrong := number(AnnotationProbeRetries, 1, maxProbeRetries); wrong {
		bad(AnnotationProbeRetries, fmt.Sprintf("is not a number of probes (1-%d)", maxProbeRetries), fmt.Sprintf("%d probes in a row decide", defaultProbeRetries))
	} else if n > 0 {
		lv.retries = n
	}
	if lv.typ == probe.Ping {
		for _, key := range []string{AnnotationProbePort, AnnotationProbeReq, AnnotationProbeResp} {
			if _, ok := ann[key]; ok && !slices.ContainsFunc(problems, func(p string) bool { return strings.HasPrefix(p, key+" ") }) {
				bad(key, "has no meaning for probetype ping", "it is ignored")
			}
		}
		lv.port = 0
	} else {
		lv.req, lv.resp = ann[AnnotationProbeReq], ann[AnnotationProbeResp]
	}
	return lv, problems
}

// endpointKey names an endpoint of a service port in AnnotationUnhealthyEndpoints.
func endpointKey(proto shard.Protocol, ep shard.Endpoint) string {
	return netip.AddrPortFrom(ep.Addr, ep.Port).String() + "/" + strings.ToLower(proto.String())
}

// healthyPorts is ports without the endpoints recorded as failing their probes, when
// s asks for probes (otherwise the record, if any, is stale and ignored). The node
// plans with it; the result may share nothing with ports.
func healthyPorts(s *service, ports []shard.ServicePort) []shard.ServicePort {
	rec := s.Annotations[AnnotationUnhealthyEndpoints]
	if strings.TrimSpace(rec) == "" {
		return ports
	}
	if lv, _ := readLiveness(s.Annotations); !lv.on {
		return ports
	}
	down := map[string]bool{}
	for _, k := range strings.Split(rec, ",") {
		down[strings.TrimSpace(k)] = true
	}
	out := make([]shard.ServicePort, len(ports))
	for i, p := range ports {
		out[i] = shard.ServicePort{Protocol: p.Protocol, Port: p.Port}
		for _, ep := range p.Endpoints {
			if !down[endpointKey(p.Protocol, ep)] {
				out[i].Endpoints = append(out[i].Endpoints, ep)
			}
		}
	}
	return out
}

// probeTarget is one probe: a service, how, and where. Endpoints of a service that
// share it (ports probed on one probeport, or by ping) share its verdict.
type probeTarget struct {
	svc  string
	spec probe.Spec
	addr netip.AddrPort
}

// livenessTargets maps each probe of a service to the endpoints (endpointKey) it
// decides.
func livenessTargets(key string, lv liveness, ports []shard.ServicePort) map[probeTarget][]string {
	out := map[probeTarget][]string{}
	for _, p := range ports {
		typ := lv.typ
		if typ == "" {
			typ = probe.TCP
			if p.Protocol == shard.UDP {
				typ = probe.UDP
			}
		}
		spec := probe.Spec{Type: typ, Request: lv.req, Response: lv.resp, Timeout: min(lv.interval, maxProbeDeadline)}
		for _, ep := range p.Endpoints {
			port := ep.Port
			switch {
			case typ == probe.Ping:
				port = 0
			case lv.port != 0:
				port = lv.port
			}
			t := probeTarget{svc: key, spec: spec, addr: netip.AddrPortFrom(ep.Addr, port)}
			out[t] = append(out[t], endpointKey(p.Protocol, ep))
		}
	}
	return out
}

// probeMetrics are the prober's series, on the pod's registry.
type probeMetrics struct {
	probes    *prometheus.CounterVec
	failures  *prometheus.CounterVec
	unhealthy prometheus.Gauge
	writes    prometheus.Counter
}

func newProbeMetrics(reg prometheus.Registerer) *probeMetrics {
	m := &probeMetrics{
		probes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shardlb_endpoint_probes_total",
			Help: "Endpoint probes run by the controller pod (loxilb.io/liveness), by probe type.",
		}, []string{"type"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shardlb_endpoint_probe_failures_total",
			Help: "Endpoint probes that failed, by probe type.",
		}, []string{"type"}),
		unhealthy: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shardlb_endpoints_unhealthy",
			Help: "Endpoints the controller pod records as failing their probes (left out of every node's tables).",
		}),
		writes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shardlb_endpoint_health_writes_total",
			Help: "Writes of a service's unhealthy-endpoint record (only when it changes).",
		}),
	}
	reg.MustRegister(m.probes, m.failures, m.unhealthy, m.writes)
	for _, t := range []probe.Type{probe.TCP, probe.UDP, probe.HTTP, probe.HTTPS, probe.Ping} {
		m.probes.WithLabelValues(string(t))
		m.failures.WithLabelValues(string(t))
	}
	return m
}

// prober probes the endpoints of the services that ask for it while this pod leads
// the controller, and records the verdicts on the services.
type prober struct {
	cfg      *Config
	log      *slog.Logger
	client   kubernetes.Interface
	services cache.Store
	slices   cache.Indexer
	recorder record.EventRecorder
	leading  func() bool
	clock    clock.WithTicker
	check    func(context.Context, probe.Spec, netip.AddrPort) error
	metrics  *probeMetrics

	// Owned by run's goroutine.
	states  map[probeTarget]*targetState
	told    map[string]string        // service -> invalid annotations last told
	written map[string]writtenRecord // service -> record written, until the informer shows it
}

// targetState is what the prober knows of one probe.
type targetState struct {
	health  probe.Health
	retries int
	next    time.Time // when the next probe is due
	busy    bool      // a probe is running
	lastErr string    // the last failure
}

type writtenRecord struct {
	value string
	at    time.Time
}

type probeResult struct {
	t   probeTarget
	st  *targetState // the state it was started for: a result of an earlier term is dropped
	err error
}

func newProber(cfg *Config, log *slog.Logger, client kubernetes.Interface, services cache.Store, slices cache.Indexer, rec record.EventRecorder, m *metrics, leading func() bool, clk clock.WithTicker) *prober {
	return &prober{
		cfg: cfg, log: log, client: client, services: services, slices: slices, recorder: rec,
		leading: leading, clock: clk, check: probe.Check, metrics: newProbeMetrics(m.reg),
	}
}

// leading reports whether the controller is in a leadership term.
func (c *controller) leading() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.queue != nil
}

// run probes while this pod leads, until ctx ends. A term starts from the records on
// the services, so a new leader neither forgets a failed endpoint nor rewrites the
// records of a healthy cluster.
func (p *prober) run(ctx context.Context) {
	results := make(chan probeResult, maxProbesInFlight)
	sem := make(chan struct{}, maxProbesInFlight)
	var wg sync.WaitGroup
	defer wg.Wait()
	launch := func(t probeTarget, st *targetState) {
		wg.Go(func() {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			err := p.check(ctx, t.spec, t.addr)
			<-sem
			select {
			case results <- probeResult{t, st, err}:
			case <-ctx.Done():
			}
		})
	}
	p.reset()
	tick := p.clock.NewTicker(livenessTick)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case r := <-results:
			p.observe(r)
		case <-tick.C():
			if !p.leading() {
				if len(p.states)+len(p.told)+len(p.written) > 0 {
					p.reset()
				}
				continue
			}
			p.round(ctx, launch)
		}
	}
}

// reset forgets everything but the records on the services.
func (p *prober) reset() {
	p.states, p.told, p.written = map[probeTarget]*targetState{}, map[string]string{}, map[string]writtenRecord{}
	p.metrics.unhealthy.Set(0)
}

// observe takes one probe's result into its target's health.
func (p *prober) observe(r probeResult) {
	typ := string(r.t.spec.Type)
	p.metrics.probes.WithLabelValues(typ).Inc()
	if r.err != nil {
		p.metrics.failures.WithLabelValues(typ).Inc()
	}
	st := p.states[r.t]
	if st == nil || st != r.st {
		return // forgotten while it ran
	}
	st.busy = false
	if r.err != nil {
		st.lastErr = r.err.Error()
	}
	was := st.health.Down
	st.health = st.health.Next(r.err == nil, st.retries)
	if st.health.Down != was {
		p.log.Info("liveness: probe verdict changed", "service", r.t.svc, "probe", r.t.spec.Type, "target", r.t.addr, "down", st.health.Down, "err", r.err)
	}
}

// round starts the probes that are due and records the verdicts that changed.
func (p *prober) round(ctx context.Context, launch func(probeTarget, *targetState)) {
	now := p.clock.Now()
	seen := map[probeTarget]bool{}
	unhealthy := 0
	for _, o := range p.services.List() {
		s, ok := o.(*service)
		if !ok || !s.ours(p.cfg.LoadBalancerClass) {
			continue
		}
		if !slices.ContainsFunc(livenessAnnotations, func(k string) bool { _, set := s.Annotations[k]; return set }) {
			delete(p.told, s.key())
			continue // the common case, kept cheap: this runs every tick
		}
		lv, problems := readLiveness(s.Annotations)
		p.tellProblems(s, problems)
		if !lv.on || len(s.Ingress) == 0 {
			p.sync(ctx, s, nil, nil, nil)
			continue
		}
		recorded := map[string]bool{}
		for _, k := range strings.Split(s.Annotations[AnnotationUnhealthyEndpoints], ",") {
			recorded[strings.TrimSpace(k)] = true
		}
		targets := livenessTargets(s.key(), lv, servicePorts(s, p.slices))
		var down []string
		current := map[string]bool{}
		whys := map[string]string{}
		for t, eps := range targets {
			seen[t] = true
			for _, k := range eps {
				current[k] = true
			}
			st := p.states[t]
			if st == nil {
				// New to this term: a recorded endpoint stays out until it passes.
				st = &targetState{next: now, health: probe.Health{Down: !slices.ContainsFunc(eps, func(k string) bool { return !recorded[k] })}}
				p.states[t] = st
			}
			st.retries = lv.retries
			if !st.busy && !now.Before(st.next) {
				st.busy, st.next = true, now.Add(lv.interval)
				launch(t, st)
			}
			if st.health.Down {
				down = append(down, eps...)
				for _, k := range eps {
					whys[k] = st.lastErr
				}
			}
		}
		slices.Sort(down)
		down = slices.Compact(down)
		unhealthy += len(down)
		p.sync(ctx, s, down, current, func(gone []string) string {
			var parts []string
			for _, k := range gone {
				if w := whys[k]; w != "" {
					parts = append(parts, k+": "+w)
				}
			}
			msg := strings.Join(parts, "; ")
			if len(down) > 0 && len(down) == len(current) {
				msg += "; no endpoint is left: the VIP is withdrawn"
			}
			return msg
		})
	}
	for t := range p.states {
		if !seen[t] {
			delete(p.states, t)
		}
	}
	p.metrics.unhealthy.Set(float64(unhealthy))
}

// tellProblems records a Warning InvalidProbe for the unreadable annotations of s,
// once per set of problems, from the controller pod alone.
func (p *prober) tellProblems(s *service, problems []string) {
	msg := strings.Join(problems, "; ")
	if p.told[s.key()] == msg {
		return
	}
	if msg == "" {
		delete(p.told, s.key())
		return
	}
	p.told[s.key()] = msg
	p.log.Warn("liveness: probe annotations cannot be read", "service", s.key(), "problems", msg)
	p.recorder.Event(ref(s), corev1.EventTypeWarning, ReasonInvalidProbe, msg)
}

// sync writes down, the endpoints of s failing their probes, as its record when it
// differs (nil removes the record), and tells the change: the endpoints newly taken
// out (why explains them) and those of current back in; an endpoint that left the
// service is not told.
func (p *prober) sync(ctx context.Context, s *service, down []string, current map[string]bool, why func(gone []string) string) {
	key := s.key()
	want := strings.Join(down, ",")
	have := s.Annotations[AnnotationUnhealthyEndpoints]
	if have == want {
		delete(p.written, key)
		return
	}
	now := p.clock.Now()
	if w, ok := p.written[key]; ok && w.value == want && now.Sub(w.at) < rewriteAfter {
		return // written; the informer has not shown it yet
	}
	var value any
	if want != "" {
		value = want
	}
	// The resourceVersion makes the write conditional: a term that ended, or a
	// verdict about endpoints that changed since, is refused and decided again.
	body, err := json.Marshal(map[string]any{"metadata": map[string]any{
		"resourceVersion": s.ResourceVersion,
		"annotations":     map[string]any{AnnotationUnhealthyEndpoints: value},
	}})
	if err != nil {
		return
	}
	wctx, cancel := context.WithTimeout(ctx, writeTimeout)
	defer cancel()
	if _, err := p.client.CoreV1().Services(s.Namespace).Patch(wctx, s.Name, types.MergePatchType, body, metav1.PatchOptions{}); err != nil {
		if ctx.Err() == nil {
			p.log.Info("liveness: record not written, retrying", "service", key, "err", err)
		}
		return
	}
	p.metrics.writes.Inc()
	p.written[key] = writtenRecord{value: want, at: now}
	was := map[string]bool{}
	for _, k := range strings.Split(have, ",") {
		if k = strings.TrimSpace(k); k != "" {
			was[k] = true
		}
	}
	var gone, back []string
	for _, k := range down {
		if !was[k] {
			gone = append(gone, k)
		}
		delete(was, k)
	}
	for k := range was {
		if current[k] {
			back = append(back, k)
		}
	}
	slices.Sort(back)
	if len(gone) > 0 {
		msg := fmt.Sprintf("endpoints %s fail their probes; every node leaves them out", strings.Join(gone, ","))
		if w := why(gone); w != "" {
			msg += " (" + w + ")"
		}
		p.log.Warn("liveness: endpoints taken out", "service", key, "endpoints", gone)
		p.recorder.Event(ref(s), corev1.EventTypeWarning, ReasonEndpointUnhealthy, msg)
	}
	if len(back) > 0 {
		p.log.Info("liveness: endpoints back", "service", key, "endpoints", back)
		p.recorder.Eventf(ref(s), corev1.EventTypeNormal, ReasonEndpointHealthy, "endpoints %s pass their probes again; every node serves them", strings.Join(back, ","))
	}
}
