package datapath

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/shardlb/shardlb/datapath/maglev"
	"github.com/shardlb/shardlb/shard"
)

// frontendKey identifies a frontend the way the kernel does.
type frontendKey struct {
	vip   netip.Addr
	port  uint16
	proto shard.Protocol
}

func (k frontendKey) String() string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(k.vip, k.port), k.proto)
}

// applied is what the maps hold for one frontend.
type applied struct {
	fe        shard.Frontend
	id        uint32 // service id: the stats slot
	ringStart uint32
	ringLen   uint32 // slots allocated (the ring size rounded up to a pair)
	ringSize  uint32 // slots in use: the ring size the kernel indexes
	endpoints map[netip.AddrPort]uint32
	// stale: adopted from pinned maps holding a ring or service entry this program
	// would not write; the next SetServices rewrites it, keeping the ids.
	stale bool
	// restricted and ranges are the source ranges as written: the service entry's
	// flag, and the prefixes the tries hold for id (ranges.go).
	restricted bool
	ranges     []netip.Prefix
	rangeGen   uint32 // the service entry's range_gen
	// rangesDirty: a change of the ranges failed after it changed the tries, before
	// the service entry and every endpoint had the new generation; the next
	// SetServices completes it with another generation.
	rangesDirty bool
}

// SetServices makes the maps serve exactly the desired frontends. It is declarative:
// unchanged frontends are not touched, and a changed one gets its new ring and new
// endpoints written before its service entry switches to them, so no packet finds a
// half-written service. Endpoints that stay keep their id, so their flows stay too.
// A frontend that cannot be applied is left out (and removed if it was applied before);
// the returned error names every such frontend, the others are applied regardless.
//
// Source ranges are refused with their frontend when one is not a valid prefix, when
// the VIP's family has more than Config.MaxSourceRanges of them, or when they do not fit
// in Config.SourceRangeEntries: a frontend is never served with fewer restrictions than
// it asks for. Prefixes of the other family are accepted and not written; a frontend
// whose ranges are all of the other family lets no client through.
func (d *Datapath) SetServices(desired []shard.Frontend) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return errors.New("set services: datapath is closed")
	}

	var errs []error
	want := make(map[frontendKey]shard.Frontend, len(desired))
	for _, fe := range desired {
		k := frontendKey{fe.VIP, fe.Port, fe.Protocol}
		if _, dup := want[k]; dup {
			errs = append(errs, fmt.Errorf("frontend %s of %s: given twice, first one kept", k, fe.Service))
			continue
		}
		if err := d.validate(fe); err != nil {
			errs = append(errs, fmt.Errorf("frontend %s of %s: %w", k, fe.Service, err))
			continue
		}
		want[k] = normalize(fe)
	}

	// Old rings and endpoint ids are released only after every switch of this call, so
	// a packet that read a service entry just before its switch still finds the ring and
	// endpoints it points to.
	var later []func()
	for k, a := range d.applied {
		if _, ok := want[k]; !ok {
			if err := d.remove(k, a, &later); err != nil {
				errs = append(errs, err)
			}
		}
	}
	keys := make([]frontendKey, 0, len(want))
	for k := range want {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b frontendKey) int {
		return cmp.Or(a.vip.Compare(b.vip), cmp.Compare(a.port, b.port), cmp.Compare(a.proto, b.proto))
	})
	for _, k := range keys {
		fe := want[k]
		a, ok := d.applied[k]
		if ok && a.fe.Service == "" {
			// Adopted from pinned maps, which do not record the name.
			a.fe.Service = fe.Service
		}
		var have []netip.Prefix
		if ok {
			have = a.ranges
		}
		if err := d.rangeRoom(k.vip, have, rangesOf(fe)); err != nil {
			errs = append(errs, fmt.Errorf("frontend %s of %s: %w", k, fe.Service, err))
			if ok {
				if err := d.remove(k, a, &later); err != nil {
					errs = append(errs, err)
				}
			}
			continue
		}
		if ok && !a.stale && sameBackends(a.fe, fe) {
			if a.fe.Handoff != fe.Handoff || !a.sameRanges(rangesOf(fe)) {
				if err := d.writeService(a, fe); err != nil {
					errs = append(errs, fmt.Errorf("frontend %s of %s: %w", k, fe.Service, err))
				}
			} else {
				// Adopted frontends know only the prefixes written.
				a.fe.SourceRanges = fe.SourceRanges
			}
			continue
		}
		if err := d.apply(k, fe, &later); err != nil {
			errs = append(errs, fmt.Errorf("frontend %s of %s: %w", k, fe.Service, err))
		}
	}
	for _, f := range later {
		f()
	}
	return errors.Join(errs...)
}

func (d *Datapath) validate(fe shard.Frontend) error {
	if !fe.VIP.IsValid() {
		return errors.New("invalid VIP")
	}
	if fe.Protocol != shard.TCP && fe.Protocol != shard.UDP {
		return fmt.Errorf("protocol %s is not supported", fe.Protocol)
	}
	switch fe.Mode {
	case shard.ModeDefault, shard.ModeFullNAT:
	case shard.ModeOneArm:
		if !d.nodeIP(fe.VIP).IsValid() {
			return errors.New("mode onearm needs the node's address of the VIP's family (Config.NodeIPv4/NodeIPv6)")
		}
	case shard.ModeDSR:
		if !d.nodeIP(fe.VIP).IsValid() {
			return errors.New("mode dsr needs the node's address of the VIP's family (Config.NodeIPv4/NodeIPv6)")
		}
		if fe.Select == shard.SelectRoundRobin {
			return errors.New("mode dsr needs an endpoint selection every node computes alike (hash or persist), not rr")
		}
		for _, ep := range fe.Endpoints {
			if ep.Node.Unmap().Is4() != fe.VIP.Unmap().Is4() || !ep.Node.IsValid() {
				return fmt.Errorf("mode dsr: endpoint %s has no node address of the VIP's family (its node runs no shardlb, or has no address of that family)",
					netip.AddrPortFrom(ep.Addr, ep.Port))
			}
		}
	default:
		return fmt.Errorf("mode %s is not implemented by the datapath", fe.Mode)
	}
	if fe.Select > shard.SelectPersist {
		return fmt.Errorf("endpoint selection %s is not supported", fe.Select)
	}
	for _, ep := range fe.Endpoints {
		if ep.Addr.Unmap().Is4() != fe.VIP.Unmap().Is4() {
			return fmt.Errorf("endpoint %s is not of the VIP's address family", netip.AddrPortFrom(ep.Addr, ep.Port))
		}
	}
	return d.validateRanges(fe)
}

func (d *Datapath) nodeIP(vip netip.Addr) netip.Addr {
	if vip.Unmap().Is4() {
		return d.cfg.NodeIPv4.Unmap()
	}
	return d.cfg.NodeIPv6
}

// normalize makes equal frontends compare equal: IPv4 in 4 bytes, endpoints sorted and
// without duplicates (the order of an EndpointSlice means nothing).
func normalize(fe shard.Frontend) shard.Frontend {
	fe.VIP = fe.VIP.Unmap()
	eps := make([]shard.Endpoint, 0, len(fe.Endpoints))
	for _, ep := range fe.Endpoints {
		// Only dsr sends packets to the endpoint's node; elsewhere a node address
		// coming or going changes nothing.
		var node netip.Addr
		if fe.Mode == shard.ModeDSR {
			node = ep.Node.Unmap()
		}
		eps = append(eps, shard.Endpoint{Addr: ep.Addr.Unmap(), Port: ep.Port, Node: node})
	}
	slices.SortFunc(eps, func(a, b shard.Endpoint) int {
		return netip.AddrPortFrom(a.Addr, a.Port).Compare(netip.AddrPortFrom(b.Addr, b.Port))
	})
	fe.Endpoints = slices.Compact(eps)
	fe.SourceRanges = normalizeRanges(fe.SourceRanges)
	// Only the SNAT modes need the previous master: in default mode the endpoint sees the
	// client's own address, so a connection continues through any node that picks the
	// same endpoint. A handoff address of the other family cannot be reached.
	fe.Handoff = fe.Handoff.Unmap()
	// dsr needs none either: the endpoint's node holds every flow's state.
	if fe.Mode == shard.ModeDefault || fe.Mode == shard.ModeDSR || fe.Handoff.Is4() != fe.VIP.Is4() {
		fe.Handoff = netip.Addr{}
	}
	return fe
}

// sameBackends reports whether b needs the ring and endpoints a has: everything but
// the handoff address and the source ranges, which the service entry and the tries
// hold.
func sameBackends(a, b shard.Frontend) bool {
	return a.Service == b.Service && a.Mode == b.Mode && a.Select == b.Select && slices.Equal(a.Endpoints, b.Endpoints)
}

// writeService rewrites only the service entry of an applied frontend (a new handoff
// address) and its source ranges, keeping its ring and endpoints.
func (d *Datapath) writeService(a *applied, fe shard.Frontend) error {
	r := rangesOf(fe)
	changed := !a.sameRanges(r)
	next := *a
	if changed {
		a.rangesDirty = true
		if err := d.rangesBefore(a.id, &a.ranges, r); err != nil {
			return err
		}
		next.restricted, next.rangeGen = r.restricted, a.rangeGen+1
	}
	key := serviceKey(fe.VIP, fe.Port, fe.Protocol)
	svc := d.serviceValue(&next, fe)
	if err := d.objs.Services.Put(&key, &svc); err != nil {
		return fmt.Errorf("write service: %w", err)
	}
	a.fe, a.restricted, a.rangeGen = fe, next.restricted, next.rangeGen
	if !changed {
		return nil
	}
	return d.rangesSwitched(a, r)
}

// rangesSwitched completes a change of a's source ranges once its service entry holds
// them (steps 3 and 4 in ranges.go).
func (d *Datapath) rangesSwitched(a *applied, r sourceRanges) error {
	err := d.rangesAfter(a.id, &a.ranges, r)
	perr := d.publishRangeGen(a)
	a.rangesDirty = perr != nil
	return errors.Join(err, perr)
}

// serviceValue is the service entry of a (its id, ring, flag and range generation)
// serving fe.
func (d *Datapath) serviceValue(a *applied, fe shard.Frontend) lbService {
	svc := lbService{Id: a.id, RingStart: a.ringStart, RingSize: a.ringSize, Mode: uint8(fe.Mode), Select: uint8(fe.Select), RangeGen: a.rangeGen}
	if a.restricted {
		svc.Flags = svcSourceRanges
	}
	switch fe.Mode {
	case shard.ModeOneArm:
		svc.SnatAddr = addrWords(d.nodeIP(fe.VIP))
	case shard.ModeFullNAT:
		svc.SnatAddr = addrWords(fe.VIP)
	case shard.ModeDSR:
		svc.SnatAddr = addrWords(d.nodeIP(fe.VIP))
	}
	if fe.Handoff.IsValid() {
		svc.Handoff = addrWords(fe.Handoff)
	}
	return svc
}

// apply writes one new or changed frontend: endpoints, then the ring, then the service
// entry that makes both visible.
func (d *Datapath) apply(k frontendKey, fe shard.Frontend, later *[]func()) error {
	old := d.applied[k]
	a := &applied{fe: fe, endpoints: make(map[netip.AddrPort]uint32, len(fe.Endpoints))}
	if old != nil {
		a.id = old.id
		a.restricted, a.ranges, a.rangeGen, a.rangesDirty = old.restricted, slices.Clone(old.ranges), old.rangeGen, old.rangesDirty
	} else {
		id, ok := d.svcIDs.alloc()
		if !ok {
			return d.capacityError(errServicesFull)
		}
		a.id = id
		if err := d.resetStats(id); err != nil {
			d.svcIDs.release(id)
			return err
		}
	}
	r := rangesOf(fe)
	rangesChanged := !a.sameRanges(r)
	if rangesChanged {
		a.rangeGen++ // new endpoints are written with it
	}
	undo := func() {
		for ap, id := range a.endpoints {
			if old == nil || old.endpoints[ap] != id {
				d.releaseEndpoint(id)
			}
		}
		if old != nil {
			if rangesChanged {
				old.ranges, old.rangesDirty = a.ranges, true // what the tries hold now
			}
			return
		}
		if err := d.rangesAfter(a.id, &a.ranges, sourceRanges{}); err != nil {
			// Keep the id rather than hand it to a frontend its prefixes would open.
			d.log.Error("remove source ranges", "frontend", k, "err", err)
			return
		}
		d.svcIDs.release(a.id)
	}

	// Endpoint ids: kept for endpoints that stay, new ones written before the ring.
	ids := make([]uint32, len(fe.Endpoints))
	names := make([]string, len(fe.Endpoints))
	for i, ep := range fe.Endpoints {
		ap := netip.AddrPortFrom(ep.Addr, ep.Port)
		names[i] = ap.String()
		if old != nil {
			if id, ok := old.endpoints[ap]; ok {
				// A kept endpoint whose node changed (dsr) is written again in place,
				// keeping its id and generation, so its flows stay.
				if ep.Node != nodeOf(old.fe, ap) {
					v := endpointValue(ep, d.epGen[id], old.rangeGen)
					if err := d.objs.Endpoints.Put(id, &v); err != nil {
						undo()
						return fmt.Errorf("write endpoint %s: %w", ap, err)
					}
				}
				ids[i], a.endpoints[ap] = id, id
				continue
			}
		}
		id, err := d.addEndpoint(ep, a.rangeGen)
		if err != nil {
			undo()
			return err
		}
		ids[i], a.endpoints[ap] = id, id
	}

	ring := ringOf(fe.Select, names, ids)
	a.ringLen = uint32(len(ring)+1) &^ 1
	if len(ring) > 0 {
		start, err := d.rings.alloc(a.ringLen)
		if err != nil {
			undo()
			return d.capacityError(err)
		}
		a.ringStart = start
		if err := d.writeRing(start, ring); err != nil {
			d.rings.release(start, a.ringLen)
			undo()
			return err
		}
	}

	a.ringSize = uint32(len(ring))
	if rangesChanged {
		if err := d.rangesBefore(a.id, &a.ranges, r); err != nil {
			d.rings.release(a.ringStart, a.ringLen)
			undo()
			return err
		}
		a.restricted = r.restricted
	}
	svc := d.serviceValue(a, fe)
	key := serviceKey(fe.VIP, fe.Port, fe.Protocol)
	if old == nil {
		if err := d.refVIP(fe.VIP, 1); err != nil {
			d.rings.release(a.ringStart, a.ringLen)
			undo()
			return err
		}
	}
	if err := d.objs.Services.Put(&key, &svc); err != nil {
		d.rings.release(a.ringStart, a.ringLen)
		undo()
		if old == nil {
			_ = d.refVIP(fe.VIP, -1)
		}
		return fmt.Errorf("write service: %w", err)
	}
	d.applied[k] = a

	if old != nil {
		*later = append(*later, func() { d.rings.release(old.ringStart, old.ringLen) })
		for ap, id := range old.endpoints {
			if _, kept := a.endpoints[ap]; !kept {
				*later = append(*later, func() { d.releaseEndpoint(id) })
			}
		}
		if rangesChanged {
			// The endpoints kept hold the old generation.
			return d.rangesSwitched(a, r)
		}
	}
	return nil
}

// ringOf is the ring the kernel indexes: the Maglev table for hash (5-tuple) and persist
// (source address), the endpoints in order for round robin.
func ringOf(sel shard.Select, names []string, ids []uint32) []uint32 {
	if len(ids) == 0 {
		return nil
	}
	if sel == shard.SelectRoundRobin {
		return slices.Clone(ids)
	}
	table := maglev.Table(names, maglev.TableSize(len(names)))
	ring := make([]uint32, len(table))
	for i, b := range table {
		ring[i] = ids[b]
	}
	return ring
}

func (d *Datapath) writeRing(start uint32, ring []uint32) error {
	n := (len(ring) + 1) / 2
	keys := make([]uint32, n)
	vals := make([]lbRingPair, n)
	for i := range keys {
		keys[i] = start/2 + uint32(i)
		vals[i].Endpoint[0] = ring[2*i]
		if 2*i+1 < len(ring) {
			vals[i].Endpoint[1] = ring[2*i+1]
		}
	}
	if _, err := d.objs.RingSlots.BatchUpdate(keys, vals, nil); err != nil {
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("write ring: %w", err)
		}
		for i := range keys {
			if err := d.objs.RingSlots.Put(keys[i], vals[i]); err != nil {
				return fmt.Errorf("write ring: %w", err)
			}
		}
	}
	return nil
}

func (d *Datapath) addEndpoint(ep shard.Endpoint, rangeGen uint32) (uint32, error) {
	id, ok := d.epIDs.alloc()
	if !ok {
		return 0, d.capacityError(errEndpointsFull)
	}
	v := endpointValue(ep, d.epGen[id], rangeGen)
	if err := d.objs.Endpoints.Put(id, &v); err != nil {
		d.epIDs.release(id)
		return 0, fmt.Errorf("write endpoint %s: %w", netip.AddrPortFrom(ep.Addr, ep.Port), err)
	}
	return id, nil
}

// capacityError says which flag to raise when err is a full map: the frontend is
// refused, the others are served. shardlb sizes the maps with --maxServices and
// --maxEndpoints, the ring slots following them (RingSlotsFor); a Config.RingSlots set
// by other callers is named as such.
func (d *Datapath) capacityError(err error) error {
	switch {
	case errors.Is(err, errServicesFull):
		return fmt.Errorf("%w: raise --maxServices (%d)", err, d.cfg.MaxServices)
	case errors.Is(err, errEndpointsFull):
		return fmt.Errorf("%w: raise --maxEndpoints (%d)", err, d.cfg.MaxEndpoints)
	case errors.Is(err, errRingFull):
		if d.cfg.RingSlots != RingSlotsFor(d.cfg.MaxServices, d.cfg.MaxEndpoints) {
			return fmt.Errorf("%w: raise Config.RingSlots (%d)", err, d.cfg.RingSlots)
		}
		if RingSlotsPerEndpoint*d.cfg.MaxEndpoints >= RingSlotsPerService*d.cfg.MaxServices {
			return fmt.Errorf("%w: raise --maxEndpoints (%d), which gives the rings %d slots per endpoint (%d in all)",
				err, d.cfg.MaxEndpoints, RingSlotsPerEndpoint, d.cfg.RingSlots)
		}
		return fmt.Errorf("%w: raise --maxServices (%d), which gives the rings %d slots per frontend (%d in all)",
			err, d.cfg.MaxServices, RingSlotsPerService, d.cfg.RingSlots)
	}
	return err
}

// endpointValue is the entry of a valid endpoint.
func endpointValue(ep shard.Endpoint, gen, rangeGen uint32) lbEndpoint {
	v := lbEndpoint{Addr: addrWords(ep.Addr), Port: htons(ep.Port), Family: family(ep.Addr), Valid: 1, Gen: gen, RangeGen: rangeGen}
	if ep.Node.IsValid() {
		v.Node = addrWords(ep.Node)
	}
	return v
}

// nodeOf is the node address fe, normalized (its endpoints sorted), gives its endpoint
// ap; zero when none.
func nodeOf(fe shard.Frontend, ap netip.AddrPort) netip.Addr {
	i, ok := slices.BinarySearchFunc(fe.Endpoints, ap, func(ep shard.Endpoint, ap netip.AddrPort) int {
		return netip.AddrPortFrom(ep.Addr, ep.Port).Compare(ap)
	})
	if !ok {
		return netip.Addr{}
	}
	return fe.Endpoints[i].Node
}

// endpointOf is a's endpoint ap as its entry holds it.
func (a *applied) endpointOf(ap netip.AddrPort) shard.Endpoint {
	return shard.Endpoint{Addr: ap.Addr(), Port: ap.Port(), Node: nodeOf(a.fe, ap)}
}

// releaseEndpoint invalidates an endpoint id: flows that still point to it are balanced
// again on their next packet, and the bumped generation keeps them from following the
// id once it is reused.
func (d *Datapath) releaseEndpoint(id uint32) {
	d.epGen[id]++
	v := lbEndpoint{Gen: d.epGen[id]}
	if err := d.objs.Endpoints.Put(id, &v); err != nil {
		// Leak the id rather than hand out one whose old flows may still match it.
		d.log.Error("invalidate endpoint", "id", id, "err", err)
		return
	}
	d.epIDs.release(id)
}

func (d *Datapath) remove(k frontendKey, a *applied, later *[]func()) error {
	key := serviceKey(k.vip, k.port, k.proto)
	if err := d.objs.Services.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("remove frontend %s: %w", k, err)
	}
	delete(d.applied, k)
	if err := d.refVIP(k.vip, -1); err != nil {
		d.log.Error("remove VIP", "vip", k.vip, "err", err)
	}
	// Now, not later: the frontends applied next in this call may need the room.
	if err := d.rangesAfter(a.id, &a.ranges, sourceRanges{}); err != nil {
		d.log.Error("remove source ranges", "frontend", k, "err", err)
	}
	*later = append(*later, func() {
		d.rings.release(a.ringStart, a.ringLen)
		for _, id := range a.endpoints {
			d.releaseEndpoint(id)
		}
		if len(a.ranges) > 0 {
			// Keep the id rather than hand it to a frontend these prefixes would open.
			return
		}
		d.svcIDs.release(a.id)
	})
	return nil
}

// refVIP counts the frontends of a VIP; the vips map holds the VIPs with at least one.
func (d *Datapath) refVIP(vip netip.Addr, delta int) error {
	n := d.vipRefs[vip] + delta
	key := lbVipKey{Addr: addrWords(vip), Family: family(vip)}
	switch {
	case n > 0 && d.vipRefs[vip] == 0:
		if err := d.objs.Vips.Put(&key, uint32(1)); err != nil {
			return fmt.Errorf("write VIP %s: %w", vip, err)
		}
	case n <= 0:
		delete(d.vipRefs, vip)
		if err := d.objs.Vips.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("remove VIP %s: %w", vip, err)
		}
		return nil
	}
	d.vipRefs[vip] = n
	return nil
}
