package kube

import (
	"maps"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestDatapathCountersAreExportedAtScrapeTime(t *testing.T) {
	var drops uint64 = 3
	reg := prometheus.NewRegistry()
	reg.MustRegister(newDatapathCollector(func() DatapathCounters {
		return DatapathCounters{
			Drops:              map[string]uint64{"snat_ports_exhausted": drops, "truncated": 0},
			SNATTimeWaitReuses: 6,
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
		"shardlb_snat_time_wait_reuses_total":                                                                       6,
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

func TestConntrackFillIsExportedAsEntriesAndLimit(t *testing.T) {
	fill := []ConntrackFill{{Map: "ipv4_tcp", Entries: 1200, Capacity: 262144}, {Map: "ipv6", Entries: 0, Capacity: 262144}}
	reg := prometheus.NewRegistry()
	reg.MustRegister(newDatapathCollector(func() DatapathCounters { return DatapathCounters{Conntrack: fill} }))
	read := func() map[string]float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]float64{}
		for _, mf := range mfs {
			if mf.GetName() == "shardlb_snat_time_wait_reuses_total" {
				continue
			}
			for _, m := range mf.GetMetric() {
				if mf.GetType().String() != "GAUGE" {
					t.Errorf("%s is a %s, want a gauge", mf.GetName(), mf.GetType())
				}
				key := mf.GetName()
				for _, l := range m.GetLabel() {
					key += "," + l.GetName() + "=" + l.GetValue()
				}
				got[key] = m.GetGauge().GetValue()
			}
		}
		return got
	}
	want := map[string]float64{
		"shardlb_conntrack_entries,map=ipv4_tcp":       1200,
		"shardlb_conntrack_entries_limit,map=ipv4_tcp": 262144,
		"shardlb_conntrack_entries,map=ipv6":           0,
		"shardlb_conntrack_entries_limit,map=ipv6":     262144,
	}
	if got := read(); !maps.Equal(got, want) {
		t.Errorf("scraped %v, want %v", got, want)
	}
	fill[0].Entries = 900
	if got := read()["shardlb_conntrack_entries,map=ipv4_tcp"]; got != 900 {
		t.Errorf("after entries went, scrape shows %v, want 900", got)
	}
}
