package bgp

import (
	"context"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/shardlb/shardlb/shard"
)

func TestParsePeers(t *testing.T) {
	good := []struct {
		name, in string
		want     []Peer
	}{
		{"an empty flag means no peers", "", nil},
		{"one IPv4 peer", "192.0.2.1:65001", []Peer{{Addr: netip.MustParseAddr("192.0.2.1"), ASN: 65001}}},
		{"peers are comma separated, spaces allowed", "192.0.2.1:65001, 192.0.2.2:4200000000", []Peer{
			{Addr: netip.MustParseAddr("192.0.2.1"), ASN: 65001},
			{Addr: netip.MustParseAddr("192.0.2.2"), ASN: 4200000000},
		}},
		{"IPv6 peers are bracketed", "[2001:db8::1]:65001", []Peer{{Addr: netip.MustParseAddr("2001:db8::1"), ASN: 65001}}},
		{"asdot AS numbers are accepted", "192.0.2.1:1.10", []Peer{{Addr: netip.MustParseAddr("192.0.2.1"), ASN: 65546}}},
	}
	for _, tc := range good {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParsePeers(tc.in)
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("ParsePeers(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
			}
		})
	}
	bad := []struct {
		name, in, entry string
	}{
		{"an entry without an AS is refused", "192.0.2.1:65001,192.0.2.2", "192.0.2.2"},
		{"AS 0 is refused", "192.0.2.1:0", "192.0.2.1:0"},
		{"a host name is refused", "router.example:65001", "router.example:65001"},
		{"an AS beyond 32 bits is refused", "192.0.2.1:4294967296", "192.0.2.1:4294967296"},
		{"an unbracketed IPv6 peer is refused", "2001:db8::1:65001", "2001:db8::1:65001"},
		{"a duplicate peer is refused", "192.0.2.1:65001,192.0.2.1:65002", "192.0.2.1:65002"},
		{"an empty entry is refused", "192.0.2.1:65001,", `""`},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParsePeers(tc.in)
			if err == nil {
				t.Fatalf("ParsePeers(%q) = %v, want an error", tc.in, got)
			}
			if !strings.Contains(err.Error(), tc.entry) || strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q should be one line naming %s", err, tc.entry)
			}
		})
	}
}

func TestParseASN(t *testing.T) {
	for in, want := range map[string]uint32{"65000": 65000, "4200000000": 4200000000, "1.10": 65546, "0.1": 1, "65535.65534": 4294967294} {
		t.Run(in+" parses", func(t *testing.T) {
			if got, err := ParseASN(in); err != nil || got != want {
				t.Fatalf("ParseASN(%q) = %d, %v; want %d", in, got, err, want)
			}
		})
	}
	for _, in := range []string{"0", "0.0", "23456", "4294967295", "65535.65535", "-1", "1.65536", "x", "", "1.2.3"} {
		t.Run(in+" is refused", func(t *testing.T) {
			if got, err := ParseASN(in); err == nil {
				t.Fatalf("ParseASN(%q) = %d, want an error", in, got)
			}
		})
	}
}

func validConfig() Config {
	cfg := DefaultConfig()
	cfg.LocalASN = 65000
	cfg.RouterID = netip.MustParseAddr("192.0.2.10")
	cfg.GRPCListen = ""
	cfg.Peers = []Peer{{Addr: netip.MustParseAddr("192.0.2.1"), ASN: 65001}, {Addr: netip.MustParseAddr("192.0.2.2"), ASN: 65000}}
	return cfg
}

func TestNewRefusesBadConfig(t *testing.T) {
	cases := []struct {
		name, want string
		edit       func(*Config)
	}{
		{"a local AS of 0 is refused", "local AS", func(c *Config) { c.LocalASN = 0 }},
		{"a peer with AS 0 is refused", "192.0.2.1: AS 0", func(c *Config) { c.Peers[0].ASN = 0 }},
		{"a peer listed twice is refused", "listed twice", func(c *Config) { c.Peers[1].Addr = c.Peers[0].Addr }},
		{"an IPv6 router ID is refused", "router ID", func(c *Config) { c.RouterID = netip.MustParseAddr("2001:db8::1") }},
		{"a hold time under 3 s is refused", "hold time", func(c *Config) { c.HoldTime = time.Second }},
		{"a keepalive not below the hold time is refused", "keepalive", func(c *Config) { c.KeepaliveInterval = c.HoldTime }},
		{"a BFD multiplier of 0 is refused", "BFD multiplier", func(c *Config) { c.BFD.Enabled, c.BFD.Multiplier = true, 0 }},
		{"a BFD interval under 10 ms is refused", "BFD interval", func(c *Config) { c.BFD.Enabled, c.BFD.Interval = true, time.Millisecond }},
		{"equal master and backup LOCAL_PREF is refused", "LOCAL_PREF", func(c *Config) { c.LocalPrefBackup = c.LocalPrefMaster }},
		{"a malformed community is refused", `community "65000"`, func(c *Config) { c.Communities = []string{"65000"} }},
		{"a missing password file is refused", "password file", func(c *Config) { c.PasswordFile = "/nonexistent/bgp-passwords" }},
		{"a listen port out of range is refused", "listen port", func(c *Config) { c.ListenPort = 70000 }},
		{"an unset VIP pool is refused", "VIP pool", func(c *Config) { c.Pools = []netip.Prefix{{}} }},
		{"an IPv4-mapped VIP pool is refused", "VIP pool", func(c *Config) { c.Pools = []netip.Prefix{netip.MustParsePrefix("::ffff:10.96.0.0/112")} }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := validConfig()
			tc.edit(&cfg)
			s, err := New(context.Background(), cfg, testLogger(t))
			if err == nil {
				_ = s.Shutdown(context.Background())
				t.Fatal("New succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not mention %q", err, tc.want)
			}
		})
	}
}

func TestPasswordFile(t *testing.T) {
	cases := []struct {
		name, content string
		want          []string // per validConfig peer
		wantErr       string
	}{
		{"one line sets the password of every peer", "all-peers\n", []string{"all-peers", "all-peers"}, ""},
		{"a per-peer line overrides the shared one", "# comment\n\nshared\n192.0.2.2 special\n", []string{"shared", "special"}, ""},
		{"peers without a line get no password", "192.0.2.1 one\n", []string{"one", ""}, ""},
		{"a line for an unknown peer is refused", "192.0.2.9 x\n", nil, "192.0.2.9 is not a configured peer"},
		{"two shared passwords are refused", "a\nb\n", nil, "line 2"},
		{"a line with three fields is refused", "192.0.2.1 a b\n", nil, "line 1"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := validConfig()
			cfg.PasswordFile = writeFile(t, tc.content)
			err := cfg.applyPasswordFile()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one mentioning %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for i, p := range cfg.Peers {
				if p.Password != tc.want[i] {
					t.Errorf("peer %v password = %q, want %q", p.Addr, p.Password, tc.want[i])
				}
			}
		})
	}
}

func TestAttributesByRole(t *testing.T) {
	cfg := DefaultConfig()
	cfg.NextHop4 = netip.MustParseAddr("192.0.2.10")
	v4 := netip.MustParsePrefix("10.96.0.1/32")
	v6 := netip.MustParsePrefix("fd00::1/128")
	cases := []struct {
		name      string
		prefix    netip.Prefix
		role      shard.Role
		successor bool
		want      attrs
	}{
		{"a master announces LOCAL_PREF 5000 and MED 10", v4, shard.RoleMaster, false, attrs{LocalPref: 5000, MED: 10, NextHop: cfg.NextHop4}},
		{"a backup announces LOCAL_PREF 100 and MED 20", v4, shard.RoleBackup, false, attrs{LocalPref: 100, MED: 20, NextHop: cfg.NextHop4}},
		{"a successor announces LOCAL_PREF 200 and MED 15", v4, shard.RoleBackup, true, attrs{LocalPref: 200, MED: 15, NextHop: cfg.NextHop4}},
		{"a master is a master whatever the successor flag says", v4, shard.RoleMaster, true, attrs{LocalPref: 5000, MED: 10, NextHop: cfg.NextHop4}},
		{"equal roles announce the master's values", v4, shard.RoleEqual, false, attrs{LocalPref: 5000, MED: 10, NextHop: cfg.NextHop4}},
		{"an IPv6 VIP without NextHop6 uses next hop self", v6, shard.RoleMaster, false, attrs{LocalPref: 5000, MED: 10, NextHop: netip.IPv6Unspecified()}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := cfg.attrsFor(tc.prefix, tc.role, tc.successor, nil)
			if got.LocalPref != tc.want.LocalPref || got.MED != tc.want.MED || got.NextHop != tc.want.NextHop {
				t.Fatalf("attrsFor = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestRangePrefixes(t *testing.T) {
	cases := []struct {
		name, first, last string
		want              []string
	}{
		{"the guide's pool is two /31s and a /32", "192.168.80.250", "192.168.80.254", []string{"192.168.80.250/31", "192.168.80.252/31", "192.168.80.254/32"}},
		{"a /24 without network and broadcast", "10.96.0.1", "10.96.0.254", []string{
			"10.96.0.1/32", "10.96.0.2/31", "10.96.0.4/30", "10.96.0.8/29", "10.96.0.16/28", "10.96.0.32/27", "10.96.0.64/26",
			"10.96.0.128/26", "10.96.0.192/27", "10.96.0.224/28", "10.96.0.240/29", "10.96.0.248/30", "10.96.0.252/31", "10.96.0.254/32"}},
		{"one address is a host route", "10.96.0.7", "10.96.0.7", []string{"10.96.0.7/32"}},
		{"an aligned range is one prefix", "10.96.0.0", "10.96.255.255", []string{"10.96.0.0/16"}},
		{"every IPv4 address is /0", "0.0.0.0", "255.255.255.255", []string{"0.0.0.0/0"}},
		{"an IPv6 /120 without its anycast address", "fd00:96::1", "fd00:96::ff", []string{
			"fd00:96::1/128", "fd00:96::2/127", "fd00:96::4/126", "fd00:96::8/125", "fd00:96::10/124", "fd00:96::20/123", "fd00:96::40/122", "fd00:96::80/121"}},
		{"the end of the IPv6 space", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", []string{"ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe/127"}},
		{"a reversed range is nothing", "10.96.0.9", "10.96.0.1", nil},
		{"mixed families are nothing", "10.96.0.1", "fd00::1", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := RangePrefixes(netip.MustParseAddr(tc.first), netip.MustParseAddr(tc.last))
			var s []string
			for _, p := range got {
				s = append(s, p.String())
			}
			if !slices.Equal(s, tc.want) {
				t.Fatalf("RangePrefixes(%s, %s) = %v, want %v", tc.first, tc.last, s, tc.want)
			}
		})
	}
}

// TestRangePrefixesCoverExactlyTheRange checks random IPv4 ranges address by address
// against the naive answer: every address of the range in exactly one prefix, no
// address outside it in any, and no two neighbours that could be one prefix.
func TestRangePrefixesCoverExactlyTheRange(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range 500 {
		base := uint32(10<<24 | rng.IntN(1<<16)<<8)
		lo := base + uint32(rng.IntN(600))
		hi := lo + uint32(rng.IntN(600))
		first, last := addr4(lo), addr4(hi)
		got := RangePrefixes(first, last)
		for a := lo - 3; a <= hi+3; a++ {
			n := 0
			for _, p := range got {
				if p.Contains(addr4(a)) {
					n++
				}
			}
			if want := b2i(a >= lo && a <= hi); n != want {
				t.Fatalf("range %v-%v: %v is in %d of %v, want %d", first, last, addr4(a), n, got, want)
			}
		}
		for i := 1; i < len(got); i++ {
			a, b := got[i-1], got[i]
			if merged := netip.PrefixFrom(a.Addr(), a.Bits()-1).Masked(); a.Bits() == b.Bits() && merged.Addr() == a.Addr() {
				t.Fatalf("range %v-%v: %v and %v make %v", first, last, a, b, merged)
			}
		}
	}
}

func addr4(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}
