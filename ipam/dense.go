package ipam

import (
	"math/bits"
	"slices"
)

// dense holds a pool's used addresses at offsets [0, limit) from its first address as a
// hierarchical bitmap: level 0 has a bit per address, each level above a bit per word of
// the level below, up to a single top word. The lowest free and the lowest used address
// are then one TrailingZeros64 per level, log64 of the part of the pool in use: three
// levels cover 262,144 addresses.
//
// limit grows by doubling, and only as far as allocations reach, so an IPv6 /64 costs
// nothing until used; the pool keeps static addresses far beyond limit in a treap.
type dense struct {
	limit uint64   // 0 before first use, else a power of two >= 64
	used  []uint64 // level 0: bit o is set when offset o is used
	// Levels 1..top: any[l-1] has a bit per word of level l-1 that is not zero, full[l-1]
	// a bit per word that is all ones. The top level is one word.
	any, full [][]uint64
	topMask   uint64 // the top word's bits that stand for a word of the level below
	slots     []slot // by offset
	n         int    // addresses in use

	// In shared mode ports finds the lowest used address whose ports avoid a request's
	// without a scan. ports[{p, l, i}] has a bit per element of word i of level l (0 for
	// absent): at level 0 an address that holds p, above it a word of the level below
	// that is not zero and all of whose used elements are blocked for p, that is, every
	// used address under it holds p. A request for ports P descends from the top through
	// bits that are used and blocked for no port of P.
	//
	// With one port (or none) the descent never backtracks: a used subtree not blocked for
	// p has an address without p. With several ports a subtree blocked for none may still
	// have every address holding one or another of them (half on 80, half on 443), so the
	// descent backtracks and at worst visits every word holding such addresses, O(n/64).
	// Entries exist only where a port is held: the index costs O(ports held x levels).
	shared  bool
	ports   map[portWord]uint64
	scratch []PortKey

	// visits counts words read or written, so tests can show that operations stay
	// within a constant per level whatever the machine's load does to the timings.
	visits uint64
}

// portWord is the key of dense.ports packed in one integer, which Go's maps hash several
// times faster than a struct: idx<<28 | level<<24 | protocol<<16 | port. maxDenseLimit
// keeps idx within 36 bits.
type portWord uint64

func pw(p PortKey, level int, idx uint64) portWord {
	return portWord(idx<<28 | uint64(level)<<24 | uint64(p.Protocol)<<16 | uint64(p.Port))
}

func (k portWord) port() PortKey {
	return PortKey{Protocol: uint8(k >> 16), Port: uint16(k)}
}

func (k portWord) level() int  { return int(k>>24) & 0xf }
func (k portWord) idx() uint64 { return uint64(k >> 28) }

// maxDenseLimit bounds the bitmap far beyond what memory allows (2^40 addresses would
// take 2^40 slots); addresses past it stay in the treap.
const maxDenseLimit = 1 << 40

func (d *dense) top() int { return len(d.any) }

// presence is level l's words: a bit per used address (l = 0) or non-empty word below.
func (d *dense) presence(l int) []uint64 {
	if l == 0 {
		return d.used
	}
	return d.any[l-1]
}

func (d *dense) isUsed(o uint64) bool { return d.used[o>>6]&(1<<(o&63)) != 0 }

// extend makes offsets [0, limit) dense. The caller fills in what moves in and then
// calls rebuild.
func (d *dense) extend(limit uint64) {
	d.used = append(d.used, make([]uint64, limit/64-uint64(len(d.used)))...)
	old := len(d.slots)
	d.slots = slices.Grow(d.slots, int(limit)-old)[:limit]
	clear(d.slots[old:])
	d.limit = limit
}

// rebuild recomputes the summary levels and the port index from level 0 and the slots,
// in time linear in limit/64 plus the ports held; growth doubles limit, so this is
// amortised over the allocations that filled the bitmap.
func (d *dense) rebuild() {
	d.any, d.full = d.any[:0], d.full[:0]
	pres, fl := d.used, d.used
	for len(pres) > 1 {
		n := (len(pres) + 63) / 64
		a, f := make([]uint64, n), make([]uint64, n)
		for i, w := range pres {
			if w != 0 {
				a[i>>6] |= 1 << (i & 63)
			}
		}
		for i, w := range fl {
			if w == ^uint64(0) {
				f[i>>6] |= 1 << (i & 63)
			}
		}
		d.any, d.full = append(d.any, a), append(d.full, f)
		pres, fl = a, f
	}
	d.topMask = ^uint64(0)
	if t := d.top(); t > 0 {
		if below := len(d.presence(t - 1)); below < 64 {
			d.topMask = 1<<below - 1
		}
	}
	if !d.shared {
		return
	}
	if d.ports == nil {
		d.ports = map[portWord]uint64{}
	}
	clear(d.ports)
	for w, word := range d.used {
		for ; word != 0; word &= word - 1 {
			b := bits.TrailingZeros64(word)
			for _, p := range d.slots[w*64+b].ports {
				d.ports[pw(p, 0, uint64(w))] |= 1 << b
			}
		}
	}
	for l := range d.top() {
		pres := d.presence(l)
		// Entries added here are of level l+1: the loop may or may not see them, and skips
		// them either way.
		for k, v := range d.ports {
			if k.level() != l {
				continue
			}
			if w := pres[k.idx()]; w != 0 && w&^v == 0 {
				d.ports[pw(k.port(), l+1, k.idx()>>6)] |= 1 << (k.idx() & 63)
			}
		}
	}
}

// lowestFree is the lowest offset below limit not in use.
func (d *dense) lowestFree() (uint64, bool) {
	if d.limit == 0 {
		return 0, false
	}
	var idx uint64
	for l := d.top(); l >= 1; l-- {
		d.visits++
		z := ^d.full[l-1][idx]
		if l == d.top() {
			z &= d.topMask
		}
		if z == 0 {
			return 0, false
		}
		idx = idx<<6 | uint64(bits.TrailingZeros64(z))
	}
	d.visits++
	z := ^d.used[idx]
	if z == 0 {
		return 0, false
	}
	return idx<<6 | uint64(bits.TrailingZeros64(z)), true
}

// setUsed marks offset o used and returns how many levels, from 0 up, had their
// presence word change.
func (d *dense) setUsed(o uint64) int {
	w, bit := o>>6, uint64(1)<<(o&63)
	old := d.used[w]
	d.used[w] = old | bit
	d.n++
	d.visits++
	changed := 1
	if old == 0 {
		for l, idx := 1, w; l <= d.top(); l, idx = l+1, idx>>6 {
			d.visits++
			pw := &d.any[l-1][idx>>6]
			was := *pw
			*pw |= 1 << (idx & 63)
			changed++
			if was != 0 {
				break
			}
		}
	}
	if old|bit == ^uint64(0) {
		for l, idx := 1, w; l <= d.top(); l, idx = l+1, idx>>6 {
			d.visits++
			fw := &d.full[l-1][idx>>6]
			*fw |= 1 << (idx & 63)
			if *fw != ^uint64(0) {
				break
			}
		}
	}
	return changed
}

// clearUsed marks offset o free and returns how many levels, from 0 up, had their
// presence word change.
func (d *dense) clearUsed(o uint64) int {
	w, bit := o>>6, uint64(1)<<(o&63)
	old := d.used[w]
	d.used[w] = old &^ bit
	d.n--
	d.visits++
	if old == ^uint64(0) {
		for l, idx := 1, w; l <= d.top(); l, idx = l+1, idx>>6 {
			d.visits++
			fw := &d.full[l-1][idx>>6]
			was := *fw
			*fw &^= 1 << (idx & 63)
			if was != ^uint64(0) {
				break
			}
		}
	}
	changed := 1
	if old&^bit == 0 {
		for l, idx := 1, w; l <= d.top(); l, idx = l+1, idx>>6 {
			d.visits++
			pw := &d.any[l-1][idx>>6]
			*pw &^= 1 << (idx & 63)
			changed++
			if *pw != 0 {
				break
			}
		}
	}
	return changed
}

// near is a used address in the smallest non-empty part of the hierarchy around o: the
// ports that may be blocked on o's path are among its ports.
func (d *dense) near(o uint64) (uint64, bool) {
	for l := 0; l <= d.top(); l++ {
		d.visits++
		idx := o >> (6 * (l + 1))
		w := d.presence(l)[idx]
		if w == 0 {
			continue
		}
		if l == 0 {
			// The used address closest to o: its slot is likely in the cache line next to o's.
			return idx<<6 | closestBit(w, uint(o&63)), true
		}
		e := idx<<6 | uint64(bits.TrailingZeros64(w))
		for l--; l >= 0; l-- {
			d.visits++
			e = e<<6 | uint64(bits.TrailingZeros64(d.presence(l)[e]))
		}
		return e, true
	}
	return 0, false
}

// closestBit is the index of the set bit of w (not zero) closest to i.
func closestBit(w uint64, i uint) uint64 {
	up, down := w>>i, w&(1<<i-1)
	switch {
	case down == 0:
		return uint64(i) + uint64(bits.TrailingZeros64(up))
	case up == 0:
		return uint64(63 - bits.LeadingZeros64(down))
	}
	if u, dn := uint(bits.TrailingZeros64(up)), i-uint(63-bits.LeadingZeros64(down)); u <= dn {
		return uint64(i + u)
	} else {
		return uint64(i - dn)
	}
}

// setPortBit records whether address o holds p and returns o's level-0 word for p.
func (d *dense) setPortBit(p PortKey, o uint64, on bool) uint64 {
	d.visits++
	k := pw(p, 0, o>>6)
	v := d.ports[k]
	if on {
		v |= 1 << (o & 63)
	} else {
		v &^= 1 << (o & 63)
	}
	d.store(k, v)
	return v
}

// portBits is o's level-0 word for p.
func (d *dense) portBits(p PortKey, o uint64) uint64 {
	d.visits++
	return d.ports[pw(p, 0, o>>6)]
}

func (d *dense) store(k portWord, v uint64) {
	if v == 0 {
		delete(d.ports, k)
		return
	}
	d.ports[k] = v
}

// refresh recomputes whether the words on o's path are blocked for p, after o's level-0
// word for p (below) or the presence words of the lowest changed levels changed.
func (d *dense) refresh(p PortKey, o, below uint64, changed int) {
	idx := o >> 6
	for l := 0; l < d.top(); l++ {
		d.visits++
		pres := d.presence(l)[idx]
		k := pw(p, l+1, idx>>6)
		old := d.ports[k]
		v := old &^ (1 << (idx & 63))
		if pres != 0 && pres&^below == 0 {
			v |= 1 << (idx & 63)
		}
		if v == old && l+1 >= changed {
			// Neither input of the level above changed.
			return
		}
		d.store(k, v)
		below, idx = v, idx>>6
	}
}

// add gives service an address at offset o.
func (d *dense) add(o uint64, service string, ports []PortKey) {
	s := &d.slots[o]
	if s.inUse() {
		if !d.shared {
			s.addHolder(service, ports)
			return
		}
		gained := minus(d.scratch[:0], ports, s.ports)
		s.addHolder(service, ports)
		for _, p := range gained {
			d.refresh(p, o, d.setPortBit(p, o, true), 0)
		}
		d.scratch = gained[:0]
		return
	}
	var others []PortKey
	if d.shared {
		// Ports blocked above o, now that o is used without them, are ports of any address
		// in the lowest non-empty word around o.
		if b, ok := d.near(o); ok {
			others = d.slots[b].ports
		}
	}
	s.addHolder(service, ports)
	changed := d.setUsed(o)
	if !d.shared {
		return
	}
	for _, p := range ports {
		d.refresh(p, o, d.setPortBit(p, o, true), changed)
	}
	d.scratch = minus(d.scratch[:0], others, ports)
	for _, p := range d.scratch {
		d.refresh(p, o, d.portBits(p, o), changed)
	}
}

// remove drops service from the address at offset o, and the address when nobody else
// holds it.
func (d *dense) remove(o uint64, service string) {
	s := &d.slots[o]
	before := s.ports
	s.removeHolder(service)
	if s.inUse() {
		if !d.shared {
			return
		}
		lost := minus(d.scratch[:0], before, s.ports)
		for _, p := range lost {
			d.refresh(p, o, d.setPortBit(p, o, false), 0)
		}
		d.scratch = lost[:0]
		return
	}
	changed := d.clearUsed(o)
	if !d.shared {
		return
	}
	for _, p := range before {
		d.refresh(p, o, d.setPortBit(p, o, false), changed)
	}
	// o was the address without them, so ports of any address in the lowest non-empty
	// word around o may now be blocked there.
	if b, ok := d.near(o); ok {
		d.scratch = minus(d.scratch[:0], d.slots[b].ports, before)
		for _, p := range d.scratch {
			d.refresh(p, o, d.portBits(p, o), changed)
		}
	}
}

// shareable is the lowest used offset none of whose holders has a port in ports.
func (d *dense) shareable(ports []PortKey) (uint64, bool) {
	if d.n == 0 {
		return 0, false
	}
	return d.search(d.top(), 0, ports)
}

func (d *dense) search(l int, idx uint64, ports []PortKey) (uint64, bool) {
	d.visits++
	mask := d.presence(l)[idx]
	for _, p := range ports {
		if mask == 0 {
			break
		}
		d.visits++
		mask &^= d.ports[pw(p, l, idx)]
	}
	for ; mask != 0; mask &= mask - 1 {
		e := idx<<6 | uint64(bits.TrailingZeros64(mask))
		if l == 0 {
			return e, true
		}
		if o, ok := d.search(l-1, e, ports); ok {
			return o, true
		}
	}
	return 0, false
}
