package kube

import (
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"

	"github.com/shardlb/shardlb/ipam"
)

func TestMetricsScrapeNamesAndLabels(t *testing.T) {
	m := newMetrics()
	m.registerBuildInfo("v1.2.3")
	m.reg.MustRegister(newStateCollector(
		func() []HARow {
			return []HARow{{Instance: "llb-inst1", State: "MASTER"}, {Instance: "llb-inst2", State: "BACKUP"}}
		},
		func() []BGPPeer {
			return []BGPPeer{
				{Peer: "10.0.0.1", State: "established", PrefixesSent: 2, BFD: "up"},
				{Peer: "10.0.0.2", State: "active", BFD: "down"},
				{Peer: "10.0.0.3", State: "established", PrefixesSent: 2},
			}
		},
		func() []ipam.PoolStats {
			return []ipam.PoolStats{{Name: "defaultPool", Size: 254, Used: 3}, {Name: "edge", Size: 16, Used: 16}}
		},
	))
	st := &status{}
	st.health = newHealth(nil, nil, st.ready.Load, nil)
	srv := httptest.NewServer(st.probeHandler(m))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	body := string(raw)

	for _, line := range []string{
		`shardlb_build_info{goversion="` + runtime.Version() + `",version="v1.2.3"} 1`,
		`shardlb_instance_role{role="MASTER",shard="llb-inst1"} 1`,
		`shardlb_instance_role{role="BACKUP",shard="llb-inst2"} 1`,
		`shardlb_bgp_session_state{peer="10.0.0.1",state="established"} 1`,
		`shardlb_bgp_prefixes_advertised{peer="10.0.0.1"} 2`,
		`shardlb_bgp_prefixes_advertised{peer="10.0.0.2"} 0`,
		`shardlb_bfd_session_up{peer="10.0.0.1"} 1`,
		`shardlb_bfd_session_up{peer="10.0.0.2"} 0`,
		`shardlb_pool_size_addresses{pool="defaultPool"} 254`,
		`shardlb_pool_used_addresses{pool="defaultPool"} 3`,
		`shardlb_pool_size_addresses{pool="edge"} 16`,
		`shardlb_pool_used_addresses{pool="edge"} 16`,
		"# TYPE go_goroutines gauge",
		"# TYPE process_cpu_seconds_total counter",
	} {
		if !strings.Contains(body, line+"\n") {
			t.Errorf("scrape lacks %q", line)
		}
	}
	for _, line := range strings.Split(body, "\n") {
		if strings.HasPrefix(line, "#") {
			continue
		}
		// Prometheus would rename a label called instance to exported_instance.
		if strings.Contains(line, `{instance=`) || strings.Contains(line, `,instance=`) {
			t.Errorf("series with a label named instance: %s", line)
		}
		if strings.HasPrefix(line, `shardlb_bfd_session_up{peer="10.0.0.3"}`) {
			t.Errorf("BFD state of a peer without BFD: %s", line)
		}
		if strings.HasPrefix(line, "shardlb_pool_addresses") {
			t.Errorf("old pool series still exported: %s", line)
		}
	}
}
