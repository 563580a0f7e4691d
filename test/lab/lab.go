package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/shardlb/shardlb/internal/labsys"
	"github.com/shardlb/shardlb/test/frr"
	"github.com/shardlb/shardlb/test/kubeapi"
)

// Names and addresses. Everything the lab creates starts with prefix, so that a lab
// left over by a crashed run is found and removed. Only the management bridge and its
// veth ends live in the root namespace (the apiserver listens there); the rest is in
// the lab's own namespaces.
const (
	prefix    = "slblab-"
	bridge    = prefix + "br"           // root namespace: apiserver side of the management network
	lockPath  = "/run/shardlb-lab.lock" // held while a lab runs
	asn       = 64512                   // one AS: the nodes are the router's iBGP neighbours
	vipPort   = 57002                   // the guide's service port
	namespace = "default"               // where the guide's Services and Pods go
	lbSystem  = "kube-system"           // shardlb's namespace (Leases, ServiceAccount)
)

var (
	mgmtGateway = netip.MustParseAddr("198.51.100.1") // apiserver; nodes are .11, .12, ...
	routerLAN   = netip.MustParseAddr("10.80.0.1")    // nodes .11.., pods .101..
	routerCli   = netip.MustParseAddr("203.0.113.1")
	clientAddr  = netip.MustParseAddr("203.0.113.10")
)

// The IPv6 side of a dual-stack lab (Options.DualStack), unique local addresses
// numbered as the IPv4 ones.
var (
	routerLAN6  = netip.MustParseAddr("fd00:80::1") // nodes ::11.., pods ::101..
	routerCli6  = netip.MustParseAddr("fd00:113::1")
	clientAddr6 = netip.MustParseAddr("fd00:113::10")
)

// vipPool6 is the nodes' IPv6 VIP pool in a dual-stack lab: the first VIP is
// fd00:96::250, as the IPv4 pool's is 192.168.80.250.
const vipPool6 = "defaultPool6=fd00:96::250/120"

// Options configure a lab; zero values are the guide's setup.
type Options struct {
	// Nodes is the number of shardlb nodes (default 3).
	Nodes int
	// Shardlb is a built shardlb binary; "" builds ./cmd/shardlb into the lab dir.
	Shardlb string
	// Log receives progress lines; nil discards them.
	Log io.Writer
	// Keep leaves the lab directory (logs, configs) in place after Close.
	Keep bool
	// BFD, when set, replaces the BFD timers of the router and the nodes (100 ms x 3,
	// the manifest's).
	BFD frr.BFDTimers
	// MaxBackups is every node's --maxBackups (0: unset, every node announces).
	MaxBackups int
	// AttachMode is every node's --attachMode ("": unset, auto).
	AttachMode string
	// GracefulRestart is every node's --bgpGracefulRestart, with graceful restart on
	// the router too; 0: off on both sides, so that a crash fails over by route
	// withdrawal (what the failover tests and benchmarks measure).
	GracefulRestart time.Duration
	// DualStack gives the router, the nodes, the pods and the client an IPv6 address
	// beside the IPv4 one (fd00:80::/64 on the LAN, fd00:113::/64 toward the client),
	// forwards IPv6 in the router and the nodes, activates IPv6 unicast on the
	// router's IPv4 sessions (MP-BGP: the nodes announce IPv6 VIPs with their IPv6
	// address as next hop), gives the nodes an IPv6 VIP pool (vipPool6) and the
	// apiserver a dual-stack service range. Off: the guide's IPv4 lab.
	DualStack bool
}

// Lab is the whole system on one machine: an FRR router, a kube-apiserver with etcd,
// shardlb nodes, nginx pods and a client, each in its own network namespace.
//
//	client 203.0.113.10 -- router (FRR) -- LAN 10.80.0.0/24 bridge -- node1..3 .11-.13 (shardlb)
//	                                                          \---- pods .101..  (nginx)
//	root namespace: kube-apiserver 198.51.100.1 -- bridge -- node1..3 mgmt .11-.13
type Lab struct {
	opts Options
	Dir  string
	log  io.Writer

	lock   *os.File
	Router *frr.Router
	API    *kubeapi.Server
	Kube   kubernetes.Interface
	client *client
	nodes  []*node

	mu      sync.Mutex
	pods    map[string]*backend // by Pod name
	nextPod int

	nodeKubeconfig string
	shardlb        string
	caps           []string // the DaemonSet's capabilities, for the nodes
	nodeArgs       []string // the DaemonSet's args

	closed bool
}

func (l *Lab) logf(format string, args ...any) {
	if l.log != nil {
		fmt.Fprintf(l.log, format+"\n", args...)
	}
}

// ErrBusy: another lab holds the lock.
var ErrBusy = errors.New("another lab is running on this machine")

// Start builds the topology, starts FRR, the apiserver and the client side, and
// prepares the nodes' credentials; StartNodes then starts shardlb. On error
// everything started is removed again.
func Start(ctx context.Context, o Options) (_ *Lab, err error) {
	if o.Nodes == 0 {
		o.Nodes = 3
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("the lab needs root (network namespaces, eBPF, FRR)")
	}
	l := &Lab{opts: o, log: o.Log, pods: map[string]*backend{}}
	if err := l.acquire(ctx); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	removeStale()
	if l.Dir, err = os.MkdirTemp("", prefix); err != nil {
		return nil, err
	}
	// FRR and nginx workers run as other users and must reach their files.
	if err := os.Chmod(l.Dir, 0o755); err != nil {
		return nil, err
	}
	l.logf("lab directory %s", l.Dir)
	// The nodes pin their datapaths here (--pinPath), as the DaemonSet does in the
	// host's /sys/fs/bpf: a restarted node adopts its maps instead of allocating them.
	if _, err := labsys.Sh("mkdir", "-p", l.bpffs()); err != nil {
		return nil, err
	}
	if _, err := labsys.Sh("mount", "-t", "bpf", "bpf", l.bpffs()); err != nil {
		return nil, fmt.Errorf("mount bpffs: %w", err)
	}
	if err := l.topology(); err != nil {
		return nil, fmt.Errorf("topology: %w", err)
	}
	var neighbors []frr.Neighbor
	for i := range o.Nodes {
		neighbors = append(neighbors, frr.Neighbor{Addr: nodeLAN(i), ASN: asn, BFD: true})
	}
	l.logf("starting FRR (zebra, bgpd, bfdd) in %s", routerNS)
	l.Router, err = frr.Start(ctx, routerNS, frr.Config{
		ASN: asn, RouterID: routerLAN, Neighbors: neighbors,
		BFD: l.bfd(), GracefulRestart: o.GracefulRestart > 0, IPv6Unicast: o.DualStack,
	})
	if err != nil {
		return nil, fmt.Errorf("FRR: %w", err)
	}
	l.logf("starting etcd and kube-apiserver on %s", mgmtGateway)
	var apiArgs []string
	if o.DualStack {
		// Without an IPv6 service range the apiserver refuses dual-stack Services.
		apiArgs = []string{"--service-cluster-ip-range", "10.96.0.0/16,fd00:10:96::/112"}
	}
	l.API, err = kubeapi.Start(ctx, kubeapi.Options{BindAddress: mgmtGateway, Dir: filepath.Join(l.Dir, "kube"), ExtraArgs: apiArgs})
	if err != nil {
		return nil, err
	}
	if l.Kube, err = l.API.Client(); err != nil {
		return nil, err
	}
	if l.client, err = newClient(clientNS); err != nil {
		return nil, err
	}
	if err := l.installShardlbIdentity(ctx); err != nil {
		return nil, fmt.Errorf("shardlb's ServiceAccount and RBAC: %w", err)
	}
	return l, nil
}

// Namespace names.
const (
	routerNS = prefix + "router"
	clientNS = prefix + "client"
)

func nodeNS(i int) string                { return fmt.Sprintf("%snode%d", prefix, i+1) }
func nodeName(i int) string              { return fmt.Sprintf("node%d", i+1) }
func nodeLAN(i int) netip.Addr           { return netip.AddrFrom4([4]byte{10, 80, 0, byte(11 + i)}) }
func nodeMgmt(i int) netip.Addr          { return netip.AddrFrom4([4]byte{198, 51, 100, byte(11 + i)}) }
func podAddr(i int) netip.Addr           { return netip.AddrFrom4([4]byte{10, 80, 0, byte(101 + i)}) }
func podNS(i int) string                 { return fmt.Sprintf("%spod%d", prefix, i+1) }
func cidr(a netip.Addr, bits int) string { return netip.PrefixFrom(a, bits).String() }

// nodeLAN6 and podAddr6 are the IPv6 addresses of a dual-stack lab: fd00:80::11 for
// node 1 and fd00:80::101 for the first pod, as 10.80.0.11 and 10.80.0.101.
func nodeLAN6(i int) netip.Addr {
	return netip.AddrFrom16([16]byte{0xfd, 0, 0, 0x80, 15: byte(0x11 + i)})
}
func podAddr6(i int) netip.Addr {
	return netip.AddrFrom16([16]byte{0xfd, 0, 0, 0x80, 14: 0x01, 15: byte(0x01 + i)})
}

// hostPrefix is the route of one address: /32 or /128.
func hostPrefix(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

// addr6 adds an IPv6 address in namespace ns without duplicate address detection,
// which would keep it unusable for a second or two.
func addr6(s *labsys.Script, ns string, a netip.Addr, dev string) {
	s.Run("ip", "-n", ns, "-6", "addr", "add", cidr(a, 64), "dev", dev, "nodad")
}

// topology creates the namespaces, the LAN bridge in the router, the client link and
// the management bridge in the root namespace.
func (l *Lab) topology() error {
	for _, ns := range []string{routerNS, clientNS} {
		if err := labsys.AddNetNS(ns, ns == routerNS); err != nil {
			return err
		}
	}
	var s labsys.Script
	s.Run("ip", "-n", routerNS, "link", "add", "lan", "type", "bridge")
	s.Run("ip", "-n", routerNS, "addr", "add", cidr(routerLAN, 24), "dev", "lan")
	if l.opts.DualStack {
		s.In(routerNS, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
		addr6(&s, routerNS, routerLAN6, "lan")
	}
	s.Run("ip", "-n", routerNS, "link", "set", "lan", "up")
	if s.Err != nil {
		return s.Err
	}
	if err := labsys.Veth(routerNS, "cli", clientNS, "eth0"); err != nil {
		return err
	}
	s.Run("ip", "-n", routerNS, "addr", "add", cidr(routerCli, 24), "dev", "cli")
	s.Run("ip", "-n", clientNS, "addr", "add", cidr(clientAddr, 24), "dev", "eth0")
	s.Run("ip", "-n", clientNS, "route", "add", "default", "via", routerCli.String())
	if l.opts.DualStack {
		addr6(&s, routerNS, routerCli6, "cli")
		addr6(&s, clientNS, clientAddr6, "eth0")
		s.Run("ip", "-n", clientNS, "-6", "route", "add", "default", "via", routerCli6.String())
	}

	s.Run("ip", "link", "add", bridge, "type", "bridge")
	s.Run("ip", "addr", "add", cidr(mgmtGateway, 24), "dev", bridge)
	s.Run("ip", "link", "set", bridge, "up")
	if s.Err != nil {
		return s.Err
	}
	for i := range l.opts.Nodes {
		ns := nodeNS(i)
		if err := labsys.AddNetNS(ns, true); err != nil {
			return err
		}
		port := fmt.Sprintf("node%d", i+1)
		if err := labsys.Veth(routerNS, port, ns, "eth0"); err != nil {
			return err
		}
		s.Run("ip", "-n", routerNS, "link", "set", port, "master", "lan")
		// A NIC drops frames for other MACs; a veth hands them to the tc hook, where
		// the node's eBPF program would see traffic the bridge floods when another
		// node's port goes down. No unknown-unicast flooding toward nodes keeps a
		// link cut what it is on real hardware.
		s.In(routerNS, "bridge", "link", "set", "dev", port, "flood", "off")
		s.Run("ip", "-n", ns, "addr", "add", cidr(nodeLAN(i), 24), "dev", "eth0")
		s.Run("ip", "-n", ns, "route", "add", "default", "via", routerLAN.String())
		if l.opts.DualStack {
			// The datapath's route lookups (bpf_fib_lookup) need forwarding on, as
			// for IPv4.
			s.In(ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
			addr6(&s, ns, nodeLAN6(i), "eth0")
			s.Run("ip", "-n", ns, "-6", "route", "add", "default", "via", routerLAN6.String())
		}
		mgmt := fmt.Sprintf("%sm%d", prefix, i+1)
		if s.Err != nil {
			return s.Err
		}
		if err := labsys.Veth("", mgmt, ns, "mgmt"); err != nil {
			return err
		}
		s.Run("ip", "link", "set", mgmt, "master", bridge)
		s.Run("ip", "-n", ns, "addr", "add", cidr(nodeMgmt(i), 24), "dev", "mgmt")
	}
	return s.Err
}

// acquire takes the machine-wide lab lock, waiting while another lab (this one's, or
// the node stack's) holds it, until ctx ends; the kernel drops it when the process
// dies, so whatever carries the prefix while we hold it is left over from a dead run.
func (l *Lab) acquire(ctx context.Context) error {
	f, err := os.OpenFile(lockPath, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	for waiting := false; ; {
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err == nil {
			break
		}
		pid, _ := os.ReadFile(lockPath)
		if !waiting {
			l.logf("waiting for the lab of pid %s to finish (%s)", strings.TrimSpace(string(pid)), lockPath)
			waiting = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return fmt.Errorf("%w (pid %s; lock %s): %w", ErrBusy, strings.TrimSpace(string(pid)), lockPath, ctx.Err())
		case <-time.After(time.Second):
		}
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(fmt.Sprintf("%d\n", os.Getpid())), 0)
	l.lock = f
	return nil
}

// bfd is the lab's BFD timers, on the router and the nodes.
func (l *Lab) bfd() frr.BFDTimers {
	if l.opts.BFD.Interval > 0 {
		return l.opts.BFD
	}
	return frr.BFDTimers{Interval: 100 * time.Millisecond, Multiplier: 3}
}

// bpffs is the lab's own bpffs mount, holding each node's pinned datapath.
func (l *Lab) bpffs() string { return filepath.Join(l.Dir, "bpf") }

// removeStale deletes namespaces, root-namespace links and bpffs mounts a crashed lab
// left behind, killing what still runs in those namespaces.
func removeStale() {
	if mounts, err := os.ReadFile("/proc/self/mounts"); err == nil {
		for _, line := range strings.Split(string(mounts), "\n") {
			if f := strings.Fields(line); len(f) > 2 && f[2] == "bpf" && strings.Contains(f[1], "/"+prefix) {
				_, _ = labsys.Sh("umount", f[1])
			}
		}
	}
	for _, ns := range labsys.ListNetNS(prefix) {
		_ = labsys.DeleteNetNS(ns)
	}
	out, _ := labsys.Sh("ip", "-o", "link", "show")
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if strings.HasPrefix(name, prefix) {
			_, _ = labsys.Sh("ip", "link", "del", name)
		}
	}
}

// Close stops everything the lab started, by PID, in the reverse order of start, and
// removes its namespaces, links and (unless Keep) its directory. Safe to call twice.
func (l *Lab) Close() {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	l.mu.Unlock()
	for _, n := range l.nodes {
		if n.proc != nil {
			n.proc.Stop(10 * time.Second)
		}
	}
	for _, b := range l.pods {
		if b.proc != nil {
			b.proc.Stop(3 * time.Second)
		}
	}
	if l.client != nil {
		l.client.close()
	}
	if l.API != nil {
		_ = l.API.Stop()
	}
	if l.Router != nil {
		if l.opts.Keep && l.Dir != "" {
			_ = os.WriteFile(filepath.Join(l.Dir, "router.log"), []byte(l.Router.Logs()), 0o644)
		}
		l.Router.Stop()
	}
	for _, ns := range labsys.ListNetNS(prefix) {
		_ = labsys.DeleteNetNS(ns)
	}
	_, _ = labsys.Sh("ip", "link", "del", bridge)
	removeStale()
	if l.Dir != "" {
		_, _ = labsys.Sh("umount", l.bpffs())
	}
	if l.Dir != "" && !l.opts.Keep {
		_ = os.RemoveAll(l.Dir)
	}
	if l.lock != nil {
		_ = l.lock.Close()
	}
}
