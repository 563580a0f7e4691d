package ipam

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
)

func TestReconfigure(t *testing.T) {
	a, err := New(mustPools(t, "a=10.0.0.1-10.0.0.4", "b=10.0.1.1-10.0.1.1"), true)
	if err != nil {
		t.Fatal(err)
	}
	alloc := func(a *Allocator, svc, pool string) Allocation {
		t.Helper()
		al, err := a.Allocate(Request{Service: svc, Family: IPv4, Pool: pool})
		if err != nil {
			t.Fatalf("allocate %s: %v", svc, err)
		}
		return al
	}
	s1, s2, s3 := alloc(a, "ns/s1", "a"), alloc(a, "ns/s2", "a"), alloc(a, "ns/s3", "b")

	t.Run("a pool that shrinks under a service keeps its address and says so", func(t *testing.T) {
		// a loses .2 (s2's) and gains .5-.6; b goes.
		next, orphaned, err := a.Reconfigure(mustPools(t, "a=10.0.0.1-10.0.0.1", "a2=10.0.0.3-10.0.0.6"))
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []Allocation{s1, s2, s3} {
			got := next.Lookup(want.Service)
			if len(got) != 1 || got[0].IP != want.IP {
				t.Errorf("%s holds %v after the change, want %v", want.Service, got, want.IP)
			}
		}
		if len(orphaned) != 2 || orphaned[0].Service != "ns/s2" || orphaned[1].Service != "ns/s3" || orphaned[1].Pool != "b" {
			t.Errorf("orphaned = %+v, want s2 (pool a) and s3 (pool b)", orphaned)
		}
		// The orphaned address is not handed out while s2 holds it, nor after.
		n := alloc(next, "ns/s4", "a2")
		if n.IP != netip.MustParseAddr("10.0.0.3") {
			t.Errorf("a new service got %v, want the lowest free address of a2, 10.0.0.3", n.IP)
		}
		next.Release("ns/s2")
		if _, err := next.Allocate(Request{Service: "ns/s5", Family: IPv4, StaticIP: s2.IP}); err != nil {
			t.Errorf("a static request for the released orphaned address: %v (outside every pool, it is free)", err)
		}
		if got := a.Lookup("ns/s4"); got != nil {
			t.Errorf("the old allocator changed: %v", got)
		}
	})
	t.Run("a pool that grows serves a service the full pool refused", func(t *testing.T) {
		if _, err := a.Allocate(Request{Service: "ns/s6", Family: IPv4, Pool: "b"}); !errors.Is(err, ErrPoolExhausted) {
			t.Fatalf("allocate from full b = %v, want exhausted", err)
		}
		next, orphaned, err := a.Reconfigure(mustPools(t, "a=10.0.0.1-10.0.0.4", "b=10.0.1.1-10.0.1.2"))
		if err != nil || len(orphaned) != 0 {
			t.Fatalf("Reconfigure = %v, orphaned %v", err, orphaned)
		}
		if al := alloc(next, "ns/s6", "b"); al.IP != netip.MustParseAddr("10.0.1.2") {
			t.Errorf("s6 got %v, want 10.0.1.2", al.IP)
		}
	})
	t.Run("overlapping pools are refused and nothing changes", func(t *testing.T) {
		if _, _, err := a.Reconfigure(mustPools(t, "a=10.0.0.1-10.0.0.4")[:1:1]); err != nil {
			t.Fatal(err)
		}
		bad := []PoolSpec{{Name: "x", First: netip.MustParseAddr("10.0.0.1"), Last: netip.MustParseAddr("10.0.0.9")}, {Name: "y", First: netip.MustParseAddr("10.0.0.5"), Last: netip.MustParseAddr("10.0.0.6")}}
		if _, _, err := a.Reconfigure(bad); !errors.Is(err, ErrInvalidPool) {
			t.Fatalf("Reconfigure with overlapping pools = %v, want ErrInvalidPool", err)
		}
	})
}

// TestReconfigureKeepsEveryAddress: over random pool changes between allocations, no
// service's address ever moves, and no address is ever held by two services.
func TestReconfigureKeepsEveryAddress(t *testing.T) {
	rng := rand.New(rand.NewPCG(16, 2))
	randomPools := func() []PoolSpec {
		var specs []PoolSpec
		lo := 1 + rng.IntN(4)
		for i := range 1 + rng.IntN(3) {
			n := rng.IntN(6)
			first := netip.AddrFrom4([4]byte{10, 0, 0, byte(lo)})
			last := netip.AddrFrom4([4]byte{10, 0, 0, byte(lo + n)})
			specs = append(specs, PoolSpec{Name: fmt.Sprintf("p%d", i), First: first, Last: last})
			lo += n + 1 + rng.IntN(3)
		}
		return specs
	}
	for _, unique := range []bool{true, false} {
		a, err := New(randomPools(), unique)
		if err != nil {
			t.Fatal(err)
		}
		held := map[string]netip.Addr{}
		for step := range 2000 {
			switch r := rng.IntN(10); {
			case r < 5:
				svc := fmt.Sprintf("ns/s%d", rng.IntN(40))
				al, err := a.Allocate(Request{Service: svc, Family: IPv4, Ports: []PortKey{{Port: uint16(80 + rng.IntN(3)), Protocol: 6}}})
				if err == nil {
					if prev, ok := held[svc]; ok && prev != al.IP {
						t.Fatalf("step %d: %s moved from %v to %v", step, svc, prev, al.IP)
					}
					held[svc] = al.IP
				}
			case r < 7:
				svc := fmt.Sprintf("ns/s%d", rng.IntN(40))
				a.Release(svc)
				delete(held, svc)
			default:
				next, _, err := a.Reconfigure(randomPools())
				if err != nil {
					t.Fatalf("step %d: %v", step, err)
				}
				a = next
			}
			owners := map[netip.Addr]string{}
			for svc, ip := range held {
				got := a.Lookup(svc)
				if len(got) != 1 || got[0].IP != ip {
					t.Fatalf("step %d: %s holds %v, want %v", step, svc, got, ip)
				}
				if other, ok := owners[ip]; ok && unique {
					t.Fatalf("step %d: %v held by %s and %s in unique mode", step, ip, svc, other)
				}
				owners[ip] = svc
			}
		}
	}
}
