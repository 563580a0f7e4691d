package main

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// TestDualStack runs the lab with IPv6 beside IPv4 (Options.DualStack) and one
// RequireDualStack LoadBalancer Service, in the guide's onearm mode, in front of a
// pod with an address of each family (an EndpointSlice per family, as Kubernetes
// writes them). The Service gets a VIP of each family, the first of each pool; the
// router holds a route for each via the instance's master, through its IPv4 address
// for the IPv4 VIP and its IPv6 address for the IPv6 one; the client gets the page
// through both. Then the master's process is SIGKILLed while the client probes both
// VIPs every 10 ms: each family must meet the SIGKILL target (killGapTarget), with
// no connection reset after the router moved the VIP and no spread over the backups.
func TestDualStack(t *testing.T) {
	l := startLabWith(t, Options{DualStack: true})
	ctx := context.Background()
	const svcName, podName = "dual-lb", "dual-test"
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: podName, Labels: map[string]string{"what": podName}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: podName, Image: "ghcr.io/loxilb-io/nginx:stable",
			Ports: []corev1.ContainerPort{{ContainerPort: 80}}}}},
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: svcName, Annotations: map[string]string{"loxilb.io/lbmode": "onearm"}},
		Spec: corev1.ServiceSpec{
			Type:              corev1.ServiceTypeLoadBalancer,
			LoadBalancerClass: ptr("loxilb.io/loxilb"),
			IPFamilyPolicy:    ptr(corev1.IPFamilyPolicyRequireDualStack),
			IPFamilies:        []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol},
			Selector:          map[string]string{"what": podName},
			Ports:             []corev1.ServicePort{{Port: vipPort, TargetPort: intstr.FromInt32(80), Protocol: corev1.ProtocolTCP}},
		},
	}
	if _, err := l.Kube.CoreV1().Pods(namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Kube.CoreV1().Services(namespace).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := l.RunPods(ctx); err != nil {
		t.Fatal(err)
	}

	var v4, v6 netip.Addr
	err := waitFor(ctx, 30*time.Second, "a VIP of each family for "+svcName, func() error {
		vs, err := l.VIPs(ctx, svcName)
		if err != nil {
			return err
		}
		v4, v6 = netip.Addr{}, netip.Addr{}
		for _, v := range vs {
			if v.Is4() {
				v4 = v
			} else {
				v6 = v
			}
		}
		if !v4.IsValid() || !v6.IsValid() {
			return fmt.Errorf("status.loadBalancer has %v", vs)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := netip.MustParseAddr("192.168.80.250"); v4 != want {
		t.Errorf("IPv4 VIP %s, want %s, the first of the IPv4 pool", v4, want)
	}
	if want := netip.MustParseAddr("fd00:96::250"); v6 != want {
		t.Errorf("IPv6 VIP %s, want %s, the first of the IPv6 pool (%s)", v6, want, vipPool6)
	}
	inst, err := l.WaitInstance(ctx, svcName, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	vips := map[netip.Addr]string{v4: inst, v6: inst}
	if err := l.WaitSettled(ctx, vips, 60*time.Second); err != nil {
		t.Fatal(err)
	}

	t.Run("the router holds a route for each VIP via the master's address of its family", func(t *testing.T) {
		masters, err := l.Masters()
		if err != nil {
			t.Fatal(err)
		}
		m := masters[inst]
		for _, vip := range sortedVIPs(vips) {
			paths, err := l.Router.Paths(ctx, hostPrefix(vip))
			if err != nil {
				t.Fatal(err)
			}
			if len(paths) != len(l.nodes) {
				t.Errorf("%s: %d paths, want one per node (%d)", vip, len(paths), len(l.nodes))
			}
			for _, p := range paths {
				if p.NextHop.Is4() != vip.Is4() {
					t.Errorf("%s: a path via %s, an address of the other family", vip, p.NextHop)
				}
				if p.Best && (p.NextHop != m.addr(vip) || p.LocalPref != 5000) {
					t.Errorf("%s: best path via %s with LOCAL_PREF %d, want via the master %s (%s) with 5000", vip, p.NextHop, p.LocalPref, m.name, m.addr(vip))
				}
			}
			hops, err := l.Router.KernelRoute(hostPrefix(vip))
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(hops, []netip.Addr{m.addr(vip)}) {
				t.Errorf("%s: the router's kernel route is via %v, want %s", hostPrefix(vip), hops, m.addr(vip))
			}
			t.Logf("%s: %d paths, kernel route via %v (%s, master of %s)", hostPrefix(vip), len(paths), hops, m.name, inst)
		}
	})

	t.Run("the client gets the page through both VIPs", func(t *testing.T) {
		for _, vip := range sortedVIPs(vips) {
			target := netip.AddrPortFrom(vip, vipPort)
			pg, err := l.client.get(ctx, target, 5*time.Second)
			if err != nil {
				t.Errorf("%s through %s: %v", svcName, target, err)
				continue
			}
			if pg.Pod != podName {
				t.Errorf("%s answered by pod %q, want %s", target, pg.Pod, podName)
			}
		}
	})

	t.Run("a master's SIGKILL costs each family no more than the target", func(t *testing.T) {
		res, err := l.Failover(ctx, Kill, inst, vips)
		for _, vip := range sortedVIPs(vips) {
			o, ok := res.Outage[vip]
			if !ok {
				continue // the failover stopped before probing
			}
			moved := "not moved"
			if d, ok := res.Moved[vip]; ok {
				moved = fmt.Sprintf("moved after %v", d.Round(time.Millisecond))
			}
			t.Logf("SIGKILL of %s (master of %s): %s %s: gap %v (the router's route %s): %s; recovery: %s",
				res.Master, inst, familyName(vip), vip, o.Gap.Round(time.Millisecond), moved, o, res.Recovery[vip])
			if o.Probes == 0 || o.Probes == o.Failed {
				t.Errorf("%s: %s, want probes that got the page", vip, o)
			}
			if o.Gap > killGapTarget {
				t.Errorf("%s %s: the SIGKILL cost a gap of %v, want at most %v", familyName(vip), vip, o.Gap.Round(time.Millisecond), killGapTarget)
			}
			if n := res.LateResets[vip]; n > 0 {
				t.Errorf("%s: %d probes started after the router moved the VIP were reset: traffic moved more than once", vip, n)
			}
		}
		if len(res.Spreads) > 0 {
			t.Errorf("the router spread the VIPs over several next hops after losing %s, want the successor alone:\n%s", res.Master, strings.Join(res.Spreads, "\n"))
		}
		if t.Failed() || testing.Verbose() {
			t.Logf("timeline:\n%s", strings.Join(res.Timeline, "\n"))
		}
		if err != nil {
			t.Fatal(err)
		}
	})
}

// familyName names the address family of a.
func familyName(a netip.Addr) string {
	if a.Is4() {
		return "IPv4"
	}
	return "IPv6"
}
