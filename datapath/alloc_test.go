package datapath

import (
	"errors"
	"math/rand/v2"
	"testing"
)

func TestRangeAlloc(t *testing.T) {
	t.Run("released ranges merge back into one free span", func(t *testing.T) {
		a := newRangeAlloc(100)
		var got [][2]uint32
		for _, n := range []uint32{10, 20, 30} {
			s, err := a.alloc(n)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, [2]uint32{s, n})
		}
		for _, i := range []int{1, 0, 2} {
			a.release(got[i][0], got[i][1])
		}
		if len(a.free) != 1 || a.free[0] != (span{0, 100}) {
			t.Fatalf("free list %v, want one span of 100", a.free)
		}
	})
	t.Run("a request larger than any free span fails with errRingFull", func(t *testing.T) {
		a := newRangeAlloc(100)
		s, _ := a.alloc(40)
		_, _ = a.alloc(40)
		a.release(s, 40)
		if _, err := a.alloc(50); !errors.Is(err, errRingFull) {
			t.Fatalf("alloc 50 with spans of 40 and 20 free: err %v, want errRingFull", err)
		}
	})
	t.Run("random allocations never overlap and are all returned", func(t *testing.T) {
		const capacity = 10000
		a := newRangeAlloc(capacity)
		owner := make([]int, capacity)
		live := map[int]span{}
		r := rand.New(rand.NewPCG(1, 2))
		for i := 1; i < 5000; i++ {
			if len(live) > 0 && r.IntN(2) == 0 {
				for id, s := range live {
					for j := s.start; j < s.start+s.size; j++ {
						owner[j] = 0
					}
					a.release(s.start, s.size)
					delete(live, id)
					break
				}
				continue
			}
			n := uint32(1 + r.IntN(300))
			s, err := a.alloc(n)
			if err != nil {
				continue
			}
			for j := s; j < s+n; j++ {
				if owner[j] != 0 {
					t.Fatalf("slot %d given to %d and %d", j, owner[j], i)
				}
				owner[j] = i
			}
			live[i] = span{s, n}
		}
		for _, s := range live {
			a.release(s.start, s.size)
		}
		if a.freeSlots() != capacity || len(a.free) != 1 {
			t.Fatalf("after releasing everything: %d free in %d spans, want %d in 1", a.freeSlots(), len(a.free), capacity)
		}
	})
}

func TestIDAllocReusesReleasedIDs(t *testing.T) {
	a := idAlloc{capacity: 2}
	x, _ := a.alloc()
	y, _ := a.alloc()
	if _, ok := a.alloc(); ok {
		t.Fatal("a third id out of a capacity of 2")
	}
	a.release(x)
	if z, ok := a.alloc(); !ok || z != x || z == y {
		t.Fatalf("after releasing %d got %d (ok %v), want %d back", x, z, ok, x)
	}
}
