package kube

import (
	"context"
	"maps"
	"net/netip"
	"slices"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/shardlb/shardlb/shard"
)

// dsrSlice is an EndpointSlice of service whose endpoints run on the nodes named.
func (e *env) dsrSlice(service string, nodeOf map[string]string) *discoveryv1.EndpointSlice {
	es := e.slice(service, "")
	es.Endpoints = nil
	for _, addr := range slices.Sorted(maps.Keys(nodeOf)) {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{addr}, NodeName: ptr.To(nodeOf[addr]),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}})
	}
	return es
}

// memberLease writes the member Lease of member with its node addresses, as a shardlb
// on that node does.
func (e *env) memberLease(tb testing.TB, member, addrs string) {
	tb.Helper()
	ctx := context.Background()
	leases := e.client.CoordinationV1().Leases(e.ns)
	l, err := leases.Get(ctx, MemberLeaseName(member), metav1.GetOptions{})
	if err != nil {
		l = &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: MemberLeaseName(member), Namespace: e.ns,
			Labels: map[string]string{labelPartOf: "shardlb"}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(member), LeaseDurationSeconds: ptr.To[int32](3600),
				RenewTime: ptr.To(metav1.NewMicroTime(time.Now()))}}
	}
	if l.Annotations == nil {
		l.Annotations = map[string]string{}
	}
	l.Annotations[annotationAddresses] = addrs
	if l.ResourceVersion == "" {
		_, err = leases.Create(ctx, l, metav1.CreateOptions{})
	} else {
		_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
	}
	if err != nil {
		tb.Fatalf("write member Lease of %s: %v", member, err)
	}
}

// nodesOf is endpoint address -> node address of a frontend.
func nodesOf(fe shard.Frontend) map[string]string {
	out := map[string]string{}
	for _, ep := range fe.Endpoints {
		n := ""
		if ep.Node.IsValid() {
			n = ep.Node.String()
		}
		out[ep.Addr.String()] = n
	}
	return out
}

// A dsr service is served: its frontends carry each endpoint's node address, read from
// that node's member Lease by the EndpointSlice's nodeName, and follow it when it
// changes; dsr with rr selection is refused with a Warning, which a change of the
// selection lifts.
func TestDSRServicesCarryTheEndpointsNodes(t *testing.T) {
	e := newEnv(t, "dsr")
	cfg := e.config(t, "node-a", "defaultPool=10.23.0.1-10.23.0.20", 1)
	cfg.NodeAddresses = []netip.Addr{netip.MustParseAddr("10.0.0.5")}
	e.memberLease(t, "node-b", "10.0.0.6,fd00::6")
	ctx := context.Background()
	slice := e.dsrSlice("web", map[string]string{"10.244.0.1": "node-a", "10.244.0.2": "node-b", "10.244.0.3": "node-c"})
	if _, err := e.client.DiscoveryV1().EndpointSlices(e.ns).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.create(t, e.lbService("web", annotate(AnnotationLBMode, "dsr")))
	e.createSlice(t, "rr", "10.244.1.1")
	e.create(t, e.lbService("rr", annotate(AnnotationLBMode, "dsr"), annotate(AnnotationEPSelect, "rr")))

	rec, dp := &recorder{}, &datapathRecorder{}
	startPodOn(t, cfg, rec, dp)

	t.Run("the frontend is programmed with each endpoint's node and its VIP announced", func(t *testing.T) {
		want := map[string]string{"10.244.0.1": "10.0.0.5", "10.244.0.2": "10.0.0.6", "10.244.0.3": ""}
		var got map[string]string
		waitFor(t, 10*time.Second, "web's frontend with its endpoints' nodes", func() bool {
			fes := dp.frontends(e.ns + "/web")
			if len(fes) != 1 || fes[0].Mode != shard.ModeDSR {
				return false
			}
			got = nodesOf(fes[0])
			ips := ingressIPs(e.get(t, "web"))
			return len(ips) == 1 && announced(rec, ips[0]) && len(got) == len(want) && got["10.244.0.1"] == want["10.244.0.1"] && got["10.244.0.2"] == want["10.244.0.2"]
		})
		t.Logf("endpoint -> node: %v", got)
		if got["10.244.0.3"] != "" {
			t.Errorf("the endpoint on a node without shardlb got node address %q", got["10.244.0.3"])
		}
	})
	t.Run("a node's new address reaches its endpoints", func(t *testing.T) {
		e.memberLease(t, "node-b", "10.0.0.7")
		waitFor(t, 10*time.Second, "node-b's endpoint with its new address", func() bool {
			fes := dp.frontends(e.ns + "/web")
			return len(fes) == 1 && nodesOf(fes[0])["10.244.0.2"] == "10.0.0.7"
		})
	})
	t.Run("dsr with rr is refused with a Warning, and served once the selection changes", func(t *testing.T) {
		e.waitTold(t, "rr", ReasonUnsupportedMode)
		if dp.wasGiven(e.ns + "/rr") {
			t.Errorf("rr was given to the datapath")
		}
		if ips := ingressIPs(e.get(t, "rr")); len(ips) != 0 {
			t.Errorf("rr got VIP %v", ips)
		}
		e.update(t, "rr", func(s *corev1.Service) { s.Annotations[AnnotationEPSelect] = "hash" })
		waitFor(t, 10*time.Second, "rr served", func() bool {
			ips := ingressIPs(e.get(t, "rr"))
			return len(ips) == 1 && announced(rec, ips[0]) && len(dp.frontends(e.ns+"/rr")) == 1
		})
	})
}
