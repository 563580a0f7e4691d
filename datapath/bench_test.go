package datapath

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/shardlb/shardlb/shard"
	"golang.org/x/sys/unix"
)

// repeats is how many times one BPF_PROG_TEST_RUN call runs a packet. The kernel times
// the whole call with one clock read pair (about 60 ns here), so single runs would
// mostly measure the clock; 64 keeps that under 1 ns a packet and stays within what a
// packet's TTL (255) and a new-flow chain (below) allow.
const repeats = 64

// benchCase is one row of BenchmarkTestRun: a program, the packet of each call, an
// untimed step before each call, the action every repeat must return, and a check of
// the counters once the case has run.
type benchCase struct {
	name   string
	prog   *ebpf.Program
	in     func(call int) []byte
	before func()
	action uint32
	check  func(b *testing.B, calls int)
	// repeats is the call's repeat count; 0 means repeats (the const).
	repeats int
}

// Rounds of BenchmarkTestRun: every case runs callsPerRound calls per round, the cases
// take turns (in a rotating order) and each row reports its median round, so that a
// slow phase of the machine (this guest's speed varies by CPU and by the minute) falls
// on every row alike instead of on whichever ran then.
const (
	benchRounds   = 15
	callsPerRound = 150
)

// runRounds runs the cases in turns on one CPU and returns each case's ns per packet of
// every round, as the kernel timed them (BPF_PROG_TEST_RUN's own time, not the syscalls
// and the Go side).
func runRounds(b *testing.B, h *harness, cases []benchCase) map[string][]float64 {
	b.Helper()
	perRound := map[string][]float64{}
	calls := make([]int, len(cases))
	h.inNS(func() {
		// inNS keeps this goroutine on its thread; the thread stays on one CPU.
		var set, old unix.CPUSet
		if err := unix.SchedGetaffinity(0, &old); err != nil {
			b.Fatalf("get affinity: %v", err)
		}
		set.Set(benchCPU(&old))
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			b.Fatalf("pin to a CPU: %v", err)
		}
		defer unix.SchedSetaffinity(0, &old) //nolint:errcheck // restored best effort, the thread is unlocked next
		for r := range benchRounds {
			for i := range cases {
				c := &cases[(i+r)%len(cases)]
				var total time.Duration
				for range callsPerRound {
					if c.before != nil {
						c.before()
					}
					n := c.repeats
					if n == 0 {
						n = repeats
					}
					ret, per, err := c.prog.Benchmark(c.in(calls[(i+r)%len(cases)]), n, nil)
					if err != nil {
						b.Fatalf("%s: test run: %v", c.name, err)
					}
					if ret != c.action {
						b.Fatalf("%s: call %d: action %d, want %d (drops %v)", c.name, calls[(i+r)%len(cases)], ret, c.action, h.d.Stats().Drops)
					}
					calls[(i+r)%len(cases)]++
					total += per
				}
				perRound[c.name] = append(perRound[c.name], float64(total.Nanoseconds())/callsPerRound)
			}
		}
	})
	for i, c := range cases {
		if c.check != nil {
			c.check(b, calls[i])
		}
	}
	return perRound
}

// benchCPU is the CPU the rounds run on: the last one allowed, the same for every case.
func benchCPU(allowed *unix.CPUSet) int {
	cpu := 0
	for i := range 1024 {
		if allowed.IsSet(i) {
			cpu = i
		}
	}
	return cpu
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// BenchmarkTestRun measures the program per packet against a trivial program of the
// same hook. Every repeat of a call must take the path it is named after, although the
// kernel runs all of them on one buffer that the first repeat already rewrote: the
// services therefore send the VIP to itself (the rewrite writes what it reads, at full
// cost), and new flows are chained (see new-flow). Route lookups succeed through a
// veth with static neighbours, so translated packets are redirected as in production.
// Established and return-path packets reuse their conntrack entry's cached next hop, as
// all but one packet per 64 jiffies of a busy flow do; every new-flow packet looks its
// route up. The -ranges rows do the same through frontends with source ranges (16
// prefixes, the client's among them): a new flow pays the trie lookup, an established
// one only compares its range generation. The -compat rows run the compat variant of
// the program (see the package doc, "Kernels") on the same maps, and report their ratio
// to the kfunc variant's row of the same rounds (x-kfunc). The rows are measured in
// alternating rounds (runRounds); each reports its median round, and its fastest and
// slowest round as min and max.
func BenchmarkTestRun(b *testing.B) {
	node := netip.MustParseAddr("10.2.0.1")
	h := newHarness(b, Config{NodeIPv4: node, SNATPortMin: 1024, SNATPortMax: 65535, ConntrackSize: 1 << 16})
	mac := [6]byte{0x02, 0, 0, 0, 0, 0xaa}
	h.link("10.2.0.1/16", []string{"192.0.2.0/24", "10.1.0.0/16"},
		map[netip.Addr][6]byte{netip.MustParseAddr("192.0.2.20"): mac, netip.MustParseAddr("10.1.0.2"): mac})

	vip := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.20"), vipPort)
	client := netip.AddrPortFrom(netip.MustParseAddr("10.1.0.2"), cliPort)
	self := []shard.Endpoint{{Addr: vip.Addr(), Port: vip.Port()}}
	// The same services on port 81, with source ranges holding the client (10.1/16)
	// and the node (10.2/16), which new flows come from.
	vipR := netip.AddrPortFrom(vip.Addr(), vipPort+1)
	selfR := []shard.Endpoint{{Addr: vipR.Addr(), Port: vipR.Port()}}
	var ranges []netip.Prefix
	for i := range 16 {
		ranges = append(ranges, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i + 1), 0, 0}), 16))
	}
	h.set(
		shard.Frontend{Service: "ns/bench", VIP: vip.Addr(), Port: vipPort, Protocol: shard.TCP, Endpoints: self},
		shard.Frontend{Service: "ns/bench-new", VIP: vip.Addr(), Port: vipPort, Protocol: shard.UDP, Mode: shard.ModeOneArm, Endpoints: self},
		shard.Frontend{Service: "ns/bench-ranges", VIP: vip.Addr(), Port: vipR.Port(), Protocol: shard.TCP, Endpoints: selfR, SourceRanges: ranges},
		shard.Frontend{Service: "ns/bench-new-ranges", VIP: vip.Addr(), Port: vipR.Port(), Protocol: shard.UDP, Mode: shard.ModeOneArm, Endpoints: selfR, SourceRanges: ranges},
	)
	var base baselineObjects
	if err := loadBaselineObjects(&base, nil); err != nil {
		b.Fatalf("load baseline: %v", err)
	}
	b.Cleanup(func() { base.Close() })

	fwd := pkt{src: client, dst: vip, proto: shard.TCP, ttl: 255, tcpFlags: 0x10}.bytes()
	reply := pkt{src: vip, dst: client, proto: shard.TCP, ttl: 255, tcpFlags: 0x10}.bytes()
	unknown := pkt{src: client, dst: netip.AddrPortFrom(netip.MustParseAddr("192.0.2.99"), vipPort), proto: shard.TCP, ttl: 255}.bytes()
	fwdR := pkt{src: client, dst: vipR, proto: shard.TCP, ttl: 255, tcpFlags: 0x10}.bytes()
	h.lb(fwd) // establishes the flow; its reply entry is what return-path hits
	h.lb(fwdR)
	same := func(p []byte) func(int) []byte { return func(int) []byte { return p } }
	// An onearm flow from the node to the VIP-as-endpoint leaves as a flow from the node
	// on a new SNAT port to the VIP: the next repeat is a new flow again. Starts are
	// chosen (with the program's hash) so that no chain revisits a port within a call,
	// and the UDP conntrack map is emptied before each call; the new-flow counter checks
	// it.
	compat := sharedProgram(b, h.d, variantCompat)
	// The compat rows' calls, which the kfunc rows' counter checks add.
	compatNew, compatReturn := 0, 0
	chains := newFlowChains(node, vip, 1024, 65535-1024+1)
	chainsR := newFlowChains(node, vipR, 1024, 65535-1024+1)
	before := h.d.Stats().Services
	// Frontends in Stats order: TCP and UDP on port 80, then on 81.
	noRangeDrops := func(b *testing.B, i int) {
		if got := h.serviceStats(b, i).SourceRangeDrops - before[i].SourceRangeDrops; got != 0 {
			b.Fatalf("%d packets of %s dropped for their source", got, before[i].Service)
		}
	}

	cases := []benchCase{
		{name: "baseline", prog: base.Baseline, in: same(fwd), action: actOK},
		{name: "established", prog: h.d.objs.LbIngress, in: same(fwd), action: actRedirect,
			check: func(b *testing.B, _ int) {
				if got := h.serviceStats(b, 0).NewFlows - before[0].NewFlows; got != 0 {
					b.Fatalf("%d new flows during the established benchmark", got)
				}
			}},
		{name: "return-path", prog: h.d.objs.LbIngress, in: same(reply), action: actRedirect,
			check: func(b *testing.B, calls int) {
				if got := h.serviceStats(b, 0).ReplyPackets - before[0].ReplyPackets; got != uint64((calls+compatReturn)*repeats) {
					b.Fatalf("%d of %d return-path packets were translated", got, (calls+compatReturn)*repeats)
				}
			}},
		{name: "unknown-vip", prog: h.d.objs.LbIngress, in: same(unknown), action: actPass},
		{name: "new-flow", prog: h.d.objs.LbIngress, action: actRedirect,
			in: func(call int) []byte {
				return pkt{src: netip.AddrPortFrom(node, chains[call%len(chains)]), dst: vip, proto: shard.UDP, ttl: 255}.bytes()
			},
			// Only the UDP map: the other cases' TCP flow stays.
			before: func() { clearMap[lbFlow4](b, h.d.objs.Conntrack4Udp) },
			check: func(b *testing.B, calls int) {
				if got := h.serviceStats(b, 1).NewFlows - before[1].NewFlows; got != uint64((calls+compatNew)*repeats) {
					b.Fatalf("%d of %d packets were new flows", got, (calls+compatNew)*repeats)
				}
			}},
		{name: "established-compat", prog: compat, in: same(fwd), action: actRedirect},
		{name: "return-path-compat", prog: compat, in: same(reply), action: actRedirect, before: func() { compatReturn++ }},
		{name: "new-flow-compat", prog: compat, action: actRedirect,
			in: func(call int) []byte {
				return pkt{src: netip.AddrPortFrom(node, chains[call%len(chains)]), dst: vip, proto: shard.UDP, ttl: 255}.bytes()
			},
			before: func() {
				compatNew++
				clearMap[lbFlow4](b, h.d.objs.Conntrack4Udp)
			}},
		{name: "established-ranges", prog: h.d.objs.LbIngress, in: same(fwdR), action: actRedirect,
			check: func(b *testing.B, _ int) {
				if got := h.serviceStats(b, 2).NewFlows - before[2].NewFlows; got != 0 {
					b.Fatalf("%d new flows during the established benchmark", got)
				}
				noRangeDrops(b, 2)
			}},
		{name: "new-flow-ranges", prog: h.d.objs.LbIngress, action: actRedirect,
			in: func(call int) []byte {
				return pkt{src: netip.AddrPortFrom(node, chainsR[call%len(chainsR)]), dst: vipR, proto: shard.UDP, ttl: 255}.bytes()
			},
			before: func() { clearMap[lbFlow4](b, h.d.objs.Conntrack4Udp) },
			check: func(b *testing.B, calls int) {
				if got := h.serviceStats(b, 3).NewFlows - before[3].NewFlows; got != uint64(calls*repeats) {
					b.Fatalf("%d of %d packets were new flows", got, calls*repeats)
				}
				noRangeDrops(b, 3)
			}},
	}
	rounds := runRounds(b, h, cases)
	for _, c := range cases {
		ns := rounds[c.name]
		b.Run(c.name, func(b *testing.B) {
			// The rounds above are the measurement; this only reports them.
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(median(ns), "ns/pkt")
			b.ReportMetric(slices.Min(ns), "ns/pkt-min")
			b.ReportMetric(slices.Max(ns), "ns/pkt-max")
			if kfunc, ok := strings.CutSuffix(c.name, "-compat"); ok {
				b.ReportMetric(median(ns)/median(rounds[kfunc]), "x-kfunc")
			}
		})
	}
}

// sharedProgram loads variant v of the program on d's maps, so that rows of both
// variants measure the same state in the same rounds.
func sharedProgram(tb testing.TB, d *Datapath, v variant) *ebpf.Program {
	tb.Helper()
	spec, err := loadVariant(v)
	if err != nil {
		tb.Fatal(err)
	}
	if err := prepareSpec(spec, v, d.cfg); err != nil {
		tb.Fatal(err)
	}
	o := d.objs
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		lbMapConntrack4Tcp: o.Conntrack4Tcp, lbMapConntrack4Udp: o.Conntrack4Udp, lbMapConntrack6: o.Conntrack6,
		lbMapDrops: o.Drops, lbMapEndpointNhs: o.EndpointNhs, lbMapEndpoints: o.Endpoints, lbMapNewEntry: o.NewEntry,
		lbMapRingSlots: o.RingSlots, lbMapServiceStats: o.ServiceStats, lbMapServices: o.Services,
		lbMapSnatTimeWaitReuses: o.SnatTimeWaitReuses, lbMapSourceRanges4: o.SourceRanges4,
		lbMapSourceRanges6: o.SourceRanges6, lbMapVips: o.Vips,
	}})
	if err != nil {
		tb.Fatalf("load the %s variant: %v", v, err)
	}
	prog := coll.DetachProgram(lbProgLbIngress)
	coll.Close()
	tb.Cleanup(func() { prog.Close() })
	return prog
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

// BenchmarkDSRTestRun measures dsr's packets on both nodes beside the other modes'.
// An encapsulated packet cannot be run again as it was (its second run would see the
// outer header), so every row here runs each packet once per call (repeat 1) on a fresh
// copy, and its ns/pkt holds the kernel's clock read pair around the run (about 60 ns
// here), as the baseline's does: ns/pkt-net is a row's median less the baseline's. Rows:
// an established TCP flow in default and in onearm mode (through the same code as
// BenchmarkTestRun's established row), a new onearm flow; on the load-balancing node a
// dsr flow whose endpoint is on another node, established (its CT_ENCAP entry found,
// the outer header added, the cached next hop) and new; on the endpoint's node an
// encapsulated packet of an established flow (outer header stripped, translated to the
// endpoint) and of a new flow, and the endpoint's reply translated back.
func BenchmarkDSRTestRun(b *testing.B) {
	node := netip.MustParseAddr("10.2.0.1")
	epNode := netip.MustParseAddr("10.2.0.9")
	// The whole port range for SNAT: the onearm row's new flows (a few thousand) all
	// stay in conntrack, and a half-full range of the default size leaves new flows
	// without a free port among the 16 tried.
	h := newHarness(b, Config{NodeIPv4: node, ConntrackSize: 1 << 16, SNATPortMin: 1024, SNATPortMax: 65535})
	mac := [6]byte{0x02, 0, 0, 0, 0, 0xaa}
	h.link("10.2.0.1/16", []string{"192.0.2.0/24", "10.1.0.0/16", "10.3.0.0/16"},
		map[netip.Addr][6]byte{netip.MustParseAddr("10.1.0.2"): mac, netip.MustParseAddr("10.3.0.2"): mac, epNode: mac})
	vip := netip.MustParseAddr("192.0.2.20")
	client := netip.MustParseAddr("10.1.0.2")
	pod := netip.AddrPortFrom(netip.MustParseAddr("10.3.0.2"), 8080)
	fe := func(port uint16, mode shard.Mode, proto shard.Protocol, ep shard.Endpoint) shard.Frontend {
		return shard.Frontend{Service: fmt.Sprintf("ns/p%d", port), VIP: vip, Port: port, Protocol: proto, Mode: mode, Endpoints: []shard.Endpoint{ep}}
	}
	h.set(
		fe(80, shard.ModeDefault, shard.TCP, shard.Endpoint{Addr: pod.Addr(), Port: pod.Port()}),
		fe(81, shard.ModeOneArm, shard.TCP, shard.Endpoint{Addr: pod.Addr(), Port: pod.Port()}),
		fe(82, shard.ModeOneArm, shard.UDP, shard.Endpoint{Addr: pod.Addr(), Port: pod.Port()}),
		fe(83, shard.ModeDSR, shard.TCP, shard.Endpoint{Addr: pod.Addr(), Port: pod.Port(), Node: epNode}),
		fe(84, shard.ModeDSR, shard.UDP, shard.Endpoint{Addr: pod.Addr(), Port: pod.Port(), Node: epNode}),
		fe(85, shard.ModeDSR, shard.TCP, shard.Endpoint{Addr: pod.Addr(), Port: pod.Port(), Node: node}),
		fe(86, shard.ModeDSR, shard.UDP, shard.Endpoint{Addr: pod.Addr(), Port: pod.Port(), Node: node}),
	)
	var base baselineObjects
	if err := loadBaselineObjects(&base, nil); err != nil {
		b.Fatalf("load baseline: %v", err)
	}
	b.Cleanup(func() { base.Close() })

	at := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(vip, port) }
	from := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(client, port) }
	ack := func(dst netip.AddrPort) []byte {
		return pkt{src: from(cliPort), dst: dst, proto: shard.TCP, tcpFlags: 0x10}.bytes()
	}
	inner85 := ack(at(85))
	encap85 := encapsulated(inner85, epNode, node, 0)
	reply85 := pkt{src: pod, dst: from(cliPort), proto: shard.TCP, tcpFlags: 0x10}.bytes()
	for _, p := range [][]byte{ack(at(80)), ack(at(81)), ack(at(83)), encap85} {
		h.lb(p) // establishes the flows
	}
	same := func(p []byte) func(int) []byte { return func(int) []byte { return p } }
	// New flows: a client port of its own per call (the conntrack map holds them all).
	newUDP := func(port uint16, wrap bool) func(int) []byte {
		return func(call int) []byte {
			p := pkt{src: from(uint16(1024 + call)), dst: at(port), proto: shard.UDP}.bytes()
			if wrap {
				return encapsulated(p, epNode, node, 0)
			}
			return p
		}
	}
	before := h.d.Stats().Services
	newFlows := func(i int) func(b *testing.B, calls int) {
		return func(b *testing.B, calls int) {
			if got := h.serviceStats(b, i).NewFlows - before[i].NewFlows; got != uint64(calls) {
				b.Fatalf("%s: %d of %d packets were new flows", before[i].Service, got, calls)
			}
		}
	}
	cases := []benchCase{
		{name: "baseline-one-call", prog: base.Baseline, in: same(ack(at(80))), action: actOK},
		{name: "default-established", prog: h.d.objs.LbIngress, in: same(ack(at(80))), action: actRedirect},
		{name: "onearm-established", prog: h.d.objs.LbIngress, in: same(ack(at(81))), action: actRedirect},
		{name: "onearm-new-flow", prog: h.d.objs.LbIngress, in: newUDP(82, false), action: actRedirect, check: newFlows(2)},
		{name: "dsr-lb-established", prog: h.d.objs.LbIngress, in: same(ack(at(83))), action: actRedirect},
		{name: "dsr-lb-new-flow", prog: h.d.objs.LbIngress, in: newUDP(84, false), action: actRedirect, check: newFlows(4)},
		{name: "dsr-endpoint-established", prog: h.d.objs.LbIngress, in: same(encap85), action: actRedirect},
		{name: "dsr-endpoint-new-flow", prog: h.d.objs.LbIngress, in: newUDP(86, true), action: actRedirect, check: newFlows(6)},
		{name: "dsr-endpoint-reply", prog: h.d.objs.LbIngress, in: same(reply85), action: actRedirect},
	}
	for i := range cases {
		cases[i].repeats = 1
	}
	rounds := runRounds(b, h, cases)
	baseline := median(rounds["baseline-one-call"])
	for _, c := range cases {
		ns := rounds[c.name]
		b.Run(c.name, func(b *testing.B) {
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(median(ns), "ns/pkt")
			b.ReportMetric(median(ns)-baseline, "ns/pkt-net")
		})
	}
}
