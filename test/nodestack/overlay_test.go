package nodestack

import (
	"os"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/shardlb/shardlb/manifest"
)

// The overlay repeats the DaemonSet's args (a strategic merge patch replaces them
// whole): they must stay the base's but for --interfaces, or the lab would test
// another configuration than the one shipped.
func TestTheOverlayKeepsTheBasesArgumentsButInterfaces(t *testing.T) {
	objs, err := manifest.File("daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	base := containerArgs(t, objs)
	data, err := os.ReadFile("overlay/args.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if objs, err = manifest.Decode(data); err != nil {
		t.Fatal(err)
	}
	patch := containerArgs(t, objs)
	strip := func(args []string) []string {
		return slices.DeleteFunc(slices.Clone(args), func(a string) bool { return strings.HasPrefix(a, "--interfaces=") })
	}
	if !slices.Equal(strip(base), strip(patch)) {
		t.Errorf("overlay/args.yaml args %q, want the base's %q but for --interfaces", patch, base)
	}
	if !slices.Contains(patch, "--interfaces=eth0,cni0") {
		t.Errorf("overlay/args.yaml args %q lack --interfaces=eth0,cni0 (the node's link and the pod bridge)", patch)
	}
}

// containerArgs returns the args of the shardlb container of the one DaemonSet.
func containerArgs(t *testing.T, objs []*unstructured.Unstructured) []string {
	t.Helper()
	if len(objs) != 1 {
		t.Fatalf("%d objects, want the DaemonSet", len(objs))
	}
	var ds appsv1.DaemonSet
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(objs[0].Object, &ds); err != nil {
		t.Fatal(err)
	}
	cs := ds.Spec.Template.Spec.Containers
	if len(cs) != 1 || cs[0].Name != "shardlb" {
		t.Fatalf("containers %v, want one named shardlb", cs)
	}
	return cs[0].Args
}
