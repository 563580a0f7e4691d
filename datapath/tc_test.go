package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/shardlb/shardlb/internal/testenv"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// counter is another party's tc program: it counts the packets it sees and hands them
// on (TC_ACT_UNSPEC).
type counter struct {
	prog *ebpf.Program
	m    *ebpf.Map
}

func newCounter(t *testing.T) *counter {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:    "counter",
		Type:    ebpf.SchedCLS,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.LoadMapPtr(asm.R1, m.FD()),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, -1).WithSymbol("out"),
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prog.Close() })
	return &counter{prog: prog, m: m}
}

func (c *counter) count(t *testing.T) uint64 {
	t.Helper()
	var n uint64
	if err := c.m.Lookup(uint32(0), &n); err != nil {
		t.Fatal(err)
	}
	return n
}

// attach adds the counter as a direct-action bpf filter at the ingress of ifname, adding
// a clsact qdisc first when there is none.
func (c *counter) attach(t *testing.T, nsPath, ifname string, prio uint16, handle uint32, name string) {
	t.Helper()
	inNS(t, nsPath, func() error {
		lk, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		if _, err := ensureClsact(lk); err != nil {
			return err
		}
		return netlink.FilterAdd(&netlink.BpfFilter{
			FilterAttrs: netlink.FilterAttrs{LinkIndex: lk.Attrs().Index, Parent: netlink.HANDLE_MIN_INGRESS,
				Handle: handle, Priority: prio, Protocol: unix.ETH_P_ALL},
			Fd: c.prog.FD(), Name: name, DirectAction: true,
		})
	})
}

// inNS runs fn inside the namespace at path and fails the test on its error.
func inNS(t *testing.T, path string, fn func() error) {
	t.Helper()
	if err := inNetNSPath(path, fn); err != nil {
		t.Fatal(err)
	}
}

// sendUDP sends n datagrams from the namespace ns to dst.
func sendUDP(t *testing.T, ns netns.NsHandle, dst netip.AddrPort, n int) {
	t.Helper()
	var c *net.UDPConn
	var err error
	// Not connected: a connected socket would fail the write after an ICMP error came
	// back, and send nothing.
	inNetNS(t, ns, func() { c, err = net.ListenUDP("udp", nil) })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range n {
		if _, err := c.WriteToUDPAddrPort(fmt.Appendf(nil, "datagram %d", i), dst); err != nil {
			t.Fatal(err)
		}
	}
}

// hooks is what runs at the ingress of one interface: tcx programs, the clsact (or
// ingress) qdisc's kind ("" for none), its ingress filters.
type hooks struct {
	tcx     []link.AttachedProgram
	qdisc   string
	filters []netlink.Filter
}

func hooksOf(t *testing.T, nsPath, ifname string) hooks {
	t.Helper()
	var h hooks
	inNS(t, nsPath, func() error {
		lk, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: lk.Attrs().Index, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return fmt.Errorf("query tcx of %s: %w", ifname, err)
		}
		h.tcx = res.Programs
		q, err := ingressQdisc(lk)
		if err != nil || q == nil {
			return err
		}
		h.qdisc = q.Type()
		h.filters, err = netlink.FilterList(lk, netlink.HANDLE_MIN_INGRESS)
		return err
	})
	return h
}

// ourFilter returns the datapath's filter among h's, nil if there is none.
func (h hooks) ourFilter() *netlink.BpfFilter {
	for _, f := range h.filters {
		if b, ok := f.(*netlink.BpfFilter); ok && b.Priority == tcPriority && b.Handle == tcHandle && b.Name == tcFilterName {
			return b
		}
	}
	return nil
}

func (h hooks) String() string {
	var fs []string
	for _, f := range h.filters {
		fs = append(fs, describeFilter(f))
	}
	return fmt.Sprintf("%d tcx programs, qdisc %q, filters [%s]", len(h.tcx), h.qdisc, strings.Join(fs, "; "))
}

func progID(t *testing.T, p *ebpf.Program) int {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return int(id)
}

// attachNS is a namespace with a veth t0 whose peer is in a namespace of its own, for
// tests that only look at attachments.
func attachNS(t *testing.T) string {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "ip", "tc")
	nn := testenv.NewNetNS(t, "dpatt")
	testenv.Veth(t, nn, "t0", "", testenv.NewNetNS(t, "dpattp"), "p0", "")
	return "/var/run/netns/" + nn.Name
}

func TestParseAttachMode(t *testing.T) {
	for _, s := range []string{"auto", "tcx", "tc"} {
		if m, err := ParseAttachMode(s); err != nil || string(m) != s {
			t.Errorf("ParseAttachMode(%q) = %q, %v", s, m, err)
		}
	}
	for _, s := range []string{"", "TC", "xdp", "tcx "} {
		m, err := ParseAttachMode(s)
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("%q", s)) || !strings.Contains(err.Error(), "auto, tcx or tc") {
			t.Errorf("ParseAttachMode(%q) = %q, %v: want an error naming the value and the choices", s, m, err)
		}
	}
	if _, err := New(Config{AttachMode: "xdp"}, slog.New(slog.NewTextHandler(t.Output(), nil))); err == nil || !strings.Contains(err.Error(), `"xdp"`) {
		t.Errorf("New with attach mode xdp: %v, want the parse error", err)
	}
}

func TestMissingInterface(t *testing.T) {
	_, err := New(Config{Interfaces: []string{"lo", "shardlb-none0", "shardlb-none1"}}, slog.New(slog.NewTextHandler(t.Output(), nil)))
	if !errors.Is(err, ErrNoInterface) || !strings.Contains(err.Error(), `"shardlb-none0", "shardlb-none1"`) || strings.Contains(err.Error(), `"lo"`) {
		t.Fatalf("New with interfaces that do not exist: %v, want ErrNoInterface naming both and only them", err)
	}
	t.Logf("the error reads: %v", err)
}

func TestAttachMode(t *testing.T) {
	nsPath := attachNS(t)
	open := func(t *testing.T, cfg Config) (*Datapath, *logBuffer) {
		t.Helper()
		cfg.Interfaces, cfg.NetNS = []string{"t0"}, nsPath
		cfg.ConntrackSize, cfg.MaxServices, cfg.MaxEndpoints, cfg.RingSlots = 1024, 64, 256, 1<<14
		log, buf := newLogBuffer(t)
		d, err := New(cfg, log)
		if err != nil {
			t.Fatal(err)
		}
		return d, buf
	}
	chosen := func(t *testing.T, buf *logBuffer) string {
		t.Helper()
		for _, line := range buf.lines() {
			if strings.Contains(line, "datapath hook chosen") {
				return line
			}
		}
		t.Fatal("no log line says which hook was chosen")
		return ""
	}
	closed := func(t *testing.T, d *Datapath) {
		t.Helper()
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		if h := hooksOf(t, nsPath, "t0"); len(h.tcx) != 0 || h.qdisc != "" {
			t.Errorf("after Close: %s, want nothing", h)
		}
	}

	t.Run("the probe finds tcx on this kernel", func(t *testing.T) {
		d, _ := open(t, Config{AttachMode: AttachTC})
		defer closed(t, d)
		if err := probeTCX(d.objs.LbIngress); err != nil {
			t.Fatalf("probeTCX: %v", err)
		}
	})

	t.Run("auto takes tcx here, and says why", func(t *testing.T) {
		d, buf := open(t, Config{})
		defer closed(t, d)
		if line := chosen(t, buf); !strings.Contains(line, "hook=tcx-ingress") || !strings.Contains(line, "the kernel has tcx") {
			t.Errorf("log: %s", line)
		}
		h := hooksOf(t, nsPath, "t0")
		if len(h.tcx) != 1 || h.tcx[0].ID != ebpf.ProgramID(progID(t, d.objs.LbIngress)) || h.qdisc != "" {
			t.Errorf("%s, want the program at tcx and no qdisc", h)
		}
	})

	t.Run("auto takes tc when the probe finds no tcx, and says why", func(t *testing.T) {
		noTCX := func(*ebpf.Program) error { return fmt.Errorf("tcx: %w", ebpf.ErrNotSupported) }
		d, buf := open(t, Config{probeTCX: noTCX})
		defer closed(t, d)
		if line := chosen(t, buf); !strings.Contains(line, "hook=tc-ingress") || !strings.Contains(line, "tcx unavailable") {
			t.Errorf("log: %s", line)
		}
		h := hooksOf(t, nsPath, "t0")
		if f := h.ourFilter(); len(h.tcx) != 0 || len(h.filters) != 1 || f == nil || f.Id != progID(t, d.objs.LbIngress) || !f.DirectAction {
			t.Errorf("%s, want only the datapath's direct-action filter", h)
		}
	})

	t.Run("tc attaches a filter with a clsact qdisc, and Close removes both", func(t *testing.T) {
		d, buf := open(t, Config{AttachMode: AttachTC})
		if line := chosen(t, buf); !strings.Contains(line, "hook=tc-ingress") || !strings.Contains(line, `reason="attach mode tc"`) {
			t.Errorf("log: %s", line)
		}
		h := hooksOf(t, nsPath, "t0")
		if h.qdisc != "clsact" || h.ourFilter() == nil || len(h.filters) != 1 {
			t.Errorf("%s, want a clsact qdisc holding the datapath's filter", h)
		}
		closed(t, d)
	})

	t.Run("a tcx process after a killed tc process removes the filter it left", func(t *testing.T) {
		d, _ := open(t, Config{AttachMode: AttachTC})
		// What a killed process leaves: the filter stays, the descriptors go.
		d.filters = nil
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		if h := hooksOf(t, nsPath, "t0"); h.ourFilter() == nil {
			t.Fatalf("%s: the filter did not outlive its process", h)
		}
		d, _ = open(t, Config{AttachMode: AttachTCX})
		h := hooksOf(t, nsPath, "t0")
		if len(h.tcx) != 1 || len(h.filters) != 0 {
			t.Errorf("%s, want the program at tcx only", h)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		// The clsact qdisc of the killed process stays: nothing recorded that it added it.
		inNS(t, nsPath, func() error {
			lk, err := netlink.LinkByName("t0")
			if err != nil {
				return err
			}
			if q, err := ingressQdisc(lk); err != nil || q == nil {
				return err
			} else {
				return netlink.QdiscDel(q)
			}
		})
	})
}

// TestTCLeavesOthersAlone attaches in tc mode next to another party's qdisc and filters:
// the datapath warns about a filter that runs before it, removes only its own filter on
// Close, and refuses a priority or handle that holds someone else's filter.
func TestTCLeavesOthersAlone(t *testing.T) {
	nsPath := attachNS(t)
	cfg := Config{Interfaces: []string{"t0"}, NetNS: nsPath, AttachMode: AttachTC,
		ConntrackSize: 1024, MaxServices: 64, MaxEndpoints: 256, RingSlots: 1 << 14}
	early, shared, late := newCounter(t), newCounter(t), newCounter(t)
	early.attach(t, nsPath, "t0", 1, 1, "early")
	// A bpf filter for every protocol may share the datapath's priority, under another
	// handle.
	shared.attach(t, nsPath, "t0", tcPriority, 7, "shared")
	late.attach(t, nsPath, "t0", 100, 1, "late")
	others := func(t *testing.T) []string {
		t.Helper()
		var out []string
		for _, f := range hooksOf(t, nsPath, "t0").filters {
			if b, ok := f.(*netlink.BpfFilter); ok && b.Name != tcFilterName {
				out = append(out, fmt.Sprintf("%s@%d/%d", b.Name, b.Priority, b.Id))
			}
		}
		return out
	}
	before := others(t)

	t.Run("a filter at a lower priority is named in a warning; Close leaves the others, at its priority too, and their qdisc", func(t *testing.T) {
		log, buf := newLogBuffer(t)
		d, err := New(cfg, log)
		if err != nil {
			t.Fatal(err)
		}
		var warned []string
		for _, line := range buf.lines() {
			if strings.Contains(line, "level=WARN") {
				warned = append(warned, line)
			}
		}
		if len(warned) != 1 || !strings.Contains(warned[0], `\"early\"`) || strings.Contains(warned[0], `\"late\"`) || strings.Contains(warned[0], `\"shared\"`) {
			t.Errorf("warnings %q, want one naming the filter at priority 1 only", warned)
		}
		h := hooksOf(t, nsPath, "t0")
		if h.ourFilter() == nil || len(h.filters) != 4 {
			t.Fatalf("%s, want the datapath's filter among the three others", h)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		h = hooksOf(t, nsPath, "t0")
		if got := others(t); h.qdisc != "clsact" || h.ourFilter() != nil || !slices.Equal(got, before) {
			t.Errorf("after Close: %s, want the others' filters %v and their qdisc", h, before)
		}
	})

	t.Run("a filter of another party at the datapath's priority and handle is not replaced", func(t *testing.T) {
		other := newCounter(t)
		other.attach(t, nsPath, "t0", tcPriority, tcHandle, "other")
		defer inNS(t, nsPath, func() error {
			return netlink.FilterDel(&netlink.BpfFilter{FilterAttrs: tcFilter{ifindex: ifindexIn(t, nsPath, "t0"), priority: tcPriority, handle: tcHandle}.attrs(), Fd: -1})
		})
		_, err := New(cfg, slog.New(slog.NewTextHandler(t.Output(), nil)))
		if err == nil || !strings.Contains(err.Error(), "not shardlb's") || !strings.Contains(err.Error(), `"other"`) {
			t.Fatalf("New: %v, want a refusal naming the filter", err)
		}
		t.Logf("the refusal reads: %v", err)
		h := hooksOf(t, nsPath, "t0")
		for _, f := range h.filters {
			if b := f.(*netlink.BpfFilter); b.Priority == tcPriority && b.Handle == tcHandle && (b.Name != "other" || b.Id != progID(t, other.prog)) {
				t.Errorf("the other party's filter was changed: %s", h)
			}
		}
	})

	t.Run("another kind of filter at the datapath's priority is named", func(t *testing.T) {
		nn := testenv.NetNS{Name: filepath.Base(nsPath)}
		nn.Run(t, "tc", "filter", "del", "dev", "t0", "ingress", "pref", fmt.Sprint(tcPriority)) // the shared one
		nn.Run(t, "tc", "filter", "add", "dev", "t0", "ingress", "pref", fmt.Sprint(tcPriority), "protocol", "ip", "u32", "match", "u32", "0", "0")
		defer nn.Run(t, "tc", "filter", "del", "dev", "t0", "ingress", "pref", fmt.Sprint(tcPriority))
		_, err := New(cfg, slog.New(slog.NewTextHandler(t.Output(), nil)))
		if err == nil || !strings.Contains(err.Error(), "u32 filter") {
			t.Fatalf("New: %v, want a refusal naming the u32 filter", err)
		}
		t.Logf("the refusal reads: %v", err)
	})
}

func ifindexIn(t *testing.T, nsPath, ifname string) int {
	t.Helper()
	var idx int
	inNS(t, nsPath, func() error {
		lk, err := netlink.LinkByName(ifname)
		if err == nil {
			idx = lk.Attrs().Index
		}
		return err
	})
	return idx
}

// tcEvent is a filter added, replaced (RTM_NEWTFILTER) or deleted (RTM_DELTFILTER), as
// rtnetlink announces it.
type tcEvent struct {
	typ            uint16
	ifindex        int
	prio           uint16
	handle, parent uint32
}

// watchTC records the filter events of the namespace at nsPath until stop, which waits
// (up to 3 s) until the events recorded satisfy until: the kernel has sent them when the
// call that caused them returns, but this end may not have read them yet.
func watchTC(t *testing.T, nsPath string) (stop func(until func([]tcEvent) bool) []tcEvent) {
	t.Helper()
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	cur, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer cur.Close()
	s, err := nl.SubscribeAt(ns, cur, unix.NETLINK_ROUTE, unix.RTNLGRP_TC)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var events []tcEvent
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			msgs, _, err := s.Receive()
			if err != nil {
				return
			}
			mu.Lock()
			for _, m := range msgs {
				if m.Header.Type != unix.RTM_NEWTFILTER && m.Header.Type != unix.RTM_DELTFILTER {
					continue
				}
				tm := nl.DeserializeTcMsg(m.Data)
				events = append(events, tcEvent{typ: m.Header.Type, ifindex: int(tm.Ifindex), prio: uint16(tm.Info >> 16), handle: tm.Handle, parent: tm.Parent})
			}
			mu.Unlock()
		}
	}()
	return func(until func([]tcEvent) bool) []tcEvent {
		for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
			mu.Lock()
			ok := until(events)
			mu.Unlock()
			if ok {
				break
			}
		}
		s.Close()
		<-done
		mu.Lock()
		defer mu.Unlock()
		return events
	}
}

// TestTCPinnedDatapathTraffic runs TCP through a pinned datapath in tc mode across a
// restart (the filters keep the program meanwhile, and the new process replaces it in
// each filter in place), across attach mode changes, and across a Release with no
// process after it, then Cleanup; and checks Close.
func TestTCPinnedDatapathTraffic(t *testing.T) {
	l := newLab(t)
	echo := l.echoFrontends(t)
	root := bpffsRoot(t)
	config := func(t *testing.T) Config {
		return Config{
			Interfaces: l.lbIfs, NetNS: l.lbPath, NodeIPv4: netip.MustParseAddr("10.10.1.1"), PinPath: pinPathFor(t, root),
			ConntrackSize: 4096, MaxServices: 64, MaxEndpoints: 256, RingSlots: 1 << 14, AttachMode: AttachTC,
		}
	}
	set := func(t *testing.T, d *Datapath) {
		t.Helper()
		if err := d.SetServices(echo); err != nil {
			t.Fatal(err)
		}
	}
	release := func(t *testing.T, d *Datapath) {
		t.Helper()
		if err := d.Release(); err != nil {
			t.Fatal(err)
		}
	}
	// only checks that each interface has the program d loaded, at the hook of mode,
	// and nothing else of the datapath's.
	only := func(t *testing.T, mode AttachMode, prog int) {
		t.Helper()
		for _, name := range l.lbIfs {
			h := hooksOf(t, l.lbPath, name)
			f := h.ourFilter()
			switch {
			case mode == AttachTC && (len(h.tcx) != 0 || len(h.filters) != 1 || f == nil || f.Id != prog):
				t.Errorf("%s: %s, want one filter, the datapath's, with program %d", name, h, prog)
			case mode == AttachTCX && (len(h.tcx) != 1 || int(h.tcx[0].ID) != prog || len(h.filters) != 0):
				t.Errorf("%s: %s, want program %d at tcx and no filter", name, h, prog)
			}
		}
	}
	nothingLeft := func(t *testing.T, pinPath string) {
		t.Helper()
		for _, name := range l.lbIfs {
			if h := hooksOf(t, l.lbPath, name); len(h.tcx) != 0 || h.qdisc != "" {
				t.Errorf("%s: %s, want nothing", name, h)
			}
		}
		if _, err := os.Stat(pinPath); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pin path %s: %v, want it removed", pinPath, err)
		}
	}

	cfg := config(t)

	t.Run("a restart replaces the program in each filter in place and keeps the connection", func(t *testing.T) {
		d := openPinned(t, cfg, nil)
		set(t, d)
		c := l.dialEcho(t)
		backend := c.exchange(t, "before the restart")
		ctBefore := ctEntries(t, d)
		oldProg := progID(t, d.objs.LbIngress)
		only(t, AttachTC, oldProg)
		release(t, d)
		only(t, AttachTC, oldProg)
		c.exchangeFor(t, 200*time.Millisecond, "between Release and New", backend)

		stop := watchTC(t, l.lbPath)
		d = openPinned(t, cfg, nil)
		events := stop(func(es []tcEvent) bool {
			added := map[int]bool{}
			for _, e := range es {
				if e.typ == unix.RTM_NEWTFILTER && e.prio == tcPriority && e.handle == tcHandle {
					added[e.ifindex] = true
				}
			}
			return len(added) == len(l.lbIfs)
		})
		defer release(t, d)
		set(t, d)
		c.exchangeFor(t, 300*time.Millisecond, "after the restart", backend)
		newProg := progID(t, d.objs.LbIngress)
		if newProg == oldProg {
			t.Fatal("the restart loaded no new program")
		}
		only(t, AttachTC, newProg)
		for k := range ctBefore {
			if _, ok := ctEntries(t, d)[k]; !ok {
				t.Errorf("conntrack entry %+v lost across the restart", k)
			}
		}
		replaced := map[int]bool{}
		for _, e := range events {
			if e.prio != tcPriority || e.handle != tcHandle {
				continue
			}
			if e.typ == unix.RTM_DELTFILTER {
				t.Errorf("the filter on interface %d was deleted during the restart: the interface was without the program", e.ifindex)
			} else {
				replaced[e.ifindex] = true
			}
		}
		if len(replaced) != len(l.lbIfs) {
			t.Errorf("filters replaced on %d interfaces, want %d (events %+v)", len(replaced), len(l.lbIfs), events)
		}
		if got := dirNames(filepath.Join(cfg.PinPath, pinTC)); !slices.Equal(got, slices.Sorted(slices.Values(l.lbIfs))) {
			t.Errorf("tc filters recorded: %v, want %v", got, l.lbIfs)
		}
	})

	t.Run("attach mode changes move the program to the other hook, and the connection stays", func(t *testing.T) {
		c := l.dialEcho(t) // through the datapath the last subtest released
		backend := c.exchange(t, "before the changes")
		for _, mode := range []AttachMode{AttachTCX, AttachTC} {
			cfg.AttachMode = mode
			d := openPinned(t, cfg, nil)
			set(t, d)
			only(t, mode, progID(t, d.objs.LbIngress))
			c.exchangeFor(t, 200*time.Millisecond, "after the change to "+string(mode), backend)
			release(t, d)
		}
	})

	t.Run("Close removes the filters, the clsact qdiscs the datapath added and the pins", func(t *testing.T) {
		d := openPinned(t, cfg, nil)
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		nothingLeft(t, cfg.PinPath)
	})

	t.Run("with no process the filters keep forwarding, and Cleanup removes them", func(t *testing.T) {
		l.withNoProcess(t, config(t), set, nothingLeft, func() {})
	})
}
