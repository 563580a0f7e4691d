package probe

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// checkTCP connects, sends the request if any and, when a response is expected,
// reads until it has been seen.
func checkTCP(ctx context.Context, s Spec, target netip.AddrPort) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", target.String())
	if err != nil {
		return err
	}
	defer c.Close()
	return exchange(ctx, c, s)
}

// checkUDP sends the request (or an empty datagram) and waits for a reply. Without an
// expected response, silence until the deadline passes counts as healthy (UDP has no
// handshake: only an ICMP port unreachable, which the kernel reports as a refused
// read, says the port is closed); with one, a reply containing it is required.
func checkUDP(ctx context.Context, s Spec, target netip.AddrPort) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "udp", target.String())
	if err != nil {
		return err
	}
	defer c.Close()
	err = exchange(ctx, c, Spec{Request: s.Request, Response: s.Response, Type: UDP})
	if s.Response == "" && errors.Is(err, os.ErrDeadlineExceeded) {
		return nil
	}
	return err
}

// exchange writes s.Request on c and reads until s.Response is seen, within ctx.
func exchange(ctx context.Context, c net.Conn, s Spec) error {
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stop()
	if s.Request != "" || s.Type == UDP {
		if _, err := io.WriteString(c, s.Request); err != nil {
			return err
		}
	}
	if s.Response == "" && s.Type != UDP {
		return nil
	}
	want := []byte(s.Response)
	var got []byte
	buf := make([]byte, 2048)
	for len(got) < maxRead {
		n, err := c.Read(buf)
		got = append(got, buf[:n]...)
		if n > 0 && bytes.Contains(got, want) {
			return nil
		}
		if err != nil {
			if err == io.EOF {
				return fmt.Errorf("closed after %d bytes without %q", len(got), s.Response)
			}
			return err
		}
	}
	return fmt.Errorf("%d bytes without %q", len(got), s.Response)
}

// checkHTTP sends GET Request and wants a 2xx or 3xx status (redirects are not
// followed, as the kubelet's probes do not leave the endpoint) and, when Response is
// set, a body containing it. HTTPS does not verify the endpoint's certificate: an
// endpoint is addressed by its pod IP, which certificates do not name.
func checkHTTP(ctx context.Context, s Spec, target netip.AddrPort) error {
	path := s.Request
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	tr := &http.Transport{
		DisableKeepAlives: true,
		Proxy:             nil,
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{
		Transport:     tr,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, string(s.Type)+"://"+target.String()+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", "shardlb-probe")
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxRead))
	if resp.StatusCode < 200 || resp.StatusCode >= 400 {
		return fmt.Errorf("HTTP status %d", resp.StatusCode)
	}
	if s.Response == "" {
		return nil
	}
	if bytes.Contains(body, []byte(s.Response)) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading the body: %w", err)
	}
	return fmt.Errorf("body without %q", s.Response)
}

// checkPing sends one ICMP echo request and waits for its reply. It uses an
// unprivileged ICMP datagram socket where net.ipv4.ping_group_range allows the
// process's group, else a raw socket (CAP_NET_RAW).
func checkPing(ctx context.Context, target netip.AddrPort) error {
	addr := target.Addr().Unmap()
	v6 := addr.Is6()
	network, raw, wildcard, proto := "udp4", "ip4:icmp", "0.0.0.0", 1
	var reqType, replyType icmp.Type = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply
	if v6 {
		network, raw, wildcard, proto = "udp6", "ip6:ipv6-icmp", "::", 58
		reqType, replyType = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
	}
	c, err := icmp.ListenPacket(network, wildcard)
	datagram := err == nil
	if err != nil {
		if c, err = icmp.ListenPacket(raw, wildcard); err != nil {
			return fmt.Errorf("ping needs net.ipv4.ping_group_range to include this process's group, or CAP_NET_RAW: %w", err)
		}
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stop()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	id, seq := rand.IntN(0xffff), rand.IntN(0xffff)
	payload := []byte("shardlb-probe")
	msg, err := (&icmp.Message{Type: reqType, Body: &icmp.Echo{ID: id, Seq: seq, Data: payload}}).Marshal(nil)
	if err != nil {
		return err
	}
	var dst net.Addr = &net.IPAddr{IP: addr.AsSlice(), Zone: addr.Zone()}
	if datagram {
		dst = &net.UDPAddr{IP: addr.AsSlice(), Zone: addr.Zone()}
	}
	if _, err := c.WriteTo(msg, dst); err != nil {
		return err
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return errors.New("no echo reply")
			}
			return err
		}
		if fromAddr(from) != addr {
			continue
		}
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil || m.Type != replyType {
			continue
		}
		echo, ok := m.Body.(*icmp.Echo)
		// A datagram socket's kernel rewrites the ID to its own and only hands this
		// socket its replies; a raw socket sees every reply, so the ID must match.
		if !ok || echo.Seq != seq || (!datagram && echo.ID != id) || !bytes.Equal(echo.Data, payload) {
			continue
		}
		return nil
	}
}

func fromAddr(a net.Addr) netip.Addr {
	var ip net.IP
	switch a := a.(type) {
	case *net.UDPAddr:
		ip = a.IP
	case *net.IPAddr:
		ip = a.IP
	}
	out, _ := netip.AddrFromSlice(ip)
	return out.Unmap()
}
