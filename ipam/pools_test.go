package ipam

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestParsePools(t *testing.T) {
	type pool struct{ name, first, last string }
	tests := []struct {
		desc string
		spec string
		want []pool
	}{
		{"the guide's pool starts at the written host address and stops before broadcast",
			"defaultPool=192.168.80.250/24", []pool{{"defaultPool", "192.168.80.250", "192.168.80.254"}}},
		{"a network address excludes the network and the broadcast address",
			"p=10.0.0.0/24", []pool{{"p", "10.0.0.1", "10.0.0.254"}}},
		{"a /31 hands out both addresses", "p=10.0.0.4/31", []pool{{"p", "10.0.0.4", "10.0.0.5"}}},
		{"a /32 is one address", "p=10.0.0.7/32", []pool{{"p", "10.0.0.7", "10.0.0.7"}}},
		{"an IPv6 prefix skips the subnet-router anycast address",
			"p=fd00::/64", []pool{{"p", "fd00::1", "fd00::ffff:ffff:ffff:ffff"}}},
		{"an IPv6 prefix with host bits starts there", "defaultPool=3ffe::10/96", []pool{{"defaultPool", "3ffe::10", "3ffe::ffff:ffff"}}},
		{"a range is taken as written, network and broadcast included",
			"r=10.1.0.0-10.1.0.255", []pool{{"r", "10.1.0.0", "10.1.0.255"}}},
		{"several pools with spaces around entries",
			" a=10.0.0.0/30 , b=10.0.1.1-10.0.1.2 ", []pool{{"a", "10.0.0.1", "10.0.0.2"}, {"b", "10.0.1.1", "10.0.1.2"}}},
		{"pools of both families may share a name", "defaultPool=10.0.0.0/30,defaultPool=fd00::/126",
			[]pool{{"defaultPool", "10.0.0.1", "10.0.0.2"}, {"defaultPool", "fd00::1", "fd00::3"}}},
		{"an empty spec is no pools", "  ", nil},
	}
	for _, tc := range tests {
		t.Run(tc.desc, func(t *testing.T) {
			got, err := ParsePools(tc.spec)
			if err != nil {
				t.Fatalf("ParsePools(%q): %v", tc.spec, err)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("ParsePools(%q) = %v, want %d pools", tc.spec, got, len(tc.want))
			}
			for i, w := range tc.want {
				want := PoolSpec{w.name, netip.MustParseAddr(w.first), netip.MustParseAddr(w.last)}
				if got[i] != want {
					t.Errorf("pool %d = %v, want %v", i, got[i], want)
				}
			}
		})
	}
}

func TestParsePoolsRefuses(t *testing.T) {
	tests := []struct {
		desc string
		spec string
		say  []string // the message names the entry and what is expected
	}{
		{"an entry without a name", "=10.0.0.0/24", []string{`"=10.0.0.0/24"`, "empty pool name"}},
		{"an entry without '='", "10.0.0.0/24", []string{`"10.0.0.0/24"`, "expected name=CIDR or name=startIP-endIP"}},
		{"an empty entry between commas", "a=10.0.0.0/24,,b=10.0.1.0/24", []string{"entry 2", "empty entry"}},
		{"a bad CIDR", "a=10.0.0.0/33", []string{`"10.0.0.0/33" is not a CIDR`}},
		{"a single address", "a=10.0.0.1", []string{"neither a CIDR nor a range"}},
		{"a range ending before it starts", "a=10.0.0.9-10.0.0.1", []string{"ends before it starts"}},
		{"a range mixing families", "a=10.0.0.1-fd00::1", []string{"mixes IPv4 and IPv6"}},
		{"a CIDR written at its broadcast address", "a=10.0.0.255/24", []string{"no usable address"}},
		{"a zoned address", "a=fe80::1%eth0-fe80::9%eth0", []string{"has a zone"}},
		{"an IPv4-mapped address", "a=::ffff:10.0.0.1-::ffff:10.0.0.9", []string{"IPv4-mapped"}},
		{"a name with a space", "my pool=10.0.0.0/24", []string{"letters, digits"}},
		{"two pools of one family with one name", "a=10.0.0.0/24,a=10.0.1.0/24", []string{`two IPv4 pools are named "a"`}},
		{"overlapping pools", "a=10.0.0.0/24,b=10.0.0.200-10.0.1.5", []string{`"a"`, `"b"`, "overlap"}},
		{"a pool inside another", "a=fd00::/64,b=fd00::5-fd00::6", []string{`"a"`, `"b"`, "overlap"}},
	}
	for _, tc := range tests {
		t.Run(tc.desc+" is refused", func(t *testing.T) {
			got, err := ParsePools(tc.spec)
			if err == nil {
				t.Fatalf("ParsePools(%q) = %v, want an error", tc.spec, got)
			}
			if !errors.Is(err, ErrInvalidPool) {
				t.Errorf("error %v does not wrap ErrInvalidPool", err)
			}
			for _, s := range tc.say {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not say %q", err, s)
				}
			}
		})
	}
}

func TestNewChecksPoolsNotFromTheParser(t *testing.T) {
	a4 := netip.MustParseAddr("10.0.0.1")
	b4 := netip.MustParseAddr("10.0.0.9")
	tests := []struct {
		desc  string
		pools []PoolSpec
	}{
		{"an empty pool", []PoolSpec{{"a", b4, a4}}},
		{"a pool with no addresses", []PoolSpec{{"a", netip.Addr{}, netip.Addr{}}}},
		{"overlapping pools", []PoolSpec{{"a", a4, b4}, {"b", b4, b4}}},
		{"a nameless pool", []PoolSpec{{"", a4, b4}}},
	}
	for _, tc := range tests {
		t.Run(tc.desc+" is refused", func(t *testing.T) {
			if _, err := New(tc.pools, false); !errors.Is(err, ErrInvalidPool) {
				t.Errorf("New(%v) error = %v, want ErrInvalidPool", tc.pools, err)
			}
		})
	}
}

func TestParseStaticIP(t *testing.T) {
	for _, s := range []string{"10.0.0.1", " fd00::1 "} {
		t.Run(s+" is one address", func(t *testing.T) {
			got, err := ParseStaticIP(s)
			if err != nil || got != netip.MustParseAddr(strings.TrimSpace(s)) {
				t.Errorf("ParseStaticIP(%q) = %v, %v", s, got, err)
			}
		})
	}
	t.Run("an empty annotation is no static IP", func(t *testing.T) {
		if got, err := ParseStaticIP(""); err != nil || got.IsValid() {
			t.Errorf("ParseStaticIP(\"\") = %v, %v", got, err)
		}
	})
	for _, s := range []string{"10.0.0.1/32", "10.0.0.1,10.0.0.2", "fe80::1%eth0", "::ffff:10.0.0.1", "host.example"} {
		t.Run(s+" is refused", func(t *testing.T) {
			if got, err := ParseStaticIP(s); !errors.Is(err, ErrInvalidRequest) {
				t.Errorf("ParseStaticIP(%q) = %v, %v; want ErrInvalidRequest", s, got, err)
			}
		})
	}
}
