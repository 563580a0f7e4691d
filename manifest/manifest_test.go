package manifest_test

import (
	"context"
	"io/fs"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/client-go/kubernetes"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/yaml"

	"github.com/shardlb/shardlb/manifest"
	"github.com/shardlb/shardlb/test/kubeapi"
)

// kustomizeResources returns the files kustomization.yaml lists.
func kustomizeResources(t *testing.T) []string {
	t.Helper()
	data, err := fs.ReadFile(manifest.FS, "kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k struct {
		Resources []string `json:"resources"`
	}
	if err := yaml.Unmarshal(data, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	return k.Resources
}

func TestKustomizationListsEveryManifest(t *testing.T) {
	files, err := fs.Glob(manifest.FS, "*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	files = slices.DeleteFunc(files, func(f string) bool { return f == "kustomization.yaml" })
	crds, _ := fs.Glob(manifest.FS, "crds/*.yaml")
	files = append(files, crds...)
	got := kustomizeResources(t)
	slices.Sort(files)
	slices.Sort(got)
	if !slices.Equal(files, got) {
		t.Errorf("kustomization.yaml resources %v, want every manifest %v", got, files)
	}
}

func daemonSet(t *testing.T) *appsv1.DaemonSet {
	t.Helper()
	objs, err := manifest.File("daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != 1 || objs[0].GetKind() != "DaemonSet" {
		t.Fatalf("daemonset.yaml holds %d objects, want one DaemonSet", len(objs))
	}
	var ds appsv1.DaemonSet
	if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(objs[0].Object, &ds, true); err != nil {
		t.Fatalf("daemonset.yaml: %v", err)
	}
	return &ds
}

func TestDaemonSetRunsAsTheGuideSaysWithNamedCapabilitiesOnly(t *testing.T) {
	ds := daemonSet(t)
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Error("hostNetwork must be true: BGP, the next hop and the eBPF program are the node's")
	}
	if spec.ServiceAccountName != "shardlb" {
		t.Errorf("serviceAccountName %q, want shardlb", spec.ServiceAccountName)
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(spec.Containers))
	}
	c := spec.Containers[0]
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("no securityContext.capabilities: the container must name what it needs")
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("privileged: named capabilities instead")
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Error("allowPrivilegeEscalation must be false")
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("capabilities.drop %v, want [ALL]", sc.Capabilities.Drop)
	}
	allowed := []corev1.Capability{"NET_ADMIN", "NET_RAW", "BPF", "PERFMON", "SYS_ADMIN", "NET_BIND_SERVICE"}
	for _, c := range sc.Capabilities.Add {
		if !slices.Contains(allowed, c) {
			t.Errorf("capability %s added; only %v are expected", c, allowed)
		}
	}
	for _, need := range []corev1.Capability{"NET_ADMIN", "BPF"} {
		if !slices.Contains(sc.Capabilities.Add, need) {
			t.Errorf("capability %s missing: the datapath cannot attach without it", need)
		}
	}

	env := map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			env[e.Name] = e.ValueFrom.FieldRef.FieldPath
		}
	}
	for name, path := range map[string]string{"NODE_NAME": "spec.nodeName", "NODE_IP": "status.hostIPs", "POD_NAMESPACE": "metadata.namespace"} {
		if env[name] != path {
			t.Errorf("env %s from %q, want the downward API's %s", name, env[name], path)
		}
	}
	if len(c.Args) == 0 || c.Args[0] != "run" {
		t.Errorf("args %v: want the run subcommand first", c.Args)
	}
	for _, want := range []string{"--cidrPools=defaultPool=192.168.80.250/24", "--setRoles=0.0.0.0", "--setUniqueIP", "--numZoneInstances=3"} {
		if !slices.Contains(c.Args, want) {
			t.Errorf("args %v lack the guide's %s", c.Args, want)
		}
	}
}

// The kubelet restarts the pod on /healthz (a loop stuck), never on /readyz (BGP
// sessions down, which a restart does not mend), and the startup probe leaves a minute.
func TestProbesRestartOnlyAStuckProcess(t *testing.T) {
	c := daemonSet(t).Spec.Template.Spec.Containers[0]
	metricsPort := false
	for _, p := range c.Ports {
		metricsPort = metricsPort || p.Name == "metrics" && p.ContainerPort == 9478
	}
	if !metricsPort {
		t.Errorf("no port metrics 9478 (--metricsListen's default) for the probes")
	}
	for _, p := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{
		{"startupProbe", c.StartupProbe, "/healthz"},
		{"livenessProbe", c.LivenessProbe, "/healthz"},
		{"readinessProbe", c.ReadinessProbe, "/readyz"},
	} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s: none, or not an httpGet", p.name)
			continue
		}
		if g := p.probe.HTTPGet; g.Path != p.path || g.Port.String() != "metrics" {
			t.Errorf("%s: GET %s on port %s, want %s on metrics", p.name, g.Path, g.Port.String(), p.path)
		}
	}
	if s := c.StartupProbe; s != nil && s.PeriodSeconds*s.FailureThreshold < 60 {
		t.Errorf("startupProbe gives %d s, want at least 60", s.PeriodSeconds*s.FailureThreshold)
	}
	if l := c.LivenessProbe; l != nil && l.FailureThreshold < 3 {
		t.Errorf("livenessProbe failureThreshold %d: one slow answer must not restart the pod", l.FailureThreshold)
	}
}

// TestImageIsPinnedToARelease: with a moving tag such as latest, nodes restarted at
// different times run different builds, and the kubelet pulls on every start
// (imagePullPolicy defaults to Always), so an image imported on a node without a
// registry is not used.
func TestImageIsPinnedToARelease(t *testing.T) {
	const repo = "ghcr.io/shardlb/shardlb"
	release := regexp.MustCompile(`^v[0-9]+\.[0-9]+\.[0-9]+$`)
	image := daemonSet(t).Spec.Template.Spec.Containers[0].Image
	name, tag, _ := strings.Cut(image, ":")
	if name != repo || !release.MatchString(tag) {
		t.Errorf("daemonset.yaml image %q, want %s:vX.Y.Z, a release tag", image, repo)
	}

	data, err := fs.ReadFile(manifest.FS, "kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k struct {
		Images []struct {
			Name    string `json:"name"`
			NewName string `json:"newName"`
			NewTag  string `json:"newTag"`
			Digest  string `json:"digest"`
		} `json:"images"`
	}
	if err := yaml.Unmarshal(data, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	if len(k.Images) != 1 || k.Images[0].Name != repo || k.Images[0].NewName != "" || k.Images[0].NewTag != tag {
		t.Errorf("kustomization.yaml images %+v, want %s with newTag %s, the DaemonSet's", k.Images, repo, tag)
	}

	err = fs.WalkDir(manifest.FS, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := fs.ReadFile(manifest.FS, p)
		if err != nil {
			return err
		}
		if strings.Contains(string(data), ":latest") {
			t.Errorf("%s names a :latest image", p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestExamplesAreTheGuidesServices(t *testing.T) {
	objs, err := manifest.Examples()
	if err != nil {
		t.Fatal(err)
	}
	svcs := map[string]*corev1.Service{}
	pods := 0
	for _, o := range objs {
		switch o.GetKind() {
		case "Service":
			var s corev1.Service
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &s); err != nil {
				t.Fatal(err)
			}
			svcs[s.Name] = &s
		case "Pod":
			pods++
		}
	}
	if pods != 2 || len(svcs) != 2 {
		t.Fatalf("%d services and %d pods, want the guide's two of each", len(svcs), pods)
	}
	for name, pin := range map[string]string{"tcp-lb": "", "tcp-lb2": "llb-inst2"} {
		s := svcs[name]
		if s == nil {
			t.Fatalf("service %s missing", name)
		}
		if s.Spec.Type != corev1.ServiceTypeLoadBalancer || s.Spec.LoadBalancerClass == nil || *s.Spec.LoadBalancerClass != "loxilb.io/loxilb" {
			t.Errorf("%s: want a LoadBalancer of class loxilb.io/loxilb", name)
		}
		if got := s.Annotations["loxilb.io/zoneinstance"]; got != pin {
			t.Errorf("%s: zoneinstance %q, want %q", name, got, pin)
		}
		if len(s.Spec.Ports) != 1 || s.Spec.Ports[0].Port != 57002 || s.Spec.Ports[0].TargetPort.IntValue() != 80 {
			t.Errorf("%s: ports %v, want 57002 -> 80", name, s.Spec.Ports)
		}
	}
}

// TestManifestsPassTheAPIServer creates every object with a server-side dry run
// against a real kube-apiserver: schema, defaulting and admission all run, nothing
// is stored.
func TestManifestsPassTheAPIServer(t *testing.T) {
	c := newCluster(t)
	ctx := context.Background()
	var objs []*unstructured.Unstructured
	for _, f := range kustomizeResources(t) {
		o, err := manifest.File(f)
		if err != nil {
			t.Fatal(err)
		}
		objs = append(objs, o...)
	}
	ex, err := manifest.Examples()
	if err != nil {
		t.Fatal(err)
	}
	objs = append(objs, ex...)
	for _, o := range objs {
		name := o.GetKind() + "/" + o.GetName()
		t.Run(name, func(t *testing.T) {
			ri := c.resource(t, o)
			if _, err := ri.Create(ctx, o, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldValidation: "Strict"}); err != nil {
				t.Errorf("dry-run create %s: %v", name, err)
			}
		})
	}
}

// TestRBACGrantsWhatShardlbCallsAndNothingElse asks the apiserver's own authorizer
// (SubjectAccessReview) what the service account may do once the RBAC objects exist.
func TestRBACGrantsWhatShardlbCallsAndNothingElse(t *testing.T) {
	c := newCluster(t)
	ctx := context.Background()
	client := c.client
	for _, f := range []string{"serviceaccount.yaml", "rbac.yaml"} {
		objs, err := manifest.File(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range objs {
			if _, err := c.resource(t, o).Create(ctx, o, metav1.CreateOptions{}); err != nil {
				t.Fatalf("create %s %s: %v", o.GetKind(), o.GetName(), err)
			}
		}
	}
	const user = "system:serviceaccount:kube-system:shardlb"
	cases := []struct {
		verb, group, resource, sub, ns string
		allowed                        bool
	}{
		{"list", "", "services", "", "", true},
		{"watch", "", "services", "", "", true},
		{"patch", "", "services", "", "default", true},
		{"patch", "", "services", "status", "default", true},
		{"list", "discovery.k8s.io", "endpointslices", "", "", true},
		{"watch", "discovery.k8s.io", "endpointslices", "", "", true},
		{"create", "", "events", "", "default", true},
		{"create", "coordination.k8s.io", "leases", "", "kube-system", true},
		{"update", "coordination.k8s.io", "leases", "", "kube-system", true},
		{"delete", "coordination.k8s.io", "leases", "", "kube-system", true},
		{"watch", "coordination.k8s.io", "leases", "", "kube-system", true},
		{"list", "", "nodes", "", "", true},
		{"watch", "", "nodes", "", "", true},

		{"update", "", "services", "", "default", false},
		{"delete", "", "services", "", "default", false},
		{"create", "", "services", "", "default", false},
		{"create", "coordination.k8s.io", "leases", "", "default", false},
		{"update", "discovery.k8s.io", "endpointslices", "", "default", false},
		{"get", "", "secrets", "", "kube-system", false},
		{"list", "", "pods", "", "", false},
		{"patch", "", "nodes", "", "", false},
		{"update", "", "nodes", "", "", false},
	}
	for _, c := range cases {
		res := c.resource
		if c.sub != "" {
			res += "/" + c.sub
		}
		where := "cluster-wide"
		if c.ns != "" {
			where = "in " + c.ns
		}
		verdict := "may not"
		if c.allowed {
			verdict = "may"
		}
		t.Run(strings.Join([]string{"shardlb", verdict, c.verb, res, where}, " "), func(t *testing.T) {
			r, err := client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
				Spec: authorizationv1.SubjectAccessReviewSpec{
					User:   user,
					Groups: []string{"system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"},
					ResourceAttributes: &authorizationv1.ResourceAttributes{
						Verb: c.verb, Group: c.group, Resource: c.resource, Subresource: c.sub, Namespace: c.ns,
					},
				},
			}, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if r.Status.Allowed != c.allowed {
				t.Errorf("allowed = %v, want %v (%s)", r.Status.Allowed, c.allowed, r.Status.Reason)
			}
		})
	}
}

// cluster is a real apiserver with the clients the tests create objects through.
type cluster struct {
	client kubernetes.Interface
	dyn    dynamic.Interface
	mapper meta.RESTMapper
}

func newCluster(t *testing.T) *cluster {
	t.Helper()
	srv := kubeapi.ForTest(t, kubeapi.Options{})
	client, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	groups, err := restmapper.GetAPIGroupResources(client.Discovery())
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(srv.RESTConfig())
	if err != nil {
		t.Fatal(err)
	}
	return &cluster{client: client, dyn: dyn, mapper: restmapper.NewDiscoveryRESTMapper(groups)}
}

// resource is where o is created: its kind's resource, in its namespace ("default"
// when a namespaced object names none).
func (c *cluster) resource(t *testing.T, o *unstructured.Unstructured) dynamic.ResourceInterface {
	t.Helper()
	gvk := o.GroupVersionKind()
	m, err := c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		t.Fatalf("%s: the apiserver does not serve it: %v", gvk, err)
	}
	if m.Scope.Name() != meta.RESTScopeNameNamespace {
		return c.dyn.Resource(m.Resource)
	}
	ns := o.GetNamespace()
	if ns == "" {
		ns = "default"
	}
	return c.dyn.Resource(m.Resource).Namespace(ns)
}
