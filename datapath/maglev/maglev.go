// Package maglev computes Maglev consistent-hash lookup tables (Eisenbud et al., NSDI
// 2016) in user space, for the datapath to index in the kernel. Every node computes the
// same table from the same set of endpoint names, whatever order they arrive in.
//
// # Disruption
//
// Removing one of N endpoints ideally moves 1/N of the slots (only the removed
// endpoint's). Maglev keeps every endpoint within one slot of M/N, and pays for that
// exact balance with some extra movement, which shrinks only as the table grows
// relative to N. Averaged over which endpoint is removed (percentage points above the
// ideal share; BenchmarkDisruptionN prints these):
//
//	N    TableSize (x N)   ~4,000 slots     ~16,000 slots
//	4    509 (127x): 0.98  4093: 0.59       16381: 0.13
//	5    509 (101x): 1.49  4093: 0.59       16381: 0.19
//	10   1021 (102x): 2.67 4093: 1.11       16381: 0.49
//	16   2039 (127x): 2.21 4093: 1.46       16381: 0.61
//
// Exact balance and ideal movement do not go together: a table that is a function of
// the endpoint set alone and moves only the removed endpoint's slots, whichever is
// removed, is rendezvous hashing, whose shares vary by the binomial spread (about 9% of
// M/N at 100 slots per endpoint). The benchmark also measures the alternative, a bounded-load rendezvous
// table (slot and endpoint pairs taken greedily by hash score, each endpoint capped):
// capped at the next integer above M/N it moves 1.2 to 1.7 points above ideal (less
// than Maglev from 10 endpoints on), with shares up to 6% off M/N; capped 2% higher,
// 0.9 to 1.2 points, with shares 5.7% to 12.8% off, beyond the 5% the datapath's
// distribution test allows. None of them keeps shares within 5% and moves less than
// one point above ideal; Maglev keeps them within 0.9%. Tables of 16,381 slots for 16
// endpoints would take about 625 MiB of ring slots for 10,000 services. Established
// flows are not affected either way: conntrack keeps them on their endpoint, and only
// the removed endpoint's flows are balanced again. The extra movement reaches only flows without
// conntrack state on the node that sees them: new flows, and flows that come to another
// node after a failover in default mode.
package maglev

import (
	"fmt"
	"math"
	"sort"
)

// sizes are the table sizes TableSize picks from. Maglev needs a prime size so that
// every backend's permutation visits every slot.
var sizes = [...]uint32{251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071}

// TableSize returns the smallest prime from a fixed list that is at least 100 slots per
// endpoint, so that each endpoint owns within about 1% of 1/N of the table. The list
// stops at 131071: from 1311 endpoints on the table stays at 131071 slots, fewer than
// 100 per endpoint, which bounds the map memory per service; shares then still differ by
// at most one slot, but removing an endpoint moves more flows than the ideal 1/N.
func TableSize(endpoints int) uint32 {
	want := uint64(max(endpoints, 0)) * 100
	for _, s := range sizes {
		if uint64(s) >= want {
			return s
		}
	}
	return sizes[len(sizes)-1]
}

// Table returns the Maglev lookup table of the given prime size: each slot is an index
// into backends. The table is computed over the names in sorted order and then mapped
// back to the caller's indexes, so backends[t[i]] depends only on the set of names and
// size, not on their order. A name given twice counts once (slots use its first index).
// Table returns nil for no backends. It panics if size is not prime, because a
// non-prime size leaves permutations that skip slots (use TableSize).
func Table(backends []string, size uint32) []uint32 {
	if !isPrime(size) {
		panic(fmt.Sprintf("maglev: table size %d is not prime", size))
	}
	names, index := canonical(backends)
	if len(names) == 0 {
		return nil
	}
	n := len(names)
	m := uint64(size)
	offset := make([]uint64, n)
	skip := make([]uint64, n)
	for i, name := range names {
		offset[i] = hash(name, seedOffset) % m
		skip[i] = hash(name, seedSkip)%(m-1) + 1
	}
	table := make([]uint32, size)
	for i := range table {
		table[i] = empty
	}
	// pos is where each backend is along its permutation offset + j*skip (mod m);
	// stepping by addition avoids a division per probe.
	pos := offset
	filled := uint32(0)
	for {
		for i := range n {
			// Backend i takes the next slot of its permutation that nobody has
			// claimed yet.
			for table[pos[i]] != empty {
				pos[i] = step(pos[i], skip[i], m)
			}
			table[pos[i]] = index[i]
			pos[i] = step(pos[i], skip[i], m)
			filled++
			if filled == size {
				return table
			}
		}
	}
}

func step(pos, skip, m uint64) uint64 {
	pos += skip
	if pos >= m {
		pos -= m
	}
	return pos
}

const empty = math.MaxUint32

// Seeds of the two hashes of a backend name: the start and the stride of its
// permutation. They are part of the table's definition: changing them moves flows.
const (
	seedOffset uint64 = 0x6d61676c65762d6f // "maglev-o"
	seedSkip   uint64 = 0x6d61676c65762d73 // "maglev-s"
)

// hash is the stable 64-bit hash Table uses: FNV-1a over the seed's eight bytes
// (little endian) followed by s, finished with the murmur3 fmix64 mixer because FNV-1a's
// low bits mix poorly and the table takes them modulo a small prime. It never depends on
// the process, unlike Go's map hash.
func hash(s string, seed uint64) uint64 {
	const (
		offset64 = 14695981039346656037
		prime64  = 1099511628211
	)
	h := uint64(offset64)
	for i := range 8 {
		h ^= (seed >> (8 * i)) & 0xff
		h *= prime64
	}
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= prime64
	}
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

// canonical returns the distinct names sorted, and for each the index of its first
// occurrence in backends.
func canonical(backends []string) ([]string, []uint32) {
	first := make(map[string]uint32, len(backends))
	names := make([]string, 0, len(backends))
	for i, b := range backends {
		if _, ok := first[b]; !ok {
			first[b] = uint32(i)
			names = append(names, b)
		}
	}
	sort.Strings(names)
	index := make([]uint32, len(names))
	for i, name := range names {
		index[i] = first[name]
	}
	return names, index
}

func isPrime(n uint32) bool {
	if n < 2 {
		return false
	}
	for d := uint32(2); uint64(d)*uint64(d) <= uint64(n); d++ {
		if n%d == 0 {
			return false
		}
	}
	return true
}
