package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/shardlb/shardlb/shard"
)

// capacityFrontend is frontend i (VIP 192.0.2.i:80/TCP, Maglev) with n endpoints of
// its own.
func capacityFrontend(i, n int) shard.Frontend {
	fe := shard.Frontend{Service: fmt.Sprintf("ns/svc%d", i), VIP: netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), Port: vipPort, Protocol: shard.TCP}
	for j := range n {
		fe.Endpoints = append(fe.Endpoints, shard.Endpoint{Addr: netip.AddrFrom4([4]byte{10, 0, byte(i), byte(j + 1)}), Port: epPort})
	}
	return fe
}

// checkServed sends a SYN to each frontend's VIP through the program: the served ones
// must be translated to one of their endpoints, the refused ones passed on untouched.
func checkServed(t *testing.T, h *harness, served, refused []shard.Frontend) {
	t.Helper()
	client := netip.AddrPortFrom(families[0].client, cliPort)
	for _, fe := range served {
		ret, out := h.lb(pkt{src: client, dst: netip.AddrPortFrom(fe.VIP, fe.Port), proto: shard.TCP}.bytes())
		if ret != actOK {
			t.Errorf("%s: action %d, want %d (translated)", fe.Service, ret, actOK)
			continue
		}
		got := endpointOf(t, out)
		ok := false
		for _, ep := range fe.Endpoints {
			ok = ok || got == netip.AddrPortFrom(ep.Addr, ep.Port)
		}
		if !ok {
			t.Errorf("%s: sent to %s, not one of its endpoints %v", fe.Service, got, fe.Endpoints)
		}
	}
	for _, fe := range refused {
		if ret, _ := h.lb(pkt{src: client, dst: netip.AddrPortFrom(fe.VIP, fe.Port), proto: shard.TCP}.bytes()); ret != actPass {
			t.Errorf("%s: action %d, want %d (passed on: the frontend is refused)", fe.Service, ret, actPass)
		}
	}
}

// refusedWith checks that err refuses exactly one frontend, fe, for being beyond a
// capacity (sentinel), with a message naming the flag to raise.
func refusedWith(t *testing.T, err error, fe shard.Frontend, sentinel error, msg string) {
	t.Helper()
	if err == nil {
		t.Fatalf("SetServices: no error, want %s refused with %q", fe.Service, msg)
	}
	want := fmt.Sprintf("frontend %s of %s: ", netip.AddrPortFrom(fe.VIP, fe.Port).String()+"/TCP", fe.Service)
	if !errors.Is(err, sentinel) || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), msg) || strings.Count(err.Error(), " of ns/") != 1 {
		t.Fatalf("SetServices: %v\nwant only %q... %q", err, want, msg)
	}
}

func TestMaxServicesRefusesTheFrontendsBeyondIt(t *testing.T) {
	h := newHarness(t, Config{MaxServices: 4, MaxEndpoints: 64, RingSlots: RingSlotsFor(4, 64)})
	fes := []shard.Frontend{capacityFrontend(1, 2), capacityFrontend(2, 2), capacityFrontend(3, 2), capacityFrontend(4, 2), capacityFrontend(5, 2)}

	t.Run("the fifth of five frontends is refused naming --maxServices, the four others are served", func(t *testing.T) {
		h.t = t
		refusedWith(t, h.d.SetServices(fes), fes[4], errServicesFull, "no free frontend slot: raise --maxServices (4)")
		checkServed(t, h, fes[:4], fes[4:])
	})

	t.Run("a frontend removed frees its slot for the refused one once the call that removes it ends", func(t *testing.T) {
		h.t = t
		// A removed frontend's service id is released at the end of the call, as its
		// ring and endpoints are (a packet may still be reading them).
		refusedWith(t, h.d.SetServices(fes[1:]), fes[4], errServicesFull, "raise --maxServices (4)")
		h.set(fes[1:]...)
		checkServed(t, h, fes[1:], fes[:1])
	})
}

func TestMaxEndpointsRefusesTheFrontendsBeyondIt(t *testing.T) {
	h := newHarness(t, Config{MaxServices: 2, MaxEndpoints: 8, RingSlots: RingSlotsFor(2, 8)})

	t.Run("a frontend whose endpoints do not fit is refused naming --maxEndpoints, the other is served", func(t *testing.T) {
		h.t = t
		// Round robin: a ring of one slot per endpoint, so only endpoints run out.
		rr := func(fe shard.Frontend) shard.Frontend { fe.Select = shard.SelectRoundRobin; return fe }
		fes := []shard.Frontend{rr(capacityFrontend(1, 3)), rr(capacityFrontend(2, 6))}
		refusedWith(t, h.d.SetServices(fes), fes[1], errEndpointsFull, "no free endpoint slot: raise --maxEndpoints (8)")
		checkServed(t, h, fes[:1], fes[1:])
		// The ids the refused frontend took were given back: 3 + 5 fit.
		fes[1].Endpoints = fes[1].Endpoints[:5]
		h.set(fes...)
		checkServed(t, h, fes, nil)
	})

	t.Run("a frontend whose ring does not fit is refused naming --maxEndpoints, which sizes the rings", func(t *testing.T) {
		h.t = t
		// 512 slots (64 per endpoint slot): a ring of 3 endpoints takes 510, the
		// smallest ring 252.
		h.set()
		fes := []shard.Frontend{capacityFrontend(1, 3), capacityFrontend(2, 1)}
		refusedWith(t, h.d.SetServices(fes), fes[1], errRingFull, "no free ring slots: raise --maxEndpoints (8), which gives the rings 64 slots per endpoint (512 in all)")
		checkServed(t, h, fes[:1], fes[1:])
		h.set() // the ring is released at the end of this call
		h.set(fes[1])
		checkServed(t, h, fes[1:], fes[:1])
	})
}

// TestEstimateMemoryMatchesTheLoadedMaps checks EstimateMemory's sizes against what
// the kernel reports of the maps New loaded with the same Config: every map, its
// entries, key and value sizes; and, at the default sizes, the estimate against the
// memory the kernel accounts to them.
func TestEstimateMemoryMatchesTheLoadedMaps(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"small sizes", Config{ConntrackSize: 4096, MaxServices: 64, MaxEndpoints: 256, MaxSourceRanges: 8, SourceRangeEntries: 128}},
		{"the default sizes", DefaultConfig()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			cfg.setDefaults() // the harness would size zero fields otherwise
			h := newHarness(t, cfg)
			est, err := EstimateMemory(cfg, runtime.NumCPU())
			if err != nil {
				t.Fatal(err)
			}
			loaded := map[string]*ebpf.Map{
				lbMapConntrack4Tcp: h.d.objs.Conntrack4Tcp, lbMapConntrack4Udp: h.d.objs.Conntrack4Udp, lbMapConntrack6: h.d.objs.Conntrack6,
				lbMapDrops: h.d.objs.Drops, lbMapEndpointNhs: h.d.objs.EndpointNhs, lbMapEndpoints: h.d.objs.Endpoints,
				lbMapNewEntry: h.d.objs.NewEntry, lbMapRingSlots: h.d.objs.RingSlots, lbMapServiceStats: h.d.objs.ServiceStats,
				lbMapServices: h.d.objs.Services, lbMapSourceRanges4: h.d.objs.SourceRanges4, lbMapSourceRanges6: h.d.objs.SourceRanges6,
				lbMapVips: h.d.objs.Vips, lbMapSnatTimeWaitReuses: h.d.objs.SnatTimeWaitReuses,
			}
			if len(est.Maps) != len(loaded) {
				t.Errorf("estimate counts %d maps, the datapath loads %d", len(est.Maps), len(loaded))
			}
			var total uint64
			for _, e := range est.Maps {
				m := loaded[e.Name]
				if m == nil {
					t.Errorf("estimate counts map %s, which the datapath does not load", e.Name)
					continue
				}
				info, err := m.Info()
				if err != nil {
					t.Fatal(err)
				}
				got := mapEstimate(e.Name, info.Type, info.MaxEntries, info.KeySize, info.ValueSize, runtime.NumCPU())
				if got != e {
					t.Errorf("map %s: estimated %+v, loaded %+v", e.Name, e, got)
				}
				total += got.Bytes
			}
			if est.Total != total {
				t.Errorf("estimate totals %d bytes, its maps %d", est.Total, total)
			}
			if e := est.Maps[0]; e.Name != lbMapConntrack4Tcp || e.MaxEntries != uint32(cfg.ConntrackSize) {
				t.Errorf("first map %+v, want conntrack4_tcp of %d entries", e, cfg.ConntrackSize)
			}
			mem, err := h.d.MapMemory()
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%d CPUs: estimated %.1f MiB, the kernel accounts %.1f MiB", runtime.NumCPU(), float64(est.Total)/(1<<20), float64(mem)/(1<<20))
			// The kernel adds per-CPU LRU lists, locks and page rounding to the
			// estimate, and counts only the prefixes the tries hold.
			if cfg.ConntrackSize == DefaultConntrackSize && (float64(est.Total) < 0.9*float64(mem) || float64(est.Total) > 1.1*float64(mem)) {
				t.Errorf("at the default sizes the estimate, %d bytes, is more than 10%% off the %d the kernel accounts", est.Total, mem)
			}
		})
	}
}
