package kube

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestDatapathCountersAreExportedAtScrapeTime(t *testing.T) {
	var drops uint64 = 3
	reg := prometheus.NewRegistry()
	reg.MustRegister(newDatapathCollector(func() DatapathCounters {
		return DatapathCounters{
			Drops: map[string]uint64{"snat_ports_exhausted": drops, "truncated": 0},
			Frontends: []FrontendCounters{{Service: "default/tcp-lb", Frontend: "192.168.80.250:57002/TCP",
				Packets: 10, Bytes: 1000, ReplyPackets: 9, Flows: 2, Handoffs: 4, ICMPErrors: 5}},
		}
	}))
	read := func() map[string]float64 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]float64{}
		for _, mf := range mfs {
			for _, m := range mf.GetMetric() {
				key := mf.GetName()
				for _, l := range m.GetLabel() {
					key += "," + l.GetName() + "=" + l.GetValue()
				}
				got[key] = m.GetCounter().GetValue()
			}
		}
		return got
	}
	got := read()
	for key, want := range map[string]float64{
		"shardlb_datapath_drops_total,reason=snat_ports_exhausted":                                                  3,
		"shardlb_frontend_packets_total,direction=reply,frontend=192.168.80.250:57002/TCP,service=default/tcp-lb":   9,
		"shardlb_frontend_packets_total,direction=forward,frontend=192.168.80.250:57002/TCP,service=default/tcp-lb": 10,
		"shardlb_frontend_flows_total,frontend=192.168.80.250:57002/TCP,service=default/tcp-lb":                     2,
		"shardlb_frontend_handoff_packets_total,frontend=192.168.80.250:57002/TCP,service=default/tcp-lb":           4,
		"shardlb_frontend_icmp_errors_total,frontend=192.168.80.250:57002/TCP,service=default/tcp-lb":               5,
	} {
		if got[key] != want {
			t.Errorf("%s = %v, want %v (all: %v)", key, got[key], want, got)
		}
	}
	drops = 7
	if v := read()["shardlb_datapath_drops_total,reason=snat_ports_exhausted"]; v != 7 {
		t.Errorf("after the counter moved, scrape shows %v, want 7", v)
	}
}
