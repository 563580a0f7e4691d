package nodestack

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Kubectl runs the kubectl of the Kubernetes release with the admin's credentials and
// returns its standard output; the error carries its standard error.
func (s *Stack) Kubectl(ctx context.Context, args ...string) (string, error) {
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, filepath.Join(s.opts.Bins, "kubectl"), append([]string{"--kubeconfig", s.API.Kubeconfig()}, args...)...)
	cmd.Dir = s.opts.Root
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// Node returns the lab node of the given name.
func (s *Stack) Node(name string) *Node {
	for _, n := range s.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// Ready says whether the Pod's Ready condition is true.
func Ready(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// Pods lists the Pods of namespace ns matching the label selector.
func (s *Stack) Pods(ctx context.Context, ns, selector string) ([]corev1.Pod, error) {
	l, err := s.Kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return nil, err
	}
	return l.Items, nil
}

// WaitFor polls check until it returns nil, failing early when a node's daemon or the
// control plane exits; see waitFor.
func (s *Stack) WaitFor(ctx context.Context, d time.Duration, what string, check func() error) error {
	return waitFor(ctx, d, what, func() error {
		for _, n := range s.Nodes {
			if err := n.running(); err != nil {
				return stop(err)
			}
		}
		for _, p := range s.control {
			if err := p.Exited(); err != nil {
				return stop(err)
			}
		}
		return check()
	})
}

// Diagnose writes what explains a failure: pods, events, shardlb's logs.
func (s *Stack) Diagnose(ctx context.Context, w io.Writer) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, args := range [][]string{
		{"get", "nodes", "-o", "wide"},
		{"get", "pods", "-A", "-o", "wide"},
		{"get", "svc,endpointslices", "-o", "wide"},
		{"get", "events", "-A", "--sort-by=.lastTimestamp"},
		{"-n", "kube-system", "logs", "-l", "app.kubernetes.io/name=shardlb", "--tail=40", "--prefix"},
	} {
		out, err := s.Kubectl(ctx, args...)
		fmt.Fprintf(w, "$ kubectl %s\n%s", strings.Join(args, " "), out)
		if err != nil {
			fmt.Fprintln(w, err)
		}
	}
	if s.Router != nil {
		out, _ := s.Router.Vtysh(ctx, "show bgp ipv4 unicast")
		fmt.Fprintf(w, "router: show bgp ipv4 unicast\n%s\n", out)
	}
}
