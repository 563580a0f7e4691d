package bgp

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/shardlb/shardlb/api/v1alpha1"
	"github.com/shardlb/shardlb/config"
	"github.com/shardlb/shardlb/ipam"
	"github.com/shardlb/shardlb/kube"
	"github.com/shardlb/shardlb/manifest"
	"github.com/shardlb/shardlb/shard"
	"github.com/shardlb/shardlb/test/kubeapi"
)

// TestFRRBGPPeerObjects drives a speaker from BGPPeer and BFDProfile objects in a real
// kube-apiserver, through kube.WatchObjects, against a real FRR: a peer created comes
// up at FRR, a BFD profile given to it brings BFD up with its timers, and a peer
// deleted goes down, while the flag-configured speaker beside it is never disturbed.
func TestFRRBGPPeerObjects(t *testing.T) {
	// FRR runs BFD with every neighbor; the speakers' own default is 300 ms x 3.
	l := newLab(t, labConfig{routerASN: 65000, speakerASN: 65000, speakers: 2, bfd: 300 * time.Millisecond})
	flagged, driven := l.speakers[0], l.speakers[1]
	flagged.set(t, labAdv(shard.RoleMaster))
	driven.set(t, labAdv(shard.RoleBackup), shard.Advertisement{Prefix: otherVIP, Role: shard.RoleBackup, Instance: "default"})
	driven.setPeers(t) // from now on, its peers come from objects only
	l.eventually(t, 10*time.Second, "driven's session down at FRR", func(ctx context.Context) bool {
		sum, err := l.router.Summary(ctx)
		return err == nil && sum[driven.addr].State != "Established"
	})
	since := flagged.peers(t)[0].Since

	srv := kubeapi.ForTest(t, kubeapi.Options{})
	dyn, err := dynamic.NewForConfig(srv.RESTConfig())
	if err != nil {
		t.Fatal(err)
	}
	installCRDs(t, dyn)

	cfg := kube.DefaultConfig()
	cfg.NodeName, cfg.Namespace, cfg.REST = "driven", "kube-system", srv.RESTConfig()
	// The flags' pools: labVIP's and otherVIP's.
	pools, err := ipam.ParsePools("vips=10.96.0.1-10.96.0.10,other=10.96.1.1-10.96.1.10")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- kube.WatchObjects(ctx, cfg, kube.ObjectsDeps{
			Logger: testLogger(t),
			Flags:  config.Flags{Pools: pools},
			Apply: func(_ context.Context, d config.Desired) error {
				driven.setPeers(t, objectPeers(d.Peers)...)
				driven.setPoolCommunities(t, objectCommunities(d)...)
				return nil
			},
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})

	create := func(t *testing.T, kind string, gvr schema.GroupVersionResource, obj runtime.Object) {
		t.Helper()
		m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
		if err != nil {
			t.Fatal(err)
		}
		u := &unstructured.Unstructured{Object: m}
		u.SetAPIVersion(v1alpha1.GroupVersion.String())
		u.SetKind(kind)
		if _, err := dyn.Resource(gvr).Create(context.Background(), u, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create %s: %v", kind, err)
		}
	}
	established := func(ctx context.Context) bool {
		sum, err := l.router.Summary(ctx)
		return err == nil && sum[driven.addr].State == "Established"
	}

	t.Run("a BGPPeer created is dialled and comes up at FRR", func(t *testing.T) {
		create(t, "BGPPeer", v1alpha1.BGPPeers, &v1alpha1.BGPPeer{ObjectMeta: metav1.ObjectMeta{Name: "frr"},
			Spec: v1alpha1.BGPPeerSpec{PeerAddress: routerAddr.String(), PeerASN: 65000}})
		l.eventually(t, 30*time.Second, "driven's session up at FRR", established)
	})
	t.Run("a BFD profile given to the peer brings BFD up with its timers", func(t *testing.T) {
		tx, rx, mult := uint32(200), uint32(200), uint32(4)
		create(t, "BFDProfile", v1alpha1.BFDProfiles, &v1alpha1.BFDProfile{ObjectMeta: metav1.ObjectMeta{Name: "fast"},
			Spec: v1alpha1.BFDProfileSpec{TransmitInterval: &tx, ReceiveInterval: &rx, DetectMultiplier: &mult}})
		patch := []byte(`{"spec":{"bfdProfile":"fast"}}`)
		if _, err := dyn.Resource(v1alpha1.BGPPeers).Patch(context.Background(), "frr", "application/merge-patch+json", patch, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		l.eventually(t, 30*time.Second, "BFD up at FRR with the profile's timers", func(ctx context.Context) bool {
			return established(ctx) && frrSeesBFD(ctx, l, driven.addr.String(), 200, 4)
		})
	})
	t.Run("a BGPAdvertisement's community reaches its pool's VIPs only, the route never missing", func(t *testing.T) {
		w := l.watchRoute()
		create(t, "BGPAdvertisement", v1alpha1.BGPAdvertisements, &v1alpha1.BGPAdvertisement{ObjectMeta: metav1.ObjectMeta{Name: "vips"},
			Spec: v1alpha1.BGPAdvertisementSpec{IPPools: []string{"vips"}, Communities: []string{"64512:100"}}})
		var seen []string
		defer func() {
			if t.Failed() {
				t.Logf("communities seen on driven's path: %q", seen)
			}
		}()
		l.eventually(t, 10*time.Second, "the community on driven's path for labVIP", func(ctx context.Context) bool {
			c := frrCommunity(ctx, l, labVIP, driven.addr.String())
			if !slices.Contains(seen, c) {
				seen = append(seen, c)
			}
			return c == "64512:100"
		})
		if c := frrCommunity(context.Background(), l, otherVIP, driven.addr.String()); c != "" {
			t.Errorf("the other pool's VIP carries %q, want no community", c)
		}
		if c := frrCommunity(context.Background(), l, labVIP, flagged.addr.String()); c != "" {
			t.Errorf("the flag-configured speaker's path carries %q, want no community", c)
		}
		if err := dyn.Resource(v1alpha1.BGPAdvertisements).Delete(context.Background(), "vips", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		l.eventually(t, 10*time.Second, "the community gone", func(ctx context.Context) bool {
			return frrCommunity(ctx, l, labVIP, driven.addr.String()) == "" && len(l.paths(t, ctx)) == 2
		})
		missing, polls, err := w.end()
		if err != nil {
			t.Fatal(err)
		}
		if missing > 0 {
			t.Fatalf("kernel route missing in %d of %d polls", missing, polls)
		}
	})
	t.Run("a BGPPeer deleted is closed", func(t *testing.T) {
		if err := dyn.Resource(v1alpha1.BGPPeers).Delete(context.Background(), "frr", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		l.eventually(t, 10*time.Second, "driven's session down at FRR", func(ctx context.Context) bool { return !established(ctx) })
	})
	if p := flagged.peers(t)[0]; !p.Established || !p.Since.Equal(since) {
		t.Fatalf("the flag-configured speaker's session = %+v, want established since %v", p, since)
	}
}

// objectPeers is cmd/shardlb's conversion of the configuration's peers, for tests.
func objectPeers(ps []config.Peer) []Peer {
	out := []Peer{}
	for _, p := range ps {
		bp := Peer{Addr: p.Addr, ASN: p.ASN, Port: p.Port, Password: p.Password, LocalAddr: p.SourceAddr, HoldTime: p.HoldTime, KeepaliveInterval: p.Keepalive}
		if p.BFD != nil {
			bp.BFD = &BFDConfig{Enabled: true, Interval: p.BFD.Transmit, Receive: p.BFD.Receive, Multiplier: p.BFD.DetectMultiplier}
		}
		out = append(out, bp)
	}
	return out
}

var otherVIP = netip.MustParsePrefix("10.96.1.1/32")

// objectCommunities is cmd/shardlb's conversion of the pools' communities, for tests.
func objectCommunities(d config.Desired) []PoolCommunities {
	out := []PoolCommunities{}
	for _, p := range d.Pools {
		cs, ok := d.PoolCommunities[p.Name]
		if !ok {
			continue
		}
		pc := PoolCommunities{Communities: cs.Communities, LargeCommunities: cs.LargeCommunities}
		for _, r := range p.Ranges {
			pc.Prefixes = append(pc.Prefixes, RangePrefixes(r.First, r.Last)...)
		}
		out = append(out, pc)
	}
	return out
}

// frrCommunity is the community string of FRR's path for prefix from peer ("" none).
func frrCommunity(ctx context.Context, l *lab, prefix netip.Prefix, peer string) string {
	out, err := l.router.Vtysh(ctx, fmt.Sprintf("show bgp ipv4 unicast %s json", prefix))
	if err != nil {
		return "error: " + err.Error()
	}
	var v struct {
		Paths []struct {
			Community struct {
				String string `json:"string"`
			} `json:"community"`
			Peer struct {
				PeerID string `json:"peerId"`
			} `json:"peer"`
		} `json:"paths"`
	}
	if err := json.Unmarshal(out, &v); err != nil {
		return "error: " + err.Error()
	}
	for _, p := range v.Paths {
		if p.Peer.PeerID == peer {
			return p.Community.String
		}
	}
	return "no path"
}

// frrSeesBFD reports whether FRR has an up BFD session with peer whose remote side
// sends every txMillis with the multiplier.
func frrSeesBFD(ctx context.Context, l *lab, peer string, txMillis, mult int) bool {
	out, err := l.router.Vtysh(ctx, "show bfd peers json")
	if err != nil {
		return false
	}
	var peers []struct {
		Peer       string `json:"peer"`
		Status     string `json:"status"`
		RemoteTx   int    `json:"remote-transmit-interval"`
		RemoteMult int    `json:"remote-detect-multiplier"`
	}
	if json.Unmarshal(out, &peers) != nil {
		return false
	}
	return slices.ContainsFunc(peers, func(b struct {
		Peer       string `json:"peer"`
		Status     string `json:"status"`
		RemoteTx   int    `json:"remote-transmit-interval"`
		RemoteMult int    `json:"remote-detect-multiplier"`
	}) bool {
		return b.Peer == peer && b.Status == "up" && b.RemoteTx == txMillis && b.RemoteMult == mult
	})
}

// installCRDs creates manifest/crds in the apiserver and waits until they are served.
func installCRDs(t *testing.T, dyn dynamic.Interface) {
	t.Helper()
	crds := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	files, err := manifestCRDs()
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range files {
		if _, err := dyn.Resource(crds).Create(context.Background(), o, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create CRD %s: %v", o.GetName(), err)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, gvr := range []schema.GroupVersionResource{v1alpha1.IPPools, v1alpha1.BGPPeers, v1alpha1.BFDProfiles, v1alpha1.BGPAdvertisements} {
		for {
			if _, err := dyn.Resource(gvr).List(context.Background(), metav1.ListOptions{}); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%v not served within 30s", gvr)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

func manifestCRDs() ([]*unstructured.Unstructured, error) {
	var out []*unstructured.Unstructured
	for _, f := range []string{"crds/shardlb.io_bfdprofiles.yaml", "crds/shardlb.io_bgpadvertisements.yaml", "crds/shardlb.io_bgppeers.yaml", "crds/shardlb.io_ippools.yaml"} {
		objs, err := manifest.File(f)
		if err != nil {
			return nil, err
		}
		out = append(out, objs...)
	}
	return out, nil
}
