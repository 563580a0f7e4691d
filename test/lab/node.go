package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/shardlb/shardlb/internal/labsys"
)

// node is one shardlb "pod": the real binary in the node's network namespace, with
// the DaemonSet's arguments and capabilities.
type node struct {
	i    int
	name string
	ns   string
	ip   netip.Addr
	ip6  netip.Addr // in a dual-stack lab
	argv []string
	log  string
	proc *labsys.Proc
	// up says the lab means the node to run: a node that exits on its own is an error.
	up bool
	// cordoned says its Node is cordoned: it must master nothing.
	cordoned bool
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

// buildShardlb builds ./cmd/shardlb into dir.
func buildShardlb(dir string) (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "shardlb")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/shardlb")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/shardlb: %w\n%s", err, out)
	}
	return bin, nil
}

// StartNodes builds shardlb (unless Options.Shardlb names a binary) and starts it on
// every node.
func (l *Lab) StartNodes(ctx context.Context) error {
	l.shardlb = l.opts.Shardlb
	if l.shardlb == "" {
		l.logf("building shardlb")
		var err error
		if l.shardlb, err = buildShardlb(l.Dir); err != nil {
			return err
		}
	}
	for i := range l.opts.Nodes {
		n := &node{i: i, name: nodeName(i), ns: nodeNS(i), ip: nodeLAN(i), log: filepath.Join(l.Dir, nodeName(i)+".log")}
		nodeIPs := n.ip.String()
		if l.opts.DualStack {
			n.ip6 = nodeLAN6(i)
			nodeIPs += "," + n.ip6.String()
		}
		// The DaemonSet's capabilities, nothing more: the bounding set caps what root
		// gets on exec, and no_new_privs is allowPrivilegeEscalation: false.
		bounding := "-all"
		for _, c := range l.caps {
			bounding += ",+" + c
		}
		n.argv = append([]string{"ip", "netns", "exec", n.ns,
			"setpriv", "--bounding-set", bounding, "--no-new-privs", "--",
			l.shardlb}, l.nodeArgs...)
		n.argv = append(n.argv,
			"--nodeName="+n.name, "--nodeIP="+nodeIPs, "--namespace="+lbSystem,
			"--kubeconfig="+l.nodeKubeconfig, "--logLevel=debug",
			"--pinPath="+filepath.Join(l.bpffs(), n.name),
			"--bgpGracefulRestart="+l.opts.GracefulRestart.String())
		if l.opts.MaxBackups > 0 {
			n.argv = append(n.argv, fmt.Sprintf("--maxBackups=%d", l.opts.MaxBackups))
		}
		if l.opts.AttachMode != "" {
			n.argv = append(n.argv, "--attachMode="+l.opts.AttachMode)
		}
		if l.opts.DualStack {
			n.argv = append(n.argv, "--cidr6Pools="+vipPool6)
		}
		l.nodes = append(l.nodes, n)
		// The Node object a kubelet would register; shardlb reads whether it is
		// cordoned.
		_, err := l.Kube.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.name}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("register node %s: %w", n.name, err)
		}
		if err := n.start(); err != nil {
			return err
		}
	}
	return nil
}

func (n *node) start() error {
	if n.proc != nil && n.proc.Running() {
		return fmt.Errorf("%s is already running", n.name)
	}
	p, err := labsys.StartProc(n.name, n.log, n.argv...)
	if err != nil {
		return err
	}
	n.proc, n.up = p, true
	return nil
}

// stop is a clean stop: SIGTERM, as the kubelet sends.
func (n *node) stop() error {
	n.up = false
	n.proc.Stop(15 * time.Second)
	return n.exitErr()
}

// kill is a crash: SIGKILL, no chance to withdraw anything.
func (n *node) kill() {
	n.up = false
	n.proc.Signal(syscall.SIGKILL)
	<-n.proc.Done()
}

// addr is the node's address of a's family: the next hop of its VIPs of that family.
func (n *node) addr(a netip.Addr) netip.Addr {
	if a.Is6() && !a.Is4In6() {
		return n.ip6
	}
	return n.ip
}

func (n *node) exitErr() error {
	if err := n.proc.ExitErr(); err != nil {
		return fmt.Errorf("%s exited: %w (log %s)", n.name, err, n.log)
	}
	return nil
}

// setLink takes the node's cable out or puts it back: the router's bridge port toward
// the node goes down, so the node's eth0 loses its carrier but keeps its addresses
// and routes, and the router's LAN stays up. Only BFD (or the hold timer) notices.
func (n *node) setLink(up bool) error {
	state := "down"
	if up {
		state = "up"
	}
	_, err := labsys.Sh("ip", "-n", routerNS, "link", "set", fmt.Sprintf("node%d", n.i+1), state)
	return err
}

// cli runs `shardlb ARGS` in the node's namespace, where its local API listens.
func (l *Lab) cli(n *node, args ...string) (string, error) {
	return labsys.NSRun(n.ns, l.shardlb, args...)
}

// haRow is one line of `shardlb get ha -o json`.
type haRow struct {
	Instance string `json:"instance"`
	State    string `json:"hastate"`
	Master   string `json:"master"`
}

// HA returns the node's `get ha` view.
func (l *Lab) HA(n *node) ([]haRow, error) {
	out, err := l.cli(n, "get", "ha", "-o", "json")
	if err != nil {
		return nil, err
	}
	var rows []haRow
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		return nil, fmt.Errorf("%s: get ha: %w: %s", n.name, err, out)
	}
	return rows, nil
}

// Masters returns, per instance, the one node that says it is MASTER; it fails
// unless every instance has exactly one, among the running nodes.
func (l *Lab) Masters() (map[string]*node, error) {
	masters := map[string]*node{}
	var instances []string
	for _, n := range l.nodes {
		if !n.proc.Running() {
			continue
		}
		rows, err := l.HA(n)
		if err != nil {
			return nil, err
		}
		for _, r := range rows {
			if !slices.Contains(instances, r.Instance) {
				instances = append(instances, r.Instance)
			}
			if r.State != "MASTER" {
				continue
			}
			if m, ok := masters[r.Instance]; ok {
				return nil, fmt.Errorf("instance %s has two masters: %s and %s", r.Instance, m.name, n.name)
			}
			masters[r.Instance] = n
		}
	}
	if len(instances) == 0 {
		return nil, fmt.Errorf("no node reports any instance")
	}
	for _, in := range instances {
		if masters[in] == nil {
			return nil, fmt.Errorf("instance %s has no master", in)
		}
	}
	return masters, nil
}

// Settled checks the steady state the guide shows: every running node's session
// up at the router, one master per instance, and for every VIP given (VIP ->
// instance) the router's best path via that instance's master, with one path per
// running node.
func (l *Lab) Settled(ctx context.Context, vips map[netip.Addr]string) error {
	running := 0
	sum, err := l.Router.Summary(ctx)
	if err != nil {
		return err
	}
	for _, n := range l.nodes {
		if n.proc == nil || !n.proc.Running() {
			continue
		}
		running++
		if s := sum[n.ip]; s.State != "Established" {
			return fmt.Errorf("router's session to %s is %q", n.name, s.State)
		}
	}
	masters, err := l.Masters()
	if err != nil {
		return err
	}
	// The first node up masters every instance until the others join and take their
	// share over: settled means balanced to within one among the running nodes.
	load := map[string]int{}
	for _, n := range l.nodes {
		if n.proc != nil && n.proc.Running() && !n.cordoned {
			load[n.name] = 0
		}
	}
	for inst, m := range masters {
		if m.cordoned {
			return fmt.Errorf("%s masters %s although its node is cordoned", m.name, inst)
		}
		load[m.name]++
	}
	lo, hi := len(masters), 0
	for _, c := range load {
		lo, hi = min(lo, c), max(hi, c)
	}
	if hi-lo > 1 {
		return fmt.Errorf("masterships not balanced yet: %v", load)
	}
	for vip, inst := range vips {
		m := masters[inst]
		if m == nil {
			return fmt.Errorf("instance %s of %s has no master", inst, vip)
		}
		paths, err := l.Router.Paths(ctx, hostPrefix(vip))
		if err != nil {
			return err
		}
		want := running
		if k := l.opts.MaxBackups; k > 0 {
			want = min(running, 1+k)
		}
		if len(paths) != want {
			return fmt.Errorf("router holds %d paths for %s, want %d (one per running node, at most 1+maxBackups)", len(paths), vip, want)
		}
		successors := 0
		for _, p := range paths {
			if p.LocalPref == 200 {
				successors++
			}
		}
		if want > 1 && successors != 1 {
			return fmt.Errorf("router holds %d paths for %s with the successor's LOCAL_PREF 200, want 1", successors, vip)
		}
		best, ok, err := l.Router.BestPath(ctx, hostPrefix(vip))
		if err != nil {
			return err
		}
		if !ok || best.NextHop != m.addr(vip) {
			return fmt.Errorf("router's best path for %s is via %v, want %s's master %s (%s)", vip, best.NextHop, inst, m.name, m.addr(vip))
		}
		hops, err := l.Router.KernelRoute(hostPrefix(vip))
		if err != nil {
			return err
		}
		if !slices.Equal(hops, []netip.Addr{m.addr(vip)}) {
			return fmt.Errorf("router's kernel route for %s is via %v, want %s", vip, hops, m.addr(vip))
		}
	}
	return nil
}

// WaitSettled waits for Settled.
func (l *Lab) WaitSettled(ctx context.Context, vips map[netip.Addr]string, d time.Duration) error {
	return waitFor(ctx, d, "the lab to settle", func() error {
		for _, n := range l.nodes {
			if n.up && !n.proc.Running() {
				return fmt.Errorf("%s exited: %v (log %s)", n.name, n.proc.ExitErr(), n.log)
			}
		}
		return l.Settled(ctx, vips)
	})
}
