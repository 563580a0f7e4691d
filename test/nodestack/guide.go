package nodestack

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// What the lab installs and how it finds it: the DaemonSet of test/nodestack/overlay
// and the guide's services of testdata/guide.yaml. Shared by the tests and the demo
// (test/nodestack/demo).

const (
	lbNS       = "kube-system"
	dsSelector = "app.kubernetes.io/name=shardlb"
	vipPort    = 57002
)

// The guide's services and the VIPs they get, in the order the controller serves them.
var guideVIPs = map[string]netip.Addr{
	"tcp-lb":  netip.MustParseAddr("192.168.80.250"),
	"tcp-lb2": netip.MustParseAddr("192.168.80.251"),
}

// waitDaemonSet waits for the DaemonSet to have one Ready pod per node, none of them
// among old (the pods before a restart), and returns them.
func waitDaemonSet(ctx context.Context, st *Stack, old []corev1.Pod) ([]corev1.Pod, error) {
	var pods []corev1.Pod
	err := st.WaitFor(ctx, 4*time.Minute, "the DaemonSet's pods Ready on every node", func() error {
		ds, err := st.Kube.AppsV1().DaemonSets(lbNS).Get(ctx, "shardlb", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if s := ds.Status; s.DesiredNumberScheduled != int32(len(st.Nodes)) || s.NumberReady != s.DesiredNumberScheduled ||
			s.UpdatedNumberScheduled != s.DesiredNumberScheduled || s.ObservedGeneration != ds.Generation {
			return fmt.Errorf("DaemonSet status %+v", dsStatus(ds))
		}
		all, err := st.Pods(ctx, lbNS, dsSelector)
		if err != nil {
			return err
		}
		pods = pods[:0]
		nodes := map[string]bool{}
		for _, p := range all {
			if p.DeletionTimestamp != nil {
				return fmt.Errorf("%s still terminating", p.Name)
			}
			if slices.ContainsFunc(old, func(o corev1.Pod) bool { return o.UID == p.UID }) {
				return fmt.Errorf("%s not replaced yet", p.Name)
			}
			if !Ready(&p) {
				return fmt.Errorf("%s on %s not Ready", p.Name, p.Spec.NodeName)
			}
			// Ready only after the startup probe passed and the readiness probe did.
			for _, cs := range p.Status.ContainerStatuses {
				if cs.Started == nil || !*cs.Started || !cs.Ready {
					return fmt.Errorf("%s: container %s started %v ready %v", p.Name, cs.Name, cs.Started, cs.Ready)
				}
			}
			nodes[p.Spec.NodeName] = true
			pods = append(pods, p)
		}
		for _, n := range st.Nodes {
			if !nodes[n.Name] {
				return fmt.Errorf("no Ready shardlb pod on %s", n.Name)
			}
		}
		return nil
	})
	return pods, err
}

func dsStatus(ds *appsv1.DaemonSet) string {
	s := ds.Status
	return fmt.Sprintf("desired %d, ready %d, updated %d, generation %d observed %d",
		s.DesiredNumberScheduled, s.NumberReady, s.UpdatedNumberScheduled, ds.Generation, s.ObservedGeneration)
}

// readyEndpoints lists name=address of the ready endpoints in the Service's
// EndpointSlices written by the EndpointSlice controller, sorted.
func readyEndpoints(ctx context.Context, st *Stack, svc string) ([]string, error) {
	l, err := st.Kube.DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{
		LabelSelector: discoveryv1.LabelServiceName + "=" + svc})
	if err != nil {
		return nil, err
	}
	var got []string
	for _, es := range l.Items {
		if m := es.Labels[discoveryv1.LabelManagedBy]; m != "endpointslice-controller.k8s.io" {
			return nil, fmt.Errorf("EndpointSlice %s is managed by %q, not the controller-manager", es.Name, m)
		}
		for _, e := range es.Endpoints {
			if e.Conditions.Ready != nil && *e.Conditions.Ready && e.TargetRef != nil {
				got = append(got, e.TargetRef.Name+"="+strings.Join(e.Addresses, ","))
			}
		}
	}
	slices.Sort(got)
	return got, nil
}

// podOn names the shardlb pod on the node.
func (st *Stack) podOn(ctx context.Context, node string) (string, error) {
	pods, err := st.Pods(ctx, lbNS, dsSelector)
	if err != nil {
		return "", err
	}
	for _, p := range pods {
		if p.Spec.NodeName == node && p.DeletionTimestamp == nil {
			return p.Name, nil
		}
	}
	return "", fmt.Errorf("no shardlb pod on %s", node)
}

// GuideService is one of the guide's services as testdata/guide.yaml makes it.
type GuideService struct {
	Name     string
	VIP      netip.Addr
	Selector string // the label selector of its pods
}

// GuideServices are the guide's services in the order the controller serves them.
var GuideServices = []GuideService{
	{Name: "tcp-lb", VIP: guideVIPs["tcp-lb"], Selector: "what=tcp-test"},
	{Name: "tcp-lb2", VIP: guideVIPs["tcp-lb2"], Selector: "what=tcp-test2"},
}

// VIPPort is the port of the guide's services.
const VIPPort = vipPort

// Install applies the lab's overlay of manifest/ as an operator does (kubectl apply -k)
// and returns kubectl's output.
func (s *Stack) Install(ctx context.Context) (string, error) {
	return s.Kubectl(ctx, "apply", "-k", "test/nodestack/overlay")
}

// WaitDaemonSet waits for a Ready shardlb pod on every node and returns them.
func (s *Stack) WaitDaemonSet(ctx context.Context) ([]corev1.Pod, error) {
	return waitDaemonSet(ctx, s, nil)
}

// PodOn names the shardlb pod on the node.
func (s *Stack) PodOn(ctx context.Context, node string) (string, error) { return s.podOn(ctx, node) }

// WaitVIP waits for the Service's one status.loadBalancer.ingress address and
// returns it.
func (s *Stack) WaitVIP(ctx context.Context, ns, svc string) (netip.Addr, error) {
	var vip netip.Addr
	err := s.WaitFor(ctx, 2*time.Minute, "the VIP of "+svc, func() error {
		o, err := s.Kube.CoreV1().Services(ns).Get(ctx, svc, metav1.GetOptions{})
		if err != nil {
			return err
		}
		in := o.Status.LoadBalancer.Ingress
		if len(in) != 1 {
			return fmt.Errorf("status.loadBalancer.ingress %v", in)
		}
		vip, err = netip.ParseAddr(in[0].IP)
		return err
	})
	return vip, err
}

// WaitAnswers waits for every pod of the selector in namespace ns to be Ready and to
// have answered the client through addr (each fetch on a new connection), and
// returns how many answers each pod gave. An answer that names none of the pods ends
// the wait.
func (s *Stack) WaitAnswers(ctx context.Context, ns, selector string, addr netip.AddrPort) (map[string]int, error) {
	seen := map[string]int{}
	err := s.WaitFor(ctx, 2*time.Minute, "every pod of "+selector+" answering through "+addr.String(), func() error {
		pods, err := s.Pods(ctx, ns, selector)
		if err != nil {
			return err
		}
		names := map[string]bool{}
		for _, p := range pods {
			if !Ready(&p) || p.DeletionTimestamp != nil {
				return fmt.Errorf("%s not Ready", p.Name)
			}
			names[p.Name] = true
		}
		if len(names) == 0 {
			return fmt.Errorf("no pod")
		}
		body, err := Get(ctx, addr, time.Second)
		if err != nil {
			return err
		}
		body = strings.TrimSpace(body)
		if !names[body] {
			return stop(fmt.Errorf("%s answered %q, which is none of its pods %v", addr, body, names))
		}
		seen[body]++
		if len(seen) < len(names) {
			return fmt.Errorf("answers from %d of %d pods", len(seen), len(names))
		}
		return nil
	})
	return seen, err
}
