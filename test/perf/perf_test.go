package perf

import (
	"testing"
	"time"
)

// The harness itself: the sender's frames reach the backend, all of them, directly and
// through each load balancer, and through the LB namespace only because of the LB.
func TestFloodReachesTheBackendThroughEachLoadBalancer(t *testing.T) {
	tp := newTopology(t)
	tp.installSink(t)
	const count = 20000

	send := func(v variant) (floodResult, uint64) {
		t.Helper()
		res, err := flood(tp.client.Name, v.ifname(), tp.frames(v), count, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return res, tp.sinkPackets(t)
	}

	if _, got := send(nftables); got != 0 {
		t.Fatalf("with no load balancer %d packets to the VIP reached the backend, want 0", got)
	}
	for _, v := range []variant{direct, nftables, shardlb} {
		t.Run(v.name, func(t *testing.T) {
			var res floodResult
			var got uint64
			withVariant(t, tp, v, func() { res, got = send(v) })
			if res.sent != count || got != count {
				t.Fatalf("sent %d, backend received %d, want %d", res.sent, got, count)
			}
			if res.cpu <= 0 {
				t.Fatalf("a flood of %d packets measured no CPU time", count)
			}
		})
	}
}

// BenchmarkLBCostPerPacket is the load-balancer hop's CPU time per packet of a 64-byte
// UDP flood: each variant's CPU time per received packet minus that of the same sender
// and sink joined directly, in the same round. The baseline is nftables DNAT with
// conntrack; forward is kernel routing without NAT. CPU time is the scheduler's exact
// run time of the sending thread and its CPU's ksoftirqd (see flood), so other load on
// the machine slows a round down without being counted. The alternating rounds run once
// whatever -benchtime says; the cases report medians over the rounds.
func BenchmarkLBCostPerPacket(b *testing.B) {
	tp := newTopology(b)
	tp.installSink(b)
	vs := []variant{direct, nftables, shardlb, forward}
	c := measureFlood(b, tp, vs)
	for _, name := range []string{nftables.name, shardlb.name, forward.name} {
		b.Run(name, func(b *testing.B) {
			for range b.N {
			}
			b.Logf("total ns/pkt per round: %s (direct: %s)", formatRounds(c.total[name]), formatRounds(c.total[direct.name]))
			b.Logf("/proc/stat cross-check, LB ns/pkt per round (includes other load): %s", formatRounds(c.lbCost(name, c.stat)))
			b.ReportMetric(median(c.lbCost(name, c.total)), "lb-ns/pkt")
			b.ReportMetric(median(paired(c.lbCost(name, c.total), c.lbCost(nftables.name, c.total))), "x-paired")
			b.ReportMetric(median(c.mpps[name]), "rx-Mpps")
			// An op is one packet: the whole path's CPU time (sender, hops, sink).
			b.ReportMetric(median(c.total[name]), "ns/op")
		})
	}
}

// BenchmarkHTTPNewConns is HTTP requests per second with a new connection each
// (Connection: close), wrk in the client namespace, nginx in the backend namespace.
// Rates follow whatever else the machine runs; us-cpu/req (see httpRun) does not, and
// x-paired is the median of each round's ratio to the baseline's rate.
func BenchmarkHTTPNewConns(b *testing.B) { benchmarkHTTP(b, true, "conn/s") }

// BenchmarkHTTPKeepAlive is HTTP requests per second over long-lived connections.
func BenchmarkHTTPKeepAlive(b *testing.B) { benchmarkHTTP(b, false, "req/s") }

func benchmarkHTTP(b *testing.B, closeConns bool, unit string) {
	tp := newTopology(b)
	tp.startNginx(b)
	vs := []variant{nftables, shardlb, forward}
	runs := measureHTTP(b, tp, vs, closeConns)
	field := func(name string, f func(httpRun) float64) []float64 {
		out := make([]float64, rounds)
		for r, run := range runs[name] {
			out[r] = f(run)
		}
		return out
	}
	rate := func(r httpRun) float64 { return r.rate }
	cpu := func(r httpRun) float64 { return float64(r.cpuPerReq.Nanoseconds()) / 1e3 }
	for _, name := range []string{nftables.name, shardlb.name, forward.name} {
		b.Run(name, func(b *testing.B) {
			for range b.N {
			}
			b.Logf("%s per round: %s; CPU us per request: %s", unit, formatRounds(field(name, rate)), formatRounds(field(name, cpu)))
			b.ReportMetric(median(field(name, rate)), unit)
			b.ReportMetric(median(paired(field(name, rate), field(nftables.name, rate))), "x-paired")
			b.ReportMetric(median(field(name, cpu)), "us-cpu/req")
			// An op is one request.
			b.ReportMetric(1e9/median(field(name, rate)), "ns/op")
		})
	}
}
