package datapath

import (
	"encoding/binary"
	"log/slog"
	"math/bits"
	"net"
	"net/netip"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/shardlb/shardlb/internal/testenv"
	"github.com/shardlb/shardlb/shard"
	"github.com/vishvananda/netns"
)

// tc verdicts the program returns.
const (
	actOK       = 0
	actShot     = 2
	actRedirect = 7
	// actPass is TC_ACT_UNSPEC (-1): a packet none of the program's business, handed
	// on untouched to what runs after the program.
	actPass = ^uint32(0)
)

// harness is a loaded but unattached datapath whose program runs test packets through
// BPF_PROG_TEST_RUN inside a network namespace of its own, so route lookups see only
// the routes the test made (none unless it adds some).
type harness struct {
	t  testing.TB
	d  *Datapath
	ns netns.NsHandle
	nn testenv.NetNS
}

func newHarness(t testing.TB, cfg Config) *harness {
	t.Helper()
	testenv.RequireRoot(t)
	nn := testenv.NewNetNS(t, "dptest")
	ns := openNS(t, nn)
	// Test runs hand packets in on the namespace's loopback, which classifies them by
	// destination MAC like any Ethernet device: given lbMAC they are for this host
	// (PACKET_HOST), any other unicast MAC makes them PACKET_OTHERHOST.
	nn.Run(t, "ip", "link", "set", "lo", "address", net.HardwareAddr(lbMAC[:]).String())
	if cfg.ConntrackSize == 0 {
		cfg.ConntrackSize = 1 << 16
	}
	if cfg.RingSlots == 0 {
		cfg.RingSlots = 1 << 18
	}
	if cfg.MaxEndpoints == 0 {
		cfg.MaxEndpoints = 4096
	}
	if cfg.MaxServices == 0 {
		cfg.MaxServices = 1024
	}
	d, err := New(cfg, slog.New(slog.NewTextHandler(t.Output(), nil)))
	if err != nil {
		t.Fatalf("load datapath: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("close datapath: %v", err)
		}
	})
	return &harness{t: t, d: d, ns: ns, nn: nn}
}

// link gives the harness's namespace what the program's route lookups need: forwarding
// for both families, a veth d0 with addr (its peer in a namespace of its own), an
// on-link route over d0 to each of onLink and a permanent neighbour entry for each of
// neighbours. It returns d0.
func (h *harness) link(addr string, onLink []string, neighbours map[netip.Addr][6]byte) *net.Interface {
	h.t.Helper()
	h.nn.Run(h.t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	h.nn.Run(h.t, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	h.nn.Run(h.t, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
	h.nn.Run(h.t, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
	testenv.Veth(h.t, h.nn, "d0", addr, testenv.NewNetNS(h.t, "d0peer"), "p0", "")
	for _, prefix := range onLink {
		h.nn.Run(h.t, "ip", "route", "add", prefix, "dev", "d0")
	}
	for a, mac := range neighbours {
		h.neighbour(a, mac)
	}
	var d0 *net.Interface
	h.inNS(func() {
		var err error
		if d0, err = net.InterfaceByName("d0"); err != nil {
			h.t.Fatalf("d0: %v", err)
		}
	})
	return d0
}

// neighbour sets a permanent neighbour entry on d0.
func (h *harness) neighbour(a netip.Addr, mac [6]byte) {
	h.t.Helper()
	h.nn.Run(h.t, "ip", "neigh", "replace", a.String(), "lladdr", net.HardwareAddr(mac[:]).String(), "dev", "d0", "nud", "permanent")
}

// inNS runs fn on a thread inside the harness's namespace.
func (h *harness) inNS(fn func()) {
	h.t.Helper()
	inNetNS(h.t, h.ns, fn)
}

// inNetNS runs fn on a thread inside ns; sockets fn creates stay in ns.
func inNetNS(t testing.TB, ns netns.NsHandle, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatalf("get netns: %v", err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		t.Fatalf("enter netns: %v", err)
	}
	defer func() {
		if err := netns.Set(orig); err != nil {
			panic("cannot leave the test namespace: " + err.Error())
		}
	}()
	fn()
}

// openNS returns a handle of a test namespace, closed when the test ends.
func openNS(t testing.TB, n testenv.NetNS) netns.NsHandle {
	t.Helper()
	ns, err := netns.GetFromName(n.Name)
	if err != nil {
		t.Fatalf("open netns %s: %v", n.Name, err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

func (h *harness) run(prog *ebpf.Program, in []byte) (uint32, []byte) {
	h.t.Helper()
	var ret uint32
	opts := &ebpf.RunOptions{Data: in, DataOut: make([]byte, len(in)+256)}
	h.inNS(func() {
		var err error
		ret, err = prog.Run(opts)
		if err != nil {
			h.t.Fatalf("test run: %v", err)
		}
	})
	// The packet as the program left it: the kernel cuts DataOut to its length.
	return ret, opts.DataOut
}

func (h *harness) lb(in []byte) (uint32, []byte) { return h.run(h.d.objs.LbIngress, in) }

func (h *harness) set(fes ...shard.Frontend) {
	h.t.Helper()
	if err := h.d.SetServices(fes); err != nil {
		h.t.Fatalf("SetServices: %v", err)
	}
}

// endpointOf returns the destination of a translated packet.
func endpointOf(t testing.TB, b []byte) netip.AddrPort {
	t.Helper()
	switch binary.BigEndian.Uint16(b[12:]) {
	case 0x0800:
		ip := b[14:]
		hl := int(ip[0]&0xf) * 4
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[16:20])), binary.BigEndian.Uint16(ip[hl+2:]))
	case 0x86dd:
		ip := b[14:]
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(ip[24:40])), binary.BigEndian.Uint16(ip[42:]))
	}
	t.Fatalf("not an IP packet: % x", b)
	return netip.AddrPort{}
}

// flowHash mirrors flow_hash in bpf/balance.h (jhash2 over the nine words of struct
// flow), so tests can predict the SNAT port a new flow gets.
func flowHash(src, dst netip.AddrPort, proto shard.Protocol) uint32 {
	var w [9]uint32
	s, d := addrWords(src.Addr()), addrWords(dst.Addr())
	copy(w[0:4], s[:])
	copy(w[4:8], d[:])
	var ports [4]byte
	binary.BigEndian.PutUint16(ports[0:], src.Port())
	binary.BigEndian.PutUint16(ports[2:], dst.Port())
	w[8] = binary.NativeEndian.Uint32(ports[:])

	const initval = 0xdeadbeef
	a := uint32(initval + 9<<2 + (0x5a4d1b0b ^ uint32(proto)))
	b, c := a, a
	mix := func() {
		a -= c
		a ^= bits.RotateLeft32(c, 4)
		c += b
		b -= a
		b ^= bits.RotateLeft32(a, 6)
		a += c
		c -= b
		c ^= bits.RotateLeft32(b, 8)
		b += a
		a -= c
		a ^= bits.RotateLeft32(c, 16)
		c += b
		b -= a
		b ^= bits.RotateLeft32(a, 19)
		a += c
		c -= b
		c ^= bits.RotateLeft32(b, 4)
		b += a
	}
	a, b, c = a+w[0], b+w[1], c+w[2]
	mix()
	a, b, c = a+w[3], b+w[4], c+w[5]
	mix()
	a, b, c = a+w[6], b+w[7], c+w[8]
	c ^= b
	c -= bits.RotateLeft32(b, 14)
	a ^= c
	a -= bits.RotateLeft32(c, 11)
	b ^= a
	b -= bits.RotateLeft32(a, 25)
	c ^= b
	c -= bits.RotateLeft32(b, 16)
	a ^= c
	a -= bits.RotateLeft32(c, 4)
	b ^= a
	b -= bits.RotateLeft32(a, 14)
	c ^= b
	c -= bits.RotateLeft32(b, 24)
	return c
}

// lbMany runs packets in one visit to the namespace and returns each output's
// destination (the endpoint a forward packet was sent to).
func (h *harness) lbMany(ins [][]byte) []netip.AddrPort {
	h.t.Helper()
	dsts := make([]netip.AddrPort, len(ins))
	h.inNS(func() {
		out := make([]byte, 512)
		for i, in := range ins {
			ret, err := h.d.objs.LbIngress.Run(&ebpf.RunOptions{Data: in, DataOut: out})
			if err != nil {
				h.t.Fatalf("test run: %v", err)
			}
			if ret != actOK {
				h.t.Fatalf("packet %d: action %d, want %d", i, ret, actOK)
			}
			dsts[i] = endpointOf(h.t, out[:len(in)])
		}
	})
	return dsts
}
