package main

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/shardlb/shardlb/bgp"
	"github.com/shardlb/shardlb/datapath"
	"github.com/shardlb/shardlb/kube"
	"github.com/shardlb/shardlb/shard"
)

func noEnv(string) string { return "" }

func TestTheGuidesFlagsParse(t *testing.T) {
	cfg, err := parseConfig([]string{
		"--cidrPools=defaultPool=192.168.80.250/24", "--setRoles=0.0.0.0", "--setUniqueIP",
		"--numZoneInstances=3", "--setBGP=64512", "--extBGPPeers=10.0.0.1:64512,[2001:db8::1]:65001",
		"--nodeName=master1", "--nodeIP=10.0.0.11",
	}, noEnv, os.Stdout)
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Kube.UniqueIP || !cfg.Kube.Roles || cfg.Kube.Instances.Count() != 3 || !cfg.BGPEnabled {
		t.Fatalf("config %+v", cfg)
	}
	if cfg.Kube.Pools[0].First != netip.MustParseAddr("192.168.80.250") {
		t.Errorf("pool starts at %v, want 192.168.80.250", cfg.Kube.Pools[0].First)
	}
	if cfg.BGP.LocalASN != 64512 || len(cfg.BGP.Peers) != 2 || cfg.BGP.RouterID != netip.MustParseAddr("10.0.0.11") {
		t.Errorf("bgp config %+v", cfg.BGP)
	}
	if cfg.Kube.LoadBalancerClass != "loxilb.io/loxilb" || cfg.Kube.DefaultMode != shard.ModeDefault {
		t.Errorf("defaults: class %q mode %v", cfg.Kube.LoadBalancerClass, cfg.Kube.DefaultMode)
	}
}

func TestSetLBModeTakesEveryMode(t *testing.T) {
	for arg, want := range map[string]shard.Mode{"default": shard.ModeDefault, "1": shard.ModeOneArm, "fullnat": shard.ModeFullNAT, "dsr": shard.ModeDSR, "3": shard.ModeDSR} {
		cfg, err := parseConfig([]string{"--setLBMode=" + arg}, noEnv, os.Stdout)
		if err != nil || cfg.Kube.DefaultMode != want {
			t.Errorf("--setLBMode=%s: mode %v, err %v; want %v", arg, cfg.Kube.DefaultMode, err, want)
		}
	}
}

func TestSetRolesWithoutValueTurnsRolesOn(t *testing.T) {
	cfg, err := parseConfig([]string{"--setRoles"}, noEnv, os.Stdout)
	if err != nil || !cfg.Kube.Roles {
		t.Fatalf("roles %v, err %v", cfg.Kube.Roles, err)
	}
	cfg, _ = parseConfig(nil, noEnv, os.Stdout)
	if cfg.Kube.Roles {
		t.Fatal("roles on without --setRoles")
	}
}

func TestDownwardAPIEnvironmentGivesDefaults(t *testing.T) {
	env := map[string]string{"NODE_NAME": "worker1", "NODE_IP": "10.0.0.5", "POD_NAMESPACE": "lb"}
	cfg, err := parseConfig(nil, func(k string) string { return env[k] }, os.Stdout)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Kube.NodeName != "worker1" || cfg.Datapath.NodeIPv4 != netip.MustParseAddr("10.0.0.5") || cfg.Kube.Namespace != "lb" {
		t.Fatalf("config %+v", cfg)
	}
}

func TestBadFlagsNameTheFlag(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct{ arg, flag string }{
		{"--cidrPools=defaultPool", "cidrPools"},
		{"--cidrPools=a=10.0.0.0/24,a=10.0.1.0/24", "cidrPools"},
		{"--cidrPools=a=2001:db8::/64", "cidrPools"},
		{"--cidr6Pools=a=10.0.0.0/24", "cidr6Pools"},
		{"--numZoneInstances=0", "numZoneInstances"},
		{"--zone=LLB", "zone"},
		{"--setRoles=yes", "setRoles"},
		{"--setLBMode=7", "setLBMode"},
		{"--setLBMode=direct", "setLBMode"},
		{"--setBGP=0.0.0", "setBGP"},
		{"--setBGP=4294967296", "setBGP"},
		{"--extBGPPeers=10.0.0.1", "extBGPPeers"},
		{"--extBGPPeers=10.0.0.1:0", "extBGPPeers"},
		{"--listenBGPPort=70000", "listenBGPPort"},
		{"--bgpHoldTime=1s", "bgpHoldTime"},
		{"--bgpBFD=fast", "bgpBFD"},
		{"--bgpPeerWait=-1s", "bgpPeerWait"},
		{"--bgpLocalPrefSuccessor=100", "bgpLocalPrefSuccessor"},
		{"--bgpLocalPrefSuccessor=5000", "bgpLocalPrefSuccessor"},
		{"--bgpMEDSuccessor=25", "bgpMEDSuccessor"},
		{"--bgpSuccessorPrepend=4", "bgpSuccessorPrepend"},
		{"--pinPath=sys/fs/bpf", "pinPath"},
		{"--attachMode=xdp", "attachMode"},
		{"--snatPorts=5000-4000", "snatPorts"},
		{"--snatPorts=0-100", "snatPorts"},
		{"--snatPorts=1024-65536", "snatPorts"},
		{"--snatPorts=low-high", "snatPorts"},
		{"--snatPorts=", "snatPorts"},
		{"--leaseProtocol=fast", "leaseProtocol"},
		{"--logFormat=xml", "logFormat"},
		{"--maxBackups=-1", "maxBackups"},
		{"--peerProbeFailures=0", "peerProbeFailures"},
		{"--peerProbeInterval=1ms", "peerProbeInterval"},
		{"--handoverAckTimeout=0s", "handoverAckTimeout"},
		{"--bgpPasswordFile=" + filepath.Join(dir, "missing"), "bgpPasswordFile"},
		{"--nodeIP=node1", "nodeIP"},
		{"--interfaces=eth0,a/b", "interfaces"},
		{"--interfaces=eth[", "interfaces"},
		{"--interfaces=none,eth0", "interfaces"},
		{"--interfaces=averyveryverylongname0", "interfaces"},
		{"--logLevel=loud", "logLevel"},
		{"--leaseDuration=1s", "leaseDuration"},
		{"--maxServices=0", "maxServices"},
		{"--maxEndpoints=-1", "maxEndpoints"},
		{"--apiListen=localhost", "apiListen"},
		{"--bgpGracefulRestart=1500ms", "bgpGracefulRestart"},
		{"--bgpGracefulRestart=4096s", "bgpGracefulRestart"},
		{"--bgpGracefulRestart=-1s", "bgpGracefulRestart"},
		{"--stopMode=later", "stopMode"},
		{"--stopMode=restart", "stopMode"}, // no --pinPath: nothing outlives the process
	} {
		t.Run(tc.arg, func(t *testing.T) {
			args := []string{tc.arg}
			if tc.flag == "extBGPPeers" {
				args = append(args, "--setBGP=65000")
			}
			_, err := parseConfig(args, noEnv, os.Stdout)
			var fe *flagError
			if !errors.As(err, &fe) || fe.flag != tc.flag {
				t.Fatalf("error %v, want a flagError for --%s", err, tc.flag)
			}
			if msg := err.Error(); !strings.Contains(msg, "--"+tc.flag) || strings.Contains(msg, "\n") {
				t.Fatalf("message %q must be one line naming --%s", msg, tc.flag)
			}
		})
	}
}

func TestBadFlagExitsTwoWithOneLine(t *testing.T) {
	var out, errOut strings.Builder
	code := run([]string{"--numZoneInstances=-3"}, noEnv, &out, &errOut)
	if code != 2 || strings.Count(errOut.String(), "\n") != 1 || !strings.Contains(errOut.String(), "--numZoneInstances") {
		t.Fatalf("exit %d, stderr %q", code, errOut.String())
	}
	errOut.Reset()
	if code := run([]string{"--setLBMode=4"}, noEnv, &out, &errOut); code != 2 || strings.Count(errOut.String(), "\n") != 1 ||
		!strings.Contains(errOut.String(), "--setLBMode") || !strings.Contains(errOut.String(), "dsr or 0..3") {
		t.Fatalf("--setLBMode=4: exit %d, stderr %q", code, errOut.String())
	}
	errOut.Reset()
	if code := run([]string{"--noSuchFlag"}, noEnv, &out, &errOut); code != 2 {
		t.Fatalf("unknown flag: exit %d", code)
	}
	if code := run([]string{"frobnicate"}, noEnv, &out, &errOut); code != 2 {
		t.Fatalf("unknown command: exit %d", code)
	}
}

func TestHelpGroupsFlagsAndVersionPrints(t *testing.T) {
	var out, errOut strings.Builder
	if code := run([]string{"--help"}, noEnv, &out, &errOut); code != 0 {
		t.Fatalf("--help exit %d: %s", code, errOut.String())
	}
	for _, g := range []string{"Services and IPAM:", "Sharding and roles:", "BGP:", "Datapath:", "--numZoneInstances", "--extBGPPeers"} {
		if !strings.Contains(out.String(), g) {
			t.Errorf("help lacks %q", g)
		}
	}
	out.Reset()
	if code := run([]string{"version"}, noEnv, &out, &errOut); code != 0 || !strings.HasPrefix(out.String(), "shardlb ") {
		t.Fatalf("version: exit %d, %q", code, out.String())
	}
}

// FuzzFlags feeds arbitrary values to every value-taking flag: parsing either
// succeeds or returns an error; it never panics.
func FuzzFlags(f *testing.F) {
	for _, s := range []string{"defaultPool=192.168.80.250/24", "10.0.0.1:65000", "300ms,3", "llb", "3", "1.10", "[::1]:1", "a=1.2.3.4-1.2.3.1"} {
		f.Add(s)
	}
	flags := []string{"cidrPools", "cidr6Pools", "numZoneInstances", "zone", "setRoles", "excludeRoleList", "setBGP",
		"extBGPPeers", "listenBGPPort", "bgpBFD", "bgpCommunities", "setLBMode", "interfaces", "nodeIP", "bgpHoldTime",
		"maxServices", "maxEndpoints"}
	f.Fuzz(func(t *testing.T, v string) {
		for _, fl := range flags {
			_, _ = parseConfig([]string{"--setBGP=65000", "--" + fl + "=" + v}, noEnv, nopWriter{})
		}
	})
}

type nopWriter struct{}

func (nopWriter) Write(p []byte) (int, error) { return len(p), nil }

func TestNodeIPTakesOneAddressPerFamily(t *testing.T) {
	v4, v6 := netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("fd00::11")
	for _, c := range []struct {
		value  string
		v4, v6 netip.Addr
	}{
		{"10.0.0.11", v4, netip.Addr{}},
		{"fd00::11", netip.Addr{}, v6},
		{"10.0.0.11,fd00::11", v4, v6},
		{" fd00::11 , 10.0.0.11 ", v4, v6},
		{"::ffff:10.0.0.11", v4, netip.Addr{}},
	} {
		cfg, err := parseConfig([]string{"--nodeIP=" + c.value, "--setBGP=64512", "--extBGPPeers=10.0.0.1:64512"}, noEnv, os.Stdout)
		if err != nil {
			t.Errorf("--nodeIP=%s: %v", c.value, err)
			continue
		}
		if cfg.Datapath.NodeIPv4 != c.v4 || cfg.Datapath.NodeIPv6 != c.v6 {
			t.Errorf("--nodeIP=%s: IPv4 %v IPv6 %v, want %v %v", c.value, cfg.Datapath.NodeIPv4, cfg.Datapath.NodeIPv6, c.v4, c.v6)
		}
		var want []netip.Addr
		for _, a := range []netip.Addr{c.v4, c.v6} {
			if a.IsValid() {
				want = append(want, a)
			}
		}
		if !slices.Equal(cfg.Kube.NodeAddresses, want) {
			t.Errorf("--nodeIP=%s: published node addresses %v, want %v", c.value, cfg.Kube.NodeAddresses, want)
		}
		// The IPv4 address is the router ID; the IPv6 one the next hop of IPv6 VIPs.
		if cfg.BGP.RouterID != c.v4 || cfg.BGP.NextHop6 != c.v6 {
			t.Errorf("--nodeIP=%s: router ID %v, IPv6 next hop %v", c.value, cfg.BGP.RouterID, cfg.BGP.NextHop6)
		}
	}
	for _, bad := range []string{"10.0.0.11,10.0.0.12", "fd00::1,fd00::2", "10.0.0.11,", "fe80::1%eth0", "10.0.0.11,fd00::1,10.0.0.12"} {
		_, err := parseConfig([]string{"--nodeIP=" + bad}, noEnv, os.Stdout)
		var fe *flagError
		if !errors.As(err, &fe) || fe.flag != "nodeIP" {
			t.Errorf("--nodeIP=%s: error %v, want a nodeIP flag error", bad, err)
		}
	}
}

// TestFlagDefaultsAreThePackagesDefaults parses no flags and compares every field of
// each package's resulting Config with the package's DefaultConfig: a flag whose
// default is written anywhere but the package fails here. The few values the daemon
// chooses itself are listed, with why.
func TestFlagDefaultsAreThePackagesDefaults(t *testing.T) {
	cfg, err := parseConfig(nil, noEnv, os.Stdout)
	if err != nil {
		t.Fatal(err)
	}

	wantKube := kube.DefaultConfig()
	// DefaultConfig leaves the namespace and the shards to the caller.
	wantKube.Namespace = "kube-system"
	wantKube.Instances, _ = shard.NewInstances("llb", 1)
	sameFields(t, "kube.Config", cfg.Kube, wantKube)

	wantBGP := bgp.DefaultConfig()
	// A pod accepts its routers' sessions and detects their loss with BFD; the
	// package leaves both off.
	wantBGP.ListenPort = 179
	wantBGP.BFD.Enabled = true
	sameFields(t, "bgp.Config", cfg.BGP, wantBGP)

	// Every capacity flag (--conntrackSize, --maxServices, --maxEndpoints) and
	// --attachMode show the package's default; RingSlots stays zero, derived by New.
	sameFields(t, "datapath.Config", cfg.Datapath, datapath.DefaultConfig())
	if cfg.Datapath.RingSlots != 0 {
		t.Errorf("with no flags RingSlots is %d, want 0 (derived from --maxServices and --maxEndpoints)", cfg.Datapath.RingSlots)
	}
}

func TestSNATPortsFlag(t *testing.T) {
	for _, tc := range []struct {
		arg    string
		lo, hi uint16
	}{
		{"", 1024, 32767},
		{"--snatPorts=61000-65535", 61000, 65535},
		{"--snatPorts= 2000 - 2999", 2000, 2999},
		{"--snatPorts=40000", 40000, 40000},
	} {
		var args []string
		if tc.arg != "" {
			args = append(args, tc.arg)
		}
		cfg, err := parseConfig(args, noEnv, os.Stdout)
		if err != nil {
			t.Fatalf("%q: %v", tc.arg, err)
		}
		if d := cfg.Datapath; d.SNATPortMin != tc.lo || d.SNATPortMax != tc.hi {
			t.Errorf("%q: SNAT ports %d-%d, want %d-%d", tc.arg, d.SNATPortMin, d.SNATPortMax, tc.lo, tc.hi)
		}
	}
}

func TestCapacityFlagsSetTheDatapathsSizes(t *testing.T) {
	cfg, err := parseConfig([]string{"--maxServices=100", "--maxEndpoints=2000", "--conntrackSize=4096"}, noEnv, os.Stdout)
	if err != nil {
		t.Fatal(err)
	}
	if d := cfg.Datapath; d.MaxServices != 100 || d.MaxEndpoints != 2000 || d.ConntrackSize != 4096 || d.RingSlots != 0 {
		t.Fatalf("datapath sizes %d frontends, %d endpoints, %d conntrack entries, %d ring slots; want 100, 2000, 4096, 0 (derived)",
			d.MaxServices, d.MaxEndpoints, d.ConntrackSize, d.RingSlots)
	}
	for _, tc := range []struct{ arg, flag, want string }{
		{"--maxServices=0", "maxServices", "a number from 1 to 4194304"},
		{"--maxServices=-5", "maxServices", "a number from 1 to 4194304"},
		{"--maxServices=4194305", "maxServices", "a number from 1 to 4194304"},
		{"--maxEndpoints=0", "maxEndpoints", "a number from 1 to 16777216"},
		{"--maxEndpoints=16777217", "maxEndpoints", "a number from 1 to 16777216"},
		{"--maxEndpoints=many", "maxEndpoints", "invalid argument"},
	} {
		t.Run(tc.arg+" is refused naming the flag", func(t *testing.T) {
			_, err := parseConfig([]string{tc.arg}, noEnv, os.Stdout)
			if err == nil || !strings.Contains(err.Error(), "--"+tc.flag) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one naming --%s and saying %q", err, tc.flag, tc.want)
			}
		})
	}
	for _, ok := range []string{"--maxServices=1", "--maxServices=4194304", "--maxEndpoints=1", "--maxEndpoints=16777216"} {
		if _, err := parseConfig([]string{ok}, noEnv, os.Stdout); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}

// sameFields reports each exported field of got that differs from want.
func sameFields(t *testing.T, name string, got, want any) {
	t.Helper()
	g, w := reflect.ValueOf(got), reflect.ValueOf(want)
	for i := range g.NumField() {
		f := g.Type().Field(i)
		if !f.IsExported() {
			continue
		}
		if !reflect.DeepEqual(g.Field(i).Interface(), w.Field(i).Interface()) {
			t.Errorf("with no flags %s.%s is %+v, want %+v from the package's defaults", name, f.Name, g.Field(i).Interface(), w.Field(i).Interface())
		}
	}
}

// fakeAPI serves one load-balancer rule as a pod's local API does.
func fakeAPI(t *testing.T) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/lb" {
			http.NotFound(w, r)
			return
		}
		_ = json.NewEncoder(w).Encode([]kube.LBRow{{ExtIP: "192.168.80.250", Port: 80, Protocol: "tcp", Name: "default_web",
			Select: "hash", Mode: "default", Endpoints: []string{"10.0.0.1:8080"}}})
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

func TestGetTakesEveryOutputFormKubectlTakes(t *testing.T) {
	api := fakeAPI(t)
	for _, tc := range []struct {
		args []string
		want string // a part of stdout only that format writes
	}{
		{[]string{"lb"}, "| EXT IP "},
		{[]string{"lb", "-o", "json"}, `"extIP": "192.168.80.250"`},
		{[]string{"lb", "-ojson"}, `"extIP": "192.168.80.250"`},
		{[]string{"lb", "-o=json"}, `"extIP": "192.168.80.250"`},
		{[]string{"lb", "--output", "json"}, `"extIP": "192.168.80.250"`},
		{[]string{"lb", "--output=json"}, `"extIP": "192.168.80.250"`},
		{[]string{"-o", "json", "lb"}, `"extIP": "192.168.80.250"`},
		{[]string{"lb", "-o", "wide"}, "| ENDPOINTS "},
		{[]string{"lb", "-owide"}, "| ENDPOINTS "},
		{[]string{"lb", "-o=wide"}, "| ENDPOINTS "},
		{[]string{"lb", "--output", "wide"}, "| ENDPOINTS "},
		{[]string{"lb", "--output=wide"}, "| ENDPOINTS "},
		{[]string{"lb", "-o", "table"}, "| EXT IP "},
		{[]string{"lb", "-otable"}, "| EXT IP "},
		{[]string{"lb", "-o=table"}, "| EXT IP "},
		{[]string{"lb", "--output", "table"}, "| EXT IP "},
		{[]string{"lb", "--output=table"}, "| EXT IP "},
		{[]string{"lb", "-o", "yaml"}, "\n  extIP: 192.168.80.250\n"},
		{[]string{"lb", "--output=yaml"}, "\n  extIP: 192.168.80.250\n"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var out, errOut strings.Builder
			args := append([]string{"get"}, tc.args...)
			if code := run(append(args, "--api", api), noEnv, &out, &errOut); code != 0 {
				t.Fatalf("exit %d, stderr %q", code, errOut.String())
			}
			if !strings.Contains(out.String(), tc.want) {
				t.Errorf("stdout %q, want it to hold %q", out.String(), tc.want)
			}
			if tc.want == "| EXT IP " && strings.Contains(out.String(), "| ENDPOINTS ") {
				t.Errorf("table has the wide columns: %q", out.String())
			}
		})
	}
}

func TestGetUsageErrorsExitTwoWithOneLine(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"routes"}, `unknown subject "routes"`},
		{[]string{}, "no subject"},
		{[]string{"lb", "-o", "xml"}, `unknown output "xml"`},
		{[]string{"lb", "-oxml"}, `unknown output "xml"`},
		{[]string{"lb", "--output=xml"}, `unknown output "xml"`},
		{[]string{"lb", "-o"}, "flag needs an argument"},
		{[]string{"lb", "ha"}, `unexpected argument "ha"`},
		{[]string{"lb", "-o", "json", "extra"}, `unexpected argument "extra"`},
		{[]string{"lb", "--format=json"}, "unknown flag: --format"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var out, errOut strings.Builder
			// Nothing listens on port 1: a usage error must be found before any fetch.
			code := run(append([]string{"get", "--api=127.0.0.1:1"}, tc.args...), noEnv, &out, &errOut)
			msg := errOut.String()
			if code != 2 || strings.Count(msg, "\n") != 1 || !strings.Contains(msg, tc.want) || !strings.Contains(msg, "usage: shardlb get") {
				t.Fatalf("exit %d, stderr %q; want 2 and one line saying %q and the usage", code, msg, tc.want)
			}
			if out.Len() != 0 {
				t.Errorf("stdout %q, want nothing", out.String())
			}
		})
	}
}

func TestGetHelpAndUnreachableAPI(t *testing.T) {
	var out, errOut strings.Builder
	if code := run([]string{"get", "--help"}, noEnv, &out, &errOut); code != 0 || !strings.HasPrefix(out.String(), "usage: shardlb get") {
		t.Errorf("get --help: exit %d, stdout %q", code, out.String())
	}
	out.Reset()
	if code := run([]string{"get", "ha", "--api=127.0.0.1:1"}, noEnv, &out, &errOut); code != 1 {
		t.Errorf("get with no pod listening: exit %d, want 1 (not a usage error)", code)
	}
}
