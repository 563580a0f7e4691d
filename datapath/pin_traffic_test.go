package datapath

import (
	"bufio"
	"errors"
	"fmt"
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
	"github.com/cilium/ebpf/link"
	"github.com/shardlb/shardlb/shard"
	"github.com/vishvananda/netns"
)

const echoPort = 9000

// serveEcho answers every line on ep with name and the line, on every connection, until
// the test ends.
func serveEcho(t *testing.T, ns netns.NsHandle, ep netip.AddrPort, name string) {
	var ln net.Listener
	var err error
	inNetNS(t, ns, func() { ln, err = net.Listen("tcp", ep.String()) })
	if err != nil {
		t.Fatalf("listen on %s: %v", ep, err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if _, err := fmt.Fprintf(c, "%s %s", name, line); err != nil {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}

// echoConn is one TCP connection from the client to the VIP's echo port.
type echoConn struct {
	c net.Conn
	r *bufio.Reader
	n int
}

func (l *lab) dialEcho(t *testing.T) *echoConn {
	t.Helper()
	var c net.Conn
	var err error
	inNetNS(t, l.client, func() {
		c, err = net.DialTimeout("tcp", netip.AddrPortFrom(labVIP, echoPort).String(), 3*time.Second)
	})
	if err != nil {
		t.Fatalf("connect to the VIP: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return &echoConn{c: c, r: bufio.NewReader(c)}
}

// exchange sends a line and returns the name of the backend that echoed it.
func (e *echoConn) exchange(t *testing.T, when string) string {
	t.Helper()
	e.n++
	msg := fmt.Sprintf("line %d %s", e.n, when)
	_ = e.c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := fmt.Fprintln(e.c, msg); err != nil {
		t.Fatalf("%s: send on the connection: %v", when, err)
	}
	reply, err := e.r.ReadString('\n')
	if err != nil {
		t.Fatalf("%s: no echo on the connection: %v", when, err)
	}
	name, rest, _ := strings.Cut(strings.TrimSpace(reply), " ")
	if rest != msg {
		t.Fatalf("%s: echo %q, want %q", when, rest, msg)
	}
	return name
}

// exchangeFor keeps exchanging lines on e for d and checks the same backend answers.
func (e *echoConn) exchangeFor(t *testing.T, d time.Duration, when, backend string) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if got := e.exchange(t, when); got != backend {
			t.Fatalf("%s: %s answered, the connection is on %s", when, got, backend)
		}
	}
}

// tcxAttachments lists the (link, program) pairs at tcx ingress of each lab interface
// of the load balancer.
func (l *lab) tcxAttachments(t *testing.T) map[string][]link.AttachedProgram {
	t.Helper()
	ns, err := netns.GetFromPath(l.lbPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	out := map[string][]link.AttachedProgram{}
	inNetNS(t, ns, func() {
		for _, name := range l.lbIfs {
			ifc, err := net.InterfaceByName(name)
			if err != nil {
				t.Fatal(err)
			}
			res, err := link.QueryPrograms(link.QueryOptions{Target: ifc.Index, Attach: ebpf.AttachTCXIngress})
			if err != nil {
				t.Fatalf("query tcx of %s: %v", name, err)
			}
			out[name] = res.Programs
		}
	})
	return out
}

// ctEntries are the IPv4 TCP conntrack entries, by key.
func ctEntries(t *testing.T, d *Datapath) map[lbFlow4]lbCtEntry {
	t.Helper()
	out := map[lbFlow4]lbCtEntry{}
	var k lbFlow4
	var v lbCtEntry
	it := d.objs.Conntrack4Tcp.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// bpfIDsHeld lists the ids of the BPF maps, programs and links this process holds a
// descriptor of (a link's descriptor also names its program).
func bpfIDsHeld(t *testing.T) map[string]bool {
	t.Helper()
	held := map[string]bool{}
	fds, err := os.ReadDir("/proc/self/fdinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		b, err := os.ReadFile(filepath.Join("/proc/self/fdinfo", fd.Name()))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(line, ":")
			if ok && (k == "map_id" || k == "prog_id" || k == "link_id") {
				held[k+" "+strings.TrimSpace(v)] = true
			}
		}
	}
	return held
}

// datapathIDs are the ids of d's program, pinned maps and links as fdinfo names them.
func datapathIDs(t *testing.T, d *Datapath) []string {
	t.Helper()
	var ids []string
	pinned := map[string]*ebpf.Map{
		lbMapServices: d.objs.Services, lbMapVips: d.objs.Vips, lbMapRingSlots: d.objs.RingSlots,
		lbMapEndpoints: d.objs.Endpoints, lbMapConntrack4Tcp: d.objs.Conntrack4Tcp,
		lbMapConntrack4Udp: d.objs.Conntrack4Udp, lbMapConntrack6: d.objs.Conntrack6,
		lbMapServiceStats: d.objs.ServiceStats, lbMapDrops: d.objs.Drops,
	}
	for _, m := range pinned {
		info, err := m.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		ids = append(ids, fmt.Sprintf("map_id %d", id))
	}
	pinfo, err := d.objs.LbIngress.Info()
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := pinfo.ID()
	ids = append(ids, fmt.Sprintf("prog_id %d", pid))
	for _, l := range d.links {
		info, err := l.Info()
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, fmt.Sprintf("link_id %d", info.ID))
	}
	return ids
}

// echoFrontends starts an echo server on every backend and returns the onearm
// frontend of labVIP:echoPort over them.
func (l *lab) echoFrontends(t *testing.T) []shard.Frontend {
	t.Helper()
	var eps []shard.Endpoint
	for i, be := range l.backends {
		ep := netip.AddrPortFrom(be.Addr, echoPort)
		serveEcho(t, l.backendNS[i], ep, l.names[netip.AddrPortFrom(be.Addr, be.Port)])
		eps = append(eps, shard.Endpoint{Addr: ep.Addr(), Port: ep.Port()})
	}
	return []shard.Frontend{{Service: "ns/echo", VIP: labVIP, Port: echoPort, Protocol: shard.TCP, Mode: shard.ModeOneArm, Endpoints: eps}}
}

// TestPinnedDatapathTraffic runs TCP through a pinned datapath across restarts: the
// same configuration, a larger conntrack, fewer interfaces, then Close; and across a
// Release with no process after it, then Cleanup. Each step starts from what the
// previous one left.
func TestPinnedDatapathTraffic(t *testing.T) {
	l := newLab(t)
	echo := l.echoFrontends(t)
	root := bpffsRoot(t)
	config := func(t *testing.T) Config {
		return Config{
			Interfaces: l.lbIfs, NetNS: l.lbPath, NodeIPv4: netip.MustParseAddr("10.10.1.1"), PinPath: pinPathFor(t, root),
			ConntrackSize: 4096, MaxServices: 64, MaxEndpoints: 256, RingSlots: 1 << 14,
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
	// nothingLeft checks that no program is attached at tcx ingress of the lab's
	// interfaces and that the pin path is gone.
	nothingLeft := func(t *testing.T, pinPath string) {
		t.Helper()
		for name, progs := range l.tcxAttachments(t) {
			if len(progs) != 0 {
				t.Errorf("%s still has %d programs at tcx ingress", name, len(progs))
			}
		}
		if _, err := os.Stat(pinPath); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pin path %s: %v, want it removed", pinPath, err)
		}
	}
	// oneLinkEach returns the link of each interface, checking there is exactly one.
	oneLinkEach := func(t *testing.T) map[string]link.AttachedProgram {
		t.Helper()
		out := map[string]link.AttachedProgram{}
		for name, progs := range l.tcxAttachments(t) {
			if len(progs) != 1 {
				t.Fatalf("%s has %d programs at tcx ingress, want 1", name, len(progs))
			}
			out[name] = progs[0]
		}
		return out
	}
	sameLink := func(t *testing.T, name string, before, after link.AttachedProgram) {
		t.Helper()
		bl, _ := before.LinkID()
		if al, _ := after.LinkID(); al != bl || after.ID == before.ID {
			t.Errorf("%s: link %d program %d before, link %d program %d after: want the same link with the new program",
				name, bl, before.ID, al, after.ID)
		}
	}

	cfg := config(t)
	var linksBefore map[string]link.AttachedProgram

	t.Run("a restart with the same config keeps the connection, its conntrack entries and the links", func(t *testing.T) {
		d := openPinned(t, cfg, nil)
		// An endpoint that sorts first comes and goes, so the backends' ids are not the
		// ones a fresh start would give them.
		gone := echo[0]
		gone.Endpoints = append([]shard.Endpoint{{Addr: netip.MustParseAddr("10.10.10.2"), Port: echoPort}}, echo[0].Endpoints...)
		if err := d.SetServices([]shard.Frontend{gone}); err != nil {
			t.Fatal(err)
		}
		set(t, d)
		c := l.dialEcho(t)
		backend := c.exchange(t, "before the restart")
		ctBefore := ctEntries(t, d)
		linksBefore = oneLinkEach(t)
		if len(ctBefore) < 2 {
			t.Fatalf("%d conntrack entries with a connection open, want 2", len(ctBefore))
		}
		release(t, d)
		c.exchangeFor(t, 200*time.Millisecond, "between Release and New", backend)

		d = openPinned(t, cfg, nil)
		defer release(t, d)
		ctAdopted := ctEntries(t, d)
		set(t, d)
		c.exchangeFor(t, 300*time.Millisecond, "after the restart", backend)
		ctAfter := ctEntries(t, d)
		if len(ctAdopted) < len(ctBefore) {
			t.Errorf("conntrack went from %d entries to %d on adoption", len(ctBefore), len(ctAdopted))
		}
		for k, v := range ctBefore {
			a, ok := ctAfter[k]
			if !ok {
				t.Errorf("conntrack entry %+v lost across the restart", k)
				continue
			}
			if a.ServiceId != v.ServiceId || a.EndpointId != v.EndpointId || a.EndpointGen != v.EndpointGen {
				t.Errorf("conntrack entry %+v: service %d endpoint %d/%d before, %d %d/%d after the restart",
					k, v.ServiceId, v.EndpointId, v.EndpointGen, a.ServiceId, a.EndpointId, a.EndpointGen)
			}
		}
		// Each flow's endpoint id still names its endpoint, in the map and in Go: the next
		// update that releases an id releases the right one.
		fk := frontendKey{labVIP, echoPort, shard.TCP}
		if d.applied[fk] == nil {
			t.Fatalf("frontend %s not applied after the restart", fk)
		}
		forward := 0
		for k, v := range ctBefore {
			if v.Dir != 0 {
				continue
			}
			forward++
			daddr, _ := addrOf(v.Daddr, afInet)
			ep := netip.AddrPortFrom(daddr, ntohs(v.Dport))
			var e lbEndpoint
			if err := d.objs.Endpoints.Lookup(v.EndpointId, &e); err != nil {
				t.Fatal(err)
			}
			eaddr, _ := addrOf(e.Addr, e.Family)
			if e.Valid == 0 || e.Gen != v.EndpointGen || netip.AddrPortFrom(eaddr, ntohs(e.Port)) != ep {
				t.Errorf("flow %+v to %s has endpoint id %d/%d, which now holds %+v", k, ep, v.EndpointId, v.EndpointGen, e)
			}
			if id, ok := d.applied[fk].endpoints[ep]; !ok || id != v.EndpointId {
				t.Errorf("flow %+v to %s has endpoint id %d, Go has id %d (known: %v) for it", k, ep, v.EndpointId, id, ok)
			}
		}
		if forward == 0 {
			t.Error("no forward conntrack entry for the connection")
		}
		for name, after := range oneLinkEach(t) {
			sameLink(t, name, linksBefore[name], after)
		}
	})

	t.Run("maps of another conntrack size are replaced, logged, and serve new connections", func(t *testing.T) {
		before := oneLinkEach(t)
		cfg.ConntrackSize *= 2
		log, buf := newLogBuffer(t)
		d := openPinned(t, cfg, log)
		defer release(t, d)
		var warned []string
		for _, line := range buf.lines() {
			if strings.Contains(line, "level=WARN") {
				warned = append(warned, line)
			}
		}
		if len(warned) != 1 || !strings.Contains(warned[0], "incompatible pinned maps") ||
			!strings.Contains(warned[0], "MaxEntries: 4096 changed to 8192 (Config.ConntrackSize)") {
			t.Fatalf("warnings %q, want one line saying the conntrack size changed", warned)
		}
		if n := len(ctEntries(t, d)); n != 0 {
			t.Errorf("%d conntrack entries in the replacement maps, want none", n)
		}
		// The program was swapped in the pinned links even so.
		for name, after := range oneLinkEach(t) {
			sameLink(t, name, before[name], after)
		}
		set(t, d)
		c := l.dialEcho(t)
		backend := c.exchange(t, "a new connection after the replacement")
		c.exchangeFor(t, 100*time.Millisecond, "a new connection after the replacement", backend)
	})

	t.Run("interfaces left out of the config are detached on adoption, the others keep their links", func(t *testing.T) {
		before := oneLinkEach(t)
		kept := l.lbIfs[:2]
		cfg.Interfaces = kept
		d := openPinned(t, cfg, nil)
		for name, progs := range l.tcxAttachments(t) {
			switch {
			case slices.Contains(kept, name) && len(progs) == 1:
				sameLink(t, name, before[name], progs[0])
			case slices.Contains(kept, name):
				t.Errorf("%s (configured) has %d programs, want 1", name, len(progs))
			case len(progs) != 0:
				t.Errorf("%s (no longer configured) has %d programs, want none", name, len(progs))
			}
		}
		if got := dirNames(filepath.Join(cfg.PinPath, pinLinks)); !slices.Equal(got, slices.Sorted(slices.Values(kept))) {
			t.Errorf("links pinned: %v, want %v", got, kept)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		nothingLeft(t, cfg.PinPath)
	})

	t.Run("with no process at all the datapath keeps forwarding, and Cleanup leaves nothing", func(t *testing.T) {
		cfg := config(t)
		l.withNoProcess(t, cfg, set, nothingLeft, func() {
			if got := dirNames(filepath.Join(cfg.PinPath, pinLinks)); !slices.Equal(got, slices.Sorted(slices.Values(l.lbIfs))) {
				t.Errorf("links pinned: %v, want %v", got, l.lbIfs)
			}
		})
	})
}

// withNoProcess opens a pinned datapath with cfg, sets its services, opens a
// connection and releases it: the process holds nothing of the datapath any more
// (checked, then check runs), the connection and new ones are still served, and
// Cleanup leaves nothing (nothingLeft, at the hook of cfg).
func (l *lab) withNoProcess(t *testing.T, cfg Config, set func(*testing.T, *Datapath), nothingLeft func(*testing.T, string), check func()) {
	t.Helper()
	d := openPinned(t, cfg, nil)
	set(t, d)
	c := l.dialEcho(t)
	backend := c.exchange(t, "before Release")
	ids := datapathIDs(t, d)
	if err := d.Release(); err != nil {
		t.Fatal(err)
	}
	held := bpfIDsHeld(t)
	for _, id := range ids {
		if held[id] {
			t.Errorf("the process still holds %s after Release", id)
		}
	}
	check()
	c.exchangeFor(t, 300*time.Millisecond, "with no process", backend)
	if got := l.dialEcho(t).exchange(t, "a new connection with no process"); got == "" {
		t.Error("a new connection with no process got no answer")
	}
	if err := Cleanup(cfg.PinPath); err != nil {
		t.Fatal(err)
	}
	nothingLeft(t, cfg.PinPath)
}
