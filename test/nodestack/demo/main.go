// Command demo runs the service-sharding guide on the node stack (test/nodestack): a
// kube-apiserver with its controller-manager and scheduler, three nodes each with a
// containerd and a kubelet, an FRR router and a client, each node in its own
// namespaces. shardlb is installed as an operator installs it (`kubectl apply -k
// test/nodestack/overlay`, the image `make image` built), the guide's backends are
// Deployments, and the demo prints what the guide prints: the DaemonSet's pods, the
// services with their VIPs, `shardlb get ha` on every node through `kubectl exec`, the
// router's table and the page through both VIPs. `make demo` runs it (root); it stops
// everything it started, also on failure and on Ctrl-C.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/shardlb/shardlb/test/nodestack"
)

func main() {
	keep := flag.Bool("keep", false, "keep the stack's directory (logs, configurations) after exit")
	verbose := flag.Bool("v", false, "print progress lines")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop() // a second Ctrl-C ends the process at once
	}()
	os.Exit(demo(ctx, os.Stdout, *keep, *verbose))
}

// demo prints what the guide prints and returns the exit code: 0 only if every step
// worked.
func demo(ctx context.Context, w io.Writer, keep, verbose bool) int {
	var progress io.Writer
	if verbose {
		progress = w
	}
	say := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	fail := func(step string, err error) int {
		say("\nFAILED: %s: %v", step, err)
		return 1
	}
	start := time.Now()
	say("== shardlb on the node stack: the service-sharding guide, BGP instead of ARP")
	say("starting FRR, etcd, kube-apiserver, controller-manager, scheduler, and 3 nodes (containerd + kubelet)...")
	st, err := nodestack.Start(ctx, nodestack.Options{Log: progress, Keep: keep})
	if err != nil {
		return fail("start the node stack", err)
	}
	failed := true
	defer func() {
		if failed {
			var b strings.Builder
			st.Diagnose(context.Background(), &b)
			fmt.Fprint(w, "\n"+b.String())
		}
		st.Close()
		if keep {
			say("kept %s", st.Dir)
		}
	}()
	var nodes []string
	for _, n := range st.Nodes {
		nodes = append(nodes, fmt.Sprintf("%s %s", n.Name, n.IP))
	}
	say("nodes Ready: %s; router 10.80.0.1 (AS 64512); client %s (%s)", strings.Join(nodes, ", "),
		nodestack.ClientAddr, time.Since(start).Round(time.Second))

	kubectl := func(args ...string) error {
		say("\n$ kubectl %s", strings.Join(args, " "))
		out, err := st.Kubectl(ctx, args...)
		fmt.Fprint(w, out)
		return err
	}
	if err := kubectl("apply", "-k", "test/nodestack/overlay"); err != nil {
		return fail("install shardlb", err)
	}
	if _, err := st.WaitDaemonSet(ctx); err != nil {
		return fail("the DaemonSet's pods", err)
	}
	if err := kubectl("-n", "kube-system", "get", "pods", "-o", "wide"); err != nil {
		return fail("get pods", err)
	}

	if err := kubectl("apply", "-f", "test/nodestack/testdata/guide.yaml"); err != nil {
		return fail("apply the guide's services", err)
	}
	pages := map[string]map[string]int{}
	for _, svc := range nodestack.GuideServices {
		vip, err := st.WaitVIP(ctx, "default", svc.Name)
		if err != nil {
			return fail("VIP of "+svc.Name, err)
		}
		if vip != svc.VIP {
			return fail("VIP of "+svc.Name, fmt.Errorf("got %s, the guide's is %s", vip, svc.VIP))
		}
		seen, err := st.WaitAnswers(ctx, "default", svc.Selector, netip.AddrPortFrom(vip, nodestack.VIPPort))
		if err != nil {
			return fail("serve "+svc.Name, err)
		}
		pages[svc.Name] = seen
	}
	if err := kubectl("get", "pods", "-o", "wide"); err != nil {
		return fail("get pods", err)
	}
	if err := kubectl("get", "svc"); err != nil {
		return fail("get svc", err)
	}
	for _, n := range st.Nodes {
		pod, err := st.PodOn(ctx, n.Name)
		if err != nil {
			return fail("shardlb pod on "+n.Name, err)
		}
		say("\n# %s", n.Name)
		if err := kubectl("-n", "kube-system", "exec", pod, "--", "shardlb", "get", "ha"); err != nil {
			return fail("get ha on "+n.Name, err)
		}
	}
	pod, err := st.PodOn(ctx, st.Nodes[0].Name)
	if err != nil {
		return fail("shardlb pod", err)
	}
	say("\n# the view the guide says has \"no easy way out right now\": service, VIP, shard, master")
	if err := kubectl("-n", "kube-system", "exec", pod, "--", "shardlb", "get", "services"); err != nil {
		return fail("get services", err)
	}

	say("\nrouter$ vtysh -c 'show bgp ipv4 unicast'   # every node announces every VIP; the master's path wins on LOCAL_PREF")
	rib, err := st.Router.Vtysh(ctx, "show bgp ipv4 unicast")
	if err != nil {
		return fail("the router's table", err)
	}
	fmt.Fprint(w, trimFRR(string(rib)))
	say("\nrouter$ vtysh -c 'show ip route bgp'   # what the router forwards by")
	route, err := st.Router.Vtysh(ctx, "show ip route bgp")
	if err != nil {
		return fail("the router's routes", err)
	}
	fmt.Fprint(w, trimFRR(string(route)))

	for _, svc := range nodestack.GuideServices {
		addr := netip.AddrPortFrom(svc.VIP, nodestack.VIPPort)
		say("\nclient$ curl http://%s", addr)
		body, err := nodestack.Get(ctx, addr, 5*time.Second)
		if err != nil {
			return fail("fetch through "+addr.String(), err)
		}
		fmt.Fprint(w, body)
		say("# %s's pods answered through %s, each on a new connection: %v", svc.Name, svc.VIP, pages[svc.Name])
	}
	say("\nok: every step worked (%s); stopping everything", time.Since(start).Round(time.Second))
	failed = false
	return 0
}

// trimFRR drops FRR's legend lines so the table reads like the guide's.
func trimFRR(s string) string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		l := strings.TrimSpace(line)
		if strings.Contains(strings.ToLower(l), "codes:") || strings.Contains(l, "i internal, r RIB-failure") ||
			slices.ContainsFunc([]string{"t - trapped", "T - Table", "O - OSPF", "f - OpenFabric", "> - selected"},
				func(p string) bool { return strings.HasPrefix(l, p) }) {
			continue
		}
		out = append(out, line)
	}
	return strings.Join(out, "\n")
}
