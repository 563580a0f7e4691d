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

// TestGROPacketsAreForwardedHere moves 8 MiB each way through the VIP with GRO on the
// load balancer's interfaces, as NICs have it by default: the load balancer then sees
// TCP segments merged into packets far larger than the MTU, which the egress device
// splits again. They must be translated and redirected by the program like any other
// packet, not left to the kernel's forwarding path (the slow path the program exists to
// skip), which the namespace's forwarded-datagram counter would show.
func TestGROPacketsAreForwardedHere(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "ip", "ethtool", "sysctl")
	client := testenv.NewNetNS(t, "grocli")
	lb := testenv.NewNetNS(t, "grolb")
	backend := testenv.NewNetNS(t, "grobe")
	testenv.Veth(t, client, "c0", "10.30.1.2/24", lb, "l0", "10.30.1.1/24")
	testenv.Veth(t, lb, "l1", "10.30.2.1/24", backend, "b0", "10.30.2.2/24")
	lb.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	client.Run(t, "ip", "route", "add", "default", "via", "10.30.1.1")
	backend.Run(t, "ip", "route", "add", "default", "via", "10.30.2.1")
	for _, dev := range []string{"l0", "l1"} {
		lb.Run(t, "ethtool", "-K", dev, "gro", "on")
	}

	body := bytes.Repeat([]byte("0123456789abcdef"), 8<<20/16)
	ep := netip.AddrPortFrom(netip.MustParseAddr("10.30.2.2"), 8080)
	serveHTTP(t, openNS(t, backend), ep, "backend", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		if r.Method == http.MethodPost {
			_, _ = io.WriteString(w, strconv.FormatInt(n, 10))
			return
		}
		_, _ = w.Write(body)
	})
	vip := netip.MustParseAddr("10.30.100.1")
	d := attached(t, Config{Interfaces: []string{"l0", "l1"}, NetNS: "/var/run/netns/" + lb.Name, NodeIPv4: netip.MustParseAddr("10.30.2.1")})
	c := nsHTTPClient(t, openNS(t, client), false)
	url := "http://" + netip.AddrPortFrom(vip, 80).String() + "/"

	for _, m := range []shard.Mode{shard.ModeDefault, shard.ModeOneArm} {
		t.Run(fmt.Sprintf("%s mode", m), func(t *testing.T) {
			fe := shard.Frontend{Service: "ns/bulk", VIP: vip, Port: 80, Protocol: shard.TCP, Mode: m,
				Endpoints: []shard.Endpoint{{Addr: ep.Addr(), Port: ep.Port()}}}
			if err := d.SetServices([]shard.Frontend{fe}); err != nil {
				t.Fatal(err)
			}
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

// forwardedDatagrams reads the IPv4 ForwDatagrams counter of ns.
func forwardedDatagrams(t *testing.T, ns testenv.NetNS) int {
	t.Helper()
	out := ns.Run(t, "cat", "/proc/net/snmp")
	var names []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "Ip:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		for i, name := range names {
			if name == "ForwDatagrams" && i < len(f) {
				n, err := strconv.Atoi(f[i])
				if err != nil {
					t.Fatalf("ForwDatagrams %q: %v", f[i], err)
				}
				return n
			}
		}
	}
	t.Fatalf("no Ip ForwDatagrams in /proc/net/snmp:\n%s", out)
	return 0
}
