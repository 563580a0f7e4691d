package bgp

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shardlb/shardlb/shard"
	"github.com/shardlb/shardlb/test/frr"
)

var labVIP = netip.MustParsePrefix("10.96.0.1/32")

func labAdv(role shard.Role) shard.Advertisement {
	return shard.Advertisement{Prefix: labVIP, Role: role, Instance: "default"}
}

// labSuccessor is a backup that takes over if the master fails.
func labSuccessor() shard.Advertisement {
	a := labAdv(shard.RoleBackup)
	a.Successor = true
	return a
}

func (l *lab) paths(t testing.TB, ctx context.Context) map[netip.Addr]frr.Path {
	t.Helper()
	ps, err := l.router.Paths(ctx, labVIP)
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[netip.Addr]frr.Path)
	for _, p := range ps {
		out[p.Peer] = p
	}
	return out
}

// routeWatch polls FRR's kernel route for the VIP every millisecond in the
// background and remembers whether it was ever missing.
type routeWatch struct {
	stop    chan struct{}
	done    chan struct{}
	mu      sync.Mutex
	missing int
	polls   int
	err     error
}

func (l *lab) watchRoute() *routeWatch {
	w := &routeWatch{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			hops, err := l.router.KernelRoute(labVIP)
			w.mu.Lock()
			w.polls++
			if err != nil {
				w.err = err
			} else if len(hops) == 0 {
				w.missing++
			}
			w.mu.Unlock()
			select {
			case <-w.stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	return w
}

func (w *routeWatch) end() (missing, polls int, err error) {
	close(w.stop)
	<-w.done
	return w.missing, w.polls, w.err
}

// TestFRRIBGP runs three speakers against FRR over iBGP with BFD (100 ms x 3):
// roles, a role swap, a link cut and a clean stop, in that order.
func TestFRRIBGP(t *testing.T) {
	l := newLab(t, labConfig{routerASN: 65000, speakerASN: 65000, speakers: 3, bfd: 100 * time.Millisecond})
	s1, s2, s3 := l.speakers[0], l.speakers[1], l.speakers[2]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s1.set(t, labAdv(shard.RoleMaster))
	s2.set(t, labAdv(shard.RoleBackup))
	s3.set(t, labAdv(shard.RoleBackup))
	l.eventually(t, 10*time.Second, "three paths in FRR", func(ctx context.Context) bool { return len(l.paths(t, ctx)) == 3 })
	defer s3.set(t, labAdv(shard.RoleBackup))

	t.Run("FRR's best path is the master's with LOCAL_PREF 5000 and the backups' are present with 100", func(t *testing.T) {
		// FRR lists a received path before its best-path run has looked at it.
		l.eventually(t, 5*time.Second, "a best path", func(ctx context.Context) bool {
			for _, p := range l.paths(t, ctx) {
				if p.Best {
					return true
				}
			}
			return false
		})
		ps := l.paths(t, ctx)
		if best := ps[s1.addr]; !best.Best || best.LocalPref != 5000 || best.MED != 10 || best.NextHop != s1.addr {
			t.Fatalf("master path = %+v, want best with LOCAL_PREF 5000, MED 10, next hop %v", best, s1.addr)
		}
		for _, b := range []*speakerProc{s2, s3} {
			if p := ps[b.addr]; p.Best || p.LocalPref != 100 || p.MED != 20 {
				t.Errorf("backup %s path = %+v, want LOCAL_PREF 100, MED 20, not best", b.name, p)
			}
		}
		l.waitRoute(t, labVIP, 5*time.Second, s1.addr)
	})
	t.Run("a role swap moves the kernel route and it never disappears", func(t *testing.T) {
		w := l.watchRoute()
		s2.set(t, labAdv(shard.RoleMaster))
		s1.set(t, labAdv(shard.RoleBackup))
		l.waitRoute(t, labVIP, 5*time.Second, s2.addr)
		time.Sleep(200 * time.Millisecond) // keep watching while the demotion settles
		missing, polls, err := w.end()
		if err != nil {
			t.Fatal(err)
		}
		if missing > 0 {
			t.Fatalf("kernel route missing in %d of %d polls during the swap", missing, polls)
		}
		if best, ok, err := l.router.BestPath(ctx, labVIP); err != nil || !ok || best.Peer != s2.addr {
			t.Fatalf("best path = %+v, %v, %v; want from %v", best, ok, err, s2.addr)
		}
	})
	t.Run("cutting the master's link moves the route to a backup through BFD", func(t *testing.T) {
		s2.setLink(t, false)
		// Both backups have equal attributes: FRR's default maximum-paths installs both.
		l.waitRoute(t, labVIP, 5*time.Second, s1.addr, s3.addr)
		sum, err := l.router.Summary(ctx)
		if err != nil || sum[s2.addr].State == "Established" {
			t.Fatalf("FRR still has the session with the cut master: %+v, %v", sum[s2.addr], err)
		}
	})
	t.Run("a healed link brings the session back within seconds", func(t *testing.T) {
		s2.setLink(t, true)
		l.waitEstablished(t, s2)
		l.waitRoute(t, labVIP, 10*time.Second, s2.addr)
	})
	t.Run("with a successor ranked, a master's loss moves the route to the successor alone", func(t *testing.T) {
		s3.set(t, labSuccessor())
		l.eventually(t, 10*time.Second, "the successor's path with LOCAL_PREF 200, MED 15", func(ctx context.Context) bool {
			p := l.paths(t, ctx)[s3.addr]
			return p.LocalPref == 200 && p.MED == 15 && !p.Best
		})
		// The route must go from the master to the successor, never through a spread
		// over both backups.
		var spread, polls int
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				if hops, err := l.router.KernelRoute(labVIP); err == nil && len(hops) > 1 {
					spread++
				}
				polls++
				select {
				case <-stop:
					return
				case <-time.After(time.Millisecond):
				}
			}
		}()
		s2.setLink(t, false)
		l.waitRoute(t, labVIP, 5*time.Second, s3.addr)
		time.Sleep(300 * time.Millisecond)
		close(stop)
		<-done
		if spread > 0 {
			t.Fatalf("kernel route had several next hops in %d of %d polls after the master's loss", spread, polls)
		}
		s2.setLink(t, true)
		l.waitEstablished(t, s2)
		l.waitRoute(t, labVIP, 10*time.Second, s2.addr)
		s3.set(t, labAdv(shard.RoleBackup))
	})
	t.Run("a clean stop of the master moves the route to a backup", func(t *testing.T) {
		s2.signal(t, syscall.SIGTERM)
		s2.wait(t)
		l.waitRoute(t, labVIP, 5*time.Second, s1.addr, s3.addr)
	})
	t.Run("the speaker reports its peer established with BFD up", func(t *testing.T) {
		ps := s1.peers(t)
		if len(ps) != 1 || !ps[0].Established || ps[0].BFD != "up" || ps[0].PrefixesSent != 1 || ps[0].Since.IsZero() {
			t.Fatalf("Peers() = %+v", ps)
		}
	})
}

// TestFRREBGP runs three speakers against FRR with its defaults over eBGP, ECMP
// enabled on the router.
func TestFRREBGP(t *testing.T) {
	l := newLab(t, labConfig{routerASN: 65001, speakerASN: 65000, speakers: 3, maximumPaths: 8})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	t.Run("with equal roles FRR's kernel route has every speaker as next hop", func(t *testing.T) {
		for _, s := range l.speakers {
			s.set(t, labAdv(shard.RoleEqual))
		}
		l.waitRoute(t, labVIP, 10*time.Second, speakerAddr(0), speakerAddr(1), speakerAddr(2))
	})
	t.Run("with roles the master wins on AS path length", func(t *testing.T) {
		l.speakers[1].set(t, labAdv(shard.RoleMaster))
		l.speakers[0].set(t, labAdv(shard.RoleBackup))
		l.speakers[2].set(t, labAdv(shard.RoleBackup))
		l.waitRoute(t, labVIP, 10*time.Second, speakerAddr(1))
		ps := l.paths(t, ctx)
		if m := ps[speakerAddr(1)]; !m.Best || !slices.Equal(m.ASPath, []uint32{65000}) || m.MED != 10 {
			t.Fatalf("master path = %+v, want best with AS path [65000], MED 10", m)
		}
		want := []uint32{65000, 65000, 65000, 65000}
		if b := ps[speakerAddr(0)]; b.Best || !slices.Equal(b.ASPath, want) || b.MED != 20 {
			t.Fatalf("backup path = %+v, want AS path %v, MED 20", b, want)
		}
	})
	t.Run("a successor is prepended less than a backup and wins when the master goes", func(t *testing.T) {
		a := labAdv(shard.RoleBackup)
		a.Successor = true
		l.speakers[2].set(t, a)
		want := []uint32{65000, 65000, 65000}
		l.eventually(t, 10*time.Second, "the successor's path prepended twice", func(ctx context.Context) bool {
			p := l.paths(t, ctx)[speakerAddr(2)]
			return slices.Equal(p.ASPath, want) && p.MED == 15
		})
		l.speakers[1].set(t)
		l.waitRoute(t, labVIP, 10*time.Second, speakerAddr(2))
	})
}

// TestFRRExportOnlyVIPs adds foreign paths through every speaker's gRPC API, as any
// process on a node could, over iBGP and eBGP: FRR gets the VIP from master, successor
// and backup with their attributes and a static VIP outside the pools, and nothing
// else.
func TestFRRExportOnlyVIPs(t *testing.T) {
	static := shard.Advertisement{Prefix: netip.MustParsePrefix("203.0.113.7/32"), Role: shard.RoleMaster, Instance: "default"}
	marker := shard.Advertisement{Prefix: netip.MustParsePrefix("10.96.0.9/32"), Role: shard.RoleBackup, Instance: "default"}
	for _, tc := range []struct {
		name      string
		routerASN uint32
		// By speaker (master, successor, backup): LOCAL_PREF at FRR (none over eBGP)
		// and AS path length.
		localPref [3]uint32
		asPath    [3]int
	}{
		{"iBGP", 65000, [3]uint32{5000, 200, 100}, [3]int{0, 0, 0}},
		{"eBGP", 65001, [3]uint32{0, 0, 0}, [3]int{1, 3, 4}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t, labConfig{routerASN: tc.routerASN, speakerASN: 65000, speakers: 3, maximumPaths: 8})
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			advs := [][]shard.Advertisement{{labAdv(shard.RoleMaster), static}, {labSuccessor()}, {labAdv(shard.RoleBackup)}}
			for i, s := range l.speakers {
				s.set(t, advs[i]...)
			}
			l.eventually(t, 10*time.Second, "three paths in FRR", func(ctx context.Context) bool { return len(l.paths(t, ctx)) == 3 })
			var foreign []netip.Prefix
			for _, f := range foreignPaths {
				if f.prefix.Addr().Is4() { // FRR's sessions carry IPv4 unicast only
					foreign = append(foreign, f.prefix)
					for _, s := range l.speakers {
						s.inject(t, f.prefix, f.localPref)
					}
				}
			}
			// A VIP announced after them is a marker: a foreign path let out would have
			// reached FRR before it.
			for i, s := range l.speakers {
				s.set(t, append(advs[i], marker)...)
			}
			l.eventually(t, 10*time.Second, "the marker from every speaker", func(ctx context.Context) bool {
				ps, err := l.router.Paths(ctx, marker.Prefix)
				return err == nil && len(ps) == 3
			})

			t.Run("FRR received the VIPs and nothing else", func(t *testing.T) {
				sum, err := l.router.Summary(ctx)
				if err != nil {
					t.Fatal(err)
				}
				for i, s := range l.speakers {
					if got, want := sum[s.addr].PrefixesReceived, len(advs[i])+1; got != want {
						t.Errorf("FRR received %d prefixes from %s, want its %d VIPs", got, s.name, want)
					}
				}
				for _, p := range foreign {
					if ps, err := l.router.Paths(ctx, p); err != nil || len(ps) > 0 {
						t.Errorf("FRR has %v: %+v, %v", p, ps, err)
					}
				}
				if ps, err := l.router.Paths(ctx, static.Prefix); err != nil || len(ps) != 1 || ps[0].Peer != l.speakers[0].addr {
					t.Errorf("static VIP outside the pools at FRR = %+v, %v; want one path from %s", ps, err, l.speakers[0].name)
				}
			})
			t.Run("master, successor and backup keep their attributes and the master is best", func(t *testing.T) {
				ps := l.paths(t, ctx)
				for i, s := range l.speakers {
					p := ps[s.addr]
					med := []uint32{10, 15, 20}[i]
					if p.LocalPref != tc.localPref[i] || p.MED != med || len(p.ASPath) != tc.asPath[i] || p.Best != (i == 0) {
						t.Errorf("%s path = %+v, want LOCAL_PREF %d, MED %d, AS path of %d, best %v", s.name, p, tc.localPref[i], med, tc.asPath[i], i == 0)
					}
				}
				l.waitRoute(t, labVIP, 5*time.Second, l.speakers[0].addr)
			})
		})
	}
}

// TestFRRTenThousandVIPs announces 10,000 VIPs from one speaker and waits until all
// are in FRR's RIB and kernel table.
func TestFRRTenThousandVIPs(t *testing.T) {
	l := newLab(t, labConfig{routerASN: 65000, speakerASN: 65000, speakers: 1})
	elapsed := announceMany(t, l, l.speakers[0], 10000)
	t.Logf("10,000 VIPs in FRR's RIB and kernel after %v; speaker RSS %.0f MiB", elapsed, l.speakers[0].rssMiB(t))
	t.Run("withdrawing them all empties FRR's kernel table", func(t *testing.T) {
		l.speakers[0].set(t)
		l.eventually(t, 60*time.Second, "no BGP routes", func(context.Context) bool {
			n, err := l.router.KernelBGPRoutes()
			return err == nil && n == 0
		})
	})
}

// vips returns n /32s from 10.96.0.0/16 upward.
func vips(n int, role shard.Role) []shard.Advertisement {
	out := make([]shard.Advertisement, n)
	base := netip.MustParseAddr("10.96.0.0").As4()
	for i := range out {
		v := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(i+1)
		a := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
		out[i] = shard.Advertisement{Prefix: netip.PrefixFrom(a, 32), Role: role, Instance: fmt.Sprintf("llb-inst%d", i%4)}
	}
	return out
}

// announceMany announces n VIPs and returns how long until FRR has all of them
// from the speaker in its RIB and its kernel table.
func announceMany(t testing.TB, l *lab, s *speakerProc, n int) time.Duration {
	t.Helper()
	advs := vips(n, shard.RoleMaster)
	start := time.Now()
	s.set(t, advs...)
	l.eventually(t, 60*time.Second, fmt.Sprintf("%d VIPs in FRR", n), func(ctx context.Context) bool {
		sum, err := l.router.Summary(ctx)
		if err != nil || sum[s.addr].PrefixesReceived != n {
			return false
		}
		k, err := l.router.KernelBGPRoutes()
		return err == nil && k == n
	})
	return time.Since(start)
}

// TestFRRSetPeers changes one speaker's peers while it runs: removing FRR closes the
// session and FRR drops its path, adding FRR back with a BFD profile brings the
// session and BFD up with the profile's timers; the other speaker's session and FRR's
// kernel route through it are never disturbed.
func TestFRRSetPeers(t *testing.T) {
	l := newLab(t, labConfig{routerASN: 65000, speakerASN: 65000, speakers: 2, bfd: 100 * time.Millisecond})
	s1, s2 := l.speakers[0], l.speakers[1]
	s1.set(t, labAdv(shard.RoleMaster))
	s2.set(t, labAdv(shard.RoleBackup))
	l.eventually(t, 10*time.Second, "two paths in FRR", func(ctx context.Context) bool { return len(l.paths(t, ctx)) == 2 })
	l.waitRoute(t, labVIP, 5*time.Second, s1.addr)
	s1Since := s1.peers(t)[0].Since

	w := l.watchRoute()
	t.Run("a peer removed live closes its session and FRR drops its path", func(t *testing.T) {
		s2.setPeers(t)
		l.eventually(t, 10*time.Second, "s2's session down at FRR", func(ctx context.Context) bool {
			sum, err := l.router.Summary(ctx)
			return err == nil && sum[s2.addr].State != "Established"
		})
		l.eventually(t, 5*time.Second, "s2's path gone", func(ctx context.Context) bool {
			_, ok := l.paths(t, ctx)[s2.addr]
			return !ok
		})
	})
	t.Run("the peer added back with a BFD profile comes up with the profile's timers", func(t *testing.T) {
		s2.setPeers(t, Peer{Addr: routerAddr, ASN: 65000, BFD: &BFDConfig{Enabled: true, Interval: 200 * time.Millisecond, Multiplier: 4}})
		l.eventually(t, 30*time.Second, "s2's session and BFD up at FRR", func(ctx context.Context) bool {
			sum, err := l.router.Summary(ctx)
			if err != nil || sum[s2.addr].State != "Established" {
				return false
			}
			// FRR's view of the speaker's side of the BFD session.
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
				return b.Peer == s2.addr.String() && b.Status == "up" && b.RemoteTx == 200 && b.RemoteMult == 4
			})
		})
		l.eventually(t, 5*time.Second, "s2's backup path back", func(ctx context.Context) bool {
			p, ok := l.paths(t, ctx)[s2.addr]
			return ok && p.LocalPref == 100
		})
	})
	missing, polls, err := w.end()
	if err != nil {
		t.Fatal(err)
	}
	if missing > 0 {
		t.Fatalf("kernel route missing in %d of %d polls while the other speaker's peers changed", missing, polls)
	}
	if p := s1.peers(t)[0]; !p.Established || !p.Since.Equal(s1Since) {
		t.Fatalf("s1's session = %+v, want established since %v, never restarted", p, s1Since)
	}
}
