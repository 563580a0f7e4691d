package main

import (
	"context"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/shardlb/shardlb/internal/labsys"
)

// otherClient is a second address of the client namespace, outside the source range
// the step below allows.
var otherClient = netip.MustParseAddr("203.0.113.11")

// checkSourceRanges creates a service restricted to the lab client's address
// (spec.loadBalancerSourceRanges) in front of the guide's first pod: a client from
// that address gets the page through the VIP, one from another address of the same
// namespace gets nothing, and once the range is widened it gets the page too.
func checkSourceRanges(t *testing.T, l *Lab) {
	t.Helper()
	ctx := context.Background()
	var s labsys.Script
	s.Run("ip", "-n", clientNS, "addr", "add", cidr(otherClient, 24), "dev", "eth0")
	if s.Err != nil {
		t.Fatal(s.Err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "ranged", Namespace: namespace, Annotations: map[string]string{"loxilb.io/lbmode": "onearm"}},
		Spec: corev1.ServiceSpec{
			Type:                     corev1.ServiceTypeLoadBalancer,
			LoadBalancerClass:        ptr("loxilb.io/loxilb"),
			Selector:                 map[string]string{"what": "tcp-test"},
			Ports:                    []corev1.ServicePort{{Port: vipPort, TargetPort: intstr.FromInt32(80), Protocol: corev1.ProtocolTCP}},
			LoadBalancerSourceRanges: []string{clientAddr.String() + "/32"},
		},
	}
	if _, err := l.Kube.CoreV1().Services(namespace).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = l.Kube.CoreV1().Services(namespace).Delete(ctx, svc.Name, metav1.DeleteOptions{})
	}()
	if err := l.syncEndpointSlices(ctx); err != nil {
		t.Fatal(err)
	}
	vip, err := l.WaitVIP(ctx, svc.Name, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	target := netip.AddrPortFrom(vip, vipPort)
	err = waitFor(ctx, 30*time.Second, "the page from "+clientAddr.String()+" through "+vip.String(), func() error {
		_, err := l.client.getFrom(ctx, clientAddr, target, time.Second)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	// The datapath drops the other address's SYN: no answer at all.
	for range 3 {
		if _, err := l.client.getFrom(ctx, otherClient, target, 500*time.Millisecond); err == nil {
			t.Fatalf("%s got the page through %s although it is outside the service's source ranges", otherClient, vip)
		}
	}
	t.Logf("%s outside %s/32 gets nothing through %s; %s gets the page", otherClient, clientAddr, vip, clientAddr)

	// Widened to the client's /24, the same address gets the page: the ranges change
	// live, without a new VIP.
	cur, err := l.Kube.CoreV1().Services(namespace).Get(ctx, svc.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Spec.LoadBalancerSourceRanges = []string{netip.PrefixFrom(clientAddr, 24).Masked().String()}
	if _, err := l.Kube.CoreV1().Services(namespace).Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	err = waitFor(ctx, 30*time.Second, "the page from "+otherClient.String()+" once the range is widened", func() error {
		_, err := l.client.getFrom(ctx, otherClient, target, time.Second)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if now, err := l.VIP(ctx, svc.Name); err != nil || now != vip {
		t.Errorf("VIP after widening the ranges: %v, %v; want %s", now, err, vip)
	}
}
