package kube

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"slices"
	"sort"
	"sync"
	"syscall"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
)

// nodeProc is a shardlb pod in a child process (the test binary running nodeMain).
type nodeProc struct {
	name    string
	started int64 // unix ns: lines before this are a previous process's
	cmd     *exec.Cmd
	done    chan struct{}
	stderr  bytes.Buffer
}

// cluster collects what every node process announces, in one timeline.
type cluster struct {
	t     *testing.T
	e     *env
	mu    sync.Mutex
	lines []nodeLine
	procs map[string]*nodeProc
}

const haInstances = 3

var haInstanceNames = []string{"default", "llb-inst1", "llb-inst2"}

func (c *cluster) start(name string, env ...string) *nodeProc {
	c.t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(c.e.nodeEnv(name, haInstances, "defaultPool=192.168.90.250/24", "", freeAddr(c.t)), env...)
	p := &nodeProc{name: name, started: time.Now().UnixNano(), cmd: cmd, done: make(chan struct{})}
	cmd.Stderr = &lockedWriter{w: &p.stderr}
	out, err := cmd.StdoutPipe()
	if err != nil {
		c.t.Fatal(err)
	}
	// Should the test binary die, the kernel kills its node processes too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var l nodeLine
			if json.Unmarshal(sc.Bytes(), &l) == nil {
				c.mu.Lock()
				c.lines = append(c.lines, l)
				c.mu.Unlock()
			}
		}
		_ = cmd.Wait()
		close(p.done)
	}()
	c.mu.Lock()
	c.procs[name] = p
	c.mu.Unlock()
	return p
}

// startBalanced starts the nodes and waits until each masters one instance.
func (c *cluster) startBalanced(nodes ...string) {
	c.t.Helper()
	for _, n := range nodes {
		c.start(n)
	}
	waitFor(c.t, 30*time.Second, "one master per instance and one instance per node", func() bool {
		m := c.masters()
		return len(m) == len(nodes) && balanced(m)
	})
}

// kill stops a node process by PID with SIGKILL and waits for it.
func (c *cluster) kill(p *nodeProc) { c.end(p, syscall.SIGKILL) }

// stop stops a node process by PID with SIGTERM (a planned stop) and waits for it.
func (c *cluster) stop(p *nodeProc) { c.end(p, syscall.SIGTERM) }

func (c *cluster) end(p *nodeProc, sig syscall.Signal) {
	_ = p.cmd.Process.Signal(sig)
	<-p.done
	c.mu.Lock()
	delete(c.procs, p.name)
	c.mu.Unlock()
}

// timeline is every line so far, in time order.
func (c *cluster) timeline() []nodeLine {
	c.mu.Lock()
	lines := slices.Clone(c.lines)
	c.mu.Unlock()
	sort.SliceStable(lines, func(i, j int) bool { return lines[i].T < lines[j].T })
	return lines
}

// masters is each live node's latest set of mastered instances.
func (c *cluster) masters() map[string][]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string][]string{}
	for name := range c.procs {
		out[name] = nil
	}
	for _, l := range c.lines {
		if p := c.procs[l.Node]; p != nil && l.T >= p.started && !l.Frontends && !l.Announcing {
			out[l.Node] = l.Masters
		}
	}
	return out
}

// handoffs is each live node's latest service -> handoff address.
func (c *cluster) handoffs() map[string]map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]map[string]string{}
	for _, l := range c.lines {
		if p := c.procs[l.Node]; p != nil && l.T >= p.started && l.Frontends {
			out[l.Node] = l.Handoffs
		}
	}
	return out
}

// newHACluster creates one service pinned to each instance and a cluster of node
// processes that are killed, after a dump of the timeline if the test failed, when
// the test ends.
func newHACluster(t *testing.T, e *env) *cluster {
	t.Helper()
	for i, inst := range haInstanceNames {
		name := "svc-" + inst
		e.createSlice(t, name, "10.244.0."+string(rune('1'+i)))
		e.create(t, e.lbService(name, annotate(AnnotationZoneInstance, inst)))
	}
	c := &cluster{t: t, e: e, procs: map[string]*nodeProc{}}
	t.Cleanup(func() {
		if t.Failed() {
			c.dump()
		}
		for _, p := range c.procs {
			c.kill(p)
		}
	})
	return c
}

// balanced: every instance has exactly one master and every node exactly one instance.
func balanced(m map[string][]string) bool {
	seen := map[string]int{}
	for _, insts := range m {
		if len(insts) != 1 {
			return false
		}
		seen[insts[0]]++
	}
	for _, inst := range haInstanceNames {
		if seen[inst] != 1 {
			return false
		}
	}
	return true
}

func (c *cluster) dump() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, l := range c.lines {
		if l.Frontends {
			c.t.Logf("%s %s handoffs=%v", time.Unix(0, l.T).Format("15:04:05.000"), l.Node, l.Handoffs)
			continue
		}
		if l.Announcing {
			c.t.Logf("%s %s BGP sessions up", time.Unix(0, l.T).Format("15:04:05.000"), l.Node)
			continue
		}
		c.t.Logf("%s %s masters=%v vips=%d", time.Unix(0, l.T).Format("15:04:05.000"), l.Node, l.Masters, l.VIPs)
	}
	for _, p := range c.procs {
		c.t.Logf("stderr of %s:\n%s", p.name, p.stderr.String())
	}
}

type lockedWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// leaseHistory records every version of the instance Leases, from a watch.
type leaseHistory struct {
	mu       sync.Mutex
	versions []coordinationv1.Lease
}

func watchLeases(t *testing.T, e *env) *leaseHistory {
	h := &leaseHistory{}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	w, err := e.client.CoordinationV1().Leases(e.ns).Watch(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for ev := range w.ResultChan() {
			if l, ok := ev.Object.(*coordinationv1.Lease); ok && (ev.Type == watch.Added || ev.Type == watch.Modified) {
				h.mu.Lock()
				h.versions = append(h.versions, *l)
				h.mu.Unlock()
			}
		}
	}()
	return h
}

// takeover finds, for the instance Lease name, the last renewal by from and the first
// acquisition by someone else after it.
func (h *leaseHistory) takeover(name, from string) (lastRenew, acquired time.Time, by string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, l := range h.versions {
		if l.Name != name || l.Spec.HolderIdentity == nil {
			continue
		}
		switch hl := *l.Spec.HolderIdentity; {
		case hl == from && l.Spec.RenewTime != nil:
			lastRenew, acquired, by = l.Spec.RenewTime.Time, time.Time{}, ""
		case hl != from && hl != "" && !lastRenew.IsZero() && by == "" && l.Spec.AcquireTime != nil:
			acquired, by = l.Spec.AcquireTime.Time, hl
		}
	}
	return lastRenew, acquired, by
}

// Three pods against one apiserver: one master per instance, one instance per pod; a
// SIGKILLed master's instances get new masters within the lease duration + 1 s; when
// it returns the masters rebalance make-before-break, never leaving an instance
// without a master, and the new master hands off to the old; a planned stop hands
// over make-before-break too.
func TestThreeNodesFailoverAndRebalance(t *testing.T) {
	e := newEnv(t, "ha")
	leases := watchLeases(t, e)
	c := newHACluster(t, e)
	c.startBalanced("node-a", "node-b", "node-c")
	initial := c.masters()
	t.Logf("masters: %v", initial)

	victim := c.procs["node-c"]
	lost := initial["node-c"][0]
	killedAt := time.Now()
	c.kill(victim)
	var newMaster string
	waitFor(t, 15*time.Second, lost+" to get a new master", func() bool {
		for n, insts := range c.masters() {
			if slices.Contains(insts, lost) {
				newMaster = n
				return true
			}
		}
		return false
	})
	t.Logf("%s: new master %s, %v after SIGKILL", lost, newMaster, time.Since(killedAt).Round(time.Millisecond))
	// The member that takes node-c's instances over probes it (/healthz on the API
	// address the node processes serve): it must find it dead within its probes'
	// failures, long before node-c's member Lease expires.
	probe := DefaultConfig().PeerProbe
	limit := time.Duration(probe.Failures)*probe.Interval + time.Second
	_, acquired, by := leases.takeover(InstanceLeaseName(lost), "node-c")
	if by != newMaster {
		t.Errorf("lease history: %s taken by %q, want %s", lost, by, newMaster)
	} else if gap := acquired.Sub(killedAt); gap > limit {
		// Lease timestamps are the protocol's own record of the takeover.
		t.Errorf("%s: taken %v after node-c's SIGKILL, want at most %v (probes every %v, %d failures)", lost, gap, limit, probe.Interval, probe.Failures)
	}

	returnedAt := time.Now().UnixNano()
	c.start("node-c")
	waitFor(t, 30*time.Second, "masters to rebalance after node-c returns", func() bool {
		m := c.masters()
		return len(m) == 3 && balanced(m)
	})
	final := c.masters()
	t.Logf("masters after return: %v", final)

	// Replay the timeline from node-c's return: at every step every instance has a
	// master somewhere.
	lines := c.timeline()
	state := map[string][]string{}
	for _, l := range lines {
		if l.T < returnedAt && l.Node != "node-c" && !l.Frontends {
			state[l.Node] = l.Masters
		}
	}
	check := func(at int64) {
		for _, inst := range haInstanceNames {
			found := false
			for _, insts := range state {
				found = found || slices.Contains(insts, inst)
			}
			if !found {
				t.Errorf("%s had no master at %s (state %v)", inst, time.Unix(0, at).Format("15:04:05.000"), state)
			}
		}
	}
	check(returnedAt)
	for _, l := range lines {
		if l.T >= returnedAt && !l.Frontends {
			state[l.Node] = l.Masters
			check(l.T)
		}
	}

	// The Leases agree with what the nodes announce.
	for node, insts := range final {
		l, err := e.client.CoordinationV1().Leases(e.ns).Get(context.Background(), InstanceLeaseName(insts[0]), metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got := *l.Spec.HolderIdentity; got != node {
			t.Errorf("lease of %s held by %s, but %s announces it as master", insts[0], got, node)
		}
	}

	// node-c took its instance from the node that held two: while that process lives,
	// node-c hands segments it does not know to it.
	svcOf := func(inst string) string { return e.ns + "/svc-" + inst }
	taken := final["node-c"][0]
	waitFor(t, 5*time.Second, "node-c to hand off "+taken+" to "+newMaster, func() bool {
		return c.handoffs()["node-c"][svcOf(taken)] == nodeAddr(newMaster)
	})

	// A planned stop (SIGTERM) of node-c hands its instance over make-before-break:
	// the instance never lacks a master, its new master hands off to node-c while
	// node-c drains, and no longer once node-c is gone.
	stoppedAt := time.Now().UnixNano()
	c.stop(c.procs["node-c"])
	took := time.Since(time.Unix(0, stoppedAt))
	lines = c.timeline()
	state = map[string][]string{}
	var successor string
	sawHandoff := false
	for _, l := range lines {
		if l.Frontends {
			if l.T >= stoppedAt && l.Handoffs[svcOf(taken)] == nodeAddr("node-c") {
				sawHandoff = true
			}
			continue
		}
		state[l.Node] = l.Masters
		if l.T < stoppedAt {
			continue
		}
		check(l.T)
		if l.Node != "node-c" && slices.Contains(l.Masters, taken) && successor == "" {
			successor = l.Node
		}
	}
	if successor == "" {
		t.Fatalf("%s got no new master when node-c stopped", taken)
	}
	if !sawHandoff {
		t.Errorf("%s's new master %s never handed off to node-c (%s)", taken, successor, nodeAddr("node-c"))
	}
	if limit := DefaultConfig().Handover + DefaultConfig().Drain + 5*time.Second; took > limit {
		t.Errorf("planned stop took %v, want under %v", took, limit)
	}
	waitFor(t, 5*time.Second, successor+" to stop handing off to the stopped node-c", func() bool {
		return c.handoffs()[successor][svcOf(taken)] == ""
	})
	if _, err := e.client.CoordinationV1().Leases(e.ns).Get(context.Background(), MemberLeaseName("node-c"), metav1.GetOptions{}); err == nil {
		t.Error("node-c's member lease is still there after it stopped")
	}
	t.Logf("planned stop of node-c: %s to %s, stop took %v", taken, successor, took.Round(time.Millisecond))
}

// A node whose BGP sessions are not up yet (a restarted pod, a few hundred ms to
// seconds) is handed no instance and takes none: the old master would demote on its
// word and the routers would have no master route, spreading the VIP over the
// backups. Once its sessions are up it takes its share, make-before-break.
func TestNoMastershipBeforeTheRoutesReachTheRouters(t *testing.T) {
	e := newEnv(t, "silent")
	c := newHACluster(t, e)
	c.start("node-a")
	c.start("node-b")
	waitFor(t, 30*time.Second, "node-a and node-b to master every instance", func() bool {
		n := 0
		for _, insts := range c.masters() {
			n += len(insts)
		}
		return n == haInstances
	})
	// Long enough for several member Lease renewals and a full rebalance round.
	const silent = 4 * time.Second
	startedAt := time.Now().UnixNano()
	c.start("node-c", "NODE_SILENT="+silent.String())
	waitFor(t, 30*time.Second, "node-c to take its share once announcing", func() bool {
		m := c.masters()
		return len(m) == 3 && balanced(m)
	})
	var upAt int64
	state := map[string][]string{}
	for _, l := range c.timeline() {
		switch {
		case l.Frontends:
		case l.Announcing:
			upAt = l.T
		case l.Node == "node-c" && len(l.Masters) > 0 && upAt == 0:
			t.Errorf("node-c announced %v as master at %s, before its sessions were up", l.Masters, time.Unix(0, l.T).Format("15:04:05.000"))
		default:
			state[l.Node] = l.Masters
			if l.T < startedAt {
				continue
			}
			for _, inst := range haInstanceNames {
				found := false
				for _, insts := range state {
					found = found || slices.Contains(insts, inst)
				}
				if !found {
					t.Errorf("%s had no master at %s (state %v)", inst, time.Unix(0, l.T).Format("15:04:05.000"), state)
				}
			}
		}
	}
	if upAt == 0 {
		t.Fatal("node-c never reported its sessions up")
	}
	t.Logf("node-c: sessions up %v after start, masters %v", time.Duration(upAt-startedAt).Round(time.Millisecond), c.masters())
}

// A node cordoned, or labelled out of external load balancers, hands its instances
// over make-before-break and masters none while it stays so (it remains a backup);
// uncordoned, it takes its share back.
func TestMaintenanceMovesMastershipAway(t *testing.T) {
	e := newEnv(t, "maint")
	ctx := context.Background()
	nodes := []string{"node-a", "node-b", "node-c"}
	for _, n := range nodes {
		if _, err := e.client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = e.client.CoreV1().Nodes().Delete(context.Background(), n, metav1.DeleteOptions{}) })
	}
	c := newHACluster(t, e)
	c.startBalanced(nodes...)
	// every instance keeps a master at every step from `from` on.
	neverOrphaned := func(from int64) {
		t.Helper()
		state := map[string][]string{}
		for _, l := range c.timeline() {
			if l.Frontends || l.Announcing {
				continue
			}
			state[l.Node] = l.Masters
			if l.T < from {
				continue
			}
			for _, inst := range haInstanceNames {
				found := false
				for _, insts := range state {
					found = found || slices.Contains(insts, inst)
				}
				if !found {
					t.Errorf("%s had no master at %s (state %v)", inst, time.Unix(0, l.T).Format("15:04:05.000"), state)
				}
			}
		}
	}
	patch := func(node, p string) {
		t.Helper()
		if _, err := e.client.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, []byte(p), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, step := range []struct{ name, node, on, off string }{
		{"cordon", "node-a", `{"spec":{"unschedulable":true}}`, `{"spec":{"unschedulable":null}}`},
		{"exclude label", "node-b", `{"metadata":{"labels":{"` + LabelExcludeFromLB + `":""}}}`, `{"metadata":{"labels":{"` + LabelExcludeFromLB + `":null}}}`},
	} {
		from := time.Now().UnixNano()
		patch(step.node, step.on)
		waitFor(t, 15*time.Second, step.node+" to master nothing after "+step.name, func() bool {
			m := c.masters()
			n := 0
			for _, insts := range m {
				n += len(insts)
			}
			return len(m[step.node]) == 0 && n == haInstances
		})
		neverOrphaned(from)
		t.Logf("%s of %s: masters %v", step.name, step.node, c.masters())
		from = time.Now().UnixNano()
		patch(step.node, step.off)
		waitFor(t, 15*time.Second, "the balance to return after undoing the "+step.name, func() bool {
			m := c.masters()
			return len(m) == 3 && balanced(m)
		})
		neverOrphaned(from)
	}
}

// A master that stops answering without dying (SIGSTOP: its socket still accepts
// connections, nothing answers, as with a hung node) is found dead by the probes of
// the member that would take its instance over, which takes it within
// PeerProbe.Failures probes, long before its member Lease (40 s) expires; resumed
// (SIGCONT), it stops announcing the instance it lost, its next member renewal clears
// the suspicion and it gets its share back, make-before-break.
func TestAFrozenMasterIsTakenOverByProbes(t *testing.T) {
	e := newEnv(t, "frozen")
	leases := watchLeases(t, e)
	c := newHACluster(t, e)
	c.startBalanced("node-a", "node-b", "node-c")
	victim := c.procs["node-c"]
	lost := c.masters()["node-c"][0]
	frozenAt := time.Now()
	if err := victim.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			_ = victim.cmd.Process.Signal(syscall.SIGCONT)
		}
	}
	defer resume()
	probe := DefaultConfig().PeerProbe
	// Probes, each up to an interval long, then the step and the write.
	limit := time.Duration(probe.Failures+1)*probe.Interval + time.Second
	var by string
	waitFor(t, 15*time.Second, lost+" taken from the frozen node-c", func() bool {
		_, _, by = leases.takeover(InstanceLeaseName(lost), "node-c")
		return by != ""
	})
	_, acquired, _ := leases.takeover(InstanceLeaseName(lost), "node-c")
	if gap := acquired.Sub(frozenAt); gap > limit {
		t.Errorf("%s taken by %s %v after node-c froze, want at most %v (probes every %v, %d failures)", lost, by, gap, limit, probe.Interval, probe.Failures)
	} else {
		t.Logf("%s taken by %s %v after node-c froze", lost, by, gap.Round(time.Millisecond))
	}
	resume()
	waitFor(t, 2*DefaultConfig().MemberLease.Renew+10*time.Second, "node-c to get an instance back", func() bool {
		m := c.masters()
		return len(m) == 3 && balanced(m) && len(m["node-c"]) == 1
	})
}
