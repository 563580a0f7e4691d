package mastership

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shardlb/shardlb/shard"
)

// sim is a cluster of Cores around an in-memory Lease store with the API server's
// compare-and-swap rules, driven by a fake clock. Every member observes the store as
// it is (a watch with no delay) unless partitioned; a successful write wakes the
// other members after watchDelay, as a watch event does.
type sim struct {
	t          *testing.T
	start, now time.Time
	cfg        Config
	store      map[string]Lease
	rev        int
	members    map[string]*simMember
	violations []string
	watchDelay time.Duration
	// predicted is instance -> the successor the other members announced when its
	// master was killed: the member that must take it over.
	predicted map[string]string
	// killed is when each killed member died: the members probing it find it dead
	// probeDelay later (three failed probes).
	killed     map[string]time.Time
	probeDelay time.Duration
	// suspended are the members stopped for a restart: the routers keep their routes
	// (graceful restart) and their node refuses the probes, which says nothing of a
	// member with a restart time.
	suspended map[string]time.Time
	// writes counts successful writes of member and instance Leases.
	writes [2]int
	// written is when each Lease was last written.
	written map[string]time.Time
}

type simMember struct {
	name         string
	core         *Core
	local        Local
	alive        bool
	next         time.Time
	offset       time.Duration // this member's clock minus the simulation's
	partitioned  bool
	frozen       []Lease // what a partitioned member still sees
	flushBlocked bool
	masters      map[string]bool
	successors   map[string]string
	announcedSuc map[string]string // Outcome.AnnouncedSuccessors
	announce     map[string]bool   // nil: every instance
	latency      time.Duration     // how long a round of this member's writes takes
	probing      []string          // the members its last Outcome said to probe
	decided      time.Time         // when its masters were last decided (Advance)
	suspects     map[string]string // set by hand: what its probes say whatever happens
	incarnations int
}

func newSim(t *testing.T) *sim {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	in, err := shard.NewInstances("llb", 3)
	if err != nil {
		t.Fatal(err)
	}
	return &sim{
		t: t, start: start, now: start, store: map[string]Lease{}, members: map[string]*simMember{}, predicted: map[string]string{}, written: map[string]time.Time{}, killed: map[string]time.Time{}, probeDelay: time.Second, suspended: map[string]time.Time{},
		cfg:        Config{Instances: in, Renew: time.Second, Duration: 4 * time.Second, Grace: time.Second},
		watchDelay: 10 * time.Millisecond,
	}
}

func (s *sim) at() string { return fmt.Sprintf("%.3fs", s.now.Sub(s.start).Seconds()) }

func (s *sim) names() []string { return slices.Sorted(maps.Keys(s.members)) }

func (s *sim) member(name string) (*simMember, error) {
	m := s.members[name]
	if m == nil {
		return nil, errf("no member %q", name)
	}
	return m, nil
}

func (s *sim) exec(cmd string, args []string) (string, error) {
	opts, rest := kv(args)
	switch cmd {
	case "init":
		return "", s.init(opts)
	case "start", "restart":
		var b strings.Builder
		for _, name := range rest {
			m := s.members[name]
			if m == nil {
				m = &simMember{name: name}
				s.members[name] = m
			} else if cmd == "start" && m.alive {
				return "", errf("%s is running", name)
			}
			m.incarnations++
			cfg := s.cfg
			cfg.Me = name
			cfg.Incarnation = fmt.Sprintf("%s%d", name, m.incarnations)
			cfg.Addresses = []netip.Addr{netip.AddrFrom4([4]byte{10, 0, 0, byte(len(name) + int(name[0]))})}
			m.core = New(cfg)
			m.local = Local{Announcing: opts["announcing"] != "false"}
			m.alive, m.next, m.partitioned, m.flushBlocked = true, s.now, false, false
			m.masters = map[string]bool{}
			m.suspects = nil
			delete(s.killed, name)
			delete(s.suspended, name)
			fmt.Fprintf(&b, "%s: started, incarnation %s\n", name, cfg.Incarnation)
		}
		return b.String(), nil
	case "kill":
		for _, name := range rest {
			m, err := s.member(name)
			if err != nil {
				return "", err
			}
			m.alive, m.masters = false, map[string]bool{} // its routes vanish with its sessions
			s.killed[name] = s.now
		}
		for _, o := range s.members {
			if o.alive {
				s.wakeProber(o)
			}
		}
		// The routers now prefer, for each instance the killed members mastered, the
		// backup the others rank first: it must be the one that takes over.
		var b strings.Builder
		for _, inst := range s.cfg.Instances.Names() {
			h := s.store[InstanceLeaseName(inst)].Holder
			if !slices.Contains(rest, h) {
				continue
			}
			succ, agree := s.successor(inst)
			if !agree {
				s.violations = append(s.violations, fmt.Sprintf("%s: members disagree on the successor of %s", s.at(), inst))
			}
			s.predicted[inst] = succ
			fmt.Fprintf(&b, "%s: routers fall back to %s\n", inst, succ)
		}
		return b.String(), nil
	case "suspend":
		// suspend b: b's process exits for a restart, leaving its routes with the
		// routers (graceful restart) and its datapath forwarding: its masters stay
		// announced until its next process starts.
		for _, name := range rest {
			m, err := s.member(name)
			if err != nil {
				return "", err
			}
			m.alive = false
			s.suspended[name] = s.now
		}
		return "", nil
	case "set":
		m, err := s.member(rest[0])
		if err != nil {
			return "", err
		}
		for k, v := range opts {
			switch k {
			case "announcing":
				m.local.Announcing = v == "true"
			case "leaving":
				m.local.Leaving = v == "true"
			case "maintenance":
				m.local.Maintenance = v
			default:
				return "", errf("set: unknown %s", k)
			}
		}
		m.next = s.now
		return "", nil
	case "partition", "heal":
		m, err := s.member(rest[0])
		if err != nil {
			return "", err
		}
		m.partitioned = cmd == "partition"
		m.frozen = s.snapshot(nil)
		return "", nil
	case "suspect":
		// suspect a b: a's probes say b's current process is dead, whatever it is.
		m, err := s.member(rest[0])
		if err != nil {
			return "", err
		}
		if m.suspects == nil {
			m.suspects = map[string]string{}
		}
		if o := s.members[rest[1]]; o != nil && o.core != nil {
			m.suspects[rest[1]] = o.core.cfg.Incarnation
		}
		m.next = s.now
		return "", nil
	case "trust":
		m, err := s.member(rest[0])
		if err != nil {
			return "", err
		}
		delete(m.suspects, rest[1])
		m.next = s.now
		return "", nil
	case "slow":
		m, err := s.member(rest[0])
		if err != nil {
			return "", err
		}
		if m.latency, err = time.ParseDuration(rest[1]); err != nil {
			return "", err
		}
		return "", nil
	case "flush":
		m, err := s.member(rest[0])
		if err != nil {
			return "", err
		}
		m.flushBlocked = rest[1] == "blocked"
		return "", nil
	case "jump":
		m, err := s.member(rest[0])
		if err != nil {
			return "", err
		}
		d, err := time.ParseDuration(rest[1])
		if err != nil {
			return "", err
		}
		m.offset += d
		m.next = s.now
		return "", nil
	case "tick":
		d, err := time.ParseDuration(rest[0])
		if err != nil {
			return "", err
		}
		s.now = s.now.Add(d)
		return "", nil
	case "step":
		return s.step(rest), nil
	case "run":
		d, err := time.ParseDuration(rest[0])
		if err != nil {
			return "", err
		}
		return s.run(d)
	case "release":
		// The end of a planned stop: give up what is still held, delete the member Lease.
		m, err := s.member(rest[0])
		if err != nil {
			return "", err
		}
		var b strings.Builder
		for _, w := range m.core.Release(s.snapshot(m)) {
			res := s.apply(m, w)
			fmt.Fprintf(&b, "%s: %s -> %s\n", m.name, w, resultString(res))
		}
		delete(s.store, MemberLeaseName(m.name))
		m.alive, m.masters = false, map[string]bool{}
		s.wakeOthers(m)
		return b.String(), nil
	case "state":
		return s.state(), nil
	}
	return "", errf("unknown command %q", cmd)
}

func (s *sim) init(opts map[string]string) error {
	for k, v := range opts {
		switch k {
		case "instances":
			n, err := strconv.Atoi(v)
			if err != nil {
				return err
			}
			if s.cfg.Instances, err = shard.NewInstances("llb", n); err != nil {
				return err
			}
		case "renew", "duration", "grace":
			d, err := time.ParseDuration(v)
			if err != nil {
				return err
			}
			switch k {
			case "renew":
				s.cfg.Renew = d
			case "duration":
				s.cfg.Duration = d
			default:
				s.cfg.Grace = d
			}
		case "protocol":
			switch v {
			case "renewed":
				s.cfg.Protocol = ProtocolRenewed
			case "member-bound":
				s.cfg.Protocol = ProtocolMemberBound
			default:
				return errf("protocol %q", v)
			}
		case "handover":
			d, err := time.ParseDuration(v)
			if err != nil {
				return err
			}
			s.cfg.HandoverTimeout = d
		case "maxbackups":
			n, err := strconv.Atoi(v)
			if err != nil {
				return err
			}
			s.cfg.MaxBackups = n
		case "excluded":
			s.cfg.Excluded = strings.Split(v, ",")
		case "restart":
			d, err := time.ParseDuration(v)
			if err != nil {
				return err
			}
			s.cfg.RestartTime, s.cfg.Probe = d, "probe"
		default:
			return errf("init: unknown %s", k)
		}
	}
	return nil
}

// input is what m observes in a step: the store, its own state, and what its probes
// say (a killed member it probes is found dead probeDelay after its death).
func (s *sim) input(m *simMember) Input {
	local := m.local
	local.Suspects = map[string]string{}
	// As kube's elector: a restarted member holding Leases its previous process wrote.
	if m.core.cfg.RestartTime > 0 {
		for _, l := range s.store {
			if !IsMemberLease(l.Name) && l.Holder == m.name && l.HandoverFrom == "" && l.Incarnation != "" && l.Incarnation != m.core.cfg.Incarnation {
				local.Restarting = true
			}
		}
	}
	for _, p := range m.probing {
		if at, ok := s.killed[p]; ok && !s.now.Before(at.Add(s.probeDelay)) {
			local.Suspects[p] = s.members[p].core.cfg.Incarnation
		}
	}
	for k, v := range m.suspects {
		local.Suspects[k] = v
	}
	return Input{Now: s.now.Add(m.offset), Leases: s.snapshot(m), Local: local}
}

// snapshot is what m observes: the store, or what it saw before a partition.
func (s *sim) snapshot(m *simMember) []Lease {
	if m != nil && m.partitioned {
		return slices.Clone(m.frozen)
	}
	out := make([]Lease, 0, len(s.store))
	for _, name := range slices.Sorted(maps.Keys(s.store)) {
		out = append(out, cloneLease(s.store[name]))
	}
	return out
}

func cloneLease(l Lease) Lease {
	if l.Member != nil {
		m := *l.Member
		m.Addresses = slices.Clone(m.Addresses)
		l.Member = &m
	}
	return l
}

// apply makes a write as the API server would: a create fails if the Lease exists,
// an update unless the stored version is the base.
func (s *sim) apply(m *simMember, w Write) Result {
	if m.partitioned {
		return Result{Err: errf("apiserver unreachable")}
	}
	cur, ok := s.store[w.Lease.Name]
	switch {
	case w.Base == "" && ok:
		return Result{Err: errf("already exists")}
	case w.Base != "" && !ok:
		return Result{Err: errf("not found")}
	case w.Base != "" && cur.Version != w.Base:
		return Result{Err: errf("conflict: version %s, want %s", cur.Version, w.Base)}
	}
	s.rev++
	s.written[w.Lease.Name] = s.now
	if IsMemberLease(w.Lease.Name) {
		s.writes[0]++
	} else {
		s.writes[1]++
	}
	l := cloneLease(w.Lease)
	l.Version = strconv.Itoa(s.rev)
	s.store[l.Name] = l
	s.wakeOthers(m)
	return Result{Lease: cloneLease(l)}
}

// wakeProber wakes m when its probes of a killed member fail for good.
func (s *sim) wakeProber(m *simMember) {
	for _, p := range m.probing {
		at, ok := s.killed[p]
		if !ok {
			continue
		}
		if t := at.Add(s.probeDelay); t.After(s.now) && t.Before(m.next) {
			m.next = t
		}
	}
}

func (s *sim) wakeOthers(m *simMember) {
	for _, o := range s.members {
		if o != m && o.alive && o.next.After(s.now.Add(s.watchDelay)) {
			o.next = s.now.Add(s.watchDelay)
		}
	}
}

func resultString(r Result) string {
	if r.Err != nil {
		return "error: " + r.Err.Error()
	}
	return "v" + r.Lease.Version
}

// step makes the named members step on the same observation, then makes their
// writes in name order: a race, decided by the store.
func (s *sim) step(names []string) string {
	var b strings.Builder
	type pending struct {
		m      *simMember
		writes []Write
	}
	var ps []pending
	for _, name := range names {
		m := s.members[name]
		if m == nil || !m.alive {
			fmt.Fprintf(&b, "%s: not running\n", name)
			continue
		}
		ps = append(ps, pending{m, m.core.Step(s.input(m))})
	}
	results := make([][]Result, len(ps))
	var slow time.Duration
	busy := map[string]bool{}
	for i, p := range ps {
		for _, w := range p.writes {
			res := s.apply(p.m, w)
			res.At = s.now.Add(p.m.offset)
			results[i] = append(results[i], res)
			fmt.Fprintf(&b, "%s: %s -> %s\n", p.m.name, w, resultString(res))
		}
		slow = max(slow, p.m.latency)
		busy[p.m.name] = true
	}
	if slow > 0 {
		// The round lasts: the others go on meanwhile.
		out, err := s.runExcept(slow, busy)
		if err != nil {
			s.t.Fatal(err)
		}
		b.WriteString(out)
	}
	for i, p := range ps {
		b.WriteString(s.finish(p.m, results[i], true))
	}
	s.check()
	return b.String()
}

// finish advances m's Core with its results, makes the acknowledgements when its
// routes can be flushed, and reports what changed.
func (s *sim) finish(m *simMember, results []Result, verbose bool) string {
	var b strings.Builder
	prefix := m.name + ": "
	if !verbose {
		prefix = s.at() + " " + prefix
	}
	out := m.core.Advance(s.now.Add(m.offset), results)
	m.decided = s.now
	events := out.Events
	next := out.Next
	prev := m.masters
	m.masters = out.Masters
	if len(out.Acks) > 0 {
		if m.flushBlocked {
			if retry := s.now.Add(m.offset + 100*time.Millisecond); retry.Before(next) {
				next = retry
			}
		} else {
			var res []Result
			for _, w := range out.Acks {
				r := s.apply(m, w)
				res = append(res, r)
				if verbose {
					fmt.Fprintf(&b, "%s%s -> %s\n", prefix, w, resultString(r))
				}
			}
			ev, retry := m.core.Acknowledged(res)
			events = append(events, ev...)
			if !retry.IsZero() && retry.Before(next) {
				next = retry
			}
		}
	}
	m.successors = out.Successors
	m.announcedSuc = out.AnnouncedSuccessors
	m.announce = out.Announce
	m.probing = out.Probe
	for _, e := range events {
		if !verbose && e.Kind == EventWriteFailed && e.Write == KindMember {
			continue
		}
		if p, ok := s.predicted[e.Instance]; ok && e.Kind == EventTook {
			if p != m.name {
				s.violations = append(s.violations, fmt.Sprintf("%s: %s took %s, the routers preferred %s", s.at(), m.name, e.Instance, p))
			}
			delete(s.predicted, e.Instance)
		}
		fmt.Fprintf(&b, "%s%s\n", prefix, e)
	}
	if verbose || !maps.Equal(prev, m.masters) {
		fmt.Fprintf(&b, "%smasters %v\n", prefix, slices.Sorted(maps.Keys(m.masters)))
	}
	m.next = next.Add(-m.offset)
	if min := s.now.Add(5 * time.Millisecond); m.next.Before(min) {
		m.next = min
	}
	s.wakeProber(m)
	return b.String()
}

// run steps every running member whenever it asked to be woken, for d.
func (s *sim) run(d time.Duration) (string, error) { return s.runExcept(d, nil) }

func (s *sim) runExcept(d time.Duration, except map[string]bool) (string, error) {
	end := s.now.Add(d)
	var b strings.Builder
	before := s.writes
	for steps := 0; ; steps++ {
		if steps > 100000 {
			return b.String(), errf("no quiescence after %d steps", steps)
		}
		var m *simMember
		for _, name := range s.names() {
			if o := s.members[name]; o.alive && !except[name] && (m == nil || o.next.Before(m.next)) {
				m = o
			}
		}
		if m == nil || m.next.After(end) {
			s.now = end
			break
		}
		if m.next.After(s.now) {
			s.now = m.next
		}
		writes := m.core.Step(s.input(m))
		results := make([]Result, 0, len(writes))
		for _, w := range writes {
			res := s.apply(m, w)
			res.At = s.now.Add(m.offset)
			results = append(results, res)
		}
		b.WriteString(s.finish(m, results, false))
		s.check()
	}
	fmt.Fprintf(&b, "writes: %d member, %d instance\n", s.writes[0]-before[0], s.writes[1]-before[1])
	return b.String(), nil
}

// check records every moment at which two members announce one instance as master
// outside a handover: the old holder may announce beside the new one only while it is
// handing over to it (make-before-break), or until it has stepped since the Lease was
// taken from it (a member cannot stop before it can know: the watch delay).
func (s *sim) check() {
	for _, inst := range s.cfg.Instances.Names() {
		var announcers []string
		for _, name := range s.names() {
			if m := s.members[name]; (m.alive || s.restarting(name)) && m.masters[inst] {
				announcers = append(announcers, name)
			}
		}
		if len(announcers) < 2 {
			continue
		}
		if slices.ContainsFunc(announcers, s.restarting) {
			// The routers hold a restarting member's master route: any other master
			// splits the instance's traffic between two nodes.
			v := fmt.Sprintf("%s: %s announced as master by %v, one of them restarting", s.at(), inst, announcers)
			if n := len(s.violations); n == 0 || s.violations[n-1] != v {
				s.violations = append(s.violations, v)
			}
			continue
		}
		h := s.store[InstanceLeaseName(inst)].Holder
		for _, a := range announcers {
			if a != h && s.members[a].core.handover[inst] != h && !s.members[a].decided.Before(s.written[InstanceLeaseName(inst)]) {
				v := fmt.Sprintf("%s: %s announced as master by %v, holder %q", s.at(), inst, announcers, h)
				if n := len(s.violations); n == 0 || s.violations[n-1] != v {
					s.violations = append(s.violations, v)
				}
				break
			}
		}
	}
}

// restarting reports whether the routers still hold the routes of a suspended
// member: for the restart time after its suspension.
func (s *sim) restarting(name string) bool {
	at, ok := s.suspended[name]
	return ok && s.now.Before(at.Add(s.cfg.RestartTime))
}

// successor is the successor of inst the running members announce, and whether
// they all agree.
func (s *sim) successor(inst string) (string, bool) {
	var got []string
	for _, name := range s.names() {
		if m := s.members[name]; m.alive && m.successors != nil {
			got = append(got, m.successors[inst])
		}
	}
	if len(got) == 0 {
		return "", true
	}
	for _, g := range got[1:] {
		if g != got[0] {
			return strings.Join(got, "/"), false
		}
	}
	return got[0], true
}

func (s *sim) state() string {
	var b strings.Builder
	for _, inst := range s.cfg.Instances.Names() {
		l, ok := s.store[InstanceLeaseName(inst)]
		var announcers []string
		for _, name := range s.names() {
			if m := s.members[name]; m.alive && m.masters[inst] {
				announcers = append(announcers, name)
			}
		}
		succ, _ := s.successor(inst)
		for _, name := range s.names() {
			// A member that is the successor in its own view but does not announce it yet.
			if m := s.members[name]; m.alive && m.successors[inst] == name && m.announcedSuc != nil && m.announcedSuc[inst] != name {
				succ += " (" + name + " held)"
			}
		}
		if s.cfg.MaxBackups > 0 {
			var by []string
			for _, name := range s.names() {
				if m := s.members[name]; m.alive && m.announce[inst] {
					by = append(by, name)
				}
			}
			fmt.Fprintf(&b, "%s: announced by %v\n", inst, by)
		}
		switch {
		case !ok:
			fmt.Fprintf(&b, "%s: no lease, masters %v, successor %q\n", inst, announcers, succ)
		case l.HandoverFrom != "":
			fmt.Fprintf(&b, "%s: holder %s (from %s), masters %v, successor %q\n", inst, l.Holder, l.HandoverFrom, announcers, succ)
		default:
			fmt.Fprintf(&b, "%s: holder %q, masters %v, successor %q\n", inst, l.Holder, announcers, succ)
		}
	}
	return b.String()
}
