package ipam

import (
	"errors"
	"net/netip"
	"testing"
)

// TestPoolsInOrder: a request with Pools is served by the first listed pool with an
// address for it, across every range of a pool made of several.
func TestPoolsInOrder(t *testing.T) {
	// "multi" is one pool of two ranges (an IPPool with two addresses).
	a, err := New(mustPools(t, "flag=10.0.0.1-10.0.0.1", "multi=10.0.1.1-10.0.1.1", "multi=10.0.2.1-10.0.2.1", "other=10.0.3.1-10.0.3.2"), true)
	if err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		desc, svc string
		pools     []string
		want      string // "" = exhausted
	}{
		{"the first listed pool serves", "s1", []string{"multi", "other"}, "10.0.1.1"},
		{"a pool's second range serves once its first is full", "s2", []string{"multi", "other"}, "10.0.2.1"},
		{"the next pool serves once the first is full", "s3", []string{"multi", "other"}, "10.0.3.1"},
		{"an unlisted pool never serves", "s4", []string{"multi"}, ""},
		{"nil Pools is the first pool of the family", "s5", nil, "10.0.0.1"},
	}
	for _, st := range steps {
		t.Run(st.desc, func(t *testing.T) {
			al, err := a.Allocate(Request{Service: st.svc, Family: IPv4, Pools: st.pools})
			if st.want == "" {
				if !errors.Is(err, ErrPoolExhausted) {
					t.Fatalf("Allocate = %v, %v; want exhausted", al, err)
				}
				return
			}
			if err != nil || al.IP != netip.MustParseAddr(st.want) {
				t.Fatalf("Allocate = %v, %v; want %s", al, err, st.want)
			}
		})
	}
	t.Run("an empty, non-nil Pools is no pool", func(t *testing.T) {
		if _, err := a.Allocate(Request{Service: "s6", Family: IPv4, Pools: []string{}}); !errors.Is(err, ErrNoPool) {
			t.Fatalf("Allocate = %v, want ErrNoPool", err)
		}
	})
	t.Run("a selected pool of several ranges takes a static IP in any of them", func(t *testing.T) {
		a.Release("s2")
		al, err := a.Allocate(Request{Service: "s7", Family: IPv4, Pool: "multi", StaticIP: netip.MustParseAddr("10.0.2.1")})
		if err != nil || al.Pool != "multi" {
			t.Fatalf("Allocate = %v, %v; want 10.0.2.1 of multi", al, err)
		}
	})
}

// TestOnePoolOfSeveralRanges: New takes ranges sharing a name as one pool, and still
// refuses two that overlap.
func TestOnePoolOfSeveralRanges(t *testing.T) {
	if _, err := New(mustPools(t, "a=10.0.0.0/24", "a=10.0.1.0/24"), true); err != nil {
		t.Errorf("New with two ranges named a = %v, want one pool", err)
	}
	if _, err := New(mustPools(t, "a=10.0.0.0/24", "a=10.0.0.128/25"), true); !errors.Is(err, ErrInvalidPool) {
		t.Errorf("New with overlapping ranges named a = %v, want ErrInvalidPool", err)
	}
}
