package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"

	"github.com/shardlb/shardlb/internal/labsys"
	"github.com/shardlb/shardlb/manifest"
)

// apply creates objects as `kubectl create` would, in namespace ns when they name none.
func (l *Lab) apply(ctx context.Context, objs []*unstructured.Unstructured, ns string) error {
	groups, err := restmapper.GetAPIGroupResources(l.Kube.Discovery())
	if err != nil {
		return err
	}
	mapper := restmapper.NewDiscoveryRESTMapper(groups)
	dyn, err := dynamic.NewForConfig(l.API.RESTConfig())
	if err != nil {
		return err
	}
	for _, o := range objs {
		gvk := o.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return err
		}
		var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if m.Scope.Name() == "namespace" {
			objNS := o.GetNamespace()
			if objNS == "" {
				objNS = ns
			}
			ri = dyn.Resource(m.Resource).Namespace(objNS)
		}
		if _, err := ri.Create(ctx, o, metav1.CreateOptions{FieldManager: "lab"}); err != nil {
			return fmt.Errorf("create %s %s: %w", strings.ToLower(o.GetKind()), o.GetName(), err)
		}
	}
	return nil
}

// installShardlbIdentity applies the manifest's ServiceAccount and RBAC and writes a
// kubeconfig with a token of that ServiceAccount: the nodes then run with exactly the
// rights the DaemonSet would give them, so a missing RBAC rule fails the lab. It also
// reads the DaemonSet's args and capabilities, which the nodes run with.
func (l *Lab) installShardlbIdentity(ctx context.Context) error {
	for _, f := range []string{"serviceaccount.yaml", "rbac.yaml"} {
		objs, err := manifest.File(f)
		if err != nil {
			return err
		}
		if err := l.apply(ctx, objs, lbSystem); err != nil {
			return err
		}
	}
	tok, err := l.Kube.CoreV1().ServiceAccounts(lbSystem).CreateToken(ctx, "shardlb", &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr(int64(24 * 3600))},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("token for the shardlb ServiceAccount: %w", err)
	}
	l.nodeKubeconfig = filepath.Join(l.Dir, "shardlb.kubeconfig")
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: shardlb
  user:
    token: %s
contexts:
- name: lab
  context: {cluster: lab, user: shardlb}
current-context: lab
`, l.API.URL(), filepath.Join(l.API.Dir(), "ca.crt"), tok.Status.Token)
	if err := os.WriteFile(l.nodeKubeconfig, []byte(kc), 0o600); err != nil {
		return err
	}

	objs, err := manifest.File("daemonset.yaml")
	if err != nil {
		return err
	}
	var ds appsv1.DaemonSet
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(objs[0].Object, &ds); err != nil {
		return err
	}
	c := ds.Spec.Template.Spec.Containers[0]
	l.nodeArgs = slices.Clone(c.Args)
	if b := l.opts.BFD; b.Interval > 0 {
		l.nodeArgs = append(l.nodeArgs, fmt.Sprintf("--bgpBFD=%v,%d", b.Interval, b.Multiplier))
	}
	if c.SecurityContext != nil && c.SecurityContext.Capabilities != nil {
		for _, cp := range c.SecurityContext.Capabilities.Add {
			l.caps = append(l.caps, strings.ToLower(string(cp)))
		}
	}
	return nil
}

func ptr[T any](v T) *T { return &v }

// ApplyExamples creates the guide's Services and Pods from manifest/examples, then
// plays kubelet and the EndpointSlice controller for the Pods.
func (l *Lab) ApplyExamples(ctx context.Context) error {
	objs, err := manifest.Examples()
	if err != nil {
		return err
	}
	if err := l.apply(ctx, objs, namespace); err != nil {
		return err
	}
	return l.RunPods(ctx)
}

// RunPods starts an nginx namespace for every Pod that has none yet, reports it
// Running and Ready with its address (as a kubelet would), and writes the
// EndpointSlices of every Service (as kube-controller-manager would; none runs here).
func (l *Lab) RunPods(ctx context.Context) error {
	pods, err := l.Kube.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	for i := range pods.Items {
		p := &pods.Items[i]
		l.mu.Lock()
		_, running := l.pods[p.Name]
		idx := l.nextPod
		if !running {
			l.nextPod++
		}
		l.mu.Unlock()
		if running {
			continue
		}
		port := uint16(80)
		if cs := p.Spec.Containers; len(cs) > 0 && len(cs[0].Ports) > 0 {
			port = uint16(cs[0].Ports[0].ContainerPort)
		}
		b, err := l.startPod(ctx, idx, p.Name, port)
		if err != nil {
			return fmt.Errorf("pod %s: %w", p.Name, err)
		}
		now := metav1.Now()
		podIPs := []corev1.PodIP{{IP: b.addr.String()}}
		if b.addr6.IsValid() {
			podIPs = append(podIPs, corev1.PodIP{IP: b.addr6.String()})
		}
		p.Status = corev1.PodStatus{
			Phase:     corev1.PodRunning,
			PodIP:     b.addr.String(),
			PodIPs:    podIPs,
			StartTime: &now,
			Conditions: []corev1.PodCondition{
				{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
				{Type: corev1.ContainersReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
			},
		}
		if _, err := l.Kube.CoreV1().Pods(namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("pod %s status: %w", p.Name, err)
		}
	}
	return l.syncEndpointSlices(ctx)
}

// startPod gives a Pod its namespace on the node LAN and runs nginx there.
func (l *Lab) startPod(ctx context.Context, idx int, name string, port uint16) (*backend, error) {
	ns := podNS(idx)
	if err := labsys.AddNetNS(ns, false); err != nil {
		return nil, err
	}
	rport := fmt.Sprintf("pod%d", idx+1)
	if err := labsys.Veth(routerNS, rport, ns, "eth0"); err != nil {
		return nil, err
	}
	var s labsys.Script
	s.Run("ip", "-n", routerNS, "link", "set", rport, "master", "lan")
	s.Run("ip", "-n", ns, "addr", "add", cidr(podAddr(idx), 24), "dev", "eth0")
	s.Run("ip", "-n", ns, "route", "add", "default", "via", routerLAN.String())
	var a6 netip.Addr
	if l.opts.DualStack {
		a6 = podAddr6(idx)
		addr6(&s, ns, a6, "eth0")
		s.Run("ip", "-n", ns, "-6", "route", "add", "default", "via", routerLAN6.String())
	}
	if s.Err != nil {
		return nil, s.Err
	}
	b, err := startBackend(ctx, name, ns, filepath.Join(l.Dir, "pod-"+name), podAddr(idx), a6, port)
	if b != nil {
		l.mu.Lock()
		l.pods[name] = b
		l.mu.Unlock()
	}
	return b, err
}

// syncEndpointSlices writes, for every Service with a selector, an IPv4
// EndpointSlice listing the running lab pods it selects and, when the Service is of
// the IPv6 family too, an IPv6 one with the same pods' IPv6 addresses, as the
// EndpointSlice controller writes a slice per address family of the Service.
func (l *Lab) syncEndpointSlices(ctx context.Context) error {
	svcs, err := l.Kube.CoreV1().Services(namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	pods, err := l.Kube.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	for _, svc := range svcs.Items {
		if len(svc.Spec.Selector) == 0 {
			continue
		}
		if err := l.writeEndpointSlice(ctx, &svc, pods.Items, discoveryv1.AddressTypeIPv4, "-lab"); err != nil {
			return err
		}
		if slices.Contains(svc.Spec.IPFamilies, corev1.IPv6Protocol) {
			if err := l.writeEndpointSlice(ctx, &svc, pods.Items, discoveryv1.AddressTypeIPv6, "-lab6"); err != nil {
				return err
			}
		}
	}
	return nil
}

// writeEndpointSlice writes the Service's EndpointSlice of one address type, named
// after the Service with suffix.
func (l *Lab) writeEndpointSlice(ctx context.Context, svc *corev1.Service, pods []corev1.Pod, family discoveryv1.AddressType, suffix string) error {
	api := l.Kube.DiscoveryV1().EndpointSlices(namespace)
	sel := labels.SelectorFromSet(svc.Spec.Selector)
	es := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name:      svc.Name + suffix,
			Namespace: namespace,
			Labels: map[string]string{
				discoveryv1.LabelServiceName: svc.Name,
				discoveryv1.LabelManagedBy:   "lab.shardlb.io",
			},
		},
		AddressType: family,
	}
	for _, sp := range svc.Spec.Ports {
		es.Ports = append(es.Ports, discoveryv1.EndpointPort{
			Name: ptr(sp.Name), Protocol: ptr(sp.Protocol), Port: ptr(int32(sp.TargetPort.IntValue())),
		})
	}
	for _, p := range pods {
		addr := podIPOf(&p, family)
		if !sel.Matches(labels.Set(p.Labels)) || addr == "" {
			continue
		}
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{addr},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr(true), Serving: ptr(true), Terminating: ptr(false)},
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: namespace, Name: p.Name, UID: p.UID},
		})
	}
	old, err := api.Get(ctx, es.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = api.Create(ctx, es, metav1.CreateOptions{FieldManager: "lab"})
	case err == nil:
		es.ResourceVersion = old.ResourceVersion
		_, err = api.Update(ctx, es, metav1.UpdateOptions{FieldManager: "lab"})
	}
	if err != nil {
		return fmt.Errorf("endpointslice of %s: %w", svc.Name, err)
	}
	return nil
}

// podIPOf is the Pod's address of the EndpointSlice's address type, "" if none.
func podIPOf(p *corev1.Pod, family discoveryv1.AddressType) string {
	if family == discoveryv1.AddressTypeIPv4 {
		return p.Status.PodIP // the lab's first address is the IPv4 one
	}
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil && a.Is6() {
			return ip.IP
		}
	}
	return ""
}

// VIP returns the address in the Service's status.loadBalancer, if any.
func (l *Lab) VIP(ctx context.Context, svc string) (netip.Addr, error) {
	s, err := l.Kube.CoreV1().Services(namespace).Get(ctx, svc, metav1.GetOptions{})
	if err != nil {
		return netip.Addr{}, err
	}
	for _, in := range s.Status.LoadBalancer.Ingress {
		if a, err := netip.ParseAddr(in.IP); err == nil {
			return a, nil
		}
	}
	return netip.Addr{}, errors.New("no VIP in status.loadBalancer yet")
}

// VIPs returns every address in the Service's status.loadBalancer: one per family
// of a dual-stack Service.
func (l *Lab) VIPs(ctx context.Context, svc string) ([]netip.Addr, error) {
	s, err := l.Kube.CoreV1().Services(namespace).Get(ctx, svc, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, in := range s.Status.LoadBalancer.Ingress {
		if a, err := netip.ParseAddr(in.IP); err == nil {
			out = append(out, a)
		}
	}
	return out, nil
}

// WaitVIP waits for the Service's VIP.
func (l *Lab) WaitVIP(ctx context.Context, svc string, d time.Duration) (netip.Addr, error) {
	var vip netip.Addr
	err := waitFor(ctx, d, "the VIP of "+svc, func() error {
		var err error
		vip, err = l.VIP(ctx, svc)
		return err
	})
	return vip, err
}

// Instance returns the instance the controller recorded on the Service.
func (l *Lab) Instance(ctx context.Context, svc string) (string, error) {
	s, err := l.Kube.CoreV1().Services(namespace).Get(ctx, svc, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	inst := s.Annotations["shardlb.io/instance"]
	if inst == "" {
		return "", errors.New("no instance recorded yet")
	}
	return inst, nil
}

// WaitInstance waits for the instance the controller records on the Service: the
// controller writes it and the VIP at the same time, so either may show first.
func (l *Lab) WaitInstance(ctx context.Context, svc string, d time.Duration) (string, error) {
	var inst string
	err := waitFor(ctx, d, "the instance of "+svc, func() error {
		var err error
		inst, err = l.Instance(ctx, svc)
		return err
	})
	return inst, err
}

// PrintServices writes the Services as `kubectl get svc` shows them.
func (l *Lab) PrintServices(ctx context.Context, w io.Writer) error {
	svcs, err := l.Kube.CoreV1().Services(namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "NAME\tTYPE\tCLUSTER-IP\tEXTERNAL-IP\tPORT(S)\tAGE")
	for _, s := range svcs.Items {
		ext := "<none>"
		if s.Spec.Type == corev1.ServiceTypeLoadBalancer {
			ext = "<pending>"
		}
		var ips []string
		for _, in := range s.Status.LoadBalancer.Ingress {
			ips = append(ips, in.IP)
		}
		if len(ips) > 0 {
			ext = strings.Join(ips, ",")
		}
		var ports []string
		for _, p := range s.Spec.Ports {
			if p.NodePort != 0 {
				ports = append(ports, fmt.Sprintf("%d:%d/%s", p.Port, p.NodePort, p.Protocol))
			} else {
				ports = append(ports, fmt.Sprintf("%d/%s", p.Port, p.Protocol))
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.Name, s.Spec.Type, s.Spec.ClusterIP, ext,
			strings.Join(ports, ","), age(time.Since(s.CreationTimestamp.Time)))
	}
	return tw.Flush()
}

func age(d time.Duration) string {
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%ds", int(d.Minutes()), int(d.Seconds())%60)
	}
	return fmt.Sprintf("%dh%dm", int(d.Hours()), int(d.Minutes())%60)
}
