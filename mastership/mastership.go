// Package mastership decides, for one member (a shardlb pod), which instance
// mastership Leases to take, renew, hand over or release, and which instances to
// announce as master. It is pure: a Core is a state machine stepped with what the
// member observes (the Leases, its own state, the time) and answers with Lease writes
// to make, then, once told their results, with the instances to announce as master,
// the writes that must wait until the master routes reached the routers, and when to
// step next. It has no client, no clock and no goroutine: kube's elector executes the
// writes against the API server and feeds the results back, as etcd's raft leaves
// storage and transport to its caller (Ready, then Advance).
//
// # Protocol
//
// Every member renews a member Lease (MemberLeaseName) every Config.Renew. Each
// instance has a mastership Lease (InstanceLeaseName). The live members are the
// holders of member Leases observed to change within Config.Duration, minus those
// marked leaving, in maintenance, or not announcing (BGP sessions down) unless they
// already hold an instance, minus holders of an expired instance Lease.
// shard.Rebalance over them says who should master each instance; every member
// computes the same answer.
//
//   - How an instance Lease stays held is the Protocol's. ProtocolMemberBound (the
//     default): it is written only when it changes hands and counts while its
//     holder's member Lease does, with the holder's incarnation; the members that
//     would take a master's instances over probe it (Outcome.Probe, Local.Suspects)
//     and publish what they find dead on their member Lease (Member.Dead), so a dead
//     master is replaced long before its member Lease expires. ProtocolRenewed: its
//     holder renews it every Config.Renew and it counts until Config.Duration after
//     its last observed change.
//   - An instance Lease no longer held (expired, its holder gone or found dead) or
//     never created is taken by its preferred member at once, by any eligible member
//     after Config.Grace more.
//   - A holder that is not the preferred member any more hands the instance over,
//     make-before-break: it writes the preferred member as holder with HandoverFrom set
//     to itself and keeps announcing as master; the new holder announces as master,
//     waits until its routes left for the routers, then renews the Lease without
//     HandoverFrom (the acknowledgement); the old holder demotes on seeing that. A new
//     holder that never acknowledges lets the Lease expire: the old holder stops
//     announcing then.
//   - A member that is not eligible (leaving, in maintenance, excluded, its own member
//     Lease stale) takes nothing, hands over what it holds, and releases what nobody
//     can take.
//   - Restarts (Config.RestartTime: the member's forwarding outlives its process). Its
//     member Lease lasts the restart time and a renew period more, so a process that
//     stops or dies while its node stays up keeps its instances for its next process
//     (kube's prober takes a refused probe of such a member for a restart, not a
//     death). The next process, a new incarnation, finds the instance Leases its
//     previous one wrote, marks its member Lease restarting (Local.Restarting) and
//     takes them back at once, announcing or not; while it is marked, the others count
//     those Leases as its own whatever their incarnation, and do not take it for dead.
//
// Every write is conditioned on the version read (a create, or an update of that
// resourceVersion), so the API server decides every race: two members never both
// hold a Lease.
//
// Expiry is measured from the local time at which a Lease's version was first seen,
// not from the holder's renewTime, so member clocks need not agree (as client-go's
// leaderelection does). A jump of the local clock moves every expiry with it: forward,
// Leases of live holders look expired and may be taken (the API still keeps takes
// exclusive and the holder hands back on its next renewal); backward, expiry waits
// longer.
package mastership

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/shardlb/shardlb/shard"
)

// Lease name prefixes.
const (
	memberLeasePrefix   = "shardlb-member-"
	instanceLeasePrefix = "shardlb-instance-"
)

// MemberLeaseName is the Lease through which a member shows it is alive.
func MemberLeaseName(member string) string { return memberLeasePrefix + member }

// InstanceLeaseName is the mastership Lease of an instance.
func InstanceLeaseName(instance string) string { return instanceLeasePrefix + instance }

// IsMemberLease reports whether name is a member Lease's.
func IsMemberLease(name string) bool { return strings.HasPrefix(name, memberLeasePrefix) }

// Config is one member's view of the protocol's settings; every member should use
// the same Instances, Excluded and timings.
type Config struct {
	Me        string
	Instances shard.Instances
	// Excluded members never master (--excludeRoleList).
	Excluded []string
	// Renew is how often a holder renews; Duration after the last observed change a
	// Lease counts as expired; Grace is how long an expired Lease waits for its
	// preferred member before any eligible member may take it.
	Renew, Duration, Grace time.Duration
	// Protocol says how an instance Lease stays held: bound to its holder's member
	// Lease (the default) or renewed on its own.
	Protocol Protocol
	// HandoverTimeout bounds how long a handover waits for its acknowledgement
	// (ProtocolMemberBound; ProtocolRenewed uses Duration).
	HandoverTimeout time.Duration
	// Probe is where peers probe this member's liveness (published on its member
	// Lease; "" for none): see Local.Suspects.
	Probe string
	// MaxBackups bounds the backups announcing each instance (0: every member): the
	// successor and the next MaxBackups-1 members by rendezvous rank (Outcome.Announce).
	MaxBackups int
	// SuccessorHold is how long a member that becomes an instance's successor because
	// the instance's master changed waits before announcing successor attributes
	// (Outcome.AnnouncedSuccessors): the new master, until then the successor, writes
	// its Lease before its master route leaves, and a router that met two successor
	// routes in that moment would spread the VIP over both. 0: 500 ms; negative: none.
	SuccessorHold time.Duration
	// Addresses and Incarnation are published on the member Lease: a member that takes
	// over one of this member's instances in a planned switch hands off segments of
	// connections it does not know to these addresses while this incarnation lives.
	Addresses   []netip.Addr
	Incarnation string
	// RestartTime is how long this member's forwarding outlives its process (a pinned
	// datapath, and routers that keep its routes by BGP graceful restart); 0: not at
	// all. With ProtocolMemberBound and a Probe, it is the duration of the member
	// Lease: a member whose process is gone while its node answers (a refused probe,
	// see Member.RestartTime) keeps its instances that long, for its next process to
	// take back, instead of being replaced at once. A node that does not answer is
	// still found dead by the probes.
	RestartTime time.Duration
}

// Protocol is how instance Leases stay held.
type Protocol uint8

const (
	// ProtocolMemberBound: an instance Lease is written only when its holder changes
	// (take, hand over, acknowledge, release) and counts as held while its holder's
	// member Lease does, with the holder's incarnation. Members renew only their
	// member Lease, so the cluster's Lease writes are members/Renew, whatever the
	// number of instances; a dead master is found faster than its member Lease
	// expires by the members that would take its instances over, which probe it
	// (Local.Suspects, Outcome.Probe).
	ProtocolMemberBound Protocol = iota
	// ProtocolRenewed: every holder renews each instance Lease every Renew, and an
	// instance Lease counts as held until Duration after its last observed change.
	ProtocolRenewed
)

func (p Protocol) String() string {
	if p == ProtocolRenewed {
		return "renewed"
	}
	return "member-bound"
}

// Member is what a member Lease says besides its holder.
type Member struct {
	Addresses   []netip.Addr
	Incarnation string
	// Leaving marks a member that is stopping: nobody hands it an instance.
	Leaving bool
	// Announcing is false while the member's routes reach no router.
	Announcing bool
	// Maintenance says why the member must master nothing ("" when it may).
	Maintenance string
	// Probe is where to probe the member's liveness ("" for nowhere).
	Probe string
	// RestartTime is the member's Config.RestartTime: a probe its node refuses (the
	// process is gone, the node is up) means a restart, not a death, for a member
	// with one.
	RestartTime time.Duration
	// Restarting marks a member whose process restarted and holds instance Leases
	// written by its previous process: they count as its own, whatever their
	// incarnation, until it has taken them back.
	Restarting bool
	// Dead are the members this member's probes found dead, each as
	// "member@incarnation@version" (the version of its member Lease then): every
	// member counts them as gone while that member Lease stays at that version.
	Dead []string
}

// Lease is the part of a Kubernetes Lease the protocol reads and writes.
type Lease struct {
	Name string
	// Version is the resourceVersion: a write is conditioned on it. "" for a Lease
	// that does not exist.
	Version string
	Holder  string
	// Duration is the holder's lease duration (0: Config.Duration).
	Duration time.Duration
	// HandoverFrom, on an instance Lease, names the member that handed it to Holder;
	// Holder clears it to acknowledge.
	HandoverFrom string
	// Incarnation, on an instance Lease, is the holder's process incarnation
	// (ProtocolMemberBound): the Lease counts only while that process's member Lease
	// does. "" for Leases written without it.
	Incarnation string
	// Member is set on member Leases.
	Member *Member
}

// Kind says why a write is made.
type Kind uint8

const (
	// KindMember renews this member's own Lease.
	KindMember Kind = iota
	// KindRenew renews an instance Lease this member holds.
	KindRenew
	// KindTake creates or takes over an expired instance Lease.
	KindTake
	// KindHandOver writes another member as holder, HandoverFrom this one.
	KindHandOver
	// KindRelease clears the holder of an instance Lease nobody can take over.
	KindRelease
	// KindAcknowledge renews an instance Lease handed to this member without
	// HandoverFrom, after its master routes reached the routers.
	KindAcknowledge
)

func (k Kind) String() string {
	switch k {
	case KindMember:
		return "member"
	case KindRenew:
		return "renew"
	case KindTake:
		return "take"
	case KindHandOver:
		return "hand-over"
	case KindRelease:
		return "release"
	case KindAcknowledge:
		return "acknowledge"
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// Write is a Lease write to make: create Lease when Base is "", else update the
// version Base to Lease (a compare-and-swap). Acquire asks to record a new
// acquisition (acquireTime, leaseTransitions).
type Write struct {
	Kind     Kind
	Instance string // "" for the member Lease
	Base     string
	Lease    Lease
	Acquire  bool
}

func (w Write) String() string {
	verb := "update " + w.Base
	if w.Base == "" {
		verb = "create"
	}
	s := fmt.Sprintf("%s %s %s holder=%s", w.Kind, w.Lease.Name, verb, w.Lease.Holder)
	if w.Lease.HandoverFrom != "" {
		s += " handover-from=" + w.Lease.HandoverFrom
	}
	if m := w.Lease.Member; m != nil {
		if m.Leaving {
			s += " leaving"
		}
		if !m.Announcing {
			s += " announcing=false"
		}
		if m.Maintenance != "" {
			s += " maintenance=" + m.Maintenance
		}
	}
	return s
}

// Result is the outcome of a Write: the Lease as stored (with its new Version), or
// the error. At is when the write was sent (zero: when Step was called): the Lease's
// new version counts from then, which is before any other member can have seen it.
type Result struct {
	Lease Lease
	Err   error
	At    time.Time
}

// Local is this member's own state, sampled each step.
type Local struct {
	// Leaving: a planned stop; hand every instance over.
	Leaving bool
	// Announcing: routes reach the upstream routers (BGP sessions up).
	Announcing bool
	// Maintenance: why this node must master nothing now ("" when it may).
	Maintenance string
	// Restarting: this process replaced one of the same member and holds instance
	// Leases its previous process wrote (Member.Restarting). It takes them back at
	// once, announcing or not: the routers still hold its previous process's routes
	// and its datapath still forwards.
	Restarting bool
	// Suspects are members this member's probes found dead: member -> the
	// incarnation probed. Such a member counts as gone (its instances are taken
	// over at once) until its member Lease shows another incarnation.
	Suspects map[string]string
}

// Input is one step's observation.
type Input struct {
	Now time.Time
	// Leases are every shardlb Lease observed, each the freshest copy known (the
	// watch cache's, or this member's last write if the cache has not caught up).
	Leases []Lease
	Local  Local
}

// EventKind names what happened in a step, for logs and tests.
type EventKind uint8

const (
	EventTook EventKind = iota
	EventHandingOver
	EventHandoverAcknowledged
	EventHandoverLost
	EventTookOver
	EventReleased
	EventAnnouncing
	EventMaintenance
	EventWriteFailed
)

// Event is something a step did or saw. Err is set for EventWriteFailed.
type Event struct {
	Kind     EventKind
	Instance string
	// Member is the other side: the previous holder (Took), the new holder
	// (HandingOver, HandoverAcknowledged, HandoverLost); the value for Announcing and
	// Maintenance.
	Member string
	Write  Kind
	Err    error
}

func (e Event) String() string {
	switch e.Kind {
	case EventTook:
		if e.Member != "" {
			return fmt.Sprintf("took %s from %s", e.Instance, e.Member)
		}
		return "took " + e.Instance
	case EventHandingOver:
		return fmt.Sprintf("handing %s over to %s", e.Instance, e.Member)
	case EventHandoverAcknowledged:
		return fmt.Sprintf("%s acknowledged %s", e.Member, e.Instance)
	case EventHandoverLost:
		return fmt.Sprintf("%s never acknowledged %s", e.Member, e.Instance)
	case EventTookOver:
		return "took over " + e.Instance
	case EventReleased:
		return "released " + e.Instance
	case EventAnnouncing:
		return "announcing=" + e.Member
	case EventMaintenance:
		return "maintenance=" + e.Member
	case EventWriteFailed:
		if e.Instance != "" {
			return fmt.Sprintf("%s %s failed: %v", e.Write, e.Instance, e.Err)
		}
		return fmt.Sprintf("%s failed: %v", e.Write, e.Err)
	}
	return fmt.Sprintf("Event(%d)", uint8(e.Kind))
}

// Outcome is what a step decided once its writes' results are known.
type Outcome struct {
	// Masters are the instances to announce as master now.
	Masters map[string]bool
	// Until is, for each of Masters, when its Lease expires in this member's view:
	// the caller stops announcing it then even if it cannot step (a round blocked on
	// a slow API server), as others may take it from that moment.
	Until map[string]time.Time
	// Holders is instance -> holder of its unexpired Lease (this member included).
	Holders map[string]string
	// Handoffs is instance -> the node addresses of the member that handed it to this
	// one, while that member's process lives (shard.Input.Handoffs).
	Handoffs map[string][]netip.Addr
	// Probe are the members to probe (ProtocolMemberBound): the masters of the
	// instances this member would take over if they failed.
	Probe []string
	// Announce is, with Config.MaxBackups set, the instances whose VIPs this member
	// announces: those it masters, and those for which it is the successor or one of
	// the next MaxBackups-1 members by rendezvous rank. nil: every instance.
	Announce map[string]bool
	// Successors is instance -> the member that takes the instance over if its
	// current master fails (its master if it has none yet): the backup routers should
	// prefer, so that a failover moves traffic once. Every member computes the same
	// map from the same Leases.
	Successors map[string]string
	// AnnouncedSuccessors is Successors less the instances this member has just become
	// the successor of because their master changed (Config.SuccessorHold): those this
	// member announces with successor attributes.
	AnnouncedSuccessors map[string]string
	// Acks are writes to make only once Masters are applied and the master routes
	// left for the routers; then call Acknowledged with their results.
	Acks []Write
	// Changed says Masters or Handoffs differ from the previous Outcome.
	Changed bool
	// Next is when to step again at the latest.
	Next   time.Time
	Events []Event
}

type seenLease struct {
	version string
	at      time.Time
}

// previousMaster is the process that handed an instance to this member.
type previousMaster struct{ member, incarnation string }

// Core is one member's mastership state machine. Use Step, make the writes, Advance
// with their results; when the Outcome has Acks, apply the Masters, make the Acks and
// call Acknowledged. A Core is not safe for concurrent use.
type Core struct {
	cfg      Config
	excluded map[string]bool

	seen          map[string]seenLease
	handover      map[string]string // instance -> member handed to, until it acknowledges
	missingSince  map[string]time.Time
	memberRenewed time.Time
	lastStep      time.Time
	written       Local // what the member Lease said at the last successful write
	writtenDead   []string
	previous      map[string]previousMaster
	masters       map[string]bool
	handoffs      map[string][]netip.Addr
	dead          map[string]deadMember // members found dead by this member's probes
	reported      map[string]bool       // deadKeys other live members published
	// lastSuccessors is the last Outcome's; succMemo caches successors by their inputs.
	lastSuccessors map[string]string
	succKey        string
	succMemo       map[string]string
	// holderOf and holderSince are each instance's master as last seen and since when;
	// announcedSucc is the last Outcome's AnnouncedSuccessors.
	holderOf      map[string]string
	holderSince   map[string]time.Time
	announcedSucc map[string]string

	r *round // the step in progress
}

// round is one step between Step and Advance.
type round struct {
	now     time.Time
	next    time.Time
	local   Local
	leases  map[string]Lease
	writes  []Write
	master  map[string]bool
	check   []string // instances held: still ours after this round's writes?
	acks    []Write
	events  []Event
	meLive  bool
	targets map[int]string  // write index -> member handed to
	handed  map[string]bool // instances handed over in this round
	// successors is instance -> the member that would master it if its master failed;
	// announcedSucc those this member announces so now (Outcome.AnnouncedSuccessors).
	successors    map[string]string
	announcedSucc map[string]string
	probe         []string
	announce      map[string]bool
}

// New returns a Core for cfg.
func New(cfg Config) *Core {
	ex := make(map[string]bool, len(cfg.Excluded))
	for _, m := range cfg.Excluded {
		ex[m] = true
	}
	return &Core{
		cfg: cfg, excluded: ex,
		seen: map[string]seenLease{}, handover: map[string]string{}, dead: map[string]deadMember{}, missingSince: map[string]time.Time{},
		previous: map[string]previousMaster{}, masters: map[string]bool{}, handoffs: map[string][]netip.Addr{},
		holderOf: map[string]string{}, holderSince: map[string]time.Time{},
	}
}

// expiry is when l stops counting; a released Lease (no holder) has expired.
func (c *Core) expiry(l Lease) time.Time {
	s := c.seen[l.Name]
	if l.Holder == "" {
		return s.at
	}
	d := l.Duration
	if d <= 0 {
		d = c.cfg.Duration
	}
	return s.at.Add(d)
}

func (r *round) soon(t time.Time) {
	if t.Before(r.next) {
		r.next = t
	}
}

func (r *round) write(w Write) int {
	r.writes = append(r.writes, w)
	return len(r.writes) - 1
}

// observe indexes the Leases and records when each version was first seen. After a
// pause of this member (a gap between steps of more than two renew periods, or its
// clock going back), what it saw before says nothing of what happened meanwhile: the
// Leases of other holders count as seen now, so a paused member does not take Leases
// that are renewed, only not yet observed. Its own, and those it handed over, keep
// their times: they expired if it was away too long.
func (c *Core) observe(now time.Time, leases []Lease) map[string]Lease {
	paused := !c.lastStep.IsZero() && (now.Before(c.lastStep) || now.Sub(c.lastStep) > 2*c.cfg.Renew)
	c.lastStep = now
	out := make(map[string]Lease, len(leases))
	for _, l := range leases {
		out[l.Name] = l
		if s, ok := c.seen[l.Name]; !ok || s.version != l.Version || paused && l.Holder != c.cfg.Me && l.HandoverFrom != c.cfg.Me {
			c.seen[l.Name] = seenLease{version: l.Version, at: now}
		}
	}
	for name := range c.seen {
		if _, ok := out[name]; !ok {
			delete(c.seen, name)
		}
	}
	return out
}

// memberDuration is the duration of this member's own Lease: with a restart time that
// applies, the restart time and a renew period more, so that a process that never
// comes back loses its instances after the routers dropped its routes (they count
// the restart time from the session's end, at or after the last renewal), never
// while they still send traffic to its node.
func (c *Core) memberDuration() time.Duration {
	if t := c.restartTime(); t > 0 {
		return t + c.cfg.Renew
	}
	return c.cfg.Duration
}

// restartTime is Config.RestartTime when it applies: ProtocolMemberBound with probes
// (the probes still find a node that is gone), and longer than Duration.
func (c *Core) restartTime() time.Duration {
	if c.cfg.Protocol == ProtocolMemberBound && c.cfg.Probe != "" && c.cfg.RestartTime > c.cfg.Duration {
		return c.cfg.RestartTime
	}
	return 0
}

// inherited reports whether an instance Lease was written for this member by its
// previous process and this one takes it back (Local.Restarting).
func (c *Core) inherited(r *round, l Lease) bool {
	return r.local.Restarting && l.Holder == c.cfg.Me && l.HandoverFrom == "" && !c.ours(l)
}

// instanceLease is the Lease fields this member writes as holder of an instance.
func (c *Core) instanceLease(name string) Lease {
	l := Lease{Name: name, Holder: c.cfg.Me, Duration: c.cfg.Duration}
	if c.cfg.Protocol == ProtocolMemberBound {
		l.Incarnation = c.cfg.Incarnation
	}
	return l
}

// handoverTimeout is how long a handover may wait for its acknowledgement.
func (c *Core) handoverTimeout() time.Duration {
	if c.cfg.Protocol == ProtocolMemberBound && c.cfg.HandoverTimeout > 0 {
		return c.cfg.HandoverTimeout
	}
	return c.cfg.Duration
}

// ours reports whether an instance Lease held by this member's name is this
// process's: one held by a previous process of the same member is not (its
// connections and routes are gone), so it is taken like any expired Lease.
func (c *Core) ours(l Lease) bool {
	return l.Holder == c.cfg.Me && (c.cfg.Protocol == ProtocolRenewed || l.Incarnation == "" || l.Incarnation == c.cfg.Incarnation)
}

// until is when an instance Lease stops counting as held, in this member's view.
func (c *Core) until(r *round, l Lease) time.Time {
	if l.Holder == "" || c.cfg.Protocol == ProtocolRenewed || l.HandoverFrom != "" {
		return c.expiry(l)
	}
	if l.Holder == c.cfg.Me {
		if c.inherited(r, l) {
			return r.now.Add(c.cfg.Duration) // being taken back
		}
		if !c.ours(l) {
			return c.seen[l.Name].at
		}
		return c.memberRenewed.Add(c.cfg.Duration)
	}
	ml, ok := r.leases[MemberLeaseName(l.Holder)]
	if !ok || ml.Member == nil || ml.Holder != l.Holder ||
		l.Incarnation != "" && ml.Member.Incarnation != l.Incarnation && !ml.Member.Restarting {
		return c.seen[l.Name].at // its holder is gone or restarted
	}
	if c.isDead(ml) {
		return r.now
	}
	return c.expiry(ml)
}

// deadMember is a member this member's probes found dead: the incarnation probed and
// the version of its member Lease then.
type deadMember struct{ incarnation, version string }

// isDead reports whether the member of member Lease ml was found dead by this
// member's probes, or by another live member's (published on its member Lease), and
// has not renewed its member Lease since.
func (c *Core) isDead(ml Lease) bool {
	if ml.Member == nil || ml.Member.Restarting {
		return false // a restarting member is taking its instances back
	}
	if d, ok := c.dead[ml.Holder]; ok && d.incarnation == ml.Member.Incarnation && d.version == ml.Version {
		return true
	}
	return c.reported[deadKey(ml.Holder, ml.Member.Incarnation, ml.Version)]
}

func deadKey(member, incarnation, version string) string {
	return member + "@" + incarnation + "@" + version
}

// deadList is this member's findings as published on its member Lease.
func (c *Core) deadList() []string {
	out := make([]string, 0, len(c.dead))
	for m, d := range c.dead {
		out = append(out, deadKey(m, d.incarnation, d.version))
	}
	slices.Sort(out)
	return out
}

// suspect records what the probes say: a member found dead stays dead in this
// member's view while its member Lease does not change (a dead process renews
// nothing), even once it is not probed any more; a renewal (the probe was wrong, or
// the network between the two healed) or a new incarnation clears it.
func (c *Core) suspect(r *round, suspects map[string]string) {
	// A member whose own routes reach no router (its link is cut, say) cannot tell
	// a dead peer from its own isolation: its probes say nothing.
	if !r.local.Announcing {
		suspects = nil
	}
	for m, inc := range suspects {
		if ml, ok := r.leases[MemberLeaseName(m)]; ok && ml.Member != nil && ml.Member.Incarnation == inc && ml.Holder == m {
			c.dead[m] = deadMember{incarnation: inc, version: ml.Version}
		}
	}
	for m, d := range c.dead {
		if ml, ok := r.leases[MemberLeaseName(m)]; !ok || ml.Member == nil || d.incarnation != ml.Member.Incarnation || d.version != ml.Version {
			delete(c.dead, m)
		}
	}
	// What other members found, from their member Leases while they count.
	c.reported = map[string]bool{}
	for _, l := range r.leases {
		if l.Member == nil || !IsMemberLease(l.Name) || l.Holder == c.cfg.Me || !r.now.Before(c.expiry(l)) ||
			!l.Member.Announcing {
			continue // nor do the findings of a member whose routes reach no router
		}
		for _, k := range l.Member.Dead {
			c.reported[k] = true
		}
	}
}

// Step decides this round's writes. Make them (in any order, or concurrently) and
// pass their results, in the same order, to Advance before the next Step.
func (c *Core) Step(in Input) []Write {
	now := in.Now
	renew, grace := c.cfg.Renew, c.cfg.Grace
	r := &round{now: now, next: now.Add(renew), local: in.Local, master: map[string]bool{}, targets: map[int]string{}, handed: map[string]bool{}}
	c.r = r
	r.leases = c.observe(now, in.Leases)
	c.suspect(r, in.Local.Suspects)
	me := c.cfg.Me
	loc := in.Local

	var dead []string
	if loc.Announcing {
		dead = c.deadList()
	}
	if now.Sub(c.memberRenewed) >= renew || loc.Leaving && !c.written.Leaving ||
		loc.Announcing != c.written.Announcing || loc.Maintenance != c.written.Maintenance ||
		loc.Restarting != c.written.Restarting || !slices.Equal(dead, c.writtenDead) {
		name := MemberLeaseName(me)
		base := r.leases[name]
		r.write(Write{
			Kind: KindMember, Base: base.Version, Acquire: base.Holder != me,
			Lease: Lease{Name: name, Holder: me, Duration: c.memberDuration(), Member: &Member{
				Addresses: slices.Clone(c.cfg.Addresses), Incarnation: c.cfg.Incarnation,
				Leaving: loc.Leaving, Announcing: loc.Announcing, Maintenance: loc.Maintenance, Probe: c.cfg.Probe, Dead: dead,
				RestartTime: c.restartTime(), Restarting: loc.Restarting,
			}},
		})
	}
	// Liveness of this member is its last successful member write: a write made now
	// counts from Advance on.
	r.meLive = now.Sub(c.memberRenewed) < c.cfg.Duration
	eligible := r.meLive && !c.excluded[me] && !loc.Leaving && loc.Maintenance == ""
	// A member takes mastership only when its master routes would reach the routers:
	// while a restarted member's sessions come up, the routers would otherwise see no
	// master route and spread the VIP over the backups, which do not know the
	// connections in flight (the old master demotes on the new one's word).
	canTake := eligible && loc.Announcing

	// Who masters what.
	names := c.cfg.Instances.Names()
	current := map[string]string{}
	stale := map[string]bool{} // holders of an expired instance Lease: not live
	for _, inst := range names {
		l, ok := r.leases[InstanceLeaseName(inst)]
		if !ok || l.Holder == "" {
			continue
		}
		if exp := c.until(r, l); now.Before(exp) {
			current[inst] = l.Holder
			if l.Holder != me {
				r.soon(exp.Add(10 * time.Millisecond))
			}
		} else if l.Holder != me {
			stale[l.Holder] = true
		}
	}
	// Members Rebalance may give instances to: alive, not leaving, not in maintenance,
	// and announcing or already holding an instance (a session flap does not move
	// mastership).
	holds := map[string]bool{}
	for _, h := range current {
		holds[h] = true
	}
	live := map[string]bool{}
	for _, l := range r.leases {
		if l.Member == nil || !IsMemberLease(l.Name) {
			continue
		}
		h := l.Holder
		if h == "" || h == me || stale[h] || l.Member.Leaving {
			continue
		}
		if c.isDead(l) {
			continue // found dead by this member's probes
		}
		if exp := c.expiry(l); now.Before(exp) {
			live[h] = l.Member.Maintenance == "" && (l.Member.Announcing || holds[h])
			r.soon(exp.Add(10 * time.Millisecond))
		}
	}
	if r.meLive && !loc.Leaving {
		live[me] = loc.Maintenance == "" && (loc.Announcing || holds[me])
	}
	var members []string
	for m, ok := range live {
		if ok {
			members = append(members, m)
		}
	}
	pref := shard.Rebalance(c.cfg.Instances, members, c.excluded, current)
	r.successors = c.successors(members, current, pref)
	r.announcedSucc = c.announcedSuccessors(r, current)
	if c.cfg.MaxBackups > 0 {
		r.announce = c.announced(members, current, pref, r.successors)
	}
	if c.cfg.Protocol == ProtocolMemberBound {
		probe := map[string]bool{}
		for inst, succ := range r.successors {
			if h := current[inst]; succ == me && h != "" && h != me {
				probe[h] = true
			}
		}
		r.probe = slices.Sorted(maps.Keys(probe))
	}

	for _, inst := range names {
		name := InstanceLeaseName(inst)
		l, exists := r.leases[name]
		h := l.Holder
		switch {
		case h == me && l.HandoverFrom != "":
			// Whatever incarnation the handing member recorded: a handover meant for
			// an earlier process of this member is this one's to acknowledge.
			// Handed to us: announce as master first, acknowledge after. Segments of
			// connections the previous master still serves are handed back to it. A
			// handover not acknowledged within the Lease's duration has expired: the
			// previous holder stops announcing then, and so does this member.
			exp := c.expiry(l)
			if !now.Before(exp) {
				continue
			}
			r.soon(exp)
			r.master[inst] = true
			ack := c.instanceLease(name)
			r.acks = append(r.acks, Write{Kind: KindAcknowledge, Instance: inst, Base: l.Version, Lease: ack})
			from := l.HandoverFrom
			if ml, ok := r.leases[MemberLeaseName(from)]; ok && ml.Member != nil && ml.Member.Incarnation != "" {
				c.previous[inst] = previousMaster{member: from, incarnation: ml.Member.Incarnation}
			}
			continue
		case c.inherited(r, l):
			// Written by this member's previous process: take it back at once, as the
			// routers still send the instance's traffic here.
			if r.meLive && !loc.Leaving {
				i := r.write(Write{Kind: KindTake, Instance: inst, Base: l.Version, Lease: c.instanceLease(name), Acquire: true})
				r.targets[i] = me
			}
			continue
		case c.ours(l):
			r.master[inst] = true
			// Renewals failing for a whole lease duration: others may hold it by now.
			// Wake at the expiry to stop announcing then; Advance checks.
			r.check = append(r.check, inst)
			if exp := c.until(r, l); now.Before(exp) {
				r.soon(exp)
			}
			target := pref[inst]
			heldFor := now.Sub(c.seen[name].at)
			// A member whose own member Lease is stale (it could not renew it, or its
			// process was paused) decides nothing but renewals until it renewed it.
			if r.meLive && target != "" && target != me && live[target] && (heldFor >= min(renew, time.Second) || !eligible) {
				hand := Lease{Name: name, Holder: target, Duration: c.handoverTimeout(), HandoverFrom: me}
				if tl, ok := r.leases[MemberLeaseName(target)]; ok && tl.Member != nil && c.cfg.Protocol == ProtocolMemberBound {
					hand.Incarnation = tl.Member.Incarnation
				}
				i := r.write(Write{Kind: KindHandOver, Instance: inst, Base: l.Version, Lease: hand, Acquire: true})
				r.targets[i] = target
				continue
			}
			if r.meLive && !eligible && target == "" {
				r.write(Write{Kind: KindRelease, Instance: inst, Base: l.Version, Lease: Lease{Name: name, Duration: time.Second}})
				continue
			}
			if c.cfg.Protocol == ProtocolRenewed && heldFor >= renew {
				r.write(Write{Kind: KindRenew, Instance: inst, Base: l.Version, Lease: c.instanceLease(name)})
			}
			continue
		case h != "" && c.handover[inst] == h:
			switch {
			case !now.Before(c.until(r, l)):
				delete(c.handover, inst)
				r.events = append(r.events, Event{Kind: EventHandoverLost, Instance: inst, Member: h})
			case l.HandoverFrom == me:
				r.master[inst] = true // keep announcing until the new master does
				r.soon(now.Add(50 * time.Millisecond))
				continue
			default:
				delete(c.handover, inst)
				r.events = append(r.events, Event{Kind: EventHandoverAcknowledged, Instance: inst, Member: h})
			}
		default:
			delete(c.handover, inst)
		}

		// Not ours: take it when it has no master, if we are the preferred member or
		// the preferred member let the grace pass.
		if !canTake {
			continue
		}
		if !exists {
			since, ok := c.missingSince[inst]
			if !ok {
				since = now
				c.missingSince[inst] = now
			}
			if pref[inst] == me || !now.Before(since.Add(grace)) {
				r.write(Write{Kind: KindTake, Instance: inst, Lease: c.instanceLease(name), Acquire: true})
			} else {
				r.soon(since.Add(grace))
			}
			continue
		}
		delete(c.missingSince, inst)
		exp := c.until(r, l)
		if now.Before(exp) {
			continue
		}
		if pref[inst] == me || !now.Before(exp.Add(grace)) {
			i := r.write(Write{Kind: KindTake, Instance: inst, Base: l.Version, Lease: c.instanceLease(name), Acquire: true})
			r.targets[i] = h // the previous holder, for the event
		} else {
			r.soon(exp.Add(grace))
		}
	}
	return slices.Clone(r.writes)
}

// Advance takes the results of the writes Step returned, in the same order (a
// missing result counts as failed), and says what to announce. now is the time the
// writes are done: a round can last longer than a Lease (a slow API server, a busy
// node), so every mastership is judged again at now, and one whose Lease has expired
// meanwhile in this member's view is not announced (others may hold it by now).
func (c *Core) Advance(now time.Time, results []Result) Outcome {
	r := c.r
	if r == nil {
		return Outcome{Masters: maps.Clone(c.masters), Handoffs: maps.Clone(c.handoffs)}
	}
	if now.Before(r.now) {
		now = r.now
	}
	for i, w := range r.writes {
		res := Result{Err: fmt.Errorf("no result")}
		if i < len(results) {
			res = results[i]
		}
		if res.Err != nil {
			r.events = append(r.events, Event{Kind: EventWriteFailed, Instance: w.Instance, Write: w.Kind, Err: res.Err})
		} else {
			c.stored(r, res)
		}
		switch w.Kind {
		case KindMember:
			if res.Err != nil {
				continue
			}
			wasLive := r.meLive
			c.memberRenewed = sentAt(r, res)
			if w.Lease.Member.Announcing != c.written.Announcing {
				r.events = append(r.events, Event{Kind: EventAnnouncing, Member: fmt.Sprint(w.Lease.Member.Announcing)})
			}
			if w.Lease.Member.Maintenance != c.written.Maintenance {
				r.events = append(r.events, Event{Kind: EventMaintenance, Member: cmp.Or(w.Lease.Member.Maintenance, "none")})
			}
			c.written = Local{Leaving: w.Lease.Member.Leaving, Announcing: w.Lease.Member.Announcing, Maintenance: w.Lease.Member.Maintenance, Restarting: w.Lease.Member.Restarting}
			c.writtenDead = w.Lease.Member.Dead
			if !wasLive {
				r.next = r.now // decisions waited for this member to be live
			}
		case KindTake:
			if res.Err == nil {
				r.master[w.Instance] = true
				r.events = append(r.events, Event{Kind: EventTook, Instance: w.Instance, Member: r.targets[i]})
			}
		case KindHandOver:
			if res.Err == nil {
				c.handover[w.Instance] = r.targets[i]
				r.handed[w.Instance] = true
				r.events = append(r.events, Event{Kind: EventHandingOver, Instance: w.Instance, Member: r.targets[i]})
			}
		case KindRelease:
			if res.Err == nil {
				r.master[w.Instance] = false
				r.events = append(r.events, Event{Kind: EventReleased, Instance: w.Instance})
			}
		}
	}
	for _, inst := range r.check {
		if r.handed[inst] || !r.master[inst] {
			continue // handed over (announce until acknowledged) or released
		}
		if l, ok := r.leases[InstanceLeaseName(inst)]; !ok || !c.ours(l) {
			r.master[inst] = false
		}
	}
	for inst, m := range r.master {
		if l, ok := r.leases[InstanceLeaseName(inst)]; m && (!ok || !now.Before(c.until(r, l))) {
			r.master[inst] = false
		}
	}
	holders := map[string]string{}
	for _, inst := range c.cfg.Instances.Names() {
		if l, ok := r.leases[InstanceLeaseName(inst)]; ok && l.Holder != "" && now.Before(c.until(r, l)) {
			holders[inst] = l.Holder
		}
	}
	master := map[string]bool{}
	until := map[string]time.Time{}
	for inst, m := range r.master {
		if m {
			master[inst] = true
			until[inst] = c.until(r, r.leases[InstanceLeaseName(inst)])
		}
	}
	handoffs := c.handoffTargets(r, master)
	out := Outcome{
		Masters: master, Until: until, Holders: holders, Probe: r.probe, Announce: r.announce, Handoffs: handoffs, Successors: r.successors,
		AnnouncedSuccessors: r.announcedSucc, Acks: r.acks,
		Changed: !maps.Equal(c.masters, master) || !maps.EqualFunc(c.handoffs, handoffs, slices.Equal) ||
			!maps.Equal(c.lastSuccessors, r.successors) || !maps.Equal(c.announcedSucc, r.announcedSucc),
		Next: r.next, Events: r.events,
	}
	c.masters, c.handoffs, c.lastSuccessors, c.announcedSucc = master, handoffs, r.successors, r.announcedSucc
	if len(r.acks) > 0 {
		r.events = nil // Acknowledged reports its own
	} else {
		c.r = nil
	}
	return out
}

// Acknowledged takes the results of an Outcome's Acks, in order, and says when to
// step again at the latest (zero: no sooner than the Outcome's Next).
func (c *Core) Acknowledged(results []Result) ([]Event, time.Time) {
	// The Masters of the Outcome stand: an acknowledgement only renews.
	r := c.r
	c.r = nil
	if r == nil {
		return nil, time.Time{}
	}
	var retry time.Time
	var events []Event
	for i, w := range r.acks {
		res := Result{Err: fmt.Errorf("no result")}
		if i < len(results) {
			res = results[i]
		}
		if res.Err != nil {
			events = append(events, Event{Kind: EventWriteFailed, Instance: w.Instance, Write: w.Kind, Err: res.Err})
			retry = r.now.Add(100 * time.Millisecond)
			continue
		}
		c.stored(r, res)
		events = append(events, Event{Kind: EventTookOver, Instance: w.Instance})
	}
	return events, retry
}

// stored records a Lease as written: its version counts from when it was sent.
func (c *Core) stored(r *round, res Result) {
	if res.Lease.Name == "" {
		return
	}
	r.leases[res.Lease.Name] = res.Lease
	c.seen[res.Lease.Name] = seenLease{version: res.Lease.Version, at: sentAt(r, res)}
}

func sentAt(r *round, res Result) time.Time {
	if res.At.IsZero() || res.At.Before(r.now) {
		return r.now
	}
	return res.At
}

// handoffTargets keeps the previous master of each instance this member masters
// while that process lives (its member Lease, same incarnation, not expired), and not
// while this member hands the instance on itself: then two members could send a
// segment neither knows back and forth.
func (c *Core) handoffTargets(r *round, master map[string]bool) map[string][]netip.Addr {
	out := map[string][]netip.Addr{}
	for inst, p := range c.previous {
		ml, ok := r.leases[MemberLeaseName(p.member)]
		if !master[inst] || c.handover[inst] != "" || !ok || ml.Member == nil ||
			ml.Member.Incarnation != p.incarnation || !r.now.Before(c.expiry(ml)) {
			delete(c.previous, inst)
			continue
		}
		r.soon(c.expiry(ml).Add(10 * time.Millisecond))
		if len(ml.Member.Addresses) > 0 {
			out[inst] = slices.Clone(ml.Member.Addresses)
		}
	}
	return out
}

// announcedSuccessors is r.successors less the instances this member has become the
// successor of within Config.SuccessorHold of their master changing: the new master
// was their successor until it wrote its Lease, and its master route leaves only
// after that; announcing a second successor route before it would let a router
// spread the VIP over the two. An instance this member was already announcing as
// successor stays announced.
func (c *Core) announcedSuccessors(r *round, current map[string]string) map[string]string {
	hold := c.cfg.SuccessorHold
	if hold == 0 {
		hold = 500 * time.Millisecond
	}
	for _, inst := range c.cfg.Instances.Names() {
		if h := current[inst]; h != c.holderOf[inst] {
			c.holderOf[inst], c.holderSince[inst] = h, r.now
		}
	}
	out := make(map[string]string, len(r.successors))
	for inst, succ := range r.successors {
		if succ == c.cfg.Me && hold > 0 && c.announcedSucc[inst] != succ {
			if until := c.holderSince[inst].Add(hold); r.now.Before(until) {
				r.soon(until)
				continue
			}
		}
		out[inst] = succ
	}
	return out
}

// successors says, for each instance, who would master it if its current master
// failed: Rebalance over the members without that master, the other masters keeping
// their instances: exactly what every member computes once that master's Leases
// expired, so the member routers prefer among the backups is the one that takes over.
// An instance without a master goes to its preferred member. The result only changes
// with members and masters, so it is cached on them.
func (c *Core) successors(members []string, current, pref map[string]string) map[string]string {
	members = slices.Sorted(slices.Values(members))
	var key strings.Builder
	key.WriteString(strings.Join(members, ","))
	names := c.cfg.Instances.Names()
	for _, inst := range names {
		key.WriteString("|" + current[inst] + ">" + pref[inst])
	}
	if c.succMemo != nil && key.String() == c.succKey {
		return c.succMemo
	}
	out := map[string]string{}
	without := map[string]map[string]string{} // failed master -> Rebalance without it
	for _, inst := range names {
		m, ok := current[inst]
		if !ok {
			if p := pref[inst]; p != "" {
				out[inst] = p
			}
			continue
		}
		after, ok := without[m]
		if !ok {
			rest := make([]string, 0, len(members))
			for _, o := range members {
				if o != m {
					rest = append(rest, o)
				}
			}
			kept := map[string]string{}
			for i, h := range current {
				if h != m {
					kept[i] = h
				}
			}
			after = shard.Rebalance(c.cfg.Instances, rest, c.excluded, kept)
			without[m] = after
		}
		if s := after[inst]; s != "" {
			out[inst] = s
		}
	}
	c.succKey, c.succMemo = key.String(), out
	return out
}

// announced says which instances this member announces with MaxBackups set: the
// instances it masters or would master (current holder, else preferred member), and
// those for which it is among the successor and the next MaxBackups-1 members by
// rendezvous rank of the others. Every member computes the same sets from the same
// Leases, so each instance is announced by its master and MaxBackups backups.
func (c *Core) announced(members []string, current, pref, successors map[string]string) map[string]bool {
	me := c.cfg.Me
	out := map[string]bool{}
	for _, inst := range c.cfg.Instances.Names() {
		master := current[inst]
		if master == "" {
			master = pref[inst]
		}
		if master == me {
			out[inst] = true
			continue
		}
		chosen := 0
		if s := successors[inst]; s != "" && s != master {
			if s == me {
				out[inst] = true
				continue
			}
			chosen = 1
		}
		var rest []string
		for _, m := range members {
			if m != master && m != successors[inst] && !c.excluded[m] {
				rest = append(rest, m)
			}
		}
		for _, m := range shard.Rank(inst, rest) {
			if chosen >= c.cfg.MaxBackups {
				break
			}
			if m == me {
				out[inst] = true
				break
			}
			chosen++
		}
	}
	return out
}

// Release returns the writes that give up, at shutdown, every instance Lease this
// member still holds, so its next master need not wait for expiry. Their results
// need not be fed back: the Core is done.
func (c *Core) Release(leases []Lease) []Write {
	var out []Write
	for _, l := range leases {
		if l.Holder != c.cfg.Me || IsMemberLease(l.Name) || !strings.HasPrefix(l.Name, instanceLeasePrefix) {
			continue
		}
		inst := strings.TrimPrefix(l.Name, instanceLeasePrefix)
		out = append(out, Write{Kind: KindRelease, Instance: inst, Base: l.Version, Lease: Lease{Name: l.Name, Duration: time.Second}})
	}
	slices.SortFunc(out, func(a, b Write) int { return strings.Compare(a.Lease.Name, b.Lease.Name) })
	c.masters = map[string]bool{}
	return out
}
