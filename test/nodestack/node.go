package nodestack

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/shardlb/shardlb/internal/labsys"
)

// Node is one lab node: a containerd and a kubelet in the node's network namespace,
// sharing a mount namespace of their own, under the cgroup /nsl-nodeN.
type Node struct {
	Name string
	NS   string // network namespace
	IP   netip.Addr
	Dir  string

	mnt        string // the mount namespace, bound to this file
	cgroup     string
	sock       string // containerd's
	containerd *labsys.Proc
	kubelet    *labsys.Proc
}

// in is the command prefix that runs argv in the node's namespaces and cgroup.
func (n *Node) in(argv ...string) ([]string, error) {
	join, err := cgroupJoin(n.cgroup + "/system")
	if err != nil {
		return nil, err
	}
	return append(append(join, "nsenter", "--mount="+n.mnt, "--net=/run/netns/"+n.NS, "--"), argv...), nil
}

// startNode prepares node i's cgroup, mount namespace and kube-proxy stand-in, starts
// containerd, imports the images and starts the kubelet.
func (s *Stack) startNode(ctx context.Context, i int) (*Node, error) {
	n := &Node{Name: nodeName(i), NS: nodeNS(i), IP: nodeLAN(i), Dir: filepath.Join(s.Dir, nodeName(i)),
		cgroup: "/" + prefix + nodeName(i)}
	n.sock = filepath.Join(n.Dir, "containerd.sock")
	for _, d := range []string{"containerd/root", "containerd/state", "cni", "cni-ipam", "kubelet", "pod-logs"} {
		if err := os.MkdirAll(filepath.Join(n.Dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	if err := makeCgroup(n.cgroup + "/system"); err != nil {
		return n, fmt.Errorf("cgroup: %w", err)
	}
	if err := s.mountNS(n); err != nil {
		return n, fmt.Errorf("mount namespace: %w", err)
	}
	if err := s.kubernetesService(n); err != nil {
		return n, fmt.Errorf("the kubernetes Service: %w", err)
	}
	if err := s.startContainerd(ctx, i, n); err != nil {
		return n, err
	}
	if err := s.importImages(n); err != nil {
		return n, err
	}
	if err := s.startKubelet(i, n); err != nil {
		return n, err
	}
	return n, nil
}

// mountNS makes the node's mount namespace, bound to a file under the stack's
// directory: a bpffs of its own on /sys/fs/bpf (the DaemonSet's hostPath) and a
// tmpfs on /run/containerd (where containerd 1.6 puts shim sockets whatever its
// configuration). Mounts made in it (overlays, volumes, network namespaces of pods)
// go when the namespace goes.
func (s *Stack) mountNS(n *Node) error {
	nsDir := filepath.Join(s.Dir, "mntns")
	if _, err := os.Stat(nsDir); err != nil {
		// A namespace file can be bound only on a private mount.
		var sc labsys.Script
		sc.Run("mkdir", "-p", nsDir)
		sc.Run("mount", "--bind", nsDir, nsDir)
		sc.Run("mount", "--make-private", nsDir)
		if sc.Err != nil {
			return sc.Err
		}
	}
	n.mnt = filepath.Join(nsDir, n.Name)
	if err := os.WriteFile(n.mnt, nil, 0o644); err != nil {
		return err
	}
	_, err := labsys.Sh("unshare", "--mount="+n.mnt, "--propagation", "private", "--", "sh", "-ec",
		"mount -t bpf bpf /sys/fs/bpf; mount -t tmpfs -o mode=0711 tmpfs /run/containerd")
	return err
}

// kubernetesService stands in for kube-proxy for the one Service the pods need: the
// apiserver's ClusterIP, which the kubelet gives every container as
// KUBERNETES_SERVICE_HOST, DNATed to the apiserver by an nftables rule in the node's
// namespace (host-network pods' packets pass the output hook).
func (s *Stack) kubernetesService(n *Node) error {
	u, err := url.Parse(s.API.URL())
	if err != nil {
		return err
	}
	rules := fmt.Sprintf(`table ip nodestack {
	chain output {
		type nat hook output priority -100; policy accept;
		ip daddr %s tcp dport 443 dnat to %s
	}
	chain prerouting {
		type nat hook prerouting priority -100; policy accept;
		ip daddr %s tcp dport 443 dnat to %s
	}
}
`, apiSvcIP, u.Host, apiSvcIP, u.Host)
	f := filepath.Join(n.Dir, "kubernetes-service.nft")
	if err := os.WriteFile(f, []byte(rules), 0o644); err != nil {
		return err
	}
	_, err = labsys.NSRun(n.NS, "nft", "-f", f)
	return err
}

func (s *Stack) startContainerd(ctx context.Context, i int, n *Node) error {
	cni := fmt.Sprintf(`{
  "cniVersion": "0.4.0",
  "name": "lab",
  "plugins": [{
    "type": "bridge",
    "bridge": "cni0",
    "isGateway": true,
    "ipMasq": false,
    "hairpinMode": true,
    "ipam": {
      "type": "host-local",
      "dataDir": %q,
      "ranges": [[{"subnet": %q}]],
      "routes": [{"dst": "0.0.0.0/0"}]
    }
  }]
}
`, filepath.Join(n.Dir, "cni-ipam"), podCIDR(i).String())
	if err := os.WriteFile(filepath.Join(n.Dir, "cni", "10-lab.conflist"), []byte(cni), 0o644); err != nil {
		return err
	}
	conf := fmt.Sprintf(`version = 2
root = %q
state = %q
[grpc]
  address = %q
[ttrpc]
  address = ""
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  stream_server_address = "127.0.0.1"
  netns_mounts_under_state_dir = true
  # Containers get no lower oom_score_adj than containerd's own (0) instead of the
  # kubelet's -998 for sandboxes and critical pods: lowering it needs
  # CAP_SYS_RESOURCE, which this machine's root does not hold (runc then fails with
  # "can't get final child's PID from pipe"). As a rootless containerd does.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %q
[plugins."io.containerd.internal.v1.opt"]
  path = %q
`, filepath.Join(n.Dir, "containerd/root"), filepath.Join(n.Dir, "containerd/state"), n.sock,
		labImage+"/pause:"+labTag, filepath.Join(n.Dir, "cni"), filepath.Join(n.Dir, "containerd/opt"))
	cfg := filepath.Join(n.Dir, "containerd.toml")
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		return err
	}
	argv, err := n.in("containerd", "--config", cfg)
	if err != nil {
		return err
	}
	if n.containerd, err = labsys.StartProc(n.Name+" containerd", filepath.Join(n.Dir, "containerd.log"), argv...); err != nil {
		return err
	}
	return waitFor(ctx, 30*time.Second, n.Name+"'s containerd", func() error {
		if err := n.containerd.Exited(); err != nil {
			return err
		}
		_, err := n.ctr("version")
		return err
	})
}

// ctr runs the containerd CLI against the node's containerd, in Kubernetes' namespace.
func (n *Node) ctr(args ...string) (string, error) {
	return labsys.Sh("ctr", append([]string{"--address", n.sock, "--namespace", "k8s.io"}, args...)...)
}

// importImages imports the shardlb image (tagged also as the lab overlay's
// ghcr.io/shardlb/shardlb:lab) and the lab's pause and backend images.
func (s *Stack) importImages(n *Node) error {
	img := filepath.Join(s.opts.Root, "bin/image")
	for _, f := range []string{"lab/pause.tar", "lab/backend.tar", "shardlb.tar"} {
		if _, err := n.ctr("images", "import", filepath.Join(img, f)); err != nil {
			return fmt.Errorf("import %s: %w", f, err)
		}
	}
	name, err := ImageName(filepath.Join(img, "shardlb.tar"))
	if err != nil {
		return err
	}
	_, err = n.ctr("images", "tag", "--force", name, dsImage)
	return err
}

// ImageName reads the image name (io.containerd.image.name) of an OCI archive.
func ImageName(archive string) (string, error) {
	f, err := os.Open(archive)
	if err != nil {
		return "", err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err != nil {
			return "", fmt.Errorf("%s: no index.json: %w", archive, err)
		}
		if h.Name != "index.json" {
			continue
		}
		var idx struct {
			Manifests []struct {
				Annotations map[string]string `json:"annotations"`
			} `json:"manifests"`
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			return "", err
		}
		if err := json.Unmarshal(data, &idx); err != nil {
			return "", err
		}
		if len(idx.Manifests) != 1 || idx.Manifests[0].Annotations["io.containerd.image.name"] == "" {
			return "", fmt.Errorf("%s: want one named image in index.json", archive)
		}
		return idx.Manifests[0].Annotations["io.containerd.image.name"], nil
	}
}

func (s *Stack) startKubelet(i int, n *Node) error {
	kc := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine's cgroups are v1 (hybrid).
failCgroupV1: false
cgroupDriver: cgroupfs
# The node's own cgroup, so that several kubelets share the machine.
cgroupRoot: %s
containerRuntimeEndpoint: unix://%s
address: %s
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# The apiserver calls the kubelet without a client certificate (exec, logs).
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
failSwapOn: false
makeIPTablesUtilChains: false
serializeImagePulls: false
podLogsDir: %s
# The machine's disk and memory are shared with others: never evict the lab's pods.
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%%"
  imagefs.available: "1%%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
syncFrequency: 10s
`, n.cgroup, n.sock, n.IP, filepath.Join(n.Dir, "pod-logs"))
	cfg := filepath.Join(n.Dir, "kubelet.yaml")
	if err := os.WriteFile(cfg, []byte(kc), 0o644); err != nil {
		return err
	}
	argv, err := n.in(filepath.Join(s.opts.Bins, "kubelet"),
		"--config="+cfg, "--kubeconfig="+s.API.Kubeconfig(),
		"--root-dir="+filepath.Join(n.Dir, "kubelet"),
		"--hostname-override="+n.Name, "--node-ip="+n.IP.String(), "--v=1")
	if err != nil {
		return err
	}
	n.kubelet, err = labsys.StartProc(n.Name+" kubelet", filepath.Join(n.Dir, "kubelet.log"), argv...)
	return err
}

// stop stops the kubelet and containerd by PID, then kills by PID whatever is left
// in the node's cgroups (shims, containers) and removes them.
func (n *Node) stop() {
	if n.kubelet != nil {
		n.kubelet.Stop(10 * time.Second)
	}
	if n.containerd != nil {
		n.containerd.Stop(10 * time.Second)
	}
	if n.cgroup != "" {
		_ = removeCgroup(n.cgroup)
	}
	if n.mnt != "" {
		_, _ = labsys.Sh("umount", n.mnt)
	}
}

// running says which of the node's daemons has exited, if one has.
func (n *Node) running() error {
	for _, p := range []*labsys.Proc{n.containerd, n.kubelet} {
		if p != nil {
			if err := p.Exited(); err != nil {
				return err
			}
		}
	}
	return nil
}

// waitNodesReady waits for every Node's Ready condition, failing early when a
// kubelet or containerd exits.
func (s *Stack) waitNodesReady(ctx context.Context, d time.Duration) error {
	return waitFor(ctx, d, "every node Ready", func() error {
		for _, n := range s.Nodes {
			if err := n.running(); err != nil {
				return stop(err)
			}
		}
		for _, p := range s.control {
			if err := p.Exited(); err != nil {
				return stop(err)
			}
		}
		nodes, err := s.Kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		ready := 0
		var not []string
		for _, no := range nodes.Items {
			ok := false
			for _, c := range no.Status.Conditions {
				if c.Type == corev1.NodeReady {
					ok = c.Status == corev1.ConditionTrue
					if !ok {
						not = append(not, no.Name+": "+c.Message)
					}
				}
			}
			if ok {
				ready++
			}
		}
		if ready < len(s.Nodes) {
			return fmt.Errorf("%d of %d nodes Ready (%s)", ready, len(s.Nodes), strings.Join(not, "; "))
		}
		return nil
	})
}

// stopError ends a wait at once.
type stopError struct{ error }

func stop(err error) error { return stopError{err} }

// waitFor polls check every 100 ms until it returns nil or a stop error, ctx ends or
// d passes; the error names what was awaited and the last reason it was not there.
func waitFor(ctx context.Context, d time.Duration, what string, check func() error) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		err := check()
		if err == nil {
			return nil
		}
		var se stopError
		if errors.As(err, &se) {
			return fmt.Errorf("waiting for %s: %w", what, se.error)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w (last: %v)", what, ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
