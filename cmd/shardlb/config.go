package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/shardlb/shardlb/bgp"
	"github.com/shardlb/shardlb/ipam"
	"github.com/shardlb/shardlb/kube"
	"github.com/shardlb/shardlb/shard"
)

// config is the typed, validated result of the command line.
type config struct {
	NodeName string
	// NodeIPv4 and NodeIPv6 are this node's addresses (--nodeIP), either may be unset.
	NodeIPv4, NodeIPv6 netip.Addr
	Namespace          string
	Kubeconfig         string

	Pools             []ipam.PoolSpec
	UniqueIP          bool
	LoadBalancerClass string
	LBMode            shard.Mode

	Instances     shard.Instances
	Roles         bool
	Exclude       []string
	LeaseDuration time.Duration
	RenewInterval time.Duration

	BGPEnabled bool
	BGP        bgp.Config

	Interfaces    []string
	ConntrackSize int
	// PinPath is where the datapath pins its maps and links (bpffs); empty: nothing
	// is pinned.
	PinPath string

	APIListen     string
	MetricsListen string
	LogLevel      slog.Level
	// Drain is how long the datapath keeps serving after the routes are withdrawn.
	Drain time.Duration
}

// flagError is a bad flag value: one line naming the flag, the value and what is expected.
type flagError struct {
	flag, value, want string
	err               error
}

func (e *flagError) Error() string {
	msg := fmt.Sprintf("invalid --%s=%q: %s", e.flag, e.value, e.want)
	if e.err != nil {
		msg += " (" + e.err.Error() + ")"
	}
	return msg
}

func (e *flagError) Unwrap() error { return e.err }

// errHelp is returned when --help was asked for: usage goes to stdout, exit 0.
var errHelp = pflag.ErrHelp

type group struct {
	title string
	fs    *pflag.FlagSet
}

// raw holds flag values before validation.
type raw struct {
	nodeName, nodeIP, namespace, kubeconfig                string
	cidrPools, cidr6Pools, lbClass, lbMode                 string
	uniqueIP                                               bool
	numZones                                               int
	zone, setRoles, excludeRoles                           string
	leaseDuration, renewInterval                           time.Duration
	setBGP, extPeers, bfd, passwordFile, communities, grpc string
	listenPort                                             int
	multiHop                                               bool
	hold, keepalive, peerWait                              time.Duration
	localPrefMaster, localPrefBackup, medMaster, medBackup uint32
	prepend                                                uint8
	interfaces, pinPath                                    string
	conntrack                                              int
	apiListen, metricsListen, logLevel                     string
	drain                                                  time.Duration
}

func newFlags(r *raw, env func(string) string) (*pflag.FlagSet, []group) {
	mk := func(title string) group {
		return group{title: title, fs: pflag.NewFlagSet(title, pflag.ContinueOnError)}
	}
	node, pools, shards, bgpG, dp, ops := mk("Node and Kubernetes"), mk("Services and IPAM"), mk("Sharding and roles"), mk("BGP"), mk("Datapath"), mk("API, metrics and logs")

	f := node.fs
	f.StringVar(&r.nodeName, "nodeName", env("NODE_NAME"), "this node's name, the member name in Leases ($NODE_NAME when set)")
	f.StringVar(&r.nodeIP, "nodeIP", env("NODE_IP"), "this node's addresses, at most one per family, comma separated: the IPv4 one is the BGP router ID, the IPv6 one the next hop of IPv6 VIPs (IPv4 VIPs get the session's address); each is the onearm source toward endpoints and where handed-off segments go ($NODE_IP when set)")
	f.StringVar(&r.namespace, "namespace", or(env("POD_NAMESPACE"), "kube-system"), "namespace of the Leases and the controller ($POD_NAMESPACE when set)")
	f.StringVar(&r.kubeconfig, "kubeconfig", env("KUBECONFIG"), "kubeconfig file; empty: in-cluster configuration")

	f = pools.fs
	f.StringVar(&r.cidrPools, "cidrPools", "", "IPv4 VIP pools: name=CIDR or name=startIP-endIP, comma separated; a CIDR with host bits set starts there (defaultPool=192.168.80.250/24)")
	f.StringVar(&r.cidr6Pools, "cidr6Pools", "", "IPv6 VIP pools, same syntax")
	f.BoolVar(&r.uniqueIP, "setUniqueIP", false, "one VIP per service (needed for sharding); otherwise services with different ports may share one")
	f.StringVar(&r.lbClass, "loadBalancerClass", "loxilb.io/loxilb", "spec.loadBalancerClass of the services this load balancer serves")
	f.StringVar(&r.lbMode, "setLBMode", "default", "default NAT mode: default|onearm|fullnat (or 0..2); per service: loxilb.io/lbmode")

	f = shards.fs
	f.IntVar(&r.numZones, "numZoneInstances", 1, "number of shards: default, <zone>-inst1, ...")
	f.StringVar(&r.zone, "zone", "llb", "prefix of the shard names")
	f.StringVar(&r.setRoles, "setRoles", "", "turn on active-backup roles per shard (kube-loxilb takes an address here, e.g. 0.0.0.0); unset: every node announces equally (ECMP)")
	f.Lookup("setRoles").NoOptDefVal = "0.0.0.0"
	f.StringVar(&r.excludeRoles, "excludeRoleList", "", "comma separated node names or addresses that never become master")
	f.DurationVar(&r.leaseDuration, "leaseDuration", 4*time.Second, "how long a member or mastership Lease lasts without renewal")
	f.DurationVar(&r.renewInterval, "leaseRenewInterval", time.Second, "how often Leases are renewed")

	f = bgpG.fs
	f.StringVar(&r.setBGP, "setBGP", "", "local AS number (asplain or asdot); unset or 0: no BGP")
	f.StringVar(&r.extPeers, "extBGPPeers", "", "upstream routers: IP:ASN[,IP:ASN], IPv6 as [addr]:ASN")
	f.IntVar(&r.listenPort, "listenBGPPort", 179, "TCP port for incoming BGP sessions; 0: dial out only")
	f.BoolVar(&r.multiHop, "eBGPMultiHop", false, "allow eBGP peers that are not directly connected")
	f.DurationVar(&r.hold, "bgpHoldTime", 9*time.Second, "BGP hold time (whole seconds, >= 3s)")
	f.DurationVar(&r.keepalive, "bgpKeepalive", 3*time.Second, "BGP keepalive interval")
	f.DurationVar(&r.peerWait, "bgpPeerWait", 30*time.Second, "after start, how long every peer must be up before this node may master; after it, one peer up is enough")
	f.StringVar(&r.bfd, "bgpBFD", "300ms,3", "BFD toward every peer: INTERVAL,MULTIPLIER, or off")
	f.StringVar(&r.passwordFile, "bgpPasswordFile", "", "file of TCP MD5 passwords: lines 'PEER-IP PASSWORD' or one 'PASSWORD' for all (mount a Secret)")
	f.StringVar(&r.communities, "bgpCommunities", "", "communities added to every VIP: ASN:VALUE or no-export, comma separated")
	f.Uint32Var(&r.localPrefMaster, "bgpLocalPrefMaster", 5000, "LOCAL_PREF of a shard master's VIPs (iBGP)")
	f.Uint32Var(&r.localPrefBackup, "bgpLocalPrefBackup", 100, "LOCAL_PREF of a backup's VIPs (iBGP)")
	f.Uint32Var(&r.medMaster, "bgpMEDMaster", 10, "MED of a master's VIPs")
	f.Uint32Var(&r.medBackup, "bgpMEDBackup", 20, "MED of a backup's VIPs")
	f.Uint8Var(&r.prepend, "bgpBackupPrepend", 3, "extra local-AS prepends on a backup's VIPs toward eBGP peers")
	f.StringVar(&r.grpc, "bgpAPIListen", "127.0.0.1:50051", "GoBGP gRPC API for the gobgp CLI; empty disables")

	f = dp.fs
	f.StringVar(&r.interfaces, "interfaces", "", "interfaces the eBPF datapath attaches to, comma separated; empty: no datapath")
	f.StringVar(&r.pinPath, "pinPath", "", "bpffs directory where the datapath pins its maps and links, e.g. /sys/fs/bpf/shardlb: a crashed process leaves the datapath forwarding and the next one adopts its connections; empty: nothing pinned")
	f.IntVar(&r.conntrack, "conntrackSize", 262144, "connection tracking entries of each conntrack map (IPv4 TCP, IPv4 UDP, IPv6); a flow takes two")

	f.DurationVar(&r.drain, "shutdownDrain", time.Second, "on shutdown, how long the datapath keeps serving after the routes are withdrawn")

	f = ops.fs
	f.StringVar(&r.apiListen, "apiListen", kube.DefaultAPIAddress, "local API used by 'shardlb get'")
	f.StringVar(&r.metricsListen, "metricsListen", kube.DefaultMetricsAddress, "Prometheus /metrics, /healthz and /readyz; empty: on --apiListen")
	f.StringVar(&r.logLevel, "logLevel", "info", "debug, info, warn or error")

	groups := []group{node, pools, shards, bgpG, dp, ops}
	all := pflag.NewFlagSet("shardlb", pflag.ContinueOnError)
	for _, g := range groups {
		all.AddFlagSet(g.fs)
	}
	all.SortFlags = false
	return all, groups
}

func or(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func usage(w io.Writer, groups []group) {
	fmt.Fprintf(w, "Usage:\n  shardlb [run] [flags]        run the load balancer (DaemonSet entry point)\n"+
		"  shardlb get ha|ip|lb|bgp|services [-o table|json|wide]\n  shardlb version\n")
	for _, g := range groups {
		g.fs.SortFlags = false
		fmt.Fprintf(w, "\n%s:\n%s", g.title, g.fs.FlagUsages())
	}
}

// parseConfig reads the run flags; env supplies the downward-API defaults.
func parseConfig(args []string, env func(string) string, out io.Writer) (config, error) {
	var r raw
	fs, groups := newFlags(&r, env)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			usage(out, groups)
		}
		return config{}, err
	}
	if fs.NArg() > 0 {
		return config{}, fmt.Errorf("unexpected argument %q (flags only)", fs.Arg(0))
	}
	return r.validate(fs.Changed)
}

func (r *raw) validate(changed func(string) bool) (config, error) {
	c := config{
		NodeName: r.nodeName, Namespace: r.namespace, Kubeconfig: r.kubeconfig,
		UniqueIP: r.uniqueIP, LoadBalancerClass: r.lbClass,
		LeaseDuration: r.leaseDuration, RenewInterval: r.renewInterval,
		ConntrackSize: r.conntrack, APIListen: r.apiListen, MetricsListen: r.metricsListen,
		Drain: r.drain,
	}
	var err error
	if c.NodeIPv4, c.NodeIPv6, err = parseNodeIPs(r.nodeIP); err != nil {
		return c, &flagError{"nodeIP", r.nodeIP, "IP addresses, at most one per family, comma separated", err}
	}
	if r.namespace == "" {
		return c, &flagError{"namespace", r.namespace, "a namespace name", nil}
	}
	for _, p := range []struct {
		flag, value string
		fam         ipam.Family
	}{{"cidrPools", r.cidrPools, ipam.IPv4}, {"cidr6Pools", r.cidr6Pools, ipam.IPv6}} {
		pools, err := ipam.ParsePools(p.value)
		if err != nil {
			return c, &flagError{p.flag, p.value, "name=CIDR or name=startIP-endIP, comma separated", err}
		}
		for _, pool := range pools {
			if pool.Family() != p.fam {
				return c, &flagError{p.flag, p.value, fmt.Sprintf("%s pools only (%s is %s)", p.fam, pool.Name, pool.Family()), nil}
			}
		}
		c.Pools = append(c.Pools, pools...)
	}
	if _, err := ipam.New(c.Pools, c.UniqueIP); err != nil {
		return c, &flagError{"cidrPools", r.cidrPools + " " + r.cidr6Pools, "pools that do not overlap and have distinct names", err}
	}
	if r.lbClass == "" || strings.ContainsAny(r.lbClass, " \t") {
		return c, &flagError{"loadBalancerClass", r.lbClass, "a class name such as loxilb.io/loxilb", nil}
	}
	if c.LBMode, err = shard.ParseMode(r.lbMode); err != nil {
		return c, &flagError{"setLBMode", r.lbMode, "default, onearm, fullnat or 0..2", nil}
	}
	if c.Instances, err = shard.NewInstances(r.zone, r.numZones); err != nil {
		if changed("zone") {
			return c, &flagError{"zone", r.zone, "lowercase letters, digits and '-'", nil}
		}
		return c, &flagError{"numZoneInstances", strconv.Itoa(r.numZones), fmt.Sprintf("a number from 1 to %d", shard.MaxInstances), nil}
	}
	if changed("setRoles") {
		if _, err := netip.ParseAddr(r.setRoles); err != nil {
			return c, &flagError{"setRoles", r.setRoles, "an address, as kube-loxilb takes (0.0.0.0 for all)", nil}
		}
		c.Roles = true
	}
	for _, e := range strings.Split(r.excludeRoles, ",") {
		if e = strings.TrimSpace(e); e != "" {
			c.Exclude = append(c.Exclude, e)
		}
	}
	if r.leaseDuration < 2*time.Second || r.renewInterval <= 0 || r.renewInterval*2 > r.leaseDuration {
		return c, &flagError{"leaseDuration", r.leaseDuration.String(), "at least 2s and twice --leaseRenewInterval", nil}
	}
	if err := r.validateBGP(&c); err != nil {
		return c, err
	}
	for _, i := range strings.Split(r.interfaces, ",") {
		if i = strings.TrimSpace(i); i != "" {
			if len(i) > 15 || strings.ContainsAny(i, "/ \t") {
				return c, &flagError{"interfaces", r.interfaces, "interface names, comma separated", nil}
			}
			c.Interfaces = append(c.Interfaces, i)
		}
	}
	if r.pinPath != "" && !filepath.IsAbs(r.pinPath) {
		return c, &flagError{"pinPath", r.pinPath, "an absolute path on bpffs", nil}
	}
	c.PinPath = r.pinPath
	if r.conntrack < 1024 || r.conntrack > 1<<26 {
		return c, &flagError{"conntrackSize", strconv.Itoa(r.conntrack), "a number from 1024 to 67108864", nil}
	}
	if err := c.LogLevel.UnmarshalText([]byte(r.logLevel)); err != nil {
		return c, &flagError{"logLevel", r.logLevel, "debug, info, warn or error", nil}
	}
	if r.drain < 0 || r.drain > time.Minute {
		return c, &flagError{"shutdownDrain", r.drain.String(), "a duration from 0 to 1m", nil}
	}
	if r.apiListen != "" {
		if _, err := netip.ParseAddrPort(r.apiListen); err != nil {
			return c, &flagError{"apiListen", r.apiListen, "ADDRESS:PORT", err}
		}
	}
	return c, nil
}

func (r *raw) validateBGP(c *config) error {
	b := bgp.DefaultConfig()
	if r.setBGP != "" && r.setBGP != "0" {
		asn, err := bgp.ParseASN(r.setBGP)
		if err != nil {
			return &flagError{"setBGP", r.setBGP, "an AS number, asplain or asdot", err}
		}
		b.LocalASN = asn
		c.BGPEnabled = true
	}
	peers, err := bgp.ParsePeers(r.extPeers)
	if err != nil {
		return &flagError{"extBGPPeers", r.extPeers, "IP:ASN[,IP:ASN], IPv6 as [addr]:ASN", err}
	}
	if len(peers) > 0 && !c.BGPEnabled {
		return &flagError{"extBGPPeers", r.extPeers, "peers need --setBGP=LOCAL-ASN", nil}
	}
	b.Peers = peers
	if r.listenPort < 0 || r.listenPort > 65535 {
		return &flagError{"listenBGPPort", strconv.Itoa(r.listenPort), "a port from 0 to 65535", nil}
	}
	b.ListenPort = int32(r.listenPort)
	b.EBGPMultiHop = r.multiHop
	if r.hold < 3*time.Second || r.hold%time.Second != 0 {
		return &flagError{"bgpHoldTime", r.hold.String(), "whole seconds, at least 3s", nil}
	}
	if r.keepalive < time.Second || r.keepalive > r.hold/3 {
		return &flagError{"bgpKeepalive", r.keepalive.String(), "at least 1s and at most a third of the hold time", nil}
	}
	b.HoldTime, b.KeepaliveInterval = r.hold, r.keepalive
	if r.peerWait < 0 {
		return &flagError{"bgpPeerWait", r.peerWait.String(), "a duration, 0 or more", nil}
	}
	b.PeerWait = r.peerWait
	if b.BFD, err = parseBFD(r.bfd); err != nil {
		return &flagError{"bgpBFD", r.bfd, "INTERVAL,MULTIPLIER such as 300ms,3, or off", err}
	}
	if r.passwordFile != "" {
		if _, err := os.Stat(r.passwordFile); err != nil {
			return &flagError{"bgpPasswordFile", r.passwordFile, "a readable file", err}
		}
	}
	b.PasswordFile = r.passwordFile
	for _, s := range strings.Split(r.communities, ",") {
		if s = strings.TrimSpace(s); s != "" {
			b.Communities = append(b.Communities, s)
		}
	}
	b.LocalPrefMaster, b.LocalPrefBackup = r.localPrefMaster, r.localPrefBackup
	b.MEDMaster, b.MEDBackup, b.BackupPrepend = r.medMaster, r.medBackup, r.prepend
	if r.localPrefMaster <= r.localPrefBackup {
		return &flagError{"bgpLocalPrefMaster", strconv.Itoa(int(r.localPrefMaster)), "more than --bgpLocalPrefBackup", nil}
	}
	if r.medMaster >= r.medBackup {
		return &flagError{"bgpMEDMaster", strconv.Itoa(int(r.medMaster)), "less than --bgpMEDBackup", nil}
	}
	if r.grpc != "" {
		if _, err := netip.ParseAddrPort(r.grpc); err != nil {
			return &flagError{"bgpAPIListen", r.grpc, "ADDRESS:PORT or empty", err}
		}
	}
	b.GRPCListen = r.grpc
	b.RouterID = c.NodeIPv4
	// An IPv6 VIP announced over an IPv4 session needs an IPv6 next hop of its own.
	b.NextHop6 = c.NodeIPv6
	c.BGP = b
	return nil
}

// parseNodeIPs reads --nodeIP: empty, or one or two addresses of different families.
func parseNodeIPs(s string) (v4, v6 netip.Addr, err error) {
	if strings.TrimSpace(s) == "" {
		return v4, v6, nil
	}
	for _, f := range strings.Split(s, ",") {
		a, err := netip.ParseAddr(strings.TrimSpace(f))
		if err != nil {
			return v4, v6, err
		}
		if a.Zone() != "" {
			return v4, v6, fmt.Errorf("%v: a zone is not an address of the node", a)
		}
		a = a.Unmap()
		slot := &v4
		if a.Is6() {
			slot = &v6
		}
		if slot.IsValid() {
			return v4, v6, fmt.Errorf("two addresses of one family: %v and %v", *slot, a)
		}
		*slot = a
	}
	return v4, v6, nil
}

func parseBFD(s string) (bgp.BFDConfig, error) {
	s = strings.TrimSpace(s)
	if s == "off" || s == "" || s == "false" {
		return bgp.BFDConfig{}, nil
	}
	iv, mult, ok := strings.Cut(s, ",")
	if !ok {
		mult = "3"
	}
	d, err := time.ParseDuration(strings.TrimSpace(iv))
	if err != nil {
		return bgp.BFDConfig{}, err
	}
	m, err := strconv.ParseUint(strings.TrimSpace(mult), 10, 8)
	if err != nil {
		return bgp.BFDConfig{}, err
	}
	if d < 10*time.Millisecond || d > time.Minute || m < 1 {
		return bgp.BFDConfig{}, fmt.Errorf("interval 10ms..1m, multiplier 1..255")
	}
	return bgp.BFDConfig{Enabled: true, Interval: d, Multiplier: uint8(m)}, nil
}
