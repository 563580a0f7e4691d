package kube

import (
	"net/netip"
	"strings"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/cache"

	"github.com/shardlb/shardlb/shard"
)

// Annotations shardlb reads (kube-loxilb's names) and the one it writes.
const (
	AnnotationZoneInstance = "loxilb.io/zoneinstance"
	AnnotationLBMode       = "loxilb.io/lbmode"
	AnnotationEPSelect     = "loxilb.io/epselect"
	AnnotationStaticIP     = "loxilb.io/staticIP"
	AnnotationPoolSelect   = "loxilb.io/poolSelect"
	// AnnotationInstance records the instance the controller chose; it never moves
	// unless the zoneinstance pin changes.
	AnnotationInstance = "shardlb.io/instance"
)

// service is a Service slimmed at the informer boundary to what shardlb reads, so that
// ten thousand services cost little memory. It keeps ObjectMeta (with only our
// annotations) because the informer's store keys objects by it.
type service struct {
	metav1.TypeMeta
	metav1.ObjectMeta
	LoadBalancer bool   // spec.type == LoadBalancer
	Class        string // spec.loadBalancerClass
	Families     []corev1.IPFamily
	DualStack    bool // ipFamilyPolicy is not SingleStack
	Ports        []servicePort
	Ingress      []netip.Addr // status.loadBalancer.ingress[].ip
}

type servicePort struct {
	Name     string
	Protocol corev1.Protocol
	Port     uint16
}

func (s *service) DeepCopyObject() runtime.Object {
	c := *s
	s.ObjectMeta.DeepCopyInto(&c.ObjectMeta)
	c.Families = append([]corev1.IPFamily(nil), s.Families...)
	c.Ports = append([]servicePort(nil), s.Ports...)
	c.Ingress = append([]netip.Addr(nil), s.Ingress...)
	return &c
}

// key is namespace/name, the service's identity everywhere in shardlb.
func (s *service) key() string { return s.Namespace + "/" + s.Name }

// ours reports whether shardlb serves the service.
func (s *service) ours(class string) bool { return s.LoadBalancer && s.Class == class }

// toService is the informer transform for Services.
func toService(obj any) (any, error) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		o, err := toService(t.Obj)
		return cache.DeletedFinalStateUnknown{Key: t.Key, Obj: o}, err
	}
	s, ok := obj.(*corev1.Service)
	if !ok {
		return obj, nil
	}
	out := &service{
		ObjectMeta: metav1.ObjectMeta{
			Name:              s.Name,
			Namespace:         s.Namespace,
			UID:               s.UID,
			ResourceVersion:   s.ResourceVersion,
			CreationTimestamp: s.CreationTimestamp,
		},
		LoadBalancer: s.Spec.Type == corev1.ServiceTypeLoadBalancer,
		Families:     s.Spec.IPFamilies,
		DualStack:    s.Spec.IPFamilyPolicy != nil && *s.Spec.IPFamilyPolicy != corev1.IPFamilyPolicySingleStack,
	}
	if s.Spec.LoadBalancerClass != nil {
		out.Class = *s.Spec.LoadBalancerClass
	}
	for k, v := range s.Annotations {
		if strings.HasPrefix(k, "loxilb.io/") || strings.HasPrefix(k, "shardlb.io/") {
			if out.Annotations == nil {
				out.Annotations = map[string]string{}
			}
			out.Annotations[k] = v
		}
	}
	for _, p := range s.Spec.Ports {
		out.Ports = append(out.Ports, servicePort{Name: p.Name, Protocol: p.Protocol, Port: uint16(p.Port)})
	}
	for _, in := range s.Status.LoadBalancer.Ingress {
		if a, err := netip.ParseAddr(in.IP); err == nil {
			out.Ingress = append(out.Ingress, a)
		}
	}
	return out, nil
}

// endpointSlice is an EndpointSlice slimmed to its service, ports and ready addresses.
type endpointSlice struct {
	metav1.TypeMeta
	metav1.ObjectMeta
	Service string // namespace/name from the kubernetes.io/service-name label
	Ports   []endpointPort
	Ready   []netip.Addr
}

type endpointPort struct {
	Name     string
	Protocol corev1.Protocol
	Port     uint16
}

func (e *endpointSlice) DeepCopyObject() runtime.Object {
	c := *e
	e.ObjectMeta.DeepCopyInto(&c.ObjectMeta)
	c.Ports = append([]endpointPort(nil), e.Ports...)
	c.Ready = append([]netip.Addr(nil), e.Ready...)
	return &c
}

// toEndpointSlice is the informer transform for EndpointSlices: only ready endpoints
// are kept, since only they may receive traffic.
func toEndpointSlice(obj any) (any, error) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		o, err := toEndpointSlice(t.Obj)
		return cache.DeletedFinalStateUnknown{Key: t.Key, Obj: o}, err
	}
	es, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return obj, nil
	}
	out := &endpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: es.Name, Namespace: es.Namespace, ResourceVersion: es.ResourceVersion},
	}
	if svc := es.Labels[discoveryv1.LabelServiceName]; svc != "" {
		out.Service = es.Namespace + "/" + svc
	}
	for _, p := range es.Ports {
		if p.Port == nil {
			continue
		}
		ep := endpointPort{Port: uint16(*p.Port), Protocol: corev1.ProtocolTCP}
		if p.Name != nil {
			ep.Name = *p.Name
		}
		if p.Protocol != nil {
			ep.Protocol = *p.Protocol
		}
		out.Ports = append(out.Ports, ep)
	}
	for _, e := range es.Endpoints {
		// The API says a nil Ready means unknown and is to be read as ready.
		if e.Conditions.Ready != nil && !*e.Conditions.Ready {
			continue
		}
		for _, a := range e.Addresses {
			if ip, err := netip.ParseAddr(a); err == nil {
				out.Ready = append(out.Ready, ip)
			}
		}
	}
	return out, nil
}

// indexByService indexes EndpointSlices by the key of their service.
const indexByService = "service"

func sliceServiceIndex(obj any) ([]string, error) {
	if es, ok := obj.(*endpointSlice); ok && es.Service != "" {
		return []string{es.Service}, nil
	}
	return nil, nil
}

// toLease strips what the elector never reads (managed fields are most of a Lease).
// LabelExcludeFromLB is the well-known Node label that takes a node out of external
// load balancers; shardlb reads it, and spec.unschedulable (cordon), as maintenance.
const LabelExcludeFromLB = "node.kubernetes.io/exclude-from-external-load-balancers"

// nodeMaintenance is what the Node object says of this node's part in mastership:
// why it must not master ("cordoned", "excluded"), or "" when it may.
type nodeMaintenance struct {
	metav1.ObjectMeta
	Reason string
}

func toNode(obj any) (any, error) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		o, err := toNode(t.Obj)
		return cache.DeletedFinalStateUnknown{Key: t.Key, Obj: o}, err
	}
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil
	}
	out := &nodeMaintenance{ObjectMeta: metav1.ObjectMeta{Name: n.Name, ResourceVersion: n.ResourceVersion}}
	_, excluded := n.Labels[LabelExcludeFromLB]
	switch {
	case excluded:
		out.Reason = "excluded"
	case n.Spec.Unschedulable:
		out.Reason = "cordoned"
	}
	return out, nil
}

func toLease(obj any) (any, error) {
	if l, ok := obj.(*coordinationv1.Lease); ok {
		l.ManagedFields = nil
	}
	return obj, nil
}

// protocol maps a Kubernetes protocol to the datapath's; SCTP is not served.
func protocol(p corev1.Protocol) (shard.Protocol, bool) {
	switch p {
	case corev1.ProtocolTCP, "":
		return shard.TCP, true
	case corev1.ProtocolUDP:
		return shard.UDP, true
	}
	return 0, false
}

// ipProtocol is the IANA number the allocator keys ports by.
func ipProtocol(p corev1.Protocol) uint8 {
	switch p {
	case corev1.ProtocolUDP:
		return 17
	case corev1.ProtocolSCTP:
		return 132
	}
	return 6
}

// keyHandler calls f with the namespace/name key of every added, updated or deleted
// object, tombstones included.
func keyHandler(f func(key string)) cache.ResourceEventHandler {
	call := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			f(key)
		}
	}
	return cache.ResourceEventHandlerFuncs{
		AddFunc:    call,
		UpdateFunc: func(_, obj any) { call(obj) },
		DeleteFunc: call,
	}
}
