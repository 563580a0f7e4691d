package bgp

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/shardlb/shardlb/shard"
)

func adv(prefix string, role shard.Role) shard.Advertisement {
	return shard.Advertisement{Prefix: netip.MustParsePrefix(prefix), Role: role, Instance: "default"}
}

func set(t *testing.T, s *Speaker, advs ...shard.Advertisement) {
	t.Helper()
	if err := s.SetAdvertisements(context.Background(), advs); err != nil {
		t.Fatalf("SetAdvertisements: %v", err)
	}
}

// pathFrom returns the router's path for prefix learned from speaker addr.
func pathFrom(r *testRouter, prefix, addr string) (seenPath, bool) {
	for _, p := range r.rib(prefix) {
		if p.From == netip.MustParseAddr(addr) {
			return p, true
		}
	}
	return seenPath{}, false
}

func TestSpeakersOverIBGP(t *testing.T) {
	const vip = "10.96.0.1/32"
	r := newTestRouter(t, "127.0.0.1", 65000, map[string]uint32{"127.0.0.2": 65000, "127.0.0.3": 65000})
	a := startSpeaker(t, testConfig("127.0.0.2", 65000, r))
	b := startSpeaker(t, testConfig("127.0.0.3", 65000, r))
	waitEstablished(t, a, r.addr)
	waitEstablished(t, b, r.addr)

	set(t, a, adv(vip, shard.RoleMaster))
	set(t, b, adv(vip, shard.RoleBackup))
	eventually(t, 5*time.Second, "both paths at the router", func() bool { return len(r.rib(vip)) == 2 })

	t.Run("the master's path is best with LOCAL_PREF 5000 and MED 10", func(t *testing.T) {
		best, ok := r.best(vip)
		if !ok || best.From != netip.MustParseAddr("127.0.0.2") || best.LocalPref != 5000 || best.MED != 10 {
			t.Fatalf("best path = %+v (found %v), want from 127.0.0.2 with LOCAL_PREF 5000, MED 10", best, ok)
		}
		if best.NextHop != netip.MustParseAddr("127.0.0.2") {
			t.Errorf("next hop = %v, want the speaker's own address 127.0.0.2", best.NextHop)
		}
	})
	t.Run("the backup's path is present with LOCAL_PREF 100, MED 20 and no prepend over iBGP", func(t *testing.T) {
		p, ok := pathFrom(r, vip, "127.0.0.3")
		if !ok || p.LocalPref != 100 || p.MED != 20 || len(p.ASPath) != 0 {
			t.Fatalf("backup path = %+v (found %v), want LOCAL_PREF 100, MED 20, empty AS path", p, ok)
		}
	})
	t.Run("a role swap moves the best path without any withdrawal", func(t *testing.T) {
		before := len(r.seen(vip))
		// Make before break, as the elector does: the new master first.
		set(t, b, adv(vip, shard.RoleMaster))
		set(t, a, adv(vip, shard.RoleBackup))
		eventually(t, 5*time.Second, "best path from 127.0.0.3", func() bool {
			best, ok := r.best(vip)
			return ok && best.From == netip.MustParseAddr("127.0.0.3") && best.LocalPref == 5000
		})
		eventually(t, 5*time.Second, "old master demoted", func() bool {
			p, ok := pathFrom(r, vip, "127.0.0.2")
			return ok && p.LocalPref == 100
		})
		for _, u := range r.seen(vip)[before:] {
			if u.Withdraw {
				t.Fatalf("router saw a withdrawal from %v during the swap; want implicit replace only", u.From)
			}
		}
		if got := a.Advertised(); len(got) != 1 || got[0].Role != shard.RoleBackup {
			t.Errorf("Advertised() = %v, want the VIP as backup", got)
		}
	})
	t.Run("shutdown withdraws the VIP before closing the session", func(t *testing.T) {
		before := len(r.seen(vip))
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := b.Shutdown(ctx); err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
		withdrawn := false
		for _, u := range r.seen(vip)[before:] {
			withdrawn = withdrawn || (u.Withdraw && u.From == netip.MustParseAddr("127.0.0.3"))
		}
		if !withdrawn {
			t.Fatalf("router received no withdrawal UPDATE from the stopped speaker")
		}
		eventually(t, 5*time.Second, "best path back on 127.0.0.2", func() bool {
			best, ok := r.best(vip)
			return ok && best.From == netip.MustParseAddr("127.0.0.2")
		})
		if err := b.SetAdvertisements(context.Background(), nil); err != ErrStopped {
			t.Errorf("SetAdvertisements after Shutdown = %v, want ErrStopped", err)
		}
	})
}

func TestSpeakersOverEBGP(t *testing.T) {
	const vip = "10.96.0.2/32"
	r := newTestRouter(t, "127.0.0.1", 65001, map[string]uint32{"127.0.0.2": 4200000000, "127.0.0.3": 4200000000})
	a := startSpeaker(t, testConfig("127.0.0.2", 4200000000, r))
	b := startSpeaker(t, testConfig("127.0.0.3", 4200000000, r))
	waitEstablished(t, a, r.addr)
	waitEstablished(t, b, r.addr)
	set(t, a, adv(vip, shard.RoleMaster))
	set(t, b, adv(vip, shard.RoleBackup))
	eventually(t, 5*time.Second, "both paths at the router", func() bool { return len(r.rib(vip)) == 2 })

	t.Run("the master announces its 4-byte AS once with MED 10", func(t *testing.T) {
		p, _ := pathFrom(r, vip, "127.0.0.2")
		if !slices.Equal(p.ASPath, []uint32{4200000000}) || p.MED != 10 {
			t.Fatalf("master path = %+v, want AS path [4200000000], MED 10", p)
		}
	})
	t.Run("the backup prepends its AS three more times with MED 20", func(t *testing.T) {
		p, _ := pathFrom(r, vip, "127.0.0.3")
		want := []uint32{4200000000, 4200000000, 4200000000, 4200000000}
		if !slices.Equal(p.ASPath, want) || p.MED != 20 {
			t.Fatalf("backup path = %+v, want AS path %v, MED 20", p, want)
		}
	})
	t.Run("the master's path wins on AS path length", func(t *testing.T) {
		best, ok := r.best(vip)
		if !ok || best.From != netip.MustParseAddr("127.0.0.2") {
			t.Fatalf("best = %+v, want the master's", best)
		}
	})
	t.Run("equal roles announce identical attributes from every speaker", func(t *testing.T) {
		set(t, a, adv(vip, shard.RoleEqual))
		set(t, b, adv(vip, shard.RoleEqual))
		eventually(t, 5*time.Second, "equal paths", func() bool {
			pa, _ := pathFrom(r, vip, "127.0.0.2")
			pb, _ := pathFrom(r, vip, "127.0.0.3")
			return slices.Equal(pa.ASPath, pb.ASPath) && pa.MED == pb.MED && len(pa.ASPath) == 1
		})
	})
}

func TestSetAdvertisementsDiffs(t *testing.T) {
	r := newTestRouter(t, "127.0.0.1", 65000, map[string]uint32{"127.0.0.2": 65000})
	s := startSpeaker(t, testConfig("127.0.0.2", 65000, r))
	waitEstablished(t, s, r.addr)

	set(t, s, adv("10.96.0.1/32", shard.RoleMaster), adv("10.96.0.2/32", shard.RoleBackup), adv("10.96.0.3/32", shard.RoleMaster))
	eventually(t, 5*time.Second, "three VIPs at the router", func() bool {
		return len(r.rib("10.96.0.1/32")) == 1 && len(r.rib("10.96.0.2/32")) == 1 && len(r.rib("10.96.0.3/32")) == 1
	})

	t.Run("repeating the same desired state sends nothing", func(t *testing.T) {
		n := r.updateCount()
		set(t, s, adv("10.96.0.3/32", shard.RoleMaster), adv("10.96.0.1/32", shard.RoleMaster), adv("10.96.0.2/32", shard.RoleBackup))
		// An instance rename changes no attribute either.
		renamed := adv("10.96.0.1/32", shard.RoleMaster)
		renamed.Instance = "llb-inst1"
		set(t, s, renamed, adv("10.96.0.2/32", shard.RoleBackup), adv("10.96.0.3/32", shard.RoleMaster))
		// A later change is a marker: once it arrived, anything sent before it has too.
		set(t, s, renamed, adv("10.96.0.2/32", shard.RoleBackup), adv("10.96.0.3/32", shard.RoleMaster), adv("10.96.0.9/32", shard.RoleMaster))
		eventually(t, 5*time.Second, "marker VIP", func() bool { return len(r.rib("10.96.0.9/32")) == 1 })
		if got := r.updateCount() - n; got != 1 {
			t.Fatalf("router saw %d UPDATEs, want only the marker's", got)
		}
		if got := s.Advertised()[0].Instance; got != "llb-inst1" {
			t.Errorf("Advertised instance = %q, want the renamed llb-inst1", got)
		}
	})
	t.Run("a VIP left out of the desired state is withdrawn and the others stay", func(t *testing.T) {
		set(t, s, adv("10.96.0.1/32", shard.RoleMaster), adv("10.96.0.3/32", shard.RoleMaster))
		eventually(t, 5*time.Second, "withdrawals", func() bool {
			return len(r.rib("10.96.0.2/32")) == 0 && len(r.rib("10.96.0.9/32")) == 0
		})
		if len(r.rib("10.96.0.1/32")) != 1 || len(r.rib("10.96.0.3/32")) != 1 {
			t.Fatalf("a VIP still desired disappeared")
		}
		var got []string
		for _, a := range s.Advertised() {
			got = append(got, a.Prefix.String())
		}
		if !slices.Equal(got, []string{"10.96.0.1/32", "10.96.0.3/32"}) {
			t.Errorf("Advertised() = %v", got)
		}
		ps := s.Peers()
		if len(ps) != 1 || ps[0].PrefixesSent != 2 {
			t.Errorf("Peers() = %+v, want 2 prefixes sent", ps)
		}
	})
	t.Run("an IPv6 VIP is announced with the configured IPv6 next hop", func(t *testing.T) {
		cfg := testConfig("127.0.0.3", 65000, r)
		cfg.NextHop6 = netip.MustParseAddr("fd00::3")
		r.addPeer("127.0.0.3", 65000, "")
		s6 := startSpeaker(t, cfg)
		waitEstablished(t, s6, r.addr)
		set(t, s6, adv("fd00:96::1/128", shard.RoleMaster))
		eventually(t, 5*time.Second, "IPv6 VIP", func() bool {
			best, ok := r.best("fd00:96::1/128")
			return ok && best.NextHop == cfg.NextHop6 && best.LocalPref == 5000
		})
	})
	t.Run("an invalid desired state is refused whole", func(t *testing.T) {
		before := s.Advertised()
		for name, bad := range map[string][]shard.Advertisement{
			"not a host prefix": {adv("10.96.1.0/24", shard.RoleMaster)},
			"listed twice":      {adv("10.96.0.5/32", shard.RoleMaster), adv("10.96.0.5/32", shard.RoleBackup)},
			"zero prefix":       {{Role: shard.RoleMaster}},
		} {
			if err := s.SetAdvertisements(context.Background(), bad); err == nil {
				t.Errorf("%s: no error", name)
			}
		}
		if got := s.Advertised(); !slices.Equal(got, before) {
			t.Errorf("Advertised changed to %v after refused calls", got)
		}
	})
}

func TestImportRejectsEveryRoute(t *testing.T) {
	r := newTestRouter(t, "127.0.0.1", 65001, map[string]uint32{"127.0.0.2": 65000})
	other := newTestRouter(t, "127.0.0.6", 65002, map[string]uint32{"127.0.0.2": 65000})
	s := startSpeaker(t, testConfig("127.0.0.2", 65000, r, other))
	waitEstablished(t, s, r.addr, other.addr)
	set(t, s, adv("10.96.0.1/32", shard.RoleMaster))
	since := status(t, s, other.addr).Since
	r.announce("192.0.2.0/24")
	r.announce("0.0.0.0/0")

	eventually(t, 5*time.Second, "routes received by the speaker", func() bool {
		return status(t, s, r.addr).PrefixesReceived == 2
	})
	t.Run("the other peer gets only the VIP and its session stays up", func(t *testing.T) {
		// A later VIP is a marker: a wrongly imported route would have been passed on
		// before it.
		set(t, s, adv("10.96.0.1/32", shard.RoleMaster), adv("10.96.0.9/32", shard.RoleMaster))
		eventually(t, 5*time.Second, "marker VIP at the other peer", func() bool { return len(other.rib("10.96.0.9/32")) == 1 })
		if len(other.rib("192.0.2.0/24")) != 0 || len(other.rib("0.0.0.0/0")) != 0 {
			t.Fatal("the speaker passed a peer's route on to another peer")
		}
		if len(other.rib("10.96.0.1/32")) != 1 {
			t.Fatal("the other peer lost the VIP")
		}
		if p := status(t, s, other.addr); !p.Established || !p.Since.Equal(since) {
			t.Fatalf("other session = %+v, want established since %v", p, since)
		}
	})
	t.Run("the speaker's RIB holds only its own VIPs", func(t *testing.T) {
		var got []string
		for _, p := range s.rib() {
			got = append(got, p.String())
		}
		if !slices.Equal(got, []string{"10.96.0.1/32", "10.96.0.9/32"}) {
			t.Fatalf("speaker RIB = %v, want only its VIPs", got)
		}
	})
}

func TestSpeakerWithPasswordFile(t *testing.T) {
	r := newTestRouter(t, "127.0.0.1", 65000, nil)
	r.addPeer("127.0.0.2", 65000, "s3cret-md5")
	cfg := testConfig("127.0.0.2", 65000, r)
	cfg.PasswordFile = writeFile(t, "# mounted Secret\n127.0.0.1 s3cret-md5\n")
	s := startSpeaker(t, cfg)
	waitEstablished(t, s, r.addr)
	set(t, s, adv("10.96.0.1/32", shard.RoleMaster))
	eventually(t, 5*time.Second, "VIP over the MD5 session", func() bool { return len(r.rib("10.96.0.1/32")) == 1 })
}

func TestGRPCAPI(t *testing.T) {
	t.Run("an address in use is an error before anything starts", func(t *testing.T) {
		cfg := testConfig("127.0.0.2", 65000)
		cfg.GRPCListen = "127.0.0.1:" + itoa(int(occupiedPort(t)))
		if _, err := New(context.Background(), cfg, testLogger(t)); err == nil {
			t.Fatal("New succeeded with the gRPC address in use")
		}
	})
	t.Run("the gobgp CLI's API lists the announced VIPs", func(t *testing.T) {
		cfg := testConfig("127.0.0.2", 65000)
		cfg.GRPCListen = "127.0.0.1:" + itoa(int(freePort(t, netip.MustParseAddr("127.0.0.1"))))
		s := startSpeaker(t, cfg)
		set(t, s, adv("10.96.0.7/32", shard.RoleBackup))
		got := grpcGlobalRIB(t, cfg.GRPCListen)
		if !slices.Equal(got, []string{"10.96.0.7/32"}) {
			t.Fatalf("gRPC ListPath = %v, want [10.96.0.7/32]", got)
		}
	})
}

// Announcing and Flush tell the elector whether master routes reach the routers: a
// node is handed mastership only when they do, and acknowledges a handover only once
// they have left.
func TestAnnouncingAndFlush(t *testing.T) {
	const vip = "10.96.0.9/32"
	r := newTestRouter(t, "127.0.0.1", 65000, map[string]uint32{"127.0.0.2": 65000, "127.0.0.3": 65000, "127.0.0.4": 65000})
	// A configured peer that never comes up: nothing listens on 127.0.0.9.
	down := Peer{Addr: netip.MustParseAddr("127.0.0.9"), ASN: 65000, Port: 179}

	t.Run("no session up: not announcing, and Flush says the routes reach no router", func(t *testing.T) {
		cfg := testConfig("127.0.0.2", 65000)
		cfg.Peers = []Peer{down}
		s := startSpeaker(t, cfg)
		set(t, s, adv(vip, shard.RoleMaster))
		if s.Announcing() {
			t.Error("Announcing() = true with its only peer down")
		}
		if err := s.Flush(context.Background()); !errors.Is(err, ErrNotAnnouncing) {
			t.Errorf("Flush = %v, want ErrNotAnnouncing", err)
		}
	})
	t.Run("one of two sessions up: not announcing until PeerWait has passed", func(t *testing.T) {
		cfg := testConfig("127.0.0.3", 65000, r)
		cfg.Peers = append(cfg.Peers, down)
		cfg.PeerWait = time.Hour
		s := startSpeaker(t, cfg)
		waitEstablished(t, s, r.addr)
		if s.Announcing() {
			t.Error("Announcing() = true with a peer down and PeerWait not passed")
		}
		cfg = testConfig("127.0.0.4", 65000, r)
		cfg.Peers = append(cfg.Peers, down)
		cfg.PeerWait = 0
		s = startSpeaker(t, cfg)
		waitEstablished(t, s, r.addr)
		if !s.Announcing() {
			t.Error("Announcing() = false with one peer up and PeerWait passed")
		}
	})
	t.Run("every session up: announcing, and Flush returns once the route left", func(t *testing.T) {
		s := startSpeaker(t, testConfig("127.0.0.2", 65000, r))
		waitEstablished(t, s, r.addr)
		if !s.Announcing() {
			t.Fatal("Announcing() = false with every peer up")
		}
		before := status(t, s, r.addr).updatesSent
		set(t, s, adv(vip, shard.RoleMaster))
		if err := s.Flush(context.Background()); err != nil {
			t.Fatalf("Flush: %v", err)
		}
		if after := status(t, s, r.addr); after.updatesSent <= before || after.outQueue > 0 {
			t.Errorf("after Flush: %d updates sent (%d before), %d queued: the route had not left", after.updatesSent, before, after.outQueue)
		}
		eventually(t, 5*time.Second, "the route at the router", func() bool { return len(r.rib(vip)) == 1 })
	})
}
