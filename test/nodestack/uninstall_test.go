package nodestack

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// pinDir is where the manifest pins the datapath (--pinPath), on each node's bpffs.
const pinDir = "/sys/fs/bpf/shardlb"

// testUninstall deletes what `kubectl apply -k` installed, as an operator uninstalls
// (the ServiceAccount and RBAC go before the DaemonSet), and checks that every pod
// knew it was removed for good although the manifest pins the datapath and offers
// graceful restart: once the pods are gone the router holds no route for the guide's
// VIPs (a restart would leave them for the 120 s restart time) and no node keeps
// anything pinned.
func testUninstall(ctx context.Context, t *testing.T, st *Stack, overlay string) {
	for _, n := range st.Nodes {
		if out, err := n.run(ctx, "ls", pinDir+"/maps"); err != nil || !strings.Contains(out, "conntrack4_tcp") {
			t.Fatalf("%s: before the uninstall, %s/maps holds %q (%v), want the pinned maps", n.Name, pinDir, out, err)
		}
	}
	start := time.Now()
	out, err := st.Kubectl(ctx, "delete", "-k", overlay, "--timeout=3m")
	t.Logf("kubectl delete -k %s\n%s", overlay, out)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.WaitFor(ctx, 3*time.Minute, "the DaemonSet's pods gone", func() error {
		pods, err := st.Pods(ctx, lbNS, dsSelector)
		if err == nil && len(pods) > 0 {
			err = fmt.Errorf("%d pods left", len(pods))
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	gone := time.Since(start)
	t.Logf("the pods were gone %v after kubectl delete began", gone.Round(time.Millisecond))
	// The last pod withdrew before it exited; FRR's selection may lag by a moment.
	if err := st.WaitFor(ctx, 5*time.Second, "the router to hold no route for the guide's VIPs", func() error {
		for name, vip := range guideVIPs {
			paths, err := st.Router.Paths(ctx, netip.PrefixFrom(vip, 32))
			if err != nil {
				return err
			}
			if len(paths) > 0 {
				return fmt.Errorf("%s (%s): %d paths, first via %s stale=%v", vip, name, len(paths), paths[0].NextHop, paths[0].Stale)
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("%v: the pods stopped as for a restart, not an uninstall", err)
	}
	for _, n := range st.Nodes {
		if out, err := n.run(ctx, "sh", "-c", "test -e "+pinDir+" && find "+pinDir+" || true"); err != nil || out != "" {
			t.Errorf("%s: after the uninstall, still pinned under %s: %q (%v)", n.Name, pinDir, out, err)
		}
	}
}

// run runs argv in the node's namespaces and returns its output, trimmed.
func (n *Node) run(ctx context.Context, argv ...string) (string, error) {
	full, err := n.in(argv...)
	if err != nil {
		return "", err
	}
	out, err := exec.CommandContext(ctx, full[0], full[1:]...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}
