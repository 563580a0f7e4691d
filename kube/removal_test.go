package kube

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// TestAnUninstallIsNoRestart stops a pod whose forwarding outlives its process (a
// restart time, --stopMode auto) in each state of its DaemonSet, read from a real
// apiserver: a DaemonSet that stays makes the stop a restart; one deleted, being
// deleted (foreground deletion, held by its finalizer) or deleted and created again
// makes it a removal for good, which hands over instead; without a pod name nothing
// is read and the stop is a restart.
func TestAnUninstallIsNoRestart(t *testing.T) {
	e := newEnv(t, "removal")
	ctx := context.Background()
	ds := func() *appsv1.DaemonSet {
		labels := map[string]string{"app": "shardlb"}
		return &appsv1.DaemonSet{
			ObjectMeta: metav1.ObjectMeta{Name: "shardlb", Namespace: e.ns},
			Spec: appsv1.DaemonSetSpec{
				Selector: &metav1.LabelSelector{MatchLabels: labels},
				Template: corev1.PodTemplateSpec{
					ObjectMeta: metav1.ObjectMeta{Labels: labels},
					Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "shardlb", Image: "shardlb"}}},
				},
			},
		}
	}
	createDS := func() *appsv1.DaemonSet {
		t.Helper()
		d, err := e.client.AppsV1().DaemonSets(e.ns).Create(ctx, ds(), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	owner := createDS()
	ctl := true
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "shardlb-x7k2p", Namespace: e.ns, Labels: map[string]string{"app": "shardlb"},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: owner.Name, UID: owner.UID, Controller: &ctl}}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "shardlb", Image: "shardlb"}}},
	}
	if _, err := e.client.CoreV1().Pods(e.ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// stopOnce runs a pod until it has applied a plan and holds its instance, stops it
	// and returns what it told Stopping.
	stopOnce := func(t *testing.T, podName string) Stop {
		t.Helper()
		cfg := e.config(t, "node-a", "default=10.77.0.0/30", 1)
		cfg.PodName, cfg.RestartTime = podName, time.Minute
		cfg.Handover, cfg.Drain = time.Second, 0
		rctx, cancel := context.WithCancel(ctx)
		defer cancel()
		got := make(chan Stop, 1)
		done := make(chan error, 1)
		rec := &recorder{}
		go func() {
			done <- Run(rctx, cfg, Deps{Router: rec, Datapath: rec, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
				Stopping: func(s Stop) { got <- s }})
		}()
		waitFor(t, 30*time.Second, "node-a to apply a plan and hold its instance", func() bool {
			rec.mu.Lock()
			planned := rec.calls > 0
			rec.mu.Unlock()
			if !planned {
				return false
			}
			ls, err := e.client.CoordinationV1().Leases(e.ns).List(ctx, metav1.ListOptions{})
			if err != nil {
				return false
			}
			for _, l := range ls.Items {
				if strings.HasPrefix(l.Name, InstanceLeaseName("")) && l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == "node-a" {
					return true
				}
			}
			return false
		})
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("Run did not return 20 s after its stop")
		}
		select {
		case s := <-got:
			return s
		default:
			t.Fatal("Stopping was not called")
			return Stop{}
		}
	}
	expect := func(t *testing.T, s Stop, restart bool, removal string) {
		t.Helper()
		if s.Restart != restart || !strings.Contains(s.Removal, removal) || (removal == "") != (s.Removal == "") {
			t.Fatalf("stop %+v, want restart %v and a removal saying %q", s, restart, removal)
		}
	}

	t.Run("the DaemonSet stays: a restart", func(t *testing.T) {
		expect(t, stopOnce(t, pod.Name), true, "")
	})
	t.Run("no pod name: a restart", func(t *testing.T) {
		if err := e.client.AppsV1().DaemonSets(e.ns).Delete(ctx, "shardlb", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		expect(t, stopOnce(t, ""), true, "")
	})
	t.Run("the DaemonSet deleted: a removal", func(t *testing.T) {
		expect(t, stopOnce(t, pod.Name), false, "DaemonSet removal/shardlb deleted")
	})
	t.Run("another DaemonSet of the same name: a removal", func(t *testing.T) {
		createDS()
		expect(t, stopOnce(t, pod.Name), false, "another of that name")
	})
	t.Run("the DaemonSet being deleted: a removal", func(t *testing.T) {
		if err := e.client.AppsV1().DaemonSets(e.ns).Delete(ctx, "shardlb", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		d, err := e.client.AppsV1().DaemonSets(e.ns).Create(ctx, ds(), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		// The pod's owner again, then a foreground deletion: no garbage collector runs
		// here, so its finalizer holds it, marked for deletion.
		p, err := e.client.CoreV1().Pods(e.ns).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p.OwnerReferences[0].UID = d.UID
		if _, err := e.client.CoreV1().Pods(e.ns).Update(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		expect(t, stopOnce(t, pod.Name), true, "")
		fg := metav1.DeletePropagationForeground
		if err := e.client.AppsV1().DaemonSets(e.ns).Delete(ctx, "shardlb", metav1.DeleteOptions{PropagationPolicy: &fg}); err != nil {
			t.Fatal(err)
		}
		expect(t, stopOnce(t, pod.Name), false, "being deleted")
	})
	t.Run("the RBAC deleted, then the ServiceAccount: a removal", func(t *testing.T) {
		sa, err := e.client.CoreV1().ServiceAccounts(e.ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "shardlb"}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		tr, err := e.client.CoreV1().ServiceAccounts(e.ns).CreateToken(ctx, sa.Name, &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		rc := rest.AnonymousClientConfig(e.srv.RESTConfig())
		rc.BearerToken = tr.Status.Token
		podClient, err := kubernetes.NewForConfig(rc)
		if err != nil {
			t.Fatal(err)
		}
		// Authenticated but never allowed to read the pod: that says nothing.
		check := &removalCheck{client: podClient, namespace: e.ns, pod: pod.Name}
		if err := check.start(ctx); err == nil {
			t.Fatal("the start's check read the pod without RBAC")
		}
		if why, err := check.removal(ctx); why != "" || err == nil {
			t.Fatalf("without RBAC: removal %q, error %v; want none and an error", why, err)
		}
		// Allowed at the start, refused at the stop: the RBAC was deleted.
		role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: "shardlb"}, Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get"}},
			{APIGroups: []string{"apps"}, Resources: []string{"daemonsets"}, Verbs: []string{"get"}},
		}}
		if _, err := e.client.RbacV1().Roles(e.ns).Create(ctx, role, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		binding := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "shardlb"},
			RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "shardlb"},
			Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa.Name, Namespace: e.ns}}}
		if _, err := e.client.RbacV1().RoleBindings(e.ns).Create(ctx, binding, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "the start's check to read the pod with the Role", func() bool { return check.start(ctx) == nil })
		if why, err := check.removal(ctx); err != nil || strings.Contains(why, "RBAC") {
			t.Fatalf("with the pod and its DaemonSet readable: removal %q, error %v", why, err)
		}
		if err := e.client.RbacV1().RoleBindings(e.ns).Delete(ctx, binding.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "the deleted RoleBinding to read as a removal", func() bool {
			why, err := check.removal(ctx)
			return err == nil && strings.Contains(why, "RBAC deleted")
		})
		if err := e.client.CoreV1().ServiceAccounts(e.ns).Delete(ctx, sa.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 30*time.Second, "the deleted ServiceAccount's token refused", func() bool {
			why, err := check.removal(ctx)
			return err == nil && strings.Contains(why, "ServiceAccount deleted")
		})
	})
}
