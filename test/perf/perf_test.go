package perf

import (
	"testing"
	"time"
)

// The harness itself: the sender's frames cross the nftables DNAT to the backend, all
// of them, and only because of the DNAT.
func TestFloodReachesTheBackendThroughNftablesDNAT(t *testing.T) {
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
		t.Fatalf("without DNAT rules %d packets to the VIP reached the backend, want 0", got)
	}
	remove := installNftables(t, tp, frontends())
	res, got := send(nftables)
	remove()
	if res.sent != count || got != count {
		t.Fatalf("through nftables DNAT: sent %d, backend received %d, want %d", res.sent, got, count)
	}
	if res.cpu <= 0 {
		t.Fatalf("flood of %d packets measured no CPU time", count)
	}
	if _, got := send(direct); got != count {
		t.Fatalf("direct: backend received %d, want %d", got, count)
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
	vs := []variant{direct, nftables, forward}
	if shardlbVariant != nil {
		vs = append(vs, *shardlbVariant)
	}
	c := measureFlood(b, tp, vs)
	for _, name := range []string{nftables.name, "shardlb", forward.name} {
		b.Run(name, func(b *testing.B) {
			if _, ok := c.total[name]; !ok {
				b.Skip("the eBPF datapath is not available to this package yet")
			}
			for range b.N {
			}
			b.Logf("total ns/pkt per round: %s (direct: %s)", formatRounds(c.total[name]), formatRounds(c.total[direct.name]))
			b.Logf("/proc/stat cross-check, LB ns/pkt per round (includes other load): %s", formatRounds(c.lbCost(name, c.stat)))
			b.ReportMetric(median(c.lbCost(name, c.total)), "lb-ns/pkt")
			b.ReportMetric(median(c.mpps[name]), "rx-Mpps")
			// An op is one packet: the whole path's CPU time (sender, hops, sink).
			b.ReportMetric(median(c.total[name]), "ns/op")
		})
	}
}

// BenchmarkHTTPNewConns is HTTP requests per second with a new connection each
// (Connection: close), wrk in the client namespace, nginx in the backend namespace.
func BenchmarkHTTPNewConns(b *testing.B) { benchmarkHTTP(b, true, "conn/s") }

// BenchmarkHTTPKeepAlive is HTTP requests per second over long-lived connections.
func BenchmarkHTTPKeepAlive(b *testing.B) { benchmarkHTTP(b, false, "req/s") }

func benchmarkHTTP(b *testing.B, closeConns bool, unit string) {
	tp := newTopology(b)
	tp.startNginx(b)
	vs := []variant{nftables, forward}
	if shardlbVariant != nil {
		vs = append(vs, *shardlbVariant)
	}
	rates := measureHTTP(b, tp, vs, closeConns)
	for _, name := range []string{nftables.name, "shardlb", forward.name} {
		b.Run(name, func(b *testing.B) {
			if _, ok := rates[name]; !ok {
				b.Skip("the eBPF datapath is not available to this package yet")
			}
			for range b.N {
			}
			b.Logf("%s per round: %s", unit, formatRounds(rates[name]))
			b.ReportMetric(median(rates[name]), unit)
			// An op is one request.
			b.ReportMetric(1e9/median(rates[name]), "ns/op")
		})
	}
}
