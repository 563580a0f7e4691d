package datapath

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/shardlb/shardlb/internal/testenv"
	"github.com/shardlb/shardlb/shard"
)

// repeats is how many times one BPF_PROG_TEST_RUN call runs a packet. The kernel times
// the whole call with one clock read pair (about 60 ns here), so single runs would
// mostly measure the clock; 64 keeps that under 1 ns a packet and stays within what a
// packet's TTL (255) and a new-flow chain (below) allow.
const repeats = 64

// benchPackets runs in, repeats at a time, until b.N packets ran, and reports the
// kernel's own time per packet (ns/pkt) in place of ns/op, which would count the
// syscalls and the Go side too. before runs ahead of every call, untimed.
func benchPackets(b *testing.B, h *harness, prog *ebpf.Program, in func(call int) []byte, before func(), wantAction uint32) {
	b.Helper()
	var total float64
	var packets int
	h.inNS(func() {
		for call := 0; packets < b.N; call++ {
			if before != nil {
				before()
			}
			ret, per, err := prog.Benchmark(in(call), repeats, nil)
			if err != nil {
				b.Fatalf("test run: %v", err)
			}
			if ret != wantAction {
				b.Fatalf("action %d, want %d", ret, wantAction)
			}
			total += float64(per.Nanoseconds()) * repeats
			packets += repeats
		}
	})
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(total/float64(packets), "ns/pkt")
}

// BenchmarkTestRun measures the program per packet against a trivial program of the
// same hook. Every repeat of a call must take the path it is named after, although the
// kernel runs all of them on one buffer that the first repeat already rewrote: the
// services therefore send the VIP to itself (the rewrite writes what it reads, at full
// cost), and new flows are chained (see new-flow). Route lookups succeed through a
// veth with static neighbours, so translated packets are redirected as in production.
// Established and return-path packets reuse their conntrack entry's cached next hop, as
// all but one packet per 64 jiffies of a busy flow do; every new-flow packet looks its
// route up.
func BenchmarkTestRun(b *testing.B) {
	node := netip.MustParseAddr("10.2.0.1")
	h := newHarness(b, Config{NodeIPv4: node, SNATPortMin: 1024, SNATPortMax: 65535, ConntrackSize: 1 << 16})
	h.nn.Run(b, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	testenv.Veth(b, h.nn, "d0", "10.2.0.1/16", testenv.NewNetNS(b, "dppeer"), "p0", "")
	h.nn.Run(b, "ip", "route", "add", "192.0.2.0/24", "dev", "d0")
	h.nn.Run(b, "ip", "route", "add", "10.1.0.0/16", "dev", "d0")
	for _, a := range []string{"192.0.2.20", "10.1.0.2"} {
		h.nn.Run(b, "ip", "neigh", "add", a, "lladdr", "02:00:00:00:00:aa", "dev", "d0", "nud", "permanent")
	}

	vip := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.20"), vipPort)
	client := netip.AddrPortFrom(netip.MustParseAddr("10.1.0.2"), cliPort)
	self := []shard.Endpoint{{Addr: vip.Addr(), Port: vip.Port()}}
	h.set(
		shard.Frontend{Service: "ns/bench", VIP: vip.Addr(), Port: vipPort, Protocol: shard.TCP, Endpoints: self},
		shard.Frontend{Service: "ns/bench-new", VIP: vip.Addr(), Port: vipPort, Protocol: shard.UDP, Mode: shard.ModeOneArm, Endpoints: self},
	)
	var base baselineObjects
	if err := loadBaselineObjects(&base, nil); err != nil {
		b.Fatalf("load baseline: %v", err)
	}
	b.Cleanup(func() { base.Close() })

	fwd := pkt{src: client, dst: vip, proto: shard.TCP, ttl: 255, tcpFlags: 0x10}.bytes()
	reply := pkt{src: vip, dst: client, proto: shard.TCP, ttl: 255, tcpFlags: 0x10}.bytes()
	unknown := pkt{src: client, dst: netip.AddrPortFrom(netip.MustParseAddr("192.0.2.99"), vipPort), proto: shard.TCP, ttl: 255}.bytes()
	h.lb(fwd) // establishes the flow; its reply entry is what return-path hits
	same := func(p []byte) func(int) []byte { return func(int) []byte { return p } }

	b.Run("baseline", func(b *testing.B) { benchPackets(b, h, base.Baseline, same(fwd), nil, actOK) })
	b.Run("established", func(b *testing.B) {
		before := h.serviceStats(b, 0)
		benchPackets(b, h, h.d.objs.LbIngress, same(fwd), nil, actRedirect)
		if after := h.serviceStats(b, 0); after.NewFlows != before.NewFlows {
			b.Fatalf("%d new flows during the established benchmark", after.NewFlows-before.NewFlows)
		}
	})
	b.Run("return-path", func(b *testing.B) {
		before := h.serviceStats(b, 0)
		benchPackets(b, h, h.d.objs.LbIngress, same(reply), nil, actRedirect)
		if after := h.serviceStats(b, 0); after.ReplyPackets == before.ReplyPackets {
			b.Fatal("no reply was translated")
		}
	})
	b.Run("unknown-vip", func(b *testing.B) { benchPackets(b, h, h.d.objs.LbIngress, same(unknown), nil, actOK) })
	b.Run("new-flow", func(b *testing.B) {
		// An onearm flow from the node to the VIP-as-endpoint leaves as a flow from the
		// node on a new SNAT port to the VIP: the next repeat is a new flow again. Starts
		// are chosen (with the program's hash) so that no chain revisits a port within a
		// call, and conntrack is emptied between calls; the new-flow counter checks it.
		chains := newFlowChains(node, vip, 1024, 65535-1024+1)
		before := h.serviceStats(b, 1)
		var calls int
		benchPackets(b, h, h.d.objs.LbIngress, func(call int) []byte {
			calls++
			return pkt{src: netip.AddrPortFrom(node, chains[call%len(chains)]), dst: vip, proto: shard.UDP, ttl: 255}.bytes()
		}, func() { clearConntrack(b, h.d) }, actRedirect)
		if got, want := h.serviceStats(b, 1).NewFlows-before.NewFlows, uint64(calls*repeats); got != want {
			b.Fatalf("%d of %d packets were new flows", got, want)
		}
	})
}

// newFlowChains returns start ports whose chain of SNAT ports (port -> the port
// flow_hash gives the flow from it) has no repeat within one call's repeats.
func newFlowChains(node netip.Addr, vip netip.AddrPort, min, count uint32) []uint16 {
	var starts []uint16
	for p := uint32(2000); len(starts) < 64; p++ {
		seen := map[uint32]bool{}
		q, ok := p, true
		for range repeats + 1 {
			if seen[q] {
				ok = false
				break
			}
			seen[q] = true
			q = min + flowHash(netip.AddrPortFrom(node, uint16(q)), vip, shard.UDP)%count
		}
		if ok {
			starts = append(starts, uint16(p))
		}
	}
	return starts
}

// serviceStats returns the counters of the i-th frontend in Stats order.
func (h *harness) serviceStats(b *testing.B, i int) ServiceStats {
	st := h.d.Stats().Services
	if i >= len(st) {
		b.Fatalf("no frontend %d in %v", i, st)
	}
	return st[i]
}

// BenchmarkMapMemory reports the kernel memory of the maps sized for and filled with
// 10,000 services of 16 endpoints each (target: at most 256 MiB).
func BenchmarkMapMemory(b *testing.B) {
	const services, perService = 10000, 16
	mem, err := filledMapMemory(b, services, perService)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(float64(mem)/(1<<20), "MiB")
}

func filledMapMemory(tb testing.TB, services, perService int) (uint64, error) {
	ring := 2040 // maglev.TableSize(16) = 2039, allocated in pairs
	h := newHarness(tb, Config{
		MaxServices:   services,
		MaxEndpoints:  services * perService,
		RingSlots:     (services + 1) * ring,
		ConntrackSize: DefaultConntrackSize,
	})
	fes := make([]shard.Frontend, services)
	for i := range fes {
		eps := make([]shard.Endpoint, perService)
		for j := range eps {
			eps[j] = shard.Endpoint{Addr: netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), byte(j + 1)}), Port: 8080}
		}
		fes[i] = shard.Frontend{
			Service: fmt.Sprintf("ns/svc%d", i), VIP: netip.AddrFrom4([4]byte{192, 168, byte(i >> 8), byte(i)}),
			Port: 80, Protocol: shard.TCP, Endpoints: eps,
		}
	}
	if err := h.d.SetServices(fes); err != nil {
		return 0, err
	}
	return h.d.MapMemory()
}
