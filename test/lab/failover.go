package main

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Failure is a way a shard's master goes away.
type Failure string

// The failures the issue measures.
const (
	CleanStop Failure = "clean stop" // SIGTERM: withdraw, then release the Leases
	Kill      Failure = "SIGKILL"    // the process dies; the kernel closes its sessions
	LinkCut   Failure = "link cut"   // the node's LAN link goes down; only BFD notices
)

// probeEvery is the probing interval.
const probeEvery = 10 * time.Millisecond

// killGapTarget is what a master's SIGKILL may cost a client probing every 10 ms:
// the longest run of failed probes, as the router learns of the loss from the closed
// BGP session and moves the VIP to the successor.
const killGapTarget = 150 * time.Millisecond

// FailoverResult is what a client probing every VIP saw while a master went away
// (Outage) and while it came back and took its shards back (Recovery).
type FailoverResult struct {
	Failure  Failure
	Instance string
	Master   string // the node taken out
	Outage   map[netip.Addr]Outage
	Recovery map[netip.Addr]Outage
	// Timeline lists, relative to the failure, the router's kernel route changes for
	// the instance's VIPs and the runs of failed probes, for a person to read.
	Timeline []string
	// Spreads are the router's kernel routes for the instance's VIPs, after the
	// failure, with more than one next hop: with ranked backups the router falls back
	// to the successor alone, so there should be none. On a clean stop, the old and
	// the new master both announce as master between the new one's announcement and
	// the old one's demotion (make-before-break): a route over those two alone is that
	// overlap, listed in Overlaps, not a spread; the old master serves its own flows and
	// the ones the new master hands off to it.
	Spreads, Overlaps []string
	// Moved is, per VIP of the instance, when after the failure the router's kernel
	// route for it first left the master (absent: it did not).
	Moved map[netip.Addr]time.Duration
	// LateResets counts, per VIP, the probes reset although they started after the
	// router had moved the VIP away from the master: their connections went through
	// the new next hop from their first packet, so a reset means the traffic moved a
	// second time. A probe that started earlier went through the lost master (its
	// SYN, or all of it) and may be reset when the rest of it reaches another node.
	LateResets map[netip.Addr]int
}

// targets are the VIPs' service addresses.
func targets(vips map[netip.Addr]string) []netip.AddrPort {
	var ts []netip.AddrPort
	for _, v := range sortedVIPs(vips) {
		ts = append(ts, netip.AddrPortFrom(v, vipPort))
	}
	return ts
}

func byVIP(m map[netip.AddrPort]Outage) map[netip.Addr]Outage {
	out := map[netip.Addr]Outage{}
	for t, o := range m {
		out[t.Addr()] = o
	}
	return out
}

// Failover takes the master of instance out with f while the client probes every VIP
// every 10 ms. The outage phase lasts until the router has moved the instance's VIPs
// away from the master and, when the master is gone for good (stop, kill), until
// another node has taken the mastership, plus a second. Then the node comes back
// (restart or link up) and the recovery phase lasts until the lab has settled again
// with every node, plus a second.
func (l *Lab) Failover(ctx context.Context, f Failure, instance string, vips map[netip.Addr]string) (FailoverResult, error) {
	res := FailoverResult{Failure: f, Instance: instance}
	victim, err := l.settledMaster(ctx, instance, vips)
	if err != nil {
		return res, err
	}
	res.Master = victim.name
	var own []netip.Prefix
	for v, in := range vips {
		if in == instance {
			own = append(own, hostPrefix(v))
		}
	}

	p := l.client.startProbes(targets(vips), probeEvery)
	watch := l.watchRoutes(own)
	time.Sleep(300 * time.Millisecond) // a baseline of good probes first
	t0 := time.Now()
	switch f {
	case CleanStop:
		victim.up = false
		go victim.proc.Stop(15 * time.Second)
	case Kill:
		victim.kill()
	case LinkCut:
		if err := victim.setLink(false); err != nil {
			p.stop()
			watch()
			return res, err
		}
	}
	err = waitFor(ctx, 15*time.Second, "the router to move "+instance+" away from "+victim.name, func() error {
		for _, pfx := range own {
			hops, err := l.Router.KernelRoute(pfx)
			if err != nil {
				return err
			}
			if len(hops) == 0 || slices.Contains(hops, victim.addr(pfx.Addr())) {
				return fmt.Errorf("%s via %v", pfx, hops)
			}
		}
		return nil
	})
	if err == nil && f != LinkCut {
		err = waitFor(ctx, 30*time.Second, "a new master of "+instance, func() error {
			if victim.proc.Running() {
				return fmt.Errorf("%s still stopping", victim.name)
			}
			return l.Settled(ctx, vips)
		})
	}
	// The old and the new master's addresses, of both families.
	handover := []netip.Addr{victim.ip, victim.ip6}
	if err == nil && f == CleanStop {
		if masters, merr := l.Masters(); merr == nil && masters[instance] != nil {
			handover = append(handover, masters[instance].ip, masters[instance].ip6)
		}
	}
	time.Sleep(time.Second)
	res.Outage = byVIP(p.stop())
	changes := watch()
	res.Timeline = timeline(t0, changes, res.Outage)
	moved := movedAt(t0, victim, changes)
	res.Moved = map[netip.Addr]time.Duration{}
	for vip, at := range moved {
		res.Moved[vip] = at.Sub(t0)
	}
	res.LateResets = lateResets(moved, res.Outage)
	for _, c := range changes {
		if !c.At.After(t0) || len(c.Hops) < 2 {
			continue
		}
		line := fmt.Sprintf("%+dms %s via %v", c.At.Sub(t0).Milliseconds(), c.Prefix, c.Hops)
		if len(handover) == 4 && !slices.ContainsFunc(c.Hops, func(h netip.Addr) bool { return !slices.Contains(handover, h) }) {
			res.Overlaps = append(res.Overlaps, line)
			continue
		}
		res.Spreads = append(res.Spreads, line)
	}
	if err == nil && f == CleanStop {
		err = victim.exitErr() // a clean stop exits 0
	}
	if err != nil {
		return res, err
	}

	p = l.client.startProbes(targets(vips), probeEvery)
	if f == LinkCut {
		err = victim.setLink(true)
	} else {
		err = victim.start()
	}
	if err == nil {
		err = l.WaitSettled(ctx, vips, 60*time.Second)
	}
	time.Sleep(time.Second)
	res.Recovery = byVIP(p.stop())
	return res, err
}

// settledMaster waits for the steady state (mastership may still be moving, a
// handover after a start) and returns the master of instance.
func (l *Lab) settledMaster(ctx context.Context, instance string, vips map[netip.Addr]string) (*node, error) {
	if err := l.WaitSettled(ctx, vips, 60*time.Second); err != nil {
		return nil, err
	}
	masters, err := l.Masters()
	if err != nil {
		return nil, err
	}
	m := masters[instance]
	if m == nil {
		return nil, fmt.Errorf("instance %s has no master", instance)
	}
	return m, nil
}

// RollingRestart restarts every node in turn with a clean stop, as a DaemonSet
// rollout with maxUnavailable 1 does, waiting for the lab to settle after each,
// while the client probes every VIP every 10 ms. The timeline lists, relative to the
// first stop, each node's stop and start, the router's kernel route changes for the
// VIPs and the runs of failed probes.
func (l *Lab) RollingRestart(ctx context.Context, vips map[netip.Addr]string) (map[netip.Addr]Outage, []string, error) {
	var prefixes []netip.Prefix
	for _, v := range sortedVIPs(vips) {
		prefixes = append(prefixes, hostPrefix(v))
	}
	where := map[string]string{clientNS: "eth0"}
	for _, n := range l.nodes {
		where[n.ns] = "eth0"
	}
	pcap := l.startCapture("rolling", where)
	defer pcap.stop()
	p := l.client.startProbes(targets(vips), probeEvery)
	watch := l.watchRoutes(prefixes)
	time.Sleep(300 * time.Millisecond) // a baseline of good probes first
	t0 := time.Now()
	marks := []string{fmt.Sprintf("%+6dms lab: t0 is %s (pcaps: rolling-*.pcap)", 0, t0.UTC().Format("15:04:05.000"))}
	mark := func(what string) {
		marks = append(marks, fmt.Sprintf("%+6dms lab: %s", time.Since(t0).Milliseconds(), what))
	}
	var err error
	for _, n := range l.nodes {
		mark(n.name + " SIGTERM")
		if err = n.stop(); err != nil {
			break
		}
		mark(n.name + " exited, starting again")
		if err = n.start(); err != nil {
			break
		}
		if err = l.WaitSettled(ctx, vips, 60*time.Second); err != nil {
			break
		}
		mark("settled")
	}
	time.Sleep(time.Second)
	out := byVIP(p.stop())
	lines := append(timeline(t0, watch(), out), marks...)
	slices.SortStableFunc(lines, func(a, b string) int {
		ai, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.Fields(a)[0], "ms")))
		bi, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.Fields(b)[0], "ms")))
		return ai - bi
	})
	return out, lines, err
}

// Cordon cordons the node of instance's master, as `kubectl cordon` does, waits for
// its instances to move (make-before-break) and the lab to settle, then uncordons it
// and waits for the balance to return, while the client probes every VIP every 10 ms.
func (l *Lab) Cordon(ctx context.Context, instance string, vips map[netip.Addr]string) (string, map[netip.Addr]Outage, error) {
	victim, err := l.settledMaster(ctx, instance, vips)
	if err != nil {
		return "", nil, err
	}
	p := l.client.startProbes(targets(vips), probeEvery)
	err = l.setUnschedulable(ctx, victim, true)
	if err == nil {
		err = l.WaitSettled(ctx, vips, 30*time.Second)
	}
	if err == nil {
		err = l.setUnschedulable(ctx, victim, false)
	}
	if err == nil {
		err = l.WaitSettled(ctx, vips, 30*time.Second)
	}
	time.Sleep(time.Second)
	return victim.name, byVIP(p.stop()), err
}

func (l *Lab) setUnschedulable(ctx context.Context, n *node, on bool) error {
	patch := `{"spec":{"unschedulable":null}}`
	if on {
		patch = `{"spec":{"unschedulable":true}}`
	}
	if _, err := l.Kube.CoreV1().Nodes().Patch(ctx, n.name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("cordon %s (%v): %w", n.name, on, err)
	}
	n.cordoned = on
	return nil
}

// movedAt is, per VIP, the router's first route change since t0 that no longer goes
// via victim.
func movedAt(t0 time.Time, victim *node, changes []routeChange) map[netip.Addr]time.Time {
	moved := map[netip.Addr]time.Time{}
	for _, c := range changes {
		v := c.Prefix.Addr()
		if _, ok := moved[v]; !ok && c.At.After(t0) && len(c.Hops) > 0 && !slices.Contains(c.Hops, victim.addr(v)) {
			moved[v] = c.At
		}
	}
	return moved
}

// lateResets counts the resets of probes that started after their VIP moved (movedAt).
func lateResets(moved map[netip.Addr]time.Time, outages map[netip.Addr]Outage) map[netip.Addr]int {
	out := map[netip.Addr]int{}
	for vip, o := range outages {
		at, ok := moved[vip]
		if !ok {
			// Not moved (another instance's VIP): any reset is one too many.
			at = time.Time{}
		}
		for _, r := range o.Resets {
			if r.After(at) {
				out[vip]++
			}
		}
	}
	return out
}

// sortedVIPs returns the VIPs in address order.
func sortedVIPs(vips map[netip.Addr]string) []netip.Addr {
	return slices.SortedFunc(maps.Keys(vips), netip.Addr.Compare)
}

// routeChange is the router's kernel route for a prefix from At on.
type routeChange struct {
	At     time.Time
	Prefix netip.Prefix
	Hops   []netip.Addr
}

// watchRoutes polls the router's kernel routes for prefixes every millisecond until
// the returned function is called, which returns every change seen.
func (l *Lab) watchRoutes(prefixes []netip.Prefix) func() []routeChange {
	done := make(chan struct{})
	out := make(chan []routeChange)
	go func() {
		var changes []routeChange
		last := map[netip.Prefix][]netip.Addr{}
		for {
			for _, p := range prefixes {
				hops, err := l.Router.KernelRoute(p)
				if err == nil && (changes == nil || !slices.Equal(hops, last[p])) {
					last[p] = hops
					changes = append(changes, routeChange{At: time.Now(), Prefix: p, Hops: hops})
				}
			}
			select {
			case <-done:
				out <- changes
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	return func() []routeChange {
		close(done)
		return <-out
	}
}

func timeline(t0 time.Time, routes []routeChange, outages map[netip.Addr]Outage) []string {
	type event struct {
		at   time.Time
		text string
	}
	var evs []event
	for _, r := range routes {
		evs = append(evs, event{r.At, fmt.Sprintf("router: %s via %v", r.Prefix, r.Hops)})
	}
	for vip, o := range outages {
		for _, r := range o.Runs {
			evs = append(evs, event{r.Start, fmt.Sprintf("client: %s: %d probes failed until %+dms", vip, r.Failed, r.End.Sub(t0).Milliseconds())})
		}
	}
	slices.SortStableFunc(evs, func(a, b event) int { return a.at.Compare(b.at) })
	var lines []string
	for _, e := range evs {
		lines = append(lines, fmt.Sprintf("%+6dms %s", e.at.Sub(t0).Milliseconds(), e.text))
	}
	return lines
}
