package ipam

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

var benchPort = []PortKey{{Protocol: 6, Port: 80}}

// cpuClock measures the process's CPU time, reported next to ns/op as cpu-ns/op: the
// build machines run several jobs at once, and wall-clock ns/op then counts the time
// spent waiting for a core, which CPU time does not.
type cpuClock struct{ start time.Duration }

func cpuNow() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func startCPU() cpuClock { return cpuClock{cpuNow()} }

func (c cpuClock) report(b *testing.B) {
	b.ReportMetric(float64(cpuNow()-c.start)/float64(b.N), "cpu-ns/op")
}

func benchNames(n int) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("ns/svc-%d", i)
	}
	return names
}

// filled is an allocator holding n services, every one on 80/tcp so that shared mode
// also needs one address per service.
func filled(b *testing.B, spec string, fam Family, unique bool, names []string) *Allocator {
	b.Helper()
	a, err := New(mustPools(b, spec), unique)
	if err != nil {
		b.Fatal(err)
	}
	for _, s := range names {
		if _, err := a.Allocate(Request{Service: s, Family: fam, Ports: benchPort}); err != nil {
			b.Fatal(err)
		}
	}
	return a
}

// BenchmarkAllocateRelease measures one Release plus one Allocate of a random service
// while n others stay allocated; the freed address is the lowest free one, so Allocate
// descends the bitmap to it. The words read per operation do not grow from 1k to 100k
// (TestWalksStayLogarithmic); what time does grow is cache misses on the service map
// and the address slots, which the baseline, the same churn on a plain map of n
// entries, shares.
func BenchmarkAllocateRelease(b *testing.B) {
	b.Run("baseline", func(b *testing.B) {
		names := benchNames(100_000)
		m := make(map[string]netip.Addr, len(names))
		base := netip.MustParseAddr("10.0.0.1")
		for _, s := range names {
			m[s] = base
		}
		rng := rand.New(rand.NewPCG(1, 1))
		b.ReportAllocs()
		cpu := startCPU()
		for b.Loop() {
			s := names[rng.IntN(len(names))]
			ip := m[s]
			delete(m, s)
			m[s] = ip
		}
		cpu.report(b)
	})
	cases := []struct {
		name   string
		spec   string
		fam    Family
		unique bool
		n      int
	}{
		{"unique-v4-1k", "p=10.0.0.0/14", IPv4, true, 1_000},
		{"unique-v4-10k", "p=10.0.0.0/14", IPv4, true, 10_000},
		{"unique-v4-100k", "p=10.0.0.0/14", IPv4, true, 100_000},
		{"shared-v4-1k", "p=10.0.0.0/14", IPv4, false, 1_000},
		{"shared-v4-10k", "p=10.0.0.0/14", IPv4, false, 10_000},
		{"shared-v4-100k", "p=10.0.0.0/14", IPv4, false, 100_000},
		{"unique-v6-slash64-100k", "p=fd00::/64", IPv6, true, 100_000},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			names := benchNames(tc.n)
			a := filled(b, tc.spec, tc.fam, tc.unique, names)
			rng := rand.New(rand.NewPCG(1, 1))
			b.ReportAllocs()
			cpu := startCPU()
			for b.Loop() {
				s := names[rng.IntN(len(names))]
				a.Release(s)
				if _, err := a.Allocate(Request{Service: s, Family: tc.fam, Ports: benchPort}); err != nil {
					b.Fatal(err)
				}
			}
			cpu.report(b)
			if got := a.Pools()[0].Used; got != tc.n {
				b.Fatalf("%d addresses used after the churn, want %d", got, tc.n)
			}
		})
	}
}

// BenchmarkSharedPacking measures Allocate plus Release in shared mode when the new
// service shares an address instead of taking a free one: 100k addresses carry 80/tcp,
// the lowest 50k also 443/tcp, and a service on 443/tcp must find the lowest address
// without it. The baseline is one insert and one delete on a map of 100k entries.
func BenchmarkSharedPacking(b *testing.B) {
	names := benchNames(100_000)
	b.Run("baseline", func(b *testing.B) {
		m := make(map[string]netip.Addr, len(names)+1)
		for _, s := range names {
			m[s] = netip.Addr{}
		}
		b.ReportAllocs()
		cpu := startCPU()
		for b.Loop() {
			m["ns/tls"] = netip.Addr{}
			delete(m, "ns/tls")
		}
		cpu.report(b)
	})
	b.Run("shared-v4-100k", func(b *testing.B) {
		a := filled(b, "p=10.0.0.0/14", IPv4, false, names)
		tls := []PortKey{{Protocol: 6, Port: 443}}
		for i := range 50_000 {
			if _, err := a.Allocate(Request{Service: fmt.Sprintf("ns/tls-%d", i), Family: IPv4, Ports: tls}); err != nil {
				b.Fatal(err)
			}
		}
		req := Request{Service: "ns/tls", Family: IPv4, Ports: tls}
		want := netip.MustParseAddr("10.0.195.81") // the 50,001st address from 10.0.0.1
		b.ReportAllocs()
		cpu := startCPU()
		for b.Loop() {
			al, err := a.Allocate(req)
			if err != nil || al.IP != want {
				b.Fatalf("Allocate = %v, %v; want %s", al, err, want)
			}
			a.Release(req.Service)
		}
		cpu.report(b)
	})
}

// BenchmarkRestore measures restoring 100k recorded allocations, in a shuffled order as
// informers deliver them, into a fresh allocator. The baseline fills a map with the
// same records.
func BenchmarkRestore(b *testing.B) {
	names := benchNames(100_000)
	records := func(b *testing.B, spec string, fam Family, unique bool) []Allocation {
		a := filled(b, spec, fam, unique, names)
		var recs []Allocation
		for _, s := range names {
			recs = append(recs, a.Lookup(s)...)
		}
		rand.New(rand.NewPCG(2, 2)).Shuffle(len(recs), func(i, j int) { recs[i], recs[j] = recs[j], recs[i] })
		return recs
	}
	b.Run("baseline", func(b *testing.B) {
		recs := records(b, "p=10.0.0.0/14", IPv4, true)
		b.ReportAllocs()
		cpu := startCPU()
		for b.Loop() {
			m := make(map[string]netip.Addr)
			for _, r := range recs {
				m[r.Service] = r.IP
			}
		}
		cpu.report(b)
	})
	cases := []struct {
		name   string
		spec   string
		fam    Family
		unique bool
	}{
		{"unique-v4-100k", "p=10.0.0.0/14", IPv4, true},
		{"shared-v4-100k", "p=10.0.0.0/14", IPv4, false},
		{"unique-v6-100k", "p=fd00::/64", IPv6, true},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			recs := records(b, tc.spec, tc.fam, tc.unique)
			pools := mustPools(b, tc.spec)
			b.ReportAllocs()
			cpu := startCPU()
			for b.Loop() {
				a, err := New(pools, tc.unique)
				if err != nil {
					b.Fatal(err)
				}
				if err := a.Restore(recs); err != nil {
					b.Fatal(err)
				}
			}
			cpu.report(b)
		})
	}
}
