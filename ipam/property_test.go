package ipam

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// model is a naive allocator: it scans every address of a pool, so it is obviously
// right and only fit for small pools. The property tests hold the real one to it.
type model struct {
	unique  bool
	pools   []PoolSpec
	holders map[netip.Addr]map[string][]PortKey
	svcs    map[string]map[Family]Allocation
}

func newModel(pools []PoolSpec, unique bool) *model {
	return &model{unique: unique, pools: pools,
		holders: map[netip.Addr]map[string][]PortKey{}, svcs: map[string]map[Family]Allocation{}}
}

func overlapNaive(a, b []PortKey) bool {
	for _, x := range a {
		if slices.Contains(b, x) {
			return true
		}
	}
	return false
}

// fits says whether svc with ports may use ip as things stand.
func (m *model) fits(ip netip.Addr, ports []PortKey) bool {
	for _, hp := range m.holders[ip] {
		if m.unique || overlapNaive(hp, ports) {
			return false
		}
	}
	return true
}

func (m *model) allocate(r Request) (Allocation, error) {
	if r.Service == "" || (r.Family != IPv4 && r.Family != IPv6) {
		return Allocation{}, ErrInvalidRequest
	}
	if r.StaticIP.IsValid() && (familyOf(r.StaticIP) != r.Family || r.StaticIP.Zone() != "" || r.StaticIP.Is4In6()) {
		return Allocation{}, ErrInvalidRequest
	}
	for _, p := range r.Ports {
		if p.Port == 0 || p.Protocol == 0 {
			return Allocation{}, ErrInvalidRequest
		}
	}
	if al, ok := m.svcs[r.Service][r.Family]; ok {
		return al, nil
	}
	var ports []PortKey
	for _, p := range r.Ports {
		if !slices.Contains(ports, p) {
			ports = append(ports, p)
		}
	}
	slices.SortFunc(ports, comparePorts)

	var sel *PoolSpec
	if r.Pool != "" || !r.StaticIP.IsValid() {
		for i, p := range m.pools {
			if p.Family() == r.Family && (r.Pool == "" || r.Pool == p.Name) {
				sel = &m.pools[i]
				break
			}
		}
		if sel == nil && r.Pool == "" {
			return Allocation{}, ErrNoPool
		}
		if sel == nil {
			return Allocation{}, ErrUnknownPool
		}
	}
	if r.StaticIP.IsValid() {
		var in *PoolSpec
		for i, p := range m.pools {
			if p.Family() == r.Family && !r.StaticIP.Less(p.First) && !p.Last.Less(r.StaticIP) {
				in = &m.pools[i]
			}
		}
		if sel != nil && in != sel {
			return Allocation{}, ErrInvalidRequest
		}
		if !m.fits(r.StaticIP, ports) {
			return Allocation{}, ErrStaticIPConflict
		}
		name := ""
		if in != nil {
			name = in.Name
		}
		return m.take(r.Service, name, r.StaticIP, ports), nil
	}
	if !m.unique {
		for ip := sel.First; ; ip = ip.Next() {
			if len(m.holders[ip]) > 0 && m.fits(ip, ports) {
				return m.take(r.Service, sel.Name, ip, ports), nil
			}
			if ip == sel.Last {
				break
			}
		}
	}
	for ip := sel.First; ; ip = ip.Next() {
		if len(m.holders[ip]) == 0 {
			return m.take(r.Service, sel.Name, ip, ports), nil
		}
		if ip == sel.Last {
			break
		}
	}
	return Allocation{}, ErrPoolExhausted
}

func (m *model) take(svc, pool string, ip netip.Addr, ports []PortKey) Allocation {
	if m.holders[ip] == nil {
		m.holders[ip] = map[string][]PortKey{}
	}
	m.holders[ip][svc] = ports
	if m.svcs[svc] == nil {
		m.svcs[svc] = map[Family]Allocation{}
	}
	al := Allocation{Service: svc, Pool: pool, IP: ip, Ports: ports}
	m.svcs[svc][familyOf(ip)] = al
	return al
}

func (m *model) release(svc string) {
	for _, al := range m.svcs[svc] {
		delete(m.holders[al.IP], svc)
		if len(m.holders[al.IP]) == 0 {
			delete(m.holders, al.IP)
		}
	}
	delete(m.svcs, svc)
}

// chooser is where random operations come from: math/rand in the property tests, the
// fuzzer's bytes in FuzzAllocator.
type chooser interface{ IntN(n int) int }

type byteChooser struct{ b []byte }

func (c *byteChooser) IntN(n int) int {
	if len(c.b) == 0 {
		return 0
	}
	v := int(c.b[0])
	c.b = c.b[1:]
	return v % n
}

var (
	propServices = func() []string {
		var s []string
		for i := range 24 {
			s = append(s, fmt.Sprintf("ns/svc%d", i))
		}
		return s
	}()
	propPorts = []PortKey{{6, 80}, {6, 443}, {17, 53}, {6, 53}, {6, 8080}}
	// Static IPs inside pools, outside them, and of the odd kinds a user may write.
	propStatics = []netip.Addr{
		netip.MustParseAddr("10.0.0.3"), netip.MustParseAddr("10.0.0.14"), netip.MustParseAddr("10.0.1.12"),
		netip.MustParseAddr("10.9.0.1"), netip.MustParseAddr("fd00::2"), netip.MustParseAddr("fd00:9::1"),
		netip.MustParseAddr("::ffff:10.0.0.5"), netip.MustParseAddr("fe80::1%eth0"),
	}
	propPoolNames = []string{"", "", "a", "b", "nope"}
)

func propPools(t testing.TB) []PoolSpec {
	return mustPools(t, "a=10.0.0.0/28,b=10.0.1.10-10.0.1.13", "a=fd00::/125")
}

func randomRequest(c chooser) Request {
	r := Request{Service: propServices[c.IntN(len(propServices))]}
	switch c.IntN(8) {
	case 0:
		r.Family = IPv6
	case 1:
		r.Family = Family(c.IntN(8)) // mostly invalid
	default:
		r.Family = IPv4
	}
	r.Pool = propPoolNames[c.IntN(len(propPoolNames))]
	if c.IntN(5) == 0 {
		r.StaticIP = propStatics[c.IntN(len(propStatics))]
	}
	for range c.IntN(3) {
		r.Ports = append(r.Ports, propPorts[c.IntN(len(propPorts))])
	}
	if c.IntN(40) == 0 {
		r.Ports = append(r.Ports, PortKey{Protocol: 6})
	}
	return r
}

// step applies one random operation to both allocators and fails on any difference.
func stepBoth(t testing.TB, c chooser, a *Allocator, m *model, trace *[]string) {
	t.Helper()
	if c.IntN(4) == 0 {
		svc := propServices[c.IntN(len(propServices))]
		*trace = append(*trace, "release "+svc)
		a.Release(svc)
		m.release(svc)
		return
	}
	r := randomRequest(c)
	*trace = append(*trace, fmt.Sprintf("allocate %+v", r))
	got, err := a.Allocate(r)
	want, werr := m.allocate(r)
	switch {
	case werr != nil && !errors.Is(err, werr):
		t.Fatalf("after %v\nAllocate = %+v, %v; model says error %v", *trace, got, err, werr)
	case werr == nil && err != nil:
		t.Fatalf("after %v\nAllocate: %v; model says %+v", *trace, err, want)
	case werr == nil && (got.IP != want.IP || got.Pool != want.Pool || got.Service != want.Service || !slices.Equal(got.Ports, want.Ports)):
		t.Fatalf("after %v\nAllocate = %+v; model says %+v", *trace, got, want)
	}
}

// checkInvariants fails when an address is held twice (unique mode) or an (IP, port)
// twice (shared mode), or the pool statistics disagree with the allocations.
func checkInvariants(t testing.TB, a *Allocator, unique bool, trace []string) {
	t.Helper()
	type ipPort struct {
		ip netip.Addr
		p  PortKey
	}
	owner := map[netip.Addr]string{}
	portOwner := map[ipPort]string{}
	used := map[string]map[netip.Addr]bool{}
	services := map[string]int{}
	for _, svc := range propServices {
		for _, al := range a.Lookup(svc) {
			if o, ok := owner[al.IP]; ok && unique {
				t.Fatalf("after %v\n%s is held by %s and %s", trace, al.IP, o, svc)
			}
			owner[al.IP] = svc
			for _, p := range al.Ports {
				k := ipPort{al.IP, p}
				if o, ok := portOwner[k]; ok {
					t.Fatalf("after %v\n%s %v is held by %s and %s", trace, al.IP, p, o, svc)
				}
				portOwner[k] = svc
			}
			key := al.Pool + "/" + familyOf(al.IP).String()
			if used[key] == nil {
				used[key] = map[netip.Addr]bool{}
			}
			used[key][al.IP] = true
			services[key]++
		}
	}
	for _, ps := range a.Pools() {
		key := ps.Name + "/" + ps.Family.String()
		if ps.Used != len(used[key]) || ps.Services != services[key] {
			t.Fatalf("after %v\nPools() says %+v, allocations say %d addresses and %d services",
				trace, ps, len(used[key]), services[key])
		}
	}
}

func snapshot(a *Allocator) [][]Allocation {
	var out [][]Allocation
	for _, svc := range propServices {
		out = append(out, a.Lookup(svc))
	}
	return out
}

func sameAllocations(x, y [][]Allocation) bool {
	return slices.EqualFunc(x, y, func(a, b []Allocation) bool {
		return slices.EqualFunc(a, b, func(p, q Allocation) bool {
			return p.Service == q.Service && p.Pool == q.Pool && p.IP == q.IP && slices.Equal(p.Ports, q.Ports)
		})
	})
}

// checkRestore restores everything a holds, in a random order, into a fresh allocator
// and into a itself, and fails unless both then hold exactly what a held.
func checkRestore(t testing.TB, c chooser, a *Allocator, pools []PoolSpec, unique bool, trace []string) *Allocator {
	t.Helper()
	before := snapshot(a)
	var recs []Allocation
	for _, s := range before {
		recs = append(recs, s...)
	}
	for i := len(recs) - 1; i > 0; i-- {
		j := c.IntN(i + 1)
		recs[i], recs[j] = recs[j], recs[i]
	}
	fresh, err := New(pools, unique)
	if err != nil {
		t.Fatal(err)
	}
	if err := fresh.Restore(recs); err != nil {
		t.Fatalf("after %v\nRestore into a fresh allocator: %v", trace, err)
	}
	if err := a.Restore(recs); err != nil {
		t.Fatalf("after %v\nRestore into the same allocator: %v", trace, err)
	}
	if got := snapshot(fresh); !sameAllocations(got, before) {
		t.Fatalf("after %v\nrestored %v\nwant     %v", trace, got, before)
	}
	if got := snapshot(a); !sameAllocations(got, before) {
		t.Fatalf("after %v\nrestoring into itself changed %v\nto %v", trace, before, got)
	}
	if !slices.Equal(fresh.Pools(), a.Pools()) {
		t.Fatalf("after %v\nrestored pools %+v, want %+v", trace, fresh.Pools(), a.Pools())
	}
	return fresh
}

func TestRandomSequencesMatchTheModel(t *testing.T) {
	for _, unique := range []bool{true, false} {
		name := "in shared mode no (IP, port) is held twice, Restore reproduces every allocation"
		if unique {
			name = "in unique mode no IP is held twice, Restore reproduces every allocation"
		}
		t.Run(name, func(t *testing.T) {
			pools := propPools(t)
			for seq := range 200 {
				rng := rand.New(rand.NewPCG(uint64(seq), 2))
				a, err := New(pools, unique)
				if err != nil {
					t.Fatal(err)
				}
				m := newModel(pools, unique)
				var trace []string
				for range 150 {
					stepBoth(t, rng, a, m, &trace)
					checkInvariants(t, a, unique, trace)
				}
				fresh := checkRestore(t, rng, a, pools, unique, trace)
				// The restored allocator must also decide like the original from here on.
				fm := newModel(pools, unique)
				for _, s := range snapshot(a) {
					for _, al := range s {
						fm.take(al.Service, al.Pool, al.IP, al.Ports)
					}
				}
				for range 50 {
					stepBoth(t, rng, fresh, fm, &trace)
					checkInvariants(t, fresh, unique, trace)
				}
			}
		})
	}
}

// The small pools above keep the treaps shallow; this holds the lowest-free and
// lowest-shareable walks to the model on a tree a few hundred nodes deep.
func TestRandomSequencesOnALargerPool(t *testing.T) {
	pools := mustPools(t, "big=10.1.0.0/23")
	for _, unique := range []bool{true, false} {
		for seq := range 10 {
			rng := rand.New(rand.NewPCG(uint64(seq), 3))
			a, _ := New(pools, unique)
			m := newModel(pools, unique)
			for i := range 2000 {
				svc := fmt.Sprintf("ns/s%d", rng.IntN(600))
				if rng.IntN(3) == 0 {
					a.Release(svc)
					m.release(svc)
					continue
				}
				r := Request{Service: svc, Family: IPv4, Ports: []PortKey{propPorts[rng.IntN(2)]}}
				got, err := a.Allocate(r)
				want, werr := m.allocate(r)
				if !errors.Is(err, werr) || got.IP != want.IP {
					t.Fatalf("unique=%v seq %d op %d: Allocate(%+v) = %v, %v; model %v, %v", unique, seq, i, r, got, err, want, werr)
				}
			}
		}
	}
}

// Timings on a loaded machine cannot show the growth rate, so this counts the bitmap
// words, port index words and treap nodes one Release plus one Allocate reads or writes:
// with n used addresses it must stay within a constant per bitmap level, log64(n). The
// shared-packing case holds 80/tcp on n addresses and 443/tcp on the lowest half, so a
// 443/tcp request must find the address past them: a scan would read n/64 words.
func TestWalksStayLogarithmic(t *testing.T) {
	web, tls := []PortKey{{6, 80}}, []PortKey{{6, 443}}
	cases := []struct {
		name   string
		unique bool
		tls    bool // half the addresses also carry 443/tcp, and the churning service wants it
	}{
		{"unique mode", true, false},
		{"shared mode", false, false},
		{"shared mode packing past a blocked half", false, true},
	}
	for _, tc := range cases {
		for _, n := range []int{1_000, 10_000, 100_000} {
			t.Run(fmt.Sprintf("%s with %d addresses used", tc.name, n), func(t *testing.T) {
				if testing.Short() && n > 10_000 {
					t.Skip("-short")
				}
				a, err := New(mustPools(t, "p=10.0.0.0/14"), tc.unique)
				if err != nil {
					t.Fatal(err)
				}
				for i := range n {
					if _, err := a.Allocate(Request{Service: fmt.Sprint(i), Family: IPv4, Ports: web}); err != nil {
						t.Fatal(err)
					}
				}
				churn := web
				if tc.tls {
					churn = tls
					for i := range n / 2 {
						if _, err := a.Allocate(Request{Service: fmt.Sprint("tls", i), Family: IPv4, Ports: tls}); err != nil {
							t.Fatal(err)
						}
					}
				}
				rng := rand.New(rand.NewPCG(7, 7))
				const ops = 2000
				p := a.pools[0]
				before := p.visits()
				for range ops {
					s := fmt.Sprint(rng.IntN(n))
					if tc.tls {
						s = "tls-churn"
					}
					a.Release(s)
					if _, err := a.Allocate(Request{Service: s, Family: IPv4, Ports: churn}); err != nil {
						t.Fatal(err)
					}
				}
				perOp := float64(p.visits()-before) / ops
				levels := p.dense.top() + 1
				if want := math.Ceil(math.Log(float64(n)) / math.Log(64)); float64(levels) > want+1 {
					t.Errorf("the bitmap has %d levels for %d addresses, more than log64(n)+1 = %.0f", levels, n, want+1)
				}
				if limit := 10 * float64(levels); perOp > limit {
					t.Errorf("%.1f words read per release+allocate, more than 10 per bitmap level (%d levels)", perOp, levels)
				}
				t.Logf("%.1f words per release+allocate, %d bitmap levels", perOp, levels)
			})
		}
	}
}
