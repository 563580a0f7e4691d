// Package nodestack runs shardlb as an operator does, on a node stack made of the real
// parts (test level 6 in DESIGN.md): kube-apiserver, kube-controller-manager and
// kube-scheduler, and per node a containerd (runc, the CNI bridge and host-local
// plugins) and a kubelet, each node in its own network namespace, mount namespace and
// cgroup, so several nodes share one machine. shardlb is the DaemonSet of
// `kubectl apply -k test/nodestack/overlay`, from the image `make image` builds; the backends
// are Deployments whose EndpointSlices the controller-manager writes; an FRR router
// peers with every node and a client fetches the VIPs through it.
//
//	client 203.0.113.10 -- router (FRR) -- LAN 10.80.0.0/24 -- node1..3 .11-.13
//	                          |                                  cni0 10.244.N.1/24: pods
//	                          +-- 100.64.213.0/30 -- root namespace: kube-apiserver .1,
//	                                                 controller-manager, scheduler
//
// The apiserver and the kubelets reach each other through the router, as on a real
// network. No kube-proxy runs: each node DNATs the kubernetes Service's ClusterIP
// (10.96.0.1:443, the in-cluster address shardlb's pods are given) to the apiserver
// with one nftables rule. Every node's mount namespace has its own bpffs on
// /sys/fs/bpf and its own /run/containerd, so pinned datapaths and shim sockets do
// not meet; its cgroups live under /nsl-nodeN (the kubelet's cgroupRoot), where
// Close finds every process left, kills it by PID and removes the cgroups.
//
// What the real parts needed beyond the manifest (kept in the lab, or written down for
// operators in docs/install.md):
//   - The kubelet runs on cgroup v1 here (hybrid mounts): failCgroupV1: false.
//   - This machine's root lacks CAP_SYS_RESOURCE, so runc cannot lower a container's
//     oom_score_adj (the kubelet asks -998 for sandboxes and critical pods): containerd
//     runs with restrict_oom_score_adj, as a rootless one does.
//   - Replies of a node's own pods come back on the CNI bridge, not on eth0: the
//     overlay's --interfaces=eth0,cni0, and cni0 made with the node, since shardlb
//     matches interface patterns at start and the bridge plugin makes its bridge only
//     with the first pod. Without it half the new connections of a service whose
//     master runs one of its two pods time out.
//   - No registry: the images (shardlb from make image, pause and backend from make
//     lab-images) are imported into each containerd; the pod sandbox image is the
//     lab's pause.
//   - The apiserver reaches the kubelets by their InternalIP (their hostnames resolve
//     nowhere) and admits Pods with the ServiceAccount plugin, so shardlb's pods get a
//     token for the in-cluster configuration.
//
// Times on the 2-core VM: the kubelet, scheduler, controller-manager and kubectl
// build once (hack/k8s-binaries.sh, one go build) in 10 minutes after the
// apiserver's build, whose packages they share; the stack starts in about 20 s (three
// nodes Ready) and the whole test, make image and lab-images warm, takes about 2
// minutes (the dsr steps about 65 s of them) plus the wait for a running lab's lock. It runs
// alone, after test/lab, in make test (make nodestack). make demo runs the guide on
// the same stack (test/nodestack/demo) and prints what the guide prints.
package nodestack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
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

// Names and addresses. Everything the stack creates in the root namespace or the
// cgroup tree starts with prefix, so a stack left over by a crashed run is found and
// removed.
const (
	prefix   = "nsl-"
	routerNS = prefix + "router"
	clientNS = prefix + "client"
	apiLink  = prefix + "api"                // root namespace end of the link to the router
	lockPath = "/run/shardlb-lab.lock"       // shared with test/lab: one lab at a time
	asn      = 64512                         // the guide's AS: the nodes are iBGP neighbours
	k8sDir   = "k8s-" + kubeapi.Version      // under the cache: the Kubernetes binaries
	podNet   = "10.244.0.0/16"               // node N's pods: 10.244.N.0/24
	apiSvcIP = "10.96.0.1"                   // the kubernetes Service's ClusterIP
	labImage = "lab.shardlb.io"              // repository of the lab's pause and backend images
	labTag   = "v1"                          // their tag (make lab-images)
	dsImage  = "ghcr.io/shardlb/shardlb:lab" // the image test/nodestack/overlay names
)

var (
	apiAddr    = netip.MustParseAddr("100.64.213.1")
	routerUp   = netip.MustParseAddr("100.64.213.2")
	routerLAN  = netip.MustParseAddr("10.80.0.1")
	routerCli  = netip.MustParseAddr("203.0.113.1")
	ClientAddr = netip.MustParseAddr("203.0.113.10")
)

func nodeName(i int) string    { return fmt.Sprintf("node%d", i+1) }
func nodeNS(i int) string      { return fmt.Sprintf("%snode%d", prefix, i+1) }
func nodeLAN(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 80, 0, byte(11 + i)}) }
func podCIDR(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24)
}
func cidr(a netip.Addr, bits int) string { return netip.PrefixFrom(a, bits).String() }

// Options configure a stack; zero values are the guide's three nodes.
type Options struct {
	Nodes int
	// Root is the repository (manifest/, bin/image/); "" finds it with go env GOMOD.
	Root string
	// Bins holds the Kubernetes binaries; "" is kubeapi.DefaultBinDir().
	Bins string
	// Log receives progress lines; nil discards them.
	Log io.Writer
	// Keep leaves the stack's directory (logs, configurations) after Close.
	Keep bool
}

// Stack is a running cluster of real Kubernetes parts on this machine.
type Stack struct {
	opts   Options
	Dir    string
	Router *frr.Router
	API    *kubeapi.Server
	Kube   kubernetes.Interface
	Nodes  []*Node

	lock    *os.File
	control []*labsys.Proc // controller-manager, scheduler
	mu      sync.Mutex
	closed  bool
}

func (s *Stack) logf(format string, args ...any) {
	if s.opts.Log != nil {
		fmt.Fprintf(s.opts.Log, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05.000")}, args...)...)
	}
}

// Start builds the topology and starts FRR, the control plane and every node's
// containerd and kubelet, with the images imported, and returns once every Node is
// Ready. On error everything started is removed again.
func Start(ctx context.Context, o Options) (_ *Stack, err error) {
	if o.Nodes == 0 {
		o.Nodes = 3
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("the node stack needs root (namespaces, cgroups, containerd, eBPF, FRR)")
	}
	if o.Root == "" {
		if o.Root, err = moduleRoot(); err != nil {
			return nil, err
		}
	}
	if o.Bins == "" {
		o.Bins = kubeapi.DefaultBinDir()
	}
	if err := checkTools(o); err != nil {
		return nil, err
	}
	s := &Stack{opts: o}
	if err := s.acquire(ctx); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	removeStale("")
	if s.Dir, err = os.MkdirTemp("", prefix); err != nil {
		return nil, err
	}
	// FRR runs as frr and must reach its directory.
	if err := os.Chmod(s.Dir, 0o755); err != nil {
		return nil, err
	}
	s.logf("stack directory %s", s.Dir)
	if err := s.topology(); err != nil {
		return nil, fmt.Errorf("topology: %w", err)
	}
	var neighbors []frr.Neighbor
	for i := range o.Nodes {
		neighbors = append(neighbors, frr.Neighbor{Addr: nodeLAN(i), ASN: asn, BFD: true})
	}
	s.logf("starting FRR in %s", routerNS)
	// BFD as the manifest's --bgpBFD: 100 ms x 3.
	s.Router, err = frr.Start(ctx, routerNS, frr.Config{ASN: asn, RouterID: routerLAN, Neighbors: neighbors,
		BFD: frr.BFDTimers{Interval: 100 * time.Millisecond, Multiplier: 3}})
	if err != nil {
		return nil, fmt.Errorf("FRR: %w", err)
	}
	s.logf("starting etcd and kube-apiserver on %s", apiAddr)
	s.API, err = kubeapi.Start(ctx, kubeapi.Options{BindAddress: apiAddr, Dir: filepath.Join(s.Dir, "kube"),
		BinDir: o.Bins, ServiceAccountAdmission: true,
		// The kubelets' InternalIP: their hostnames resolve nowhere.
		ExtraArgs: []string{"--kubelet-preferred-address-types=InternalIP"}})
	if err != nil {
		return nil, err
	}
	if s.Kube, err = s.API.Client(); err != nil {
		return nil, err
	}
	if err := s.startControlPlane(); err != nil {
		return nil, err
	}
	for i := range o.Nodes {
		n, err := s.startNode(ctx, i)
		if n != nil {
			s.Nodes = append(s.Nodes, n)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", nodeName(i), err)
		}
	}
	if err := s.waitNodesReady(ctx, 3*time.Minute); err != nil {
		return nil, err
	}
	s.logf("%d nodes Ready", len(s.Nodes))
	return s, nil
}

// checkTools names the first missing binary, image or tool, and how to get it.
func checkTools(o Options) error {
	for _, b := range []string{"kube-apiserver", "etcd", "kubelet", "kube-controller-manager", "kube-scheduler", "kubectl"} {
		if _, err := os.Stat(filepath.Join(o.Bins, b)); err != nil {
			return fmt.Errorf("%s missing in %s: run make k8s-bins", b, o.Bins)
		}
	}
	for _, f := range []string{"shardlb.tar", "lab/pause.tar", "lab/backend.tar"} {
		if _, err := os.Stat(filepath.Join(o.Root, "bin/image", f)); err != nil {
			return fmt.Errorf("bin/image/%s missing: run make image lab-images", f)
		}
	}
	for _, t := range []string{"containerd", "containerd-shim-runc-v2", "runc", "ctr", "nsenter", "unshare", "nft", "ethtool", "/usr/lib/cni/bridge", "/usr/lib/cni/host-local", "/usr/lib/cni/loopback"} {
		if _, err := exec.LookPath(t); err != nil {
			return fmt.Errorf("%s missing: run make deps (Debian containerd, runc, containernetworking-plugins, nftables)", t)
		}
	}
	return nil
}

// moduleRoot is the directory of shardlb's go.mod.
func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	gomod := strings.TrimSpace(string(out))
	if err != nil || gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("find the shardlb module (run from inside the repository): %v", err)
	}
	return filepath.Dir(gomod), nil
}

// acquire takes the machine-wide lab lock, which test/lab takes too: both want FRR's
// BFD and the CPUs to themselves. It waits for a running lab to finish.
func (s *Stack) acquire(ctx context.Context) error {
	f, err := os.OpenFile(lockPath, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	waiting := false
	for {
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err == nil {
			break
		}
		if !waiting {
			pid, _ := os.ReadFile(lockPath)
			s.logf("waiting for the lab of pid %s to finish (%s)", strings.TrimSpace(string(pid)), lockPath)
			waiting = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return fmt.Errorf("lab lock %s: %w", lockPath, ctx.Err())
		case <-time.After(time.Second):
		}
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt(fmt.Appendf(nil, "%d\n", os.Getpid()), 0)
	s.lock = f
	return nil
}

// topology creates the router, client and node namespaces, the LAN, and the link
// between the root namespace (the control plane) and the router.
func (s *Stack) topology() error {
	for _, ns := range []string{routerNS, clientNS} {
		if err := labsys.AddNetNS(ns, ns == routerNS); err != nil {
			return err
		}
	}
	var sc labsys.Script
	sc.Run("ip", "-n", routerNS, "link", "add", "lan", "type", "bridge")
	sc.Run("ip", "-n", routerNS, "addr", "add", cidr(routerLAN, 24), "dev", "lan")
	sc.Run("ip", "-n", routerNS, "link", "set", "lan", "up")
	if sc.Err != nil {
		return sc.Err
	}
	if err := labsys.Veth(routerNS, "cli", clientNS, "eth0"); err != nil {
		return err
	}
	sc.Run("ip", "-n", routerNS, "addr", "add", cidr(routerCli, 24), "dev", "cli")
	sc.Run("ip", "-n", clientNS, "addr", "add", cidr(ClientAddr, 24), "dev", "eth0")
	sc.Run("ip", "-n", clientNS, "route", "add", "default", "via", routerCli.String())
	if sc.Err != nil {
		return sc.Err
	}
	if err := labsys.Veth("", apiLink, routerNS, "api"); err != nil {
		return err
	}
	sc.Run("ip", "addr", "add", cidr(apiAddr, 30), "dev", apiLink)
	sc.Run("ip", "-n", routerNS, "addr", "add", cidr(routerUp, 30), "dev", "api")
	// The root namespace reaches the nodes (the apiserver calls the kubelets for exec
	// and logs) through the router; the route goes with the link.
	sc.Run("ip", "route", "add", "10.80.0.0/24", "via", routerUp.String(), "dev", apiLink)
	for i := range s.opts.Nodes {
		ns := nodeNS(i)
		if sc.Err != nil {
			return sc.Err
		}
		if err := labsys.AddNetNS(ns, true); err != nil {
			return err
		}
		port := fmt.Sprintf("node%d", i+1)
		if err := labsys.Veth(routerNS, port, ns, "eth0"); err != nil {
			return err
		}
		sc.Run("ip", "-n", routerNS, "link", "set", port, "master", "lan")
		// As in test/lab: no unknown-unicast flooding toward nodes, so a node's eBPF
		// program sees only what a NIC would give it.
		sc.In(routerNS, "bridge", "link", "set", "dev", port, "flood", "off")
		sc.Run("ip", "-n", ns, "addr", "add", cidr(nodeLAN(i), 24), "dev", "eth0")
		sc.Run("ip", "-n", ns, "route", "add", "default", "via", routerLAN.String())
		// The pod bridge exists before any pod, as the CNI bridge plugin then finds it:
		// shardlb matches --interfaces (eth0,cni0 in the lab's overlay) at start, and
		// the plugin would create the bridge only with the first pod.
		sc.In(ns, "ip", "link", "add", "cni0", "type", "bridge")
		sc.In(ns, "ip", "addr", "add", netip.PrefixFrom(podCIDR(i).Addr().Next(), 24).String(), "dev", "cni0")
		sc.In(ns, "ip", "link", "set", "dev", "cni0", "up")
		// Pod ranges are routed to their nodes, by the router and by every other node.
		sc.Run("ip", "-n", routerNS, "route", "add", podCIDR(i).String(), "via", nodeLAN(i).String())
		for j := range s.opts.Nodes {
			if j != i {
				sc.Run("ip", "-n", ns, "route", "add", podCIDR(j).String(), "via", nodeLAN(j).String())
			}
		}
	}
	return sc.Err
}

// startControlPlane runs kube-controller-manager and kube-scheduler in the root
// namespace with the admin's credentials.
func (s *Stack) startControlPlane() error {
	kc := s.API.Kubeconfig()
	dir := s.API.Dir()
	cm, err := labsys.StartProc("kube-controller-manager", filepath.Join(s.Dir, "controller-manager.log"),
		filepath.Join(s.opts.Bins, "kube-controller-manager"),
		"--kubeconfig="+kc, "--authentication-kubeconfig="+kc, "--authorization-kubeconfig="+kc,
		"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
		// Publishes kube-root-ca.crt in every namespace: the CA in a Pod's token volume.
		"--root-ca-file="+filepath.Join(dir, "ca.crt"),
		"--service-account-private-key-file="+filepath.Join(dir, "sa.key"),
		"--use-service-account-credentials=false",
		"--cluster-cidr="+podNet, "--allocate-node-cidrs=false",
		"--v=1")
	if err != nil {
		return err
	}
	s.control = append(s.control, cm)
	sched, err := labsys.StartProc("kube-scheduler", filepath.Join(s.Dir, "scheduler.log"),
		filepath.Join(s.opts.Bins, "kube-scheduler"),
		"--kubeconfig="+kc, "--authentication-kubeconfig="+kc, "--authorization-kubeconfig="+kc,
		"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0", "--v=1")
	if err != nil {
		return err
	}
	s.control = append(s.control, sched)
	return nil
}

// removeStale deletes what a crashed stack left: node processes and cgroups, mount
// namespaces, network namespaces and the root namespace's link.
func removeStale(keep string) {
	hs, _ := hierarchies()
	for _, h := range hs {
		entries, _ := os.ReadDir(h)
		for _, e := range entries {
			if e.IsDir() && strings.HasPrefix(e.Name(), prefix) {
				_ = removeCgroup("/" + e.Name())
			}
		}
	}
	if mounts, err := os.ReadFile("/proc/self/mounts"); err == nil {
		lines := strings.Split(string(mounts), "\n")
		for i := len(lines) - 1; i >= 0; i-- {
			if f := strings.Fields(lines[i]); len(f) > 2 && strings.HasPrefix(f[1], filepath.Join(os.TempDir(), prefix)) {
				_, _ = labsys.Sh("umount", "-l", f[1])
			}
		}
	}
	for _, ns := range labsys.ListNetNS(prefix) {
		_ = labsys.DeleteNetNS(ns)
	}
	_, _ = labsys.Sh("ip", "link", "del", apiLink)
	// Directories of stacks killed before Close, or kept, and their routers'.
	for _, pattern := range []string{prefix + "*", "frr-" + routerNS + "-*"} {
		dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), pattern))
		for _, d := range dirs {
			if d != keep {
				_ = os.RemoveAll(d)
			}
		}
	}
}

// keptDir is the directory Close leaves: Dir with Keep, else none.
func (s *Stack) keptDir() string {
	if s.opts.Keep {
		return s.Dir
	}
	return ""
}

// Close stops everything the stack started, by PID, and removes its namespaces,
// cgroups, mounts and (unless Keep) its directory. Safe to call twice.
func (s *Stack) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	s.mu.Unlock()
	for _, n := range s.Nodes {
		n.stop()
	}
	for i := len(s.control) - 1; i >= 0; i-- {
		s.control[i].Stop(5 * time.Second)
	}
	if s.API != nil {
		_ = s.API.Stop()
	}
	if s.Router != nil {
		if s.opts.Keep && s.Dir != "" {
			_ = os.WriteFile(filepath.Join(s.Dir, "router.log"), []byte(s.Router.Logs()), 0o644)
		}
		s.Router.Stop()
	}
	removeStale(s.keptDir())
	if s.lock != nil {
		_ = s.lock.Close()
	}
}
