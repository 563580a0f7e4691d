// Package ipam decides which VIP each LoadBalancer service gets: from which pool, which
// address, and whether two services may share one (kube-loxilb's shared and --setUniqueIP
// modes). It is pure: values in, values out; Kubernetes stays the store through Restore.
package ipam

import (
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
	"slices"
	"strings"
)

var (
	// ErrPoolExhausted: the pool has no address left for the request.
	ErrPoolExhausted = errors.New("pool exhausted")
	// ErrUnknownPool: no pool of the request's family has the selected name.
	ErrUnknownPool = errors.New("unknown pool")
	// ErrNoPool: the request's family has no pool at all.
	ErrNoPool = errors.New("no pool for the address family")
	// ErrStaticIPConflict: the address is used by another service; the error is a
	// *ConflictError naming both.
	ErrStaticIPConflict = errors.New("IP already in use")
	// ErrInvalidRequest: a request or a restored record is malformed.
	ErrInvalidRequest = errors.New("invalid request")
)

// ConflictError says that Requester asked for an address Holder already uses.
type ConflictError struct {
	IP        netip.Addr
	Holder    string
	Requester string
	Ports     []PortKey // in shared mode, the ports both services want; empty in unique mode
}

func (e *ConflictError) Error() string {
	if len(e.Ports) > 0 {
		return fmt.Sprintf("%s: %s is used by %s for %v, requested by %s", ErrStaticIPConflict, e.IP, e.Holder, e.Ports, e.Requester)
	}
	return fmt.Sprintf("%s: %s is used by %s, requested by %s", ErrStaticIPConflict, e.IP, e.Holder, e.Requester)
}

// Is makes errors.Is(err, ErrStaticIPConflict) hold.
func (e *ConflictError) Is(target error) bool { return target == ErrStaticIPConflict }

// Request asks for one address of one family for one service.
type Request struct {
	Service string // namespace/name
	Family  Family // IPv4 or IPv6
	Pool    string // annotation loxilb.io/poolSelect; "" = Pools
	// Pools are the pools a request without Pool or StaticIP may use, by name, in
	// order of preference: the first with an address for the request serves it. nil
	// is the first pool of the family; an empty, non-nil list is no pool (ErrNoPool).
	Pools    []string
	StaticIP netip.Addr // annotation loxilb.io/staticIP; zero value = none
	Ports    []PortKey  // in shared mode, services may share an IP when their ports differ
}

// Validate reports what is malformed in r, wrapping ErrInvalidRequest.
func (r Request) Validate() error {
	if r.Service == "" {
		return fmt.Errorf("%w: no service name", ErrInvalidRequest)
	}
	if r.Family != IPv4 && r.Family != IPv6 {
		return fmt.Errorf("%w: service %s: family %v, expected IPv4 or IPv6", ErrInvalidRequest, r.Service, r.Family)
	}
	if r.StaticIP.IsValid() {
		if err := checkAddr(r.StaticIP); err != nil {
			return fmt.Errorf("%w: service %s: static IP: %w", ErrInvalidRequest, r.Service, err)
		}
		if familyOf(r.StaticIP) != r.Family {
			return fmt.Errorf("%w: service %s: static IP %s is not %v", ErrInvalidRequest, r.Service, r.StaticIP, r.Family)
		}
	}
	return checkPorts(r.Service, r.Ports)
}

func checkPorts(service string, ports []PortKey) error {
	for _, p := range ports {
		if p.Protocol == 0 || p.Port == 0 {
			return fmt.Errorf("%w: service %s: port %v, expected a protocol and a port above 0", ErrInvalidRequest, service, p)
		}
	}
	return nil
}

// maxInterned is the most ports a set may have to be interned (see portSets); larger
// sets are rare and each gets its own copy.
const maxInterned = 8

// normalize is ports sorted and without repeats, in buf when they fit: the caller keeps
// only what portSets.intern gives back, so buf stays on its stack.
func normalize(buf *[maxInterned]PortKey, ports []PortKey) []PortKey {
	if len(ports) == 0 {
		return nil
	}
	out := buf[:0]
	if len(ports) > maxInterned {
		out = nil
	}
	out = append(out, ports...)
	slices.SortFunc(out, comparePorts)
	return slices.Compact(out)
}

// portSets interns the normalised port sets of the records, counting the records using
// each. Most services use one of a few sets (80/tcp, 443/tcp), and sharing one array per
// set keeps it in the cache when shared mode reads the ports of an address, and spares
// an allocation per Allocate.
type portSets map[string]*portSet

type portSet struct {
	ports []PortKey
	refs  int
}

func portsKey(buf *[3 * maxInterned]byte, ports []PortKey) []byte {
	k := buf[:0]
	for _, p := range ports {
		k = append(k, p.Protocol, byte(p.Port>>8), byte(p.Port))
	}
	return k
}

// intern is the shared copy of normalised ports, counting one more user.
func (m portSets) intern(ports []PortKey) []PortKey {
	if len(ports) == 0 {
		return nil
	}
	if len(ports) > maxInterned {
		return slices.Clone(ports)
	}
	var buf [3 * maxInterned]byte
	k := portsKey(&buf, ports)
	if s, ok := m[string(k)]; ok {
		s.refs++
		return s.ports
	}
	s := &portSet{ports: slices.Clip(slices.Clone(ports)), refs: 1}
	m[string(k)] = s
	return s.ports
}

// release counts one user of interned ports less, and forgets a set nobody uses.
func (m portSets) release(ports []PortKey) {
	if len(ports) == 0 || len(ports) > maxInterned {
		return
	}
	var buf [3 * maxInterned]byte
	k := portsKey(&buf, ports)
	if s := m[string(k)]; s != nil {
		if s.refs--; s.refs == 0 {
			delete(m, string(k))
		}
	}
}

// Allocation is the address a service holds in one family.
type Allocation struct {
	Service string
	Pool    string // "" for a static IP outside every pool
	IP      netip.Addr
	Ports   []PortKey // sorted, without repeats
}

// PoolStats describes one pool for metrics and the CLI.
type PoolStats struct {
	Name     string
	Family   Family
	Size     uint64 // addresses the pool hands out; saturates at 2^64-1 for larger IPv6 pools
	Used     int    // addresses in use
	Services int    // allocations in the pool (more than Used when services share addresses)
}

type pool struct {
	spec        PoolSpec
	family      Family
	first, last u128
	size        uint64 // span, saturated
	// maxDense is the largest the bitmap may grow: the pool's size rounded up to a power
	// of two, at most maxDenseLimit. A pool larger than that (IPv6) cannot hand out its
	// addresses past it dynamically, which memory would not allow anyway.
	maxDense uint64
	dense    dense // offsets below dense.limit
	sparse   tree  // static addresses at or beyond dense.limit
	services int
}

// minDense is how far the bitmap may grow for a static address even while the pool is
// nearly empty: a few kilobytes. Beyond that it grows for a static address only to four
// times the addresses in use, so memory stays linear in use, not in the address's value.
const minDense = 1024

func newPool(s PoolSpec, shared bool) *pool {
	p := &pool{spec: s, family: s.Family(), first: keyOf(s.First), last: keyOf(s.Last)}
	p.size = span(p.first, p.last)
	p.maxDense = maxDenseLimit
	if p.size <= p.maxDense {
		p.maxDense = max(64, uint64(1)<<bits.Len64(p.size-1))
	}
	p.dense.shared, p.sparse.shared = shared, shared
	return p
}

func (p *pool) used() int { return p.dense.n + p.sparse.len() }

// denseOffset is k's offset from the pool's first address when the bitmap covers it.
func (p *pool) denseOffset(k u128) (uint64, bool) {
	off := k.sub(p.first)
	return off.lo, off.hi == 0 && off.lo < p.dense.limit
}

// slotAt is the slot of address k, nil when k is free.
func (p *pool) slotAt(k u128) *slot {
	if o, ok := p.denseOffset(k); ok {
		if p.dense.isUsed(o) {
			return &p.dense.slots[o]
		}
		return nil
	}
	if n := p.sparse.get(k); n != nil {
		return &n.slot
	}
	return nil
}

// add gives service address k, shared with its holders if any.
func (p *pool) add(k u128, service string, ports []PortKey) {
	p.reach(k)
	if o, ok := p.denseOffset(k); ok {
		p.dense.add(o, service, ports)
		return
	}
	if n := p.sparse.get(k); n != nil {
		n.addHolder(service, ports)
		p.sparse.refresh(k)
		return
	}
	n := newNode(k)
	n.addHolder(service, ports)
	p.sparse.insert(n)
}

func (p *pool) remove(k u128, service string) {
	if o, ok := p.denseOffset(k); ok {
		p.dense.remove(o, service)
		return
	}
	p.sparse.release(k, service)
}

// reach grows the bitmap over static address k when that keeps its memory linear in
// the addresses used.
func (p *pool) reach(k u128) {
	off := k.sub(p.first)
	if off.hi != 0 || off.lo < p.dense.limit || off.lo >= p.maxDense {
		return
	}
	want := max(64, uint64(1)<<bits.Len64(off.lo))
	if want <= max(minDense, 4*uint64(p.used()+1)) {
		p.grow(want)
	}
}

// grow extends the bitmap to limit and moves the static addresses it now covers out of
// the treap.
func (p *pool) grow(limit uint64) {
	d := &p.dense
	d.extend(limit)
	for m := p.sparse.min(); m != nil; m = p.sparse.min() {
		o, ok := p.denseOffset(m.key)
		if !ok {
			break
		}
		p.sparse.popMin()
		d.slots[o] = m.slot
		d.used[o>>6] |= 1 << (o & 63)
		d.n++
	}
	d.rebuild()
}

func (p *pool) contains(ip netip.Addr) bool {
	return ip.IsValid() && familyOf(ip) == p.family && !ip.Less(p.spec.First) && !p.spec.Last.Less(ip)
}

// presize grows the bitmap once over the addresses allocs restore into the pool, as far
// as reach will allow when all of them are in, instead of step by step (and through the
// treap) as records arrive in no particular order.
func (p *pool) presize(allocs []Allocation) {
	n := p.used()
	for _, al := range allocs {
		if p.contains(al.IP) {
			n++
		}
	}
	if n == p.used() {
		return
	}
	allowed := max(minDense, 4*uint64(n+1))
	var want uint64
	for _, al := range allocs {
		if !p.contains(al.IP) {
			continue
		}
		off := keyOf(al.IP).sub(p.first)
		if off.hi != 0 || off.lo >= p.maxDense {
			continue
		}
		if w := max(64, uint64(1)<<bits.Len64(off.lo)); w <= allowed {
			want = max(want, w)
		}
	}
	if want > p.dense.limit {
		p.grow(want)
	}
}

// lowestFree is the lowest free address of the pool.
func (p *pool) lowestFree() (u128, bool) {
	for {
		if o, ok := p.dense.lowestFree(); ok {
			// Beyond the pool's last address only when every address of the pool is used.
			return u128{0, o}.add(p.first), o < p.size
		}
		if p.dense.limit >= p.maxDense {
			return u128{}, false
		}
		// Every address below limit is used: the lowest free one is at or beyond it.
		p.grow(max(64, 2*p.dense.limit))
	}
}

// lowestShareable is the lowest used address none of whose holders has a port in ports.
func (p *pool) lowestShareable(ports []PortKey) (u128, bool) {
	if o, ok := p.dense.shareable(ports); ok {
		return u128{0, o}.add(p.first), true
	}
	if n := p.sparse.lowestShareable(ports); n != nil {
		return n.key, true
	}
	return u128{}, false
}

func (p *pool) visits() uint64 { return p.dense.visits + p.sparse.visits }

type record struct {
	pool  *pool // nil outside every pool
	ip    netip.Addr
	ports []PortKey
}

// Allocator hands out VIPs from pools and remembers who holds what.
//
// It is not safe for concurrent use: the controller serialises its calls.
type Allocator struct {
	unique bool
	pools  []*pool // in the order given to New; the first of a family is its default
	// outside holds static IPs that are in no pool, so that they still conflict.
	outside  map[netip.Addr]*slot
	services map[string][2]record // index 0 IPv4, 1 IPv6; a zero record is none
	sets     portSets             // the ports of every record
}

func famIndex(f Family) int {
	if f == IPv6 {
		return 1
	}
	return 0
}

// New makes an allocator over IPv4 and IPv6 pools together. unique is --setUniqueIP:
// one address per service. Otherwise services share an address when their ports do not
// overlap, as kube-loxilb does by default.
func New(pools []PoolSpec, unique bool) (*Allocator, error) {
	if err := checkRanges(pools); err != nil {
		return nil, err
	}
	a := &Allocator{
		unique:   unique,
		outside:  map[netip.Addr]*slot{},
		services: map[string][2]record{},
		sets:     portSets{},
	}
	for _, s := range pools {
		a.pools = append(a.pools, newPool(s, !unique))
	}
	return a, nil
}

// Allocate gives r.Service an address of r.Family. It is idempotent per (service,
// family): a service that already holds an address gets that allocation back whatever
// the request says now; to move it, Release first.
//
// Unique mode hands out the lowest free address of the pool. Shared mode hands out the
// lowest used address whose services' ports do not overlap r.Ports, else the lowest free
// one. A static IP inside a pool is reserved there, outside every pool it is accepted;
// one another service uses (in shared mode: with an overlapping port) is a conflict.
//
// Cost: O(log64 n) bitmap words for n addresses in use, plus a few map operations per
// port of the request; in shared mode a request with several ports may have to pass
// over addresses that each hold one of them (see dense.ports).
func (a *Allocator) Allocate(r Request) (Allocation, error) {
	if err := r.Validate(); err != nil {
		return Allocation{}, err
	}
	// One map lookup here and one store in record: at 100k services the map's cache
	// misses are most of an allocation's cost.
	recs := a.services[r.Service]
	if rec := &recs[famIndex(r.Family)]; rec.ip.IsValid() {
		return rec.allocation(r.Service), nil
	}
	var buf [maxInterned]PortKey
	ports := normalize(&buf, r.Ports)
	var ps []*pool
	if r.Pool != "" || !r.StaticIP.IsValid() {
		var err error
		if ps, err = a.selectPools(r); err != nil {
			return Allocation{}, err
		}
	}
	if r.StaticIP.IsValid() {
		in := a.poolOf(r.StaticIP)
		if r.Pool != "" && !slices.Contains(ps, in) {
			return Allocation{}, fmt.Errorf("%w: service %s: static IP %s is not in the selected pool %q", ErrInvalidRequest, r.Service, r.StaticIP, r.Pool)
		}
		rec, err := a.hold(recs, in, r.StaticIP, r.Service, ports)
		if err != nil {
			return Allocation{}, err
		}
		return rec.allocation(r.Service), nil
	}

	// The ranges of one pool are tried together (in shared mode an address to share
	// in any of them before a free one), the pools one after the other.
	for i := 0; i < len(ps); {
		j := i + 1
		for j < len(ps) && ps[j].spec.Name == ps[i].spec.Name {
			j++
		}
		if !a.unique {
			for _, p := range ps[i:j] {
				if k, ok := p.lowestShareable(ports); ok {
					return a.take(recs, r.Service, p, k, ports), nil
				}
			}
		}
		for _, p := range ps[i:j] {
			if k, ok := p.lowestFree(); ok {
				return a.take(recs, r.Service, p, k, ports), nil
			}
		}
		i = j
	}
	what := "every address is in use"
	if !a.unique {
		// A copy, so that buf stays on the stack on the way that does not fail.
		what = "every address is in use by a service with one of the ports " + fmt.Sprint(slices.Clone(ports))
	}
	var names []string
	for _, p := range ps {
		names = append(names, fmt.Sprintf("%q (%s)", p.spec.Name, p.spec))
	}
	return Allocation{}, fmt.Errorf("%w: pool %s for service %s: %s", ErrPoolExhausted, strings.Join(names, ", "), r.Service, what)
}

// take gives service address k of pool p.
func (a *Allocator) take(recs [2]record, service string, p *pool, k u128, ports []PortKey) Allocation {
	kept := a.sets.intern(ports)
	p.add(k, service, kept)
	return a.record(recs, service, p, k.addr(p.family), kept).allocation(service)
}

// selectPools is the ranges that may serve r, in the order to try them; the ranges of
// one pool are next to each other.
func (a *Allocator) selectPools(r Request) ([]*pool, error) {
	named := func(name string) []*pool {
		var out []*pool
		for _, p := range a.pools {
			if p.family == r.Family && p.spec.Name == name {
				out = append(out, p)
			}
		}
		return out
	}
	var out []*pool
	switch {
	case r.Pool != "":
		out = named(r.Pool)
	case r.Pools != nil:
		for i, name := range r.Pools {
			if !slices.Contains(r.Pools[:i], name) {
				out = append(out, named(name)...)
			}
		}
		if len(out) == 0 {
			return nil, fmt.Errorf("%w: service %s asks for %v and none of the %v pools may serve it", ErrNoPool, r.Service, r.Family, r.Family)
		}
		return out, nil
	default:
		for _, p := range a.pools {
			if p.family == r.Family {
				out = named(p.spec.Name)
				break
			}
		}
	}
	if len(out) > 0 {
		return out, nil
	}
	var other *pool
	for _, p := range a.pools {
		if p.spec.Name == r.Pool {
			other = p
		}
	}
	switch {
	case r.Pool == "":
		return nil, fmt.Errorf("%w: service %s asks for %v and no %v pool is configured", ErrNoPool, r.Service, r.Family, r.Family)
	case other != nil:
		return nil, fmt.Errorf("%w: service %s selects pool %q for %v, but %q is an %v pool", ErrUnknownPool, r.Service, r.Pool, r.Family, r.Pool, other.family)
	}
	return nil, fmt.Errorf("%w: service %s selects pool %q, which is not configured", ErrUnknownPool, r.Service, r.Pool)
}

// poolOf is the pool holding ip, nil when none does (pools never overlap).
func (a *Allocator) poolOf(ip netip.Addr) *pool {
	for _, p := range a.pools {
		if p.contains(ip) {
			return p
		}
	}
	return nil
}

// hold gives service ip (in pool p, or outside every pool when p is nil) unless another
// service's use of ip conflicts.
func (a *Allocator) hold(recs [2]record, p *pool, ip netip.Addr, service string, ports []PortKey) (record, error) {
	k := keyOf(ip)
	var s *slot
	if p != nil {
		s = p.slotAt(k)
	} else {
		s = a.outside[ip]
	}
	if s != nil {
		if h, both, clash := s.conflict(ports, a.unique); clash {
			return record{}, &ConflictError{IP: ip, Holder: h.service, Requester: service, Ports: both}
		}
	}
	kept := a.sets.intern(ports)
	switch {
	case p != nil:
		p.add(k, service, kept)
	case s != nil:
		s.addHolder(service, kept)
	default:
		s = new(slot)
		s.addHolder(service, kept)
		a.outside[ip] = s
	}
	return a.record(recs, service, p, ip, kept), nil
}

// record stores that service holds ip, next to recs, what it held before.
func (a *Allocator) record(recs [2]record, service string, p *pool, ip netip.Addr, ports []PortKey) record {
	rec := record{pool: p, ip: ip, ports: ports}
	recs[famIndex(familyOf(ip))] = rec
	a.services[service] = recs
	if p != nil {
		p.services++
	}
	return rec
}

func (r record) allocation(service string) Allocation {
	al := Allocation{Service: service, IP: r.ip, Ports: slices.Clone(r.ports)}
	if r.pool != nil {
		al.Pool = r.pool.spec.Name
	}
	return al
}

// Release frees every address service holds, in every family. An unknown service is a
// no-op, so a repeated delete event does no harm.
func (a *Allocator) Release(service string) {
	recs, ok := a.services[service]
	if !ok {
		return
	}
	for _, rec := range recs {
		if !rec.ip.IsValid() {
			continue
		}
		a.sets.release(rec.ports)
		if rec.pool == nil {
			s := a.outside[rec.ip]
			s.removeHolder(service)
			if !s.inUse() {
				delete(a.outside, rec.ip)
			}
			continue
		}
		rec.pool.remove(keyOf(rec.ip), service)
		rec.pool.services--
	}
	delete(a.services, service)
}

// Restore re-applies allocations that Services already record, so a restarted controller
// hands out nothing that is taken. The address decides the pool (Allocation.Pool is not
// trusted, pools may have changed since). Records apply in the order given, so the caller
// passes the oldest service first and it keeps the address when two records conflict.
//
// Restore is idempotent: a record the allocator already holds is a no-op. Every record
// that does not conflict is applied; the error joins one error per refused record, a
// *ConflictError naming both services where two want the same address.
func (a *Allocator) Restore(allocs []Allocation) error {
	if len(a.services) == 0 {
		// Sized once instead of through every doubling on the way to len(allocs).
		a.services = make(map[string][2]record, len(allocs))
	}
	for _, p := range a.pools {
		p.presize(allocs)
	}
	var errs []error
	for _, al := range allocs {
		if err := a.restore(al); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (a *Allocator) restore(al Allocation) error {
	if al.Service == "" {
		return fmt.Errorf("%w: restored record for %s has no service name", ErrInvalidRequest, al.IP)
	}
	if !al.IP.IsValid() {
		return fmt.Errorf("%w: service %s: restored record has no IP", ErrInvalidRequest, al.Service)
	}
	if err := checkAddr(al.IP); err != nil {
		return fmt.Errorf("%w: service %s: restored IP: %w", ErrInvalidRequest, al.Service, err)
	}
	if err := checkPorts(al.Service, al.Ports); err != nil {
		return err
	}
	var buf [maxInterned]PortKey
	ports := normalize(&buf, al.Ports)
	recs := a.services[al.Service]
	if rec := recs[famIndex(familyOf(al.IP))]; rec.ip.IsValid() {
		if rec.ip == al.IP && slices.Equal(rec.ports, ports) {
			return nil
		}
		return fmt.Errorf("%w: service %s records %s %v but already holds %s %v", ErrInvalidRequest,
			al.Service, al.IP, slices.Clone(ports), rec.ip, rec.ports)
	}
	_, err := a.hold(recs, a.poolOf(al.IP), al.IP, al.Service, ports)
	return err
}

// Lookup is what service holds: IPv4 first, then IPv6; nil when nothing.
func (a *Allocator) Lookup(service string) []Allocation {
	recs, ok := a.services[service]
	if !ok {
		return nil
	}
	var out []Allocation
	for i := range recs {
		if rec := &recs[i]; rec.ip.IsValid() {
			out = append(out, rec.allocation(service))
		}
	}
	return out
}

// Pools reports every pool in the order given to New.
func (a *Allocator) Pools() []PoolStats {
	out := make([]PoolStats, 0, len(a.pools))
	for _, p := range a.pools {
		out = append(out, PoolStats{
			Name:     p.spec.Name,
			Family:   p.family,
			Size:     span(p.first, p.last),
			Used:     p.used(),
			Services: p.services,
		})
	}
	return out
}
