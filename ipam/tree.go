package ipam

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
	"slices"
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

func (k u128) next() u128 {
	lo, carry := bits.Add64(k.lo, 1, 0)
	return u128{k.hi + carry, lo}
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

// node is one address in use and everything the allocator knows about it.
//
// The used addresses of a pool live in a treap (a binary search tree balanced by random
// priorities) rather than a bitmap, because an IPv6 pool may have 2^64 addresses. Each
// node also summarises its subtree so that both questions the allocator asks are answered
// by one walk from the root: where the first gap is (lowest free address) and which is the
// lowest address a service with given ports may share.
type node struct {
	key         u128
	prio        uint64
	left, right *node

	size   int       // nodes in the subtree
	lo, hi u128      // smallest and largest key in the subtree
	common []PortKey // ports held at every address of the subtree: a request for any of them can skip it

	holders []holder  // sorted by service
	ports   []PortKey // union of the holders' ports, sorted
}

type holder struct {
	service string
	ports   []PortKey
}

func newNode(k u128) *node {
	// A hash of the key as priority keeps the tree's shape a function of its contents, so
	// a restored allocator is the same tree, and sequential keys still look random.
	z := k.lo ^ k.hi*0x9e3779b97f4a7c15 + 0x9e3779b97f4a7c15
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	return &node{key: k, prio: z ^ z>>31}
}

// conflict is the first holder whose ports overlap ports, or in unique mode any holder.
func (n *node) conflict(ports []PortKey, unique bool) (holder, []PortKey, bool) {
	for _, h := range n.holders {
		if unique {
			return h, nil, true
		}
		if both := intersect(nil, h.ports, ports); len(both) > 0 {
			return h, both, true
		}
	}
	return holder{}, nil, false
}

func (n *node) addHolder(service string, ports []PortKey) {
	i, _ := slices.BinarySearchFunc(n.holders, service, func(h holder, s string) int {
		if h.service < s {
			return -1
		}
		if h.service > s {
			return 1
		}
		return 0
	})
	n.holders = slices.Insert(n.holders, i, holder{service, ports})
	if len(n.ports) == 0 {
		// Shared with the holder: union never writes into a clipped slice.
		n.ports = slices.Clip(ports)
		return
	}
	n.ports = union(n.ports, ports)
}

func (n *node) removeHolder(service string) {
	n.holders = slices.DeleteFunc(n.holders, func(h holder) bool { return h.service == service })
	n.ports = nil
	for _, h := range n.holders {
		n.ports = union(n.ports, h.ports)
	}
}

// tree is the set of used addresses of one pool.
type tree struct {
	root *node
	// shared keeps node.common up to date; unique mode never asks about ports.
	shared bool
	// visits counts nodes walked through, so benchmarks can show that the walks stay
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
		if len(r.holders) == 0 {
			return t.merge(r.left, r.right)
		}
	}
	t.update(r)
	return r
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
	n.size, n.lo, n.hi = 1, n.key, n.key
	if n.left != nil {
		n.size += n.left.size
		n.lo = n.left.lo
	}
	if n.right != nil {
		n.size += n.right.size
		n.hi = n.right.hi
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

// contiguous reports whether the subtree holds every address from its lo to its hi.
func contiguous(n *node) bool {
	d := n.hi.sub(n.lo)
	return d.hi == 0 && d.lo == uint64(n.size-1)
}

// lowestFree is the lowest address in [first, last] not in the tree; every key is in
// that range.
func (t *tree) lowestFree(first, last u128) (u128, bool) {
	n := t.root
	if n == nil || n.lo != first {
		return first, true
	}
	// Follow the run of used addresses that starts at first down to where it ends: a
	// subtree that is contiguous is passed over whole, one that is not holds the gap.
	var end u128
	for {
		t.visits++
		if n.left != nil {
			if !contiguous(n.left) {
				n = n.left
				continue
			}
			if n.left.hi.next() != n.key {
				end = n.left.hi
				break
			}
		}
		if n.right == nil || n.right.lo != n.key.next() {
			end = n.key
			break
		}
		if contiguous(n.right) {
			end = n.right.hi
			break
		}
		n = n.right
	}
	if end == last {
		return u128{}, false
	}
	return end.next(), true
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

// The port sets below are sorted and small (a service has a handful of ports).

func overlaps(a, b []PortKey) bool {
	for len(a) > 0 && len(b) > 0 {
		switch c := comparePorts(a[0], b[0]); {
		case c < 0:
			a = a[1:]
		case c > 0:
			b = b[1:]
		default:
			return true
		}
	}
	return false
}

// intersect appends a∩b to dst; dst may be a[:0].
func intersect(dst, a, b []PortKey) []PortKey {
	for len(a) > 0 && len(b) > 0 {
		switch c := comparePorts(a[0], b[0]); {
		case c < 0:
			a = a[1:]
		case c > 0:
			b = b[1:]
		default:
			dst = append(dst, a[0])
			a, b = a[1:], b[1:]
		}
	}
	return dst
}

// union returns a∪b, reusing a's storage when b adds nothing.
func union(a, b []PortKey) []PortKey {
	for _, p := range b {
		i, found := slices.BinarySearchFunc(a, p, comparePorts)
		if !found {
			a = slices.Insert(a, i, p)
		}
	}
	return a
}
