package ipam

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
)

// u128 is an address as a number, so that ranges of IPv6 pools larger than 2^64 can be
// compared and stepped through without big.Int.
type u128 struct{ hi, lo uint64 }

func keyOf(a netip.Addr) u128 {
	if a.Is4() {
		b := a.As4()
		return u128{0, uint64(binary.BigEndian.Uint32(b[:]))}
	}
	b := a.As16()
	return u128{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}
}

func (k u128) addr(f Family) netip.Addr {
	if f == IPv4 {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], uint32(k.lo))
		return netip.AddrFrom4(b)
	}
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], k.hi)
	binary.BigEndian.PutUint64(b[8:], k.lo)
	return netip.AddrFrom16(b)
}

func (k u128) cmp(o u128) int {
	switch {
	case k.hi < o.hi:
		return -1
	case k.hi > o.hi:
		return 1
	case k.lo < o.lo:
		return -1
	case k.lo > o.lo:
		return 1
	}
	return 0
}

func (k u128) add(o u128) u128 {
	lo, carry := bits.Add64(k.lo, o.lo, 0)
	hi, _ := bits.Add64(k.hi, o.hi, carry)
	return u128{hi, lo}
}

func (k u128) sub(o u128) u128 {
	lo, borrow := bits.Sub64(k.lo, o.lo, 0)
	hi, _ := bits.Sub64(k.hi, o.hi, borrow)
	return u128{hi, lo}
}

// span is the number of addresses from first to last inclusive, saturated to uint64.
func span(first, last u128) uint64 {
	d := last.sub(first)
	if d.hi != 0 || d.lo == ^uint64(0) {
		return ^uint64(0)
	}
	return d.lo + 1
}

// node is one used address of a pool's sparse part, the static addresses too far past
// the pool's first address for the bitmap (see dense) to cover without wasting memory.
//
// They live in a treap (a binary search tree balanced by random priorities) because an
// IPv6 pool may have 2^64 addresses and static IPs may be anywhere in it. Each node
// summarises the ports common to its subtree, so that the lowest address a service with
// given ports may share is found without visiting subtrees that all hold one of them.
type node struct {
	slot
	key         u128
	prio        uint64
	left, right *node

	size   int       // nodes in the subtree
	common []PortKey // ports held at every address of the subtree: a request for any of them can skip it
}

func newNode(k u128) *node {
	// A hash of the key as priority keeps the tree's shape a function of its contents, so
	// a restored allocator is the same tree, and sequential keys still look random.
	z := k.lo ^ k.hi*0x9e3779b97f4a7c15 + 0x9e3779b97f4a7c15
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	return &node{key: k, prio: z ^ z>>31}
}

// tree is the set of used addresses of a pool's sparse part.
type tree struct {
	root *node
	// shared keeps node.common up to date; unique mode never asks about ports.
	shared bool
	// visits counts nodes walked through, so tests can show that the walks stay
	// logarithmic whatever the machine's load does to the timings.
	visits uint64
}

func (t *tree) get(k u128) *node {
	n := t.root
	for n != nil {
		t.visits++
		switch c := k.cmp(n.key); {
		case c < 0:
			n = n.left
		case c > 0:
			n = n.right
		default:
			return n
		}
	}
	return nil
}

func (t *tree) len() int {
	if t.root == nil {
		return 0
	}
	return t.root.size
}

func (t *tree) insert(n *node) { t.root = t.ins(t.root, n) }

func (t *tree) ins(r, n *node) *node {
	if r == nil {
		t.update(n)
		return n
	}
	t.visits++
	if n.key.cmp(r.key) < 0 {
		r.left = t.ins(r.left, n)
		if r.left.prio > r.prio {
			return t.rotateRight(r)
		}
	} else {
		r.right = t.ins(r.right, n)
		if r.right.prio > r.prio {
			return t.rotateLeft(r)
		}
	}
	t.update(r)
	return r
}

func (t *tree) rotateRight(r *node) *node {
	l := r.left
	r.left, l.right = l.right, r
	t.update(r)
	t.update(l)
	return l
}

func (t *tree) rotateLeft(r *node) *node {
	l := r.right
	r.right, l.left = l.left, r
	t.update(r)
	t.update(l)
	return l
}

// release drops service from the node at k, and the node too when nobody else holds
// it, in one walk from the root.
func (t *tree) release(k u128, service string) { t.root = t.rel(t.root, k, service) }

func (t *tree) rel(r *node, k u128, service string) *node {
	if r == nil {
		return nil
	}
	t.visits++
	switch c := k.cmp(r.key); {
	case c < 0:
		r.left = t.rel(r.left, k, service)
	case c > 0:
		r.right = t.rel(r.right, k, service)
	default:
		r.removeHolder(service)
		if !r.inUse() {
			return t.merge(r.left, r.right)
		}
	}
	t.update(r)
	return r
}

// popMin removes and returns the node with the lowest key, nil when the tree is empty.
func (t *tree) popMin() *node {
	var m *node
	t.root, m = t.pop(t.root)
	return m
}

func (t *tree) pop(r *node) (root, m *node) {
	if r == nil {
		return nil, nil
	}
	t.visits++
	if r.left == nil {
		right := r.right
		r.left, r.right = nil, nil
		return right, r
	}
	r.left, m = t.pop(r.left)
	t.update(r)
	return r, m
}

// min is the node with the lowest key, nil when the tree is empty.
func (t *tree) min() *node {
	n := t.root
	for n != nil && n.left != nil {
		t.visits++
		n = n.left
	}
	return n
}

// merge joins two treaps where every key of a is below every key of b.
func (t *tree) merge(a, b *node) *node {
	switch {
	case a == nil:
		return b
	case b == nil:
		return a
	}
	t.visits++
	switch {
	case a.prio > b.prio:
		a.right = t.merge(a.right, b)
		t.update(a)
		return a
	default:
		b.left = t.merge(a, b.left)
		t.update(b)
		return b
	}
}

// refresh recomputes the summaries on the path to k after its ports changed.
func (t *tree) refresh(k u128) { t.ref(t.root, k) }

func (t *tree) ref(r *node, k u128) {
	if r == nil {
		return
	}
	t.visits++
	switch c := k.cmp(r.key); {
	case c < 0:
		t.ref(r.left, k)
	case c > 0:
		t.ref(r.right, k)
	}
	t.update(r)
}

func (t *tree) update(n *node) {
	n.size = 1
	if n.left != nil {
		n.size += n.left.size
	}
	if n.right != nil {
		n.size += n.right.size
	}
	if !t.shared {
		return
	}
	n.common = append(n.common[:0], n.ports...)
	if n.left != nil {
		n.common = intersect(n.common[:0], n.common, n.left.common)
	}
	if n.right != nil {
		n.common = intersect(n.common[:0], n.common, n.right.common)
	}
}

// lowestShareable is the lowest used address none of whose ports is in ports.
func (t *tree) lowestShareable(ports []PortKey) *node { return t.shareable(t.root, ports) }

func (t *tree) shareable(n *node, ports []PortKey) *node {
	if n == nil || overlaps(n.common, ports) {
		return nil
	}
	t.visits++
	if m := t.shareable(n.left, ports); m != nil {
		return m
	}
	if !overlaps(n.ports, ports) {
		return n
	}
	return t.shareable(n.right, ports)
}
