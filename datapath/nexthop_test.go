package datapath

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/shardlb/shardlb/shard"
)

// TestNextHopCache checks the next hop a conntrack entry caches so that established
// packets skip the route lookup: it must be what the lookup gives, follow a changed
// neighbour within the cache's age, and never let a packet past the MTU check the
// lookup made.
func TestNextHopCache(t *testing.T) {
	h := newHarness(t, Config{})
	macA, macB := [6]byte{0x02, 0, 0, 0, 0, 0xaa}, [6]byte{0x02, 0, 0, 0, 0, 0xbb}
	ep := netip.AddrPortFrom(netip.MustParseAddr("10.2.0.11"), epPort)
	d0 := h.link("10.2.0.1/16", []string{"10.1.0.0/16"}, map[netip.Addr][6]byte{ep.Addr(): macA})

	vip := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.10"), vipPort)
	client := netip.AddrPortFrom(netip.MustParseAddr("10.1.0.2"), cliPort)
	h.set(shard.Frontend{Service: "ns/nh", VIP: vip.Addr(), Port: vipPort, Protocol: shard.TCP,
		Endpoints: []shard.Endpoint{{Addr: ep.Addr(), Port: ep.Port()}}})
	in := func(payload []byte) []byte {
		return pkt{src: client, dst: vip, proto: shard.TCP, tcpFlags: 0x10, payload: payload}.bytes()
	}
	key := lbFlow4{Saddr: addrWords(client.Addr())[0], Daddr: addrWords(vip.Addr())[0], Sport: htons(client.Port()),
		Dport: htons(vip.Port())}

	t.Run("a new flow is recorded with the next hop its first packet was sent to", func(t *testing.T) {
		ret, out := h.lb(in(nil))
		if ret != actRedirect {
			t.Fatalf("action %d, want redirect %d", ret, actRedirect)
		}
		if err := verifyChecksums(out); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out[0:6], macA[:]) || !bytes.Equal(out[6:12], d0.HardwareAddr) {
			t.Fatalf("MACs % x -> % x, want % x -> % x", out[6:12], out[0:6], d0.HardwareAddr, macA)
		}
		var ct lbCtEntry
		if err := h.d.objs.Conntrack4Tcp.Lookup(&key, &ct); err != nil {
			t.Fatalf("conntrack entry: %v", err)
		}
		if ct.NhIfindex != uint32(d0.Index) || ct.NhDmac != macA || !bytes.Equal(ct.NhSmac[:], d0.HardwareAddr) {
			t.Fatalf("cached next hop ifindex %d %x -> %x, want %d %x -> %x",
				ct.NhIfindex, ct.NhSmac, ct.NhDmac, d0.Index, d0.HardwareAddr, macA)
		}
	})

	t.Run("a changed neighbour reaches the flow within the cache's age", func(t *testing.T) {
		h.neighbour(ep.Addr(), macB)
		// 64 jiffies are at most 640 ms (HZ=100); the rest is slack for a loaded machine.
		deadline := time.Now().Add(3 * time.Second)
		for {
			ret, out := h.lb(in(nil))
			if ret != actRedirect {
				t.Fatalf("action %d, want redirect %d", ret, actRedirect)
			}
			if bytes.Equal(out[0:6], macB[:]) {
				break
			}
			if !bytes.Equal(out[0:6], macA[:]) {
				t.Fatalf("sent to % x, neither the old nor the new neighbour", out[0:6])
			}
			if time.Now().After(deadline) {
				t.Fatal("the flow still goes to the old neighbour")
			}
			time.Sleep(20 * time.Millisecond)
		}
	})

	t.Run("a packet longer than the cached lookup checked goes to the kernel", func(t *testing.T) {
		h.nn.Run(t, "ip", "link", "set", "d0", "mtu", "1280")
		h.lb(in(nil)) // a small packet: still fits, and is cached
		long := in(make([]byte, 1300))
		ret, out := h.lb(long)
		leftToKernel(t, ret, out)
		if got := endpointOf(t, out); got != ep {
			t.Fatalf("translated to %v, want %v", got, ep)
		}
		if ret, _ := h.lb(in(nil)); ret != actRedirect {
			t.Fatalf("action %d for a small packet after a long one, want redirect %d", ret, actRedirect)
		}
	})
}

// TestEndpointNextHopCache checks the next hop a CPU keeps per endpoint so that a new
// flow skips the route lookup: new flows must use it, and it must answer only lookups
// with the same inputs (endpoint, source address) and follow a changed neighbour within
// the cache's age, like a flow's own cached next hop.
func TestEndpointNextHopCache(t *testing.T) {
	h := newHarness(t, Config{})
	macA, macB := [6]byte{0x02, 0, 0, 0, 0, 0xaa}, [6]byte{0x02, 0, 0, 0, 0, 0xbb}
	macGW, macY := [6]byte{0x02, 0, 0, 0, 0, 0x99}, [6]byte{0x02, 0, 0, 0, 0, 0x12}
	ep := netip.AddrPortFrom(netip.MustParseAddr("10.2.0.11"), epPort)
	other := netip.AddrPortFrom(netip.MustParseAddr("10.2.0.12"), epPort)
	d0 := h.link("10.2.0.1/16", []string{"10.1.0.0/16"}, map[netip.Addr][6]byte{ep.Addr(): macA, other.Addr(): macY})

	vip := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.10"), vipPort)
	clientA, clientB := netip.MustParseAddr("10.1.0.2"), netip.MustParseAddr("10.1.0.3")
	frontend := func(e netip.AddrPort) shard.Frontend {
		return shard.Frontend{Service: "ns/enh", VIP: vip.Addr(), Port: vipPort, Protocol: shard.TCP,
			Endpoints: []shard.Endpoint{{Addr: e.Addr(), Port: e.Port()}}}
	}
	h.set(frontend(ep))
	port := uint16(cliPort)
	// newFlowOn sends the first packet of a flow from src on a port no flow used yet as
	// if it arrived on dev (nil: the namespace's loopback) and returns the
	// output and the flow's conntrack entry.
	newFlowOn := func(src netip.Addr, dev *net.Interface) ([]byte, lbCtEntry) {
		t.Helper()
		port++
		client := netip.AddrPortFrom(src, port)
		p := pkt{src: client, dst: vip, proto: shard.TCP}
		if dev != nil {
			// Addressed to the device, as it must be to be for this host.
			p.dstMAC = [6]byte(dev.HardwareAddr)
		}
		in := p.bytes()
		var ret uint32
		out := make([]byte, len(in))
		h.inNS(func() {
			opts := &ebpf.RunOptions{Data: in, DataOut: out}
			if dev != nil {
				// struct __sk_buff up to ifindex, the device the packet arrives on.
				var skb [11]uint32
				skb[10] = uint32(dev.Index)
				opts.Context = skb
			}
			var err error
			if ret, err = h.d.objs.LbIngress.Run(opts); err != nil {
				t.Fatalf("test run: %v", err)
			}
		})
		if ret != actRedirect {
			t.Fatalf("action %d, want redirect %d", ret, actRedirect)
		}
		if err := verifyChecksums(out); err != nil {
			t.Fatal(err)
		}
		key := lbFlow4{Saddr: addrWords(src)[0], Daddr: addrWords(vip.Addr())[0], Sport: htons(client.Port()),
			Dport: htons(vip.Port())}
		var ct lbCtEntry
		if err := h.d.objs.Conntrack4Tcp.Lookup(&key, &ct); err != nil {
			t.Fatalf("conntrack entry: %v", err)
		}
		return out, ct
	}
	newFlow := func(src netip.Addr) ([]byte, lbCtEntry) { t.Helper(); return newFlowOn(src, nil) }
	slots := h.d.objs.EndpointNhs.MaxEntries()

	t.Run("a new flow uses the next hop of the endpoint's previous new flow", func(t *testing.T) {
		// The cache is found in use by what it makes a new flow do: a next hop written
		// into it (a MAC no lookup gives) must be where the next new flow goes. Both
		// packets must run within the cache's age (64 jiffies, 64 ms at HZ=1000, of
		// which the planted answer already used 16); a loaded machine may need another
		// try.
		for try := 0; ; try++ {
			start := time.Now()
			out, ct := newFlow(clientA)
			if !bytes.Equal(out[0:6], macA[:]) {
				t.Fatalf("first flow sent to % x, want % x", out[0:6], macA)
			}
			slot := ct.EndpointId % slots
			var per []lbEndpointNh
			if err := h.d.objs.EndpointNhs.Lookup(slot, &per); err != nil {
				t.Fatalf("next-hop cache: %v", err)
			}
			var found *lbEndpointNh
			for i := range per {
				if per[i].Ifindex != 0 && per[i].EndpointId == ct.EndpointId {
					found = &per[i]
				}
			}
			if found == nil || found.Dmac != macA || found.Saddr != addrWords(clientA) || found.Time != ct.NhTime {
				t.Fatalf("cache slot %d holds %+v, want the first flow's next hop %x at %d", slot, per, macA, ct.NhTime)
			}
			planted := *found
			planted.Dmac = [6]byte{0x02, 0, 0, 0, 0, 0x5e}
			planted.Time -= 16 // an older lookup, still young enough to be used
			for i := range per {
				per[i] = planted
			}
			if err := h.d.objs.EndpointNhs.Put(slot, per); err != nil {
				t.Fatalf("write next-hop cache: %v", err)
			}
			out, ct2 := newFlow(clientA)
			if bytes.Equal(out[0:6], planted.Dmac[:]) {
				// The flow keeps the lookup's time: the cache never extends an answer's age.
				if ct2.NhTime != planted.Time || ct2.NhDmac != planted.Dmac || ct2.NhIfindex != planted.Ifindex {
					t.Fatalf("flow cached next hop %x at %d, want the endpoint's %x at %d", ct2.NhDmac, ct2.NhTime, planted.Dmac, planted.Time)
				}
				break
			}
			if elapsed := time.Since(start); elapsed < 40*time.Millisecond || try == 4 {
				t.Fatalf("second flow sent to % x after %v, want the cached % x", out[0:6], elapsed, planted.Dmac)
			}
		}
	})

	t.Run("a changed neighbour reaches new flows within the cache's age", func(t *testing.T) {
		h.neighbour(ep.Addr(), macB)
		deadline := time.Now().Add(3 * time.Second)
		for {
			out, _ := newFlow(clientA)
			if bytes.Equal(out[0:6], macB[:]) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("new flows still go to % x", out[0:6])
			}
			time.Sleep(20 * time.Millisecond)
		}
	})

	t.Run("a new flow from another source looks its own route up", func(t *testing.T) {
		// Policy routing sends clientB's flows through a gateway: clientA's answer,
		// cached a moment before, must not be taken for it.
		gw := netip.MustParseAddr("10.2.0.99")
		h.neighbour(gw, macGW)
		h.nn.Run(t, "ip", "route", "add", ep.Addr().String(), "via", gw.String(), "dev", "d0", "table", "100")
		h.nn.Run(t, "ip", "rule", "add", "from", clientB.String(), "lookup", "100")
		if out, _ := newFlow(clientA); !bytes.Equal(out[0:6], macB[:]) {
			t.Fatalf("flow from %v sent to % x, want % x", clientA, out[0:6], macB)
		}
		if out, _ := newFlow(clientB); !bytes.Equal(out[0:6], macGW[:]) {
			t.Fatalf("flow from %v sent to % x, want its gateway % x", clientB, out[0:6], macGW)
		}
		if out, _ := newFlow(clientA); !bytes.Equal(out[0:6], macB[:]) {
			t.Fatalf("flow from %v sent to % x, want % x", clientA, out[0:6], macB)
		}
	})

	t.Run("a new flow arriving on another device looks its own route up", func(t *testing.T) {
		// Policy routing sends flows arriving on d0 through another gateway.
		gw := netip.MustParseAddr("10.2.0.98")
		macGW2 := [6]byte{0x02, 0, 0, 0, 0, 0x98}
		h.neighbour(gw, macGW2)
		h.nn.Run(t, "ip", "route", "add", ep.Addr().String(), "via", gw.String(), "dev", "d0", "table", "101")
		h.nn.Run(t, "ip", "rule", "add", "iif", "d0", "lookup", "101")
		if out, _ := newFlow(clientA); !bytes.Equal(out[0:6], macB[:]) {
			t.Fatalf("flow arriving on lo sent to % x, want % x", out[0:6], macB)
		}
		if out, _ := newFlowOn(clientA, d0); !bytes.Equal(out[0:6], macGW2[:]) {
			t.Fatalf("flow arriving on d0 sent to % x, want its gateway % x", out[0:6], macGW2)
		}
		h.nn.Run(t, "ip", "rule", "del", "iif", "d0", "lookup", "101")
	})

	t.Run("an endpoint id given to another endpoint does not inherit its next hop", func(t *testing.T) {
		if out, ct := newFlow(clientA); !bytes.Equal(out[0:6], macB[:]) || endpointOf(t, out) != ep {
			t.Fatalf("flow sent to %v at % x, want %v at % x", endpointOf(t, out), out[0:6], ep, macB)
		} else if ct.EndpointId != 0 {
			t.Fatalf("endpoint id %d: the test needs the id the next endpoint gets", ct.EndpointId)
		}
		h.set()
		h.set(frontend(other))
		out, ct := newFlow(clientA)
		if endpointOf(t, out) != other || ct.EndpointId != 0 {
			t.Fatalf("flow sent to %v (endpoint id %d), want %v on the reused id 0", endpointOf(t, out), ct.EndpointId, other)
		}
		if !bytes.Equal(out[0:6], macY[:]) {
			t.Fatalf("flow to %v sent to % x, want its neighbour % x", other, out[0:6], macY)
		}
	})

	t.Run("a new flow longer than the cached lookup checked goes to the kernel", func(t *testing.T) {
		h.nn.Run(t, "ip", "link", "set", "d0", "mtu", "1280")
		newFlow(clientA) // a small packet: fits, and its next hop is cached
		port++
		ret, out := h.lb(pkt{src: netip.AddrPortFrom(clientA, port), dst: vip, proto: shard.TCP, payload: make([]byte, 1300)}.bytes())
		leftToKernel(t, ret, out)
	})
}

// leftToKernel asserts that a translated IPv4 packet over the checked MTU was handed to
// the kernel (which answers it) with correct checksums and its TTL (64) untouched.
func leftToKernel(t *testing.T, ret uint32, out []byte) {
	t.Helper()
	if ret != actOK {
		t.Fatalf("action %d for a packet over the MTU, want %d (the kernel answers it)", ret, actOK)
	}
	if err := verifyChecksums(out); err != nil {
		t.Fatal(err)
	}
	if got := out[14+8]; got != 64 {
		t.Fatalf("TTL %d: a packet the kernel forwards must keep its TTL (64)", got)
	}
}
