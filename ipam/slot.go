package ipam

import (
	"slices"
	"strings"
)

// slot is everything the allocator knows about one used address: who holds it and the
// union of their ports.
type slot struct {
	holders []holder  // sorted by service
	ports   []PortKey // union of the holders' ports, sorted
}

type holder struct {
	service string
	ports   []PortKey
}

func (s *slot) inUse() bool { return len(s.holders) > 0 }

// conflict is the first holder whose ports overlap ports, or in unique mode any holder.
func (s *slot) conflict(ports []PortKey, unique bool) (holder, []PortKey, bool) {
	for _, h := range s.holders {
		if unique {
			return h, nil, true
		}
		if both := intersect(nil, h.ports, ports); len(both) > 0 {
			return h, both, true
		}
	}
	return holder{}, nil, false
}

func (s *slot) addHolder(service string, ports []PortKey) {
	i, _ := slices.BinarySearchFunc(s.holders, service, func(h holder, svc string) int {
		return strings.Compare(h.service, svc)
	})
	// A freed slot keeps its holders array, so churn on an address allocates nothing.
	s.holders = slices.Insert(s.holders, i, holder{service, ports})
	if len(s.holders) == 1 {
		// Shared with the holder: union never writes into a clipped slice.
		s.ports = slices.Clip(ports)
		return
	}
	s.ports = union(s.ports, ports)
}

// removeHolder drops service, which must be a holder.
func (s *slot) removeHolder(service string) {
	if len(s.holders) == 1 {
		// The common case needs no string comparison, which would read the name's bytes
		// from wherever the caller keeps them.
		s.holders[0] = holder{}
		s.holders, s.ports = s.holders[:0], nil
		return
	}
	// DeleteFunc zeroes the vacated element, so the kept array pins no service name.
	s.holders = slices.DeleteFunc(s.holders, func(h holder) bool { return h.service == service })
	switch len(s.holders) {
	case 0:
		s.ports = nil
	case 1:
		s.ports = slices.Clip(s.holders[0].ports)
	default:
		// A fresh slice: the old union may be a holder's own ports.
		s.ports = nil
		for _, h := range s.holders {
			s.ports = union(s.ports, h.ports)
		}
	}
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

// minus appends a∖b to dst.
func minus(dst, a, b []PortKey) []PortKey {
	for len(a) > 0 {
		if len(b) == 0 {
			return append(dst, a...)
		}
		switch c := comparePorts(a[0], b[0]); {
		case c < 0:
			dst = append(dst, a[0])
			a = a[1:]
		case c > 0:
			b = b[1:]
		default:
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
