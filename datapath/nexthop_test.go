package datapath

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/shardlb/shardlb/internal/testenv"
	"github.com/shardlb/shardlb/shard"
)

// TestNextHopCache checks the next hop a conntrack entry caches so that established
// packets skip the route lookup: it must be what the lookup gives, follow a changed
// neighbour within the cache's age, and never let a packet past the MTU check the
// lookup made.
func TestNextHopCache(t *testing.T) {
	h := newHarness(t, Config{})
	h.nn.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	testenv.Veth(t, h.nn, "d0", "10.2.0.1/16", testenv.NewNetNS(t, "nhpeer"), "p0", "")
	h.nn.Run(t, "ip", "route", "add", "10.1.0.0/16", "dev", "d0")
	macA, macB := [6]byte{0x02, 0, 0, 0, 0, 0xaa}, [6]byte{0x02, 0, 0, 0, 0, 0xbb}
	ep := netip.AddrPortFrom(netip.MustParseAddr("10.2.0.11"), epPort)
	h.nn.Run(t, "ip", "neigh", "add", ep.Addr().String(), "lladdr", net.HardwareAddr(macA[:]).String(), "dev", "d0", "nud", "permanent")
	var d0 *net.Interface
	h.inNS(func() {
		var err error
		if d0, err = net.InterfaceByName("d0"); err != nil {
			t.Fatalf("d0: %v", err)
		}
	})

	vip := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.10"), vipPort)
	client := netip.AddrPortFrom(netip.MustParseAddr("10.1.0.2"), cliPort)
	h.set(shard.Frontend{Service: "ns/nh", VIP: vip.Addr(), Port: vipPort, Protocol: shard.TCP,
		Endpoints: []shard.Endpoint{{Addr: ep.Addr(), Port: ep.Port()}}})
	in := func(payload []byte) []byte {
		return pkt{src: client, dst: vip, proto: shard.TCP, tcpFlags: 0x10, payload: payload}.bytes()
	}
	key := lbFlow4{Saddr: addrWords(client.Addr())[0], Daddr: addrWords(vip.Addr())[0], Sport: htons(client.Port()),
		Dport: htons(vip.Port()), Proto: uint8(shard.TCP)}

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
		if err := h.d.objs.Conntrack4.Lookup(&key, &ct); err != nil {
			t.Fatalf("conntrack entry: %v", err)
		}
		if ct.NhIfindex != uint32(d0.Index) || ct.NhDmac != macA || !bytes.Equal(ct.NhSmac[:], d0.HardwareAddr) {
			t.Fatalf("cached next hop ifindex %d %x -> %x, want %d %x -> %x",
				ct.NhIfindex, ct.NhSmac, ct.NhDmac, d0.Index, d0.HardwareAddr, macA)
		}
	})

	t.Run("a changed neighbour reaches the flow within the cache's age", func(t *testing.T) {
		h.nn.Run(t, "ip", "neigh", "replace", ep.Addr().String(), "lladdr", net.HardwareAddr(macB[:]).String(), "dev", "d0", "nud", "permanent")
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
		if ret != actOK {
			t.Fatalf("action %d for a packet over the MTU, want %d (the kernel answers it)", ret, actOK)
		}
		if err := verifyChecksums(out); err != nil {
			t.Fatal(err)
		}
		if got := out[14+8]; got != 64 {
			t.Fatalf("TTL %d: a packet the kernel forwards must keep its TTL (64)", got)
		}
		if got := endpointOf(t, out); got != ep {
			t.Fatalf("translated to %v, want %v", got, ep)
		}
		if ret, _ := h.lb(in(nil)); ret != actRedirect {
			t.Fatalf("action %d for a small packet after a long one, want redirect %d", ret, actRedirect)
		}
	})
}
