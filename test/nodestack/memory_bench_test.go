package nodestack

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/shardlb/shardlb/internal/testenv"
)

// BenchmarkPodMemory installs the lab's overlay (the manifest's default map sizes) and
// the guide's services, and reads each shardlb pod's memory from its container's
// memory cgroup once every pod of both services answers through its VIP. The kernel
// charges BPF maps to the cgroup of the process that creates them, and a fresh install
// creates them: this is the most a pod holds at a steady start. One row per node,
// beside the baseline, the estimate the pods log at start ("datapath maps sized ...
// estimatedMemory"), which grows with the CPUs and --conntrackSize as docs/install.md
// ("Sizing the datapath") says. A last row is node1's pod after kubectl delete pod:
// its replacement adopts the pinned maps, whose memory stays charged where it was
// first allocated.
//
// Units, sorted so that benchtab's ratio compares cgroup-MiB (the baseline's is the
// estimate): cgroup-MiB, memory.usage_in_bytes; headroom-%, what the limit leaves of
// it; kmem-MiB, memory.kmem.usage_in_bytes (BPF maps, slab, page tables, stacks);
// limit-MiB, memory.limit_in_bytes, which the kubelet sets from the manifest;
// maps-MiB, the memlock the kernel reports for every map the process holds
// (/proc/PID/fdinfo); peak-MiB, memory.max_usage_in_bytes since the container
// started; rss-MiB, the process's anonymous memory (memory.stat rss).
func BenchmarkPodMemory(b *testing.B) {
	testenv.RequireRoot(b)
	// The lab's lock may be held by another lab for a while: the wait is in here.
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	st := startGuide(ctx, b)

	want, err := manifestMemoryLimit()
	if err != nil {
		b.Fatal(err)
	}
	pods, err := st.Pods(ctx, lbNS, dsSelector)
	if err != nil {
		b.Fatal(err)
	}
	slices.SortFunc(pods, func(x, y corev1.Pod) int { return strings.Compare(x.Spec.NodeName, y.Spec.NodeName) })
	var rows []podMemory
	for _, p := range pods {
		m, err := readPodMemory(ctx, st, &p)
		if err != nil {
			b.Fatal(err)
		}
		if len(rows) > 0 && m.sizing != rows[0].sizing {
			b.Logf("%s logged %+v, %s %+v: the baseline is the first pod's", m.pod, m.sizing, rows[0].pod, rows[0].sizing)
		}
		if m.cg.Limit != want {
			b.Logf("%s: the cgroup's limit is %d bytes, the manifest's %d", m.pod, m.cg.Limit, want)
		}
		rows = append(rows, m)
	}
	est := rows[0].sizing

	next, err := replacePod(ctx, st, &pods[0])
	if err != nil {
		b.Fatal(err)
	}
	replaced, err := readPodMemory(ctx, st, next)
	if err != nil {
		b.Fatal(err)
	}
	replaced.node += "-replaced"
	// The QoS class's cgroup (kubepods/burstable) above the pods': the deleted pod's
	// charges are counted there now.
	qos, err := readMemCgroupAt(path.Dir(path.Dir(replaced.cg.Path)))
	if err != nil {
		b.Fatal(err)
	}

	// The sub-benchmarks report what was read above; the framework calls each again
	// with a larger b.N and keeps every call's log, so they log on the first only.
	b.Run("baseline=maps-estimate", func(b *testing.B) {
		if b.N == 1 {
			b.Logf("the pods' estimate at conntrackSize %d on %d CPUs; the manifest's limit %.0f MiB; "+
				"how the maps grow with the CPUs and --conntrackSize: docs/install.md, \"Sizing the datapath\"",
				est.conntrackSize, est.cpus, mib(want))
		}
		b.ReportMetric(est.estimate, "cgroup-MiB")
		b.ReportMetric(est.estimate, "maps-MiB")
		b.ReportMetric(0, "ns/op") // read once above, not per b.N
	})
	for _, r := range append(rows, replaced) {
		b.Run(r.node, func(b *testing.B) {
			if b.N == 1 {
				b.Logf("%s: %d maps held; cgroup %s", r.pod, r.nmaps, r.cg.Path)
				if r.pod == replaced.pod {
					b.Logf("%s replaced %s (kubectl delete pod) and adopted the pinned maps: %v; %s: usage %.1f MiB, kmem %.1f MiB",
						r.pod, pods[0].Name, r.adopted, qos.Path, mib(qos.Usage), mib(qos.Kmem))
				}
			}
			b.ReportMetric(mib(r.cg.Usage), "cgroup-MiB")
			b.ReportMetric(100*(1-float64(r.cg.Usage)/float64(r.cg.Limit)), "headroom-%")
			b.ReportMetric(mib(r.cg.Kmem), "kmem-MiB")
			b.ReportMetric(mib(r.cg.Limit), "limit-MiB")
			b.ReportMetric(mib(r.maps), "maps-MiB")
			b.ReportMetric(mib(r.cg.Peak), "peak-MiB")
			b.ReportMetric(mib(r.cg.RSS), "rss-MiB")
			b.ReportMetric(0, "ns/op")
		})
	}
}

// podMemory is what BenchmarkPodMemory reads of one shardlb pod.
type podMemory struct {
	node, pod string
	cg        memCgroup
	maps      uint64 // the memlock of the maps the process holds
	nmaps     int
	sizing    sizing // logged at start
	adopted   bool   // the process adopted pinned maps (logged)
}

// readPodMemory reads the pod's container's memory cgroup, the maps its process
// holds and what it logged of them.
func readPodMemory(ctx context.Context, st *Stack, p *corev1.Pod) (podMemory, error) {
	m := podMemory{node: p.Spec.NodeName, pod: p.Name}
	pid, err := st.containerPID(p)
	if err != nil {
		return m, err
	}
	if m.cg, err = readMemCgroup(pid); err != nil {
		return m, err
	}
	if m.maps, m.nmaps, err = mapMemlock(pid); err != nil {
		return m, err
	}
	logs, err := st.Kubectl(ctx, "-n", lbNS, "logs", p.Name)
	if err != nil {
		return m, err
	}
	if m.sizing, err = parseSizing(logs); err != nil {
		return m, fmt.Errorf("%s: %w", p.Name, err)
	}
	m.adopted = strings.Contains(logs, `msg="datapath adopted pinned maps"`)
	return m, nil
}

// replacePod deletes the shardlb pod (the kubelet's SIGTERM, the manifest's grace
// period) and returns the DaemonSet's next pod on its node once it is Ready.
func replacePod(ctx context.Context, st *Stack, old *corev1.Pod) (*corev1.Pod, error) {
	if _, err := st.Kubectl(ctx, "-n", lbNS, "delete", "pod", old.Name, "--wait=true", "--timeout=2m"); err != nil {
		return nil, err
	}
	var next corev1.Pod
	err := st.WaitFor(ctx, 3*time.Minute, "a Ready shardlb pod replacing "+old.Name, func() error {
		pods, err := st.Pods(ctx, lbNS, dsSelector)
		if err != nil {
			return err
		}
		for _, p := range pods {
			if p.Spec.NodeName == old.Spec.NodeName && p.UID != old.UID && p.DeletionTimestamp == nil && Ready(&p) {
				next = p
				return nil
			}
		}
		return fmt.Errorf("none Ready on %s", old.Spec.NodeName)
	})
	return &next, err
}

func mib(n uint64) float64 { return float64(n) / (1 << 20) }

// startGuide builds the images, starts the node stack, installs the lab's overlay and
// the guide's services, and returns once every pod of both answers the client through
// its VIP. The stack's progress is logged only if the benchmark fails.
func startGuide(ctx context.Context, b *testing.B) *Stack {
	b.Helper()
	makeImages(ctx, b)
	var progress syncBuffer
	st, err := Start(ctx, Options{Log: &progress})
	if err != nil {
		b.Fatalf("%v\n%s", err, progress.String())
	}
	b.Cleanup(st.Close)
	b.Cleanup(func() {
		if b.Failed() {
			var d strings.Builder
			st.Diagnose(context.Background(), &d)
			b.Logf("%s\n%s", progress.String(), d.String())
		}
	})
	if _, err := st.Install(ctx); err != nil {
		b.Fatal(err)
	}
	if _, err := st.WaitDaemonSet(ctx); err != nil {
		b.Fatal(err)
	}
	if _, err := st.Kubectl(ctx, "apply", "-f", "test/nodestack/testdata/guide.yaml"); err != nil {
		b.Fatal(err)
	}
	for _, svc := range GuideServices {
		vip, err := st.WaitVIP(ctx, "default", svc.Name)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := st.WaitAnswers(ctx, "default", svc.Selector, netip.AddrPortFrom(vip, vipPort)); err != nil {
			b.Fatal(err)
		}
	}
	return st
}

// makeImages builds the images of this tree as an operator does (seconds when warm)
// and returns make's output.
func makeImages(ctx context.Context, tb testing.TB) string {
	tb.Helper()
	root, err := moduleRoot()
	if err != nil {
		tb.Fatal(err)
	}
	mk := exec.CommandContext(ctx, "make", "-s", "image", "lab-images")
	mk.Dir = root
	out, err := mk.CombinedOutput()
	if err != nil {
		tb.Fatalf("make image lab-images: %v\n%s", err, out)
	}
	return string(out)
}

// syncBuffer collects the stack's progress lines, written from several goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// memCgroup is what the memory cgroup (v1) of a process reads, in bytes.
type memCgroup struct {
	Path  string // under /sys/fs/cgroup/memory
	Usage uint64 // memory.usage_in_bytes: user and kernel memory, BPF maps included
	Peak  uint64 // memory.max_usage_in_bytes
	Kmem  uint64 // memory.kmem.usage_in_bytes: the kernel's part
	RSS   uint64 // memory.stat rss: anonymous memory
	Limit uint64 // memory.limit_in_bytes
}

// readMemCgroup reads the memory cgroup (v1) the process is in. BPF maps are charged
// to the cgroup of the process that created them.
func readMemCgroup(pid int) (memCgroup, error) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return memCgroup{}, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.SplitN(line, ":", 3); len(f) == 3 && slices.Contains(strings.Split(f[1], ","), "memory") {
			return readMemCgroupAt(f[2])
		}
	}
	return memCgroup{}, fmt.Errorf("process %d is in no memory cgroup", pid)
}

// readMemCgroupAt reads the memory cgroup (v1) at path under /sys/fs/cgroup/memory.
func readMemCgroupAt(path string) (memCgroup, error) {
	cg := memCgroup{Path: path}
	dir := filepath.Join(cgroupMount, "memory", path)
	for _, v := range []struct {
		file string
		to   *uint64
	}{
		{"memory.usage_in_bytes", &cg.Usage}, {"memory.max_usage_in_bytes", &cg.Peak},
		{"memory.kmem.usage_in_bytes", &cg.Kmem}, {"memory.limit_in_bytes", &cg.Limit},
	} {
		b, err := os.ReadFile(filepath.Join(dir, v.file))
		if err != nil {
			return memCgroup{}, err
		}
		if *v.to, err = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err != nil {
			return memCgroup{}, fmt.Errorf("%s/%s: %w", dir, v.file, err)
		}
	}
	stat, err := os.ReadFile(filepath.Join(dir, "memory.stat"))
	if err != nil {
		return memCgroup{}, err
	}
	for _, l := range strings.Split(string(stat), "\n") {
		if k, v, ok := strings.Cut(l, " "); ok && k == "rss" {
			if cg.RSS, err = strconv.ParseUint(v, 10, 64); err != nil {
				return memCgroup{}, fmt.Errorf("%s/memory.stat: %w", dir, err)
			}
		}
	}
	return cg, nil
}

// mapMemlock sums the memlock the kernel reports for each BPF map the process holds a
// descriptor of, counting a map held twice once, and returns it with the number of
// maps.
func mapMemlock(pid int) (total uint64, maps int, err error) {
	dir := filepath.Join("/proc", strconv.Itoa(pid))
	fds, err := os.ReadDir(filepath.Join(dir, "fd"))
	if err != nil {
		return 0, 0, err
	}
	seen := map[string]bool{}
	for _, fd := range fds {
		if target, err := os.Readlink(filepath.Join(dir, "fd", fd.Name())); err != nil || target != "anon_inode:bpf-map" {
			continue // closed meanwhile, or not a map
		}
		info, err := os.ReadFile(filepath.Join(dir, "fdinfo", fd.Name()))
		if err != nil {
			continue
		}
		var id string
		var memlock uint64
		for _, l := range strings.Split(string(info), "\n") {
			k, v, _ := strings.Cut(l, ":")
			v = strings.TrimSpace(v)
			switch k {
			case "map_id":
				id = v
			case "memlock":
				if memlock, err = strconv.ParseUint(v, 10, 64); err != nil {
					return 0, 0, fmt.Errorf("%s/fdinfo/%s memlock: %w", dir, fd.Name(), err)
				}
			}
		}
		if id == "" || seen[id] {
			continue
		}
		seen[id] = true
		total += memlock
	}
	if len(seen) == 0 {
		return 0, 0, fmt.Errorf("process %d holds no BPF map", pid)
	}
	return total, len(seen), nil
}

// sizing is what a pod logs of its maps at start.
type sizing struct {
	conntrackSize, cpus int
	estimate            float64 // MiB, to the log's 0.1
}

var sizingLine = regexp.MustCompile(`msg="datapath maps sized".* conntrackSize=(\d+) cpus=(\d+) estimatedMemory="([0-9.]+) MiB"`)

// parseSizing finds the datapath's start-up line ("datapath maps sized ...") in a
// pod's log (the text format, the manifest's).
func parseSizing(logs string) (sizing, error) {
	m := sizingLine.FindStringSubmatch(logs)
	if m == nil {
		return sizing{}, fmt.Errorf(`no "datapath maps sized" line with conntrackSize, cpus and estimatedMemory in the log`)
	}
	var s sizing
	s.conntrackSize, _ = strconv.Atoi(m[1])
	s.cpus, _ = strconv.Atoi(m[2])
	s.estimate, _ = strconv.ParseFloat(m[3], 64)
	return s, nil
}
