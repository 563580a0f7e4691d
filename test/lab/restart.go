package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// EveryNodeMasters applies the guide's two onearm services and a fullnat one in
// front of the first guide pod on the third instance (llb-inst1), so that every node
// masters a VIP, and returns VIP -> instance once the lab has settled.
func (l *Lab) EveryNodeMasters(ctx context.Context) (map[netip.Addr]string, error) {
	if err := l.ApplyExamples(ctx); err != nil {
		return nil, err
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "tcp-lb3", Namespace: namespace, Annotations: map[string]string{
			"loxilb.io/lbmode": "fullnat", "loxilb.io/zoneinstance": "llb-inst1",
		}},
		Spec: corev1.ServiceSpec{
			Type:              corev1.ServiceTypeLoadBalancer,
			LoadBalancerClass: ptr("loxilb.io/loxilb"),
			Selector:          map[string]string{"what": "tcp-test"},
			Ports:             []corev1.ServicePort{{Port: vipPort, TargetPort: intstr.FromInt32(80), Protocol: corev1.ProtocolTCP}},
		},
	}
	if _, err := l.Kube.CoreV1().Services(namespace).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	if err := l.syncEndpointSlices(ctx); err != nil {
		return nil, err
	}
	vips := map[netip.Addr]string{}
	for _, name := range []string{"tcp-lb", "tcp-lb2", "tcp-lb3"} {
		vip, err := l.WaitVIP(ctx, name, 30*time.Second)
		if err != nil {
			return nil, err
		}
		inst, err := l.WaitInstance(ctx, name, 30*time.Second)
		if err != nil {
			return nil, err
		}
		vips[vip] = inst
	}
	return vips, l.WaitSettled(ctx, vips, 60*time.Second)
}

// LongLived is what the long-lived connections through one VIP saw while the nodes
// restarted: a keep-alive connection with a request every keepAliveEvery, and a
// stream of streamBytes.
type LongLived struct {
	VIP netip.Addr
	// Requests answered on the keep-alive connection, and its first error ("" if
	// none).
	Requests     int
	KeepAliveErr string
	// StreamBytes read, checked against the pattern, in StreamTook; StreamErr is the
	// first error ("" if the whole stream arrived intact).
	StreamBytes int
	StreamTook  time.Duration
	StreamErr   string
}

func (c LongLived) String() string {
	s := fmt.Sprintf("%s: keep-alive %d requests", c.VIP, c.Requests)
	if c.KeepAliveErr != "" {
		s += " (" + c.KeepAliveErr + ")"
	}
	s += fmt.Sprintf(", stream %d of %d bytes in %v", c.StreamBytes, streamBytes, c.StreamTook.Round(100*time.Millisecond))
	if c.StreamErr != "" {
		s += " (" + c.StreamErr + ")"
	}
	return s
}

// RestartResult is what RestartUnderLoad saw.
type RestartResult struct {
	Conns  []LongLived
	Probes map[netip.Addr]Outage
	// Moves are the router's kernel route changes for the VIPs that did not point at
	// the VIP's master (a missing route included).
	Moves []string
	// MastersBefore and MastersAfter are instance -> master node.
	MastersBefore, MastersAfter map[string]string
	Timeline                    []string
}

// RestartUnderLoad opens a keep-alive connection and a stream through every VIP, then
// restarts every node's process in turn, once per way in ways (CleanStop: SIGTERM;
// Kill: SIGKILL), each time starting the same binary again at once and waiting until
// the router has its session and fresh routes back, while the client probes every VIP
// every 10 ms and the router's kernel routes are polled every millisecond. It returns
// once every stream has ended.
func (l *Lab) RestartUnderLoad(ctx context.Context, vips map[netip.Addr]string, ways []Failure) (RestartResult, error) {
	var res RestartResult
	if err := l.WaitSettled(ctx, vips, 60*time.Second); err != nil {
		return res, err
	}
	masters, err := l.Masters()
	if err != nil {
		return res, err
	}
	res.MastersBefore = map[string]string{}
	via := map[netip.Prefix]netip.Addr{}
	var prefixes []netip.Prefix
	for _, v := range sortedVIPs(vips) {
		n := masters[vips[v]]
		if n == nil {
			return res, fmt.Errorf("instance %s of %s has no master", vips[v], v)
		}
		res.MastersBefore[vips[v]] = n.name
		p := netip.PrefixFrom(v, 32)
		via[p], prefixes = n.ip, append(prefixes, p)
	}

	connCtx, stopConns := context.WithCancel(ctx)
	defer stopConns()
	var wg, streams sync.WaitGroup
	res.Conns = make([]LongLived, len(prefixes))
	var streamConns []io.Closer
	for i, p := range prefixes {
		c := &res.Conns[i]
		c.VIP = p.Addr()
		target := netip.AddrPortFrom(c.VIP, vipPort)
		ka, err := l.client.dial(ctx, "tcp", target.String())
		if err != nil {
			return res, err
		}
		defer ka.Close()
		st, err := l.client.dial(ctx, "tcp", target.String())
		if err != nil {
			return res, err
		}
		defer st.Close()
		streamConns = append(streamConns, st)
		wg.Go(func() { c.Requests, c.KeepAliveErr = keepAlive(connCtx, ka, target) })
		streams.Go(func() {
			start := time.Now()
			c.StreamBytes, c.StreamErr = readStream(st, target)
			c.StreamTook = time.Since(start)
		})
	}

	probes := l.client.startProbes(targets(vips), probeEvery)
	watch := l.watchRoutes(prefixes)
	time.Sleep(time.Second) // good probes and some stream first
	t0 := time.Now()
	marks := []string{fmt.Sprintf("%+6dms lab: t0 is %s", 0, t0.UTC().Format("15:04:05.000"))}
	mark := func(what string) {
		marks = append(marks, fmt.Sprintf("%+6dms lab: %s", time.Since(t0).Milliseconds(), what))
	}
	var errs []error
rounds:
	for _, way := range ways {
		for _, n := range l.nodes {
			mark(fmt.Sprintf("%s %s", n.name, way))
			switch way {
			case Kill:
				n.kill()
			default:
				if err := n.stop(); err != nil {
					errs = append(errs, err)
					break rounds
				}
			}
			mark(n.name + " exited, starting again")
			if err := n.start(); err != nil {
				errs = append(errs, err)
				break rounds
			}
			if err := l.waitFresh(ctx, n, prefixes); err != nil {
				errs = append(errs, err)
				break rounds
			}
			mark(n.name + ": session up, routes fresh")
			if err := l.WaitSettled(ctx, vips, 60*time.Second); err != nil {
				errs = append(errs, err)
				break rounds
			}
			mark("settled")
		}
	}
	// The streams end on their own (a failed one at once); the keep-alive
	// connections run until then.
	streamsDone := make(chan struct{})
	go func() { streams.Wait(); close(streamsDone) }()
	select {
	case <-streamsDone:
	case <-time.After(2 * time.Minute):
		errs = append(errs, errors.New("streams not ended within 2 minutes of the last restart"))
		for _, st := range streamConns {
			_ = st.Close() // ends the reads
		}
		<-streamsDone
	}
	stopConns()
	wg.Wait()
	res.Probes = byVIP(probes.stop())
	changes := watch()
	for _, ch := range changes {
		if want := via[ch.Prefix]; len(ch.Hops) != 1 || ch.Hops[0] != want {
			res.Moves = append(res.Moves, fmt.Sprintf("%+dms %s via %v, not %v", ch.At.Sub(t0).Milliseconds(), ch.Prefix, ch.Hops, want))
		}
	}
	if after, err := l.Masters(); err != nil {
		errs = append(errs, err)
	} else {
		res.MastersAfter = map[string]string{}
		for inst, n := range after {
			res.MastersAfter[inst] = n.name
		}
	}
	lines := append(timeline(t0, changes, res.Probes), marks...)
	slices.SortStableFunc(lines, func(a, b string) int {
		ai, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.Fields(a)[0], "ms")))
		bi, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.Fields(b)[0], "ms")))
		return ai - bi
	})
	res.Timeline = lines
	return res, errors.Join(errs...)
}

// waitFresh waits until the router has its session with n established again and
// none of its paths for prefixes is stale (n re-announced them after its restart).
func (l *Lab) waitFresh(ctx context.Context, n *node, prefixes []netip.Prefix) error {
	return waitFor(ctx, 60*time.Second, n.name+"'s session and fresh routes at the router", func() error {
		if !n.proc.Running() {
			return fmt.Errorf("%s exited: %v (log %s)", n.name, n.proc.ExitErr(), n.log)
		}
		sum, err := l.Router.Summary(ctx)
		if err != nil {
			return err
		}
		if s := sum[n.ip].State; s != "Established" {
			return fmt.Errorf("session %s", s)
		}
		for _, p := range prefixes {
			paths, err := l.Router.Paths(ctx, p)
			if err != nil {
				return err
			}
			for _, path := range paths {
				if path.Peer == n.ip && path.Stale {
					return fmt.Errorf("%s: path still stale", p)
				}
			}
		}
		return nil
	})
}

// keepAlive sends a request over conn every keepAliveEvery until ctx ends or one
// fails, and returns how many were answered and the failure.
func keepAlive(ctx context.Context, conn net.Conn, target netip.AddrPort) (int, string) {
	br := bufio.NewReader(conn)
	n := 0
	for {
		select {
		case <-ctx.Done():
			return n, ""
		case <-time.After(keepAliveEvery):
		}
		// A restart must not stall a request either: a second bounds each.
		if err := conn.SetDeadline(time.Now().Add(time.Second)); err != nil {
			return n, err.Error()
		}
		if _, err := fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", target); err != nil {
			return n, fmt.Sprintf("request %d: %v", n+1, err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return n, fmt.Sprintf("request %d: %v", n+1, err)
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK || resp.Close {
			return n, fmt.Sprintf("request %d: %s, %v", n+1, resp.Status, err)
		}
		n++
	}
}

// readStream fetches /stream over conn and checks every byte against the pattern.
func readStream(conn io.ReadWriter, target netip.AddrPort) (got int, failure string) {
	if _, err := fmt.Fprintf(conn, "GET /stream HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", target); err != nil {
		return 0, err.Error()
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, resp.Status
	}
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		for i := range n {
			if buf[i] != byte((got+i)%251) {
				return got + i, fmt.Sprintf("byte %d corrupt", got+i)
			}
		}
		got += n
		if err == io.EOF {
			if got != streamBytes {
				return got, fmt.Sprintf("ended after %d bytes", got)
			}
			return got, ""
		}
		if err != nil {
			return got, err.Error()
		}
	}
}
