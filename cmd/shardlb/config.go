package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/shardlb/shardlb/bgp"
	"github.com/shardlb/shardlb/datapath"
	"github.com/shardlb/shardlb/ipam"
	"github.com/shardlb/shardlb/kube"
	"github.com/shardlb/shardlb/mastership"
	"github.com/shardlb/shardlb/shard"
)

// config is the typed, validated result of the command line: each package's own
// Config, seeded from its DefaultConfig, so a default lives in one place.
type config struct {
	// Kube is the Kubernetes side: node, namespace, services and pools, shards and
	// roles, Leases, the local API and the drain.
	Kube kube.Config

	BGPEnabled bool
	BGP        bgp.Config

	// Datapath is attached when it has Interfaces.
	Datapath datapath.Config
	// Interfaces are --interfaces' names and patterns, matched at start against this
	// node's interfaces into Datapath.Interfaces (findInterfaces); empty: the
	// interfaces of --nodeIP, else of the default routes.
	Interfaces []string
	// NoDatapath is --interfaces=none: no datapath is attached.
	NoDatapath bool

	LogLevel  slog.Level
	LogFormat logFormat
}

// defaultConfig is what the flags start from: every package's defaults, the downward
// API's values, and the daemon's own choices where a package leaves a setting to its
// caller.
func defaultConfig(env func(string) string) config {
	c := config{
		Kube:     kube.DefaultConfig(),
		BGP:      bgp.DefaultConfig(),
		Datapath: datapath.DefaultConfig(),
	}
	c.Kube.NodeName, c.Kube.Kubeconfig = env("NODE_NAME"), env("KUBECONFIG")
	c.Kube.Namespace = or(env("POD_NAMESPACE"), "kube-system")
	c.Kube.PodName = env("POD_NAME")
	// A pod accepts its routers' sessions on the BGP port and detects their loss with
	// BFD; the package leaves both off for callers that only dial out.
	c.BGP.ListenPort = 179
	c.BGP.BFD.Enabled = true
	return c
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

// raw holds the values of flags that are text before validation; the other flags
// write straight into the config.
type raw struct {
	nodeIP, cidrPools, cidr6Pools, lbMode       string
	leaseProtocol                               string
	numZones, listenPort                        int
	zone, setRoles, excludeRoles                string
	setBGP, extPeers, bfd, communities          string
	interfaces, logLevel, logFormat, attachMode string
	snatPorts                                   string
	stopMode                                    string
}

// newFlags binds the flags to c and r; each default is the value c or r already holds,
// so defaultConfig is the only place a package's default is read.
func newFlags(c *config, r *raw) (*pflag.FlagSet, []group) {
	mk := func(title string) group {
		return group{title: title, fs: pflag.NewFlagSet(title, pflag.ContinueOnError)}
	}
	node, pools, shards, bgpG, dp, ops := mk("Node and Kubernetes"), mk("Services and IPAM"), mk("Sharding and roles"), mk("BGP"), mk("Datapath"), mk("API, metrics and logs")
	k, b, d := &c.Kube, &c.BGP, &c.Datapath

	f := node.fs
	f.StringVar(&k.NodeName, "nodeName", k.NodeName, "this node's name, the member name in Leases ($NODE_NAME when set)")
	f.StringVar(&r.nodeIP, "nodeIP", r.nodeIP, "this node's addresses, at most one per family, comma separated: the IPv4 one is the BGP router ID, the IPv6 one the next hop of IPv6 VIPs (IPv4 VIPs get the session's address); each is the onearm source toward endpoints and where handed-off segments go ($NODE_IP when set)")
	f.StringVar(&k.Namespace, "namespace", k.Namespace, "namespace of the Leases and the controller ($POD_NAMESPACE when set)")
	f.StringVar(&k.PodName, "podName", k.PodName, "this pod's name ($POD_NAME when set): at a stop, a deleted DaemonSet of this pod (an uninstall) makes it a removal for good: hand over, withdraw, remove the pinned datapath")
	f.StringVar(&k.Kubeconfig, "kubeconfig", k.Kubeconfig, "kubeconfig file; empty: in-cluster configuration")

	f = pools.fs
	f.StringVar(&r.cidrPools, "cidrPools", "", "IPv4 VIP pools: name=CIDR or name=startIP-endIP, comma separated; a CIDR with host bits set starts there (defaultPool=192.168.80.250/24)")
	f.StringVar(&r.cidr6Pools, "cidr6Pools", "", "IPv6 VIP pools, same syntax")
	f.BoolVar(&k.UniqueIP, "setUniqueIP", k.UniqueIP, "one VIP per service (needed for sharding); otherwise services with different ports may share one")
	f.StringVar(&k.LoadBalancerClass, "loadBalancerClass", k.LoadBalancerClass, "spec.loadBalancerClass of the services this load balancer serves")
	f.StringVar(&r.lbMode, "setLBMode", k.DefaultMode.String(), "default NAT mode: default|onearm|fullnat|dsr (or 0..3); per service: loxilb.io/lbmode")

	f = shards.fs
	f.IntVar(&r.numZones, "numZoneInstances", 1, "number of shards: default, <zone>-inst1, ...")
	f.StringVar(&r.zone, "zone", "llb", "prefix of the shard names")
	f.StringVar(&r.setRoles, "setRoles", "", "turn on active-backup roles per shard (kube-loxilb takes an address here, e.g. 0.0.0.0); unset: every node announces equally (ECMP)")
	f.Lookup("setRoles").NoOptDefVal = "0.0.0.0"
	f.StringVar(&r.excludeRoles, "excludeRoleList", strings.Join(k.Excluded, ","), "comma separated node names or addresses that never become master")
	f.DurationVar(&k.MemberLease.Duration, "leaseDuration", k.MemberLease.Duration, "how long a member Lease (and, with --leaseProtocol=renewed, a mastership Lease) lasts without renewal")
	f.DurationVar(&k.MemberLease.Renew, "leaseRenewInterval", k.MemberLease.Renew, "how often Leases are renewed")
	f.IntVar(&k.MaxBackups, "maxBackups", k.MaxBackups, "backups announcing each shard besides its master: the one that takes over first, then by rank; 0: every node (routers hold one path per node per VIP)")
	f.StringVar(&r.leaseProtocol, "leaseProtocol", k.LeaseProtocol.String(), "member-bound: mastership Leases are written only when they change hands and last while their holder's member Lease does, masters are probed by the nodes that would take over; renewed: every master renews each mastership Lease")
	f.DurationVar(&k.HandoverAck, "handoverAckTimeout", k.HandoverAck, "how long a handover waits for the new master's acknowledgement (member-bound)")
	f.DurationVar(&k.PeerProbe.Interval, "peerProbeInterval", k.PeerProbe.Interval, "how often a node probes the masters it would take over (GET /healthz on their --metricsListen), and each probe's timeout")
	f.IntVar(&k.PeerProbe.Failures, "peerProbeFailures", k.PeerProbe.Failures, "failed probes in a row after which a master is taken for dead")

	f = bgpG.fs
	f.StringVar(&r.setBGP, "setBGP", "", "local AS number (asplain or asdot); unset or 0: no BGP")
	f.StringVar(&r.extPeers, "extBGPPeers", "", "upstream routers: IP:ASN[,IP:ASN], IPv6 as [addr]:ASN")
	f.IntVar(&r.listenPort, "listenBGPPort", int(b.ListenPort), "TCP port for incoming BGP sessions; 0: dial out only")
	f.BoolVar(&b.EBGPMultiHop, "eBGPMultiHop", b.EBGPMultiHop, "allow eBGP peers that are not directly connected")
	f.DurationVar(&b.HoldTime, "bgpHoldTime", b.HoldTime, "BGP hold time (whole seconds, >= 3s)")
	f.DurationVar(&b.KeepaliveInterval, "bgpKeepalive", b.KeepaliveInterval, "BGP keepalive interval")
	f.DurationVar(&b.PeerWait, "bgpPeerWait", b.PeerWait, "after start, how long every peer must be up before this node may master; after it, one peer up is enough")
	f.StringVar(&r.bfd, "bgpBFD", formatBFD(b.BFD), "BFD toward every peer: INTERVAL,MULTIPLIER, or off")
	f.StringVar(&b.PasswordFile, "bgpPasswordFile", b.PasswordFile, "file of TCP MD5 passwords: lines 'PEER-IP PASSWORD' or one 'PASSWORD' for all (mount a Secret)")
	f.StringVar(&r.communities, "bgpCommunities", strings.Join(b.Communities, ","), "communities added to every VIP: ASN:VALUE or no-export, comma separated")
	f.Uint32Var(&b.LocalPrefMaster, "bgpLocalPrefMaster", b.LocalPrefMaster, "LOCAL_PREF of a shard master's VIPs (iBGP)")
	f.Uint32Var(&b.LocalPrefBackup, "bgpLocalPrefBackup", b.LocalPrefBackup, "LOCAL_PREF of a backup's VIPs (iBGP)")
	f.Uint32Var(&b.MEDMaster, "bgpMEDMaster", b.MEDMaster, "MED of a master's VIPs")
	f.Uint32Var(&b.MEDBackup, "bgpMEDBackup", b.MEDBackup, "MED of a backup's VIPs")
	f.Uint8Var(&b.BackupPrepend, "bgpBackupPrepend", b.BackupPrepend, "extra local-AS prepends on a backup's VIPs toward eBGP peers")
	f.Uint32Var(&b.LocalPrefSuccessor, "bgpLocalPrefSuccessor", b.LocalPrefSuccessor, "LOCAL_PREF of the VIPs of a shard this node takes over if its master fails (iBGP); between backup and master")
	f.Uint32Var(&b.MEDSuccessor, "bgpMEDSuccessor", b.MEDSuccessor, "MED of the VIPs of a shard this node takes over if its master fails; between master and backup")
	f.Uint8Var(&b.SuccessorPrepend, "bgpSuccessorPrepend", b.SuccessorPrepend, "extra local-AS prepends toward eBGP peers on the VIPs of a shard this node takes over if its master fails; at most --bgpBackupPrepend")
	f.StringVar(&b.GRPCListen, "bgpAPIListen", b.GRPCListen, "GoBGP gRPC API for the gobgp CLI; empty disables")
	f.DurationVar(&b.GracefulRestart, "bgpGracefulRestart", b.GracefulRestart, "restart time of BGP graceful restart, offered when the datapath is pinned (--pinPath): how long routers keep this node's routes, and peers its shards, while its process restarts or after it crashed (whole seconds up to 4095s); 0: off")

	f = dp.fs
	f.StringVar(&r.interfaces, "interfaces", strings.Join(c.Interfaces, ","), "interfaces the eBPF datapath attaches to: names and glob patterns (path.Match syntax: eth*, ens*, bond0, cni0, cali*), comma separated, up or down, a loopback only by its name, followed as interfaces appear, go and are renamed; empty: the interfaces carrying --nodeIP, else those of the IPv4 and IPv6 default routes, chosen at start; none: no datapath; matching nothing stops the start")
	f.StringVar(&r.attachMode, "attachMode", string(d.AttachMode), "datapath hook: auto (tcx where the kernel has it, Linux 6.6+, else tc), tcx, or tc (a clsact direct-action filter at priority 2)")
	f.StringVar(&d.PinPath, "pinPath", d.PinPath, "bpffs directory where the datapath pins its maps and links, e.g. /sys/fs/bpf/shardlb: a crashed process leaves the datapath forwarding and the next one adopts its connections; empty: nothing pinned")
	f.StringVar(&r.snatPorts, "snatPorts", fmt.Sprintf("%d-%d", d.SNATPortMin, d.SNATPortMax), "source ports of onearm and fullnat flows, MIN-MAX, per SNAT address and endpoint: at most about one new connection a second per 61 ports when endpoints close first (TIME_WAIT), one per 10 ports when clients do; keep it outside the node's net.ipv4.ip_local_port_range")
	f.IntVar(&d.ConntrackSize, "conntrackSize", d.ConntrackSize, "connection tracking entries of each conntrack map (IPv4 TCP, IPv4 UDP, IPv6); a flow takes two")
	f.IntVar(&d.MaxServices, "maxServices", d.MaxServices, "frontends (VIP, port, protocol) the datapath holds; one beyond is refused, the others served. Sizes the service maps and, at 256 per frontend, the minimum of the Maglev ring slots")
	f.IntVar(&d.MaxEndpoints, "maxEndpoints", d.MaxEndpoints, "endpoint slots of all frontends together (an endpoint of two frontends takes two); a frontend whose endpoints do not fit is refused, the others served. Gives the Maglev rings 64 slots per endpoint slot")

	f.DurationVar(&k.Drain, "shutdownDrain", k.Drain, "on shutdown, how long the datapath keeps serving after the routes are withdrawn")
	f.StringVar(&r.stopMode, "stopMode", string(k.StopMode), "what SIGTERM means: restart (keep shards, routes at the routers and the pinned datapath for the next process; needs --pinPath and --bgpGracefulRestart), handover (hand shards over, withdraw, drain), or auto: restart unless the node is cordoned or excluded from external load balancers")

	f = ops.fs
	f.StringVar(&k.APIAddress, "apiListen", k.APIAddress, "local API used by 'shardlb get'")
	f.StringVar(&k.MetricsAddress, "metricsListen", k.MetricsAddress, "Prometheus /metrics, /healthz and /readyz; empty: on --apiListen")
	f.StringVar(&r.logLevel, "logLevel", "info", "debug, info, warn or error")
	f.StringVar(&r.logFormat, "logFormat", string(logText), "log line format: text or json, client-go's lines included")

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
		"  shardlb get ha|ip|lb|bgp|services [-o table|wide|json|yaml]\n  shardlb version\n")
	for _, g := range groups {
		g.fs.SortFlags = false
		fmt.Fprintf(w, "\n%s:\n%s", g.title, g.fs.FlagUsages())
	}
}

// parseConfig reads the run flags; env supplies the downward-API defaults.
func parseConfig(args []string, env func(string) string, out io.Writer) (config, error) {
	c, r := defaultConfig(env), raw{nodeIP: env("NODE_IP")}
	fs, groups := newFlags(&c, &r)
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
	return c, r.validate(&c, fs.Changed)
}

// validate checks c and fills it from the text flags.
func (r *raw) validate(c *config, changed func(string) bool) error {
	k, d := &c.Kube, &c.Datapath
	v4, v6, err := parseNodeIPs(r.nodeIP)
	if err != nil {
		return &flagError{"nodeIP", r.nodeIP, "IP addresses, at most one per family, comma separated", err}
	}
	d.NodeIPv4, d.NodeIPv6 = v4, v6
	for _, a := range []netip.Addr{v4, v6} {
		if a.IsValid() {
			k.NodeAddresses = append(k.NodeAddresses, a)
		}
	}
	if k.Namespace == "" {
		return &flagError{"namespace", k.Namespace, "a namespace name", nil}
	}
	for _, p := range []struct {
		flag, value string
		fam         ipam.Family
	}{{"cidrPools", r.cidrPools, ipam.IPv4}, {"cidr6Pools", r.cidr6Pools, ipam.IPv6}} {
		pools, err := ipam.ParsePools(p.value)
		if err != nil {
			return &flagError{p.flag, p.value, "name=CIDR or name=startIP-endIP, comma separated", err}
		}
		for _, pool := range pools {
			if pool.Family() != p.fam {
				return &flagError{p.flag, p.value, fmt.Sprintf("%s pools only (%s is %s)", p.fam, pool.Name, pool.Family()), nil}
			}
		}
		k.Pools = append(k.Pools, pools...)
	}
	if _, err := ipam.New(k.Pools, k.UniqueIP); err != nil {
		return &flagError{"cidrPools", r.cidrPools + " " + r.cidr6Pools, "pools that do not overlap and have distinct names", err}
	}
	if k.LoadBalancerClass == "" || strings.ContainsAny(k.LoadBalancerClass, " \t") {
		return &flagError{"loadBalancerClass", k.LoadBalancerClass, "a class name such as loxilb.io/loxilb", nil}
	}
	if k.DefaultMode, err = shard.ParseMode(r.lbMode); err != nil {
		return &flagError{"setLBMode", r.lbMode, "default, onearm, fullnat, dsr or 0..3", nil}
	}
	if k.Instances, err = shard.NewInstances(r.zone, r.numZones); err != nil {
		if changed("zone") {
			return &flagError{"zone", r.zone, "lowercase letters, digits and '-'", nil}
		}
		return &flagError{"numZoneInstances", strconv.Itoa(r.numZones), fmt.Sprintf("a number from 1 to %d", shard.MaxInstances), nil}
	}
	if changed("setRoles") {
		if _, err := netip.ParseAddr(r.setRoles); err != nil {
			return &flagError{"setRoles", r.setRoles, "an address, as kube-loxilb takes (0.0.0.0 for all)", nil}
		}
		k.Roles = true
	}
	k.Excluded = splitList(r.excludeRoles)
	if lease := k.MemberLease; lease.Duration < 2*time.Second || lease.Renew <= 0 || lease.Renew*2 > lease.Duration {
		return &flagError{"leaseDuration", lease.Duration.String(), "at least 2s and twice --leaseRenewInterval", nil}
	}
	switch r.leaseProtocol {
	case mastership.ProtocolMemberBound.String():
		k.LeaseProtocol = mastership.ProtocolMemberBound
	case mastership.ProtocolRenewed.String():
		k.LeaseProtocol = mastership.ProtocolRenewed
	default:
		return &flagError{"leaseProtocol", r.leaseProtocol, "member-bound or renewed", nil}
	}
	if k.MaxBackups < 0 {
		return &flagError{"maxBackups", strconv.Itoa(k.MaxBackups), "0 (every node) or more", nil}
	}
	if k.HandoverAck <= 0 {
		return &flagError{"handoverAckTimeout", k.HandoverAck.String(), "a positive duration", nil}
	}
	if k.PeerProbe.Interval < 10*time.Millisecond {
		return &flagError{"peerProbeInterval", k.PeerProbe.Interval.String(), "at least 10ms", nil}
	}
	if k.PeerProbe.Failures < 1 {
		return &flagError{"peerProbeFailures", strconv.Itoa(k.PeerProbe.Failures), "at least 1", nil}
	}
	if err := r.validateBGP(c); err != nil {
		return err
	}
	if err := r.validateInterfaces(c); err != nil {
		return err
	}
	mode, err := datapath.ParseAttachMode(r.attachMode)
	if err != nil {
		return &flagError{"attachMode", r.attachMode, "auto, tcx or tc", err}
	}
	d.AttachMode = mode
	if d.PinPath != "" && !filepath.IsAbs(d.PinPath) {
		return &flagError{"pinPath", d.PinPath, "an absolute path on bpffs", nil}
	}
	if d.SNATPortMin, d.SNATPortMax, err = parsePortRange(r.snatPorts); err != nil {
		return &flagError{"snatPorts", r.snatPorts, "MIN-MAX, ports from 1 to 65535, MIN <= MAX", err}
	}
	if d.ConntrackSize < 1024 || d.ConntrackSize > 1<<26 {
		return &flagError{"conntrackSize", strconv.Itoa(d.ConntrackSize), "a number from 1024 to 67108864", nil}
	}
	// The upper bounds keep the derived ring slots (64 per endpoint, 256 per frontend)
	// within the 2^31 entries a map takes, with room to spare.
	if d.MaxServices < 1 || d.MaxServices > 1<<22 {
		return &flagError{"maxServices", strconv.Itoa(d.MaxServices), "a number from 1 to 4194304", nil}
	}
	if d.MaxEndpoints < 1 || d.MaxEndpoints > 1<<24 {
		return &flagError{"maxEndpoints", strconv.Itoa(d.MaxEndpoints), "a number from 1 to 16777216", nil}
	}
	if err := c.LogLevel.UnmarshalText([]byte(r.logLevel)); err != nil {
		return &flagError{"logLevel", r.logLevel, "debug, info, warn or error", nil}
	}
	if c.LogFormat, err = parseLogFormat(r.logFormat); err != nil {
		return &flagError{"logFormat", r.logFormat, "text or json", nil}
	}
	switch m := kube.StopMode(r.stopMode); m {
	case kube.StopAuto, kube.StopHandover:
		k.StopMode = m
	case kube.StopRestart:
		if d.PinPath == "" || c.BGP.GracefulRestart == 0 {
			return &flagError{"stopMode", r.stopMode, "restart only with --pinPath and --bgpGracefulRestart (the datapath and the routes must outlive the process)", nil}
		}
		k.StopMode = m
	default:
		return &flagError{"stopMode", r.stopMode, "auto, restart or handover", nil}
	}
	if k.Drain < 0 || k.Drain > time.Minute {
		return &flagError{"shutdownDrain", k.Drain.String(), "a duration from 0 to 1m", nil}
	}
	if k.APIAddress != "" {
		if _, err := netip.ParseAddrPort(k.APIAddress); err != nil {
			return &flagError{"apiListen", k.APIAddress, "ADDRESS:PORT", err}
		}
	}
	return nil
}

// validateInterfaces reads --interfaces: none alone, or names and patterns that
// could match an interface name (findInterfaces matches them at start).
func (r *raw) validateInterfaces(c *config) error {
	c.Interfaces, c.NoDatapath = splitList(r.interfaces), false
	want := "interface names or path.Match patterns (eth*,bond0), comma separated, or none"
	for _, p := range c.Interfaces {
		if p == noInterfaces {
			if len(c.Interfaces) > 1 {
				return &flagError{"interfaces", r.interfaces, "none alone, or " + want, nil}
			}
			c.Interfaces, c.NoDatapath = nil, true
			return nil
		}
		if _, err := path.Match(p, ""); err != nil {
			return &flagError{"interfaces", r.interfaces, want, fmt.Errorf("%q: %w", p, err)}
		}
		// A plain name longer than the kernel's IFNAMSIZ-1 can never match.
		plain := !strings.ContainsAny(p, `*?[\`)
		if (plain && len(p) > 15) || strings.ContainsAny(p, "/ \t") {
			return &flagError{"interfaces", r.interfaces, want, nil}
		}
	}
	return nil
}

// splitList reads a comma separated flag: nil when empty, blanks trimmed.
func splitList(s string) []string {
	var out []string
	for _, e := range strings.Split(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

func (r *raw) validateBGP(c *config) error {
	b := &c.BGP
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
	if g := b.GracefulRestart; g < 0 || g > 4095*time.Second || g%time.Second != 0 {
		return &flagError{"bgpGracefulRestart", g.String(), "whole seconds from 0 (off) to 4095s", nil}
	}
	if b.HoldTime < 3*time.Second || b.HoldTime%time.Second != 0 {
		return &flagError{"bgpHoldTime", b.HoldTime.String(), "whole seconds, at least 3s", nil}
	}
	if b.KeepaliveInterval < time.Second || b.KeepaliveInterval > b.HoldTime/3 {
		return &flagError{"bgpKeepalive", b.KeepaliveInterval.String(), "at least 1s and at most a third of the hold time", nil}
	}
	if b.PeerWait < 0 {
		return &flagError{"bgpPeerWait", b.PeerWait.String(), "a duration, 0 or more", nil}
	}
	if b.BFD, err = parseBFD(r.bfd); err != nil {
		return &flagError{"bgpBFD", r.bfd, "INTERVAL,MULTIPLIER such as 300ms,3, or off", err}
	}
	if b.PasswordFile != "" {
		if _, err := os.Stat(b.PasswordFile); err != nil {
			return &flagError{"bgpPasswordFile", b.PasswordFile, "a readable file", err}
		}
	}
	b.Communities = splitList(r.communities)
	if b.LocalPrefMaster <= b.LocalPrefBackup {
		return &flagError{"bgpLocalPrefMaster", strconv.FormatUint(uint64(b.LocalPrefMaster), 10), "more than --bgpLocalPrefBackup", nil}
	}
	if b.MEDMaster >= b.MEDBackup {
		return &flagError{"bgpMEDMaster", strconv.FormatUint(uint64(b.MEDMaster), 10), "less than --bgpMEDBackup", nil}
	}
	if b.LocalPrefSuccessor <= b.LocalPrefBackup || b.LocalPrefSuccessor >= b.LocalPrefMaster {
		return &flagError{"bgpLocalPrefSuccessor", strconv.FormatUint(uint64(b.LocalPrefSuccessor), 10), "more than --bgpLocalPrefBackup and less than --bgpLocalPrefMaster", nil}
	}
	if b.MEDSuccessor < b.MEDMaster || b.MEDSuccessor > b.MEDBackup {
		return &flagError{"bgpMEDSuccessor", strconv.FormatUint(uint64(b.MEDSuccessor), 10), "between --bgpMEDMaster and --bgpMEDBackup", nil}
	}
	if b.SuccessorPrepend > b.BackupPrepend {
		return &flagError{"bgpSuccessorPrepend", strconv.FormatUint(uint64(b.SuccessorPrepend), 10), "at most --bgpBackupPrepend", nil}
	}
	if b.GRPCListen != "" {
		if _, err := netip.ParseAddrPort(b.GRPCListen); err != nil {
			return &flagError{"bgpAPIListen", b.GRPCListen, "ADDRESS:PORT or empty", err}
		}
	}
	b.RouterID = c.Datapath.NodeIPv4
	// An IPv6 VIP announced over an IPv4 session needs an IPv6 next hop of its own.
	b.NextHop6 = c.Datapath.NodeIPv6
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

// formatBFD writes c as --bgpBFD takes it.
func formatBFD(c bgp.BFDConfig) string {
	if !c.Enabled {
		return "off"
	}
	return fmt.Sprintf("%v,%d", c.Interval, c.Multiplier)
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

// parsePortRange reads MIN-MAX (or one port) as a port range.
func parsePortRange(s string) (lo, hi uint16, err error) {
	a, b, ok := strings.Cut(strings.TrimSpace(s), "-")
	if !ok {
		b = a
	}
	x, err := strconv.ParseUint(strings.TrimSpace(a), 10, 16)
	if err != nil {
		return 0, 0, err
	}
	y, err := strconv.ParseUint(strings.TrimSpace(b), 10, 16)
	if err != nil {
		return 0, 0, err
	}
	if x == 0 || x > y {
		return 0, 0, fmt.Errorf("%d-%d is not a range of ports", x, y)
	}
	return uint16(x), uint16(y), nil
}
