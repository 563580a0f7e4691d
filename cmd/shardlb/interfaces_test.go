package main

import (
	"net/netip"
	"os"
	"reflect"
	"strings"
	"testing"
)

// aNode is a node as Kubernetes nodes look: a loopback, a bond of two NICs carrying
// the node's addresses and the default routes, a second NIC pair, and pod veths.
var aNode = []hostInterface{
	{Name: "lo", Up: true, Loopback: true, Addrs: addrs("127.0.0.1", "::1")},
	{Name: "eth0", Up: true},
	{Name: "eth1", Up: true},
	{Name: "bond0", Up: true, Addrs: addrs("10.0.0.11", "fd00::11", "fe80::1")},
	{Name: "ens3", Up: true, Addrs: addrs("192.168.1.5")},
	{Name: "ens4", Up: false},
	{Name: "veth1a2b3c", Up: true, Addrs: addrs("fe80::2")},
	{Name: "lxc_health", Up: true},
	{Name: "cali12345", Up: true},
}

var aNodesRoutes = []hostRoute{
	{Dst: netip.MustParsePrefix("0.0.0.0/0"), Interface: "bond0"},
	{Dst: netip.MustParsePrefix("::/0"), Interface: "ens3"},
	{Dst: netip.MustParsePrefix("10.244.1.0/24"), Interface: "cali12345"},
}

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func TestInterfacesAreFoundFromPatternsNodeIPsOrDefaultRoutes(t *testing.T) {
	for _, tc := range []struct {
		name     string
		patterns []string
		nodeIPs  []netip.Addr
		links    []hostInterface
		routes   []hostRoute
		want     []string
		why      string // a part of the reason
	}{
		{name: "a plain name matches itself", patterns: []string{"bond0"}, want: []string{"bond0"}, why: "--interfaces=bond0"},
		{name: "eth* matches both NICs but no veth", patterns: []string{"eth*"}, want: []string{"eth0", "eth1"}},
		{name: "ens* matches NICs up or down", patterns: []string{"ens*"}, want: []string{"ens3", "ens4"}},
		{name: "several patterns give their union once", patterns: []string{"eth?", "eth0", "bond*"}, want: []string{"bond0", "eth0", "eth1"}},
		{name: "a character class picks one NIC", patterns: []string{"ens[3]"}, want: []string{"ens3"}},
		{name: "a pattern matching nothing is dropped when another matches", patterns: []string{"enp*", "bond0"}, want: []string{"bond0"}},
		{name: "a wildcard never matches the loopback", patterns: []string{"*"},
			want: []string{"bond0", "cali12345", "ens3", "ens4", "eth0", "eth1", "lxc_health", "veth1a2b3c"}},
		{name: "the loopback can be named", patterns: []string{"lo"}, want: []string{"lo"}},
		{name: "empty: the interface carrying the IPv4 node IP", nodeIPs: addrs("10.0.0.11"), want: []string{"bond0"}, why: "--nodeIP 10.0.0.11"},
		{name: "empty: the interfaces carrying either node IP", nodeIPs: addrs("192.168.1.5", "fd00::11"), want: []string{"bond0", "ens3"}},
		{name: "empty without node IPs: the default routes of both families", want: []string{"bond0", "ens3"}, why: "default routes"},
		{name: "empty, node IP on no interface: the default routes", nodeIPs: addrs("10.9.9.9"), want: []string{"bond0", "ens3"},
			why: "no interface carries --nodeIP 10.9.9.9"},
		{name: "empty, node IP on the loopback only: the default routes", nodeIPs: addrs("127.0.0.1"), want: []string{"bond0", "ens3"}},
		{name: "empty, node IP on a down interface: the default routes", nodeIPs: addrs("10.0.0.11"),
			links:  []hostInterface{{Name: "bond0", Addrs: addrs("10.0.0.11")}, {Name: "eth0", Up: true}},
			routes: []hostRoute{{Dst: netip.MustParsePrefix("0.0.0.0/0"), Interface: "eth0"}}, want: []string{"eth0"}},
		{name: "empty: an ECMP default route gives each of its interfaces", links: aNode,
			routes: []hostRoute{{Dst: netip.MustParsePrefix("0.0.0.0/0"), Interface: "eth0"}, {Dst: netip.MustParsePrefix("0.0.0.0/0"), Interface: "eth1"}},
			want:   []string{"eth0", "eth1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			links, routes := aNode, aNodesRoutes
			if tc.links != nil {
				links = tc.links
			}
			if tc.routes != nil {
				routes = tc.routes
			}
			got, err := resolveInterfaces(tc.patterns, tc.nodeIPs, links, routes)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got.Names, tc.want) {
				t.Errorf("interfaces %v, want %v", got.Names, tc.want)
			}
			if !strings.Contains(got.Reason, tc.why) {
				t.Errorf("reason %q, want it to say %q", got.Reason, tc.why)
			}
		})
	}
}

func TestFindingNoInterfaceIsOneLineNamingPatternsAndInterfaces(t *testing.T) {
	veths := []hostInterface{
		{Name: "lo", Up: true, Loopback: true, Addrs: addrs("127.0.0.1")},
		{Name: "veth0", Up: true}, {Name: "eth9", Up: false},
	}
	for _, tc := range []struct {
		name     string
		patterns []string
		nodeIPs  []netip.Addr
		routes   []hostRoute
		want     []string
	}{
		{name: "patterns match nothing", patterns: []string{"eth0", "ens*"},
			want: []string{"--interfaces=eth0,ens*", "lo, veth0, eth9 (down)"}},
		{name: "a pattern matches whole names and a wildcard never the loopback", patterns: []string{"eth", "*eth", "l?"},
			want: []string{"--interfaces=eth,*eth,l?", "veth0"}},
		{name: "no node IP on an interface and no default route", nodeIPs: addrs("10.0.0.11"),
			routes: []hostRoute{{Dst: netip.MustParsePrefix("10.0.0.0/8"), Interface: "veth0"}},
			want:   []string{"--nodeIP 10.0.0.11", "--interfaces", "none", "veth0"}},
		{name: "a default route through a down interface only",
			routes: []hostRoute{{Dst: netip.MustParsePrefix("::/0"), Interface: "eth9"}},
			want:   []string{"no --nodeIP", "eth9 (down)"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := resolveInterfaces(tc.patterns, tc.nodeIPs, veths, tc.routes)
			if err == nil {
				t.Fatalf("found %v (%s), want an error", got.Names, got.Reason)
			}
			msg := err.Error()
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q does not say %q", msg, w)
				}
			}
			if strings.Contains(msg, "\n") {
				t.Errorf("error %q is more than one line", msg)
			}
		})
	}
}

func TestUnmatchedPatternsAreReported(t *testing.T) {
	got, err := resolveInterfaces([]string{"enp*", "eth*", "bond1"}, nil, aNode, aNodesRoutes)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"enp*", "bond1"}; !reflect.DeepEqual(got.Unmatched, want) {
		t.Errorf("unmatched %v, want %v", got.Unmatched, want)
	}
}

func TestInterfacesFlagTakesPatternsOrNone(t *testing.T) {
	for _, tc := range []struct {
		arg      string
		patterns []string
		none     bool
	}{
		{"", nil, false},
		{"--interfaces=", nil, false},
		{"--interfaces=eth0", []string{"eth0"}, false},
		{"--interfaces=eth*, ens*,bond0", []string{"eth*", "ens*", "bond0"}, false},
		{"--interfaces=enp[0-9]s0f*", []string{"enp[0-9]s0f*"}, false},
		{"--interfaces=none", nil, true},
	} {
		args := []string{}
		if tc.arg != "" {
			args = append(args, tc.arg)
		}
		cfg, err := parseConfig(args, noEnv, os.Stdout)
		if err != nil {
			t.Errorf("%q: %v", tc.arg, err)
			continue
		}
		if !reflect.DeepEqual(cfg.Interfaces, tc.patterns) || cfg.NoDatapath != tc.none || cfg.Datapath.Interfaces != nil {
			t.Errorf("%q: patterns %q none %v datapath %q, want %q %v and none resolved yet",
				tc.arg, cfg.Interfaces, cfg.NoDatapath, cfg.Datapath.Interfaces, tc.patterns, tc.none)
		}
	}
}
