// Package bgp announces the node's VIPs to the upstream routers with attributes by
// shard role (master preferred, backups ready), so that failover is a route
// withdrawal. It embeds GoBGP v4, which never shows outside this package.
package bgp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/shardlb/shardlb/shard"
)

// PeerStatus is the state of one BGP session, for the CLI and metrics.
type PeerStatus struct {
	Addr netip.Addr
	ASN  uint32
	// State is the BGP FSM state: idle, connect, active, opensent, openconfirm or
	// established.
	State       string
	Established bool
	// Since is when the session came up; zero unless established.
	Since time.Time
	// LastDown is when the session last went down; zero if it never did.
	LastDown time.Time
	// LastError says why the session last went down, if known.
	LastError string
	// PrefixesSent are the VIPs announced on the session; PrefixesReceived are the
	// routes the peer sent, which the import policy keeps out of the RIB.
	PrefixesSent, PrefixesReceived int
	// BFD is the BFD session state (up, down, init, admin-down); empty without BFD.
	BFD string

	updatesSent uint64
	outQueue    uint32
}

// Speaker is the node's BGP speaker. Its methods are safe for concurrent use.
type Speaker struct {
	cfg         Config
	communities []uint32
	log         *slog.Logger
	r           router

	started time.Time
	// pw are the password file's passwords, for peers set later too.
	pw passwords

	mu sync.Mutex
	// peers are the configured peers (cfg.Peers is those at start).
	peers []Peer
	// pools are the communities added to the VIPs of some prefixes (SetPoolCommunities).
	pools   []poolCommunities
	applied map[netip.Prefix]applied // what is announced now
	stopped bool
	// deferred: a restarting speaker whose peers wait for Resume.
	deferred bool
	// unsent is the sessions' state just before the last change that announced a
	// route, until Flush saw it leave; nil when nothing is waiting.
	unsent []PeerStatus
}

type applied struct {
	adv   shard.Advertisement
	route route
}

// ErrStopped is returned by calls on a Speaker after Shutdown.
var ErrStopped = errors.New("bgp speaker stopped")

// New validates cfg, reads the password file, starts the embedded speaker with a
// reject-all import policy and an export policy that lets only the VIPs out (see
// Config.Pools), and adds the peers. Sessions come up in the background;
// an unreachable peer is retried every ConnectRetry and shows in Peers as down.
// ctx bounds the startup only.
func New(ctx context.Context, cfg Config, log *slog.Logger) (*Speaker, error) {
	cfg.Peers = slices.Clone(cfg.Peers)
	for i := range cfg.Peers {
		cfg.Peers[i].Addr = cfg.Peers[i].Addr.Unmap()
	}
	cfg.Pools = slices.Clone(cfg.Pools)
	for i := range cfg.Pools {
		cfg.Pools[i] = cfg.Pools[i].Masked()
	}
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("bgp config: %w", err)
	}
	pw, err := cfg.readPasswordFile()
	if err != nil {
		return nil, err
	}
	pw.apply(cfg.Peers)
	communities, _ := parseCommunities(cfg.Communities) // validated above
	if cfg.GRPCListen != "" {
		// GoBGP only logs a gRPC listen failure and runs on without its API (older
		// versions exit the process): fail here instead, with the reason.
		l, err := net.Listen("tcp", cfg.GRPCListen)
		if err != nil {
			return nil, fmt.Errorf("bgp gRPC API address: %w", err)
		}
		_ = l.Close()
	}
	r, err := startGoBGP(ctx, &cfg, log)
	if err != nil {
		return nil, err
	}
	log.Info("BGP speaker started", "asn", cfg.LocalASN, "routerID", cfg.RouterID, "peers", len(cfg.Peers), "grpc", cfg.GRPCListen, "pools", cfg.Pools)
	if len(cfg.Pools) == 0 {
		log.Warn("no VIP pools: only the VIPs this speaker announces itself (static IPs) leave toward the peers, every other path is rejected on export")
	}
	return &Speaker{
		cfg:         cfg,
		communities: communities,
		log:         log,
		r:           r,
		started:     time.Now(),
		pw:          pw,
		peers:       slices.Clone(cfg.Peers),
		applied:     make(map[netip.Prefix]applied),
		deferred:    cfg.Restarting,
	}, nil
}

// Resume dials the peers of a restarting speaker (Config.Restarting), once the routes
// it must announce are set: each router then gets them in the session's first
// UPDATE, followed by End-of-RIB, which replaces its stale routes in one step. It does
// nothing on a speaker that is not waiting.
func (s *Speaker) Resume(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return ErrStopped
	}
	if !s.deferred {
		return nil
	}
	cfg := s.cfg
	var errs []error
	added := make([]Peer, 0, len(s.peers))
	for _, p := range s.peers {
		if err := s.r.addPeer(ctx, &cfg, p); err != nil {
			errs = append(errs, err)
			continue
		}
		added = append(added, p)
	}
	s.peers = added // a peer refused here is added by the next SetPeers that lists it
	s.deferred = false
	s.cfg.Restarting = false // peers added from now on are new, not restarting
	s.started = time.Now()
	s.log.Info("BGP peers dialled after a restart", "peers", len(s.peers), "routes", len(s.applied))
	return errors.Join(errs...)
}

// Suspend ends the speaker for a restart: nothing is withdrawn and every session that
// negotiated graceful restart closes without a NOTIFICATION, so the routers keep this
// speaker's routes, marked stale, for Config.GracefulRestart, and keep forwarding to
// this node (whose datapath must outlive the process: a pinned datapath) until the
// next process re-announces them or the restart time runs out. Sessions without the
// capability are closed with a Cease, as by Shutdown. After Suspend the speaker is
// stopped.
func (s *Speaker) Suspend(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return nil
	}
	s.stopped = true
	if err := s.r.stop(ctx, s.cfg.GracefulRestart > 0); err != nil {
		return fmt.Errorf("bgp suspend: %w", err)
	}
	s.log.Info("BGP speaker stopped for a restart: routes left with the routers", "restartTime", s.cfg.GracefulRestart, "routes", len(s.applied))
	return nil
}

// SetPeers makes the speaker's peers exactly desired, by address: a new peer is
// dialled, a peer no longer listed is closed (Cease) and forgotten, and a peer whose
// settings changed is closed and dialled again with the new ones (hold time,
// password or BFD are negotiated when a session opens). Every other session is left
// as it is, routes included. Peers without a password get the password file's. An
// invalid list is refused whole, changing nothing; on a failure half-way the peers
// already changed stay changed and a later call converges.
func (s *Speaker) SetPeers(ctx context.Context, desired []Peer) error {
	desired = slices.Clone(desired)
	for i := range desired {
		desired[i].Addr = desired[i].Addr.Unmap()
	}
	s.pw.apply(desired)
	if err := s.cfg.validatePeers(desired); err != nil {
		return fmt.Errorf("set peers: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return ErrStopped
	}
	if s.deferred {
		s.peers = desired // dialled by Resume
		return nil
	}
	want := make(map[netip.Addr]Peer, len(desired))
	for _, p := range desired {
		want[p.Addr] = p
	}
	var errs []error
	kept := make([]Peer, 0, len(desired))
	for _, cur := range s.peers {
		p, ok := want[cur.Addr]
		if ok && peerEqual(p, cur) {
			kept = append(kept, cur)
			continue
		}
		if err := s.r.deletePeer(ctx, &s.cfg, cur); err != nil {
			errs = append(errs, err)
			kept = append(kept, cur)
			continue
		}
		if ok {
			s.log.Info("BGP peer changed: session restarts", "peer", cur.Addr, "asn", p.ASN)
		} else {
			s.log.Info("BGP peer removed", "peer", cur.Addr, "asn", cur.ASN)
		}
	}
	have := make(map[netip.Addr]bool, len(kept))
	for _, p := range kept {
		have[p.Addr] = true
	}
	for _, p := range desired {
		if have[p.Addr] {
			continue
		}
		if err := s.r.addPeer(ctx, &s.cfg, p); err != nil {
			errs = append(errs, err)
			continue
		}
		kept = append(kept, p)
		s.log.Info("BGP peer added", "peer", p.Addr, "asn", p.ASN)
	}
	slices.SortFunc(kept, func(a, b Peer) int { return a.Addr.Compare(b.Addr) })
	s.peers = kept
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("set peers: %w", err)
	}
	return nil
}

// PoolCommunities are communities added to the VIPs inside some prefixes (one VIP
// pool's), on top of Config.Communities.
type PoolCommunities struct {
	Prefixes []netip.Prefix
	// Communities are "ASN:VALUE" or well-known names, as Config.Communities.
	Communities []string
	// LargeCommunities are "ASN:DATA1:DATA2" (RFC 8092).
	LargeCommunities []string
}

type poolCommunities struct {
	prefixes    []netip.Prefix
	communities []uint32
	large       [][3]uint32
}

// SetPoolCommunities sets the communities of the VIPs by pool and re-announces every
// VIP whose attributes change, which replaces its route at the peers (no withdrawal
// in between). An invalid list is refused whole, changing nothing.
func (s *Speaker) SetPoolCommunities(ctx context.Context, pools []PoolCommunities) error {
	parsed := make([]poolCommunities, 0, len(pools))
	for _, p := range pools {
		cs, err := parseCommunities(p.Communities)
		if err != nil {
			return fmt.Errorf("set pool communities: %w", err)
		}
		pc := poolCommunities{prefixes: slices.Clone(p.Prefixes), communities: cs}
		for _, l := range p.LargeCommunities {
			v, err := parseLargeCommunity(l)
			if err != nil {
				return fmt.Errorf("set pool communities: %w", err)
			}
			pc.large = append(pc.large, v)
		}
		parsed = append(parsed, pc)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return ErrStopped
	}
	s.pools = parsed
	var announce []route
	for p, cur := range s.applied {
		if rt := s.routeFor(p, cur.adv); !rt.Attrs.equal(cur.route.Attrs) {
			announce = append(announce, rt)
		}
	}
	if len(announce) == 0 {
		return nil
	}
	slices.SortFunc(announce, func(a, b route) int { return a.Prefix.Addr().Compare(b.Prefix.Addr()) })
	if err := s.r.announce(announce); err != nil {
		return fmt.Errorf("set pool communities: %w", err)
	}
	for _, rt := range announce {
		s.applied[rt.Prefix] = applied{adv: s.applied[rt.Prefix].adv, route: rt}
	}
	s.log.Info("VIP communities changed", "reannounced", len(announce))
	return nil
}

// routeFor is the route of one advertisement: the role's attributes, the speaker's
// communities and those of every pool holding the VIP, sorted and without repeats.
// Called with s.mu held.
func (s *Speaker) routeFor(p netip.Prefix, a shard.Advertisement) route {
	cs := slices.Clone(s.communities)
	var large [][3]uint32
	for _, pc := range s.pools {
		if slices.ContainsFunc(pc.prefixes, func(pool netip.Prefix) bool { return pool.Contains(p.Addr()) }) {
			cs = append(cs, pc.communities...)
			large = append(large, pc.large...)
		}
	}
	if len(s.pools) > 0 {
		slices.Sort(cs)
		cs = slices.Compact(cs)
		slices.SortFunc(large, func(a, b [3]uint32) int { return slices.Compare(a[:], b[:]) })
		large = slices.Compact(large)
	}
	at := s.cfg.attrsFor(p, a.Role, a.Successor, cs)
	at.LargeCommunities = large
	return route{Prefix: p, Attrs: at}
}

// peerEqual reports whether two peer settings give the same session.
func peerEqual(a, b Peer) bool {
	if (a.BFD == nil) != (b.BFD == nil) || a.BFD != nil && *a.BFD != *b.BFD {
		return false
	}
	a.BFD, b.BFD = nil, nil
	return a == b
}

// peerCount is the number of configured peers.
func (s *Speaker) peerCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.peers)
}

// SetAdvertisements makes the announced VIPs exactly desired. A prefix whose role
// changed is re-announced with the new attributes, which replaces the old route at
// the peers (no withdrawal in between); prefixes not in desired are withdrawn. An
// invalid desired set is refused whole, changing nothing.
func (s *Speaker) SetAdvertisements(ctx context.Context, desired []shard.Advertisement) error {
	want := make(map[netip.Prefix]shard.Advertisement, len(desired))
	for _, a := range desired {
		if !a.Prefix.IsValid() || a.Prefix.Bits() != a.Prefix.Addr().BitLen() {
			return fmt.Errorf("set advertisements: %v is not a host prefix (/32 or /128)", a.Prefix)
		}
		if prev, ok := want[a.Prefix]; ok {
			return fmt.Errorf("set advertisements: %v listed twice (%v and %v)", a.Prefix, prev.Role, a.Role)
		}
		want[a.Prefix] = a
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("set advertisements: %w", err)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return ErrStopped
	}
	var announce, withdraw []route
	for p, a := range want {
		rt := s.routeFor(p, a)
		if cur, ok := s.applied[p]; ok && cur.route.Attrs.equal(rt.Attrs) {
			s.applied[p] = applied{adv: a, route: cur.route}
			continue
		}
		announce = append(announce, rt)
	}
	for p, cur := range s.applied {
		if _, ok := want[p]; !ok {
			withdraw = append(withdraw, cur.route)
		}
	}
	slices.SortFunc(announce, func(a, b route) int { return a.Prefix.Addr().Compare(b.Prefix.Addr()) })
	slices.SortFunc(withdraw, func(a, b route) int { return a.Prefix.Addr().Compare(b.Prefix.Addr()) })

	if len(announce) > 0 && s.unsent == nil {
		// Flush waits for these routes to leave. An older snapshot still waiting
		// is kept: it is the stricter one of the two.
		if before, err := s.r.peers(ctx, false); err == nil {
			s.unsent = before
		}
	}
	// Record what reached GoBGP even on a partial failure, so the next call retries
	// only the rest.
	err := s.r.announce(announce)
	if err == nil {
		for _, rt := range announce {
			s.applied[rt.Prefix] = applied{adv: want[rt.Prefix], route: rt}
		}
	}
	if werr := s.r.withdraw(withdraw); werr == nil {
		for _, rt := range withdraw {
			delete(s.applied, rt.Prefix)
		}
	} else {
		err = errors.Join(err, werr)
	}
	if err != nil {
		return fmt.Errorf("set advertisements: %w", err)
	}
	if len(announce)+len(withdraw) > 0 {
		s.log.Debug("advertisements changed", "announced", len(announce), "withdrawn", len(withdraw), "total", len(s.applied))
	}
	return nil
}

// Advertised returns what is announced now, sorted by prefix.
func (s *Speaker) Advertised() []shard.Advertisement {
	s.mu.Lock()
	out := make([]shard.Advertisement, 0, len(s.applied))
	for _, a := range s.applied {
		out = append(out, a.adv)
	}
	s.mu.Unlock()
	slices.SortFunc(out, func(a, b shard.Advertisement) int { return a.Prefix.Addr().Compare(b.Prefix.Addr()) })
	return out
}

// Peers returns the state of every configured peer, sorted by address.
func (s *Speaker) Peers() []PeerStatus {
	s.mu.Lock()
	stopped := s.stopped
	s.mu.Unlock()
	if stopped {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ps, err := s.r.peers(ctx, true)
	if err != nil {
		s.log.Warn("cannot list BGP peers", "err", err)
		return nil
	}
	slices.SortFunc(ps, func(a, b PeerStatus) int { return a.Addr.Compare(b.Addr) })
	return ps
}

// ErrNotAnnouncing is Flush's answer when no session is established: routes set reach
// no router.
var ErrNotAnnouncing = errors.New("no BGP session is established")

// Announcing reports whether this node's routes reach the upstream routers, so that
// it may take mastership: without peers it is always true; with peers, every session
// must be established, or, once the speaker has run for Config.PeerWait, at least one
// (a router down for maintenance must not keep the node from mastering forever).
// A node that restarts is thus not handed an instance before its sessions are up,
// which would leave the routers with no master route and spread the VIP over the
// backups, which do not know the connections in flight.
func (s *Speaker) Announcing() bool {
	n := s.peerCount()
	if n == 0 {
		return true
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ps, err := s.r.peers(ctx, false)
	if err != nil {
		return false
	}
	up := 0
	for _, p := range ps {
		if p.Established {
			up++
		}
	}
	return up >= n || up > 0 && time.Since(s.started) >= s.cfg.PeerWait
}

// Flush returns once the routes announced by SetAdvertisements have been sent on
// every session that was established when they were set, waiting at most
// Config.ShutdownFlush for a session whose counters do not move (a route of a family
// the peer did not negotiate sends nothing). It returns ErrNotAnnouncing when peers
// are configured and none is established: nothing set reached a router.
func (s *Speaker) Flush(ctx context.Context) error {
	if s.peerCount() == 0 {
		return nil
	}
	s.mu.Lock()
	before, stopped := s.unsent, s.stopped
	s.mu.Unlock()
	if stopped {
		return ErrStopped
	}
	if before != nil {
		s.waitFlushed(ctx, before, true)
	}
	now, err := s.r.peers(ctx, false)
	if err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	if !slices.ContainsFunc(now, func(p PeerStatus) bool { return p.Established }) {
		return ErrNotAnnouncing
	}
	s.mu.Lock()
	if slices.Equal(s.unsent, before) {
		s.unsent = nil
	}
	s.mu.Unlock()
	return nil
}

// Shutdown withdraws every VIP, waits (at most Config.ShutdownFlush, or until ctx
// ends) for the withdrawals to leave on every established session, then closes the
// sessions and stops the speaker. Routers then move traffic on the withdrawal
// rather than on a hold timer.
func (s *Speaker) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return nil
	}
	s.stopped = true
	var errs []error
	if len(s.applied) > 0 {
		before, err := s.r.peers(ctx, true)
		if err != nil {
			errs = append(errs, err)
		}
		routes := make([]route, 0, len(s.applied))
		for _, a := range s.applied {
			routes = append(routes, a.route)
		}
		if err := s.r.withdraw(routes); err != nil {
			errs = append(errs, err)
		} else {
			s.applied = make(map[netip.Prefix]applied)
			s.waitFlushed(ctx, before, false)
		}
	}
	if err := s.r.stop(ctx, false); err != nil {
		errs = append(errs, err)
	}
	s.log.Info("BGP speaker stopped")
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("bgp shutdown: %w", err)
	}
	return nil
}

// waitFlushed waits until every session that was established has sent an UPDATE
// since before and has an empty output queue. For a withdrawal (announced false) only
// the sessions that carried prefixes have something to send.
func (s *Speaker) waitFlushed(ctx context.Context, before []PeerStatus, announced bool) {
	sent := make(map[netip.Addr]uint64)
	for _, p := range before {
		if p.Established && (announced || p.PrefixesSent > 0) {
			sent[p.Addr] = p.updatesSent
		}
	}
	if len(sent) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.ShutdownFlush)
	defer cancel()
	for {
		now, err := s.r.peers(ctx, false)
		if err != nil {
			return
		}
		pending := 0
		for _, p := range now {
			if n, ok := sent[p.Addr]; ok && p.Established && (p.updatesSent <= n || p.outQueue > 0) {
				pending++
			}
		}
		if pending == 0 {
			return
		}
		select {
		case <-ctx.Done():
			s.log.Warn("BGP updates not sent in time", "peers", pending)
			return
		case <-time.After(5 * time.Millisecond):
		}
	}
}
