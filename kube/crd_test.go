package kube

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/shardlb/shardlb/api/v1alpha1"
	"github.com/shardlb/shardlb/config"
)

// crdRuns numbers the tests' namespaces and nodes, so -count=N reuses none.
var crdRuns atomic.Int64

var crdOnce struct {
	sync.Once
	err error
}

// installCRDs applies manifest/crds to the shared apiserver once and waits until
// each is established.
func installCRDs(tb testing.TB, dyn dynamic.Interface) {
	tb.Helper()
	crdOnce.Do(func() {
		crds := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
		files, _ := filepath.Glob("../manifest/crds/*.yaml")
		if len(files) != 4 {
			crdOnce.err = fmt.Errorf("want 4 CRD files in manifest/crds, found %d", len(files))
			return
		}
		ctx := context.Background()
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				crdOnce.err = err
				return
			}
			var u unstructured.Unstructured
			if err := yaml.Unmarshal(b, &u.Object); err != nil {
				crdOnce.err = err
				return
			}
			if _, err := dyn.Resource(crds).Create(ctx, &u, metav1.CreateOptions{}); err != nil {
				crdOnce.err = fmt.Errorf("create CRD %s: %v", u.GetName(), err)
				return
			}
			deadline := time.Now().Add(30 * time.Second)
			for {
				got, err := dyn.Resource(crds).Get(ctx, u.GetName(), metav1.GetOptions{})
				if err == nil && crdEstablished(got) {
					break
				}
				if time.Now().After(deadline) {
					crdOnce.err = fmt.Errorf("CRD %s not established", u.GetName())
					return
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
	})
	if crdOnce.err != nil {
		tb.Fatal(crdOnce.err)
	}
}

func crdEstablished(u *unstructured.Unstructured) bool {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == "Established" && m["status"] == "True" {
			return true
		}
	}
	return false
}

// crdLog logs at Info with -v, else nowhere.
func crdLog(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

// crdEnv is a test's handle on the configuration objects.
type crdEnv struct {
	*env
	dyn dynamic.Interface
	// top is the test that owns the objects: they live until it ends, across its
	// subtests.
	top testing.TB
}

// newCRDEnv makes a namespace of its own for the test, unique per run (-count).
func newCRDEnv(t *testing.T, name string) *crdEnv {
	e := newEnv(t, fmt.Sprintf("%s-%d", name, crdRuns.Add(1)))
	dyn, err := dynamic.NewForConfig(e.srv.RESTConfig())
	if err != nil {
		t.Fatal(err)
	}
	installCRDs(t, dyn)
	return &crdEnv{env: e, dyn: dyn, top: t}
}

func toUnstructured(t testing.TB, kind string, obj runtime.Object) *unstructured.Unstructured {
	t.Helper()
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{Object: m}
	u.SetAPIVersion(v1alpha1.GroupVersion.String())
	u.SetKind(kind)
	return u
}

func gvrOf(kind string) schema.GroupVersionResource {
	for _, k := range objectKinds {
		if string(k.kind) == kind {
			return k.gvr
		}
	}
	panic(kind)
}

func (c *crdEnv) create(t testing.TB, kind string, obj runtime.Object) error {
	t.Helper()
	_, err := c.dyn.Resource(gvrOf(kind)).Create(context.Background(), toUnstructured(t, kind, obj), metav1.CreateOptions{})
	if err == nil {
		name := obj.(metav1.Object).GetName()
		c.top.Cleanup(func() { _ = c.dyn.Resource(gvrOf(kind)).Delete(context.Background(), name, metav1.DeleteOptions{}) })
	}
	return err
}

func (c *crdEnv) mustCreate(t testing.TB, kind string, obj runtime.Object) {
	t.Helper()
	if err := c.create(t, kind, obj); err != nil {
		t.Fatalf("create %s: %v", kind, err)
	}
}

func (c *crdEnv) delete(t testing.TB, kind, name string) {
	t.Helper()
	if err := c.dyn.Resource(gvrOf(kind)).Delete(context.Background(), name, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete %s %s: %v", kind, name, err)
	}
}

// accepted returns an object's Accepted condition (nil if none).
func (c *crdEnv) accepted(t testing.TB, kind, name string) *metav1.Condition {
	t.Helper()
	u, err := c.dyn.Resource(gvrOf(kind)).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return nil
	}
	var st struct {
		Status v1alpha1.Status `json:"status"`
	}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &st); err != nil {
		t.Fatal(err)
	}
	return meta.FindStatusCondition(st.Status.Conditions, v1alpha1.ConditionAccepted)
}

// warnings lists the Warning Events on a cluster-scoped object (this one, by UID), as
// "reason: message".
func (c *crdEnv) warnings(t testing.TB, kind, name string) []string {
	t.Helper()
	u, err := c.dyn.Resource(gvrOf(kind)).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	evs, err := c.client.CoreV1().Events(metav1.NamespaceDefault).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, ev := range evs.Items {
		if ev.InvolvedObject.Kind == kind && ev.InvolvedObject.UID == u.GetUID() && ev.Type == corev1.EventTypeWarning {
			for range max(ev.Count, 1) {
				out = append(out, ev.Reason+": "+ev.Message)
			}
		}
	}
	return out
}

// applied records what WatchObjects applied last.
type applied struct {
	mu   sync.Mutex
	last config.Desired
	n    int
}

func (a *applied) apply(_ context.Context, d config.Desired) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.last, a.n = d, a.n+1
	return nil
}

func (a *applied) peers() map[string]config.Peer {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := map[string]config.Peer{}
	for _, p := range a.last.Peers {
		out[p.Addr.String()] = p
	}
	return out
}

func (c *crdEnv) watch(t *testing.T, node string, labels map[string]string, flags config.Flags) *applied {
	t.Helper()
	_, err := c.client.CoreV1().Nodes().Create(context.Background(), &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node, Labels: labels}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.client.CoreV1().Nodes().Delete(context.Background(), node, metav1.DeleteOptions{}) })
	cfg := c.config(t, node, "", 1)
	a := &applied{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- WatchObjects(ctx, cfg, ObjectsDeps{Logger: crdLog(t).With("node", node), Flags: flags, Apply: a.apply, RetryAfter: time.Second})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("WatchObjects: %v", err)
		}
	})
	return a
}

func peer(name, addr string, asn uint32) *v1alpha1.BGPPeer {
	return &v1alpha1.BGPPeer{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: v1alpha1.BGPPeerSpec{PeerAddress: addr, PeerASN: asn}}
}

func u32(v uint32) *uint32 { return &v }

// TestSchemaRefusesBadObjects applies objects the CRDs' schema refuses, each with the
// message a user reads from kubectl apply.
func TestSchemaRefusesBadObjects(t *testing.T) {
	c := newCRDEnv(t, "crd-schema")
	for _, tc := range []struct {
		name, kind string
		obj        runtime.Object
		want       string
	}{
		{"a peer address that is not an IP", "BGPPeer", peer("bad-addr", "300.1.1.1", 65000), "peerAddress must be an IPv4 or IPv6 address"},
		{"AS 0", "BGPPeer", peer("bad-asn0", "10.1.1.1", 0), "peerASN"},
		{"AS_TRANS", "BGPPeer", peer("bad-astrans", "10.1.1.1", 23456), "AS_TRANS"},
		{"a hold time below 3s", "BGPPeer", func() runtime.Object {
			p := peer("bad-hold", "10.1.1.1", 65000)
			p.Spec.HoldTime = &metav1.Duration{Duration: time.Second}
			return p
		}(), "holdTime must be 3s to 65535s"},
		{"a keepalive not below the hold time", "BGPPeer", func() runtime.Object {
			p := peer("bad-keepalive", "10.1.1.1", 65000)
			p.Spec.HoldTime, p.Spec.KeepaliveTime = &metav1.Duration{Duration: 9 * time.Second}, &metav1.Duration{Duration: 9 * time.Second}
			return p
		}(), "keepaliveTime must be below holdTime"},
		{"a pool CIDR with a /33", "IPPool", &v1alpha1.IPPool{ObjectMeta: metav1.ObjectMeta{Name: "bad-cidr"}, Spec: v1alpha1.IPPoolSpec{Addresses: []string{"10.0.0.0/33"}}}, "must be a CIDR"},
		{"a pool range with a bad end", "IPPool", &v1alpha1.IPPool{ObjectMeta: metav1.ObjectMeta{Name: "bad-range"}, Spec: v1alpha1.IPPoolSpec{Addresses: []string{"10.0.0.1-10.0.0"}}}, "must be a CIDR"},
		{"a BFD interval of 5 ms", "BFDProfile", &v1alpha1.BFDProfile{ObjectMeta: metav1.ObjectMeta{Name: "bad-interval"}, Spec: v1alpha1.BFDProfileSpec{TransmitInterval: u32(5)}}, "transmitInterval"},
		{"BFD echo mode", "BFDProfile", &v1alpha1.BFDProfile{ObjectMeta: metav1.ObjectMeta{Name: "bad-echo"}, Spec: v1alpha1.BFDProfileSpec{EchoMode: ptr.To(true)}}, "echoMode is not supported"},
		{"a community with a 17-bit half", "BGPAdvertisement", &v1alpha1.BGPAdvertisement{ObjectMeta: metav1.ObjectMeta{Name: "bad-community"}, Spec: v1alpha1.BGPAdvertisementSpec{Communities: []string{"65536:1"}}}, "a community must be ASN:VALUE with both numbers 0-65535"},
		{"a master LOCAL_PREF equal to the backup's", "BGPAdvertisement", &v1alpha1.BGPAdvertisement{ObjectMeta: metav1.ObjectMeta{Name: "bad-lp"}, Spec: v1alpha1.BGPAdvertisementSpec{LocalPref: &v1alpha1.RoleValues{Master: u32(100), Backup: u32(100)}}}, "master and backup must differ"},
	} {
		t.Run(tc.name+" is refused", func(t *testing.T) {
			err := c.create(t, tc.kind, tc.obj)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("create = %v, want a refusal saying %q", err, tc.want)
			}
		})
	}
	t.Run("a 4-byte ASN and an IPv6 peer are accepted", func(t *testing.T) {
		c.mustCreate(t, "BGPPeer", peer("good-4byte", "2001:db8::1", 4200000000))
	})
}

// TestObjectsAppliedLive runs two nodes' watchers against the real apiserver and
// changes the objects under them.
func TestObjectsAppliedLive(t *testing.T) {
	c := newCRDEnv(t, "crd-live")
	flagPeer := config.Peer{Addr: netip.MustParseAddr("172.30.0.1"), ASN: 64512}
	flags := config.Flags{Peers: []config.Peer{flagPeer}, Defaults: config.Defaults{
		Master: config.Attrs{LocalPref: 5000, MED: 10}, Successor: config.Attrs{LocalPref: 200, MED: 15}, Backup: config.Attrs{LocalPref: 100, MED: 20}}}
	nodeA, nodeB := c.ns+"-a", c.ns+"-b"
	a := c.watch(t, nodeA, map[string]string{"rack": "a"}, flags)
	b := c.watch(t, nodeB, map[string]string{"rack": "b"}, flags)
	has := func(ap *applied, addr string) bool { _, ok := ap.peers()[addr]; return ok }
	waitFor(t, 15*time.Second, "the flag peer applied on both nodes", func() bool { return has(a, "172.30.0.1") && has(b, "172.30.0.1") })

	t.Run("a BGPPeer created is applied on every node and accepted", func(t *testing.T) {
		c.mustCreate(t, "BGPPeer", peer("r2", "172.30.0.2", 64513))
		waitFor(t, 10*time.Second, "r2 on both nodes", func() bool { return has(a, "172.30.0.2") && has(b, "172.30.0.2") })
		waitFor(t, 10*time.Second, "r2 accepted", func() bool {
			cond := c.accepted(t, "BGPPeer", "r2")
			return cond != nil && cond.Status == metav1.ConditionTrue && cond.ObservedGeneration == 1
		})
	})
	t.Run("a node selector keeps a peer to its rack, and follows a label change", func(t *testing.T) {
		p := peer("rack-b", "172.30.1.1", 64514)
		p.Spec.NodeSelectors = []metav1.LabelSelector{{MatchLabels: map[string]string{"rack": "b"}}}
		c.mustCreate(t, "BGPPeer", p)
		waitFor(t, 10*time.Second, "rack-b on node b", func() bool { return has(b, "172.30.1.1") })
		time.Sleep(300 * time.Millisecond)
		if has(a, "172.30.1.1") {
			t.Fatal("node a (rack a) peers with rack b's router")
		}
		n, err := c.client.CoreV1().Nodes().Get(context.Background(), nodeA, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		n.Labels["rack"] = "b"
		if _, err := c.client.CoreV1().Nodes().Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "rack-b on node a once it is labelled rack b", func() bool { return has(a, "172.30.1.1") })
	})
	t.Run("a peer naming a missing BFD profile is refused with an Event until the profile exists", func(t *testing.T) {
		p := peer("fast", "172.30.0.3", 64513)
		p.Spec.BFDProfile = "fast100"
		c.mustCreate(t, "BGPPeer", p)
		waitFor(t, 10*time.Second, "fast refused", func() bool {
			cond := c.accepted(t, "BGPPeer", "fast")
			return cond != nil && cond.Status == metav1.ConditionFalse && cond.Reason == v1alpha1.ReasonUnknownProfile
		})
		waitFor(t, 10*time.Second, "a Warning Event on fast", func() bool { return len(c.warnings(t, "BGPPeer", "fast")) > 0 })
		if has(a, "172.30.0.3") || !has(a, "172.30.0.1") || !has(a, "172.30.0.2") {
			t.Fatalf("peers on node a = %v: want the others kept and the refused one out", a.peers())
		}
		c.mustCreate(t, "BFDProfile", &v1alpha1.BFDProfile{ObjectMeta: metav1.ObjectMeta{Name: "fast100"}, Spec: v1alpha1.BFDProfileSpec{TransmitInterval: u32(100), ReceiveInterval: u32(100)}})
		waitFor(t, 10*time.Second, "fast applied with the profile's BFD", func() bool {
			p, ok := a.peers()["172.30.0.3"]
			return ok && p.BFD != nil && p.BFD.Transmit == 100*time.Millisecond && p.BFD.DetectMultiplier == 3
		})
		waitFor(t, 10*time.Second, "fast accepted", func() bool {
			cond := c.accepted(t, "BGPPeer", "fast")
			return cond != nil && cond.Status == metav1.ConditionTrue
		})
		// Both nodes refused it; the Event was told once.
		if w := c.warnings(t, "BGPPeer", "fast"); len(w) != 1 {
			t.Errorf("Warning Events on fast = %q, want one (every node agrees, one tells)", w)
		}
	})
	t.Run("a peer for the flag's router is refused and the flag's peer stays", func(t *testing.T) {
		c.mustCreate(t, "BGPPeer", peer("dup", "172.30.0.1", 65000))
		waitFor(t, 10*time.Second, "dup refused as a conflict", func() bool {
			cond := c.accepted(t, "BGPPeer", "dup")
			return cond != nil && cond.Status == metav1.ConditionFalse && cond.Reason == v1alpha1.ReasonConflict
		})
		if p := a.peers()["172.30.0.1"]; p.ASN != 64512 || p.Name != "" {
			t.Fatalf("flag peer = %+v, want AS 64512 from the flag", p)
		}
	})
	t.Run("a password Secret gives the peer its password, live", func(t *testing.T) {
		p := peer("secure", "172.30.0.4", 64513)
		p.Spec.PasswordSecret = &v1alpha1.SecretReference{Name: "bgp-secure"}
		c.mustCreate(t, "BGPPeer", p)
		waitFor(t, 10*time.Second, "secure refused without its Secret", func() bool {
			cond := c.accepted(t, "BGPPeer", "secure")
			return cond != nil && cond.Reason == v1alpha1.ReasonSecretNotFound
		})
		_, err := c.client.CoreV1().Secrets(c.ns).Create(context.Background(), &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: "bgp-secure"}, Type: corev1.SecretTypeBasicAuth,
			StringData: map[string]string{"username": "x", "password": "s3cret"}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "secure applied with its password", func() bool { return a.peers()["172.30.0.4"].Password == "s3cret" })
	})
	t.Run("a BGPPeer deleted is removed on every node", func(t *testing.T) {
		c.delete(t, "BGPPeer", "r2")
		waitFor(t, 10*time.Second, "r2 gone", func() bool { return !has(a, "172.30.0.2") && !has(b, "172.30.0.2") })
		if !has(a, "172.30.0.1") || !has(a, "172.30.0.3") {
			t.Fatalf("peers on node a = %v: others must stay", a.peers())
		}
	})
	t.Run("an advertisement of communities is accepted, one of LOCAL_PREF is reported as not applied yet", func(t *testing.T) {
		c.mustCreate(t, "BGPAdvertisement", &v1alpha1.BGPAdvertisement{ObjectMeta: metav1.ObjectMeta{Name: "tagged"},
			Spec: v1alpha1.BGPAdvertisementSpec{Communities: []string{"64512:100"}}})
		c.mustCreate(t, "BGPAdvertisement", &v1alpha1.BGPAdvertisement{ObjectMeta: metav1.ObjectMeta{Name: "preferred"},
			Spec: v1alpha1.BGPAdvertisementSpec{LocalPref: &v1alpha1.RoleValues{Master: u32(6000)}}})
		waitFor(t, 10*time.Second, "tagged accepted and preferred NotSupported", func() bool {
			t1, t2 := c.accepted(t, "BGPAdvertisement", "tagged"), c.accepted(t, "BGPAdvertisement", "preferred")
			return t1 != nil && t1.Status == metav1.ConditionTrue &&
				t2 != nil && t2.Status == metav1.ConditionFalse && t2.Reason == v1alpha1.ReasonNotSupported && strings.Contains(t2.Message, "localPref")
		})
	})
	t.Run("a valid IPPool is accepted", func(t *testing.T) {
		c.mustCreate(t, "IPPool", &v1alpha1.IPPool{ObjectMeta: metav1.ObjectMeta{Name: "later"}, Spec: v1alpha1.IPPoolSpec{Addresses: []string{"10.77.0.0/24"}}})
		waitFor(t, 10*time.Second, "later accepted", func() bool {
			cond := c.accepted(t, "IPPool", "later")
			return cond != nil && cond.Status == metav1.ConditionTrue && cond.Reason == v1alpha1.ReasonAccepted
		})
	})
}
