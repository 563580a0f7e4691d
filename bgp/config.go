package bgp

import (
	"bufio"
	"cmp"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"
)

// Peer is one upstream router the speaker keeps a session with.
type Peer struct {
	Addr netip.Addr
	ASN  uint32
	// Port is the peer's BGP port; 0 means 179.
	Port uint16
	// Password enables TCP MD5 (RFC 2385) on the session. Set it from
	// Config.PasswordFile rather than from a flag, so it never shows in a process list.
	Password string
	// MultiHopTTL overrides Config.EBGPMultiHop for this peer when non-zero.
	MultiHopTTL uint8
	// LocalAddr is the session's source address; unset: Config.LocalAddr.
	LocalAddr netip.Addr
	// HoldTime and KeepaliveInterval override Config's when non-zero.
	HoldTime, KeepaliveInterval time.Duration
	// BFD overrides Config.BFD for this peer when set.
	BFD *BFDConfig
}

// BFDConfig turns on BFD for every peer.
type BFDConfig struct {
	Enabled bool
	// Interval is the desired transmit interval and, unless Receive is set, the
	// required receive interval.
	Interval   time.Duration
	Multiplier uint8
	// Receive is the required minimum receive interval; 0: Interval.
	Receive time.Duration
}

func (b BFDConfig) validate() error {
	if !b.Enabled {
		return nil
	}
	if b.Interval < 10*time.Millisecond || b.Interval > time.Minute {
		return fmt.Errorf("BFD interval %v: want 10ms to 1m", b.Interval)
	}
	if b.Receive != 0 && (b.Receive < 10*time.Millisecond || b.Receive > time.Minute) {
		return fmt.Errorf("BFD receive interval %v: want 10ms to 1m", b.Receive)
	}
	if b.Multiplier == 0 {
		return fmt.Errorf("BFD multiplier: must be at least 1")
	}
	return nil
}

// Config is everything the speaker needs; DefaultConfig fills in the defaults.
type Config struct {
	LocalASN uint32
	// RouterID is the BGP identifier, usually the node's IPv4 address.
	RouterID netip.Addr
	// LocalAddr is the source address of the sessions and, when ListenPort is set,
	// the address listened on. Unset: the kernel picks the source, listening on all.
	LocalAddr netip.Addr
	// NextHop4 and NextHop6 are the next hops announced for the VIPs. Unset: the
	// session's local address (next hop self). An IPv6 VIP over an IPv4 session
	// needs NextHop6.
	NextHop4, NextHop6 netip.Addr
	// ListenPort is the TCP port for incoming sessions; 0 dials out only.
	ListenPort int32
	Peers      []Peer
	// EBGPMultiHop allows eBGP peers that are not directly connected, with a TTL of
	// EBGPMultiHopTTL.
	EBGPMultiHop    bool
	EBGPMultiHopTTL uint8
	// HoldTime and KeepaliveInterval are proposed to peers in whole seconds (hold
	// at least 3 s); the session uses the smaller hold time of the two sides.
	HoldTime          time.Duration
	KeepaliveInterval time.Duration
	// ConnectRetry is how long to wait between attempts to reach a peer that is down.
	ConnectRetry time.Duration
	// IdleHoldAfterReset is how long a peer stays idle after BFD or the hold timer
	// reset it, before reconnecting; GoBGP's own default of 30 s would keep a healed
	// link down for half a minute.
	IdleHoldAfterReset time.Duration
	BFD                BFDConfig
	// PasswordFile holds TCP MD5 passwords, typically a mounted Secret. Each line is
	// either "PEER-IP PASSWORD" for one peer or a lone "PASSWORD" used for every peer
	// not listed; blank lines and lines starting with # are ignored. Passwords
	// cannot contain whitespace. Empty: no file.
	PasswordFile string
	// Communities are added to every announcement: "ASN:VALUE" (16 bits each) or
	// one of no-export, no-advertise, no-export-subconfed, blackhole.
	Communities []string
	// Attributes by role (see DESIGN.md). RoleEqual announces the master's
	// LOCAL_PREF and MED without prepending, so a router that also learns the VIP
	// from elsewhere ranks the load balancers as it would a master.
	LocalPrefMaster, LocalPrefBackup uint32
	MEDMaster, MEDBackup             uint32
	// BackupPrepend is how many extra times the local AS is prepended toward eBGP
	// peers on backup announcements.
	BackupPrepend uint8
	// The successor of an instance (shard.Advertisement.Successor: the backup that
	// takes over if the master fails) is announced between master and backup:
	// LOCAL_PREF and MED between theirs, fewer prepends than a backup, so a router
	// that loses the master falls back to exactly the member that becomes master.
	LocalPrefSuccessor, MEDSuccessor uint32
	SuccessorPrepend                 uint8
	// Pools are the VIP pools as prefixes (RangePrefixes turns an address range into
	// them). Only host routes inside them (/32 in IPv4 pools, /128 in IPv6 pools) and
	// the VIPs this speaker announces itself (a static IP outside every pool) leave
	// toward the peers: a path added through the gRPC API for anything else stays in
	// the speaker's RIB. Empty: only the speaker's own VIPs leave.
	Pools []netip.Prefix
	// GRPCListen is where GoBGP's gRPC API (the gobgp CLI) listens; empty disables it.
	GRPCListen string
	// ShutdownFlush bounds how long Shutdown waits for the withdrawals to leave
	// before closing the sessions.
	ShutdownFlush time.Duration
	// PeerWait is how long after start the speaker counts as announcing with some
	// peers still down (see Speaker.Announcing): long enough for every session to come
	// up on a restart, short enough that a router down for maintenance does not keep
	// the node from ever mastering.
	PeerWait time.Duration
	// GracefulRestart is the restart time advertised in the Graceful Restart
	// capability (RFC 4724, with RFC 8538's notification support) for both families:
	// how long a router keeps this speaker's routes, marked stale, after its session
	// closed without a NOTIFICATION (Suspend, or the process killed), waiting for the
	// speaker to come back and refresh them. 0: no capability, every session loss
	// withdraws at once. At most 4095 s (the capability's 12 bits).
	GracefulRestart time.Duration
	// Restarting says the speaker replaces one whose routes the routers hold stale
	// and whose forwarding state was kept (a pinned datapath): its OPEN sets the
	// Restart State bit and, per family, the Forwarding State bit, so the routers
	// keep the stale routes until its End-of-RIB; and its peers are not dialled until
	// Resume, so the first UPDATE a router gets carries the whole plan, not part of
	// it. Needs GracefulRestart.
	Restarting bool
}

// DefaultConfig returns the defaults of DESIGN.md; LocalASN, RouterID and Peers are
// left for the caller.
func DefaultConfig() Config {
	return Config{
		HoldTime:           9 * time.Second,
		KeepaliveInterval:  3 * time.Second,
		ConnectRetry:       5 * time.Second,
		IdleHoldAfterReset: time.Second,
		EBGPMultiHopTTL:    8,
		BFD:                BFDConfig{Interval: 300 * time.Millisecond, Multiplier: 3},
		LocalPrefMaster:    5000,
		LocalPrefBackup:    100,
		MEDMaster:          10,
		MEDBackup:          20,
		BackupPrepend:      3,
		LocalPrefSuccessor: 200,
		MEDSuccessor:       15,
		SuccessorPrepend:   2,
		GRPCListen:         "127.0.0.1:50051",
		ShutdownFlush:      time.Second,
		PeerWait:           30 * time.Second,
		GracefulRestart:    120 * time.Second,
	}
}

// ParsePeers parses --extBGPPeers: "IP:ASN[,IP:ASN...]", IPv6 addresses in brackets
// ("[2001:db8::1]:65000"). An empty string means no peers.
func ParsePeers(s string) ([]Peer, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	var peers []Peer
	seen := make(map[netip.Addr]string)
	for _, entry := range strings.Split(s, ",") {
		entry = strings.TrimSpace(entry)
		host, asn, err := net.SplitHostPort(entry)
		if err != nil {
			return nil, fmt.Errorf("peer %q: want IP:ASN or [IPv6]:ASN", entry)
		}
		addr, err := netip.ParseAddr(host)
		if err != nil || addr.Zone() != "" {
			return nil, fmt.Errorf("peer %q: %q is not an IP address", entry, host)
		}
		n, err := ParseASN(asn)
		if err != nil {
			return nil, fmt.Errorf("peer %q: %w", entry, err)
		}
		addr = addr.Unmap()
		if prev, ok := seen[addr]; ok {
			return nil, fmt.Errorf("peer %q: duplicate of %q", entry, prev)
		}
		seen[addr] = entry
		peers = append(peers, Peer{Addr: addr, ASN: n})
	}
	return peers, nil
}

// ParseASN parses an AS number in asplain ("4200000000") or asdot ("1.10") notation.
// 0, AS_TRANS (23456) and 4294967295 are reserved and refused.
func ParseASN(s string) (uint32, error) {
	var n uint64
	if hi, lo, ok := strings.Cut(s, "."); ok {
		h, err1 := strconv.ParseUint(hi, 10, 16)
		l, err2 := strconv.ParseUint(lo, 10, 16)
		if err1 != nil || err2 != nil {
			return 0, fmt.Errorf("AS number %q: asdot needs two numbers of 0-65535", s)
		}
		n = h<<16 | l
	} else {
		v, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			return 0, fmt.Errorf("AS number %q: not a number of 1-4294967294", s)
		}
		n = v
	}
	switch n {
	case 0:
		return 0, fmt.Errorf("AS number %q: 0 is reserved", s)
	case 23456:
		return 0, fmt.Errorf("AS number %q: 23456 is AS_TRANS, reserved", s)
	case 1<<32 - 1:
		return 0, fmt.Errorf("AS number %q: 4294967295 is reserved", s)
	}
	return uint32(n), nil
}

// validate checks the configuration as a whole, so that a bad value is one error
// before anything starts.
func (c *Config) validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.LocalASN == 0 {
		bad("local AS: not set (0 is reserved)")
	}
	if !c.RouterID.Is4() {
		bad("router ID %v: must be an IPv4 address", c.RouterID)
	}
	if c.NextHop4.IsValid() && !c.NextHop4.Is4() {
		bad("IPv4 next hop %v: not an IPv4 address", c.NextHop4)
	}
	if c.NextHop6.IsValid() && !c.NextHop6.Is6() {
		bad("IPv6 next hop %v: not an IPv6 address", c.NextHop6)
	}
	if c.ListenPort < 0 || c.ListenPort > 65535 {
		bad("listen port %d: want 0 (dial out only) to 65535", c.ListenPort)
	}
	if c.HoldTime < 3*time.Second {
		bad("hold time %v: must be at least 3s (RFC 4271)", c.HoldTime)
	}
	if c.KeepaliveInterval <= 0 || c.KeepaliveInterval >= c.HoldTime {
		bad("keepalive interval %v: must be positive and below the hold time %v", c.KeepaliveInterval, c.HoldTime)
	}
	if c.ConnectRetry < time.Second {
		bad("connect retry %v: must be at least 1s", c.ConnectRetry)
	}
	if err := c.BFD.validate(); err != nil {
		errs = append(errs, err)
	}
	if c.GracefulRestart < 0 || c.GracefulRestart > 4095*time.Second || c.GracefulRestart%time.Second != 0 {
		bad("graceful restart time %v: want whole seconds, 0 (off) to 4095s", c.GracefulRestart)
	}
	if c.Restarting && c.GracefulRestart == 0 {
		bad("restarting without graceful restart: the routers kept nothing to refresh")
	}
	if c.EBGPMultiHop && c.EBGPMultiHopTTL < 2 {
		bad("eBGP multihop TTL %d: must be at least 2", c.EBGPMultiHopTTL)
	}
	if c.LocalPrefBackup == 0 || c.LocalPrefBackup == c.LocalPrefMaster {
		// The eBGP prepend is keyed on the backup's LOCAL_PREF (see exportPolicy).
		bad("LOCAL_PREF backup %d: must be non-zero and differ from master %d", c.LocalPrefBackup, c.LocalPrefMaster)
	}
	between := func(v, a, b uint32) bool { return min(a, b) <= v && v <= max(a, b) }
	if c.LocalPrefSuccessor == c.LocalPrefMaster || c.LocalPrefSuccessor == c.LocalPrefBackup ||
		!between(c.LocalPrefSuccessor, c.LocalPrefMaster, c.LocalPrefBackup) {
		// The eBGP prepend is keyed on LOCAL_PREF, and routers must rank successor
		// between master and backup.
		bad("LOCAL_PREF successor %d: must lie strictly between master %d and backup %d", c.LocalPrefSuccessor, c.LocalPrefMaster, c.LocalPrefBackup)
	}
	if !between(c.MEDSuccessor, c.MEDMaster, c.MEDBackup) {
		bad("MED successor %d: must lie between master %d and backup %d", c.MEDSuccessor, c.MEDMaster, c.MEDBackup)
	}
	if c.SuccessorPrepend > c.BackupPrepend {
		bad("successor prepend %d: must not exceed the backup prepend %d", c.SuccessorPrepend, c.BackupPrepend)
	}
	for _, p := range c.Pools {
		if !p.IsValid() || p.Addr().Zone() != "" || p.Addr().Is4In6() {
			bad("VIP pool %v: want an IPv4 or IPv6 prefix", p)
		}
	}
	if _, err := parseCommunities(c.Communities); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, c.validatePeers(c.Peers))
	return errors.Join(errs...)
}

// validatePeers checks a peer list against the rest of the configuration.
func (c *Config) validatePeers(peers []Peer) error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	seen := make(map[netip.Addr]bool)
	for _, p := range peers {
		hold, keepalive := cmp.Or(p.HoldTime, c.HoldTime), cmp.Or(p.KeepaliveInterval, c.KeepaliveInterval)
		switch {
		case !p.Addr.IsValid():
			bad("peer with no address")
		case p.ASN == 0:
			bad("peer %v: AS 0 is reserved", p.Addr)
		case seen[p.Addr]:
			bad("peer %v: listed twice", p.Addr)
		case p.MultiHopTTL == 1:
			bad("peer %v: multihop TTL 1 is single hop; use 0 for the default", p.Addr)
		case p.LocalAddr.IsValid() && p.LocalAddr.Is4() != p.Addr.Is4():
			bad("peer %v: source address %v is of the other family", p.Addr, p.LocalAddr)
		case p.HoldTime != 0 && hold < 3*time.Second:
			bad("peer %v: hold time %v: must be at least 3s (RFC 4271)", p.Addr, hold)
		case (p.HoldTime != 0 || p.KeepaliveInterval != 0) && (keepalive <= 0 || keepalive >= hold):
			bad("peer %v: keepalive interval %v: must be positive and below the hold time %v", p.Addr, keepalive, hold)
		}
		if p.BFD != nil {
			if err := p.BFD.validate(); err != nil {
				bad("peer %v: %w", p.Addr, err)
			}
		}
		seen[p.Addr] = true
	}
	return errors.Join(errs...)
}

// applyPasswordFile fills in Peer.Password of c.Peers from c.PasswordFile.
func (c *Config) applyPasswordFile() error {
	pw, err := c.readPasswordFile()
	if err != nil {
		return err
	}
	pw.apply(c.Peers)
	return nil
}

// passwords are the TCP MD5 passwords of Config.PasswordFile.
type passwords struct {
	perPeer map[netip.Addr]string
	all     string
}

// apply sets the file's password of each peer it names, and its password for all
// peers on those that have none.
func (pw passwords) apply(peers []Peer) {
	for i := range peers {
		if v, ok := pw.perPeer[peers[i].Addr]; ok {
			peers[i].Password = v
		} else if peers[i].Password == "" {
			peers[i].Password = pw.all
		}
	}
}

// readPasswordFile reads c.PasswordFile (format on Config); every peer it names must be
// in c.Peers.
func (c *Config) readPasswordFile() (passwords, error) {
	perPeer := make(map[netip.Addr]string)
	if c.PasswordFile == "" {
		return passwords{perPeer: perPeer}, nil
	}
	f, err := os.Open(c.PasswordFile)
	if err != nil {
		return passwords{}, fmt.Errorf("read BGP password file: %w", err)
	}
	defer f.Close()
	var all string
	sc := bufio.NewScanner(f)
	for line := 1; sc.Scan(); line++ {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		switch len(fields) {
		case 1:
			if all != "" {
				return passwords{}, fmt.Errorf("BGP password file %s line %d: a second password for all peers", c.PasswordFile, line)
			}
			all = fields[0]
		case 2:
			addr, err := netip.ParseAddr(fields[0])
			if err != nil {
				return passwords{}, fmt.Errorf("BGP password file %s line %d: %q is not an IP address", c.PasswordFile, line, fields[0])
			}
			if !c.hasPeer(addr) {
				return passwords{}, fmt.Errorf("BGP password file %s line %d: %v is not a configured peer", c.PasswordFile, line, addr)
			}
			perPeer[addr.Unmap()] = fields[1]
		default:
			return passwords{}, fmt.Errorf("BGP password file %s line %d: want \"PEER-IP PASSWORD\" or \"PASSWORD\"", c.PasswordFile, line)
		}
	}
	if err := sc.Err(); err != nil {
		return passwords{}, fmt.Errorf("read BGP password file: %w", err)
	}
	return passwords{perPeer: perPeer, all: all}, nil
}

func (c *Config) hasPeer(a netip.Addr) bool {
	for _, p := range c.Peers {
		if p.Addr == a.Unmap() {
			return true
		}
	}
	return false
}

var wellKnownCommunities = map[string]uint32{
	"no-export":           0xFFFFFF01,
	"no-advertise":        0xFFFFFF02,
	"no-export-subconfed": 0xFFFFFF03,
	"blackhole":           0xFFFF029A,
}

func parseCommunities(ss []string) ([]uint32, error) {
	out := make([]uint32, 0, len(ss))
	for _, s := range ss {
		if v, ok := wellKnownCommunities[strings.ToLower(s)]; ok {
			out = append(out, v)
			continue
		}
		hi, lo, ok := strings.Cut(s, ":")
		h, err1 := strconv.ParseUint(hi, 10, 16)
		l, err2 := strconv.ParseUint(lo, 10, 16)
		if !ok || err1 != nil || err2 != nil {
			return nil, fmt.Errorf("community %q: want ASN:VALUE (0-65535 each) or a well-known name", s)
		}
		out = append(out, uint32(h)<<16|uint32(l))
	}
	return out, nil
}

// parseLargeCommunity reads "ASN:DATA1:DATA2", 32 bits each.
func parseLargeCommunity(s string) ([3]uint32, error) {
	var out [3]uint32
	parts := strings.Split(s, ":")
	if len(parts) != 3 {
		return out, fmt.Errorf("large community %q: want ASN:DATA1:DATA2", s)
	}
	for i, p := range parts {
		v, err := strconv.ParseUint(p, 10, 32)
		if err != nil {
			return out, fmt.Errorf("large community %q: %q is not a number of 0-4294967295", s, p)
		}
		out[i] = uint32(v)
	}
	return out, nil
}

// RangePrefixes returns the fewest prefixes that cover the addresses first to last
// (inclusive) and nothing else, in order: 192.168.80.250-192.168.80.254 is
// 192.168.80.250/31, 192.168.80.252/31 and 192.168.80.254/32. It returns nil when the
// two are of different families or last comes before first.
func RangePrefixes(first, last netip.Addr) []netip.Prefix {
	first, last = first.Unmap(), last.Unmap()
	if !first.IsValid() || first.Is4() != last.Is4() || last.Less(first) {
		return nil
	}
	var out []netip.Prefix
	for {
		// The shortest prefix that starts at first and ends at or before last.
		p := netip.PrefixFrom(first, first.BitLen())
		for p.Bits() > 0 {
			wider := netip.PrefixFrom(first, p.Bits()-1).Masked()
			if wider.Addr() != first || last.Less(lastAddr(wider)) {
				break
			}
			p = wider
		}
		out = append(out, p)
		end := lastAddr(p)
		if end == last {
			return out
		}
		first = end.Next()
	}
}

// lastAddr is the highest address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	p = p.Masked()
	if p.Addr().Is4() {
		b := p.Addr().As4()
		for i := p.Bits(); i < 32; i++ {
			b[i/8] |= 0x80 >> (i % 8)
		}
		return netip.AddrFrom4(b)
	}
	b := p.Addr().As16()
	for i := p.Bits(); i < 128; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	return netip.AddrFrom16(b)
}
