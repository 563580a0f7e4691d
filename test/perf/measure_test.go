package perf

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// Rounds and sizes of the benchmarks. Single runs on this kind of VM vary by ±30%: only
// alternating rounds and medians say anything.
const (
	rounds        = 8
	floodPackets  = 500_000
	floodLimit    = 15 * time.Second
	httpDuration  = 3 * time.Second
	httpThreads   = 2
	httpConnsOpen = 64
)

// alternate runs measure once per variant per round, rotating the order every round so
// that no variant always runs first (or right after the same neighbour).
func alternate(t testing.TB, vs []variant, measure func(v variant, round int)) {
	for r := range rounds {
		for i := range vs {
			measure(vs[(i+r)%len(vs)], r)
		}
	}
}

// withVariant programs the variant into the LB namespace for the duration of fn.
func withVariant(t testing.TB, tp *topology, v variant, fn func()) {
	t.Helper()
	if v.install != nil {
		remove := v.install(t, tp, frontends())
		defer remove()
	}
	fn()
}

// floodCost is CPU time per received packet, per variant and round.
type floodCost struct {
	total, stat map[string][]float64 // ns per received packet: schedstat, /proc/stat
	mpps        map[string][]float64
}

func measureFlood(t testing.TB, tp *topology, vs []variant) floodCost {
	t.Helper()
	c := floodCost{total: map[string][]float64{}, stat: map[string][]float64{}, mpps: map[string][]float64{}}
	for _, v := range vs {
		c.total[v.name] = make([]float64, rounds)
		c.stat[v.name] = make([]float64, rounds)
		c.mpps[v.name] = make([]float64, rounds)
	}
	tp.sinkPackets(t)
	alternate(t, vs, func(v variant, r int) {
		withVariant(t, tp, v, func() {
			res, err := flood(tp.client.Name, v.ifname(), tp.frames(v), floodPackets, floodLimit)
			if err != nil {
				t.Fatalf("%s: %v", v.name, err)
			}
			got := tp.sinkPackets(t)
			if got < res.sent*9/10 {
				t.Fatalf("%s: the backend received %d of %d packets", v.name, got, res.sent)
			}
			c.total[v.name][r] = float64(res.cpu.Nanoseconds()) / float64(got)
			c.stat[v.name][r] = float64(res.statBusy.Nanoseconds()) / float64(got)
			c.mpps[v.name][r] = float64(got) / res.elapsed.Seconds() / 1e6
		})
	})
	return c
}

// lbCost is the LB hop's own cost per round: the variant's total minus direct's total
// in the same round.
func (c floodCost) lbCost(name string, per map[string][]float64) []float64 {
	out := make([]float64, rounds)
	for r := range out {
		out[r] = per[name][r] - per[direct.name][r]
	}
	return out
}

// paired divides each round's value by the baseline's of the same round: load from
// elsewhere on the machine drifts over minutes, and a ratio within one round cancels
// most of it.
func paired(xs, base []float64) []float64 {
	out := make([]float64, len(xs))
	for i := range xs {
		out[i] = xs[i] / base[i]
	}
	return out
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n == 0 {
		return 0
	}
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

func formatRounds(xs []float64) string {
	parts := make([]string, len(xs))
	for i, x := range xs {
		if x < 100 {
			parts[i] = fmt.Sprintf("%.1f", x)
		} else {
			parts[i] = fmt.Sprintf("%.0f", x)
		}
	}
	return strings.Join(parts, " ")
}
