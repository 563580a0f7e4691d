package kube

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/client-go/tools/cache"

	"github.com/shardlb/shardlb/shard"
)

// HARow is one instance as this pod sees it (`shardlb get ha`).
type HARow struct {
	Instance string `json:"instance"`
	State    string `json:"hastate"` // MASTER, BACKUP, or EQUAL when roles are off
	Master   string `json:"master"`  // holder of the instance's mastership Lease
}

// IPRow is one VIP this pod announces (`shardlb get ip`).
type IPRow struct {
	Instance string   `json:"instance"`
	IP       string   `json:"ip"` // prefix, /32 or /128
	Role     string   `json:"role"`
	Services []string `json:"services"`
}

// LBRow is one frontend this pod programs (`shardlb get lb`).
type LBRow struct {
	ExtIP     string   `json:"extIP"`
	Port      uint16   `json:"port"`
	Protocol  string   `json:"protocol"`
	Name      string   `json:"name"`
	Select    string   `json:"sel"`
	Mode      string   `json:"mode"`
	Endpoints []string `json:"endpoints"`
	// ClientAddr says what the endpoints see as the source of a connection: "client"
	// (its address, kept) or "node" (the load balancer's, translated).
	ClientAddr string `json:"clientAddr"`
	// SourceRanges are the client prefixes allowed; none: every client.
	SourceRanges []string `json:"sourceRanges,omitempty"`
}

// BGPPeer is one BGP session, as a speaker reports it (`shardlb get bgp`).
type BGPPeer struct {
	Peer   string `json:"peer"`
	AS     uint32 `json:"as"`
	State  string `json:"state"`  // e.g. ESTABLISHED, ACTIVE, IDLE
	Uptime string `json:"uptime"` // as the speaker formats it
	// PrefixesSent are the VIPs announced on the session.
	PrefixesSent int `json:"prefixesSent"`
	// BFD is the session's BFD state (up, down, init, admin-down); "" without BFD.
	BFD string `json:"bfd,omitempty"`
}

// ServiceRow is one service cluster-wide (`shardlb get services`): the question "which
// pod serves this VIP" answered from the API.
type ServiceRow struct {
	Service   string   `json:"service"`
	VIPs      []string `json:"vips"`
	Instance  string   `json:"instance"`
	Master    string   `json:"master"`
	Ports     []string `json:"ports"`
	Endpoints int      `json:"endpoints"` // ready endpoint addresses
}

// status answers the API from the loops' state.
type status struct {
	cfg      *Config
	node     *node
	elector  *elector
	services cache.Store
	slices   cache.Indexer
	peers    func() []BGPPeer
	ready    atomic.Bool // a Plan has been applied
	health   *health
}

func (s *status) ha() []HARow {
	masters := s.elector.Masters()
	var out []HARow
	for _, inst := range s.cfg.Instances.Names() {
		st := shard.RoleBackup.String()
		switch {
		case !s.cfg.Roles:
			st = shard.RoleEqual.String()
		case s.elector.IsMaster(inst):
			st = shard.RoleMaster.String()
		}
		out = append(out, HARow{Instance: inst, State: st, Master: masters[inst]})
	}
	return out
}

func (s *status) ip() []IPRow {
	plan, _ := s.node.plan()
	byVIP := map[string][]string{}
	for _, f := range plan.Frontends {
		k := f.VIP.String()
		if !slices.Contains(byVIP[k], f.Service) {
			byVIP[k] = append(byVIP[k], f.Service)
		}
	}
	out := make([]IPRow, 0, len(plan.Advertisements))
	for _, a := range plan.Advertisements {
		out = append(out, IPRow{Instance: a.Instance, IP: a.Prefix.String(), Role: a.Role.String(), Services: byVIP[a.Prefix.Addr().String()]})
	}
	return out
}

func (s *status) lb() []LBRow {
	plan, _ := s.node.plan()
	return lbRows(plan)
}

// lbRows is one row per frontend of plan (`shardlb get lb`).
func lbRows(plan shard.Plan) []LBRow {
	out := make([]LBRow, 0, len(plan.Frontends))
	for _, f := range plan.Frontends {
		eps := make([]string, 0, len(f.Endpoints))
		for _, e := range f.Endpoints {
			eps = append(eps, net.JoinHostPort(e.Addr.String(), strconv.Itoa(int(e.Port))))
		}
		row := LBRow{ExtIP: f.VIP.String(), Port: f.Port, Protocol: f.Protocol.String(), Name: f.Service,
			Select: f.Select.String(), Mode: f.Mode.String(), Endpoints: eps, ClientAddr: "node"}
		if shard.KeepsClientAddr(f.Mode) {
			row.ClientAddr = "client"
		}
		for _, p := range f.SourceRanges {
			row.SourceRanges = append(row.SourceRanges, p.String())
		}
		out = append(out, row)
	}
	return out
}

func (s *status) bgp() []BGPPeer {
	if s.peers == nil {
		return []BGPPeer{}
	}
	return s.peers()
}

func (s *status) servicesTable() []ServiceRow {
	masters := s.elector.Masters()
	var out []ServiceRow
	for _, o := range s.services.List() {
		svc, ok := o.(*service)
		if !ok || !svc.ours(s.cfg.LoadBalancerClass) {
			continue
		}
		row := ServiceRow{Service: svc.key(), Instance: svc.Annotations[AnnotationInstance], VIPs: []string{}}
		for _, ip := range svc.Ingress {
			row.VIPs = append(row.VIPs, ip.String())
		}
		if inst, err := s.cfg.Instances.Canonical(row.Instance); err == nil {
			row.Instance = inst
			row.Master = masters[inst]
		}
		for _, p := range svc.Ports {
			row.Ports = append(row.Ports, fmt.Sprintf("%d/%s", p.Port, p.Protocol))
		}
		objs, _ := s.slices.ByIndex(indexByService, svc.key())
		for _, o := range objs {
			if es, ok := o.(*endpointSlice); ok {
				row.Endpoints += len(es.Ready)
			}
		}
		out = append(out, row)
	}
	slices.SortFunc(out, func(a, b ServiceRow) int { return cmp.Compare(a.Service, b.Service) })
	return out
}

// apiHandler serves /v1/{ha,ip,lb,bgp,services} as JSON.
func (s *status) apiHandler() http.Handler {
	mux := http.NewServeMux()
	serve := func(path string, f func() any) {
		mux.HandleFunc("GET /v1/"+path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(f())
		})
	}
	serve("ha", func() any { return s.ha() })
	serve("ip", func() any { return s.ip() })
	serve("lb", func() any { return s.lb() })
	serve("bgp", func() any { return s.bgp() })
	serve("services", func() any { return s.servicesTable() })
	return mux
}

// probeHandler serves /metrics, /healthz and /readyz. /healthz fails only when a loop
// is stuck (health.alive): peers probe it to tell whether this pod still masters its
// shards. /readyz fails until a Plan is applied and while every BGP session is down.
func (s *status) probeHandler(m *metrics) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	probe := func(check func() string, what string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			if why := check(); why != "" {
				http.Error(w, what+": "+why, http.StatusServiceUnavailable)
				return
			}
			_, _ = w.Write([]byte("ok\n"))
		}
	}
	mux.HandleFunc("GET /healthz", probe(s.health.alive, "unhealthy"))
	mux.HandleFunc("GET /readyz", probe(s.health.ready, "not ready"))
	return mux
}

// serveHTTP listens now (so a bad address fails Run at once) and serves until ctx ends.
func serveHTTP(ctx context.Context, log *slog.Logger, addr string, h http.Handler) (func(), error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("http server", "addr", addr, "err", err)
		}
	}()
	return func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		<-done
	}, nil
}
