package bgp

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/shardlb/shardlb/shard"
)

func setPeers(t *testing.T, s *Speaker, peers ...Peer) {
	t.Helper()
	if err := s.SetPeers(context.Background(), peers); err != nil {
		t.Fatalf("SetPeers: %v", err)
	}
}

// TestSetPeers changes a running speaker's peers: added peers come up and get the
// routes (with the eBGP prepends), removed ones are closed, a changed one restarts,
// and the sessions not concerned never flap.
func TestSetPeers(t *testing.T) {
	const vip = "10.96.0.7/32"
	const speaker = "127.0.0.2"
	ibgp := newTestRouter(t, "127.0.0.1", 65000, map[string]uint32{speaker: 65000})
	ebgp := newTestRouter(t, "127.0.0.4", 65010, map[string]uint32{speaker: 65000})
	s := startSpeaker(t, testConfig(speaker, 65000, ibgp))
	waitEstablished(t, s, ibgp.addr)
	set(t, s, adv(vip, shard.RoleBackup))
	eventually(t, 5*time.Second, "the VIP at the iBGP router", func() bool { return len(ibgp.rib(vip)) == 1 })
	since := status(t, s, ibgp.addr).Since

	t.Run("an added eBGP peer comes up and gets the VIP with the backup prepends", func(t *testing.T) {
		setPeers(t, s, ibgp.peer(), ebgp.peer())
		waitEstablished(t, s, ibgp.addr, ebgp.addr)
		eventually(t, 5*time.Second, "the VIP at the eBGP router", func() bool { return len(ebgp.rib(vip)) == 1 })
		p := ebgp.rib(vip)[0]
		if want := []uint32{65000, 65000, 65000, 65000}; !slices.Equal(p.ASPath, want) {
			t.Errorf("AS path at the added eBGP peer = %v, want %v", p.ASPath, want)
		}
		if p := ibgp.rib(vip)[0]; len(p.ASPath) != 0 {
			t.Errorf("AS path at the iBGP peer = %v, want none (no prepend over iBGP)", p.ASPath)
		}
	})
	t.Run("setting the same peers again touches no session", func(t *testing.T) {
		before := status(t, s, ebgp.addr).Since
		setPeers(t, s, ebgp.peer(), ibgp.peer())
		time.Sleep(300 * time.Millisecond)
		if got := status(t, s, ebgp.addr); !got.Established || !got.Since.Equal(before) {
			t.Errorf("eBGP session after an identical SetPeers: %+v, want established since %v", got, before)
		}
	})
	t.Run("a changed hold time restarts that session only", func(t *testing.T) {
		p := ebgp.peer()
		p.HoldTime, p.KeepaliveInterval = 6*time.Second, 2*time.Second
		before := status(t, s, ebgp.addr).Since
		setPeers(t, s, ibgp.peer(), p)
		eventually(t, 20*time.Second, "the eBGP session back with the new hold time", func() bool {
			st := status(t, s, ebgp.addr)
			return st.Established && st.Since.After(before)
		})
	})
	t.Run("a removed peer is closed and withdrawn from, the others stay", func(t *testing.T) {
		setPeers(t, s, ibgp.peer())
		eventually(t, 10*time.Second, "the VIP gone from the removed peer", func() bool { return len(ebgp.rib(vip)) == 0 })
		for _, p := range s.Peers() {
			if p.Addr == ebgp.addr {
				t.Fatalf("removed peer still listed: %+v", p)
			}
		}
		if got := status(t, s, ibgp.addr); !got.Established || !got.Since.Equal(since) {
			t.Errorf("iBGP session = %+v, want established since %v, never restarted", got, since)
		}
		for _, u := range ibgp.seen(vip) {
			if u.Withdraw {
				t.Fatalf("the iBGP router saw a withdrawal while only other peers changed")
			}
		}
	})
	t.Run("an invalid list is refused whole and changes nothing", func(t *testing.T) {
		bad := ebgp.peer()
		bad.HoldTime = time.Second
		err := s.SetPeers(context.Background(), []Peer{bad})
		if err == nil || !strings.Contains(err.Error(), "hold time") {
			t.Fatalf("SetPeers with a 1s hold time = %v, want a hold time error", err)
		}
		if got := status(t, s, ibgp.addr); !got.Established || !got.Since.Equal(since) {
			t.Errorf("iBGP session = %+v after a refused SetPeers, want untouched", got)
		}
	})
	t.Run("without peers the speaker announces to none and counts as announcing", func(t *testing.T) {
		setPeers(t, s)
		if len(s.Peers()) != 0 || !s.Announcing() {
			t.Fatalf("Peers() = %v, Announcing() = %v; want none, true", s.Peers(), s.Announcing())
		}
		eventually(t, 10*time.Second, "the VIP gone from the iBGP router", func() bool { return len(ibgp.rib(vip)) == 0 })
	})
}

// TestSetPoolCommunities gives one pool's VIPs communities and takes them away: only
// that pool's VIPs change, by implicit replace, never withdrawn.
func TestSetPoolCommunities(t *testing.T) {
	const gold, plain = "10.96.1.1/32", "10.96.2.1/32"
	r := newTestRouter(t, "127.0.0.1", 65000, map[string]uint32{"127.0.0.2": 65000})
	cfg := testConfig("127.0.0.2", 65000, r)
	cfg.Communities = []string{"65000:1"}
	s := startSpeaker(t, cfg)
	waitEstablished(t, s, r.addr)
	set(t, s, adv(gold, shard.RoleMaster), adv(plain, shard.RoleBackup))
	eventually(t, 5*time.Second, "both VIPs at the router", func() bool { return len(r.rib(gold)) == 1 && len(r.rib(plain)) == 1 })
	pool := netip.MustParsePrefix("10.96.1.0/24")
	communities := func(prefix string) ([]string, []string) {
		ps := r.rib(prefix)
		if len(ps) != 1 {
			return nil, nil
		}
		return ps[0].Communities, ps[0].LargeCommunities
	}

	t.Run("a pool's communities reach its VIPs only, with the speaker's own", func(t *testing.T) {
		err := s.SetPoolCommunities(context.Background(), []PoolCommunities{{Prefixes: []netip.Prefix{pool}, Communities: []string{"64512:100", "no-export"}, LargeCommunities: []string{"64512:1:2"}}})
		if err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, "gold's communities", func() bool {
			c, l := communities(gold)
			return slices.Equal(c, []string{"64512:100", "65000:1", "65535:65281"}) && slices.Equal(l, []string{"64512:1:2"})
		})
		if c, l := communities(plain); !slices.Equal(c, []string{"65000:1"}) || l != nil {
			t.Errorf("the other pool's VIP got %v %v, want only the speaker's 65000:1", c, l)
		}
		if p := r.rib(gold)[0]; p.LocalPref != 5000 {
			t.Errorf("gold's LOCAL_PREF = %d, want the master's 5000 kept", p.LocalPref)
		}
	})
	t.Run("a role change keeps the pool's communities", func(t *testing.T) {
		set(t, s, adv(gold, shard.RoleBackup), adv(plain, shard.RoleBackup))
		eventually(t, 5*time.Second, "gold as backup", func() bool {
			ps := r.rib(gold)
			return len(ps) == 1 && ps[0].LocalPref == 100 && slices.Contains(ps[0].Communities, "64512:100")
		})
	})
	t.Run("removing the communities re-announces without them, never withdrawing", func(t *testing.T) {
		if err := s.SetPoolCommunities(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, "gold back to the speaker's community alone", func() bool {
			c, l := communities(gold)
			return slices.Equal(c, []string{"65000:1"}) && l == nil
		})
		for _, u := range append(r.seen(gold), r.seen(plain)...) {
			if u.Withdraw {
				t.Fatalf("the router saw a withdrawal of %v; want implicit replace only", u.Prefix)
			}
		}
	})
	t.Run("an invalid community is refused and changes nothing", func(t *testing.T) {
		before := r.updateCount()
		err := s.SetPoolCommunities(context.Background(), []PoolCommunities{{Prefixes: []netip.Prefix{pool}, Communities: []string{"65536:1"}}})
		if err == nil {
			t.Fatal("SetPoolCommunities accepted 65536:1")
		}
		time.Sleep(200 * time.Millisecond)
		if r.updateCount() != before {
			t.Error("a refused SetPoolCommunities sent UPDATEs")
		}
	})
}
