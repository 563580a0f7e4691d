package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/shardlb/shardlb/kube"
)

// KeepAliveResult is what one keep-alive connection saw while the master of its VIP
// stopped cleanly: the connection was opened through that master, and the router moved
// the VIP to the new master while requests kept going over it.
type KeepAliveResult struct {
	Master   string
	VIP      netip.Addr
	Requests int // sent over the connection until the first failure or the master's exit
	// AfterSwitch counts requests answered after the router had moved the VIP away
	// from the master: their segments reached it only through the new master's handoff.
	AfterSwitch int
	// Failure is the first failed request's error and how long before the end of the
	// master's drain it failed ("" when none failed; a timeout fails probeTimeout after
	// the request was sent). The drain ends when the master
	// deletes its member Lease: the new master then stops handing segments off to it,
	// so the connection may end there.
	Failure      string
	FailedBefore time.Duration
}

func (r KeepAliveResult) String() string {
	s := fmt.Sprintf("%d requests on one connection, %d of them after the router switched", r.Requests, r.AfterSwitch)
	if r.Failure != "" {
		s += fmt.Sprintf("; it ended %v before %s's drain ended (%s)", r.FailedBefore.Round(time.Millisecond), r.Master, r.Failure)
	}
	return s
}

// keepAliveEvery paces the requests on the connection.
const keepAliveEvery = 20 * time.Millisecond

// KeepAliveAcrossStop opens a keep-alive connection through instance's master, stops
// that master cleanly (SIGTERM) while sending a request over the connection every 20 ms
// until it exits, then starts it again and waits for the lab to settle.
func (l *Lab) KeepAliveAcrossStop(ctx context.Context, instance string, vips map[netip.Addr]string) (KeepAliveResult, error) {
	var res KeepAliveResult
	victim, err := l.settledMaster(ctx, instance, vips)
	if err != nil {
		return res, err
	}
	res.Master = victim.name
	for _, v := range sortedVIPs(vips) {
		if vips[v] == instance {
			res.VIP = v
			break
		}
	}
	if !res.VIP.IsValid() {
		return res, fmt.Errorf("instance %s has no VIP", instance)
	}
	target := netip.AddrPortFrom(res.VIP, vipPort)
	conn, err := l.client.dial(ctx, "tcp", target.String())
	if err != nil {
		return res, err
	}
	defer conn.Close()
	br := bufio.NewReader(conn)
	if err := keepAliveGet(conn, br, target); err != nil {
		return res, fmt.Errorf("first request over the connection: %w", err)
	}

	watch := l.watchRoutes([]netip.Prefix{netip.PrefixFrom(res.VIP, 32)})
	drained := l.watchDeletion(ctx, kube.MemberLeaseName(victim.name))
	type result struct {
		start, end time.Time
		err        error
	}
	var results []result
	victim.up = false
	go victim.proc.Stop(15 * time.Second)
	tick := time.NewTicker(keepAliveEvery)
	for victim.proc.Running() {
		start := time.Now()
		err := keepAliveGet(conn, br, target)
		results = append(results, result{start, time.Now(), err})
		if err != nil {
			break
		}
		<-tick.C
	}
	tick.Stop()
	<-victim.proc.Done()
	exited := time.Now()
	routes := watch()
	drainEnd := drained()
	if drainEnd.IsZero() {
		drainEnd = exited
	}
	if err := victim.exitErr(); err != nil {
		return res, err
	}

	// The switch: the first route change that leaves the victim out.
	var switched time.Time
	for _, r := range routes {
		if len(r.Hops) > 0 && !slices.Contains(r.Hops, victim.ip) {
			switched = r.At
			break
		}
	}
	for _, r := range results {
		res.Requests++
		if r.err != nil {
			res.Failure, res.FailedBefore = errorKind(r.err), drainEnd.Sub(r.end)
			break
		}
		if !switched.IsZero() && r.start.After(switched) {
			res.AfterSwitch++
		}
	}
	if switched.IsZero() {
		err = fmt.Errorf("the router never moved %s away from %s", res.VIP, victim.name)
	}
	if serr := victim.start(); err == nil {
		err = serr
	}
	if err == nil {
		err = l.WaitSettled(ctx, vips, 60*time.Second)
	}
	return res, err
}

// watchDeletion watches the Lease name in shardlb's namespace until the returned
// function is called, which returns when the Lease was deleted (zero if it was not).
func (l *Lab) watchDeletion(ctx context.Context, name string) func() time.Time {
	ctx, cancel := context.WithCancel(ctx)
	w, err := l.Kube.CoordinationV1().Leases(lbSystem).Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + name})
	if err != nil {
		cancel()
		return func() time.Time { return time.Time{} }
	}
	at := make(chan time.Time, 1)
	go func() {
		var deleted time.Time
		for ev := range w.ResultChan() {
			if ev.Type == watch.Deleted && deleted.IsZero() {
				deleted = time.Now()
			}
		}
		at <- deleted
	}()
	return func() time.Time {
		cancel()
		w.Stop()
		return <-at
	}
}

// keepAliveGet sends one GET over conn and reads the whole answer.
func keepAliveGet(conn net.Conn, br *bufio.Reader, target netip.AddrPort) error {
	if err := conn.SetDeadline(time.Now().Add(probeTimeout)); err != nil {
		return err
	}
	if _, err := fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", target); err != nil {
		return err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK || resp.Close {
		return fmt.Errorf("%s (close %v)", resp.Status, resp.Close)
	}
	return nil
}
