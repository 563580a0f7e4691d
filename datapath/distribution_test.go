package datapath

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/shardlb/shardlb/datapath/maglev"
	"github.com/shardlb/shardlb/shard"
)

// flows builds n distinct TCP SYNs to vip:80 from 10.1.0.0/16 clients on varying ports.
func flows(n int, vip netip.Addr) [][]byte {
	ps := make([][]byte, n)
	for i := range ps {
		src := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8 & 0xff), byte(i)})
		port := uint16(1024 + i>>16*1000 + i%997)
		ps[i] = pkt{src: netip.AddrPortFrom(src, port), dst: netip.AddrPortFrom(vip, vipPort), proto: shard.TCP}.bytes()
	}
	return ps
}

func endpointsN(n int) []shard.Endpoint {
	eps := make([]shard.Endpoint, n)
	for i := range eps {
		eps[i] = shard.Endpoint{Addr: netip.AddrFrom4([4]byte{10, 2, 0, byte(10 + i)}), Port: epPort}
	}
	return eps
}

var distVIP = netip.MustParseAddr("192.0.2.20")

func hashFrontend(eps []shard.Endpoint) shard.Frontend {
	return shard.Frontend{Service: "ns/dist", VIP: distVIP, Port: vipPort, Protocol: shard.TCP, Endpoints: eps}
}

func TestDistribution(t *testing.T) {
	const n = 100000
	cfg := Config{ConntrackSize: 4 * n}
	h := newHarness(t, cfg)
	h.set(hashFrontend(endpointsN(4)))
	ps := flows(n, distVIP)
	first := h.lbMany(ps)

	t.Run("100,000 flows over 4 endpoints land within 5% of a quarter each", func(t *testing.T) {
		count := map[netip.AddrPort]int{}
		for _, ep := range first {
			count[ep]++
		}
		if len(count) != 4 {
			t.Fatalf("flows reached %d endpoints, want 4: %v", len(count), count)
		}
		for ep, c := range count {
			share := float64(c) / n
			t.Logf("%s: %.2f%%", ep, 100*share)
			if share < 0.25*0.95 || share > 0.25*1.05 {
				t.Errorf("%s got %.2f%% of the flows, want 25%% +-5%%", ep, 100*share)
			}
		}
	})

	t.Run("the same flow gets the same endpoint again, also without conntrack", func(t *testing.T) {
		again := h.lbMany(ps[:20000])
		clearConntrack(t, h.d)
		fresh := h.lbMany(ps[:20000])
		for i := range again {
			if again[i] != first[i] || fresh[i] != first[i] {
				t.Fatalf("flow %d went to %s, then %s, then %s without conntrack", i, first[i], again[i], fresh[i])
			}
		}
	})

	t.Run("an independently loaded instance picks the same endpoint for every flow", func(t *testing.T) {
		other := newHarness(t, cfg)
		// Endpoints in another order, as another node's informer may list them.
		eps := endpointsN(4)
		eps[0], eps[3] = eps[3], eps[0]
		other.set(hashFrontend(eps))
		got := other.lbMany(ps[:20000])
		for i := range got {
			if got[i] != first[i] {
				t.Fatalf("flow %d: %s on one instance, %s on the other", i, first[i], got[i])
			}
		}
	})
}

func TestEndpointChanges(t *testing.T) {
	const n, eps = 20000, 5
	h := newHarness(t, Config{ConntrackSize: 8 * n})
	all := endpointsN(eps)
	h.set(hashFrontend(all))
	ps := flows(n, distVIP)
	before := h.lbMany(ps)
	removed := netip.AddrPortFrom(all[2].Addr, all[2].Port)

	t.Run("established flows keep their endpoint when one is added", func(t *testing.T) {
		h.set(hashFrontend(endpointsN(eps + 1)))
		after := h.lbMany(ps)
		for i := range after {
			if after[i] != before[i] {
				t.Fatalf("flow %d moved from %s to %s when an endpoint was added", i, before[i], after[i])
			}
		}
		h.set(hashFrontend(all))
	})

	t.Run("removing one endpoint moves only its flows", func(t *testing.T) {
		rest := append(append([]shard.Endpoint{}, all[:2]...), all[3:]...)
		h.set(hashFrontend(rest))
		after := h.lbMany(ps)
		moved := 0
		for i := range after {
			switch {
			case after[i] == removed:
				t.Fatalf("flow %d still goes to the removed endpoint", i)
			case before[i] == removed:
				moved++
			case after[i] != before[i]:
				t.Fatalf("flow %d moved from %s to %s though its endpoint stayed", i, before[i], after[i])
			}
		}
		t.Logf("%d of %d flows re-selected (their endpoint was removed)", moved, n)
	})

	t.Run("new flows after a removal move as the Maglev tables say", func(t *testing.T) {
		// Without conntrack this is what another node (or this one after a restart)
		// picks: the disruption of the Maglev tables themselves, which the kernel must
		// reproduce, not add to.
		clearConntrack(t, h.d)
		after := h.lbMany(ps)
		moved, ideal := 0, 0
		for i := range after {
			if before[i] == removed {
				ideal++
			}
			if after[i] != before[i] {
				moved++
			}
		}
		table := tableDisruption(all, 2)
		got := float64(moved) / n
		t.Logf("new flows moved: %.2f%% (ideal %.2f%%, Maglev tables %.2f%% of slots)", 100*got, 100*float64(ideal)/n, 100*table)
		if diff := got - table; diff > 0.01 || diff < -0.01 {
			t.Errorf("%.2f%% of new flows moved, the tables moved %.2f%% of slots: want within 1%%", 100*got, 100*table)
		}
	})
}

// tableDisruption is the fraction of Maglev slots that change endpoint when endpoint
// gone is removed.
func tableDisruption(eps []shard.Endpoint, gone int) float64 {
	var all, rest []string
	for i, ep := range eps {
		name := netip.AddrPortFrom(ep.Addr, ep.Port).String()
		all = append(all, name)
		if i != gone {
			rest = append(rest, name)
		}
	}
	size := maglev.TableSize(len(all))
	a, b := maglev.Table(all, size), maglev.Table(rest, size)
	moved := 0
	for i := range a {
		if all[a[i]] != rest[b[i]] {
			moved++
		}
	}
	return float64(moved) / float64(size)
}

func TestSelections(t *testing.T) {
	h := newHarness(t, Config{})
	fe := hashFrontend(endpointsN(4))

	t.Run("round robin gives each endpoint its turn", func(t *testing.T) {
		fe := fe
		fe.Select = shard.SelectRoundRobin
		h.set(fe)
		count := map[netip.AddrPort]int{}
		for _, ep := range h.lbMany(flows(400, distVIP)) {
			count[ep]++
		}
		// Turns are counted per CPU: a test thread that moves between CPUs may leave one
		// partial round per CPU.
		for ep, c := range count {
			if c < 100-4 || c > 100+4 {
				t.Errorf("%s got %d of 400 flows, want 100 (+-4): %v", ep, c, count)
			}
		}
		if len(count) != 4 {
			t.Errorf("round robin reached %d endpoints, want 4", len(count))
		}
	})

	t.Run("persist sends every port of a client to one endpoint", func(t *testing.T) {
		fe := fe
		fe.Select = shard.SelectPersist
		h.set(fe)
		clearConntrack(t, h.d)
		spread := map[netip.AddrPort]bool{}
		for c := range 50 {
			client := netip.AddrFrom4([4]byte{10, 9, 0, byte(c)})
			var ps [][]byte
			for port := range 20 {
				ps = append(ps, pkt{src: netip.AddrPortFrom(client, uint16(30000+port)), dst: netip.AddrPortFrom(distVIP, vipPort), proto: shard.TCP}.bytes())
			}
			got := h.lbMany(ps)
			for _, ep := range got {
				if ep != got[0] {
					t.Fatalf("client %s reached %s and %s", client, got[0], ep)
				}
			}
			spread[got[0]] = true
		}
		if len(spread) < 3 {
			t.Errorf("50 clients reached only %d endpoints", len(spread))
		}
	})
}

func ExampleDropReasons() {
	fmt.Println(len(DropReasons()))
	// Output: 8
}
