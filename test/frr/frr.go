// Package frr runs a real FRR router (zebra, bgpd, bfdd) inside a network namespace
// for tests and the lab, configured from a Go value, and reads its BGP table, BFD
// sessions and kernel routes, so that tests check what a real router does.
package frr

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Dir is where Debian installs the FRR daemons.
const Dir = "/usr/lib/frr"

// Neighbor is one BGP neighbor of the router.
type Neighbor struct {
	Addr netip.Addr
	ASN  uint32
	// BFD turns on BFD for the neighbor with the router's BFD timers.
	BFD      bool
	Password string
}

// BFDTimers are the timers of the BFD profile used by neighbors with BFD.
type BFDTimers struct {
	Interval   time.Duration // transmit and receive, 10 ms to 60 s
	Multiplier uint8
}

// Config is what the router is started with.
type Config struct {
	ASN      uint32
	RouterID netip.Addr
	// Neighbors are added with "no bgp ebgp-requires-policy": FRR otherwise accepts
	// no eBGP route without a policy.
	Neighbors []Neighbor
	// MaximumPaths is how many equal paths make one ECMP route, iBGP or eBGP; above 1
	// also across different neighbor ASes (as-path multipath-relax). 0 keeps FRR's
	// default, which in Debian's build is already 64.
	MaximumPaths int
	// KeepaliveTime and HoldTime are the BGP timers FRR proposes; zero keeps FRR's
	// (60 s / 180 s; a session uses the smaller hold time of both sides).
	KeepaliveTime, HoldTime time.Duration
	// BFD defaults to 300 ms x 3.
	BFD BFDTimers
	// GracefulRestart turns on "bgp graceful-restart" (FRR is a helper by default
	// anyway). Not "bfd check-control-plane-failure": with it FRR ignores a BFD down
	// on every session that negotiated graceful restart, so a node lost with its link
	// keeps its routes until the hold timer (measured: 9 s instead of 0.3 s). Without
	// it a BFD session that goes down after its BGP session closed for a restart
	// leaves the stale routes alone, and one that goes down first takes the session
	// and the routes down, as it should.
	GracefulRestart bool
	// ExtraBGP lines go inside "router bgp" as they are.
	ExtraBGP []string
	// IPv6Unicast activates every neighbor in the IPv6 unicast family as well, so
	// that IPv4 sessions carry IPv6 routes (MP-BGP) with maximum-paths as in IPv4.
	IPv6Unicast bool
}

// Router is a running FRR in a network namespace.
type Router struct {
	NS  string
	Dir string // configuration, sockets and logs
	cfg Config

	procs []*exec.Cmd
	nl    *netlink.Handle
}

// Start writes the configuration to a new directory and starts zebra, bfdd and bgpd
// in the network namespace ns. It returns once every daemon answers on its vty.
func Start(ctx context.Context, ns string, cfg Config) (*Router, error) {
	if cfg.BFD.Interval == 0 {
		cfg.BFD.Interval = 300 * time.Millisecond
	}
	if cfg.BFD.Multiplier == 0 {
		cfg.BFD.Multiplier = 3
	}
	if cfg.ASN == 0 || !cfg.RouterID.Is4() {
		return nil, fmt.Errorf("frr: config needs an ASN and an IPv4 router ID")
	}
	dir, err := os.MkdirTemp("", "frr-"+ns+"-")
	if err != nil {
		return nil, fmt.Errorf("frr: make run directory: %w", err)
	}
	r := &Router{NS: ns, Dir: dir, cfg: cfg}
	if err := r.start(ctx); err != nil {
		logs := r.Logs()
		r.Stop()
		return nil, fmt.Errorf("%w\n%s", err, logs)
	}
	return r, nil
}

// StartT is Start for tests: it fails the test on error and stops the router when
// the test ends.
func StartT(t testing.TB, ns string, cfg Config) *Router {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := Start(ctx, ns, cfg)
	if err != nil {
		t.Fatalf("start FRR in %s: %v", ns, err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("FRR in %s:\n%s", ns, r.Logs())
		}
		r.Stop()
	})
	return r
}

func (r *Router) start(ctx context.Context) error {
	// The daemons drop to the frr user, which must own the directory.
	u, err := user.Lookup("frr")
	if err != nil {
		return fmt.Errorf("frr: look up user frr: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	files := map[string]string{
		"zebra.conf": "hostname " + r.NS + "\nlog file " + r.path("zebra.log") + "\nlog timestamp precision 3\n",
		"bfdd.conf":  r.bfddConf(),
		"bgpd.conf":  r.bgpdConf(),
	}
	if err := os.Chmod(r.Dir, 0o755); err != nil {
		return fmt.Errorf("frr: %w", err)
	}
	for name, content := range files {
		if err := os.WriteFile(r.path(name), []byte(content), 0o644); err != nil {
			return fmt.Errorf("frr: write %s: %w", name, err)
		}
	}
	for _, p := range []string{r.Dir, r.path("zebra.conf"), r.path("bfdd.conf"), r.path("bgpd.conf")} {
		if err := os.Chown(p, uid, gid); err != nil {
			return fmt.Errorf("frr: %w", err)
		}
	}
	common := func(d string) []string {
		return []string{"-f", r.path(d + ".conf"), "-i", r.path(d + ".pid"), "-z", r.path("zserv.api"), "--vty_socket", r.Dir}
	}
	daemons := []struct {
		name string
		args []string
	}{
		{"zebra", common("zebra")},
		{"bfdd", append(common("bfdd"), "--bfdctl", r.path("bfdd.sock"))},
		{"bgpd", common("bgpd")},
	}
	for _, d := range daemons {
		out, err := os.Create(r.path(d.name + ".out"))
		if err != nil {
			return fmt.Errorf("frr: %w", err)
		}
		// "ip netns exec" execs the daemon, so the PID is the daemon's own.
		cmd := exec.Command("ip", append([]string{"netns", "exec", r.NS, filepath.Join(Dir, d.name)}, d.args...)...)
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			out.Close()
			return fmt.Errorf("frr: start %s: %w", d.name, err)
		}
		out.Close()
		r.procs = append(r.procs, cmd)
		// bgpd and bfdd register with zebra at start: wait for its socket.
		if d.name == "zebra" {
			if err := r.waitFor(ctx, func() bool { _, err := os.Stat(r.path("zserv.api")); return err == nil }); err != nil {
				return fmt.Errorf("frr: zebra did not come up: %w", err)
			}
		}
	}
	for _, d := range daemons {
		vty := r.path(d.name + ".vty")
		if err := r.waitFor(ctx, func() bool { _, err := os.Stat(vty); return err == nil }); err != nil {
			return fmt.Errorf("frr: %s did not come up: %w", d.name, err)
		}
	}
	h, err := netns.GetFromName(r.NS)
	if err != nil {
		return fmt.Errorf("frr: open namespace %s: %w", r.NS, err)
	}
	defer h.Close()
	if r.nl, err = netlink.NewHandleAt(h); err != nil {
		return fmt.Errorf("frr: netlink in %s: %w", r.NS, err)
	}
	return nil
}

func (r *Router) waitFor(ctx context.Context, cond func() bool) error {
	for !cond() {
		for _, p := range r.procs {
			if p.ProcessState != nil || syscall.Kill(p.Process.Pid, 0) != nil {
				return fmt.Errorf("%s exited", filepath.Base(p.Args[4]))
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

func (r *Router) path(name string) string { return filepath.Join(r.Dir, name) }

func (r *Router) bfddConf() string {
	var b strings.Builder
	fmt.Fprintf(&b, "hostname %s\nlog file %s\nlog timestamp precision 3\ndebug bfd peer\ndebug bfd network\n", r.NS, r.path("bfdd.log"))
	ms := r.cfg.BFD.Interval.Milliseconds()
	fmt.Fprintf(&b, "bfd\n profile shardlb\n  transmit-interval %d\n  receive-interval %d\n  detect-multiplier %d\n exit\nexit\n", ms, ms, r.cfg.BFD.Multiplier)
	return b.String()
}

func (r *Router) bgpdConf() string {
	c := r.cfg
	var b strings.Builder
	fmt.Fprintf(&b, "hostname %s\nlog file %s\nlog timestamp precision 3\n", r.NS, r.path("bgpd.log"))
	fmt.Fprintf(&b, "router bgp %d\n bgp router-id %s\n no bgp ebgp-requires-policy\n", c.ASN, c.RouterID)
	if c.MaximumPaths > 1 {
		b.WriteString(" bgp bestpath as-path multipath-relax\n")
	}
	if c.HoldTime > 0 {
		fmt.Fprintf(&b, " timers bgp %d %d\n", int(c.KeepaliveTime.Seconds()), int(c.HoldTime.Seconds()))
	}
	if c.GracefulRestart {
		b.WriteString(" bgp graceful-restart\n")
	}
	for _, l := range c.ExtraBGP {
		fmt.Fprintf(&b, " %s\n", l)
	}
	for _, n := range c.Neighbors {
		fmt.Fprintf(&b, " neighbor %s remote-as %d\n", n.Addr, n.ASN)
		// Reconnect quickly when a session drops, as a tuned router would.
		fmt.Fprintf(&b, " neighbor %s timers connect 1\n", n.Addr)
		if n.Password != "" {
			fmt.Fprintf(&b, " neighbor %s password %s\n", n.Addr, n.Password)
		}
		if n.BFD {
			fmt.Fprintf(&b, " neighbor %s bfd\n neighbor %s bfd profile shardlb\n", n.Addr, n.Addr)
		}
	}
	if c.MaximumPaths > 0 {
		fmt.Fprintf(&b, " address-family ipv4 unicast\n  maximum-paths %d\n  maximum-paths ibgp %d\n exit-address-family\n", c.MaximumPaths, c.MaximumPaths)
	}
	if c.IPv6Unicast {
		b.WriteString(" address-family ipv6 unicast\n")
		for _, n := range c.Neighbors {
			fmt.Fprintf(&b, "  neighbor %s activate\n", n.Addr)
		}
		if c.MaximumPaths > 0 {
			fmt.Fprintf(&b, "  maximum-paths %d\n  maximum-paths ibgp %d\n", c.MaximumPaths, c.MaximumPaths)
		}
		b.WriteString(" exit-address-family\n")
	}
	b.WriteString("exit\n")
	return b.String()
}

// PIDs returns the process IDs of zebra, bfdd and bgpd.
func (r *Router) PIDs() []int {
	var out []int
	for _, p := range r.procs {
		out = append(out, p.Process.Pid)
	}
	return out
}

// Stop stops the daemons by PID (SIGTERM, then SIGKILL after 3 s) and removes the
// run directory. It is safe to call twice.
func (r *Router) Stop() {
	for i := len(r.procs) - 1; i >= 0; i-- {
		p := r.procs[i]
		_ = p.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = p.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			_ = p.Process.Kill()
			<-done
		}
	}
	r.procs = nil
	if r.nl != nil {
		r.nl.Close()
		r.nl = nil
	}
	if r.Dir != "" {
		_ = os.RemoveAll(r.Dir)
	}
}

// Logs returns the daemons' log files, for a failing test.
func (r *Router) Logs() string {
	var b strings.Builder
	for _, name := range []string{"zebra.out", "zebra.log", "bfdd.out", "bfdd.log", "bgpd.out", "bgpd.log"} {
		data, err := os.ReadFile(r.path(name))
		if err != nil || len(bytes.TrimSpace(data)) == 0 {
			continue
		}
		fmt.Fprintf(&b, "--- %s\n%s", name, data)
	}
	return b.String()
}

// Vtysh runs one vtysh command against this router and returns its output.
func (r *Router) Vtysh(ctx context.Context, command string) ([]byte, error) {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "vtysh", "--vty_socket", r.Dir, "-c", command)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("vtysh %q: %w: %s", command, err, bytes.TrimSpace(stderr.Bytes()))
	}
	return out, nil
}

func (r *Router) vtyshJSON(ctx context.Context, command string, v any) error {
	out, err := r.Vtysh(ctx, command)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(out, v); err != nil {
		return fmt.Errorf("vtysh %q: decode JSON: %w", command, err)
	}
	return nil
}

// Path is one BGP path as FRR holds it.
type Path struct {
	Peer      netip.Addr // neighbor the path came from
	NextHop   netip.Addr
	LocalPref uint32 // 0 when absent (eBGP)
	MED       uint32
	ASPath    []uint32
	Best      bool
	Multipath bool
	// Stale marks a path kept for a peer in graceful restart.
	Stale bool
}

// Paths returns every path FRR holds for prefix (none when it has no route).
func (r *Router) Paths(ctx context.Context, prefix netip.Prefix) ([]Path, error) {
	var v struct {
		Paths []struct {
			ASPath struct {
				Segments []struct {
					List []uint32 `json:"list"`
				} `json:"segments"`
			} `json:"aspath"`
			LocPrf    uint32 `json:"locPrf"`
			Metric    uint32 `json:"metric"`
			Multipath bool   `json:"multipath"`
			Stale     bool   `json:"stale"`
			BestPath  struct {
				Overall bool `json:"overall"`
			} `json:"bestpath"`
			Nexthops []struct {
				IP string `json:"ip"`
			} `json:"nexthops"`
			Peer struct {
				PeerID string `json:"peerId"`
			} `json:"peer"`
		} `json:"paths"`
	}
	if err := r.vtyshJSON(ctx, fmt.Sprintf("show bgp %s unicast %s json", afi(prefix), prefix), &v); err != nil {
		return nil, err
	}
	out := make([]Path, 0, len(v.Paths))
	for _, p := range v.Paths {
		path := Path{LocalPref: p.LocPrf, MED: p.Metric, Best: p.BestPath.Overall, Multipath: p.Multipath, Stale: p.Stale}
		path.Peer, _ = netip.ParseAddr(p.Peer.PeerID)
		if len(p.Nexthops) > 0 {
			path.NextHop, _ = netip.ParseAddr(p.Nexthops[0].IP)
		}
		for _, s := range p.ASPath.Segments {
			path.ASPath = append(path.ASPath, s.List...)
		}
		out = append(out, path)
	}
	return out, nil
}

// BestPath returns FRR's best path for prefix; ok is false when it has none.
func (r *Router) BestPath(ctx context.Context, prefix netip.Prefix) (best Path, ok bool, err error) {
	paths, err := r.Paths(ctx, prefix)
	if err != nil {
		return Path{}, false, err
	}
	for _, p := range paths {
		if p.Best {
			return p, true, nil
		}
	}
	return Path{}, false, nil
}

// NeighborSummary is one line of "show bgp summary".
type NeighborSummary struct {
	State            string // "Established", "Active", "Idle", ...
	PrefixesReceived int
}

// Summary returns the IPv4 unicast BGP summary by neighbor address.
func (r *Router) Summary(ctx context.Context) (map[netip.Addr]NeighborSummary, error) {
	var v struct {
		Peers map[string]struct {
			State  string `json:"state"`
			PfxRcd int    `json:"pfxRcd"`
		} `json:"peers"`
	}
	if err := r.vtyshJSON(ctx, "show bgp ipv4 unicast summary json", &v); err != nil {
		return nil, err
	}
	out := make(map[netip.Addr]NeighborSummary, len(v.Peers))
	for a, p := range v.Peers {
		addr, err := netip.ParseAddr(a)
		if err != nil {
			continue
		}
		out[addr] = NeighborSummary{State: p.State, PrefixesReceived: p.PfxRcd}
	}
	return out, nil
}

// BFDPeer is one BFD session of bfdd.
type BFDPeer struct {
	Peer       netip.Addr
	Status     string // "up", "down", "init"
	TxInterval time.Duration
	RxInterval time.Duration
	Multiplier int
}

// BFDPeers returns bfdd's sessions.
func (r *Router) BFDPeers(ctx context.Context) ([]BFDPeer, error) {
	var v []struct {
		Peer       string `json:"peer"`
		Status     string `json:"status"`
		Tx         int    `json:"transmit-interval"`
		Rx         int    `json:"receive-interval"`
		Multiplier int    `json:"detect-multiplier"`
	}
	if err := r.vtyshJSON(ctx, "show bfd peers json", &v); err != nil {
		return nil, err
	}
	out := make([]BFDPeer, 0, len(v))
	for _, p := range v {
		addr, _ := netip.ParseAddr(p.Peer)
		out = append(out, BFDPeer{
			Peer: addr, Status: p.Status, Multiplier: p.Multiplier,
			TxInterval: time.Duration(p.Tx) * time.Millisecond, RxInterval: time.Duration(p.Rx) * time.Millisecond,
		})
	}
	return out, nil
}

// KernelRoute returns the next hops of the route for prefix in the namespace's main
// kernel table, sorted; nil when there is no such route. It reads netlink directly,
// cheaply enough to poll every millisecond.
func (r *Router) KernelRoute(prefix netip.Prefix) ([]netip.Addr, error) {
	if r.nl == nil {
		return nil, errors.New("frr: router stopped")
	}
	family := netlink.FAMILY_V4
	if prefix.Addr().Is6() {
		family = netlink.FAMILY_V6
	}
	dst := &net.IPNet{IP: prefix.Addr().AsSlice(), Mask: net.CIDRMask(prefix.Bits(), prefix.Addr().BitLen())}
	routes, err := r.nl.RouteListFiltered(family, &netlink.Route{Dst: dst, Table: syscall.RT_TABLE_MAIN}, netlink.RT_FILTER_DST|netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("frr: list kernel routes for %v: %w", prefix, err)
	}
	var hops []netip.Addr
	for _, rt := range routes {
		if a, ok := netip.AddrFromSlice(rt.Gw); ok {
			hops = append(hops, a.Unmap())
		}
		for _, nh := range rt.MultiPath {
			if a, ok := netip.AddrFromSlice(nh.Gw); ok {
				hops = append(hops, a.Unmap())
			}
		}
	}
	slices.SortFunc(hops, netip.Addr.Compare)
	return hops, nil
}

// KernelBGPRoutes returns how many BGP routes FRR installed in the main kernel table.
func (r *Router) KernelBGPRoutes() (int, error) {
	if r.nl == nil {
		return 0, errors.New("frr: router stopped")
	}
	routes, err := r.nl.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN, Protocol: unix.RTPROT_BGP}, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return 0, fmt.Errorf("frr: list kernel routes: %w", err)
	}
	return len(routes), nil
}

// WaitKernelRoute polls the kernel route for prefix every millisecond until cond
// holds for its next hops, and returns when it was first seen to hold.
func (r *Router) WaitKernelRoute(ctx context.Context, prefix netip.Prefix, cond func([]netip.Addr) bool) (time.Time, error) {
	for {
		hops, err := r.KernelRoute(prefix)
		if err != nil {
			return time.Time{}, err
		}
		if cond(hops) {
			return time.Now(), nil
		}
		select {
		case <-ctx.Done():
			return time.Time{}, fmt.Errorf("frr: kernel route %v still %v: %w", prefix, hops, ctx.Err())
		case <-time.After(time.Millisecond):
		}
	}
}

func afi(p netip.Prefix) string {
	if p.Addr().Is6() {
		return "ipv6"
	}
	return "ipv4"
}
