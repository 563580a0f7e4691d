package datapath

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/shardlb/shardlb/shard"
)

// TestConntrackFill sends new flows through the program (BPF_PROG_TEST_RUN) and checks
// that the count follows the entries they create in each map, that it falls when
// entries go, and that a ConntrackCounter counts again only once its interval passed.
func TestConntrackFill(t *testing.T) {
	const size = 1 << 14
	h := newHarness(t, Config{ConntrackSize: size})
	v4, v6 := families[0], families[1]
	var fes []shard.Frontend
	for _, f := range []struct {
		fam   ipFamily
		proto shard.Protocol
	}{{v4, shard.TCP}, {v4, shard.UDP}, {v6, shard.TCP}, {v6, shard.UDP}} {
		fes = append(fes, shard.Frontend{Service: "ns/ct", VIP: f.fam.vip, Port: vipPort, Protocol: f.proto,
			Endpoints: []shard.Endpoint{{Addr: f.fam.ep, Port: epPort}}})
	}
	h.set(fes...)
	flows := func(f ipFamily, proto shard.Protocol, first, n int) {
		t.Helper()
		ins := make([][]byte, n)
		for i := range ins {
			ins[i] = pkt{src: netip.AddrPortFrom(f.client, uint16(cliPort+first+i)), dst: netip.AddrPortFrom(f.vip, vipPort), proto: proto}.bytes()
		}
		h.lbMany(ins)
	}
	count := func() map[string]int {
		t.Helper()
		fill, err := h.d.CountConntrack()
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]int{}
		for _, f := range fill {
			if f.Capacity != size {
				t.Errorf("%s: capacity %d, want %d", f.Map, f.Capacity, size)
			}
			got[f.Map] = f.Entries
		}
		return got
	}
	expect := func(what string, want map[string]int) {
		t.Helper()
		if got := count(); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s: entries %v, want %v", what, got, want)
		}
	}

	expect("no traffic yet", map[string]int{"ipv4_tcp": 0, "ipv4_udp": 0, "ipv6": 0})
	// More flows than one batch of the walk, so the walk takes several calls.
	flows(v4, shard.TCP, 0, 3000)
	flows(v4, shard.UDP, 0, 20)
	flows(v6, shard.TCP, 0, 30)
	flows(v6, shard.UDP, 0, 7)
	// Each flow has a forward and a reply entry.
	expect("after new flows", map[string]int{"ipv4_tcp": 6000, "ipv4_udp": 40, "ipv6": 74})
	flows(v4, shard.TCP, 0, 3000)
	expect("established flows add nothing", map[string]int{"ipv4_tcp": 6000, "ipv4_udp": 40, "ipv6": 74})

	// Entries go (here deleted, as the LRU evicts them or a SNAT port's new flow
	// deletes an expired one): the count falls.
	var keys []lbFlow4
	var k lbFlow4
	var v lbCtEntry
	it := h.d.objs.Conntrack4Tcp.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	n, err := h.d.objs.Conntrack4Tcp.BatchDelete(keys[:4500], nil)
	if err != nil || n != 4500 {
		t.Fatalf("delete entries: %d, %v", n, err)
	}
	expect("after entries went", map[string]int{"ipv4_tcp": 1500, "ipv4_udp": 40, "ipv6": 74})

	t.Run("a full map counts at most its capacity", func(t *testing.T) {
		flows(v4, shard.TCP, 10000, size) // twice the entries the map holds
		if got := count()["ipv4_tcp"]; got > size || got <= 1500 {
			t.Errorf("entries %d after %d new flows, want more than before and at most %d", got, size, size)
		}
	})

	t.Run("a counter counts again only when its count is older than its interval", func(t *testing.T) {
		now := time.Unix(1000, 0)
		c := NewConntrackCounter(h.d, 30*time.Second)
		c.now = func() time.Time { return now }
		udp := func() int {
			t.Helper()
			fill, err := c.Fill()
			if err != nil {
				t.Fatal(err)
			}
			i := slices.IndexFunc(fill, func(f ConntrackFill) bool { return f.Map == "ipv4_udp" })
			if i < 0 {
				t.Fatalf("no ipv4_udp in %v", fill)
			}
			return fill[i].Entries
		}
		if got := udp(); got != 40 {
			t.Fatalf("first count: %d, want 40", got)
		}
		flows(v4, shard.UDP, 100, 10)
		now = now.Add(29 * time.Second)
		if got := udp(); got != 40 {
			t.Errorf("29 s later: %d, want the cached 40", got)
		}
		now = now.Add(time.Second)
		if got := udp(); got != 60 {
			t.Errorf("30 s later: %d, want 60", got)
		}
	})

	t.Run("a closed datapath counts nothing", func(t *testing.T) {
		d, err := New(Config{ConntrackSize: 1024, MaxServices: 4, MaxEndpoints: 16}, h.d.log)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := d.CountConntrack(); err != ErrClosed {
			t.Errorf("CountConntrack after Close: %v, want ErrClosed", err)
		}
	})
}

// BenchmarkCountConntrack times CountConntrack's walk (countEntries) of one conntrack
// map of the default capacity holding a given number of entries. Its baseline walks the
// full map with Iterate (a next-key and a lookup call per entry). Entries are written
// from user space: the walk does not care who wrote them.
func BenchmarkCountConntrack(b *testing.B) {
	fill := func(b *testing.B, n int) *ebpf.Map {
		b.Helper()
		spec, err := loadLb()
		if err != nil {
			b.Fatal(err)
		}
		ms := spec.Maps[lbMapConntrack4Tcp].Copy()
		ms.MaxEntries = DefaultConntrackSize
		m, err := ebpf.NewMap(ms)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { m.Close() })
		keys := make([]lbFlow4, n)
		for i := range keys {
			keys[i] = lbFlow4{Saddr: uint32(i), Daddr: 0x0a000001, Sport: uint16(i), Dport: 80}
		}
		if _, err := m.BatchUpdate(keys, make([]lbCtEntry, n), nil); err != nil {
			b.Fatal(err)
		}
		return m
	}
	// A map written up to its capacity holds a little less: the LRU evicts before the
	// last free entries of other CPUs are used. Each walk must find what the first found.
	entries := func(b *testing.B, m *ebpf.Map) int {
		b.Helper()
		n, err := countEntries(m, make([]lbFlow4, conntrackBatch), make([]lbCtEntry, conntrackBatch))
		if err != nil {
			b.Fatal(err)
		}
		return n
	}
	b.Run(fmt.Sprintf("baseline-iterate-%d", DefaultConntrackSize), func(b *testing.B) {
		m := fill(b, DefaultConntrackSize)
		want := entries(b, m)
		for b.Loop() {
			got := 0
			var k lbFlow4
			var v lbCtEntry
			it := m.Iterate()
			for it.Next(&k, &v) {
				got++
			}
			if it.Err() != nil || got != want {
				b.Fatalf("iterated %d, %v; want %d", got, it.Err(), want)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(want), "ns/entry")
	})
	for _, n := range []int{16384, 131072, DefaultConntrackSize} {
		b.Run(fmt.Sprintf("batch-%d", n), func(b *testing.B) {
			m := fill(b, n)
			want := entries(b, m)
			vals := make([]lbCtEntry, conntrackBatch)
			for b.Loop() {
				got, err := countEntries(m, make([]lbFlow4, conntrackBatch), vals)
				if err != nil || got != want {
					b.Fatalf("counted %d, %v; want %d", got, err, want)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(want), "ns/entry")
		})
	}
}
