package datapath

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shardlb/shardlb/internal/testenv"
	"github.com/shardlb/shardlb/shard"
)

func TestMatchInterfaces(t *testing.T) {
	links := []Interface{{Name: "lo", Loopback: true}, {Name: "eth0"}, {Name: "cni0"}, {Name: "cali1a2b"}, {Name: "cali3c4d"}, {Name: "lxc9"}}
	for _, tc := range []struct {
		name          string
		patterns      []string
		want, unmatch []string
	}{
		{"a plain name matches itself", []string{"eth0"}, []string{"eth0"}, nil},
		{"a glob matches every pod veth, sorted", []string{"eth0", "cali*"}, []string{"cali1a2b", "cali3c4d", "eth0"}, nil},
		{"a pattern that matches nothing is reported", []string{"eth0", "cni0", "bond*"}, []string{"cni0", "eth0"}, []string{"bond*"}},
		{"a wildcard never matches the loopback", []string{"l*"}, []string{"lxc9"}, nil},
		{"the loopback can be named", []string{"lo"}, []string{"lo"}, nil},
		{"an interface two patterns match is served once", []string{"cali*", "cali1*"}, []string{"cali1a2b", "cali3c4d"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, unmatched := MatchInterfaces(tc.patterns, links)
			if !slices.Equal(got, tc.want) || !slices.Equal(unmatched, tc.unmatch) {
				t.Errorf("MatchInterfaces(%q) = %q, unmatched %q; want %q, unmatched %q", tc.patterns, got, unmatched, tc.want, tc.unmatch)
			}
		})
	}
}

// TestInterfacesFollowed starts a datapath on the load balancer's uplink with the
// patterns l0,be*, then makes links in its namespace: a backend's link be1 that comes
// after the start gets the program, and the backend's replies through it are
// translated back (HTTP through the VIP works: the replies leave the backend from its
// own address and only the program on be1 makes them come from the VIP); a link other0
// that no pattern matches is left alone; be1 deleted is forgotten (with a pin path, its
// pin or record goes too) and served again when it comes back; renamed to be2 it keeps
// the program, renamed to xx2 it loses it. At both hooks, with and without a pin path.
func TestInterfacesFollowed(t *testing.T) {
	for _, mode := range []AttachMode{AttachTCX, AttachTC} {
		for _, pinned := range []bool{false, true} {
			name := "attach mode " + string(mode)
			if pinned {
				name += " with a pin path"
			}
			t.Run(name, func(t *testing.T) { testInterfacesFollowed(t, mode, pinned) })
		}
	}
}

func testInterfacesFollowed(t *testing.T, mode AttachMode, pinned bool) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "ip", "ethtool", "sysctl")
	client := testenv.NewNetNS(t, "fwcli")
	lb := testenv.NewNetNS(t, "fwlb")
	be := testenv.NewNetNS(t, "fwbe")
	other := testenv.NewNetNS(t, "fwoth")
	lbPath := "/var/run/netns/" + lb.Name
	testenv.Veth(t, client, "c0", "10.10.1.2/24", lb, "l0", "10.10.1.1/24")
	client.Run(t, "ip", "route", "add", "default", "via", "10.10.1.1")
	lb.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")

	cfg := Config{Interfaces: []string{"l0"}, NetNS: lbPath, NodeIPv4: netip.MustParseAddr("10.10.1.1"), AttachMode: mode,
		ConntrackSize: 1 << 12, MaxServices: 16, MaxEndpoints: 64}
	var pinDir string
	if pinned {
		cfg.PinPath = pinPathFor(t, bpffsRoot(t))
		pinDir = pinTC
		if mode == AttachTCX {
			pinDir = pinLinks
		}
	}
	logger, logs := newLogBuffer(t)
	d, err := New(cfg, logger)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	// logged counts the log lines of one attach or detach of an interface.
	logged := func(msg, ifname string) int {
		n := 0
		for _, l := range logs.lines() {
			if strings.Contains(l, `msg="`+msg+`"`) && strings.Contains(l, " interface="+ifname+" ") {
				n++
			}
		}
		return n
	}
	ep := netip.MustParseAddrPort("10.10.11.2:8080")
	if err := d.SetServices([]shard.Frontend{{Service: "ns/web", VIP: labVIP, Port: 80, Protocol: shard.TCP,
		Endpoints: []shard.Endpoint{{Addr: ep.Addr(), Port: ep.Port()}}}}); err != nil {
		t.Fatal(err)
	}
	serve(t, openNS(t, be), netip.AddrPortFrom(netip.IPv4Unspecified(), ep.Port()), "backend")

	ctx, cancel := context.WithCancel(context.Background())
	followed := make(chan error, 1)
	go func() { followed <- d.FollowInterfaces(ctx, []string{"l0", "be*"}) }()
	stopFollowing := sync.OnceFunc(func() {
		cancel()
		if err := <-followed; err != nil {
			t.Errorf("FollowInterfaces: %v", err)
		}
	})
	t.Cleanup(stopFollowing)

	prog := progID(t, d.objs.LbIngress)
	programOn := func(ifname string) bool {
		h := hooksOf(t, lbPath, ifname)
		for _, p := range h.tcx {
			if int(p.ID) == prog {
				return true
			}
		}
		f := h.ourFilter()
		return f != nil && int(f.Id) == prog
	}
	served := func(t *testing.T, want ...string) {
		t.Helper()
		waitUntil(t, "the datapath serves "+strings.Join(want, ","), func() bool { return slices.Equal(d.Interfaces(), want) })
		for _, name := range want {
			if !programOn(name) {
				t.Errorf("%s is served but the program is not on it: %s", name, hooksOf(t, lbPath, name))
			}
		}
		d.mu.Lock()
		n := len(d.links) + len(d.filters)
		d.mu.Unlock()
		if n != len(want) {
			t.Errorf("%d links or filters held for %d interfaces", n, len(want))
		}
		if pinned {
			if got := dirNames(filepath.Join(cfg.PinPath, pinDir)); !slices.Equal(got, want) {
				t.Errorf("pinned for %q, want %q", got, want)
			}
		}
	}
	c := nsHTTPClient(t, openNS(t, client), false)
	throughVIP := func(t *testing.T) {
		t.Helper()
		for i := range 5 {
			body, err := get(c)
			if err != nil {
				t.Fatalf("request %d through the VIP: %v", i, err)
			}
			if want := "backend 10.10.1.2"; body != want {
				t.Fatalf("request %d answered %q, want %q", i, body, want)
			}
		}
	}
	addBackendLink := func(t *testing.T) {
		testenv.Veth(t, lb, "be1", "10.10.11.1/24", be, "b0", "10.10.11.2/24")
		be.Run(t, "ip", "route", "add", "default", "via", "10.10.11.1")
	}

	t.Run("a link that comes after the start and matches gets the program, and replies through it are translated", func(t *testing.T) {
		// other0 first: once be1 is served, the update of other0 was handled too.
		testenv.Veth(t, lb, "other0", "10.10.12.1/24", other, "o0", "10.10.12.2/24")
		addBackendLink(t)
		served(t, "be1", "l0")
		throughVIP(t)
		if n := logged("datapath attached", "be1"); n != 1 {
			t.Errorf("%d log lines of be1 attached, want 1", n)
		}
	})
	t.Run("a link no pattern matches is left alone", func(t *testing.T) {
		if h := hooksOf(t, lbPath, "other0"); len(h.tcx) > 0 || h.qdisc != "" {
			t.Errorf("other0 was touched: %s", h)
		}
		if n := logged("datapath attached", "l0"); n != 1 {
			t.Errorf("l0 attached %d times, want once: a link update must not attach again what is served", n)
		}
	})
	t.Run("a deleted link is forgotten, pin included, and served again when it comes back", func(t *testing.T) {
		lb.Run(t, "ip", "link", "del", "be1")
		served(t, "l0")
		if n := logged("datapath detached", "be1"); n != 1 {
			t.Errorf("%d log lines of be1 detached, want 1", n)
		}
		addBackendLink(t)
		served(t, "be1", "l0")
		throughVIP(t)
	})
	t.Run("a renamed link keeps the program while its new name matches", func(t *testing.T) {
		rename := func(from, to string) {
			t.Helper()
			lb.Run(t, "ip", "link", "set", from, "down")
			lb.Run(t, "ip", "link", "set", from, "name", to)
			lb.Run(t, "ip", "link", "set", to, "up")
		}
		rename("be1", "be2")
		served(t, "be2", "l0")
		throughVIP(t)
		rename("be2", "xx2")
		served(t, "l0")
		if h := hooksOf(t, lbPath, "xx2"); programOn("xx2") {
			t.Errorf("xx2 no longer matches and still has the program: %s", h)
		}
	})
	if !pinned {
		return
	}
	outer := t // the adopting Datapath lives until the test ends
	t.Run("a pin of an interface that went while no process ran is removed by the next", func(t *testing.T) {
		lb.Run(t, "ip", "link", "del", "xx2")
		addBackendLink(t)
		served(t, "be1", "l0")
		stopFollowing()
		if err := d.Release(); err != nil {
			t.Fatal(err)
		}
		lb.Run(t, "ip", "link", "del", "be1")
		if got := dirNames(filepath.Join(cfg.PinPath, pinDir)); !slices.Equal(got, []string{"be1", "l0"}) {
			t.Fatalf("released with %q pinned, want be1 and l0", got)
		}
		d = attached(outer, cfg)
		prog = progID(t, d.objs.LbIngress)
		served(t, "l0")
	})
	{
		for _, dir := range []string{pinLinks, pinTC} {
			for _, name := range dirNames(filepath.Join(cfg.PinPath, dir)) {
				if name != "l0" {
					t.Errorf("%s left pinned", filepath.Join(dir, name))
				}
			}
		}
	}
}

// waitUntil polls cond until it holds, and fails the test when it does not within 10 s
// (a bound for a stuck follower, not a measurement).
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after 10 s", what)
		}
	}
}

// TestFollowLogsAFailingInterfaceOnce: an interface the program cannot be attached to
// (another party's u32 filter holds the tc priority it needs) fails on every link
// update the follower sees, but is logged once per error: again when the error
// changes, not when it stays, and again when it fails after it was served.
func TestFollowLogsAFailingInterfaceOnce(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "ip", "tc")
	lb := testenv.NewNetNS(t, "flflb")
	peer := testenv.NewNetNS(t, "flfpeer")
	lbPath := "/var/run/netns/" + lb.Name
	testenv.Veth(t, lb, "l0", "10.10.1.1/24", peer, "p0", "")
	logger, logs := newLogBuffer(t)
	d, err := New(Config{Interfaces: []string{"l0"}, NetNS: lbPath, AttachMode: AttachTC,
		ConntrackSize: 1 << 12, MaxServices: 16, MaxEndpoints: 64}, logger)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	followed := make(chan error, 1)
	go func() { followed <- d.FollowInterfaces(ctx, []string{"l0", "x*"}) }()
	t.Cleanup(func() {
		cancel()
		if err := <-followed; err != nil {
			t.Errorf("FollowInterfaces: %v", err)
		}
	})

	failures := func() []string {
		return linesWith(strings.Join(logs.lines(), "\n"), `msg="follow interfaces: interface failed" interface=x1 `)
	}
	// u32 puts another party's filter at the priority the datapath's needs.
	u32 := func(ifname, protocol string) {
		lb.Run(t, "tc", "filter", "add", "dev", ifname, "ingress", "pref", fmt.Sprint(tcPriority), "protocol", protocol, "u32", "match", "u32", "0", "0")
	}
	noU32 := func(ifname string) {
		lb.Run(t, "tc", "filter", "del", "dev", ifname, "ingress", "pref", fmt.Sprint(tcPriority))
	}
	rename := func(from, to string) {
		lb.Run(t, "ip", "link", "set", from, "down")
		lb.Run(t, "ip", "link", "set", from, "name", to)
		lb.Run(t, "ip", "link", "set", to, "up")
	}
	// updates makes link updates of x1, then a new matching link: the follower handles
	// updates in order, so once it serves the new link it has seen x1's.
	markers := 0
	updates := func(t *testing.T, served ...string) {
		t.Helper()
		for _, mtu := range []string{"1400", "1300", "1500"} {
			lb.Run(t, "ip", "link", "set", "x1", "mtu", mtu)
		}
		markers++
		marker := fmt.Sprintf("x9%d", markers)
		testenv.Veth(t, lb, marker, "", peer, fmt.Sprintf("q%d", markers), "")
		want := append(served, marker)
		waitUntil(t, "the follower serves "+marker, func() bool { return slices.Contains(d.Interfaces(), marker) })
		for _, name := range want {
			if !slices.Contains(d.Interfaces(), name) {
				t.Errorf("%s not served: %q", name, d.Interfaces())
			}
		}
	}

	testenv.Veth(t, lb, "y1", "", peer, "p1", "")
	lb.Run(t, "tc", "qdisc", "add", "dev", "y1", "clsact")
	u32("y1", "ip")
	rename("y1", "x1")

	t.Run("a failure that repeats on every update is logged once", func(t *testing.T) {
		updates(t)
		updates(t)
		if f := failures(); len(f) != 1 || !strings.Contains(f[0], "u32 filter") {
			t.Errorf("failures of x1 logged: %q; want one naming the u32 filter", f)
		}
		if slices.Contains(d.Interfaces(), "x1") {
			t.Error("x1 served despite the filter at the datapath's priority")
		}
	})
	t.Run("a changed error is logged again", func(t *testing.T) {
		noU32("x1")
		u32("x1", "ipv6")
		updates(t)
		if f := failures(); len(f) != 2 || !strings.Contains(f[1], "protocol 0x86dd") {
			t.Errorf("failures of x1 logged: %q; want a second naming the IPv6 filter", f)
		}
	})
	t.Run("a failure after the interface was served is logged again", func(t *testing.T) {
		noU32("x1")
		updates(t, "x1")
		rename("x1", "z1")
		waitUntil(t, "x1 left", func() bool { return !slices.Contains(d.Interfaces(), "x1") && !slices.Contains(d.Interfaces(), "z1") })
		u32("z1", "ipv6")
		rename("z1", "x1")
		updates(t)
		if f := failures(); len(f) != 3 || !strings.Contains(f[2], "protocol 0x86dd") {
			t.Errorf("failures of x1 logged: %q; want a third, the same error as the second", f)
		}
	})
}
