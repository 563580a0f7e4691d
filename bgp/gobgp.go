package bgp

// This file is the only one that speaks GoBGP: it converts the package's own types
// to GoBGP's API and back, so no GoBGP or protobuf type leaves it.

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/osrg/gobgp/v4/api"
	"github.com/osrg/gobgp/v4/pkg/apiutil"
	"github.com/osrg/gobgp/v4/pkg/packet/bgp"
	"github.com/osrg/gobgp/v4/pkg/server"
)

// router is what the Speaker needs from a BGP implementation.
type router interface {
	// addPeer adds a peer, which is dialled at once; deletePeer closes its session
	// (Cease) and forgets it. Neither touches the other sessions.
	addPeer(ctx context.Context, cfg *Config, p Peer) error
	deletePeer(ctx context.Context, cfg *Config, p Peer) error
	// announce adds the routes, replacing any announcement of the same prefix.
	announce(routes []route) error
	withdraw(routes []route) error
	// peers lists the sessions; counting the prefixes sent (advertised) costs a
	// walk of the RIB per peer.
	peers(ctx context.Context, advertised bool) ([]PeerStatus, error)
	// stop closes every session and stops the speaker; with keepRoutes the sessions
	// that negotiated graceful restart close without a NOTIFICATION.
	stop(ctx context.Context, keepRoutes bool) error
}

const (
	ebgpPeerSet       = "shardlb-ebgp-peers"
	exportPolicy      = "shardlb-export"
	acceptLocalPolicy = "shardlb-accept-own-vips"
	// The VIP prefix sets, one per family: GoBGP's prefix set holds one family.
	vipSet4 = "shardlb-vips-v4"
	vipSet6 = "shardlb-vips-v6"
)

type gobgpRouter struct {
	srv       *server.BgpServer
	log       *slog.Logger
	stopWatch context.CancelFunc
	pools     []netip.Prefix
	// quiet drops GoBGP's complaint that Stop found BGP already stopped, after a
	// stop that kept the routes.
	quiet atomic.Bool

	mu sync.Mutex
	// outside are the announced VIPs outside every pool (static IPs), each in its VIP
	// set for as long as it is announced.
	outside map[netip.Prefix]bool
}

// startGoBGP starts an embedded GoBGP with cfg's global settings, policies and peers.
func startGoBGP(ctx context.Context, cfg *Config, log *slog.Logger) (*gobgpRouter, error) {
	lvl := new(slog.LevelVar)
	// GoBGP logs every path at debug and peer chatter at info; the speaker logs
	// session changes itself.
	lvl.Set(slog.LevelWarn)
	r := &gobgpRouter{log: log, pools: cfg.Pools, outside: make(map[netip.Prefix]bool)}
	glog := slog.New(&quietHandler{Handler: log.With("component", "gobgp").Handler(), quiet: &r.quiet})
	opts := []server.ServerOption{server.LoggerOption(glog, lvl)}
	if cfg.GRPCListen != "" {
		opts = append(opts, server.GrpcListenAddress(cfg.GRPCListen))
	}
	srv := server.NewBgpServer(opts...)
	go srv.Serve()
	r.srv = srv

	global := &api.Global{
		Asn:        cfg.LocalASN,
		RouterId:   cfg.RouterID.String(),
		ListenPort: -1,
	}
	if cfg.ListenPort > 0 {
		global.ListenPort = cfg.ListenPort
		if cfg.LocalAddr.IsValid() {
			global.ListenAddresses = []string{cfg.LocalAddr.String()}
		}
	}
	if err := srv.StartBgp(ctx, &api.StartBgpRequest{Global: global}); err != nil {
		srv.Stop()
		return nil, fmt.Errorf("start GoBGP: %w", err)
	}
	if err := r.setPolicies(ctx, cfg); err != nil {
		srv.Stop()
		return nil, err
	}
	// The watch lives as long as the speaker, not as long as the startup ctx.
	watchCtx, stopWatch := context.WithCancel(context.Background())
	r.stopWatch = stopWatch
	if err := srv.WatchEvent(watchCtx, server.WatchEventMessageCallbacks{OnPeerUpdate: r.logPeerEvent}, server.WatchPeer()); err != nil {
		stopWatch()
		srv.Stop()
		return nil, fmt.Errorf("watch GoBGP peer events: %w", err)
	}
	for _, p := range cfg.Peers {
		if cfg.Restarting {
			break // dialled by Resume
		}
		if err := r.addPeer(ctx, cfg, p); err != nil {
			stopWatch()
			srv.Stop()
			return nil, err
		}
	}
	return r, nil
}

// quietHandler drops the error GoBGP's Stop logs when StopBgp already ran.
type quietHandler struct {
	slog.Handler
	quiet *atomic.Bool
}

func (h *quietHandler) Handle(ctx context.Context, rec slog.Record) error {
	if h.quiet.Load() && rec.Message == "failed to stop BGP server" {
		return nil
	}
	return h.Handler.Handle(ctx, rec)
}

func (h *quietHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &quietHandler{Handler: h.Handler.WithAttrs(as), quiet: h.quiet}
}

func (h *quietHandler) WithGroup(name string) slog.Handler {
	return &quietHandler{Handler: h.Handler.WithGroup(name), quiet: h.quiet}
}

// noPeer fills the eBGP peer set, which is never empty: GoBGP's neighbor condition
// matches every neighbor when its set is empty, which would prepend toward iBGP peers.
// No session has the unspecified address.
const noPeer = "0.0.0.0/32"

// isEBGP reports whether the session with p is eBGP.
func isEBGP(cfg *Config, p Peer) bool { return p.ASN != cfg.LocalASN }

// setEBGP adds p to the eBGP peer set (or removes it), so the prepend statements
// apply to it. A new peer enters the set before its session starts, so its first
// UPDATEs already carry the prepends.
func (r *gobgpRouter) setEBGP(ctx context.Context, cfg *Config, p Peer, remove bool) error {
	if !isEBGP(cfg, p) || cfg.BackupPrepend == 0 && cfg.SuccessorPrepend == 0 {
		return nil
	}
	ds := &api.DefinedSet{DefinedType: api.DefinedType_DEFINED_TYPE_NEIGHBOR, Name: ebgpPeerSet,
		List: []string{netip.PrefixFrom(p.Addr, p.Addr.BitLen()).String()}}
	var err error
	if remove {
		err = r.srv.DeleteDefinedSet(ctx, &api.DeleteDefinedSetRequest{DefinedSet: ds})
	} else {
		err = r.srv.AddDefinedSet(ctx, &api.AddDefinedSetRequest{DefinedSet: ds})
	}
	if err != nil {
		return fmt.Errorf("update eBGP peer set for %v: %w", p.Addr, err)
	}
	return nil
}

func (r *gobgpRouter) addPeer(ctx context.Context, cfg *Config, p Peer) error {
	if err := r.setEBGP(ctx, cfg, p, false); err != nil {
		return err
	}
	if err := r.srv.AddPeer(ctx, &api.AddPeerRequest{Peer: apiPeer(cfg, p)}); err != nil {
		return fmt.Errorf("add BGP peer %v: %w", p.Addr, err)
	}
	return nil
}

func (r *gobgpRouter) deletePeer(ctx context.Context, cfg *Config, p Peer) error {
	if err := r.srv.DeletePeer(ctx, &api.DeletePeerRequest{Address: p.Addr.String()}); err != nil {
		return fmt.Errorf("delete BGP peer %v: %w", p.Addr, err)
	}
	return r.setEBGP(ctx, cfg, p, true)
}

// setPolicies rejects every imported route (peers must not inject routes into a load
// balancer, and over eBGP a router reflects one speaker's VIPs to the others) and lets
// only the VIPs leave: host routes inside the pools and the speaker's own VIPs outside
// them, prepending the local AS on backup and successor announcements toward eBGP
// peers. Anything else in the RIB, such as a path added through the gRPC API, is
// rejected on export. The prepend is keyed on the role's LOCAL_PREF, which GoBGP strips
// toward eBGP peers only after the export policy ran.
func (r *gobgpRouter) setPolicies(ctx context.Context, cfg *Config) error {
	// GoBGP's global import policy also filters the speaker's own paths on their
	// way into the RIB: accept those, reject the rest.
	err := r.srv.AddPolicy(ctx, &api.AddPolicyRequest{Policy: &api.Policy{
		Name: acceptLocalPolicy,
		Statements: []*api.Statement{{
			Name:       acceptLocalPolicy,
			Conditions: &api.Conditions{RouteType: api.Conditions_ROUTE_TYPE_LOCAL},
			Actions:    &api.Actions{RouteAction: api.RouteAction_ROUTE_ACTION_ACCEPT},
		}},
	}})
	if err == nil {
		err = r.srv.SetPolicyAssignment(ctx, &api.SetPolicyAssignmentRequest{Assignment: &api.PolicyAssignment{
			Name:          "global",
			Direction:     api.PolicyDirection_POLICY_DIRECTION_IMPORT,
			Policies:      []*api.Policy{{Name: acceptLocalPolicy}},
			DefaultAction: api.RouteAction_ROUTE_ACTION_REJECT,
		}})
	}
	if err != nil {
		return fmt.Errorf("set reject-all import policy: %w", err)
	}

	for _, set := range []string{vipSet4, vipSet6} {
		var prefixes []*api.Prefix
		for _, p := range cfg.Pools {
			if vipSet(p) == set {
				prefixes = append(prefixes, hostRoutesIn(p))
			}
		}
		// An empty set matches no path: nothing of that family leaves but the
		// speaker's own VIPs, added as they are announced.
		err := r.srv.AddDefinedSet(ctx, &api.AddDefinedSetRequest{DefinedSet: &api.DefinedSet{
			DefinedType: api.DefinedType_DEFINED_TYPE_PREFIX,
			Name:        set,
			Prefixes:    prefixes,
		}})
		if err != nil {
			return fmt.Errorf("define VIP prefix set %s: %w", set, err)
		}
	}

	// Statement order: the prepends carry no route action, so every path goes on to
	// the VIP sets; a path in neither is rejected by the default action. A prepend
	// statement that accepted would let any path with a backup's LOCAL_PREF out to
	// eBGP peers, and a first statement rejecting what is not in a set cannot be
	// written: GoBGP's prefix condition never matches a path of another family, even
	// inverted.
	//
	// The eBGP peer set starts with noPeer alone; addPeer and deletePeer keep it, so
	// peers added later get their prepends too.
	var statements []*api.Statement
	if cfg.BackupPrepend > 0 || cfg.SuccessorPrepend > 0 {
		err = r.srv.AddDefinedSet(ctx, &api.AddDefinedSetRequest{DefinedSet: &api.DefinedSet{
			DefinedType: api.DefinedType_DEFINED_TYPE_NEIGHBOR,
			Name:        ebgpPeerSet,
			List:        []string{noPeer},
		}})
		if err != nil {
			return fmt.Errorf("define eBGP peer set: %w", err)
		}
		// Backups and successors, told apart by their LOCAL_PREF, get their prepends.
		for _, st := range []struct {
			name   string
			lp     uint32
			repeat uint8
		}{{"shardlb-backup-prepend", cfg.LocalPrefBackup, cfg.BackupPrepend}, {"shardlb-successor-prepend", cfg.LocalPrefSuccessor, cfg.SuccessorPrepend}} {
			if st.repeat == 0 {
				continue
			}
			statements = append(statements, &api.Statement{
				Name: st.name,
				Conditions: &api.Conditions{
					NeighborSet: &api.MatchSet{Type: api.MatchSet_TYPE_ANY, Name: ebgpPeerSet},
					LocalPrefEq: &api.LocalPrefEq{Value: st.lp},
				},
				Actions: &api.Actions{AsPrepend: &api.AsPrependAction{Asn: cfg.LocalASN, Repeat: uint32(st.repeat)}},
			})
		}
	}
	for _, set := range []string{vipSet4, vipSet6} {
		statements = append(statements, &api.Statement{
			Name:       "shardlb-accept-" + strings.TrimPrefix(set, "shardlb-"),
			Conditions: &api.Conditions{PrefixSet: &api.MatchSet{Type: api.MatchSet_TYPE_ANY, Name: set}},
			Actions:    &api.Actions{RouteAction: api.RouteAction_ROUTE_ACTION_ACCEPT},
		})
	}
	err = r.srv.AddPolicy(ctx, &api.AddPolicyRequest{Policy: &api.Policy{
		Name:       exportPolicy,
		Statements: statements,
	}})
	if err != nil {
		return fmt.Errorf("add export policy: %w", err)
	}
	err = r.srv.SetPolicyAssignment(ctx, &api.SetPolicyAssignmentRequest{Assignment: &api.PolicyAssignment{
		Name:          "global",
		Direction:     api.PolicyDirection_POLICY_DIRECTION_EXPORT,
		Policies:      []*api.Policy{{Name: exportPolicy}},
		DefaultAction: api.RouteAction_ROUTE_ACTION_REJECT,
	}})
	if err != nil {
		return fmt.Errorf("set export policy: %w", err)
	}
	return nil
}

// vipSet names the VIP prefix set of p's family.
func vipSet(p netip.Prefix) string {
	if p.Addr().Is4() {
		return vipSet4
	}
	return vipSet6
}

// hostRoutesIn is a prefix set entry matching the host routes inside p only.
func hostRoutesIn(p netip.Prefix) *api.Prefix {
	bits := uint32(p.Addr().BitLen())
	return &api.Prefix{IpPrefix: p.Masked().String(), MaskLengthMin: bits, MaskLengthMax: bits}
}

// inPools reports whether the host prefix p lies inside a pool.
func (r *gobgpRouter) inPools(p netip.Prefix) bool {
	for _, pool := range r.pools {
		if pool.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

// setOutside adds the VIPs ps, all outside the pools, to their VIP sets or, with
// remove, takes them out.
func (r *gobgpRouter) setOutside(ps []netip.Prefix, remove bool) error {
	sets := make(map[string][]*api.Prefix)
	for _, p := range ps {
		sets[vipSet(p)] = append(sets[vipSet(p)], hostRoutesIn(p))
	}
	ctx := context.Background()
	for name, prefixes := range sets {
		ds := &api.DefinedSet{DefinedType: api.DefinedType_DEFINED_TYPE_PREFIX, Name: name, Prefixes: prefixes}
		var err error
		if remove {
			err = r.srv.DeleteDefinedSet(ctx, &api.DeleteDefinedSetRequest{DefinedSet: ds})
		} else {
			err = r.srv.AddDefinedSet(ctx, &api.AddDefinedSetRequest{DefinedSet: ds})
		}
		if err != nil {
			return fmt.Errorf("update VIP prefix set %s: %w", name, err)
		}
	}
	return nil
}

func seconds(d time.Duration) uint64 {
	return uint64((d + time.Second - 1) / time.Second)
}

func apiPeer(cfg *Config, p Peer) *api.Peer {
	families := []*api.AfiSafi{
		{Config: &api.AfiSafiConfig{Enabled: true, Family: &api.Family{Afi: api.Family_AFI_IP, Safi: api.Family_SAFI_UNICAST}}},
		{Config: &api.AfiSafiConfig{Enabled: true, Family: &api.Family{Afi: api.Family_AFI_IP6, Safi: api.Family_SAFI_UNICAST}}},
	}
	ap := &api.Peer{
		Conf: &api.PeerConf{
			NeighborAddress: p.Addr.String(),
			PeerAsn:         p.ASN,
			AuthPassword:    p.Password,
		},
		Timers: &api.Timers{Config: &api.TimersConfig{
			HoldTime:               seconds(cmp.Or(p.HoldTime, cfg.HoldTime)),
			KeepaliveInterval:      seconds(cmp.Or(p.KeepaliveInterval, cfg.KeepaliveInterval)),
			ConnectRetry:           seconds(cfg.ConnectRetry),
			IdleHoldTimeAfterReset: seconds(cfg.IdleHoldAfterReset),
		}},
		Transport: &api.Transport{PassiveMode: false},
		AfiSafis:  families,
	}
	if p.Port != 0 {
		ap.Transport.RemotePort = uint32(p.Port)
	}
	if p.LocalAddr.IsValid() {
		ap.Transport.LocalAddress = p.LocalAddr.String()
	} else if cfg.LocalAddr.IsValid() && cfg.LocalAddr.Is4() == p.Addr.Is4() {
		ap.Transport.LocalAddress = cfg.LocalAddr.String()
	}
	if p.ASN != cfg.LocalASN {
		if ttl := p.MultiHopTTL; ttl != 0 {
			ap.EbgpMultihop = &api.EbgpMultihop{Enabled: true, MultihopTtl: uint32(ttl)}
		} else if cfg.EBGPMultiHop {
			ap.EbgpMultihop = &api.EbgpMultihop{Enabled: true, MultihopTtl: uint32(cfg.EBGPMultiHopTTL)}
		}
	}
	bfd := cfg.BFD
	if p.BFD != nil {
		bfd = *p.BFD
	}
	if cfg.GracefulRestart > 0 {
		// RFC 4724 with RFC 8538's N bit: a session lost without a NOTIFICATION, or
		// closed with one other than Hard Reset, keeps this speaker's routes at the
		// router for the restart time; GoBGP turns the Cease of a deleted peer or a
		// stopped server into a Hard Reset, which withdraws them at once. A restarting
		// speaker sets the R and F bits and defers its first UPDATE until the peer's
		// End-of-RIB (at most DeferralTime), then ends it with its own End-of-RIB.
		ap.GracefulRestart = &api.GracefulRestart{
			Enabled:             true,
			RestartTime:         uint32(cfg.GracefulRestart / time.Second),
			NotificationEnabled: true,
			LocalRestarting:     cfg.Restarting,
			DeferralTime:        uint32(grDeferral / time.Second),
		}
		for _, f := range families {
			f.MpGracefulRestart = &api.MpGracefulRestart{Config: &api.MpGracefulRestartConfig{Enabled: true}}
		}
	}
	if bfd.Enabled {
		ap.Bfd = &api.BfdPeerConfig{
			Enabled:                  true,
			DesiredMinimumTxInterval: uint32(bfd.Interval / time.Microsecond),
			RequiredMinimumReceive:   uint32(cmp.Or(bfd.Receive, bfd.Interval) / time.Microsecond),
			DetectionMultiplier:      uint32(bfd.Multiplier),
		}
	}
	return ap
}

func (r *gobgpRouter) logPeerEvent(ev *apiutil.WatchEventMessage_PeerEvent, _ time.Time) {
	if ev.Type != apiutil.PEER_EVENT_STATE {
		return
	}
	st := ev.Peer.State
	args := []any{"peer", ev.Peer.Conf.NeighborAddress, "asn", st.PeerASN, "state", sessionState(st.SessionState)}
	if st.SessionState == bgp.BGP_FSM_ESTABLISHED {
		r.log.Info("BGP session established", args...)
		return
	}
	if reason := disconnectReason(st.DisconnectReason, st.DisconnectMessage); reason != "" {
		args = append(args, "reason", reason)
	}
	r.log.Info("BGP session state changed", args...)
}

func sessionState(s bgp.FSMState) string {
	switch s {
	case bgp.BGP_FSM_IDLE:
		return "idle"
	case bgp.BGP_FSM_CONNECT:
		return "connect"
	case bgp.BGP_FSM_ACTIVE:
		return "active"
	case bgp.BGP_FSM_OPENSENT:
		return "opensent"
	case bgp.BGP_FSM_OPENCONFIRM:
		return "openconfirm"
	case bgp.BGP_FSM_ESTABLISHED:
		return "established"
	}
	return "unknown"
}

func apiSessionState(s api.PeerState_SessionState) string {
	if s == api.PeerState_SESSION_STATE_UNSPECIFIED {
		return "unknown"
	}
	return strings.ToLower(strings.TrimPrefix(s.String(), "SESSION_STATE_"))
}

func disconnectReason(r api.PeerState_DisconnectReason, msg string) string {
	if r == api.PeerState_DISCONNECT_REASON_UNSPECIFIED {
		return msg
	}
	s := strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(r.String(), "DISCONNECT_REASON_"), "_", " "))
	if msg != "" {
		s += ": " + msg
	}
	return s
}

func bfdState(s api.BfdSessionState) string {
	switch s {
	case api.BfdSessionState_BFD_SESSION_STATE_UP:
		return "up"
	case api.BfdSessionState_BFD_SESSION_STATE_DOWN:
		return "down"
	case api.BfdSessionState_BFD_SESSION_STATE_INIT:
		return "init"
	case api.BfdSessionState_BFD_SESSION_STATE_ADMIN_DOWN:
		return "admin-down"
	}
	return ""
}

// apiPath converts one route; withdraw paths carry the same attributes because
// GoBGP wants a next hop on every path it is given.
func apiPath(rt route, withdraw bool) (*apiutil.Path, error) {
	nlri, err := bgp.NewIPAddrPrefix(rt.Prefix)
	if err != nil {
		return nil, fmt.Errorf("prefix %v: %w", rt.Prefix, err)
	}
	family := bgp.RF_IPv4_UC
	var nh bgp.PathAttributeInterface
	if rt.Prefix.Addr().Is4() && rt.Attrs.NextHop.Is4() {
		nh, err = bgp.NewPathAttributeNextHop(rt.Attrs.NextHop)
	} else {
		if rt.Prefix.Addr().Is6() {
			family = bgp.RF_IPv6_UC
		}
		nh, err = bgp.NewPathAttributeMpReachNLRI(family, []bgp.PathNLRI{{NLRI: nlri}}, rt.Attrs.NextHop)
	}
	if err != nil {
		return nil, fmt.Errorf("next hop %v for %v: %w", rt.Attrs.NextHop, rt.Prefix, err)
	}
	attrs := []bgp.PathAttributeInterface{
		bgp.NewPathAttributeOrigin(bgp.BGP_ORIGIN_ATTR_TYPE_IGP),
		nh,
		bgp.NewPathAttributeLocalPref(rt.Attrs.LocalPref),
		bgp.NewPathAttributeMultiExitDisc(rt.Attrs.MED),
	}
	if len(rt.Attrs.Communities) > 0 {
		attrs = append(attrs, bgp.NewPathAttributeCommunities(rt.Attrs.Communities))
	}
	if len(rt.Attrs.LargeCommunities) > 0 {
		lcs := make([]*bgp.LargeCommunity, 0, len(rt.Attrs.LargeCommunities))
		for _, c := range rt.Attrs.LargeCommunities {
			lcs = append(lcs, bgp.NewLargeCommunity(c[0], c[1], c[2]))
		}
		attrs = append(attrs, bgp.NewPathAttributeLargeCommunities(lcs))
	}
	return &apiutil.Path{
		Family:     family,
		Nlri:       nlri,
		Attrs:      attrs,
		Age:        time.Now().Unix(),
		Withdrawal: withdraw,
	}, nil
}

func apiPaths(routes []route, withdraw bool) ([]*apiutil.Path, error) {
	paths := make([]*apiutil.Path, 0, len(routes))
	for _, rt := range routes {
		p, err := apiPath(rt, withdraw)
		if err != nil {
			return nil, err
		}
		paths = append(paths, p)
	}
	return paths, nil
}

// announce adds the routes; a VIP outside the pools enters its VIP set first, so the
// export policy lets its path out.
func (r *gobgpRouter) announce(routes []route) error {
	if len(routes) == 0 {
		return nil
	}
	paths, err := apiPaths(routes, false)
	if err != nil {
		return fmt.Errorf("announce: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var outside []netip.Prefix
	for _, rt := range routes {
		if !r.outside[rt.Prefix] && !r.inPools(rt.Prefix) {
			outside = append(outside, rt.Prefix)
		}
	}
	if err := r.setOutside(outside, false); err != nil {
		return fmt.Errorf("announce: %w", err)
	}
	for _, p := range outside {
		r.outside[p] = true
	}
	resps, err := r.srv.AddPath(apiutil.AddPathRequest{Paths: paths})
	if err != nil {
		err = fmt.Errorf("announce %d routes: %w", len(routes), err)
	}
	for i, resp := range resps {
		if resp.Error != nil {
			err = fmt.Errorf("announce %v: %w", routes[i].Prefix, resp.Error)
			break
		}
	}
	if err != nil {
		// The Speaker records none of this call and retries it whole: until then the
		// VIPs outside the pools leave their sets, so a path that GoBGP took but the
		// Speaker may never withdraw does not leave either.
		if rerr := r.setOutside(outside, true); rerr == nil {
			for _, p := range outside {
				delete(r.outside, p)
			}
		}
		return err
	}
	return nil
}

// withdraw deletes the routes, then takes the VIPs outside the pools out of their
// sets (a withdrawal passes the export policy whatever the sets hold).
func (r *gobgpRouter) withdraw(routes []route) error {
	if len(routes) == 0 {
		return nil
	}
	paths, err := apiPaths(routes, true)
	if err != nil {
		return fmt.Errorf("withdraw: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.srv.DeletePath(apiutil.DeletePathRequest{Paths: paths}); err != nil {
		return fmt.Errorf("withdraw %d routes: %w", len(routes), err)
	}
	var outside []netip.Prefix
	for _, rt := range routes {
		if r.outside[rt.Prefix] {
			outside = append(outside, rt.Prefix)
		}
	}
	if err := r.setOutside(outside, true); err != nil {
		return fmt.Errorf("withdraw: %w", err)
	}
	for _, p := range outside {
		delete(r.outside, p)
	}
	return nil
}

func (r *gobgpRouter) peers(ctx context.Context, advertised bool) ([]PeerStatus, error) {
	var out []PeerStatus
	err := r.srv.ListPeer(ctx, &api.ListPeerRequest{EnableAdvertised: advertised}, func(p *api.Peer) {
		out = append(out, peerStatus(p))
	})
	if err != nil {
		return nil, fmt.Errorf("list BGP peers: %w", err)
	}
	return out, nil
}

func peerStatus(p *api.Peer) PeerStatus {
	var ps PeerStatus
	if p.Conf != nil {
		ps.Addr, _ = netip.ParseAddr(p.Conf.NeighborAddress)
		ps.ASN = p.Conf.PeerAsn
	}
	if st := p.State; st != nil {
		ps.State = apiSessionState(st.SessionState)
		ps.Established = st.SessionState == api.PeerState_SESSION_STATE_ESTABLISHED
		ps.LastError = disconnectReason(st.DisconnectReason, st.DisconnectMessage)
		if st.BfdState != nil {
			ps.BFD = bfdState(st.BfdState.SessionState)
		}
		if m := st.Messages; m != nil && m.Sent != nil {
			ps.updatesSent = m.Sent.Update
		}
		ps.outQueue = st.OutQ
	}
	if t := p.Timers; t != nil && t.State != nil {
		if ps.Established && t.State.Uptime != nil {
			ps.Since = t.State.Uptime.AsTime()
		}
		if t.State.Downtime != nil && t.State.Downtime.AsTime().Unix() > 0 {
			ps.LastDown = t.State.Downtime.AsTime()
		}
	}
	for _, af := range p.AfiSafis {
		if af.State != nil {
			ps.PrefixesSent += int(af.State.Advertised)
			ps.PrefixesReceived += int(af.State.Received)
		}
	}
	return ps
}

// grDeferral bounds how long a restarting speaker waits for its peers' End-of-RIB
// before sending its routes: FRR sends its own at once, and a peer that never does
// must not keep the routers on stale routes for long.
const grDeferral = 5 * time.Second

func (r *gobgpRouter) stop(ctx context.Context, keepRoutes bool) error {
	r.stopWatch()
	done := make(chan struct{})
	go func() {
		if keepRoutes {
			// The sessions of peers that negotiated graceful restart are closed
			// without a NOTIFICATION: they keep this speaker's routes, stale, for
			// the restart time. Stop's own StopBgp then finds nothing running.
			r.quiet.Store(true)
			if err := r.srv.StopBgp(context.WithoutCancel(ctx), &api.StopBgpRequest{AllowGracefulRestart: true}); err != nil {
				r.log.Warn("stop GoBGP for a graceful restart", "err", err)
			}
		}
		// Stop sends a Cease NOTIFICATION to every peer still there, then closes the
		// BFD and gRPC servers.
		r.srv.Stop()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("stop GoBGP: %w", ctx.Err())
	}
}
