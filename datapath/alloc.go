package datapath

import (
	"cmp"
	"fmt"
	"slices"
	"sort"
)

// span is a range [start, start+size) of ring slots.
type span struct{ start, size uint32 }

// rangeAlloc hands out ranges of ring slots, first fit, coalescing on free. Rings come
// in a few prime sizes and change rarely, so a sorted free list is plenty.
type rangeAlloc struct {
	free []span // sorted by start, never adjacent
}

func newRangeAlloc(capacity uint32) *rangeAlloc {
	return &rangeAlloc{free: []span{{0, capacity}}}
}

func (a *rangeAlloc) alloc(size uint32) (uint32, error) {
	for i, s := range a.free {
		if s.size < size {
			continue
		}
		start := s.start
		if s.size == size {
			a.free = append(a.free[:i], a.free[i+1:]...)
		} else {
			a.free[i] = span{s.start + size, s.size - size}
		}
		return start, nil
	}
	return 0, fmt.Errorf("allocate %d ring slots: %w", size, errRingFull)
}

func (a *rangeAlloc) release(start, size uint32) {
	if size == 0 {
		return
	}
	i := sort.Search(len(a.free), func(i int) bool { return a.free[i].start > start })
	a.free = append(a.free, span{})
	copy(a.free[i+1:], a.free[i:])
	a.free[i] = span{start, size}
	// Merge with the following span, then with the preceding one.
	if i+1 < len(a.free) && a.free[i].start+a.free[i].size == a.free[i+1].start {
		a.free[i].size += a.free[i+1].size
		a.free = append(a.free[:i+1], a.free[i+2:]...)
	}
	if i > 0 && a.free[i-1].start+a.free[i-1].size == a.free[i].start {
		a.free[i-1].size += a.free[i].size
		a.free = append(a.free[:i], a.free[i+1:]...)
	}
}

// freeSlots is the total of all free spans.
func (a *rangeAlloc) freeSlots() uint64 {
	var n uint64
	for _, s := range a.free {
		n += uint64(s.size)
	}
	return n
}

// idAlloc hands out small integer ids, reusing released ones first.
type idAlloc struct {
	next, capacity uint32
	free           []uint32
}

func (a *idAlloc) alloc() (uint32, bool) {
	if n := len(a.free); n > 0 {
		id := a.free[n-1]
		a.free = a.free[:n-1]
		return id, true
	}
	if a.next >= a.capacity {
		return 0, false
	}
	a.next++
	return a.next - 1, true
}

func (a *idAlloc) release(id uint32) { a.free = append(a.free, id) }

// rangeAllocFrom is a rangeAlloc of capacity slots of which the used spans are taken,
// as rebuilt from pinned maps. Overlapping or out-of-range spans are an error.
func rangeAllocFrom(capacity uint32, used []span) (*rangeAlloc, error) {
	used = slices.Clone(used)
	slices.SortFunc(used, func(a, b span) int { return cmp.Compare(a.start, b.start) })
	a := &rangeAlloc{}
	var next uint32
	for _, s := range used {
		if s.size == 0 {
			continue
		}
		if s.start < next || uint64(s.start)+uint64(s.size) > uint64(capacity) {
			return nil, fmt.Errorf("ring range %d+%d overlaps another or exceeds %d slots", s.start, s.size, capacity)
		}
		if s.start > next {
			a.free = append(a.free, span{next, s.start - next})
		}
		next = s.start + s.size
	}
	if next < capacity {
		a.free = append(a.free, span{next, capacity - next})
	}
	return a, nil
}

// idAllocFrom is an idAlloc of capacity ids of which used are taken, as rebuilt from
// pinned maps; the lowest free id is handed out first.
func idAllocFrom(capacity uint32, used map[uint32]bool) idAlloc {
	a := idAlloc{capacity: capacity}
	for id := range used {
		a.next = max(a.next, id+1)
	}
	for id := a.next; id > 0; id-- {
		if !used[id-1] {
			a.free = append(a.free, id-1)
		}
	}
	return a
}
