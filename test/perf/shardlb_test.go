package perf

import (
	"log/slog"
	"testing"

	"github.com/shardlb/shardlb/datapath"
	"github.com/shardlb/shardlb/shard"
)

var shardlb = variant{name: "shardlb", install: installShardlb, dst: vip}

// installShardlb loads the eBPF datapath at tcx ingress of both LB interfaces (client
// side for VIP traffic, backend side for replies) and programs the frontends.
func installShardlb(t testing.TB, tp *topology, fes []shard.Frontend) func() {
	t.Helper()
	dp, err := datapath.New(datapath.Config{
		Interfaces: []string{"l0", "l1"},
		NetNS:      "/var/run/netns/" + tp.lb.Name,
		NodeIPv4:   lbBack,
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("load the shardlb datapath: %v", err)
	}
	if err := dp.SetServices(fes); err != nil {
		_ = dp.Close()
		t.Fatalf("program the shardlb datapath: %v", err)
	}
	return func() {
		if err := dp.Close(); err != nil {
			t.Errorf("close the shardlb datapath: %v", err)
		}
	}
}
