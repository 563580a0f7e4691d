package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// lbEndpoints is, on one node, the endpoints of the frontend vip:port in `shardlb get
// lb -o json` (ok false: no such frontend).
func (l *Lab) lbEndpoints(n *node, vip netip.Addr, port uint16) (eps []string, ok bool, err error) {
	out, err := l.cli(n, "get", "lb", "-o", "json")
	if err != nil {
		return nil, false, err
	}
	var rows []struct {
		ExtIP     string   `json:"extIP"`
		Port      uint16   `json:"port"`
		Endpoints []string `json:"endpoints"`
	}
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		return nil, false, fmt.Errorf("%s: get lb: %w: %s", n.name, err, out)
	}
	for _, r := range rows {
		if r.ExtIP == vip.String() && r.Port == port {
			return r.Endpoints, true, nil
		}
	}
	return nil, false, nil
}

// everyNodeServes waits until every node's frontend vip:port has the endpoint ep
// (present) or not (!present), and returns when that held.
func (l *Lab) everyNodeServes(ctx context.Context, vip netip.Addr, ep string, present bool, d time.Duration) (time.Time, error) {
	var at time.Time
	err := waitFor(ctx, d, fmt.Sprintf("endpoint %s present=%v on every node", ep, present), func() error {
		for _, n := range l.nodes {
			eps, ok, err := l.lbEndpoints(n, vip, vipPort)
			if err != nil {
				return err
			}
			if !ok {
				return fmt.Errorf("%s has no frontend %s:%d", n.name, vip, vipPort)
			}
			if slices.Contains(eps, ep) != present {
				return fmt.Errorf("%s serves %v", n.name, eps)
			}
		}
		at = time.Now()
		return nil
	})
	return at, err
}

// TestEndpointProbe kills the only endpoint's HTTP server of the guide's tcp-lb while
// its pod stays ready: the endpoint leaves every node's table within a few probe
// intervals (probetimeout 1 s, proberetries 1) and the VIP is withdrawn; the server
// back, the endpoint and the page come back. tcp-lb2 is served throughout.
func TestEndpointProbe(t *testing.T) {
	l := startLab(t, 0)
	ctx := context.Background()
	guide(t, l)
	vip, err := l.VIP(ctx, "tcp-lb")
	if err != nil {
		t.Fatal(err)
	}
	vip2, err := l.VIP(ctx, "tcp-lb2")
	if err != nil {
		t.Fatal(err)
	}
	l.mu.Lock()
	b := l.pods["tcp-test"]
	l.mu.Unlock()
	if b == nil {
		t.Fatal("no backend for pod tcp-test")
	}
	ep := netip.AddrPortFrom(b.addr, b.port).String()
	patch := `{"metadata":{"annotations":{"loxilb.io/liveness":"yes","loxilb.io/probetype":"http","loxilb.io/probetimeout":"1","loxilb.io/proberetries":"1"}}}`
	if _, err := l.Kube.CoreV1().Services(namespace).Patch(ctx, "tcp-lb", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.everyNodeServes(ctx, vip, ep, true, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	page := func(v netip.Addr) error {
		_, err := l.client.get(ctx, netip.AddrPortFrom(v, vipPort), 2*time.Second)
		return err
	}
	// Probed for a few intervals, the healthy endpoint stays.
	time.Sleep(3 * time.Second)
	if err := page(vip); err != nil {
		t.Fatalf("tcp-lb's page before the kill: %v", err)
	}
	if s, err := l.Kube.CoreV1().Services(namespace).Get(ctx, "tcp-lb", metav1.GetOptions{}); err != nil || s.Annotations["shardlb.io/unhealthy-endpoints"] != "" {
		t.Fatalf("a healthy endpoint is recorded unhealthy (%v): %q", err, s.Annotations["shardlb.io/unhealthy-endpoints"])
	}

	killed := time.Now()
	b.proc.Stop(5 * time.Second)
	gone, err := l.everyNodeServes(ctx, vip, ep, false, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("endpoint %s out of every node's table %v after its server was killed (probes every 1 s, 1 failure decides)", ep, gone.Sub(killed).Round(10*time.Millisecond))
	err = waitFor(ctx, 10*time.Second, "tcp-lb's VIP withdrawn at the router", func() error {
		paths, err := l.Router.Paths(ctx, netip.PrefixFrom(vip, 32))
		if err != nil {
			return err
		}
		if len(paths) > 0 {
			return fmt.Errorf("%d paths", len(paths))
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
	if err := page(vip2); err != nil {
		t.Errorf("tcp-lb2's page while tcp-lb's endpoint is down: %v", err)
	}

	restarted := time.Now()
	nb, err := startBackend(ctx, b.pod, b.ns, filepath.Join(l.Dir, "pod-"+b.pod), b.addr, b.addr6, b.port)
	if nb != nil {
		l.mu.Lock()
		l.pods[b.pod] = nb
		l.mu.Unlock()
	}
	if err != nil {
		t.Fatal(err)
	}
	back, err := l.everyNodeServes(ctx, vip, ep, true, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("endpoint %s back in every node's table %v after its server restarted", ep, back.Sub(restarted).Round(10*time.Millisecond))
	if err := waitFor(ctx, 15*time.Second, "tcp-lb's page through its VIP again", func() error { return page(vip) }); err != nil {
		t.Error(err)
	}
	if err := page(vip2); err != nil {
		t.Errorf("tcp-lb2's page: %v", err)
	}
}
