package kube

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/shardlb/shardlb/shard"
)

// probeFixture is a status whose loops are fakes: their timestamps and BGP sessions
// are set by the test, on a fake clock.
type probeFixture struct {
	clock             *clocktesting.FakeClock
	waiting, applying time.Time
	peers             []BGPPeer
	st                *status
	srv               *httptest.Server
}

func newProbeFixture(t *testing.T, withPeers bool) *probeFixture {
	f := &probeFixture{clock: clocktesting.NewFakeClock(time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC))}
	var peers func() []BGPPeer
	if withPeers {
		peers = func() []BGPPeer { return f.peers }
	}
	f.st = &status{}
	f.st.health = newHealth(f.clock, func() (time.Time, time.Time) { return f.waiting, f.applying }, f.st.ready.Load, peers)
	f.srv = httptest.NewServer(f.st.probeHandler(newMetrics()))
	t.Cleanup(f.srv.Close)
	return f
}

// get is the endpoint's status code and body.
func (f *probeFixture) get(t *testing.T, path string) (int, string) {
	t.Helper()
	resp, err := http.Get(f.srv.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(body))
}

func (f *probeFixture) expect(t *testing.T, path string, code int, reason string) {
	t.Helper()
	got, body := f.get(t, path)
	if got != code || !strings.Contains(body, reason) {
		t.Fatalf("%s = %d %q, want %d with %q", path, got, body, code, reason)
	}
	if strings.Count(body, "\n") != 0 {
		t.Errorf("%s: reason is not one line: %q", path, body)
	}
}

func TestHealthzFailsOnlyWhileALoopIsStuck(t *testing.T) {
	f := newProbeFixture(t, false)
	h := f.st.health
	f.expect(t, "/healthz", http.StatusOK, "ok") // caches syncing: no loop to judge yet
	h.start()
	f.expect(t, "/healthz", http.StatusOK, "ok")

	t.Run("the elector not stepping for longer than the bound fails it, a step heals it", func(t *testing.T) {
		f.clock.Step(StuckAfter - time.Second)
		h.step()
		f.clock.Step(StuckAfter)
		f.expect(t, "/healthz", http.StatusOK, "ok")
		f.clock.Step(2 * time.Second)
		f.expect(t, "/healthz", http.StatusServiceUnavailable, "elector loop has not stepped for 1m2s")
		h.step()
		f.expect(t, "/healthz", http.StatusOK, "ok")
	})
	t.Run("a change waiting longer than the bound fails it, an apply picking it up heals it", func(t *testing.T) {
		f.waiting = f.clock.Now()
		f.clock.Step(StuckAfter - time.Second)
		h.step()
		f.expect(t, "/healthz", http.StatusOK, "ok")
		f.clock.Step(2 * time.Second)
		h.step()
		f.expect(t, "/healthz", http.StatusServiceUnavailable, "node loop: a change has waited 1m1s for an apply")
		f.waiting = time.Time{}
		f.expect(t, "/healthz", http.StatusOK, "ok")
	})
	t.Run("an apply under way for longer than the bound fails it, its end heals it", func(t *testing.T) {
		f.applying = f.clock.Now()
		f.clock.Step(StuckAfter + time.Second)
		h.step()
		f.expect(t, "/healthz", http.StatusServiceUnavailable, "node loop: apply under way for 1m1s")
		f.applying = time.Time{}
		f.expect(t, "/healthz", http.StatusOK, "ok")
	})
	t.Run("failing applies retried with backoff are progress", func(t *testing.T) {
		for range 30 { // 30 failed attempts, 5 s apart: 150 s of errors
			f.waiting = f.clock.Now()
			f.clock.Step(4 * time.Second)
			f.applying, f.waiting = f.clock.Now(), time.Time{}
			f.clock.Step(time.Second)
			f.applying = time.Time{}
			h.step()
			f.expect(t, "/healthz", http.StatusOK, "ok")
		}
	})
	t.Run("a change from before the loops started counts from their start", func(t *testing.T) {
		f.waiting = f.clock.Now().Add(-time.Hour) // queued while the caches synced
		h.start()
		f.expect(t, "/healthz", http.StatusOK, "ok")
		f.waiting = time.Time{}
	})
}

func TestReadyzNeedsAnAppliedPlanAndAnEstablishedSession(t *testing.T) {
	t.Run("without a speaker, an applied plan is enough", func(t *testing.T) {
		f := newProbeFixture(t, false)
		f.expect(t, "/readyz", http.StatusServiceUnavailable, "not ready: caches syncing or no plan applied yet")
		f.st.ready.Store(true)
		f.expect(t, "/readyz", http.StatusOK, "ok")
	})
	t.Run("with peers, it follows whether any session is established", func(t *testing.T) {
		f := newProbeFixture(t, true)
		f.peers = []BGPPeer{{Peer: "10.0.0.1", State: "established"}, {Peer: "10.0.0.2", State: "active"}}
		f.expect(t, "/readyz", http.StatusServiceUnavailable, "no plan applied yet")
		f.st.ready.Store(true)
		f.expect(t, "/readyz", http.StatusOK, "ok")
		f.peers = []BGPPeer{{Peer: "10.0.0.1", State: "idle"}, {Peer: "10.0.0.2", State: "active"}}
		f.expect(t, "/readyz", http.StatusServiceUnavailable, "not ready: none of 2 BGP sessions established")
		f.expect(t, "/healthz", http.StatusOK, "ok") // sessions down is not a stuck process
		f.peers[1].State = "ESTABLISHED"
		f.expect(t, "/readyz", http.StatusOK, "ok")
	})
	t.Run("a speaker with no peers configured does not hold readiness", func(t *testing.T) {
		f := newProbeFixture(t, true)
		f.st.ready.Store(true)
		f.expect(t, "/readyz", http.StatusOK, "ok")
	})
}

// blockingDatapath holds SetServices until release is closed.
type blockingDatapath struct{ entered, release chan struct{} }

func (d blockingDatapath) SetServices([]shard.Frontend) error {
	d.entered <- struct{}{}
	<-d.release
	return nil
}

func TestNodeRecordsWaitingChangesAndApplyUnderWay(t *testing.T) {
	d := blockingDatapath{entered: make(chan struct{}), release: make(chan struct{})}
	n := newBenchNode(t, 1, discard{}, d)
	if w, a := n.progress(); !w.IsZero() || !a.IsZero() {
		t.Fatalf("before any change: waiting %v, applying %v, want neither", w, a)
	}
	n.touch("ns/svc-00000")
	if w, _ := n.progress(); w.IsZero() {
		t.Fatal("a change poked is not recorded as waiting")
	}
	done := make(chan error)
	go func() { done <- n.apply(context.Background()) }()
	<-d.entered
	if w, a := n.progress(); !w.IsZero() || a.IsZero() {
		t.Errorf("apply blocked in the datapath: waiting %v, applying %v, want applying only", w, a)
	}
	close(d.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if w, a := n.progress(); !w.IsZero() || !a.IsZero() {
		t.Errorf("after the apply: waiting %v, applying %v, want neither", w, a)
	}
}
