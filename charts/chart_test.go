// Package charts_test renders the Helm chart with Helm v4 and holds it to manifest/:
// with default values it is the same objects, and with the guide's values as objects
// the apiserver accepts everything it renders.
package charts_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/yaml"

	"github.com/shardlb/shardlb/internal/testenv"
	"github.com/shardlb/shardlb/manifest"
	"github.com/shardlb/shardlb/test/kubeapi"
)

// helmVersion is the Helm the chart is tested with.
const helmVersion = "v4.3.2"

// helm finds the helm binary: on PATH or in GOPATH/bin, where
// `go install helm.sh/helm/v4/cmd/helm@v4.3.2` puts it. It must be Helm v4.
func helm(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("helm")
	if err != nil {
		gopath, _ := exec.Command("go", "env", "GOPATH").Output()
		path = filepath.Join(strings.TrimSpace(string(gopath)), "bin", "helm")
		if _, err := os.Stat(path); err != nil {
			testenv.Unavailable(t, "helm not found: go install helm.sh/helm/v4/cmd/helm@%s", helmVersion)
		}
	}
	out, err := exec.Command(path, "version", "--template", "{{.Version}}").Output()
	if err != nil || !strings.HasPrefix(string(out), "v4.") {
		testenv.Unavailable(t, "%s is not Helm v4 (%q): go install helm.sh/helm/v4/cmd/helm@%s", path, out, helmVersion)
	}
	return path
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, out, stderr.String())
	}
	return string(out)
}

// render runs helm template in kube-system with the CRDs and the given values files.
func render(t *testing.T, values ...string) []*unstructured.Unstructured {
	t.Helper()
	args := []string{"template", "shardlb", "shardlb", "--namespace", "kube-system", "--include-crds"}
	for _, v := range values {
		args = append(args, "--values", v)
	}
	objs, err := manifest.Decode([]byte(run(t, helm(t), args...)))
	if err != nil {
		t.Fatalf("helm template output: %v", err)
	}
	return objs
}

func key(o *unstructured.Unstructured) string {
	return o.GetKind() + "/" + o.GetNamespace() + "/" + o.GetName()
}

func TestHelmLintIsClean(t *testing.T) {
	h := helm(t)
	for _, values := range [][]string{nil, {"shardlb/values-guide-objects.yaml"}} {
		args := []string{"lint", "--strict", "shardlb"}
		for _, v := range values {
			args = append(args, "--values", v)
		}
		out := run(t, h, args...)
		if !strings.Contains(out, "0 chart(s) failed") {
			t.Errorf("helm %s:\n%s", strings.Join(args, " "), out)
		}
	}
}

// TestDefaultValuesRenderTheManifests: helm template with default values gives
// exactly the objects of manifest/ (kustomization.yaml's resources), CRDs included.
func TestDefaultValuesRenderTheManifests(t *testing.T) {
	want := map[string]*unstructured.Unstructured{}
	data, err := manifest.FS.ReadFile("kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k struct {
		Resources []string `json:"resources"`
	}
	if err := yaml.Unmarshal(data, &k); err != nil {
		t.Fatal(err)
	}
	for _, f := range k.Resources {
		objs, err := manifest.File(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range objs {
			want[key(o)] = o
		}
	}
	got := map[string]*unstructured.Unstructured{}
	for _, o := range render(t) {
		got[key(o)] = o
	}
	for k, w := range want {
		g, ok := got[k]
		if !ok {
			t.Errorf("the chart does not render %s", k)
			continue
		}
		if !reflect.DeepEqual(g.Object, w.Object) {
			gy, _ := yaml.Marshal(g.Object)
			wy, _ := yaml.Marshal(w.Object)
			t.Errorf("%s differs from manifest/:\n--- chart\n%s\n--- manifest\n%s", k, gy, wy)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("the chart renders %s, which manifest/ does not have", k)
		}
	}
}

// TestRenderedObjectsPassTheAPIServer installs the rendered CRDs in a real
// kube-apiserver, then creates every other rendered object with a server-side dry
// run (schema, CEL rules, defaulting, admission), with default values and with the
// guide's values as objects.
func TestRenderedObjectsPassTheAPIServer(t *testing.T) {
	srv := kubeapi.ForTest(t, kubeapi.Options{})
	client, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(srv.RESTConfig())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	crds := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, o := range render(t) {
		if o.GetKind() == "CustomResourceDefinition" {
			if _, err := dyn.Resource(crds).Create(ctx, o, metav1.CreateOptions{}); err != nil {
				t.Fatalf("create %s: %v", key(o), err)
			}
		}
	}
	var mapper meta.RESTMapper
	deadline := time.Now().Add(30 * time.Second)
	for {
		groups, err := restmapper.GetAPIGroupResources(client.Discovery())
		if err == nil {
			mapper = restmapper.NewDiscoveryRESTMapper(groups)
			served := 0
			for _, kind := range []string{"IPPool", "BGPPeer", "BFDProfile", "BGPAdvertisement"} {
				if _, err := mapper.RESTMapping(schema.GroupKind{Group: "shardlb.io", Kind: kind}, "v1alpha1"); err == nil {
					served++
				}
			}
			if served == 4 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the CRDs are not served within 30s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, values := range [][]string{nil, {"shardlb/values-guide-objects.yaml"}} {
		objs := render(t, values...)
		n := 0
		for _, o := range objs {
			if o.GetKind() == "CustomResourceDefinition" {
				continue
			}
			n++
			name := fmt.Sprintf("values %v: %s", values, key(o))
			t.Run(name, func(t *testing.T) {
				gvk := o.GroupVersionKind()
				m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
				if err != nil {
					t.Fatalf("%s is not served: %v", gvk, err)
				}
				var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
				if m.Scope.Name() == meta.RESTScopeNameNamespace {
					ri = dyn.Resource(m.Resource).Namespace(o.GetNamespace())
				}
				if _, err := ri.Create(ctx, o, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldValidation: "Strict"}); err != nil {
					t.Errorf("dry-run create: %v", err)
				}
			})
		}
		if len(values) > 0 && n != 9 {
			t.Errorf("the guide's values rendered %d objects besides the CRDs, want the 6 of manifest/ and the 3 objects of its values", n)
		}
	}
}
