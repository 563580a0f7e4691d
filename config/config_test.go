package config

import (
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/shardlb/shardlb/api/v1alpha1"
	"github.com/shardlb/shardlb/ipam"
)

var defaults = Defaults{Master: Attrs{5000, 10}, Successor: Attrs{200, 15}, Backup: Attrs{100, 20}}

func meta(name string) metav1.ObjectMeta { return metav1.ObjectMeta{Name: name, Generation: 1} }

func peerObj(name, addr string, asn uint32) v1alpha1.BGPPeer {
	return v1alpha1.BGPPeer{ObjectMeta: meta(name), Spec: v1alpha1.BGPPeerSpec{PeerAddress: addr, PeerASN: asn}}
}

func poolObj(name string, addrs ...string) v1alpha1.IPPool {
	return v1alpha1.IPPool{ObjectMeta: meta(name), Spec: v1alpha1.IPPoolSpec{Addresses: addrs}}
}

func flagPools(t *testing.T, spec string) []ipam.PoolSpec {
	t.Helper()
	ps, err := ipam.ParsePools(spec)
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

func verdictOf(vs []Verdict, k Kind, name string) Verdict {
	for _, v := range vs {
		if v.Kind == k && v.Name == name {
			return v
		}
	}
	return Verdict{Kind: k, Name: name, Reason: "missing"}
}

func peerAddrs(d Desired) []string {
	var out []string
	for _, p := range d.Peers {
		out = append(out, p.Addr.String())
	}
	return out
}

func poolNames(d Desired) []string {
	var out []string
	for _, p := range d.Pools {
		out = append(out, p.Name)
	}
	return out
}

func TestPeers(t *testing.T) {
	flagPeer := Peer{Addr: netip.MustParseAddr("172.30.0.1"), ASN: 64512}
	rackA := Node{Name: "n1", Labels: map[string]string{"rack": "a"}}
	rackB := Node{Name: "n2", Labels: map[string]string{"rack": "b"}}
	sel := func(p v1alpha1.BGPPeer, rack string) v1alpha1.BGPPeer {
		p.Spec.NodeSelectors = []metav1.LabelSelector{{MatchLabels: map[string]string{"rack": rack}}}
		return p
	}
	for _, tc := range []struct {
		name       string
		objs       Objects
		node       Node
		wantPeers  []string
		wantRefuse map[string]string // BGPPeer name -> reason
	}{
		{name: "flags alone give the flag peers", node: rackA, wantPeers: []string{"172.30.0.1"}},
		{name: "an object adds a peer to the flag peers",
			objs: Objects{Peers: []v1alpha1.BGPPeer{peerObj("r2", "172.30.0.2", 64513)}}, node: rackA,
			wantPeers: []string{"172.30.0.1", "172.30.0.2"}},
		{name: "a node selector that matches this node keeps the peer",
			objs: Objects{Peers: []v1alpha1.BGPPeer{sel(peerObj("ra", "172.30.0.2", 64513), "a")}}, node: rackA,
			wantPeers: []string{"172.30.0.1", "172.30.0.2"}},
		{name: "a node selector that matches another rack leaves the peer out, still accepted",
			objs: Objects{Peers: []v1alpha1.BGPPeer{sel(peerObj("ra", "172.30.0.2", 64513), "a")}}, node: rackB,
			wantPeers: []string{"172.30.0.1"}},
		{name: "an object for the flag's address is refused, the flag wins",
			objs: Objects{Peers: []v1alpha1.BGPPeer{peerObj("dup", "172.30.0.1", 65000)}}, node: rackA,
			wantPeers: []string{"172.30.0.1"}, wantRefuse: map[string]string{"dup": v1alpha1.ReasonConflict}},
		{name: "two objects for one address: the first by name wins",
			objs: Objects{Peers: []v1alpha1.BGPPeer{peerObj("b", "172.30.0.2", 65001), peerObj("a", "172.30.0.2", 65000)}}, node: rackA,
			wantPeers: []string{"172.30.0.1", "172.30.0.2"}, wantRefuse: map[string]string{"b": v1alpha1.ReasonConflict}},
		{name: "a peer naming a missing BFD profile is refused until it exists",
			objs: Objects{Peers: []v1alpha1.BGPPeer{func() v1alpha1.BGPPeer {
				p := peerObj("r2", "172.30.0.2", 64513)
				p.Spec.BFDProfile = "fast"
				return p
			}()}}, node: rackA,
			wantPeers: []string{"172.30.0.1"}, wantRefuse: map[string]string{"r2": v1alpha1.ReasonUnknownProfile}},
		{name: "a keepalive not below the hold time is refused",
			objs: Objects{Peers: []v1alpha1.BGPPeer{func() v1alpha1.BGPPeer {
				p := peerObj("r2", "172.30.0.2", 64513)
				p.Spec.HoldTime = &metav1.Duration{Duration: 3 * time.Second}
				p.Spec.KeepaliveTime = &metav1.Duration{Duration: 3 * time.Second}
				return p
			}()}}, node: rackA,
			wantPeers: []string{"172.30.0.1"}, wantRefuse: map[string]string{"r2": v1alpha1.ReasonInvalid}},
		{name: "AS_TRANS is refused", objs: Objects{Peers: []v1alpha1.BGPPeer{peerObj("r2", "172.30.0.2", 23456)}}, node: rackA,
			wantPeers: []string{"172.30.0.1"}, wantRefuse: map[string]string{"r2": v1alpha1.ReasonInvalid}},
		{name: "a source address of the other family is refused",
			objs: Objects{Peers: []v1alpha1.BGPPeer{func() v1alpha1.BGPPeer {
				p := peerObj("r2", "172.30.0.2", 64513)
				p.Spec.SourceAddress = "2001:db8::1"
				return p
			}()}}, node: rackA,
			wantPeers: []string{"172.30.0.1"}, wantRefuse: map[string]string{"r2": v1alpha1.ReasonInvalid}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, vs := Build(Flags{Peers: []Peer{flagPeer}, Defaults: defaults}, tc.objs, tc.node)
			if got := peerAddrs(d); !slices.Equal(got, tc.wantPeers) {
				t.Errorf("peers = %v, want %v", got, tc.wantPeers)
			}
			for _, o := range tc.objs.Peers {
				v := verdictOf(vs, KindBGPPeer, o.Name)
				want, refused := tc.wantRefuse[o.Name]
				if v.Accepted == refused || refused && v.Reason != want {
					t.Errorf("verdict of %s = %+v, want refused=%v reason %q", o.Name, v, refused, want)
				}
				if !v.Accepted && v.Message == "" {
					t.Errorf("refusal of %s has no message", o.Name)
				}
			}
		})
	}
}

func TestBFDProfiles(t *testing.T) {
	peer := peerObj("r2", "172.30.0.2", 64513)
	peer.Spec.BFDProfile = "fast"
	fast := v1alpha1.BFDProfile{ObjectMeta: meta("fast"), Spec: v1alpha1.BFDProfileSpec{TransmitInterval: ptr.To[uint32](100), ReceiveInterval: ptr.To[uint32](150)}}
	t.Run("a profile gives its timers to the peers naming it, defaults filled in", func(t *testing.T) {
		d, vs := Build(Flags{Defaults: defaults}, Objects{Peers: []v1alpha1.BGPPeer{peer}, BFDProfiles: []v1alpha1.BFDProfile{fast}}, Node{})
		if len(d.Peers) != 1 || d.Peers[0].BFD == nil {
			t.Fatalf("peers = %+v, want r2 with BFD; verdicts %+v", d.Peers, vs)
		}
		want := BFD{Name: "fast", Receive: 150 * time.Millisecond, Transmit: 100 * time.Millisecond, DetectMultiplier: 3}
		if *d.Peers[0].BFD != want {
			t.Errorf("BFD = %+v, want %+v", *d.Peers[0].BFD, want)
		}
	})
	t.Run("echo mode refuses the profile and the peers naming it", func(t *testing.T) {
		echo := fast.DeepCopy()
		echo.Spec.EchoMode = ptr.To(true)
		d, vs := Build(Flags{Defaults: defaults}, Objects{Peers: []v1alpha1.BGPPeer{peer}, BFDProfiles: []v1alpha1.BFDProfile{*echo}}, Node{})
		if len(d.Peers) != 0 {
			t.Errorf("peers = %+v, want none", d.Peers)
		}
		if v := verdictOf(vs, KindBFDProfile, "fast"); v.Accepted || !strings.Contains(v.Message, "echoMode") {
			t.Errorf("profile verdict = %+v, want refused for echoMode", v)
		}
		if v := verdictOf(vs, KindBGPPeer, "r2"); v.Accepted || v.Reason != v1alpha1.ReasonUnknownProfile {
			t.Errorf("peer verdict = %+v, want UnknownBFDProfile", v)
		}
	})
	t.Run("a multiplier of 1 is refused", func(t *testing.T) {
		one := fast.DeepCopy()
		one.Spec.DetectMultiplier = ptr.To[uint32](1)
		_, vs := Build(Flags{}, Objects{BFDProfiles: []v1alpha1.BFDProfile{*one}}, Node{})
		if v := verdictOf(vs, KindBFDProfile, "fast"); v.Accepted {
			t.Errorf("verdict = %+v, want refused", v)
		}
	})
}

func TestPools(t *testing.T) {
	flags := Flags{Pools: flagPools(t, "defaultPool=192.168.80.250/24"), Defaults: defaults}
	for _, tc := range []struct {
		name       string
		pools      []v1alpha1.IPPool
		want       []string
		wantRefuse map[string]string
	}{
		{name: "flags alone give the flag pools", want: []string{"defaultPool"}},
		{name: "an object adds a pool after the flag pools",
			pools: []v1alpha1.IPPool{poolObj("extra", "10.10.0.0/24", "2001:db8::/120")}, want: []string{"defaultPool", "extra"}},
		{name: "an object with a flag pool's name is refused",
			pools: []v1alpha1.IPPool{poolObj("defaultPool", "10.10.0.0/24")}, want: []string{"defaultPool"},
			wantRefuse: map[string]string{"defaultPool": v1alpha1.ReasonConflict}},
		{name: "an object overlapping a flag pool is refused",
			pools: []v1alpha1.IPPool{poolObj("x", "192.168.80.254-192.168.80.254")}, want: []string{"defaultPool"},
			wantRefuse: map[string]string{"x": v1alpha1.ReasonConflict}},
		{name: "of two overlapping objects the first by name stays",
			pools: []v1alpha1.IPPool{poolObj("b", "10.10.0.0/24"), poolObj("a", "10.10.0.100-10.10.1.10")}, want: []string{"defaultPool", "a"},
			wantRefuse: map[string]string{"b": v1alpha1.ReasonConflict}},
		{name: "an unreadable address is refused",
			pools: []v1alpha1.IPPool{poolObj("x", "10.10.0.300/24")}, want: []string{"defaultPool"},
			wantRefuse: map[string]string{"x": v1alpha1.ReasonInvalid}},
		{name: "a reversed range is refused",
			pools: []v1alpha1.IPPool{poolObj("x", "10.10.0.9-10.10.0.1")}, want: []string{"defaultPool"},
			wantRefuse: map[string]string{"x": v1alpha1.ReasonInvalid}},
		{name: "ranges of one pool that overlap are refused",
			pools: []v1alpha1.IPPool{poolObj("x", "10.10.0.0/24", "10.10.0.5-10.10.0.6")}, want: []string{"defaultPool"},
			wantRefuse: map[string]string{"x": v1alpha1.ReasonInvalid}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, vs := Build(flags, Objects{Pools: tc.pools}, Node{})
			if got := poolNames(d); !slices.Equal(got, tc.want) {
				t.Errorf("pools = %v, want %v", got, tc.want)
			}
			for _, o := range tc.pools {
				v := verdictOf(vs, KindIPPool, o.Name)
				want, refused := tc.wantRefuse[o.Name]
				if v.Accepted == refused || refused && v.Reason != want {
					t.Errorf("verdict of %s = %+v, want refused=%v reason %q", o.Name, v, refused, want)
				}
			}
		})
	}
	t.Run("autoAssign defaults to true and false is kept", func(t *testing.T) {
		off := poolObj("off", "10.10.1.0/24")
		off.Spec.AutoAssign = ptr.To(false)
		d, _ := Build(flags, Objects{Pools: []v1alpha1.IPPool{poolObj("on", "10.10.0.0/24"), off}}, Node{})
		got := map[string]bool{}
		for _, p := range d.Pools {
			got[p.Name] = p.AutoAssign
		}
		if !got["on"] || got["off"] {
			t.Errorf("autoAssign = %v, want on:true off:false", got)
		}
	})
}

func advObj(name string, pools, peers, communities []string, lp, med *v1alpha1.RoleValues) v1alpha1.BGPAdvertisement {
	return v1alpha1.BGPAdvertisement{ObjectMeta: meta(name), Spec: v1alpha1.BGPAdvertisementSpec{
		IPPools: pools, Peers: peers, Communities: communities, LocalPref: lp, MED: med}}
}

func TestAdvertisements(t *testing.T) {
	flags := Flags{Pools: flagPools(t, "defaultPool=192.168.80.250/24"), Defaults: defaults}
	objs := Objects{
		Pools: []v1alpha1.IPPool{poolObj("gold", "10.10.0.0/24")},
		Peers: []v1alpha1.BGPPeer{peerObj("r1", "172.30.0.1", 64512), peerObj("r2", "172.30.0.2", 64512)},
	}
	r1, r2 := netip.MustParseAddr("172.30.0.1"), netip.MustParseAddr("172.30.0.2")
	build := func(advs ...v1alpha1.BGPAdvertisement) (Desired, []Verdict) {
		o := objs
		o.Advertisements = advs
		return Build(flags, o, Node{})
	}
	t.Run("a community for one pool reaches that pool's VIPs only", func(t *testing.T) {
		d, _ := build(advObj("a", []string{"gold"}, nil, []string{"64512:100"}, nil, nil))
		if got := d.Attributes(defaults, "gold", r1).Communities; !slices.Equal(got, []string{"64512:100"}) {
			t.Errorf("gold toward r1: communities %v", got)
		}
		if got := d.Attributes(defaults, "defaultPool", r1).Communities; got != nil {
			t.Errorf("defaultPool toward r1: communities %v, want none", got)
		}
	})
	t.Run("overlapping advertisements union communities and take the highest LOCAL_PREF and lowest MED", func(t *testing.T) {
		d, vs := build(
			advObj("a", []string{"gold"}, nil, []string{"64512:100", "NO-EXPORT"}, &v1alpha1.RoleValues{Master: ptr.To[uint32](6000)}, &v1alpha1.RoleValues{Backup: ptr.To[uint32](30)}),
			advObj("b", []string{"gold"}, []string{"r2"}, []string{"64512:200", "no-export"}, &v1alpha1.RoleValues{Master: ptr.To[uint32](5500), Backup: ptr.To[uint32](150)}, &v1alpha1.RoleValues{Master: ptr.To[uint32](5)}),
		)
		for _, v := range vs {
			if !v.Accepted {
				t.Fatalf("refused: %+v", v)
			}
		}
		got := d.Attributes(defaults, "gold", r2)
		// b leaves the backup's MED unset, which is the speaker's 20: lower than a's 30.
		want := RoleAttrs{Master: Attrs{6000, 5}, Successor: Attrs{200, 15}, Backup: Attrs{150, 20},
			Communities: []string{"64512:100", "64512:200", "no-export"}}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("gold toward r2 = %+v, want %+v", got, want)
		}
		// b names r2 only: r1 gets a's alone.
		got = d.Attributes(defaults, "gold", r1)
		want = RoleAttrs{Master: Attrs{6000, 10}, Successor: Attrs{200, 15}, Backup: Attrs{100, 30},
			Communities: []string{"64512:100", "no-export"}}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("gold toward r1 = %+v, want %+v", got, want)
		}
	})
	for _, tc := range []struct {
		name   string
		adv    v1alpha1.BGPAdvertisement
		reason string
	}{
		{"a backup LOCAL_PREF above the successor's is refused",
			advObj("x", nil, nil, nil, &v1alpha1.RoleValues{Backup: ptr.To[uint32](300)}, nil), v1alpha1.ReasonInvalid},
		{"a master MED above the backup's is refused",
			advObj("x", nil, nil, nil, nil, &v1alpha1.RoleValues{Master: ptr.To[uint32](50)}), v1alpha1.ReasonInvalid},
		{"an unknown pool is refused until it exists",
			advObj("x", []string{"silver"}, nil, nil, nil, nil), ReasonUnknownReference},
		{"an unknown peer is refused until it exists",
			advObj("x", nil, []string{"r9"}, nil, nil, nil), ReasonUnknownReference},
		{"a community with a 17-bit half is refused",
			advObj("x", nil, nil, []string{"65536:1"}, nil, nil), v1alpha1.ReasonInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, vs := build(tc.adv)
			if v := verdictOf(vs, KindBGPAdvertisement, "x"); v.Accepted || v.Reason != tc.reason {
				t.Errorf("verdict = %+v, want reason %s", v, tc.reason)
			}
			if len(d.Advertisements) != 0 {
				t.Errorf("a refused advertisement changed attributes: %+v", d.Advertisements)
			}
		})
	}
}

// TestCombineProperties builds random advertisements and checks, against a naive
// model, that their combination does not depend on their order, that every role
// keeps master above successor above backup, and that the values are the extremes
// and unions of the advertisements that apply.
func TestCombineProperties(t *testing.T) {
	rng := rand.New(rand.NewPCG(16, 1))
	pools := []string{"p0", "p1", "p2"}
	flags := Flags{Defaults: defaults}
	var objs Objects
	for i, p := range pools {
		objs.Pools = append(objs.Pools, poolObj(p, netip.AddrFrom4([4]byte{10, 20, byte(i), 0}).String()+"/24"))
	}
	peers := []string{"r0", "r1"}
	for i, p := range peers {
		objs.Peers = append(objs.Peers, peerObj(p, netip.AddrFrom4([4]byte{172, 30, 0, byte(i + 1)}).String(), 64512))
	}
	pick := func(xs []string) []string {
		var out []string
		for _, x := range xs {
			if rng.IntN(2) == 0 {
				out = append(out, x)
			}
		}
		return out
	}
	for round := range 500 {
		o := objs
		o.Advertisements = nil
		for i := range 1 + rng.IntN(5) {
			lp := &v1alpha1.RoleValues{}
			m := 1000 + rng.Uint32N(9000)
			lp.Master = ptr.To(m)
			lp.Successor = ptr.To(101 + rng.Uint32N(m-101))
			lp.Backup = ptr.To(1 + rng.Uint32N(*lp.Successor-1))
			med := &v1alpha1.RoleValues{Master: ptr.To(rng.Uint32N(10))}
			med.Successor = ptr.To(*med.Master + rng.Uint32N(10))
			med.Backup = ptr.To(*med.Successor + rng.Uint32N(10))
			var cs []string
			for range rng.IntN(3) {
				cs = append(cs, "65000:"+string(rune('0'+rng.IntN(5))))
			}
			o.Advertisements = append(o.Advertisements, advObj(string(rune('a'+i)), pick(pools), pick(peers), cs, lp, med))
		}
		d1, v1 := Build(flags, o, Node{})
		shuffled := o
		shuffled.Advertisements = slices.Clone(o.Advertisements)
		rng.Shuffle(len(shuffled.Advertisements), func(i, j int) {
			shuffled.Advertisements[i], shuffled.Advertisements[j] = shuffled.Advertisements[j], shuffled.Advertisements[i]
		})
		d2, v2 := Build(flags, shuffled, Node{})
		if !reflect.DeepEqual(d1, d2) || !reflect.DeepEqual(v1, v2) {
			t.Fatalf("round %d: the result depends on the objects' order", round)
		}
		for _, pool := range pools {
			for pi, peer := range peers {
				addr := netip.AddrFrom4([4]byte{172, 30, 0, byte(pi + 1)})
				// The naive model: scan every advertisement that applies.
				var want RoleAttrs
				n := 0
				for _, a := range o.Advertisements {
					if len(a.Spec.IPPools) > 0 && !slices.Contains(a.Spec.IPPools, pool) ||
						len(a.Spec.Peers) > 0 && !slices.Contains(a.Spec.Peers, peer) {
						continue
					}
					mine := RoleAttrs{
						Master:      Attrs{*a.Spec.LocalPref.Master, *a.Spec.MED.Master},
						Successor:   Attrs{*a.Spec.LocalPref.Successor, *a.Spec.MED.Successor},
						Backup:      Attrs{*a.Spec.LocalPref.Backup, *a.Spec.MED.Backup},
						Communities: a.Spec.Communities,
					}
					if n == 0 {
						want = mine
						want.Communities = union(nil, mine.Communities)
					} else {
						want.Master.LocalPref = max(want.Master.LocalPref, mine.Master.LocalPref)
						want.Successor.LocalPref = max(want.Successor.LocalPref, mine.Successor.LocalPref)
						want.Backup.LocalPref = max(want.Backup.LocalPref, mine.Backup.LocalPref)
						want.Master.MED = min(want.Master.MED, mine.Master.MED)
						want.Successor.MED = min(want.Successor.MED, mine.Successor.MED)
						want.Backup.MED = min(want.Backup.MED, mine.Backup.MED)
						want.Communities = union(want.Communities, mine.Communities)
					}
					n++
				}
				got := d1.Attributes(defaults, pool, addr)
				if n == 0 {
					want = RoleAttrs{Master: defaults.Master, Successor: defaults.Successor, Backup: defaults.Backup}
				}
				if len(want.Communities) == 0 {
					want.Communities = got.Communities[:0:0]
					if got.Communities == nil {
						want.Communities = nil
					}
				}
				if !reflect.DeepEqual(got, want) {
					t.Fatalf("round %d, %s toward %s: got %+v, want %+v", round, pool, peer, got, want)
				}
				if !(got.Master.LocalPref > got.Successor.LocalPref && got.Successor.LocalPref > got.Backup.LocalPref) ||
					!(got.Master.MED <= got.Successor.MED && got.Successor.MED <= got.Backup.MED) {
					t.Fatalf("round %d, %s toward %s: roles out of order: %+v", round, pool, peer, got)
				}
			}
		}
	}
}

// TestEveryNodeAgrees checks that verdicts and pools do not depend on the node, only
// the peers do: every pod reports the same status.
func TestEveryNodeAgrees(t *testing.T) {
	objs := Objects{
		Pools: []v1alpha1.IPPool{poolObj("a", "10.10.0.0/24"), poolObj("b", "10.10.0.128/25")},
		Peers: []v1alpha1.BGPPeer{peerObj("r1", "172.30.0.1", 64512), func() v1alpha1.BGPPeer {
			p := peerObj("r2", "172.30.0.2", 64512)
			p.Spec.NodeSelectors = []metav1.LabelSelector{{MatchLabels: map[string]string{"rack": "b"}}}
			return p
		}()},
	}
	d1, v1 := Build(Flags{Defaults: defaults}, objs, Node{Name: "n1", Labels: map[string]string{"rack": "a"}})
	d2, v2 := Build(Flags{Defaults: defaults}, objs, Node{Name: "n2", Labels: map[string]string{"rack": "b"}})
	if !reflect.DeepEqual(v1, v2) || !reflect.DeepEqual(d1.Pools, d2.Pools) {
		t.Fatalf("nodes disagree:\n%+v\n%+v", v1, v2)
	}
	if len(d1.Peers) != 1 || len(d2.Peers) != 2 {
		t.Fatalf("peers: rack a %v, rack b %v; want r1, and r1+r2", peerAddrs(d1), peerAddrs(d2))
	}
}

func TestPasswordSecrets(t *testing.T) {
	withSecret := func(ns string) v1alpha1.BGPPeer {
		p := peerObj("r2", "172.30.0.2", 64513)
		p.Spec.PasswordSecret = &v1alpha1.SecretReference{Name: "md5", Namespace: ns}
		return p
	}
	for _, tc := range []struct {
		name   string
		peer   v1alpha1.BGPPeer
		objs   Objects
		want   string // password, or "" when refused
		reason string
	}{
		{"the Secret's password reaches the peer", withSecret(""), Objects{Namespace: "kube-system", Passwords: map[string]string{"md5": "s3cret"}}, "s3cret", ""},
		{"a missing Secret refuses the peer", withSecret(""), Objects{Namespace: "kube-system"}, "", v1alpha1.ReasonSecretNotFound},
		{"a Secret in another namespace is refused", withSecret("default"), Objects{Namespace: "kube-system", Passwords: map[string]string{"md5": "s3cret"}}, "", v1alpha1.ReasonInvalid},
		{"a password with a space is refused", withSecret(""), Objects{Namespace: "kube-system", Passwords: map[string]string{"md5": "a b"}}, "", v1alpha1.ReasonInvalid},
		{"without RBAC for Secrets the peer is refused saying so", withSecret(""), Objects{Namespace: "kube-system", NoSecretAccess: true}, "", v1alpha1.ReasonSecretNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.objs.Peers = []v1alpha1.BGPPeer{tc.peer}
			d, vs := Build(Flags{}, tc.objs, Node{})
			v := verdictOf(vs, KindBGPPeer, "r2")
			if tc.reason == "" {
				if !v.Accepted || len(d.Peers) != 1 || d.Peers[0].Password != tc.want {
					t.Fatalf("verdict %+v, peers %+v; want accepted with password %q", v, d.Peers, tc.want)
				}
				return
			}
			if v.Accepted || v.Reason != tc.reason || len(d.Peers) != 0 {
				t.Fatalf("verdict %+v, peers %+v; want refused with %s", v, d.Peers, tc.reason)
			}
		})
	}
}

func TestPoolCommunities(t *testing.T) {
	flags := Flags{Pools: flagPools(t, "defaultPool=192.168.80.250/24"), Defaults: defaults}
	objs := Objects{
		Pools: []v1alpha1.IPPool{poolObj("gold", "10.10.0.0/24")},
		Peers: []v1alpha1.BGPPeer{peerObj("r1", "172.30.0.1", 64512)},
		Advertisements: []v1alpha1.BGPAdvertisement{
			advObj("a", []string{"defaultPool"}, nil, []string{"64512:100"}, nil, nil),
			advObj("b", nil, nil, []string{"64512:200"}, nil, nil),
			// Valid, but not announced: per-peer and LOCAL_PREF.
			advObj("c", []string{"defaultPool"}, []string{"r1"}, []string{"64512:300"}, nil, nil),
			advObj("d", []string{"defaultPool"}, nil, []string{"64512:400"}, &v1alpha1.RoleValues{Master: ptr.To[uint32](6000)}, nil),
		},
	}
	d, vs := Build(flags, objs, Node{})
	for _, v := range vs {
		if !v.Accepted {
			t.Fatalf("refused: %+v", v)
		}
	}
	want := map[string]Communities{
		"defaultPool": {Communities: []string{"64512:100", "64512:200"}},
		"gold":        {Communities: []string{"64512:200"}},
	}
	if !reflect.DeepEqual(d.PoolCommunities, want) {
		t.Fatalf("PoolCommunities = %+v, want %+v", d.PoolCommunities, want)
	}
	for _, tc := range []struct {
		adv  v1alpha1.BGPAdvertisement
		want string
	}{
		{objs.Advertisements[0], ""},
		{objs.Advertisements[2], "peers"},
		{objs.Advertisements[3], "localPref"},
	} {
		got := Unapplied(tc.adv.Spec)
		if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
			t.Errorf("Unapplied(%s) = %q, want mention of %q", tc.adv.Name, got, tc.want)
		}
	}
}

// TestAdvertisementWithoutRoleValuesKeepsTheFlags: an advertisement that sets no
// LOCAL_PREF or MED is not judged by the flags' values (checked where they are read).
func TestAdvertisementWithoutRoleValuesKeepsTheFlags(t *testing.T) {
	objs := Objects{Advertisements: []v1alpha1.BGPAdvertisement{advObj("x", nil, nil, []string{"64512:1"}, nil, nil)}}
	_, vs := Build(Flags{Pools: flagPools(t, "p=10.0.0.1-10.0.0.2")}, objs, Node{})
	if v := verdictOf(vs, KindBGPAdvertisement, "x"); !v.Accepted {
		t.Fatalf("verdict = %+v, want accepted", v)
	}
}

// TestPoolAdmits: serviceAllocation as MetalLB reads it: the namespace (listed or
// selected) and the service's labels must both qualify, each when given.
func TestPoolAdmits(t *testing.T) {
	sel := func(k, v string) []metav1.LabelSelector {
		return []metav1.LabelSelector{{MatchLabels: map[string]string{k: v}}}
	}
	blue := map[string]string{"team": "blue"}
	gold := map[string]string{"tier": "gold"}
	for _, tc := range []struct {
		desc     string
		pool     Pool
		ns       string
		nsLabels map[string]string
		labels   map[string]string
		want     bool
	}{
		{"an unrestricted pool admits every service", Pool{}, "a", nil, nil, true},
		{"a listed namespace is admitted", Pool{Namespaces: []string{"a"}}, "a", nil, nil, true},
		{"an unlisted namespace is not", Pool{Namespaces: []string{"a"}}, "b", nil, nil, false},
		{"a namespace a selector matches is admitted", Pool{NamespaceSelectors: sel("team", "blue")}, "b", blue, nil, true},
		{"a listed or selected namespace: either will do", Pool{Namespaces: []string{"a"}, NamespaceSelectors: sel("team", "blue")}, "a", nil, nil, true},
		{"a namespace neither listed nor selected is not", Pool{Namespaces: []string{"a"}, NamespaceSelectors: sel("team", "blue")}, "b", nil, nil, false},
		{"a service a selector matches is admitted", Pool{ServiceSelectors: sel("tier", "gold")}, "a", nil, gold, true},
		{"a service no selector matches is not", Pool{ServiceSelectors: sel("tier", "gold")}, "a", nil, nil, false},
		{"both must hold: the namespace without the labels is not enough", Pool{Namespaces: []string{"a"}, ServiceSelectors: sel("tier", "gold")}, "a", nil, nil, false},
		{"both must hold: the labels without the namespace are not enough", Pool{Namespaces: []string{"a"}, ServiceSelectors: sel("tier", "gold")}, "b", nil, gold, false},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			if got := tc.pool.Admits(tc.ns, tc.nsLabels, tc.labels); got != tc.want {
				t.Errorf("Admits = %v, want %v", got, tc.want)
			}
		})
	}
}
