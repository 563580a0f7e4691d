package main

import (
	"bytes"
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/shardlb/shardlb/datapath"
	"github.com/shardlb/shardlb/kube"
	"github.com/shardlb/shardlb/shard"
)

func TestCountersCarryEveryFrontendCounter(t *testing.T) {
	st := datapath.Stats{
		Drops: map[string]uint64{"truncated": 1},
		Services: []datapath.ServiceStats{{
			Service: "default/tcp-lb", VIP: netip.MustParseAddr("192.168.80.250"), Port: 57002, Protocol: shard.TCP,
			Packets: 2, Bytes: 3, ReplyPackets: 4, ReplyBytes: 5, NewFlows: 6, HandoffPackets: 7, ICMPErrors: 8,
		}},
	}
	got := counters(st)
	want := kube.FrontendCounters{
		Service: "default/tcp-lb", Frontend: "192.168.80.250:57002/TCP",
		Packets: 2, Bytes: 3, ReplyPackets: 4, Flows: 6, Handoffs: 7, ICMPErrors: 8,
	}
	if len(got.Frontends) != 1 || got.Frontends[0] != want {
		t.Errorf("frontend counters %+v, want %+v", got.Frontends, want)
	}
	if got.Drops["truncated"] != 1 {
		t.Errorf("drops %v, want truncated=1", got.Drops)
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
