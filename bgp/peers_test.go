package bgp

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/osrg/gobgp/v4/api"
	"github.com/osrg/gobgp/v4/pkg/apiutil"
	"github.com/osrg/gobgp/v4/pkg/packet/bgp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/shardlb/shardlb/shard"
)

// rib lists the prefixes in the speaker's own RIB, for tests.
func (s *Speaker) rib() []netip.Prefix {
	var out []netip.Prefix
	srv := s.r.(*gobgpRouter).srv
	for _, f := range []bgp.Family{bgp.RF_IPv4_UC, bgp.RF_IPv6_UC} {
		_ = srv.ListPath(apiutil.ListPathRequest{TableType: api.TableType_TABLE_TYPE_GLOBAL, Family: f}, func(n bgp.NLRI, _ []*apiutil.Path) {
			if p, err := netip.ParsePrefix(n.String()); err == nil {
				out = append(out, p)
			}
		})
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out
}

func writeFile(t testing.TB, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// occupiedPort returns a port on 127.0.0.1 that stays in use until the test ends.
func occupiedPort(t testing.TB) uint16 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return uint16(l.Addr().(*net.TCPAddr).Port)
}

// grpcGlobalRIB asks the speaker's gRPC API what the gobgp CLI's "global rib" shows.
func grpcGlobalRIB(t testing.TB, addr string) []string {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("dial gRPC %s: %v", addr, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	stream, err := api.NewGoBgpServiceClient(conn).ListPath(ctx, &api.ListPathRequest{
		TableType: api.TableType_TABLE_TYPE_GLOBAL,
		Family:    &api.Family{Afi: api.Family_AFI_IP, Safi: api.Family_SAFI_UNICAST},
	})
	if err != nil {
		t.Fatalf("gRPC ListPath: %v", err)
	}
	var out []string
	for {
		r, err := stream.Recv()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatalf("gRPC ListPath: %v", err)
		}
		out = append(out, r.Destination.Prefix)
	}
}

func TestBadPeersDoNotDisturbOthers(t *testing.T) {
	good := newTestRouter(t, "127.0.0.1", 65000, map[string]uint32{"127.0.0.2": 65000})
	late := netip.MustParseAddr("127.0.0.5")
	latePort := freePort(t, late)
	evil := newEvilPeer(t, "127.0.0.4")

	cfg := testConfig("127.0.0.2", 65000, good)
	cfg.Peers = append(cfg.Peers,
		Peer{Addr: late, ASN: 65000, Port: latePort},
		Peer{Addr: evil.addr, ASN: 65000, Port: evil.port})
	s := startSpeaker(t, cfg)
	waitEstablished(t, s, good.addr)
	set(t, s, adv("10.96.0.1/32", shard.RoleMaster))
	eventually(t, 5*time.Second, "VIP at the good router", func() bool { return len(good.rib("10.96.0.1/32")) == 1 })
	since := status(t, s, good.addr).Since

	t.Run("an unreachable peer is shown down while the others are up", func(t *testing.T) {
		if p := status(t, s, late); p.Established || p.State == "" {
			t.Fatalf("unreachable peer status = %+v, want a down state", p)
		}
	})
	t.Run("a malformed UPDATE resets only the sender's session", func(t *testing.T) {
		code := evil.sendMalformedUpdate(t)
		if code != bgp.BGP_ERROR_UPDATE_MESSAGE_ERROR {
			t.Fatalf("speaker answered the malformed UPDATE with NOTIFICATION code %d, want %d (UPDATE message error)", code, bgp.BGP_ERROR_UPDATE_MESSAGE_ERROR)
		}
		p := status(t, s, good.addr)
		if !p.Established || !p.Since.Equal(since) {
			t.Fatalf("good session status = %+v, want still established since %v", p, since)
		}
		if len(good.rib("10.96.0.1/32")) != 1 {
			t.Fatal("VIP gone from the good router")
		}
	})
	t.Run("the unreachable peer is retried and comes up once it listens", func(t *testing.T) {
		r := newTestRouterAt(t, late, latePort, 65000, map[string]uint32{"127.0.0.2": 65000})
		eventually(t, 20*time.Second, "late peer established", func() bool { return status(t, s, late).Established })
		eventually(t, 5*time.Second, "VIP at the late router", func() bool { return len(r.rib("10.96.0.1/32")) == 1 })
		if p := status(t, s, good.addr); !p.Since.Equal(since) {
			t.Fatalf("good session flapped: %+v", p)
		}
	})
}

func status(t testing.TB, s *Speaker, addr netip.Addr) PeerStatus {
	t.Helper()
	for _, p := range s.Peers() {
		if p.Addr == addr {
			return p
		}
	}
	t.Fatalf("peer %v not in Peers()", addr)
	return PeerStatus{}
}

// evilPeer is a hand-written BGP peer that can send what GoBGP never would.
type evilPeer struct {
	addr netip.Addr
	port uint16
	ln   net.Listener
}

func newEvilPeer(t testing.TB, addr string) *evilPeer {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(addr, "0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &evilPeer{addr: netip.MustParseAddr(addr), port: uint16(ln.Addr().(*net.TCPAddr).Port), ln: ln}
}

// sendMalformedUpdate accepts the speaker's connection, establishes the session,
// sends an UPDATE whose attribute length overruns the message, and returns the
// error code of the NOTIFICATION the speaker answers with.
func (e *evilPeer) sendMalformedUpdate(t testing.TB) uint8 {
	t.Helper()
	if tl, ok := e.ln.(*net.TCPListener); ok {
		_ = tl.SetDeadline(time.Now().Add(15 * time.Second))
	}
	c, err := e.ln.Accept()
	if err != nil {
		t.Fatalf("evil peer: accept: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(15 * time.Second))
	caps := []bgp.ParameterCapabilityInterface{bgp.NewCapMultiProtocol(bgp.RF_IPv4_UC), bgp.NewCapFourOctetASNumber(65000)}
	open, _ := bgp.NewBGPOpenMessage(65000, 90, e.addr, []bgp.OptionParameterInterface{bgp.NewOptionParameterCapability(caps)})
	for _, m := range []*bgp.BGPMessage{open, bgp.NewBGPKeepAliveMessage()} {
		b, _ := m.Serialize()
		if _, err := c.Write(b); err != nil {
			t.Fatalf("evil peer: write: %v", err)
		}
	}
	// Wait for the speaker's KEEPALIVE: the session is established.
	for {
		m := readMessage(t, c)
		if m.Header.Type == bgp.BGP_MSG_KEEPALIVE {
			break
		}
	}
	// UPDATE: no withdrawn routes, then a path attribute length of 200 bytes in a
	// message that carries 4.
	bad := make([]byte, 19+2+2+4)
	for i := range 16 {
		bad[i] = 0xff
	}
	binary.BigEndian.PutUint16(bad[16:], uint16(len(bad)))
	bad[18] = bgp.BGP_MSG_UPDATE
	binary.BigEndian.PutUint16(bad[21:], 200)
	copy(bad[23:], []byte{0x40, 0x01, 0x01, 0x00})
	if _, err := c.Write(bad); err != nil {
		t.Fatalf("evil peer: write UPDATE: %v", err)
	}
	for {
		m := readMessage(t, c)
		if n, ok := m.Body.(*bgp.BGPNotification); ok {
			return n.ErrorCode
		}
	}
}

func readMessage(t testing.TB, c net.Conn) *bgp.BGPMessage {
	t.Helper()
	hdr := make([]byte, 19)
	if _, err := io.ReadFull(c, hdr); err != nil {
		t.Fatalf("evil peer: read header: %v", err)
	}
	n := int(binary.BigEndian.Uint16(hdr[16:]))
	buf := make([]byte, n)
	copy(buf, hdr)
	if _, err := io.ReadFull(c, buf[19:]); err != nil {
		t.Fatalf("evil peer: read body: %v", err)
	}
	m, err := bgp.ParseBGPMessage(buf)
	if err != nil {
		t.Fatalf("evil peer: parse: %v", err)
	}
	return m
}
