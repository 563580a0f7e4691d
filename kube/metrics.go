package kube

import (
	"runtime"
	"runtime/debug"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/shardlb/shardlb/ipam"
	"github.com/shardlb/shardlb/shard"
)

// metrics are one pod's Prometheus series, registered on a registry of its own with
// the Go runtime's and the process's.
type metrics struct {
	reg           *prometheus.Registry
	reconcile     *prometheus.HistogramVec
	allocFailures *prometheus.CounterVec
	leader        prometheus.Gauge
	vips          *prometheus.GaugeVec
	frontends     prometheus.Gauge
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		reconcile: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "shardlb_reconcile_duration_seconds",
			Help:    "Time to reconcile one service (loop=controller) or to compute and apply this node's plan (loop=node).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"loop"}),
		allocFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shardlb_allocation_failures_total",
			Help: "Services the controller could not serve, by Event reason.",
		}, []string{"reason"}),
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shardlb_controller_leader",
			Help: "1 while this pod holds the controller Lease.",
		}),
		vips: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "shardlb_vips",
			Help: "VIPs this node announces, by role.",
		}, []string{"role"}),
		frontends: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shardlb_frontends",
			Help: "Frontends (VIP, port, protocol) this node programs.",
		}),
	}
	m.reg.MustRegister(m.reconcile, m.allocFailures, m.leader, m.vips, m.frontends,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, r := range []string{ReasonPoolExhausted, ReasonUnknownInstance, ReasonInvalidAnnotation, ReasonStaticIPConflict, ReasonAllocationFailed,
		ReasonInvalidLoadBalancerIP, ReasonUnsupportedMode, ReasonInvalidSourceRanges} {
		m.allocFailures.WithLabelValues(r)
	}
	for _, r := range []shard.Role{shard.RoleMaster, shard.RoleBackup, shard.RoleEqual} {
		m.vips.WithLabelValues(r.String())
	}
	return m
}

// registerBuildInfo adds shardlb_build_info: version is shardlb's ("" reads the
// module version the Go command recorded, else "dev").
func (m *metrics) registerBuildInfo(version string) {
	if version == "" {
		version = "dev"
		if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			version = bi.Main.Version
		}
	}
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "shardlb_build_info",
		Help:        "Always 1; the labels say which shardlb, built by which Go.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()},
	})
	g.Set(1)
	m.reg.MustRegister(g)
}

func (m *metrics) observePlan(p shard.Plan) {
	counts := map[shard.Role]int{}
	for _, a := range p.Advertisements {
		counts[a.Role]++
	}
	for _, r := range []shard.Role{shard.RoleMaster, shard.RoleBackup, shard.RoleEqual} {
		m.vips.WithLabelValues(r.String()).Set(float64(counts[r]))
	}
	m.frontends.Set(float64(len(p.Frontends)))
}

// stateCollector reads roles, BGP sessions and pools at scrape time, so the series
// are never stale and nothing has to push them.
type stateCollector struct {
	roles    func() []HARow
	peers    func() []BGPPeer // nil without a speaker
	pools    func() []ipam.PoolStats
	roleDesc *prometheus.Desc
	peerDesc *prometheus.Desc
	sentDesc *prometheus.Desc
	bfdDesc  *prometheus.Desc
	poolSize *prometheus.Desc
	poolUsed *prometheus.Desc
}

func newStateCollector(roles func() []HARow, peers func() []BGPPeer, pools func() []ipam.PoolStats) *stateCollector {
	return &stateCollector{
		roles: roles, peers: peers, pools: pools,
		// The label is shard, not instance: Prometheus would rename a label called
		// instance to exported_instance, its own target label taking the name.
		roleDesc: prometheus.NewDesc("shardlb_instance_role", "1 for this node's role on each shard (MASTER, BACKUP or EQUAL).", []string{"shard", "role"}, nil),
		peerDesc: prometheus.NewDesc("shardlb_bgp_session_state", "1 for each BGP peer's current session state.", []string{"peer", "state"}, nil),
		sentDesc: prometheus.NewDesc("shardlb_bgp_prefixes_advertised", "VIP prefixes announced to each BGP peer.", []string{"peer"}, nil),
		bfdDesc:  prometheus.NewDesc("shardlb_bfd_session_up", "1 while the BFD session with a BGP peer is up, 0 otherwise; absent for a peer without BFD.", []string{"peer"}, nil),
		// Size and use are two series, so that each sums over pools.
		poolSize: prometheus.NewDesc("shardlb_pool_size_addresses", "Addresses in each pool, reported by the controller pod.", []string{"pool"}, nil),
		poolUsed: prometheus.NewDesc("shardlb_pool_used_addresses", "Addresses of each pool in use, reported by the controller pod.", []string{"pool"}, nil),
	}
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.roleDesc
	ch <- c.peerDesc
	ch <- c.sentDesc
	ch <- c.bfdDesc
	ch <- c.poolSize
	ch <- c.poolUsed
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	for _, r := range c.roles() {
		ch <- prometheus.MustNewConstMetric(c.roleDesc, prometheus.GaugeValue, 1, r.Instance, r.State)
	}
	if c.peers != nil {
		for _, p := range c.peers() {
			ch <- prometheus.MustNewConstMetric(c.peerDesc, prometheus.GaugeValue, 1, p.Peer, p.State)
			ch <- prometheus.MustNewConstMetric(c.sentDesc, prometheus.GaugeValue, float64(p.PrefixesSent), p.Peer)
			if p.BFD != "" {
				up := 0.0
				if p.BFD == "up" {
					up = 1
				}
				ch <- prometheus.MustNewConstMetric(c.bfdDesc, prometheus.GaugeValue, up, p.Peer)
			}
		}
	}
	for _, p := range c.pools() {
		ch <- prometheus.MustNewConstMetric(c.poolSize, prometheus.GaugeValue, float64(p.Size), p.Name)
		ch <- prometheus.MustNewConstMetric(c.poolUsed, prometheus.GaugeValue, float64(p.Used), p.Name)
	}
}

// DatapathCounters are the datapath's counters as the metrics see them.
type DatapathCounters struct {
	Frontends []FrontendCounters
	// Drops counts dropped packets by reason.
	Drops map[string]uint64
	// Conntrack is the fill of each conntrack map, as last counted.
	Conntrack []ConntrackFill
	// SNATTimeWaitReuses are new SNAT flows given a port whose endpoint may still hold
	// the tuple in TIME_WAIT, every other port tried being taken.
	SNATTimeWaitReuses uint64
}

// ConntrackFill is one conntrack map's entries against its capacity.
type ConntrackFill struct {
	Map      string // ipv4_tcp, ipv4_udp or ipv6
	Entries  int
	Capacity int
}

// FrontendCounters are one frontend's packet counters since it was programmed.
type FrontendCounters struct {
	Service, Frontend string // namespace/name; "VIP:port/proto"
	// Packets and Bytes toward endpoints; ReplyPackets and ReplyBytes back to clients.
	Packets, Bytes           uint64
	ReplyPackets, ReplyBytes uint64
	Flows                    uint64
	// Handoffs are segments sent on to the previous master after a planned switch.
	Handoffs uint64
	// ICMPErrors are ICMP errors about the frontend's flows sent on to the host that
	// sent the packet they quote.
	ICMPErrors uint64
	// SourceRangeDrops are packets dropped because their client is outside the
	// frontend's source ranges (spec.loadBalancerSourceRanges).
	SourceRangeDrops uint64
}

// datapathCollector reads the datapath's counters at scrape time.
type datapathCollector struct {
	read                                                         func() DatapathCounters
	dropDesc, pktDesc, byteDesc, flowDesc, handoffDesc, icmpDesc *prometheus.Desc
	feDropDesc                                                   *prometheus.Desc
	ctDesc, ctLimitDesc                                          *prometheus.Desc
	twDesc                                                       *prometheus.Desc
}

func newDatapathCollector(read func() DatapathCounters) *datapathCollector {
	fe := []string{"service", "frontend"}
	return &datapathCollector{
		read:     read,
		dropDesc: prometheus.NewDesc("shardlb_datapath_drops_total", "Packets the datapath dropped, by reason.", []string{"reason"}, nil),
		pktDesc:  prometheus.NewDesc("shardlb_frontend_packets_total", "Packets through a frontend, by direction (to endpoints or replies).", append(fe, "direction"), nil),
		byteDesc: prometheus.NewDesc("shardlb_frontend_bytes_total", "Bytes through a frontend, by direction (to endpoints or replies).", append(fe, "direction"), nil),
		flowDesc: prometheus.NewDesc("shardlb_frontend_flows_total", "New flows a frontend balanced.", fe, nil),
		handoffDesc: prometheus.NewDesc("shardlb_frontend_handoff_packets_total",
			"TCP segments of connections unknown here sent on to the frontend's previous master after a planned switch.", fe, nil),
		icmpDesc: prometheus.NewDesc("shardlb_frontend_icmp_errors_total",
			"ICMP errors about the frontend's flows (fragmentation needed, unreachable, time exceeded) translated back to the host that sent the quoted packet.", fe, nil),
		feDropDesc: prometheus.NewDesc("shardlb_frontend_drops_total",
			"Packets to or from a frontend dropped, by reason (source_range: the client is outside spec.loadBalancerSourceRanges).", append(fe, "reason"), nil),
		// As node_exporter's node_nf_conntrack_entries and _entries_limit: two gauges, so
		// that the fill is their ratio and each sums over maps and nodes.
		ctDesc: prometheus.NewDesc("shardlb_conntrack_entries",
			"Entries in each conntrack map (ipv4_tcp, ipv4_udp, ipv6; a flow takes two), counted at most every 30 s.", []string{"map"}, nil),
		ctLimitDesc: prometheus.NewDesc("shardlb_conntrack_entries_limit",
			"Capacity of each conntrack map (--conntrackSize); when full, the least recently used entries are evicted for new flows.", []string{"map"}, nil),
		twDesc: prometheus.NewDesc("shardlb_snat_time_wait_reuses_total",
			"New onearm or fullnat connections given a SNAT port whose endpoint may still hold the previous connection in TIME_WAIT, every other port tried being taken (it may answer the SYN with a stale ACK, which costs the client a retransmission): widen --snatPorts when it grows. Counts since the process started.", nil, nil),
	}
}

func (c *datapathCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.dropDesc
	ch <- c.pktDesc
	ch <- c.byteDesc
	ch <- c.flowDesc
	ch <- c.handoffDesc
	ch <- c.icmpDesc
	ch <- c.feDropDesc
	ch <- c.ctDesc
	ch <- c.ctLimitDesc
	ch <- c.twDesc
}

func (c *datapathCollector) Collect(ch chan<- prometheus.Metric) {
	d := c.read()
	for reason, n := range d.Drops {
		ch <- prometheus.MustNewConstMetric(c.dropDesc, prometheus.CounterValue, float64(n), reason)
	}
	for _, f := range d.Frontends {
		ch <- prometheus.MustNewConstMetric(c.pktDesc, prometheus.CounterValue, float64(f.Packets), f.Service, f.Frontend, "forward")
		ch <- prometheus.MustNewConstMetric(c.pktDesc, prometheus.CounterValue, float64(f.ReplyPackets), f.Service, f.Frontend, "reply")
		ch <- prometheus.MustNewConstMetric(c.byteDesc, prometheus.CounterValue, float64(f.Bytes), f.Service, f.Frontend, "forward")
		ch <- prometheus.MustNewConstMetric(c.byteDesc, prometheus.CounterValue, float64(f.ReplyBytes), f.Service, f.Frontend, "reply")
		ch <- prometheus.MustNewConstMetric(c.flowDesc, prometheus.CounterValue, float64(f.Flows), f.Service, f.Frontend)
		ch <- prometheus.MustNewConstMetric(c.handoffDesc, prometheus.CounterValue, float64(f.Handoffs), f.Service, f.Frontend)
		ch <- prometheus.MustNewConstMetric(c.icmpDesc, prometheus.CounterValue, float64(f.ICMPErrors), f.Service, f.Frontend)
		ch <- prometheus.MustNewConstMetric(c.feDropDesc, prometheus.CounterValue, float64(f.SourceRangeDrops), f.Service, f.Frontend, "source_range")
	}
	ch <- prometheus.MustNewConstMetric(c.twDesc, prometheus.CounterValue, float64(d.SNATTimeWaitReuses))
	for _, f := range d.Conntrack {
		ch <- prometheus.MustNewConstMetric(c.ctDesc, prometheus.GaugeValue, float64(f.Entries), f.Map)
		ch <- prometheus.MustNewConstMetric(c.ctLimitDesc, prometheus.GaugeValue, float64(f.Capacity), f.Map)
	}
}
