package nodestack

import (
	"context"
	"fmt"
	"maps"
	"math/bits"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/shardlb/shardlb/manifest"
)

// testLog writes the stack's progress to the test's log.
type testLog struct{ t *testing.T }

func (w testLog) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestOperatorInstall installs shardlb as an operator does, `kubectl apply -k` of
// test/nodestack/overlay, on nodes whose kubelets and containerd run it, then checks what the
// operator would: the DaemonSet's pods Ready on every node through the kubelet's
// probes, with exactly the manifest's capabilities; the guide's services served
// through the router from pods whose EndpointSlices the controller-manager writes;
// a rolling restart of the DaemonSet that loses no probe; a dsr service whose
// connections outlive the loss of their master's node (dsr_test.go).
func TestOperatorInstall(t *testing.T) {
	// Start waits for the lab lock as long as another lab holds it (its context bounds
	// the wait and the stack's processes); the test's own time starts once it has it.
	stackCtx, stopStack := context.WithTimeout(context.Background(), 90*time.Minute)
	defer stopStack()
	// The images of this tree, as an operator builds them.
	t.Logf("make image lab-images\n%s", makeImages(stackCtx, t))
	st, err := Start(stackCtx, Options{Log: testLog{t}, Keep: os.Getenv("NODESTACK_KEEP") != ""})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(stackCtx, 25*time.Minute)
	defer cancel()
	t.Cleanup(st.Close)
	t.Cleanup(func() {
		if t.Failed() {
			var b strings.Builder
			st.Diagnose(context.Background(), &b)
			t.Log("\n" + b.String())
			// NODESTACK_HOLD=10m keeps a failed stack running that long to look
			// into (kubectl --kubeconfig DIR/kube/kubeconfig, ip netns exec ...).
			if d, err := time.ParseDuration(os.Getenv("NODESTACK_HOLD")); err == nil {
				t.Logf("holding the failed stack in %s for %v", st.Dir, d)
				time.Sleep(d)
			}
		}
	})

	overlay := "test/nodestack/overlay"
	if o := os.Getenv("NODESTACK_OVERLAY"); o != "" {
		overlay = o
	}
	out, err := st.Kubectl(ctx, "apply", "-k", overlay)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kubectl apply -k %s\n%s", overlay, out)

	if !t.Run("the DaemonSet's pods become Ready on every node through the kubelet's probes", func(t *testing.T) {
		if _, err := waitDaemonSet(ctx, st, nil); err != nil {
			t.Fatal(err)
		}
		out, _ := st.Kubectl(ctx, "-n", lbNS, "get", "pods", "-o", "wide")
		t.Logf("kubectl get pods -o wide\n%s", out)
	}) {
		t.FailNow()
	}

	t.Run("the containers run with exactly the manifest's capabilities, not privileged", func(t *testing.T) {
		want, err := manifestCapabilities()
		if err != nil {
			t.Fatal(err)
		}
		pods, err := st.Pods(ctx, lbNS, dsSelector)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pods {
			pid, err := st.containerPID(&p)
			if err != nil {
				t.Fatal(err)
			}
			status, err := procStatus(pid)
			if err != nil {
				t.Fatal(err)
			}
			for _, field := range []string{"CapEff", "CapPrm", "CapBnd"} {
				if got := status[field]; got != want {
					t.Errorf("%s on %s: %s %#016x, want %#016x (%s)", p.Name, p.Spec.NodeName, field, got, want, capNames(want))
				}
			}
			if status["NoNewPrivs"] != 1 {
				t.Errorf("%s: NoNewPrivs %d, want 1 (allowPrivilegeEscalation: false)", p.Name, status["NoNewPrivs"])
			}
			if status["Seccomp"] != 2 {
				t.Errorf("%s: Seccomp mode %d, want 2 (RuntimeDefault)", p.Name, status["Seccomp"])
			}
		}
	})

	out, err = st.Kubectl(ctx, "apply", "-f", "test/nodestack/testdata/guide.yaml")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kubectl apply -f test/nodestack/testdata/guide.yaml\n%s", out)

	if !t.Run("the backends' EndpointSlices come from the controller-manager", func(t *testing.T) {
		for svc, sel := range map[string]string{"tcp-lb": "what=tcp-test", "tcp-lb2": "what=tcp-test2"} {
			err := st.WaitFor(ctx, 3*time.Minute, "the endpoints of "+svc, func() error {
				pods, err := st.Pods(ctx, "default", sel)
				if err != nil {
					return err
				}
				var want []string
				for _, p := range pods {
					if Ready(&p) && p.Status.PodIP != "" && p.DeletionTimestamp == nil {
						want = append(want, p.Name+"="+p.Status.PodIP)
					}
				}
				if len(want) == 0 || len(want) != len(pods) {
					return fmt.Errorf("%d of %d pods Ready", len(want), len(pods))
				}
				got, err := readyEndpoints(ctx, st, svc)
				if err != nil {
					return err
				}
				slices.Sort(want)
				if !slices.Equal(got, want) {
					return fmt.Errorf("ready endpoints %v, want the pods %v", got, want)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		}
	}) {
		t.FailNow()
	}

	if !t.Run("the guide's services get their VIPs, which the client fetches through the router", func(t *testing.T) {
		for svc, vip := range guideVIPs {
			err := st.WaitFor(ctx, time.Minute, "the VIP of "+svc, func() error {
				s, err := st.Kube.CoreV1().Services("default").Get(ctx, svc, metav1.GetOptions{})
				if err != nil {
					return err
				}
				if in := s.Status.LoadBalancer.Ingress; len(in) != 1 || in[0].IP != vip.String() {
					return fmt.Errorf("status.loadBalancer.ingress %v, want %s", in, vip)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		out, _ := st.Kubectl(ctx, "get", "svc")
		t.Logf("kubectl get svc\n%s", out)
		for svc, vip := range guideVIPs {
			pods, err := st.Pods(ctx, "default", "what="+map[string]string{"tcp-lb": "tcp-test", "tcp-lb2": "tcp-test2"}[svc])
			if err != nil {
				t.Fatal(err)
			}
			names := map[string]bool{}
			for _, p := range pods {
				names[p.Name] = true
			}
			seen := map[string]bool{}
			addr := netip.AddrPortFrom(vip, vipPort)
			err = st.WaitFor(ctx, time.Minute, "every pod of "+svc+" answering through "+addr.String(), func() error {
				body, err := Get(ctx, addr, time.Second)
				if err != nil {
					return err
				}
				body = strings.TrimSpace(body)
				if !names[body] {
					return stop(fmt.Errorf("%s answered %q, which is none of its pods %v", addr, body, names))
				}
				seen[body] = true
				if len(seen) < len(names) {
					return fmt.Errorf("answers from %d of %d pods", len(seen), len(names))
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s (%s) answered from %v", addr, svc, slices.Sorted(maps.Keys(seen)))
		}
		route, _ := st.Router.Vtysh(ctx, "show ip route bgp")
		t.Logf("router: show ip route bgp\n%s", route)
		for _, n := range st.Nodes {
			pod, err := st.podOn(ctx, n.Name)
			if err != nil {
				t.Fatal(err)
			}
			out, err := st.Kubectl(ctx, "-n", lbNS, "exec", pod, "--", "shardlb", "get", "ha")
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: kubectl exec %s -- shardlb get ha\n%s", n.Name, pod, out)
		}
	}) {
		t.FailNow()
	}

	t.Run("each pod's memory cgroup, BPF maps included, leaves 30% of the manifest's limit", func(t *testing.T) {
		want, err := manifestMemoryLimit()
		if err != nil {
			t.Fatal(err)
		}
		pods, err := st.Pods(ctx, lbNS, dsSelector)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pods {
			pid, err := st.containerPID(&p)
			if err != nil {
				t.Fatal(err)
			}
			cg, err := readMemCgroup(pid)
			if err != nil {
				t.Fatal(err)
			}
			usage, limit := cg.Usage, cg.Limit
			t.Logf("%s on %s: memory cgroup usage %.1f MiB (kernel %.1f MiB) of the limit %.0f MiB (%.0f%%)",
				p.Name, p.Spec.NodeName, mib(usage), mib(cg.Kmem), mib(limit), 100*float64(usage)/float64(limit))
			if limit != want {
				t.Errorf("%s: memory limit %d, want the manifest's %d", p.Name, limit, want)
			}
			if usage*10 > limit*7 {
				t.Errorf("%s: %d of %d bytes used, less than 30%% headroom", p.Name, usage, limit)
			}
		}
	})

	t.Run("kubectl rollout restart of the DaemonSet loses no probe of either VIP", func(t *testing.T) {
		before, err := st.Pods(ctx, lbNS, dsSelector)
		if err != nil {
			t.Fatal(err)
		}
		probeDuring(ctx, t, st, before, func() error {
			if _, err := st.Kubectl(ctx, "-n", lbNS, "rollout", "restart", "daemonset/shardlb"); err != nil {
				return err
			}
			out, err := st.Kubectl(ctx, "-n", lbNS, "rollout", "status", "daemonset/shardlb", "--timeout=6m")
			t.Logf("kubectl rollout status\n%s", out)
			return err
		})
	})

	t.Run("kubectl delete pod of a master (the kubelet's SIGTERM, the manifest's grace period) loses no probe", func(t *testing.T) {
		best, ok, err := st.Router.BestPath(ctx, netip.PrefixFrom(guideVIPs["tcp-lb"], 32))
		if err != nil || !ok {
			t.Fatalf("the router's best path for %s: %v %v", guideVIPs["tcp-lb"], ok, err)
		}
		var master string
		for _, n := range st.Nodes {
			if n.IP == best.NextHop {
				master = n.Name
			}
		}
		pods, err := st.Pods(ctx, lbNS, dsSelector)
		if err != nil {
			t.Fatal(err)
		}
		pods = slices.DeleteFunc(pods, func(p corev1.Pod) bool { return p.Spec.NodeName != master })
		if len(pods) != 1 {
			t.Fatalf("%d shardlb pods on %s, want 1", len(pods), master)
		}
		t.Logf("deleting %s on %s, the master of %s", pods[0].Name, master, guideVIPs["tcp-lb"])
		probeDuring(ctx, t, st, pods, func() error {
			_, err := st.Kubectl(ctx, "-n", lbNS, "delete", "pod", pods[0].Name, "--wait=true", "--timeout=2m")
			return err
		})
	})

	t.Run("dsr: every pod answers through the VIP, and connections to pods behind other nodes survive the loss of the master's node", func(t *testing.T) {
		testDSR(ctx, t, st)
	})

	// Last: it takes shardlb away.
	t.Run("kubectl delete -k: every pod knows it is removed for good, withdraws and leaves nothing pinned", func(t *testing.T) {
		testUninstall(ctx, t, st, overlay)
	})
}

// probeDuring probes both VIPs from the client every 10 ms while action runs and the
// DaemonSet comes back with a Ready pod per node, none of them among old, then a few
// seconds more (the last new pod's routes and masterships settle after it is Ready),
// and fails the test for every failed probe.
func probeDuring(ctx context.Context, t *testing.T, st *Stack, old []corev1.Pod, action func() error) {
	t.Helper()
	var addrs []netip.AddrPort
	for _, vip := range guideVIPs {
		addrs = append(addrs, netip.AddrPortFrom(vip, vipPort))
	}
	probe := StartProber(ctx, addrs, 10*time.Millisecond, 500*time.Millisecond)
	err := action()
	var after []corev1.Pod
	if err == nil {
		after, err = waitDaemonSet(ctx, st, old)
	}
	if err == nil {
		time.Sleep(5 * time.Second)
	}
	ok, answers, failures, perr := probe.Stop()
	if err != nil {
		t.Fatal(err)
	}
	if perr != nil {
		t.Fatal(perr)
	}
	t.Logf("probes answered: %v; by pod: %v", ok, answers)
	for _, a := range addrs {
		if ok[a] == 0 {
			t.Errorf("no probe of %s answered", a)
		}
	}
	for _, f := range failures {
		t.Logf("%s %s: %v", f.At.Format("15:04:05.000"), f.Addr, f.Err)
	}
	if len(failures) > 0 {
		t.Errorf("%d probes failed", len(failures))
	}
	for _, p := range after {
		t.Logf("pod %s on %s", p.Name, p.Spec.NodeName)
	}
}

// containerPID is the host PID of the pod's one container's process, as the node's
// containerd reports it.
func (st *Stack) containerPID(p *corev1.Pod) (int, error) {
	n := st.Node(p.Spec.NodeName)
	if n == nil || len(p.Status.ContainerStatuses) != 1 {
		return 0, fmt.Errorf("%s: on node %q with %d containers", p.Name, p.Spec.NodeName, len(p.Status.ContainerStatuses))
	}
	id := strings.TrimPrefix(p.Status.ContainerStatuses[0].ContainerID, "containerd://")
	out, err := n.ctr("tasks", "ls")
	if err != nil {
		return 0, err
	}
	pid := 0
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == id {
			pid, _ = strconv.Atoi(f[1])
		}
	}
	if pid == 0 {
		return 0, fmt.Errorf("%s: containerd of %s lists no task %s:\n%s", p.Name, n.Name, id, out)
	}
	return pid, nil
}

// procStatus reads /proc/PID/status of the shardlb process and returns its
// capability sets, NoNewPrivs and Seccomp fields.
func procStatus(pid int) (map[string]uint64, error) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return nil, err
	}
	fields := map[string]uint64{}
	for _, line := range strings.Split(string(data), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb":
			fields[k], err = strconv.ParseUint(v, 16, 64)
		case "NoNewPrivs", "Seccomp":
			fields[k], err = strconv.ParseUint(v, 10, 64)
		case "Name":
			if v != "shardlb" {
				return nil, fmt.Errorf("process %d is %q, not shardlb", pid, v)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("/proc/%d/status %s: %w", pid, k, err)
		}
	}
	return fields, nil
}

// capBits are the Linux capability numbers (linux/capability.h) of the capabilities
// a manifest may name.
var capBits = map[string]uint{
	"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "KILL": 5, "SETGID": 6, "SETUID": 7,
	"NET_BIND_SERVICE": 10, "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13,
	"IPC_LOCK": 14, "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19,
	"SYS_ADMIN": 21, "SYS_RESOURCE": 24, "SYSLOG": 34, "PERFMON": 38, "BPF": 39,
}

// manifestMemoryLimit is the DaemonSet container's memory limit in bytes.
func manifestMemoryLimit() (uint64, error) {
	ds, err := manifestDaemonSet()
	if err != nil {
		return 0, err
	}
	q, ok := ds.Spec.Template.Spec.Containers[0].Resources.Limits[corev1.ResourceMemory]
	if !ok {
		return 0, fmt.Errorf("the DaemonSet sets no memory limit")
	}
	return uint64(q.Value()), nil
}

func manifestDaemonSet() (*appsv1.DaemonSet, error) {
	objs, err := manifest.File("daemonset.yaml")
	if err != nil {
		return nil, err
	}
	var ds appsv1.DaemonSet
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(objs[0].Object, &ds); err != nil {
		return nil, err
	}
	return &ds, nil
}

// manifestCapabilities is the capability mask the DaemonSet adds (it drops ALL).
func manifestCapabilities() (uint64, error) {
	ds, err := manifestDaemonSet()
	if err != nil {
		return 0, err
	}
	sc := ds.Spec.Template.Spec.Containers[0].SecurityContext
	if sc == nil || sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
		return 0, fmt.Errorf("the DaemonSet does not drop ALL capabilities")
	}
	var mask uint64
	for _, c := range sc.Capabilities.Add {
		b, ok := capBits[string(c)]
		if !ok {
			return 0, fmt.Errorf("capability %s: add its number to capBits", c)
		}
		mask |= 1 << b
	}
	return mask, nil
}

func capNames(mask uint64) string {
	var names []string
	for name, b := range capBits {
		if mask&(1<<b) != 0 {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return fmt.Sprintf("%d capabilities: %s", bits.OnesCount64(mask), strings.Join(names, ","))
}
