package main

import (
	"net/netip"
	"os"
	"reflect"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/shardlb/shardlb/api/v1alpha1"
	"github.com/shardlb/shardlb/bgp"
	slconfig "github.com/shardlb/shardlb/config"
)

// TestFlagPeersRoundTrip: the guide's flags alone, through the configuration objects'
// path, give the speaker exactly the peers it started with, so applying them at start
// restarts no session.
func TestFlagPeersRoundTrip(t *testing.T) {
	cfg, err := parseConfig([]string{
		"--cidrPools=defaultPool=192.168.80.250/24", "--setRoles=0.0.0.0", "--setUniqueIP",
		"--numZoneInstances=3", "--setBGP=64512", "--extBGPPeers=10.0.0.1:64512,[2001:db8::1]:65001",
		"--nodeName=master1", "--nodeIP=10.0.0.11",
	}, noEnv, os.Stdout)
	if err != nil {
		t.Fatal(err)
	}
	d, verdicts := slconfig.Build(objectFlags(cfg), slconfig.Objects{}, slconfig.Node{Name: "master1"})
	if len(verdicts) != 0 {
		t.Fatalf("verdicts without objects: %+v", verdicts)
	}
	if got := speakerPeers(cfg.BGP, d.Peers); !reflect.DeepEqual(got, cfg.BGP.Peers) {
		t.Fatalf("peers through the objects' path = %+v, want the flags' %+v", got, cfg.BGP.Peers)
	}
}

// TestObjectPeerToSpeaker: every field of a BGPPeer and its BFDProfile reaches the
// speaker's peer.
func TestObjectPeerToSpeaker(t *testing.T) {
	b := bgp.DefaultConfig()
	rx, tx, m := uint32(150), uint32(100), uint32(4)
	objs := slconfig.Objects{
		Namespace: "kube-system",
		Passwords: map[string]string{"r2-md5": "s3cret"},
		BFDProfiles: []v1alpha1.BFDProfile{{ObjectMeta: metav1.ObjectMeta{Name: "fast"},
			Spec: v1alpha1.BFDProfileSpec{ReceiveInterval: &rx, TransmitInterval: &tx, DetectMultiplier: &m}}},
		Peers: []v1alpha1.BGPPeer{{ObjectMeta: metav1.ObjectMeta{Name: "r2"}, Spec: v1alpha1.BGPPeerSpec{
			PeerAddress: "172.30.0.2", PeerASN: 65010, PeerPort: 1179, SourceAddress: "172.30.0.11",
			HoldTime: &metav1.Duration{Duration: 6 * time.Second}, KeepaliveTime: &metav1.Duration{Duration: 2 * time.Second},
			PasswordSecret: &v1alpha1.SecretReference{Name: "r2-md5"}, BFDProfile: "fast", EBGPMultiHop: true,
		}}},
	}
	d, verdicts := slconfig.Build(slconfig.Flags{}, objs, slconfig.Node{})
	for _, v := range verdicts {
		if !v.Accepted {
			t.Fatalf("refused: %+v", v)
		}
	}
	got := speakerPeers(b, d.Peers)
	want := []bgp.Peer{{
		Addr: netip.MustParseAddr("172.30.0.2"), ASN: 65010, Port: 1179, Password: "s3cret",
		MultiHopTTL: b.EBGPMultiHopTTL, LocalAddr: netip.MustParseAddr("172.30.0.11"),
		HoldTime: 6 * time.Second, KeepaliveInterval: 2 * time.Second,
		BFD: &bgp.BFDConfig{Enabled: true, Interval: 100 * time.Millisecond, Receive: 150 * time.Millisecond, Multiplier: 4},
	}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("speaker peers = %+v (BFD %+v), want %+v (BFD %+v)", got, got[0].BFD, want, want[0].BFD)
	}
}
