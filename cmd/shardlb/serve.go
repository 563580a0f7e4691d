package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/shardlb/shardlb/bgp"
	"github.com/shardlb/shardlb/datapath"
	"github.com/shardlb/shardlb/ipam"
	"github.com/shardlb/shardlb/kube"
	"github.com/shardlb/shardlb/shard"
)

// serve runs the load balancer until SIGTERM or SIGINT, then stops in the order
// traffic needs: mastership handed over, routes withdrawn, Leases released and a drain
// so packets already on their way are still served (kube.Run), BGP sessions closed,
// then the datapath detached.
func serve(cfg config, stderr io.Writer) int {
	log := newLogger(stderr, cfg.LogFormat, cfg.LogLevel)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := runServe(ctx, cfg, log); err != nil {
		log.Error("shardlb stopped", "err", err)
		return 1
	}
	return 0
}

func runServe(ctx context.Context, cfg config, log *slog.Logger) error {
	if cfg.Kube.NodeName == "" {
		return errors.New("no node name: set --nodeName or $NODE_NAME")
	}
	bi, _ := debug.ReadBuildInfo()
	deps := kube.Deps{Logger: log, Router: noRouter{}, Datapath: noDatapath{}, Version: versionOf(version, bi)}

	if err := cfg.findInterfaces(log); err != nil {
		return err
	}
	// What the stop is, once it begins (kube.Run tells).
	var stopping atomic.Pointer[kube.Stop]
	deps.Stopping = func(s kube.Stop) { stopping.Store(&s) }
	if len(cfg.Datapath.Interfaces) > 0 {
		dp, err := datapath.New(cfg.Datapath, log.With("part", "datapath"))
		if err != nil {
			return err
		}
		defer func() {
			// kube.Run has drained: routers moved traffic away, and what was still in
			// flight or handed off to this node was served. A pinned datapath stays:
			// it keeps forwarding with no process, and the next one (a restart, an
			// upgrade) adopts it with its connections; `shardlb cleanup` removes it.
			end, what := dp.Close, "detach datapath"
			if cfg.Datapath.PinPath != "" {
				end, what = dp.Release, "release the pinned datapath"
			}
			if err := end(); err != nil {
				log.Error(what, "err", err)
			}
			if s := stopping.Load(); s != nil && s.Removal != "" && cfg.Datapath.PinPath != "" {
				// Removed for good: no next process adopts it.
				if err := datapath.Cleanup(cfg.Datapath.PinPath); err != nil {
					log.Error("remove the pinned datapath", "err", err)
				} else {
					log.Info("pinned datapath removed", "pinPath", cfg.Datapath.PinPath, "reason", s.Removal)
				}
			}
		}()
		if len(cfg.Interfaces) > 0 {
			// Patterns are followed: a CNI bridge created with the node's first pod, or
			// a routed CNI's per-pod veths, get the program as they appear. The default
			// choice (node IPs, default routes) is made once, at start.
			fctx, stopFollow := context.WithCancel(ctx)
			followed := make(chan struct{})
			go func() {
				defer close(followed)
				if err := dp.FollowInterfaces(fctx, cfg.Interfaces); err != nil {
					log.Error("follow --interfaces", "err", err)
				}
			}()
			defer func() { stopFollow(); <-followed }() // before the datapath ends
		}
		ct := datapath.NewConntrackCounter(dp, datapath.DefaultConntrackCountInterval)
		deps.Datapath = dp
		deps.DatapathCounters = func() kube.DatapathCounters {
			fill, err := ct.Fill()
			if err != nil {
				log.Error("count conntrack entries", "err", err)
			}
			return counters(dp.Stats(), fill)
		}
	}

	// A restart keeps the routes at the routers (BGP graceful restart) only when the
	// datapath outlives the process to forward to.
	if cfg.Datapath.PinPath == "" || deps.Datapath == (noDatapath{}) {
		if cfg.BGP.GracefulRestart > 0 && cfg.BGPEnabled {
			log.Info("BGP graceful restart off: the datapath is not pinned (--pinPath), so it does not outlive the process")
		}
		cfg.BGP.GracefulRestart = 0
	}
	if a, ok := deps.Datapath.(interface{ Adopted() bool }); ok && a.Adopted() && cfg.BGP.GracefulRestart > 0 {
		// The previous process's connections are still served: the routers keep its
		// routes until this one re-announces them with its whole plan.
		cfg.BGP.Restarting = true
	}
	if cfg.BGPEnabled {
		cfg.Kube.RestartTime = cfg.BGP.GracefulRestart
	}
	var speaker *bgp.Speaker
	if cfg.BGPEnabled {
		if !cfg.BGP.RouterID.IsValid() {
			return errors.New("BGP needs an IPv4 router ID: set --nodeIP or $NODE_IP")
		}
		// Only the pools' VIPs leave (and static VIPs outside them, as announced).
		cfg.BGP.Pools = poolPrefixes(cfg.Kube.Pools)
		sp, err := bgp.New(ctx, cfg.BGP, log.With("part", "bgp"))
		if err != nil {
			return err
		}
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			stop := sp.Shutdown
			if s := stopping.Load(); s != nil && s.Restart {
				stop = sp.Suspend
			}
			if err := stop(sctx); err != nil {
				log.Error("stop BGP", "err", err)
			}
		}()
		deps.Router = sp
		deps.BGPPeers = func() []kube.BGPPeer { return peerRows(sp.Peers()) }
		speaker = sp
	}
	// Configuration objects (shardlb.io CRDs), applied live beside the flags.
	objCtx, stopObjects := context.WithCancel(ctx)
	objDone := make(chan struct{})
	go func() {
		defer close(objDone)
		err := kube.WatchObjects(objCtx, cfg.Kube, kube.ObjectsDeps{Logger: log.With("part", "objects"), Flags: objectFlags(cfg), Apply: applyObjects(cfg.BGP, speaker, log)})
		if err != nil {
			log.Error("configuration objects", "err", err)
		}
	}()
	defer func() { stopObjects(); <-objDone }()
	return kube.Run(ctx, cfg.Kube, deps)
}

// poolPrefixes turns the VIP pools' address ranges into prefixes for the speaker.
func poolPrefixes(pools []ipam.PoolSpec) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range pools {
		out = append(out, bgp.RangePrefixes(p.First, p.Last)...)
	}
	return out
}

// peerRows adapts the speaker's session states to the CLI's rows.
func peerRows(ps []bgp.PeerStatus) []kube.BGPPeer {
	rows := make([]kube.BGPPeer, 0, len(ps))
	for _, p := range ps {
		up := ""
		if p.Established && !p.Since.IsZero() {
			up = time.Since(p.Since).Truncate(time.Second).String()
		}
		rows = append(rows, kube.BGPPeer{Peer: p.Addr.String(), AS: p.ASN, State: p.State, Uptime: up, PrefixesSent: p.PrefixesSent, BFD: p.BFD})
	}
	return rows
}

// counters adapts the datapath's counters and conntrack fill to the metrics' shape.
func counters(st datapath.Stats, fill []datapath.ConntrackFill) kube.DatapathCounters {
	c := kube.DatapathCounters{Drops: st.Drops, SNATTimeWaitReuses: st.SNATTimeWaitReuses, Frontends: make([]kube.FrontendCounters, 0, len(st.Services))}
	for _, f := range fill {
		c.Conntrack = append(c.Conntrack, kube.ConntrackFill{Map: f.Map, Entries: f.Entries, Capacity: f.Capacity})
	}
	for _, s := range st.Services {
		c.Frontends = append(c.Frontends, kube.FrontendCounters{
			Service:  s.Service,
			Frontend: fmt.Sprintf("%s/%s", netip.AddrPortFrom(s.VIP, s.Port), s.Protocol),
			Packets:  s.Packets, Bytes: s.Bytes, ReplyPackets: s.ReplyPackets, ReplyBytes: s.ReplyBytes,
			Flows: s.NewFlows, Handoffs: s.HandoffPackets, ICMPErrors: s.ICMPErrors,
			SourceRangeDrops: s.SourceRangeDrops,
		})
	}
	return c
}

// noRouter stands in when BGP is off (--setBGP unset): nothing is announced.
type noRouter struct{}

func (noRouter) SetAdvertisements(context.Context, []shard.Advertisement) error { return nil }
func (noRouter) Announcing() bool                                               { return true }
func (noRouter) Flush(context.Context) error                                    { return nil }

// noDatapath stands in with --interfaces=none: nothing is programmed.
type noDatapath struct{}

func (noDatapath) SetServices([]shard.Frontend) error { return nil }

// get runs `shardlb get ha|ip|lb|bgp|services [-o table|json|wide] [--api ADDR]`.
func get(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("get", flag.ContinueOnError)
	fs.SetOutput(stderr)
	out := fs.String("o", "table", "output: table, wide or json")
	api := fs.String("api", kube.DefaultAPIAddress, "the local shardlb API")
	what := ""
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		what, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if what == "" && fs.NArg() > 0 {
		what = fs.Arg(0)
	}
	switch what {
	case "ha", "ip", "lb", "bgp", "services", "svc":
	default:
		fmt.Fprintf(stderr, "shardlb get: want one of ha, ip, lb, bgp, services (got %q)\n", what)
		return 2
	}
	if what == "svc" {
		what = "services"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := kube.Get(ctx, *api, what, *out, stdout); err != nil {
		fmt.Fprintln(stderr, "shardlb get:", err)
		if errors.Is(err, flag.ErrHelp) {
			return 2
		}
		return 1
	}
	return 0
}

// cleanup runs `shardlb cleanup --pinPath DIR`: it detaches and removes a datapath a
// stopped process left pinned (the uninstall path; a clean stop removes its own).
func cleanup(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("cleanup", flag.ContinueOnError)
	fs.SetOutput(stderr)
	pin := fs.String("pinPath", "/sys/fs/bpf/shardlb", "the --pinPath the datapath ran with")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 || !strings.HasPrefix(*pin, "/") {
		fmt.Fprintln(stderr, "shardlb cleanup: usage: shardlb cleanup [--pinPath=/sys/fs/bpf/shardlb]")
		return 2
	}
	if err := datapath.Cleanup(*pin); err != nil {
		fmt.Fprintln(stderr, "shardlb cleanup:", err)
		return 1
	}
	fmt.Fprintln(stdout, "removed the datapath pinned in", *pin)
	return 0
}
