package kube

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// dashboardPath is the Grafana dashboard operators import (docs/grafana).
const dashboardPath = "../docs/grafana/shardlb.json"

// targetLabels are the labels Prometheus adds to every series it scrapes (and the
// usual Kubernetes relabelling), which a dashboard may use though no metric has them.
var targetLabels = []string{"instance", "job", "pod", "namespace", "node"}

// exported lists every metric family a pod's /metrics can carry, with its labels,
// from the collectors Run registers (histograms also as _bucket, _sum and _count).
func exported(t *testing.T) map[string][]string {
	t.Helper()
	m := newMetrics()
	m.reg.MustRegister(newStateCollector(nil, nil, nil), newDatapathCollector(nil))
	newProbeMetrics(m.reg)
	m.registerBuildInfo("test")
	ch := make(chan *prometheus.Desc)
	go func() { m.reg.Describe(ch); close(ch) }()
	// A Desc prints as Desc{fqName: "x", help: "...", constLabels: {k=v}, variableLabels: {a,b}}.
	re := regexp.MustCompile(`fqName: "([^"]+)".*constLabels: \{([^}]*)\}, variableLabels: \{([^}]*)\}`)
	out := map[string][]string{}
	for d := range ch {
		sm := re.FindStringSubmatch(d.String())
		if sm == nil {
			t.Fatalf("cannot read %s", d)
		}
		var labels []string
		for _, kv := range strings.Split(sm[2], ",") {
			if k, _, ok := strings.Cut(kv, "="); ok {
				labels = append(labels, strings.TrimSpace(k))
			}
		}
		for _, l := range strings.Split(sm[3], ",") {
			if l = strings.TrimSpace(l); l != "" {
				labels = append(labels, l)
			}
		}
		out[sm[1]] = labels
		for _, s := range []string{"_bucket", "_sum", "_count"} {
			out[sm[1]+s] = append(slices.Clone(labels), "le")
		}
	}
	return out
}

// Every query of the dashboard names metrics shardlb exports and labels they carry:
// a renamed metric or label fails here, not on an operator's screen.
func TestDashboardQueriesExportedMetrics(t *testing.T) {
	b, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		UID        string `json:"uid"`
		Templating struct {
			List []struct {
				Name, Type string
			} `json:"list"`
		} `json:"templating"`
		Panels []struct {
			ID         int    `json:"id"`
			Type       string `json:"type"`
			Title      string `json:"title"`
			Datasource *struct {
				UID string `json:"uid"`
			} `json:"datasource"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	if d.UID == "" || len(d.Templating.List) == 0 || d.Templating.List[0].Type != "datasource" {
		t.Fatalf("dashboard needs a uid and a datasource variable, has %q, %+v", d.UID, d.Templating.List)
	}
	metrics := exported(t)
	metricRe := regexp.MustCompile(`\b(shardlb_[a-z0-9_]+)(\{([^}]*)\})?`)
	matcherRe := regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)`)
	byRe := regexp.MustCompile(`\b(?:by|without)\s*\(([^)]*)\)`)
	ids := map[int]bool{}
	queries := 0
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d used twice", p.ID)
		}
		ids[p.ID] = true
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("panel %q does not use the datasource variable", p.Title)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			queries++
			var labels []string // the labels of the metrics the query reads
			ms := metricRe.FindAllStringSubmatch(q.Expr, -1)
			if len(ms) == 0 {
				t.Errorf("panel %q: %q reads no shardlb metric", p.Title, q.Expr)
			}
			for _, m := range ms {
				have, ok := metrics[m[1]]
				if !ok {
					t.Errorf("panel %q: %s is not exported", p.Title, m[1])
					continue
				}
				labels = append(labels, have...)
				for _, mm := range matcherRe.FindAllStringSubmatch(m[3], -1) {
					if !slices.Contains(have, mm[1]) && !slices.Contains(targetLabels, mm[1]) {
						t.Errorf("panel %q: %s has no label %q", p.Title, m[1], mm[1])
					}
				}
			}
			for _, by := range byRe.FindAllStringSubmatch(q.Expr, -1) {
				for _, l := range strings.Split(by[1], ",") {
					if l = strings.TrimSpace(l); l != "" && !slices.Contains(labels, l) && !slices.Contains(targetLabels, l) {
						t.Errorf("panel %q: groups by %q, which none of its metrics has", p.Title, l)
					}
				}
			}
		}
	}
	if queries == 0 {
		t.Fatal("no queries")
	}
}
