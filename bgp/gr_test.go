package bgp

import (
	"context"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/shardlb/shardlb/shard"
)

// kernelRouteWatch polls FRR's kernel route for labVIP every millisecond and counts
// the polls where it was missing or went anywhere but via.
type kernelRouteWatch struct {
	stop, done     chan struct{}
	missing, moved int
	polls          int
	err            error
}

func (l *lab) watchVia(via netip.Addr) *kernelRouteWatch {
	w := &kernelRouteWatch{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			hops, err := l.router.KernelRoute(labVIP)
			w.polls++
			switch {
			case err != nil:
				w.err = err
			case len(hops) == 0:
				w.missing++
			case len(hops) != 1 || hops[0] != via:
				w.moved++
			}
			select {
			case <-w.stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	return w
}

func (w *kernelRouteWatch) end(t testing.TB) {
	t.Helper()
	close(w.stop)
	<-w.done
	if w.err != nil {
		t.Fatal(w.err)
	}
	if w.missing > 0 || w.moved > 0 {
		t.Fatalf("kernel route missing in %d and elsewhere in %d of %d polls (1 ms apart)", w.missing, w.moved, w.polls)
	}
	t.Logf("kernel route via the restarting speaker in all %d polls", w.polls)
}

// restart starts a new process for p's speaker as a restarting one: its routes are
// set before its peers are dialled.
func (l *lab) restart(t testing.TB, p *speakerProc, advs ...shard.Advertisement) {
	t.Helper()
	p.cfg.Restarting = true
	p.start(t)
	p.cfg.Restarting = false
	p.set(t, advs...)
	if got := p.send(t, "resume"); got != "ok" {
		t.Fatalf("resume %s: %s", p.name, got)
	}
	l.waitEstablished(t, p)
}

// TestFRRGracefulRestart runs two speakers with a 5 s graceful restart time against
// FRR with graceful restart and BFD (300 ms x 3, shardlb's default: at 100 ms a busy
// machine was seen to expire every BFD session at once, the untouched speaker's too,
// which is no test of graceful restart): a suspended
// master's route stays in FRR's kernel table, never missing or moved, until its next
// process re-announces it, after a stop for a restart and after a SIGKILL alike; a
// suspended master that does not come back loses its route when the restart time
// ends; a real stop and a link cut still move the route at once.
func TestFRRGracefulRestart(t *testing.T) {
	const restartTime = 5 * time.Second
	l := newLab(t, labConfig{routerASN: 65000, speakerASN: 65000, speakers: 2, bfd: 300 * time.Millisecond, gracefulRestart: restartTime})
	s1, s2 := l.speakers[0], l.speakers[1]
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	s1.set(t, labAdv(shard.RoleMaster))
	s2.set(t, labSuccessor())
	l.waitRoute(t, labVIP, 10*time.Second, s1.addr)

	stale := func(t *testing.T, want bool) {
		t.Helper()
		l.eventually(t, 5*time.Second, "the master's path stale", func(ctx context.Context) bool {
			p := l.paths(t, ctx)[s1.addr]
			return p.Stale == want && p.Best
		})
	}
	for _, how := range []string{"a stop for a restart", "a SIGKILL"} {
		t.Run("after "+how+" the master's route stays until its next process re-announces it", func(t *testing.T) {
			w := l.watchVia(s1.addr)
			if how == "a SIGKILL" {
				s1.signal(t, syscall.SIGKILL)
			} else if got := s1.send(t, "suspend"); got != "ok" {
				t.Fatalf("suspend: %s", got)
			}
			s1.wait(t)
			stale(t, true)
			// Past BFD's detection time: the BFD session went down after the BGP
			// session closed, which must not take the stale route away.
			time.Sleep(1500 * time.Millisecond)
			l.restart(t, s1, labAdv(shard.RoleMaster))
			stale(t, false)
			w.end(t)
		})
	}
	t.Run("a suspended master that does not come back loses its route when the restart time ends", func(t *testing.T) {
		w := l.watchVia(s1.addr)
		if got := s1.send(t, "suspend"); got != "ok" {
			t.Fatalf("suspend: %s", got)
		}
		s1.wait(t)
		suspended := time.Now()
		at := l.waitRoute(t, labVIP, restartTime+10*time.Second, s2.addr)
		close(w.stop)
		<-w.done
		if after := at.Sub(suspended); after < restartTime-time.Second {
			t.Fatalf("route moved %v after the suspension, before the %v restart time ended", after, restartTime)
		} else {
			t.Logf("route moved to the successor %v after the suspension", after.Round(time.Millisecond))
		}
		l.restart(t, s1, labAdv(shard.RoleMaster))
		l.waitRoute(t, labVIP, 10*time.Second, s1.addr)
	})
	t.Run("a real stop withdraws at once", func(t *testing.T) {
		s1.signal(t, syscall.SIGTERM)
		s1.wait(t)
		stopped := time.Now()
		at := l.waitRoute(t, labVIP, 10*time.Second, s2.addr)
		if after := at.Sub(stopped); after >= restartTime-time.Second {
			t.Fatalf("route moved %v after a real stop: the routes were kept for the restart time", after)
		}
		l.restart(t, s1, labAdv(shard.RoleMaster))
		l.waitRoute(t, labVIP, 10*time.Second, s1.addr)
	})
	t.Run("a link cut still moves the route at BFD speed", func(t *testing.T) {
		s1.setLink(t, false)
		cut := time.Now()
		at := l.waitRoute(t, labVIP, 10*time.Second, s2.addr)
		if after := at.Sub(cut); after >= restartTime-time.Second {
			t.Fatalf("route moved %v after the link cut: kept as if the node restarted", after)
		} else {
			t.Logf("route moved to the successor %v after the link cut", after.Round(time.Millisecond))
		}
		s1.setLink(t, true)
		l.waitEstablished(t, s1)
		l.waitRoute(t, labVIP, 10*time.Second, s1.addr)
	})
	_ = ctx
}
