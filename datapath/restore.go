package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/shardlb/shardlb/shard"
)

// restored is the Go-side state rebuilt from pinned maps.
type restored struct {
	applied map[frontendKey]*applied
	rings   *rangeAlloc
	epIDs   idAlloc
	epGen   []uint32
	svcIDs  idAlloc
	vipRefs map[netip.Addr]int
	// rangeCount counts the entries of each family's source-range trie.
	rangeCount [2]int
}

// restore rebuilds the Go-side state from pinned maps. Every service entry becomes an
// applied frontend with its service id, its ring range and its endpoints (the distinct
// ids in its ring, with the address each id holds), so the next SetServices finds an
// unchanged frontend unchanged and writes nothing, and every endpoint keeps its id and
// generation: conntrack entries, which hold both, keep their endpoint. The service name
// is not in the maps; the next SetServices supplies it.
//
// A frontend's source ranges are its service entry's flag and the prefixes its family's
// trie holds for its service id.
//
// It then completes what an interrupted SetServices may have left: valid endpoints that
// no ring points to are invalidated (their generation bumped, as releaseEndpoint does),
// the vips map is made to hold exactly the VIPs of the services, trie entries of no
// restricted frontend are removed, and endpoints get their frontend's range generation.
// Anything Go never writes (rings that overlap, an endpoint id in two frontends, a ring
// pointing to an invalid endpoint, ids beyond the capacities, trie keys that are not a
// service's prefix) is an error: such maps are not adopted.
func (d *Datapath) restore(maps map[string]*ebpf.Map) (*restored, error) {
	eps, err := readArray[lbEndpoint](maps[lbMapEndpoints], d.cfg.MaxEndpoints)
	if err != nil {
		return nil, err
	}
	pairs, err := readArray[lbRingPair](maps[lbMapRingSlots], d.cfg.RingSlots/2)
	if err != nil {
		return nil, err
	}
	r := &restored{
		applied: map[frontendKey]*applied{},
		epGen:   make([]uint32, d.cfg.MaxEndpoints),
		vipRefs: map[netip.Addr]int{},
	}
	for id, e := range eps {
		r.epGen[id] = e.Gen
	}

	usedEp, usedSvc := map[uint32]bool{}, map[uint32]bool{}
	var spans []span
	var key lbServiceKey
	var val lbService
	iter := maps[lbMapServices].Iterate()
	for iter.Next(&key, &val) {
		k, a, err := d.restoreFrontend(key, val, eps, pairs)
		if err != nil {
			return nil, err
		}
		if _, dup := r.applied[k]; dup || usedSvc[a.id] {
			return nil, fmt.Errorf("frontend %s: service id %d or key used twice", k, a.id)
		}
		usedSvc[a.id] = true
		for _, id := range a.endpoints {
			if usedEp[id] {
				return nil, fmt.Errorf("frontend %s: endpoint id %d is in another frontend too", k, id)
			}
			usedEp[id] = true
		}
		spans = append(spans, span{a.ringStart, a.ringLen})
		r.applied[k] = a
		r.vipRefs[k.vip]++
	}
	if err := iter.Err(); err != nil {
		return nil, fmt.Errorf("read services: %w", err)
	}
	if r.rings, err = rangeAllocFrom(uint32(d.cfg.RingSlots), spans); err != nil {
		return nil, err
	}
	r.svcIDs = idAllocFrom(uint32(d.cfg.MaxServices), usedSvc)
	r.epIDs = idAllocFrom(uint32(d.cfg.MaxEndpoints), usedEp)
	stray, err := d.restoreRanges(r, maps)
	if err != nil {
		return nil, err
	}

	// The state is consistent: now complete what an interrupted call left.
	for id, e := range eps {
		if e.Valid == 0 || usedEp[uint32(id)] {
			continue
		}
		r.epGen[id]++
		if err := maps[lbMapEndpoints].Put(uint32(id), &lbEndpoint{Gen: r.epGen[id]}); err != nil {
			return nil, fmt.Errorf("invalidate endpoint %d no service uses: %w", id, err)
		}
	}
	if err := syncVIPs(maps[lbMapVips], r.vipRefs); err != nil {
		return nil, err
	}
	for _, del := range stray {
		if err := del(); err != nil {
			return nil, err
		}
	}
	for k, a := range r.applied {
		for ap, id := range a.endpoints {
			if eps[id].RangeGen == a.rangeGen {
				continue
			}
			v := endpointValue(a.endpointOf(ap), r.epGen[id], a.rangeGen)
			if err := maps[lbMapEndpoints].Put(id, &v); err != nil {
				return nil, fmt.Errorf("frontend %s: write range generation of endpoint %s: %w", k, ap, err)
			}
		}
	}
	return r, nil
}

// restoreRanges gives each restricted frontend of r the prefixes its family's trie holds
// for its service id, and returns the removal of every other entry, to be run once the
// state is known to be consistent.
func (d *Datapath) restoreRanges(r *restored, maps map[string]*ebpf.Map) ([]func() error, error) {
	byID := make(map[uint32]*applied, len(r.applied))
	for _, a := range r.applied {
		byID[a.id] = a
	}
	var stray []func() error
	add := func(id uint32, p netip.Prefix, ok bool, del func() error) error {
		if !ok {
			return fmt.Errorf("source range entry %s of service id %d is not a prefix", p, id)
		}
		a := byID[id]
		if a == nil || !a.restricted || a.fe.VIP.Is4() != p.Addr().Is4() {
			stray = append(stray, del)
			return nil
		}
		a.ranges = append(a.ranges, p)
		r.rangeCount[rangeFamily(p.Addr())]++
		return nil
	}
	var k4 lbRange4Key
	var v uint32
	m4 := maps[lbMapSourceRanges4]
	iter := m4.Iterate()
	for iter.Next(&k4, &v) {
		k := k4
		p, ok := rangeOfKey(k.Prefixlen, [4]uint32{k.Addr}, afInet)
		if err := add(k.ServiceId, p, ok, func() error { return deleteKey(m4, &k) }); err != nil {
			return nil, err
		}
	}
	if err := iter.Err(); err != nil {
		return nil, fmt.Errorf("read source ranges: %w", err)
	}
	var k6 lbRange6Key
	m6 := maps[lbMapSourceRanges6]
	iter = m6.Iterate()
	for iter.Next(&k6, &v) {
		k := k6
		p, ok := rangeOfKey(k.Prefixlen, k.Addr, afInet6)
		if err := add(k.ServiceId, p, ok, func() error { return deleteKey(m6, &k) }); err != nil {
			return nil, err
		}
	}
	if err := iter.Err(); err != nil {
		return nil, fmt.Errorf("read source ranges: %w", err)
	}
	for _, a := range r.applied {
		// More than Config.MaxSourceRanges is possible: an interrupted change leaves the
		// old prefixes next to the new ones. The next SetServices removes them.
		slices.SortFunc(a.ranges, comparePrefixes)
		a.fe.SourceRanges = slices.Clone(a.ranges)
	}
	return stray, nil
}

func deleteKey(m *ebpf.Map, key any) error {
	if err := m.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("remove source range of no restricted service: %w", err)
	}
	return nil
}

// restoreFrontend rebuilds one applied frontend from its service entry and ring.
func (d *Datapath) restoreFrontend(key lbServiceKey, val lbService, eps []lbEndpoint, pairs []lbRingPair) (frontendKey, *applied, error) {
	vip, ok := addrOf(key.Vip, key.Family)
	if !ok {
		return frontendKey{}, nil, fmt.Errorf("service entry of family %d", key.Family)
	}
	k := frontendKey{vip: vip, port: ntohs(key.Port), proto: shard.Protocol(key.Proto)}
	a := &applied{
		id:         val.Id,
		ringStart:  val.RingStart,
		ringLen:    (val.RingSize + 1) &^ 1,
		ringSize:   val.RingSize,
		endpoints:  map[netip.AddrPort]uint32{},
		restricted: val.Flags&svcSourceRanges != 0,
		rangeGen:   val.RangeGen,
	}
	if a.id >= uint32(d.cfg.MaxServices) {
		return k, nil, fmt.Errorf("frontend %s: service id %d beyond MaxServices", k, a.id)
	}
	if a.ringSize > 0 && (a.ringStart%2 != 0 || uint64(a.ringStart)+uint64(a.ringLen) > uint64(d.cfg.RingSlots)) {
		return k, nil, fmt.Errorf("frontend %s: ring %d+%d outside the ring slots", k, a.ringStart, a.ringSize)
	}
	fe := shard.Frontend{VIP: vip, Port: k.port, Protocol: k.proto, Mode: shard.Mode(val.Mode), Select: shard.Select(val.Select),
		Endpoints: []shard.Endpoint{}}
	if val.Handoff != ([4]uint32{}) {
		fe.Handoff, _ = addrOf(val.Handoff, key.Family)
	}
	ring := make([]uint32, a.ringSize)
	for i := range ring {
		slot := a.ringStart + uint32(i)
		ring[i] = pairs[slot/2].Endpoint[slot%2]
	}
	seen := map[uint32]bool{}
	for _, id := range ring {
		if seen[id] {
			continue
		}
		seen[id] = true
		if id >= uint32(len(eps)) || eps[id].Valid == 0 || eps[id].Family != key.Family {
			return k, nil, fmt.Errorf("frontend %s: ring points to endpoint id %d, which is not a valid endpoint of its family", k, id)
		}
		addr, _ := addrOf(eps[id].Addr, eps[id].Family)
		ap := netip.AddrPortFrom(addr, ntohs(eps[id].Port))
		if _, dup := a.endpoints[ap]; dup {
			return k, nil, fmt.Errorf("frontend %s: endpoint %s has two ids", k, ap)
		}
		a.endpoints[ap] = id
		ep := shard.Endpoint{Addr: addr, Port: ap.Port()}
		if eps[id].Node != ([4]uint32{}) {
			ep.Node, _ = addrOf(eps[id].Node, eps[id].Family)
		}
		fe.Endpoints = append(fe.Endpoints, ep)
	}
	slices.SortFunc(fe.Endpoints, func(a, b shard.Endpoint) int {
		return netip.AddrPortFrom(a.Addr, a.Port).Compare(netip.AddrPortFrom(b.Addr, b.Port))
	})
	a.fe = fe

	// What this program would write for the same frontend: a ring that differs (the
	// Maglev table changed between versions) or a service entry that differs (another
	// node address) is written again by the next SetServices, keeping the ids.
	names := make([]string, len(fe.Endpoints))
	ids := make([]uint32, len(fe.Endpoints))
	for i, ep := range fe.Endpoints {
		ap := netip.AddrPortFrom(ep.Addr, ep.Port)
		names[i], ids[i] = ap.String(), a.endpoints[ap]
	}
	a.stale = !slices.Equal(ringOf(fe.Select, names, ids), ring) ||
		d.serviceValue(a, fe) != val
	return k, a, nil
}

// syncVIPs makes the vips map hold exactly the VIPs in refs.
func syncVIPs(m *ebpf.Map, refs map[netip.Addr]int) error {
	have := map[netip.Addr]bool{}
	var stale []lbVipKey
	var key lbVipKey
	var v uint32
	iter := m.Iterate()
	for iter.Next(&key, &v) {
		a, ok := addrOf(key.Addr, key.Family)
		if ok && refs[a] > 0 {
			have[a] = true
		} else {
			stale = append(stale, key)
		}
	}
	if err := iter.Err(); err != nil {
		return fmt.Errorf("read VIPs: %w", err)
	}
	for _, k := range stale {
		if err := m.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("remove VIP without service: %w", err)
		}
	}
	for a := range refs {
		if !have[a] {
			k := lbVipKey{Addr: addrWords(a), Family: family(a)}
			if err := m.Put(&k, uint32(1)); err != nil {
				return fmt.Errorf("write VIP %s: %w", a, err)
			}
		}
	}
	return nil
}

// readArray reads the n values of an array map.
func readArray[V any](m *ebpf.Map, n int) ([]V, error) {
	out := make([]V, n)
	const chunk = 4096
	keys := make([]uint32, chunk)
	vals := make([]V, chunk)
	var cursor ebpf.MapBatchCursor
	for read := 0; read < n; {
		c, err := m.BatchLookup(&cursor, keys, vals, nil)
		for i := range c {
			if int(keys[i]) < n {
				out[keys[i]] = vals[i]
			}
		}
		read += c
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			for i := range out {
				if err := m.Lookup(uint32(i), &out[i]); err != nil {
					return nil, fmt.Errorf("read map: %w", err)
				}
			}
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read map: %w", err)
		}
	}
	return out, nil
}
