package kube

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"

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
	// AnnotationSourceRanges records the service's last valid source ranges, written by
	// the controller: the nodes enforce them while the service's own cannot be read.
	AnnotationSourceRanges = "shardlb.io/source-ranges"
	// AnnotationLegacySourceRanges is read, as Kubernetes documents, when
	// spec.loadBalancerSourceRanges is empty.
	AnnotationLegacySourceRanges = corev1.AnnotationLoadBalancerSourceRangesKey
)

// implementedAnnotations are the loxilb.io/ annotations shardlb implements; any other
// gets an UnsupportedAnnotation Warning.
var implementedAnnotations = []string{AnnotationZoneInstance, AnnotationLBMode, AnnotationEPSelect, AnnotationStaticIP, AnnotationPoolSelect,
	AnnotationLiveness, AnnotationProbeType, AnnotationProbePort, AnnotationProbeReq, AnnotationProbeResp, AnnotationProbeTimeout, AnnotationProbeRetries}

// errDSRRoundRobin refuses dsr with round-robin selection: a dsr packet's endpoint is
// picked again by the node it is sent to, and only hash and persist give the same
// answer on every node.
var errDSRRoundRobin = errors.New("lbmode dsr needs an endpoint selection every node computes alike (epselect hash or persist), not rr")

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
	// SourceRanges are spec.loadBalancerSourceRanges, else the legacy annotation:
	// masked, sorted, without duplicates; nil allows every client. SourceRangesErr says
	// why they could not be read (SourceRanges is then nil).
	SourceRanges    []netip.Prefix
	SourceRangesErr error
	// AffinityClientIP is spec.sessionAffinity ClientIP; AffinityTimeout its
	// sessionAffinityConfig.clientIP.timeoutSeconds (0: not given).
	AffinityClientIP bool
	AffinityTimeout  int32
	// LocalTraffic is spec.externalTrafficPolicy Local: the client's address is asked
	// for at the endpoint.
	LocalTraffic bool
	// LoadBalancerIP is spec.loadBalancerIP, a static IP request as loxilb.io/staticIP.
	LoadBalancerIP string
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
	c.SourceRanges = append([]netip.Prefix(nil), s.SourceRanges...)
	return &c
}

// key is namespace/name, the service's identity everywhere in shardlb.
func (s *service) key() string { return s.Namespace + "/" + s.Name }

// ours reports whether shardlb serves the service.
func (s *service) ours(class string) bool { return s.LoadBalancer && s.Class == class }

// mode is the service's NAT mode: loxilb.io/lbmode, else def (also when the annotation
// cannot be read, which err then says).
func (s *service) mode(def shard.Mode) (shard.Mode, error) {
	v := s.Annotations[AnnotationLBMode]
	if strings.TrimSpace(v) == "" {
		return def, nil
	}
	m, err := shard.ParseMode(v)
	if err != nil {
		return def, fmt.Errorf("%s: %w", AnnotationLBMode, err)
	}
	return m, nil
}

// selection is how the service picks endpoints: loxilb.io/epselect when it is set and
// readable (it wins over spec.sessionAffinity), else persist for sessionAffinity
// ClientIP, else hash.
func (s *service) selection() (shard.Select, error) {
	def := shard.SelectHash
	if s.AffinityClientIP {
		def = shard.SelectPersist
	}
	v := s.Annotations[AnnotationEPSelect]
	if strings.TrimSpace(v) == "" {
		return def, nil
	}
	sel, err := shard.ParseSelect(v)
	if err != nil {
		return def, fmt.Errorf("%s: %w", AnnotationEPSelect, err)
	}
	return sel, nil
}

// enforcedRanges are the source ranges the nodes apply: the service's own when they
// can be read, else the last valid set the controller recorded (recorded is then
// true); ok is false when there is neither, and the service is then not served, rather
// than open to every client.
func (s *service) enforcedRanges() (ranges []netip.Prefix, recorded, ok bool) {
	if s.SourceRangesErr == nil {
		return s.SourceRanges, false, true
	}
	rec, err := parseSourceRanges(nil, s.Annotations[AnnotationSourceRanges])
	if err != nil || len(rec) == 0 {
		return nil, false, false
	}
	return rec, true, true
}

// notServed says why the nodes serve no frontend of the service and announce none of
// its VIPs though it is ours ("" when they do).
func (s *service) notServed(def shard.Mode) string {
	if m, _ := s.mode(def); m == shard.ModeDSR {
		if sel, _ := s.selection(); sel == shard.SelectRoundRobin {
			return errDSRRoundRobin.Error()
		}
	}
	if _, _, ok := s.enforcedRanges(); !ok {
		return "its loadBalancerSourceRanges cannot be read and no valid set was recorded"
	}
	return ""
}

// parseSourceRanges reads spec.loadBalancerSourceRanges, or when it is empty the
// comma separated annotation, as the API server validates them (spaces around an entry
// allowed; IPv4-mapped IPv6 refused), but with host bits masked rather than refused,
// since objects written before that validation may have them. The result is sorted
// and without duplicates; nil allows every client.
func parseSourceRanges(field []string, annotation string) ([]netip.Prefix, error) {
	what, values := "spec.loadBalancerSourceRanges", field
	if len(field) == 0 {
		if strings.TrimSpace(annotation) == "" {
			return nil, nil
		}
		what, values = "annotation "+AnnotationLegacySourceRanges, strings.Split(annotation, ",")
	}
	out := make([]netip.Prefix, 0, len(values))
	for _, v := range values {
		p, err := netip.ParsePrefix(strings.TrimSpace(v))
		if err == nil && p.Addr().Is4In6() {
			err = errors.New("an IPv4-mapped IPv6 address")
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %q is not a CIDR: %w", what, v, err)
		}
		out = append(out, p.Masked())
	}
	slices.SortFunc(out, netip.Prefix.Compare)
	return slices.Compact(out), nil
}

// formatSourceRanges is the value of AnnotationSourceRanges for ranges.
func formatSourceRanges(ranges []netip.Prefix) string {
	var b []byte
	for i, p := range ranges {
		if i > 0 {
			b = append(b, ',')
		}
		b = p.AppendTo(b)
	}
	return string(b)
}

// unsupportedAnnotations are the service's loxilb.io/ annotations shardlb does not
// implement, sorted.
func (s *service) unsupportedAnnotations() []string {
	var out []string
	for k := range s.Annotations {
		if strings.HasPrefix(k, "loxilb.io/") && !slices.Contains(implementedAnnotations, k) {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

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
			Labels:            s.Labels, // IPPool serviceSelectors
		},
		LoadBalancer: s.Spec.Type == corev1.ServiceTypeLoadBalancer,
		Families:     s.Spec.IPFamilies,
		DualStack:    s.Spec.IPFamilyPolicy != nil && *s.Spec.IPFamilyPolicy != corev1.IPFamilyPolicySingleStack,
	}
	if s.Spec.LoadBalancerClass != nil {
		out.Class = *s.Spec.LoadBalancerClass
	}
	if out.LoadBalancer {
		out.SourceRanges, out.SourceRangesErr = parseSourceRanges(s.Spec.LoadBalancerSourceRanges, s.Annotations[AnnotationLegacySourceRanges])
		out.LoadBalancerIP = s.Spec.LoadBalancerIP
	}
	out.LocalTraffic = s.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal
	if s.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		out.AffinityClientIP = true
		if c := s.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			out.AffinityTimeout = *c.ClientIP.TimeoutSeconds
		}
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
	// ReadyNodes are the nodeName of each of Ready ("" when not given): dsr sends
	// an endpoint's packets to its node (dsr.go).
	ReadyNodes []string
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
	c.ReadyNodes = append([]string(nil), e.ReadyNodes...)
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
				out.ReadyNodes = append(out.ReadyNodes, ptr.Deref(e.NodeName, ""))
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
