package datapath

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strconv"
	"testing"

	"github.com/shardlb/shardlb/internal/testenv"
	"github.com/shardlb/shardlb/shard"
)

// TestPathMTUThroughTheVIP downloads 256 KiB through the VIP over a path with one link
// of a smaller MTU (1280) than the rest (1500), with real TCP:
//
//	client 10.20.1.2 -- 10.20.1.1 router 10.20.2.1 -- 10.20.2.2 lb 10.20.3.1 -- 10.20.3.2 backend
//
// The client announces an MSS for 1500 bytes, so the backend's first full segments
// are too big for the small link, and the backend must learn that (path MTU discovery)
// or the connection stalls (a path MTU black hole):
//   - the router's link to the client is the small one: the router answers with
//     "fragmentation needed" sent to the segments' source, the VIP, which routes to the
//     load balancer, which must hand the error to the backend (icmp4_error);
//   - the load balancer's link to the router is: its route lookup says the segments
//     do not fit, and it must answer the backend itself (icmp4_too_big), since the
//     kernel's own answer would go to the translated source, the VIP.
func TestPathMTUThroughTheVIP(t *testing.T) { forEachVariant(t, testPathMTUThroughTheVIP) }

func testPathMTUThroughTheVIP(t *testing.T, v variant) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "ip", "ethtool", "sysctl")
	client := testenv.NewNetNS(t, "pmcli")
	router := testenv.NewNetNS(t, "pmrtr")
	lb := testenv.NewNetNS(t, "pmlb")
	backend := testenv.NewNetNS(t, "pmbe")
	testenv.Veth(t, client, "c0", "10.20.1.2/24", router, "r0", "10.20.1.1/24")
	testenv.Veth(t, router, "r1", "10.20.2.1/24", lb, "l0", "10.20.2.2/24")
	testenv.Veth(t, lb, "l1", "10.20.3.1/24", backend, "b0", "10.20.3.2/24")
	for _, ns := range []testenv.NetNS{router, lb} {
		ns.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	}
	vip := netip.MustParseAddr("10.20.100.1")
	client.Run(t, "ip", "route", "add", "default", "via", "10.20.1.1")
	router.Run(t, "ip", "route", "add", vip.String()+"/32", "via", "10.20.2.2")
	lb.Run(t, "ip", "route", "add", "10.20.1.0/24", "via", "10.20.2.1")
	backend.Run(t, "ip", "route", "add", "default", "via", "10.20.3.1")

	body := bytes.Repeat([]byte("0123456789abcdef"), 256<<10/16)
	ep := netip.AddrPortFrom(netip.MustParseAddr("10.20.3.2"), 8080)
	serveHTTP(t, openNS(t, backend), ep, "backend", func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write(body) })

	d := attached(t, Config{Interfaces: []string{"l0", "l1"}, NetNS: "/var/run/netns/" + lb.Name, NodeIPv4: netip.MustParseAddr("10.20.3.1"), variant: v})
	clientNS := openNS(t, client)

	mtu := func(ns testenv.NetNS, dev string, n int) {
		ns.Run(t, "ip", "link", "set", "dev", dev, "mtu", strconv.Itoa(n))
	}
	bottlenecks := []struct {
		name string
		set  func()
	}{
		{"small link past a router", func() { mtu(router, "r0", 1280) }},
		{"small link from the load balancer", func() {
			mtu(router, "r0", 1500)
			mtu(router, "r1", 1280)
			mtu(lb, "l0", 1280)
		}},
	}
	for _, bn := range bottlenecks {
		bn.set()
		for _, m := range []shard.Mode{shard.ModeDefault, shard.ModeOneArm} {
			t.Run(fmt.Sprintf("%s/%s mode", bn.name, m), func(t *testing.T) {
				fe := shard.Frontend{Service: "ns/big", VIP: vip, Port: 80, Protocol: shard.TCP, Mode: m,
					Endpoints: []shard.Endpoint{{Addr: ep.Addr(), Port: ep.Port()}}}
				if err := d.SetServices([]shard.Frontend{fe}); err != nil {
					t.Fatal(err)
				}
				// The backend must learn the path MTU from this download, not an earlier one.
				backend.Run(t, "ip", "route", "flush", "cache")
				before := d.Stats().Services[0].ICMPErrors
				resp, err := nsHTTPClient(t, clientNS, false).Get("http://" + netip.AddrPortFrom(vip, 80).String() + "/")
				if err != nil {
					t.Fatalf("GET: %v", err)
				}
				got, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil {
					t.Fatalf("download stalled after %d of %d bytes: %v", len(got), len(body), err)
				}
				if !bytes.Equal(got, body) {
					t.Fatalf("downloaded %d bytes, not the %d served", len(got), len(body))
				}
				if d.Stats().Services[0].ICMPErrors == before {
					t.Error("no ICMP error reached the backend through the load balancer")
				}
			})
		}
	}
}
