package kube

import (
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"k8s.io/utils/clock"
)

// StuckAfter is how long a loop may go without progress before /healthz fails: a
// change waiting that long without an apply finishing, or the elector not stepping
// that long. The elector steps at least every MemberLease.Renew (10 s) and the node
// loop retries a failed apply within 5 s, so only a loop blocked for good gets there;
// peers then take the pod's shards over (they probe /healthz) and the kubelet restarts it.
const StuckAfter = 60 * time.Second

// health answers /healthz and /readyz from timestamps the loops record; it takes no
// lock a loop holds, so a probe stays cheap and answers even while a loop is stuck.
type health struct {
	clock clock.PassiveClock
	bound time.Duration
	// started is when the loops started (unix ns, 0: caches still syncing): a loop is
	// not judged before, and a change is not counted as waiting from before.
	started atomic.Int64
	// stepped is when the elector last began a round (unix ns).
	stepped atomic.Int64
	// node is when the oldest change still waiting for an apply arrived and when the
	// apply under way started (zero: none).
	node func() (waiting, applying time.Time)
	// applied reports whether a Plan has been applied.
	applied func() bool
	// peers are the BGP sessions (nil: no speaker).
	peers func() []BGPPeer
}

func newHealth(clk clock.PassiveClock, node func() (waiting, applying time.Time), applied func() bool, peers func() []BGPPeer) *health {
	return &health{clock: clk, bound: StuckAfter, node: node, applied: applied, peers: peers}
}

// start marks the loops started.
func (h *health) start() {
	now := h.clock.Now().UnixNano()
	h.started.Store(now)
	h.stepped.Store(now)
}

// step records that the elector began a round.
func (h *health) step() { h.stepped.Store(h.clock.Now().UnixNano()) }

// alive is "" while both loops make progress, else why not. A failing apply being
// retried is progress: each attempt finishes.
func (h *health) alive() string {
	started := h.started.Load()
	if started == 0 {
		return ""
	}
	now := h.clock.Now()
	if d := now.Sub(time.Unix(0, h.stepped.Load())); d > h.bound {
		return fmt.Sprintf("elector loop has not stepped for %s", d.Round(time.Second))
	}
	waiting, applying := h.node()
	if !applying.IsZero() {
		if d := now.Sub(applying); d > h.bound {
			return fmt.Sprintf("node loop: apply under way for %s", d.Round(time.Second))
		}
	}
	if !waiting.IsZero() {
		if since := time.Unix(0, started); waiting.Before(since) {
			waiting = since
		}
		if d := now.Sub(waiting); d > h.bound {
			return fmt.Sprintf("node loop: a change has waited %s for an apply", d.Round(time.Second))
		}
	}
	return ""
}

// ready is "" once a Plan has been applied and, with BGP peers configured, while at
// least one session is established; else why not.
func (h *health) ready() string {
	if !h.applied() {
		return "caches syncing or no plan applied yet"
	}
	if h.peers == nil {
		return ""
	}
	peers := h.peers()
	if len(peers) == 0 {
		return ""
	}
	for _, p := range peers {
		if strings.EqualFold(p.State, "established") {
			return ""
		}
	}
	return fmt.Sprintf("none of %d BGP sessions established", len(peers))
}
