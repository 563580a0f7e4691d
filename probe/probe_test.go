package probe

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/shardlb/shardlb/internal/testenv"
)

func TestHealthNext(t *testing.T) {
	// Each script is a series of probe results (+ ok, - failed) and the Down state
	// after each.
	for _, tc := range []struct {
		name    string
		retries int
		results string
		down    string
	}{
		{"a healthy target stays up while its probes pass", 2, "++++", "...."},
		{"one failure is not enough with retries 2", 2, "-+-+", "...."},
		{"two failures in a row take it down", 2, "+--", "..D"},
		{"a failed target needs two successes in a row to come back", 2, "--+-++", ".DDDD."},
		{"a flapping target keeps its state", 2, "---+-+-+", ".DDDDDDD"},
		{"retries 1 follows every result", 1, "-+-", "D.D"},
		{"retries 0 counts as 1", 0, "-+", "D."},
		{"retries 3 needs three in a row both ways", 3, "--+---+++", ".....DDD."},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h Health
			var got strings.Builder
			for _, r := range tc.results {
				h = h.Next(r == '+', tc.retries)
				if h.Down {
					got.WriteByte('D')
				} else {
					got.WriteByte('.')
				}
			}
			if got.String() != tc.down {
				t.Errorf("results %s with retries %d: states %s, want %s", tc.results, tc.retries, got.String(), tc.down)
			}
		})
	}
}

func TestParseType(t *testing.T) {
	for in, want := range map[string]Type{"tcp": TCP, " HTTP ": HTTP, "https": HTTPS, "udp": UDP, "ping": Ping, "none": None} {
		if got, err := ParseType(in); err != nil || got != want {
			t.Errorf("ParseType(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "sctp", "icmp", "tcp4"} {
		if _, err := ParseType(in); !errors.Is(err, ErrType) {
			t.Errorf("ParseType(%q) = %v, want ErrType", in, err)
		}
	}
}

func check(s Spec, target netip.AddrPort) error {
	if s.Timeout == 0 {
		s.Timeout = 2 * time.Second
	}
	return Check(context.Background(), s, target)
}

// closedPort is a loopback port nothing listens on (for proto, "tcp" or "udp").
func closedPort(t *testing.T, proto string) netip.AddrPort {
	t.Helper()
	var a net.Addr
	switch proto {
	case "tcp":
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		a = l.Addr()
		l.Close()
	default:
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		a = c.LocalAddr()
		c.Close()
	}
	return netip.MustParseAddrPort(a.String())
}

// tcpServer answers each connection: it reads one line and, when reply is set,
// writes reply(line).
func tcpServer(t *testing.T, reply func(string) string) netip.AddrPort {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				buf := make([]byte, 512)
				n, _ := c.Read(buf)
				if reply != nil {
					_, _ = io.WriteString(c, reply(string(buf[:n])))
				}
			}()
		}
	}()
	return netip.MustParseAddrPort(l.Addr().String())
}

func TestCheckTCP(t *testing.T) {
	echo := tcpServer(t, func(in string) string { return "got " + in })
	silent := tcpServer(t, nil)
	for _, tc := range []struct {
		name   string
		spec   Spec
		target netip.AddrPort
		ok     bool
	}{
		{"a listening port passes", Spec{Type: TCP}, silent, true},
		{"a closed port fails", Spec{Type: TCP}, closedPort(t, "tcp"), false},
		{"the expected response passes", Spec{Type: TCP, Request: "health", Response: "got health"}, echo, true},
		{"another response fails", Spec{Type: TCP, Request: "health", Response: "ok"}, echo, false},
		{"no response before the timeout fails", Spec{Type: TCP, Request: "health", Response: "ok", Timeout: 300 * time.Millisecond}, silent, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := check(tc.spec, tc.target); (err == nil) != tc.ok {
				t.Errorf("Check = %v, want ok %v", err, tc.ok)
			}
		})
	}
}

// udpServer answers each datagram with reply(datagram), or not at all when reply is nil.
func udpServer(t *testing.T, reply func(string) string) netip.AddrPort {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 512)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			if reply != nil {
				_, _ = c.WriteTo([]byte(reply(string(buf[:n]))), from)
			}
		}
	}()
	return netip.MustParseAddrPort(c.LocalAddr().String())
}

func TestCheckUDP(t *testing.T) {
	echo := udpServer(t, func(in string) string { return "got " + in })
	silent := udpServer(t, nil)
	short := 300 * time.Millisecond
	for _, tc := range []struct {
		name   string
		spec   Spec
		target netip.AddrPort
		ok     bool
	}{
		{"a silent open port passes (nothing refused it)", Spec{Type: UDP, Timeout: short}, silent, true},
		{"a closed port fails (ICMP port unreachable)", Spec{Type: UDP, Timeout: short}, closedPort(t, "udp"), false},
		{"a closed port fails with a request too", Spec{Type: UDP, Request: "health", Timeout: short}, closedPort(t, "udp"), false},
		{"the expected response passes", Spec{Type: UDP, Request: "health", Response: "got health"}, echo, true},
		{"another response fails", Spec{Type: UDP, Request: "health", Response: "ok", Timeout: short}, echo, false},
		{"silence fails when a response is expected", Spec{Type: UDP, Request: "health", Response: "ok", Timeout: short}, silent, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := check(tc.spec, tc.target); (err == nil) != tc.ok {
				t.Errorf("Check = %v, want ok %v", err, tc.ok)
			}
		})
	}
}

func TestCheckHTTP(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/health", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "all good") })
	mux.HandleFunc("/broken", func(w http.ResponseWriter, _ *http.Request) { http.Error(w, "down", http.StatusServiceUnavailable) })
	mux.HandleFunc("/moved", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://192.0.2.1/", http.StatusFound)
	})
	plain := httptest.NewServer(mux)
	t.Cleanup(plain.Close)
	tlsSrv := httptest.NewTLSServer(mux)
	t.Cleanup(tlsSrv.Close)
	addr := func(s *httptest.Server) netip.AddrPort { return netip.MustParseAddrPort(s.Listener.Addr().String()) }
	for _, tc := range []struct {
		name   string
		spec   Spec
		target netip.AddrPort
		ok     bool
	}{
		{"200 passes", Spec{Type: HTTP, Request: "/health"}, addr(plain), true},
		{"a path without its slash is the same path", Spec{Type: HTTP, Request: "health"}, addr(plain), true},
		{"the expected body passes", Spec{Type: HTTP, Request: "/health", Response: "good"}, addr(plain), true},
		{"another body fails", Spec{Type: HTTP, Request: "/health", Response: "ok"}, addr(plain), false},
		{"404 fails", Spec{Type: HTTP}, addr(plain), false},
		{"503 fails", Spec{Type: HTTP, Request: "/broken"}, addr(plain), false},
		{"a redirect passes and is not followed", Spec{Type: HTTP, Request: "/moved"}, addr(plain), true},
		{"a closed port fails", Spec{Type: HTTP}, closedPort(t, "tcp"), false},
		{"https with a certificate naming nothing passes", Spec{Type: HTTPS, Request: "/health", Response: "good"}, addr(tlsSrv), true},
		{"https to a plain HTTP server fails", Spec{Type: HTTPS, Request: "/health"}, addr(plain), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := check(tc.spec, tc.target); (err == nil) != tc.ok {
				t.Errorf("Check = %v, want ok %v", err, tc.ok)
			}
		})
	}
}

// An endpoint in a network namespace answers echo requests until the namespace is
// told to ignore them.
func TestCheckPing(t *testing.T) {
	testenv.RequireRoot(t)
	ns := testenv.NewNetNS(t, "plprobe")
	var b [2]byte
	_, _ = rand.Read(b[:])
	host, peer := fmt.Sprintf("plp%x", b), fmt.Sprintf("plq%x", b)
	net4 := fmt.Sprintf("10.213.%d", b[0])
	testenv.Run(t, "ip", "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns.Name)
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", host).Run() })
	testenv.Run(t, "ip", "addr", "add", net4+".1/30", "dev", host)
	testenv.Run(t, "ip", "link", "set", host, "up")
	ns.Run(t, "ip", "addr", "add", net4+".2/30", "dev", peer)
	ns.Run(t, "ip", "link", "set", peer, "up")
	target := netip.AddrPortFrom(netip.MustParseAddr(net4+".2"), 0)
	spec := Spec{Type: Ping, Timeout: time.Second}

	for _, local := range []string{"127.0.0.1", "::1"} {
		if err := check(spec, netip.AddrPortFrom(netip.MustParseAddr(local), 0)); err != nil {
			t.Errorf("ping %s: %v", local, err)
		}
	}
	if err := check(spec, target); err != nil {
		t.Errorf("ping %s answering: %v", target.Addr(), err)
	}
	ns.Run(t, "sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1")
	if err := check(spec, target); err == nil {
		t.Errorf("ping %s ignoring echo requests passed", target.Addr())
	}
	ns.Run(t, "sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=0")
	if err := check(spec, target); err != nil {
		t.Errorf("ping %s answering again: %v", target.Addr(), err)
	}
}
