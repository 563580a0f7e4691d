package maglev

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"testing"
)

// BenchmarkDisruptionN prints, for N endpoints, the share of slots that move when one
// endpoint is removed (averaged over which one: moved-%, the baseline row being the
// ideal 1/N) and how far the most unequal share strays from M/N (share-dev-%), for
// Maglev at TableSize and at larger sizes, and for the alternative the package doc
// discusses: a bounded-load rendezvous table, exactly capped and capped 2% higher.
// Nothing is timed: these are properties of the tables.
func BenchmarkDisruption4(b *testing.B)  { benchmarkDisruption(b, 4) }
func BenchmarkDisruption5(b *testing.B)  { benchmarkDisruption(b, 5) }
func BenchmarkDisruption10(b *testing.B) { benchmarkDisruption(b, 10) }
func BenchmarkDisruption16(b *testing.B) { benchmarkDisruption(b, 16) }

func benchmarkDisruption(b *testing.B, n int) {
	all := names(n)
	size := TableSize(n)
	b.Run("baseline", func(b *testing.B) {
		for b.Loop() {
		}
		b.ReportMetric(0, "ns/op")
		b.ReportMetric(100/float64(n), "moved-%")
	})
	rows := []struct {
		name  string
		table func([]string) []uint32
	}{
		{fmt.Sprintf("maglev-%d", size), func(s []string) []uint32 { return Table(s, size) }},
		{"maglev-4093", func(s []string) []uint32 { return Table(s, 4093) }},
		{"maglev-16381", func(s []string) []uint32 { return Table(s, 16381) }},
		{fmt.Sprintf("bounded-%d", size), func(s []string) []uint32 { return boundedTable(s, size, 0) }},
		{fmt.Sprintf("bounded-%d+2%%", size), func(s []string) []uint32 { return boundedTable(s, size, 0.02) }},
	}
	for _, r := range rows {
		b.Run(r.name, func(b *testing.B) {
			for b.Loop() {
			}
			moved, dev := disruptionOf(all, r.table)
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(100*moved, "moved-%")
			b.ReportMetric(100*dev, "share-dev-%")
		})
	}
}

// disruptionOf returns the share of slots that change when one of names is removed,
// averaged over which, and the largest relative deviation of a share from size/N in
// the full table.
func disruptionOf(all []string, table func([]string) []uint32) (moved, dev float64) {
	before := table(all)
	count := make([]int, len(all))
	for _, i := range before {
		count[i]++
	}
	fair := float64(len(before)) / float64(len(all))
	for _, c := range count {
		dev = max(dev, math.Abs(float64(c)-fair)/fair)
	}
	for gone := range all {
		rest := append(append([]string(nil), all[:gone]...), all[gone+1:]...)
		moved += disruption(all, before, rest, table(rest))
	}
	return moved / float64(len(all)), dev
}

// boundedTable is a bounded-load rendezvous table: every (slot, name) pair gets a hash
// score, and pairs are taken from the highest score down while the slot is free and
// the name has fewer than ceil(size/N * (1+slack)) slots.
func boundedTable(names []string, size uint32, slack float64) []uint32 {
	type pair struct {
		score      uint64
		slot, name uint32
	}
	pairs := make([]pair, 0, int(size)*len(names))
	for i, name := range names {
		for s := range size {
			pairs = append(pairs, pair{score: hash(name+"/"+strconv.Itoa(int(s)), seedOffset), slot: s, name: uint32(i)})
		}
	}
	sort.Slice(pairs, func(i, j int) bool { return pairs[i].score > pairs[j].score })
	limit := int(math.Ceil(float64(size) / float64(len(names)) * (1 + slack)))
	table := make([]uint32, size)
	taken := make([]bool, size)
	count := make([]int, len(names))
	left := size
	for _, p := range pairs {
		if taken[p.slot] || count[p.name] >= limit {
			continue
		}
		taken[p.slot] = true
		table[p.slot] = p.name
		count[p.name]++
		if left--; left == 0 {
			break
		}
	}
	return table
}
