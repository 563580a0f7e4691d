package datapath

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/shardlb/shardlb/internal/testenv"
	"github.com/shardlb/shardlb/shard"
)

// TestOffloadedPackets moves 8 MiB each way through an IPv4 and an IPv6 VIP, in default
// and onearm mode, with the offloads real devices have on:
//   - GRO on the load balancer's interfaces (NICs have it by default): the program sees
//     TCP segments merged into one packet far larger than the MTU, which the egress
//     device splits again;
//   - checksum offload on the senders' veths (the veth default, and virtio's for a
//     sender on the same host): the program sees packets whose L4 checksum is left to
//     be completed (CHECKSUM_PARTIAL).
//
// Both must be translated and redirected by the program like any other packet, not
// left to the kernel's forwarding path (the slow path the program exists to skip),
// which the namespace's forwarded-datagram counters would show.
func TestOffloadedPackets(t *testing.T) { forEachVariant(t, testOffloadedPackets) }

func testOffloadedPackets(t *testing.T, v variant) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "ip", "ethtool", "sysctl")
	client := testenv.NewNetNS(t, "offcli")
	lb := testenv.NewNetNS(t, "offlb")
	backend := testenv.NewNetNS(t, "offbe")
	testenv.Veth(t, client, "c0", "10.30.1.2/24", lb, "l0", "10.30.1.1/24")
	testenv.Veth(t, lb, "l1", "10.30.2.1/24", backend, "b0", "10.30.2.2/24")
	lb.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	lb.Run(t, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	for _, a := range []struct {
		ns        testenv.NetNS
		dev, addr string
	}{{client, "c0", "fd30:1::2/64"}, {lb, "l0", "fd30:1::1/64"}, {lb, "l1", "fd30:2::1/64"}, {backend, "b0", "fd30:2::2/64"}} {
		a.ns.Run(t, "ip", "addr", "add", a.addr, "dev", a.dev, "nodad")
	}
	client.Run(t, "ip", "route", "add", "default", "via", "10.30.1.1")
	client.Run(t, "ip", "-6", "route", "add", "default", "via", "fd30:1::1")
	backend.Run(t, "ip", "route", "add", "default", "via", "10.30.2.1")
	backend.Run(t, "ip", "-6", "route", "add", "default", "via", "fd30:2::1")

	body := bytes.Repeat([]byte("0123456789abcdef"), 8<<20/16)
	handler := func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		if r.Method == http.MethodPost {
			_, _ = io.WriteString(w, strconv.FormatInt(n, 10))
			return
		}
		_, _ = w.Write(body)
	}
	backendNS := openNS(t, backend)
	eps := []netip.AddrPort{netip.MustParseAddrPort("10.30.2.2:8080"), netip.MustParseAddrPort("[fd30:2::2]:8080")}
	for _, ep := range eps {
		serveHTTP(t, backendNS, ep, "backend", handler)
	}
	vips := []netip.Addr{netip.MustParseAddr("10.30.100.1"), netip.MustParseAddr("fd30:100::1")}
	d := attached(t, Config{Interfaces: []string{"l0", "l1"}, NetNS: "/var/run/netns/" + lb.Name,
		NodeIPv4: netip.MustParseAddr("10.30.2.1"), NodeIPv6: netip.MustParseAddr("fd30:2::1"), variant: v})
	c := nsHTTPClient(t, openNS(t, client), false)

	offloads := []struct {
		name string
		on   func()
	}{
		{"GRO on the load balancer", func() {
			for _, dev := range []string{"l0", "l1"} {
				lb.Run(t, "ethtool", "-K", dev, "gro", "on")
			}
		}},
		{"checksum offload on the senders", func() {
			for _, dev := range []string{"l0", "l1"} {
				lb.Run(t, "ethtool", "-K", dev, "gro", "off")
			}
			client.Run(t, "ethtool", "-K", "c0", "tx", "on")
			backend.Run(t, "ethtool", "-K", "b0", "tx", "on")
		}},
	}
	for _, o := range offloads {
		o.on()
		for i, vip := range vips {
			for _, m := range []shard.Mode{shard.ModeDefault, shard.ModeOneArm} {
				t.Run(fmt.Sprintf("%s/%s %s mode", o.name, vip, m), func(t *testing.T) {
					fe := shard.Frontend{Service: "ns/bulk", VIP: vip, Port: 80, Protocol: shard.TCP, Mode: m,
						Endpoints: []shard.Endpoint{{Addr: eps[i].Addr(), Port: eps[i].Port()}}}
					if err := d.SetServices([]shard.Frontend{fe}); err != nil {
						t.Fatal(err)
					}
					url := "http://" + netip.AddrPortFrom(vip, 80).String() + "/"
					before := forwardedDatagrams(t, lb)
					resp, err := c.Post(url, "application/octet-stream", bytes.NewReader(body))
					if err != nil {
						t.Fatalf("upload: %v", err)
					}
					got, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					if string(got) != strconv.Itoa(len(body)) {
						t.Fatalf("upload: backend read %q bytes, want %d", got, len(body))
					}
					resp, err = c.Get(url)
					if err != nil {
						t.Fatalf("download: %v", err)
					}
					got, err = io.ReadAll(resp.Body)
					resp.Body.Close()
					if err != nil || !bytes.Equal(got, body) {
						t.Fatalf("download: %d bytes, err %v; want the %d served", len(got), err, len(body))
					}
					if n := forwardedDatagrams(t, lb) - before; n != 0 {
						t.Errorf("the kernel forwarded %d datagrams of the transfers: want 0, the program sends every packet on", n)
					}
				})
			}
		}
	}
}

// forwardedDatagrams reads how many datagrams the kernel of ns forwarded, IPv4
// (ForwDatagrams in /proc/net/snmp) and IPv6 (Ip6OutForwDatagrams in /proc/net/snmp6).
func forwardedDatagrams(t *testing.T, ns testenv.NetNS) int {
	t.Helper()
	total := 0
	snmp := strings.Split(ns.Run(t, "cat", "/proc/net/snmp"), "\n")
	found := 0
	for i := 0; i+1 < len(snmp); i++ {
		names, values := strings.Fields(snmp[i]), strings.Fields(snmp[i+1])
		if len(names) == 0 || names[0] != "Ip:" || len(values) != len(names) {
			continue
		}
		for j, name := range names {
			if name == "ForwDatagrams" {
				total += atoi(t, values[j])
				found++
			}
		}
		break
	}
	for _, line := range strings.Split(ns.Run(t, "cat", "/proc/net/snmp6"), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "Ip6OutForwDatagrams" {
			total += atoi(t, f[1])
			found++
		}
	}
	if found != 2 {
		t.Fatalf("found %d of the 2 forwarding counters", found)
	}
	return total
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("counter %q: %v", s, err)
	}
	return n
}
