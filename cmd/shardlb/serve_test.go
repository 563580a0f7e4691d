package main

import (
	"bytes"
	"io"
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"testing"

	"github.com/shardlb/shardlb/datapath"
	"github.com/shardlb/shardlb/kube"
	"github.com/shardlb/shardlb/shard"
)

// carried names, for each counter of a datapath frontend, the field of the metrics'
// counters that carries it.
var carried = map[string]string{
	"Packets": "Packets", "Bytes": "Bytes", "ReplyPackets": "ReplyPackets", "ReplyBytes": "ReplyBytes", "SourceRangeDrops": "SourceRangeDrops",
	"NewFlows": "Flows", "HandoffPackets": "Handoffs", "ICMPErrors": "ICMPErrors",
}

// TestCountersCarryEveryFrontendCounter fills every counter of a datapath frontend
// with its own value, by reflection, and checks that each reaches its field of the
// metrics' counters and that every field there is filled: a counter added on either
// side and not carried fails here.
func TestCountersCarryEveryFrontendCounter(t *testing.T) {
	in := datapath.ServiceStats{
		Service: "default/tcp-lb", VIP: netip.MustParseAddr("192.168.80.250"), Port: 57002, Protocol: shard.TCP,
	}
	identity := map[string]bool{"Service": true, "VIP": true, "Port": true, "Protocol": true}
	src := reflect.ValueOf(&in).Elem()
	sent := map[string]uint64{} // metrics' field -> value it must carry
	for i := range src.NumField() {
		f := src.Type().Field(i)
		if identity[f.Name] {
			continue
		}
		to, ok := carried[f.Name]
		if !ok || f.Type.Kind() != reflect.Uint64 {
			t.Errorf("datapath.ServiceStats.%s (%s) is not carried to kube.FrontendCounters", f.Name, f.Type)
			continue
		}
		v := uint64(100 + i)
		src.Field(i).SetUint(v)
		sent[to] = v
	}

	fill := []datapath.ConntrackFill{{Map: "ipv4_tcp", Entries: 7, Capacity: 1024}}
	got := counters(datapath.Stats{Drops: map[string]uint64{"truncated": 1}, SNATTimeWaitReuses: 9, Services: []datapath.ServiceStats{in}}, fill)
	if len(got.Frontends) != 1 {
		t.Fatalf("frontend counters %+v, want one", got.Frontends)
	}
	fc := got.Frontends[0]
	if fc.Service != "default/tcp-lb" || fc.Frontend != "192.168.80.250:57002/TCP" {
		t.Errorf("frontend %q %q, want default/tcp-lb 192.168.80.250:57002/TCP", fc.Service, fc.Frontend)
	}
	dst := reflect.ValueOf(fc)
	for i := range dst.NumField() {
		f := dst.Type().Field(i)
		if f.Name == "Service" || f.Name == "Frontend" {
			continue
		}
		want, ok := sent[f.Name]
		if !ok || f.Type.Kind() != reflect.Uint64 {
			t.Errorf("kube.FrontendCounters.%s (%s) carries no datapath counter", f.Name, f.Type)
			continue
		}
		if got := dst.Field(i).Uint(); got != want {
			t.Errorf("kube.FrontendCounters.%s = %d, want %d", f.Name, got, want)
		}
	}
	if got.Drops["truncated"] != 1 {
		t.Errorf("drops %v, want truncated=1", got.Drops)
	}
	if got.SNATTimeWaitReuses != 9 {
		t.Errorf("SNAT TIME_WAIT reuses %d, want 9", got.SNATTimeWaitReuses)
	}
	if want := []kube.ConntrackFill{{Map: "ipv4_tcp", Entries: 7, Capacity: 1024}}; !reflect.DeepEqual(got.Conntrack, want) {
		t.Errorf("conntrack %+v, want %+v", got.Conntrack, want)
	}
	// Beside the frontends' counters, the drops, the SNAT TIME_WAIT reuses and the
	// conntrack fill are all there is on either side.
	for _, v := range []any{datapath.Stats{}, kube.DatapathCounters{}} {
		typ := reflect.TypeOf(v)
		for i := range typ.NumField() {
			switch name := typ.Field(i).Name; name {
			case "Services", "Frontends", "Drops", "Conntrack", "SNATTimeWaitReuses":
			default:
				t.Errorf("%s.%s is not carried", typ, name)
			}
		}
	}
}

func TestCleanupCommand(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"cleanup", "--pinPath=relative/dir"}, noEnv, &out, &errOut); code != 2 {
		t.Errorf("cleanup of a relative path: exit %d, want 2 (%s)", code, errOut.String())
	}
	if code := run([]string{"cleanup", "extra"}, noEnv, &out, &errOut); code != 2 {
		t.Errorf("cleanup with an argument: exit %d, want 2", code)
	}
	// Nothing pinned there: nothing to do, and no error.
	missing := filepath.Join(t.TempDir(), "none")
	if code := run([]string{"cleanup", "--pinPath=" + missing}, noEnv, &out, &errOut); code != 0 {
		t.Errorf("cleanup of a path with nothing pinned: exit %d, want 0 (%s)", code, errOut.String())
	}
}

// TestPoolPrefixesAreThePools checks that the speaker is given exactly the pools'
// addresses: kube-loxilb's pool syntax starts a CIDR at the written address and
// leaves out network, broadcast and anycast addresses.
func TestPoolPrefixesAreThePools(t *testing.T) {
	cfg, err := parseConfig([]string{"--cidrPools=defaultPool=192.168.80.250/24,other=10.96.0.0-10.96.0.5", "--cidr6Pools=v6=fd00:96::/125"}, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, p := range poolPrefixes(cfg.Kube.Pools) {
		got = append(got, p.String())
	}
	want := []string{"192.168.80.250/31", "192.168.80.252/31", "192.168.80.254/32", "10.96.0.0/30", "10.96.0.4/31", "fd00:96::1/128", "fd00:96::2/127", "fd00:96::4/126"}
	if !slices.Equal(got, want) {
		t.Fatalf("poolPrefixes = %v, want %v", got, want)
	}
}
