package ipam

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// checkDense fails unless d's summary levels and port index are what rebuilding them
// from level 0 and the slots gives: the incremental updates must not drift.
func checkDense(t testing.TB, d *dense, context string) {
	t.Helper()
	if d.limit == 0 {
		return
	}
	fresh := dense{limit: d.limit, used: d.used, slots: d.slots, shared: d.shared}
	fresh.rebuild()
	n := 0
	for _, w := range d.used {
		for ; w != 0; w &= w - 1 {
			n++
		}
	}
	switch {
	case n != d.n:
		t.Fatalf("%s: %d addresses counted, %d set in the bitmap", context, d.n, n)
	case !slices.EqualFunc(d.any, fresh.any, slices.Equal):
		t.Fatalf("%s: non-empty summaries drifted from the bitmap", context)
	case !slices.EqualFunc(d.full, fresh.full, slices.Equal):
		t.Fatalf("%s: full summaries drifted from the bitmap", context)
	case d.shared && !maps.Equal(d.ports, fresh.ports):
		for k, v := range fresh.ports {
			if d.ports[k] != v {
				t.Fatalf("%s: port index for %v level %d word %d is %x, want %x", context, k.port(), k.level(), k.idx(), d.ports[k], v)
			}
		}
		for k, v := range d.ports {
			if _, ok := fresh.ports[k]; !ok {
				t.Fatalf("%s: port index for %v level %d word %d is %x, want nothing", context, k.port(), k.level(), k.idx(), v)
			}
		}
	}
}

// checkInternals holds every pool's bitmap to checkDense and the interned port sets to
// the records that use them.
func checkInternals(t testing.TB, a *Allocator, context string) {
	t.Helper()
	for _, p := range a.pools {
		checkDense(t, &p.dense, context+" pool "+p.spec.Name)
	}
	want := map[string]int{}
	for _, recs := range a.services {
		for _, rec := range recs {
			if rec.ip.IsValid() && len(rec.ports) > 0 && len(rec.ports) <= maxInterned {
				var buf [3 * maxInterned]byte
				want[string(portsKey(&buf, rec.ports))]++
			}
		}
	}
	if len(want) != len(a.sets) {
		t.Fatalf("%s: %d port sets interned, records use %d", context, len(a.sets), len(want))
	}
	for k, n := range want {
		if s := a.sets[k]; s == nil || s.refs != n {
			t.Fatalf("%s: interned set %v counts %v users, records hold %d", context, []byte(k), s, n)
		}
	}
}

// TestDenseMatchesAScan drives the bitmap directly with addresses clustered low, so that
// words and whole subtrees fill and empty, over three levels, and holds every answer to
// a scan of the slots.
func TestDenseMatchesAScan(t *testing.T) {
	const size = 20_000
	keys := []PortKey{{6, 80}, {6, 443}, {6, 8080}, {17, 53}} // sorted, as the allocator passes them
	randomPorts := func(rng *rand.Rand) []PortKey {
		var ps []PortKey
		for _, k := range keys {
			if rng.IntN(3) == 0 {
				ps = append(ps, k)
			}
		}
		return ps
	}
	for _, shared := range []bool{false, true} {
		t.Run(fmt.Sprintf("shared=%v", shared), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(11, 12))
			d := &dense{shared: shared}
			d.extend(32_768)
			d.rebuild()
			if d.top() != 2 {
				t.Fatalf("%d summary levels over 32,768 addresses, want 2", d.top())
			}
			holders := map[uint64][]string{}
			next := 0
			for op := range 30_000 {
				o := uint64(rng.IntN(rng.IntN(size) + 1))
				if hs := holders[o]; len(hs) > 0 && rng.IntN(2) == 0 {
					svc := hs[rng.IntN(len(hs))]
					d.remove(o, svc)
					holders[o] = slices.DeleteFunc(hs, func(s string) bool { return s == svc })
				} else {
					ps := randomPorts(rng)
					if len(hs) > 0 && (!shared || overlaps(d.slots[o].ports, ps)) {
						continue
					}
					next++
					svc := fmt.Sprintf("s%d", next)
					d.add(o, svc, ps)
					holders[o] = append(hs, svc)
				}

				wantFree := uint64(0)
				for d.isUsed(wantFree) {
					wantFree++
				}
				if got, ok := d.lowestFree(); !ok || got != wantFree {
					t.Fatalf("op %d: lowestFree = %d, %v; a scan finds %d", op, got, ok, wantFree)
				}
				if !shared {
					continue
				}
				req := randomPorts(rng)
				want, found := uint64(0), false
				for o := range uint64(size) {
					if d.isUsed(o) && !overlaps(d.slots[o].ports, req) {
						want, found = o, true
						break
					}
				}
				before := d.visits
				got, ok := d.shareable(req)
				if ok != found || got != want {
					t.Fatalf("op %d: shareable(%v) = %d, %v; a scan finds %d, %v", op, req, got, ok, want, found)
				}
				// With one port the descent reads one word per level and one index word per
				// level: no backtracking.
				if limit := uint64(d.top()+1) * uint64(1+len(req)); len(req) <= 1 && d.visits-before > limit {
					t.Fatalf("op %d: shareable(%v) read %d words, more than %d: it backtracked", op, req, d.visits-before, limit)
				}
				if op%500 == 0 {
					checkDense(t, d, fmt.Sprintf("op %d", op))
				}
			}
			checkDense(t, d, "end")
		})
	}
}

// The small pools of the other property tests fit in one bitmap word. This one holds
// thousands of addresses, three bitmap levels, static IPs anywhere in the pool (far ones
// in the treap until the bitmap grows over them), and checks the internals as it goes.
func TestRandomSequencesOnABigPool(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: the model scans 16k addresses per request")
	}
	pools := mustPools(t, "big=10.1.0.0/18")
	spec := pools[0]
	keys := []PortKey{{6, 80}, {6, 443}, {17, 53}, {6, 8080}}
	for _, unique := range []bool{true, false} {
		t.Run(fmt.Sprintf("unique=%v", unique), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(5, 6))
			a, _ := New(pools, unique)
			m := newModel(pools, unique)
			svc := func() string { return fmt.Sprintf("ns/s%d", rng.IntN(6000)) }
			for op := range 9000 {
				s := svc()
				if op > 5000 && rng.IntN(3) == 0 {
					a.Release(s)
					m.release(s)
					continue
				}
				// Mostly one port, so that shared mode too uses thousands of addresses.
				r := Request{Service: s, Family: IPv4, Ports: keys[:1]}
				if rng.IntN(3) == 0 {
					r.Ports = nil
					for _, k := range keys {
						if rng.IntN(3) == 0 {
							r.Ports = append(r.Ports, k)
						}
					}
				}
				if rng.IntN(20) == 0 {
					off := rng.IntN(8000) // near the used part, in the bitmap
					if rng.IntN(2) == 0 {
						off = rng.IntN(16382) // anywhere: beyond the bitmap while it is small
					}
					b := spec.First.As4()
					v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) + uint32(off)
					r.StaticIP = netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
				}
				got, err := a.Allocate(r)
				want, werr := m.allocate(r)
				if !errors.Is(err, werr) || (werr == nil && (err != nil || got.IP != want.IP)) {
					t.Fatalf("op %d: Allocate(%+v) = %v, %v; model %v, %v", op, r, got, err, want, werr)
				}
				if op%1000 == 999 {
					checkInternals(t, a, fmt.Sprintf("op %d", op))
				}
			}
			if a.pools[0].dense.top() < 2 {
				t.Fatalf("the bitmap has %d summary levels, the test wants at least 2", a.pools[0].dense.top())
			}
			var recs []Allocation
			for s := range a.services {
				recs = append(recs, a.Lookup(s)...)
			}
			rng.Shuffle(len(recs), func(i, j int) { recs[i], recs[j] = recs[j], recs[i] })
			fresh, _ := New(pools, unique)
			if err := fresh.Restore(recs); err != nil {
				t.Fatal(err)
			}
			checkInternals(t, fresh, "restored")
			for s := range a.services {
				if got, want := fresh.Lookup(s), a.Lookup(s); !sameAllocations([][]Allocation{got}, [][]Allocation{want}) {
					t.Fatalf("restored %s = %v, want %v", s, got, want)
				}
			}
			for s := range a.services {
				a.Release(s)
			}
			checkInternals(t, a, "all released")
			if a.pools[0].used() != 0 || len(a.sets) != 0 {
				t.Fatalf("after releasing everything: %d addresses used, %d port sets kept", a.pools[0].used(), len(a.sets))
			}
		})
	}
}
