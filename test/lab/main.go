// Command lab runs the service-sharding guide end to end on one machine, with BGP
// instead of ARP: an FRR router, a real kube-apiserver with etcd, three shardlb nodes,
// nginx pods and a client, each in its own network namespace. `make demo` runs it;
// lab_test.go drives the same Lab and asserts every step, and the benchmarks measure
// failover, throughput and service-create-to-reachable time with it.
//
// Everything it starts it stops by PID and its namespaces are deleted on exit, on
// failure and on Ctrl-C; a lab left by a crashed run is removed at start.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/shardlb/shardlb/internal/labsys"
)

func main() {
	keep := flag.Bool("keep", false, "keep the lab directory (logs, configurations) after exit")
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
	say("== shardlb lab: the service-sharding guide, BGP instead of ARP")
	l, err := Start(ctx, Options{Log: progress, Keep: keep})
	if err != nil {
		return fail("start the lab", err)
	}
	failed := true
	defer func() {
		if failed {
			l.opts.Keep = true
			say("logs kept in %s", l.Dir)
		}
		l.Close()
	}()
	say("router (FRR, AS %d) %s, kube-apiserver %s, client %s", asn, routerLAN, l.API.URL(), clientAddr)
	if err := l.StartNodes(ctx); err != nil {
		return fail("start the shardlb nodes", err)
	}
	var names []string
	for _, n := range l.nodes {
		names = append(names, fmt.Sprintf("%s %s", n.name, n.ip))
	}
	say("shardlb nodes: %s", strings.Join(names, ", "))

	say("\n$ kubectl apply -f manifest/examples/   # the lab applies them through the API")
	if err := l.ApplyExamples(ctx); err != nil {
		return fail("apply the guide's manifests", err)
	}
	say("service/tcp-lb created\npod/tcp-test created\nservice/tcp-lb2 created\npod/tcp-test2 created")

	vips := map[netip.Addr]string{}
	for _, svc := range []string{"tcp-lb", "tcp-lb2"} {
		vip, err := l.WaitVIP(ctx, svc, 30*time.Second)
		if err != nil {
			return fail("VIP of "+svc, err)
		}
		inst, err := l.WaitInstance(ctx, svc, 30*time.Second)
		if err != nil || inst == "" {
			return fail("instance of "+svc, fmt.Errorf("no shardlb.io/instance annotation (%v)", err))
		}
		vips[vip] = inst
	}
	if err := l.WaitSettled(ctx, vips, 60*time.Second); err != nil {
		return fail("routes and masters", err)
	}
	say("\n$ kubectl get svc   # as read from the apiserver")
	if err := l.PrintServices(ctx, w); err != nil {
		return fail("get svc", err)
	}
	for _, n := range l.nodes {
		say("\n%s$ shardlb get ha", n.name)
		out, err := l.cli(n, "get", "ha")
		if err != nil {
			return fail("get ha on "+n.name, err)
		}
		fmt.Fprint(w, out)
	}
	say("\n%s$ shardlb get services   # VIP, instance and master in one view", l.nodes[0].name)
	out, err := l.cli(l.nodes[0], "get", "services")
	if err != nil {
		return fail("get services", err)
	}
	fmt.Fprint(w, out)

	say("\nrouter$ vtysh -c 'show bgp ipv4 unicast'   # the master's path wins on LOCAL_PREF")
	rib, err := l.Router.Vtysh(ctx, "show bgp ipv4 unicast")
	if err != nil {
		return fail("FRR routes", err)
	}
	fmt.Fprint(w, trimFRR(string(rib)))

	gobgp, err := gobgpCLI()
	if err != nil {
		return fail("build the gobgp CLI", err)
	}
	say("\n%s$ gobgp global rib", l.nodes[0].name)
	out, err = labsys.NSRun(l.nodes[0].ns, gobgp, "global", "rib")
	if err != nil {
		return fail("gobgp global rib", err)
	}
	fmt.Fprint(w, out)

	for i, vip := range sortedVIPs(vips) {
		t := netip.AddrPortFrom(vip, vipPort)
		say("\nclient$ curl http://%s", t)
		pg, err := l.client.get(ctx, t, 5*time.Second)
		if err != nil {
			return fail("fetch through "+vip.String(), err)
		}
		if i == 0 {
			fmt.Fprint(w, pg.Body)
		} else {
			say("<title>Welcome to nginx!</title> ... (the same page, %d bytes, served by pod %s)", len(pg.Body), pg.Pod)
		}
	}

	inst := vips[sortedVIPs(vips)[0]]
	masters, err := l.Masters()
	if err != nil {
		return fail("masters", err)
	}
	say("\n== failover: SIGKILL of %s, master of %s, while the client fetches both VIPs every 10 ms", masters[inst].name, inst)
	res, err := l.Failover(ctx, Kill, inst, vips)
	for _, vip := range sortedVIPs(vips) {
		if o, ok := res.Outage[vip]; ok {
			say("%-15s (%s): %s", vip, vips[vip], o)
		}
	}
	if err != nil {
		return fail("failover", err)
	}
	restarted := 0
	for _, o := range res.Recovery {
		restarted += o.Failed
	}
	say("%s restarted and took its shard back: %d failed probes", res.Master, restarted)
	say("target: a SIGKILL gap <= %d ms (the router learns it from the closed BGP session)", killGapTarget.Milliseconds())

	masters, err = l.Masters()
	if err != nil {
		return fail("masters", err)
	}
	say("\n== planned stop: SIGTERM of %s, master of %s; it hands %s over first, then drains", masters[inst].name, inst, inst)
	say("   (a keep-alive connection opened through it sends a request every 20 ms meanwhile)")
	ka, err := l.KeepAliveAcrossStop(ctx, inst, vips)
	if err != nil {
		return fail("planned stop", err)
	}
	say("%-15s (%s): %s", ka.VIP, inst, ka)
	say("the new master handed that connection's packets to the old one until it left")
	say("\nok: every step worked (%s)", time.Since(start).Round(time.Second))
	failed = false
	return 0
}

// trimFRR drops FRR's legend lines so the table reads like the guide's.
func trimFRR(s string) string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		// The legend: "... codes:" lines and the continuation of the status codes.
		if strings.Contains(line, "codes:") || strings.Contains(line, "i internal, r RIB-failure") {
			continue
		}
		out = append(out, line)
	}
	return strings.Join(out, "\n")
}
