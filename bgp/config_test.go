package bgp

import (
	"context"
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
