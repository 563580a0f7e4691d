package datapath

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/shardlb/shardlb/internal/testenv"
	"github.com/shardlb/shardlb/shard"
)

// bpffsRoot mounts a bpf filesystem of the test's own on a temporary directory and
// unmounts it when the test ends.
func bpffsRoot(t *testing.T) string {
	t.Helper()
	testenv.RequireRoot(t)
	dir := t.TempDir()
	if err := syscall.Mount("bpf", dir, "bpf", 0, ""); err != nil {
		testenv.Unavailable(t, "mount bpffs on %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Errorf("unmount bpffs %s: %v", dir, err)
		}
	})
	return dir
}

// pinPathFor returns a pin path of its own for t under root; whatever is left pinned
// there is removed when t ends (after every Datapath t opened is closed or released).
func pinPathFor(t *testing.T, root string) string {
	t.Helper()
	p := filepath.Join(root, strings.NewReplacer("/", "_", " ", "_").Replace(t.Name()))
	t.Cleanup(func() {
		if err := Cleanup(p); err != nil {
			t.Errorf("Cleanup(%s): %v", p, err)
		}
	})
	return p
}

// logBuffer is a slog.Logger writing to the test's output and to a buffer the test
// reads back.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) lines() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Split(strings.TrimSpace(b.buf.String()), "\n")
}

func newLogBuffer(t *testing.T) (*slog.Logger, *logBuffer) {
	b := &logBuffer{}
	return slog.New(slog.NewTextHandler(io.MultiWriter(t.Output(), b), nil)), b
}

// openPinned runs New and closes the Datapath when the test ends unless the test
// released or closed it first.
func openPinned(t *testing.T, cfg Config, log *slog.Logger) *Datapath {
	t.Helper()
	if log == nil {
		log = slog.New(slog.NewTextHandler(t.Output(), nil))
	}
	d, err := New(cfg, log)
	if err != nil {
		t.Fatalf("New with pin path %s: %v", cfg.PinPath, err)
	}
	t.Cleanup(func() { _ = d.Release() })
	return d
}

// smallConfig keeps load-only tests' maps small.
func smallConfig(pinPath string) Config {
	return Config{
		PinPath: pinPath, ConntrackSize: 1024, MaxServices: 64, MaxEndpoints: 256, RingSlots: 1 << 14,
		NodeIPv4: netip.MustParseAddr("192.0.2.1"), NodeIPv6: netip.MustParseAddr("2001:db8::1"),
	}
}

func TestPinPath(t *testing.T) {
	root := bpffsRoot(t)

	t.Run("a pin path that is not on bpffs is refused with a hint to mount it", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "shardlb")
		_, err := New(smallConfig(p), slog.New(slog.NewTextHandler(t.Output(), nil)))
		if !errors.Is(err, ErrNotBPFFS) || !strings.Contains(err.Error(), "mount -t bpf bpf /sys/fs/bpf") {
			t.Fatalf("New on a non-bpffs path: err %v, want ErrNotBPFFS with the mount command", err)
		}
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("New created %s on a file system it refused", p)
		}
	})

	t.Run("Cleanup of a pin path that does not exist does nothing", func(t *testing.T) {
		if err := Cleanup(filepath.Join(root, "never-used")); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("one datapath at a time holds a pin path; Release leaves the maps pinned for the next, Close removes them", func(t *testing.T) {
		p := pinPathFor(t, root)
		d := openPinned(t, smallConfig(p), nil)
		if _, err := New(smallConfig(p), slog.New(slog.NewTextHandler(t.Output(), nil))); !errors.Is(err, ErrPinPathInUse) {
			t.Fatalf("second New: err %v, want ErrPinPathInUse", err)
		}
		if err := Cleanup(p); !errors.Is(err, ErrPinPathInUse) {
			t.Fatalf("Cleanup while a datapath holds the path: err %v, want ErrPinPathInUse", err)
		}
		if err := d.Release(); err != nil {
			t.Fatal(err)
		}
		want := append(slices.Clone(pinnedMaps), pinLayout)
		slices.Sort(want)
		if got := dirNames(filepath.Join(p, pinMaps)); !slices.Equal(got, want) {
			t.Fatalf("pinned after Release: %v, want %v", got, want)
		}
		d = openPinned(t, smallConfig(p), nil)
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("pin path after Close: %v, want it removed", err)
		}
	})
}

// churnedFrontends are frontends of every mode, selection and family, reached through
// a few updates so that ids, generations and ring ranges are not simply in order, some
// with source ranges (changed, removed, of both families, of the other family only).
func churnedFrontends(t *testing.T, d *Datapath) []shard.Frontend {
	t.Helper()
	ep := func(s string, port uint16) shard.Endpoint {
		return shard.Endpoint{Addr: netip.MustParseAddr(s), Port: port}
	}
	v4 := func(i int) shard.Endpoint { return ep(fmt.Sprintf("198.51.100.%d", i), 8080) }
	v6 := func(i int) shard.Endpoint { return ep(fmt.Sprintf("2001:db8:2::%d", i), 8080) }
	fe := func(name, vip string, port uint16, proto shard.Protocol, m shard.Mode, s shard.Select, eps ...shard.Endpoint) shard.Frontend {
		return shard.Frontend{Service: name, VIP: netip.MustParseAddr(vip), Port: port, Protocol: proto, Mode: m, Select: s, Endpoints: eps}
	}
	steps := [][]shard.Frontend{
		{
			fe("ns/a", "203.0.113.1", 80, shard.TCP, shard.ModeDefault, shard.SelectHash, v4(1), v4(2), v4(3)),
			fe("ns/gone", "203.0.113.9", 80, shard.TCP, shard.ModeDefault, shard.SelectHash, v4(7), v4(8)),
			fe("ns/b", "203.0.113.2", 53, shard.UDP, shard.ModeOneArm, shard.SelectRoundRobin, v4(4), v4(5)),
		},
		{
			fe("ns/a", "203.0.113.1", 80, shard.TCP, shard.ModeDefault, shard.SelectHash, v4(2), v4(3), v4(6)),
			fe("ns/b", "203.0.113.2", 53, shard.UDP, shard.ModeOneArm, shard.SelectRoundRobin, v4(4), v4(5), v4(9)),
			fe("ns/c", "2001:db8:1::1", 443, shard.TCP, shard.ModeFullNAT, shard.SelectPersist, v6(1), v6(2)),
		},
	}
	last := []shard.Frontend{
		fe("ns/a", "203.0.113.1", 80, shard.TCP, shard.ModeDefault, shard.SelectHash, v4(3), v4(6), v4(2), v4(10)),
		fe("ns/b", "203.0.113.2", 53, shard.UDP, shard.ModeOneArm, shard.SelectRoundRobin, v4(5), v4(9)),
		fe("ns/c", "2001:db8:1::1", 443, shard.TCP, shard.ModeFullNAT, shard.SelectPersist, v6(1), v6(2), v6(3)),
		fe("ns/d", "203.0.113.1", 443, shard.TCP, shard.ModeOneArm, shard.SelectHash, v4(1)),
		fe("ns/empty", "2001:db8:1::2", 80, shard.UDP, shard.ModeDefault, shard.SelectHash),
	}
	last[3].Handoff = netip.MustParseAddr("192.0.2.7")
	steps[0][2].SourceRanges = prefixes("10.0.0.0/8")
	steps[1][0].SourceRanges = prefixes("10.0.0.0/8", "172.16.0.0/12")
	steps[1][2].SourceRanges = prefixes("2001:db8:9::/48")
	last[0].SourceRanges = prefixes("172.16.0.0/12", "10.0.0.0/8", "192.168.0.0/16", "2001:db8::/32")
	last[2].SourceRanges = prefixes("2001:db8:9::/48", "2001:db8:a::/48", "10.0.0.0/8")
	last[4].SourceRanges = prefixes("10.0.0.0/8")
	for _, fes := range append(steps, last) {
		if err := d.SetServices(fes); err != nil {
			t.Fatalf("SetServices: %v", err)
		}
	}
	return last
}

// goState describes the Go-side state: every applied frontend (without the service
// name, which the maps do not hold), the free ring spans, the ids that can be handed out
// and the endpoint generations.
func goState(d *Datapath) string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var b strings.Builder
	keys := slices.SortedFunc(maps.Keys(d.applied), func(a, b frontendKey) int { return strings.Compare(a.String(), b.String()) })
	for _, k := range keys {
		a := d.applied[k]
		fe := a.fe
		// The maps hold the ranges written, below, not the other family's.
		fe.Service, fe.SourceRanges = "", nil
		eps := slices.SortedFunc(maps.Keys(a.endpoints), netip.AddrPort.Compare)
		fmt.Fprintf(&b, "%s: id %d ring %d+%d/%d stale %v %+v\n", k, a.id, a.ringStart, a.ringSize, a.ringLen, a.stale, fe)
		fmt.Fprintf(&b, "  source ranges: restricted %v %v generation %d\n", a.restricted, a.ranges, a.rangeGen)
		for _, ep := range eps {
			fmt.Fprintf(&b, "  %s id %d\n", ep, a.endpoints[ep])
		}
	}
	fmt.Fprintf(&b, "free ring spans %v\n", d.rings.free)
	fmt.Fprintf(&b, "free endpoint ids %v\n", freeIDs(d.epIDs))
	fmt.Fprintf(&b, "free service ids %v\n", freeIDs(d.svcIDs))
	fmt.Fprintf(&b, "endpoint generations %v\n", d.epGen)
	fmt.Fprintf(&b, "VIPs %v\n", d.vipRefs)
	fmt.Fprintf(&b, "source range entries %v\n", d.rangeCount)
	return b.String()
}

// freeIDs lists the ids a would hand out, in order.
func freeIDs(a idAlloc) []uint32 {
	ids := slices.Clone(a.free)
	for id := a.next; id < a.capacity; id++ {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// mapState dumps what Go writes into the kernel: services, VIPs, endpoints, rings,
// source ranges.
func mapState(t *testing.T, d *Datapath) string {
	t.Helper()
	var b strings.Builder
	var lines []string
	var sk lbServiceKey
	var sv lbService
	it := d.objs.Services.Iterate()
	for it.Next(&sk, &sv) {
		lines = append(lines, fmt.Sprintf("service %+v = %+v", sk, sv))
	}
	var vk lbVipKey
	var vv uint32
	it2 := d.objs.Vips.Iterate()
	for it2.Next(&vk, &vv) {
		lines = append(lines, fmt.Sprintf("vip %+v = %d", vk, vv))
	}
	if err := errors.Join(it.Err(), it2.Err()); err != nil {
		t.Fatal(err)
	}
	for id, ps := range trieState(t, d) {
		lines = append(lines, fmt.Sprintf("source ranges of %d: %v", id, ps))
	}
	slices.Sort(lines)
	b.WriteString(strings.Join(lines, "\n"))
	eps, err := readArray[lbEndpoint](d.objs.Endpoints, d.cfg.MaxEndpoints)
	if err != nil {
		t.Fatal(err)
	}
	ring, err := readArray[lbRingPair](d.objs.RingSlots, d.cfg.RingSlots/2)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(&b, "\nendpoints %+v\nring %v\n", eps, ring)
	return b.String()
}

func firstDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	for i := range min(len(al), len(bl)) {
		if al[i] != bl[i] {
			return fmt.Sprintf("line %d:\n  before: %.300s\n  after:  %.300s", i+1, al[i], bl[i])
		}
	}
	return fmt.Sprintf("%d lines before, %d after", len(al), len(bl))
}

// TestAdoption restarts one datapath again and again on the same pin path, each step
// starting from what the previous one released.
func TestAdoption(t *testing.T) {
	root := bpffsRoot(t)
	p := pinPathFor(t, root)
	cfg := smallConfig(p)
	d := openPinned(t, cfg, nil)
	desired := churnedFrontends(t, d)
	wantGo, wantMaps := goState(d), mapState(t, d)
	if err := d.Release(); err != nil {
		t.Fatal(err)
	}
	release := func(t *testing.T, d *Datapath) {
		t.Helper()
		if err := d.Release(); err != nil {
			t.Fatal(err)
		}
	}
	warnings := func(buf *logBuffer) []string {
		var warned []string
		for _, l := range buf.lines() {
			if strings.Contains(l, "level=WARN") {
				warned = append(warned, l)
			}
		}
		return warned
	}

	t.Run("a new datapath rebuilds the ids, rings and allocators from the pinned maps and rewrites nothing", func(t *testing.T) {
		d := openPinned(t, cfg, nil)
		defer release(t, d)
		if got := goState(d); got != wantGo {
			t.Fatalf("Go state rebuilt from the pinned maps differs, %s", firstDiff(wantGo, got))
		}
		// The same frontends in another order, endpoints shuffled: nothing to write.
		shuffled := slices.Clone(desired)
		slices.Reverse(shuffled)
		for i := range shuffled {
			shuffled[i].Endpoints = slices.Clone(shuffled[i].Endpoints)
			slices.Reverse(shuffled[i].Endpoints)
		}
		if err := d.SetServices(shuffled); err != nil {
			t.Fatal(err)
		}
		if got := mapState(t, d); got != wantMaps {
			t.Fatalf("the first SetServices after adoption rewrote the maps, %s", firstDiff(wantMaps, got))
		}
		if got := goState(d); got != wantGo {
			t.Fatalf("the first SetServices after adoption changed the Go state, %s", firstDiff(wantGo, got))
		}
		if st := d.Stats(); len(st.Services) != len(desired) || st.Services[0].Service == "" {
			t.Fatalf("stats after adoption name no service: %+v", st.Services)
		}
	})

	cfg.NodeIPv4 = netip.MustParseAddr("192.0.2.2")
	t.Run("with another node address, endpoints that stay keep their ids and onearm services SNAT to the new address", func(t *testing.T) {
		d := openPinned(t, cfg, nil)
		defer release(t, d)
		k := frontendKey{desired[0].VIP, desired[0].Port, desired[0].Protocol}
		onearm := frontendKey{desired[1].VIP, desired[1].Port, desired[1].Protocol}
		if d.applied[k] == nil || d.applied[onearm] == nil {
			t.Fatalf("frontends %s and %s not adopted", k, onearm)
		}
		before := maps.Clone(d.applied[k].endpoints)
		onearmIDs := maps.Clone(d.applied[onearm].endpoints)
		if !d.applied[onearm].stale {
			t.Errorf("onearm frontend %s adopted with the old node address is not marked for rewriting", onearm)
		}
		changed := slices.Clone(desired)
		changed[0].Endpoints = append(slices.Clone(changed[0].Endpoints), shard.Endpoint{Addr: netip.MustParseAddr("198.51.100.11"), Port: 8080})
		if err := d.SetServices(changed); err != nil {
			t.Fatal(err)
		}
		after := d.applied[k].endpoints
		for ap, id := range before {
			if after[ap] != id {
				t.Errorf("endpoint %s had id %d before the restart, %d after the update", ap, id, after[ap])
			}
		}
		if len(after) != len(before)+1 {
			t.Errorf("%d endpoints after adding one to %d", len(after), len(before))
		}
		if got := d.applied[onearm].endpoints; !maps.Equal(got, onearmIDs) {
			t.Errorf("onearm frontend's endpoint ids %v before, %v after the node address changed", onearmIDs, got)
		}
		key := serviceKey(onearm.vip, onearm.port, onearm.proto)
		var svc lbService
		if err := d.objs.Services.Lookup(&key, &svc); err != nil {
			t.Fatal(err)
		}
		if svc.SnatAddr != addrWords(cfg.NodeIPv4) {
			t.Errorf("onearm service entry SNATs to %v after SetServices, want the new node address %s", svc.SnatAddr, cfg.NodeIPv4)
		}
	})

	t.Run("what an interrupted update left is completed: stray endpoints invalidated, stray VIPs removed", func(t *testing.T) {
		eps, err := ebpf.LoadPinnedMap(filepath.Join(p, pinMaps, lbMapEndpoints), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer eps.Close()
		vips, err := ebpf.LoadPinnedMap(filepath.Join(p, pinMaps, lbMapVips), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer vips.Close()
		stray := uint32(cfg.MaxEndpoints - 1) // an id no frontend uses
		var e lbEndpoint
		if err := eps.Lookup(stray, &e); err != nil {
			t.Fatal(err)
		}
		gen := e.Gen
		addr := netip.MustParseAddr("198.51.100.99")
		if err := eps.Put(stray, &lbEndpoint{Addr: addrWords(addr), Port: htons(80), Family: afInet, Valid: 1, Gen: gen}); err != nil {
			t.Fatal(err)
		}
		strayVIP := lbVipKey{Addr: addrWords(netip.MustParseAddr("203.0.113.99")), Family: afInet}
		if err := vips.Put(&strayVIP, uint32(1)); err != nil {
			t.Fatal(err)
		}
		// A prefix of a service id no frontend has, one of an unrestricted frontend (as
		// a change that removed the ranges leaves it until its last step), and an
		// endpoint whose frontend's range generation did not reach it.
		tries, err := ebpf.LoadPinnedMap(filepath.Join(p, pinMaps, lbMapSourceRanges4), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tries.Close()
		svcs, err := ebpf.LoadPinnedMap(filepath.Join(p, pinMaps, lbMapServices), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer svcs.Close()
		var open lbService
		openKey := serviceKey(desired[3].VIP, desired[3].Port, desired[3].Protocol) // ns/d, no ranges
		if err := svcs.Lookup(&openKey, &open); err != nil {
			t.Fatal(err)
		}
		strayRanges := []lbRange4Key{
			range4Key(uint32(cfg.MaxServices-1), netip.MustParsePrefix("10.0.0.0/8")),
			range4Key(open.Id, netip.MustParsePrefix("10.0.0.0/8")),
		}
		for _, k := range strayRanges {
			if err := tries.Put(&k, uint32(1)); err != nil {
				t.Fatal(err)
			}
		}
		restricted := frontendKey{desired[0].VIP, desired[0].Port, desired[0].Protocol}
		all, err := readArray[lbEndpoint](eps, cfg.MaxEndpoints)
		if err != nil {
			t.Fatal(err)
		}
		epID := uint32(slices.IndexFunc(all, func(e lbEndpoint) bool {
			return e.Valid == 1 && e.Addr == addrWords(desired[0].Endpoints[0].Addr)
		}))
		e = all[epID]
		e.RangeGen--
		if err := eps.Put(epID, &e); err != nil {
			t.Fatal(err)
		}

		d := openPinned(t, cfg, nil)
		defer release(t, d)
		if err := d.objs.Endpoints.Lookup(stray, &e); err != nil {
			t.Fatal(err)
		}
		if e.Valid != 0 || e.Gen != gen+1 || d.epGen[stray] != gen+1 {
			t.Errorf("stray endpoint %d after adoption: %+v (Go generation %d), want invalid with generation %d", stray, e, d.epGen[stray], gen+1)
		}
		var v uint32
		if err := d.objs.Vips.Lookup(&strayVIP, &v); !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Errorf("stray VIP after adoption: lookup err %v, want it removed", err)
		}
		for _, k := range strayRanges {
			if err := d.objs.SourceRanges4.Lookup(&k, &v); !errors.Is(err, ebpf.ErrKeyNotExist) {
				t.Errorf("source range %+v of no restricted frontend after adoption: lookup err %v, want it removed", k, err)
			}
		}
		if err := d.objs.Endpoints.Lookup(epID, &e); err != nil || e.RangeGen != d.applied[restricted].rangeGen {
			t.Errorf("endpoint %d after adoption: range generation %d (%v), want its frontend's %d", epID, e.RangeGen, err, d.applied[restricted].rangeGen)
		}
	})

	cfg.ConntrackSize *= 2
	t.Run("maps of other capacities are replaced and the reason logged in one line", func(t *testing.T) {
		log, buf := newLogBuffer(t)
		d := openPinned(t, cfg, log)
		defer release(t, d)
		if len(d.applied) != 0 {
			t.Errorf("%d frontends adopted from incompatible maps, want none", len(d.applied))
		}
		warned := warnings(buf)
		if len(warned) != 1 || !strings.Contains(warned[0], "incompatible") ||
			!strings.Contains(warned[0], "map conntrack4_tcp: MaxEntries: 1024 changed to 2048 (Config.ConntrackSize)") {
			t.Fatalf("warnings %q, want one naming conntrack4_tcp's capacity", warned)
		}
		info, err := d.objs.Conntrack4Tcp.Info()
		if err != nil || info.MaxEntries != 2048 {
			t.Fatalf("conntrack after replacement: %+v %v, want 2048 entries", info, err)
		}
		if err := d.SetServices(desired); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("maps whose recorded layout differs are replaced", func(t *testing.T) {
		layout, err := ebpf.LoadPinnedMap(filepath.Join(p, pinMaps, pinLayout), nil)
		if err != nil {
			t.Fatal(err)
		}
		// As if the previous program's conntrack entries had another layout.
		if err := layout.Put(layoutKey(lbMapConntrack6), [32]byte{1}); err != nil {
			t.Fatal(err)
		}
		layout.Close()
		log, buf := newLogBuffer(t)
		d := openPinned(t, cfg, log)
		defer release(t, d)
		if len(d.applied) != 0 {
			t.Errorf("%d frontends adopted from maps of another layout, want none", len(d.applied))
		}
		if warned := warnings(buf); len(warned) != 1 || !strings.Contains(warned[0], `reason="map conntrack6: key or value layout changed"`) {
			t.Fatalf("warnings %q, want one saying conntrack6's layout changed", warned)
		}
		if err := d.SetServices(desired); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("maps pinned by a program without source ranges are replaced, the reason naming the missing maps", func(t *testing.T) {
		layout, err := ebpf.LoadPinnedMap(filepath.Join(p, pinMaps, pinLayout), nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{lbMapSourceRanges4, lbMapSourceRanges6} {
			if err := layout.Delete(layoutKey(name)); err != nil {
				t.Fatal(err)
			}
			if err := os.Remove(filepath.Join(p, pinMaps, name)); err != nil {
				t.Fatal(err)
			}
		}
		layout.Close()
		log, buf := newLogBuffer(t)
		d := openPinned(t, cfg, log)
		defer release(t, d)
		if len(d.applied) != 0 {
			t.Errorf("%d frontends adopted from maps without source ranges, want none", len(d.applied))
		}
		warned := warnings(buf)
		if len(warned) != 1 || !strings.Contains(warned[0], "map source_ranges4 is not pinned (pinned by a program without it); map source_ranges6 is not pinned") {
			t.Fatalf("warnings %q, want one naming the missing source-range maps", warned)
		}
		if err := d.SetServices(desired); err != nil {
			t.Fatal(err)
		}
		if n := len(trieState(t, d)); n == 0 {
			t.Error("no source ranges written into the new maps")
		}
	})
}

// TestEveryMapIsPinned checks that a map added to the program is pinned (and so part of
// the layout record and of adoption) unless it belongs to one program (perProgramMaps).
func TestEveryMapIsPinned(t *testing.T) {
	spec, err := loadLb()
	if err != nil {
		t.Fatal(err)
	}
	for name := range spec.Maps {
		if strings.HasPrefix(name, ".") || slices.Contains(perProgramMaps, name) {
			continue // the program's global variables
		}
		if !slices.Contains(pinnedMaps, name) {
			t.Errorf("map %s is not in pinnedMaps: a restart would not find what it holds", name)
		}
	}
}

func TestLayoutDigest(t *testing.T) {
	spec, err := loadLb()
	if err != nil {
		t.Fatal(err)
	}
	ms := spec.Maps[lbMapConntrack4Tcp]
	base, err := layoutDigest(ms)
	if err != nil {
		t.Fatal(err)
	}
	same := ms.Copy()
	same.Key = btf.Copy(ms.Key)
	if got, _ := layoutDigest(same); got != base {
		t.Error("a copy of conntrack4_tcp's spec has another digest")
	}
	// Same sizes, same offsets, two ports swapped: a program that reads the other one
	// would translate every flow to the wrong port.
	swapped := ms.Copy()
	key := btf.Copy(ms.Key).(*btf.Struct)
	key.Members[2].Name, key.Members[3].Name = key.Members[3].Name, key.Members[2].Name
	swapped.Key = key
	if got, _ := layoutDigest(swapped); got == base {
		t.Error("swapping sport and dport in the key left the digest unchanged")
	}
	if other, _ := layoutDigest(spec.Maps[lbMapConntrack4Udp]); other == base {
		t.Error("conntrack4_udp has the digest of conntrack4_tcp: the map name is not part of it")
	}
}
