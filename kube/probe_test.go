package kube

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"
)

// TestProbesFindDeadMastersOnly probes three masters at once: one answers, one
// refuses connections (its process is gone), one accepts and never answers (a hung
// node). Only the last two become suspects, with their incarnations, and an answer
// clears a suspect again.
func TestProbesFindDeadMastersOnly(t *testing.T) {
	alive := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) }))
	defer alive.Close()
	hung := make(chan struct{})
	frozen := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { <-hung }))
	defer frozen.Close()
	defer close(hung)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gone := l.Addr().String()
	l.Close() // nothing listens there any more: connections are refused

	cfg := DefaultConfig()
	cfg.NodeName, cfg.Namespace = "me", "ns"
	cfg.PeerProbe = ProbeTimings{Interval: 50 * time.Millisecond, Failures: 3}
	store := cache.NewStore(cache.MetaNamespaceKeyFunc)
	member := func(name, inc, addr string) {
		if err := store.Add(&coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: MemberLeaseName(name), Namespace: "ns", Annotations: map[string]string{
				annotationIncarnation: inc, annotationProbe: addr,
			}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(name)},
		}); err != nil {
			t.Fatal(err)
		}
	}
	member("alive", "a1", alive.Listener.Addr().String())
	member("gone", "g1", gone)
	member("frozen", "f1", frozen.Listener.Addr().String())
	e := newElector(&cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), nil, store, &recorder{}, nil, clock.RealClock{})
	e.probe = []string{"alive", "gone", "frozen"}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go e.probeLoop(ctx)

	suspects := func() map[string]string {
		e.mu.Lock()
		defer e.mu.Unlock()
		return e.suspects
	}
	waitFor(t, 5*time.Second, "the gone and the frozen master as suspects", func() bool {
		s := suspects()
		return len(s) == 2 && s["gone"] == "g1" && s["frozen"] == "f1"
	})
	// The frozen one answers again.
	member("frozen", "f1", alive.Listener.Addr().String())
	waitFor(t, 5*time.Second, "the answering master cleared", func() bool {
		s := suspects()
		return len(s) == 1 && s["gone"] == "g1"
	})
}
