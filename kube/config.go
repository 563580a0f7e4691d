package kube

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/shardlb/shardlb/ipam"
	"github.com/shardlb/shardlb/mastership"
	"github.com/shardlb/shardlb/shard"
)

// Config is everything the Kubernetes side of a shardlb pod needs. cmd/shardlb fills it
// from flags; DefaultConfig gives the defaults the flags should show.
type Config struct {
	// NodeName is this pod's member name: the holder identity of its Leases and the
	// node compared with instance masters. Required.
	NodeName string
	// Namespace holds the Leases (the pods' own namespace). Required.
	Namespace string
	// Kubeconfig is a kubeconfig file; "" means in-cluster configuration.
	Kubeconfig string
	// REST, when set, is used instead of Kubeconfig (tests, embedding).
	REST *rest.Config
	// QPS and Burst limit this pod's API client.
	QPS   float32
	Burst int

	// LoadBalancerClass selects the Services shardlb serves (--loadBalancerClass).
	LoadBalancerClass string
	// Instances are the shards (--zone, --numZoneInstances).
	Instances shard.Instances
	// Roles turns on active-backup per instance (--setRoles); off, every pod announces
	// with equal attributes.
	Roles bool
	// Excluded members never master an instance (--excludeRoleList).
	Excluded []string
	// Pools for IPv4 and IPv6 VIPs (--cidrPools, --cidr6Pools), in flag order.
	Pools []ipam.PoolSpec
	// UniqueIP gives every service its own VIP (--setUniqueIP).
	UniqueIP bool
	// DefaultMode is the NAT mode of services without loxilb.io/lbmode (--setLBMode).
	DefaultMode shard.Mode

	// Controller makes this pod campaign for the controller Lease; off, it only runs
	// the elector and the node loop.
	Controller bool
	// ControllerLease times the controller election (client-go leaderelection).
	ControllerLease LeaderTimings
	// MemberLease times the member and instance mastership Leases.
	MemberLease LeaseTimings
	// LeaseProtocol says how instance Leases stay held (mastership.Protocol): bound
	// to their holder's member Lease, with peers probing masters (the default), or
	// renewed every MemberLease.Renew on their own.
	LeaseProtocol mastership.Protocol
	// HandoverAck bounds how long a handover waits for the new master's
	// acknowledgement before the old master takes the instance back.
	HandoverAck time.Duration
	// MaxBackups bounds the backups announcing each shard (--maxBackups; 0: every
	// pod): the successor and the next MaxBackups-1 pods by rendezvous rank, so a
	// router holds 1+MaxBackups paths per VIP.
	MaxBackups int
	// PeerProbe times the liveness probes of masters by the members that would take
	// their instances over (LeaseProtocol member-bound).
	PeerProbe ProbeTimings
	// ControllerWorkers write allocations to the API in parallel; decisions stay
	// serial. Default 8.
	ControllerWorkers int

	// Debounce coalesces bursts of changes before the node recomputes its Plan.
	Debounce time.Duration

	// NodeAddresses are this node's addresses (--nodeIP), published on its member Lease:
	// a node that takes over one of this node's instances in a planned switch sends
	// the segments of connections it does not know to them (shard.Frontend.Handoff).
	NodeAddresses []netip.Addr
	// Handover bounds how long a stopping pod waits for the members it hands its
	// instances to; instances not acknowledged by then are released.
	Handover time.Duration
	// Drain is how long a stopping pod keeps its member Lease, and so the handoff to
	// it, after its routes are withdrawn; the caller detaches the datapath after Run.
	Drain time.Duration
	// RestartTime is how long this node's forwarding outlives its process: its
	// datapath is pinned and the routers keep its routes that long by BGP graceful
	// restart. 0: it does not. With it, a stop may be a restart (StopMode), peers
	// that find the process gone while its node answers leave its instances to its
	// next process for that long, and a process that finds instance Leases its
	// previous one wrote takes them back at once (mastership.Local.Restarting).
	RestartTime time.Duration
	// PodName is this pod's name ($POD_NAME), in Namespace. With it, a stop reads the
	// pod's DaemonSet: one deleted (an uninstall) makes the stop a removal for good
	// (Stop.Removal), whatever StopMode says. Empty: no such read.
	PodName string
	// StopMode says what a stop (SIGTERM) is: StopHandover hands the instances over,
	// withdraws the routes and drains; StopRestart keeps them all for the next
	// process (Leases, routes at the routers, the pinned datapath); StopAuto (the
	// default) restarts when RestartTime is set and this node is not in maintenance
	// (cordoned or excluded from external load balancers), and hands over otherwise.
	StopMode StopMode

	// APIAddress is the local HTTP API for `shardlb get` (loopback). "" disables it.
	APIAddress string
	// MetricsAddress serves /metrics, /healthz and /readyz. "" serves them on the
	// API address instead.
	MetricsAddress string
}

// StopMode is what a stop of the process means: see Config.StopMode.
type StopMode string

// Stop modes.
const (
	StopAuto     StopMode = "auto"
	StopRestart  StopMode = "restart"
	StopHandover StopMode = "handover"
)

// restarts decides whether a stop is a restart: always with StopRestart, never with
// StopHandover or without a restart time, and with StopAuto unless the node is in
// maintenance (a cordon or the exclusion label asks for its instances to move, and a
// restart would keep them).
func (m StopMode) restarts(restartTime time.Duration, maintenance string) bool {
	switch {
	case restartTime <= 0 || m == StopHandover:
		return false
	case m == StopRestart:
		return true
	default:
		return maintenance == ""
	}
}

// LeaderTimings are client-go leaderelection's three durations.
type LeaderTimings struct {
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
}

// LeaseTimings time the member and mastership Leases. Failover of traffic never waits
// for them (routers already hold the backups' routes); they bound how long an
// instance stays without a master after its master dies.
type LeaseTimings struct {
	// Duration after the last observed renewal when a Lease counts as expired.
	Duration time.Duration
	// Renew is how often a holder renews.
	Renew time.Duration
	// Grace is how long an expired Lease waits for its preferred member before any
	// eligible member may take it.
	Grace time.Duration
}

// ProbeTimings time the liveness probes of peers: a peer whose /healthz (on its
// metrics address) fails Failures times in a row, Interval apart, is taken for dead.
type ProbeTimings struct {
	Interval time.Duration
	Failures int
}

// Default addresses.
const (
	DefaultAPIAddress     = "127.0.0.1:11118"
	DefaultMetricsAddress = ":9478"
	DefaultClass          = "loxilb.io/loxilb"
)

// DefaultConfig is the configuration with every default filled in; NodeName,
// Namespace, Instances and Pools remain to be set.
func DefaultConfig() Config {
	return Config{
		QPS:               100,
		Burst:             200,
		LoadBalancerClass: DefaultClass,
		Controller:        true,
		ControllerLease:   LeaderTimings{LeaseDuration: 15 * time.Second, RenewDeadline: 10 * time.Second, RetryPeriod: 2 * time.Second},
		MemberLease:       LeaseTimings{Duration: 40 * time.Second, Renew: 10 * time.Second, Grace: time.Second},
		LeaseProtocol:     mastership.ProtocolMemberBound,
		HandoverAck:       4 * time.Second,
		PeerProbe:         ProbeTimings{Interval: 500 * time.Millisecond, Failures: 3},
		ControllerWorkers: 8,
		Debounce:          20 * time.Millisecond,
		Handover:          3 * time.Second,
		Drain:             time.Second,
		StopMode:          StopAuto,
		APIAddress:        DefaultAPIAddress,
		MetricsAddress:    DefaultMetricsAddress,
	}
}

// ErrConfig wraps every configuration error.
var ErrConfig = errors.New("invalid kube configuration")

// Validate reports the first thing that makes the configuration unusable.
func (c *Config) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrConfig, fmt.Sprintf(format, a...))
	}
	switch {
	case c.NodeName == "":
		return bad("node name is empty")
	case c.Namespace == "":
		return bad("namespace is empty")
	case c.LoadBalancerClass == "":
		return bad("loadBalancerClass is empty")
	case c.Instances.Count() < 1:
		return bad("no instances (numZoneInstances)")
	case c.MemberLease.Renew <= 0 || c.MemberLease.Duration <= c.MemberLease.Renew:
		return bad("member lease duration %v must exceed its renew interval %v", c.MemberLease.Duration, c.MemberLease.Renew)
	case c.MaxBackups < 0:
		return bad("maxBackups %d is negative", c.MaxBackups)
	case c.MemberLease.Grace < 0:
		return bad("member lease grace %v is negative", c.MemberLease.Grace)
	case c.LeaseProtocol == mastership.ProtocolMemberBound && (c.HandoverAck <= 0 || c.PeerProbe.Interval <= 0 || c.PeerProbe.Failures < 1):
		return bad("handover acknowledgement %v and peer probes every %v, %d failures, must be positive", c.HandoverAck, c.PeerProbe.Interval, c.PeerProbe.Failures)
	case c.Controller && (c.ControllerLease.LeaseDuration <= c.ControllerLease.RenewDeadline ||
		c.ControllerLease.RenewDeadline <= c.ControllerLease.RetryPeriod || c.ControllerLease.RetryPeriod <= 0):
		return bad("controller lease timings want duration > renew deadline > retry period > 0, got %v/%v/%v",
			c.ControllerLease.LeaseDuration, c.ControllerLease.RenewDeadline, c.ControllerLease.RetryPeriod)
	case c.Debounce < 0:
		return bad("debounce %v is negative", c.Debounce)
	case c.StopMode != "" && c.StopMode != StopAuto && c.StopMode != StopRestart && c.StopMode != StopHandover:
		return fmt.Errorf("%w: stop mode %q: want auto, restart or handover", ErrConfig, c.StopMode)
	case c.StopMode == StopRestart && c.RestartTime <= 0:
		return fmt.Errorf("%w: stop mode restart needs a datapath that outlives the process (a pin path) and BGP graceful restart", ErrConfig)
	case c.RestartTime < 0:
		return fmt.Errorf("%w: restart time %v: must not be negative", ErrConfig, c.RestartTime)
	case c.Handover < 0 || c.Drain < 0:
		return bad("handover %v and drain %v must not be negative", c.Handover, c.Drain)
	}
	if c.Controller {
		if _, err := ipam.New(c.Pools, c.UniqueIP); err != nil {
			return bad("pools: %v", err)
		}
	}
	for _, a := range []string{c.APIAddress, c.MetricsAddress} {
		if a == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a); err != nil {
			return bad("listen address %q: %v", a, err)
		}
	}
	return nil
}

// restConfig is the client configuration: REST, else the kubeconfig file, else
// in-cluster.
func (c *Config) restConfig() (*rest.Config, error) {
	var rc *rest.Config
	var err error
	switch {
	case c.REST != nil:
		rc = rest.CopyConfig(c.REST)
	case c.Kubeconfig != "":
		rc, err = clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	default:
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("kube client configuration: %w", err)
	}
	if c.QPS > 0 {
		rc.QPS, rc.Burst = c.QPS, c.Burst
	}
	rc.UserAgent = "shardlb/" + c.NodeName
	return rc, nil
}
