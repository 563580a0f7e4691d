package ipam

import (
	"slices"
	"strings"
)

// slot is everything the allocator knows about one used address: who holds it and the
// union of their ports.
type slot struct {
	// first is the holder whose service sorts first, and more the others in order. The
	// first is kept in the slot because most addresses have one holder: reaching it then
	// costs no second cache miss.
	first holder
	more  []holder
	ports []PortKey // union of the holders' ports, sorted
}

type holder struct {
	service string
	ports   []PortKey
}

func (s *slot) inUse() bool { return s.first.service != "" }

// conflict is the first holder whose ports overlap ports, or in unique mode any holder.
func (s *slot) conflict(ports []PortKey, unique bool) (holder, []PortKey, bool) {
	if unique {
		return s.first, nil, s.inUse()
	}
	for i := -1; i < len(s.more); i++ {
		h := s.first
		if i >= 0 {
			h = s.more[i]
		}
		if both := intersect(nil, h.ports, ports); len(both) > 0 {
			return h, both, true
		}
	}
	return holder{}, nil, false
}

// addHolder adds service, which must not be a holder yet.
func (s *slot) addHolder(service string, ports []PortKey) {
	h := holder{service, ports}
	if !s.inUse() {
		s.first = h
		// Shared with the holder: union never writes into a clipped slice.
		s.ports = slices.Clip(ports)
		return
	}
	if service < s.first.service {
		s.first, h = h, s.first
	}
	i, _ := slices.BinarySearchFunc(s.more, h.service, func(h holder, svc string) int {
		return strings.Compare(h.service, svc)
	})
	s.more = slices.Insert(s.more, i, h)
	s.ports = union(s.ports, ports)
}

// removeHolder drops service, which must be a holder.
func (s *slot) removeHolder(service string) {
	if len(s.more) == 0 {
		// The common case needs no string comparison, which would read the name's bytes
		// from wherever the caller keeps them.
		s.first, s.ports = holder{}, nil
		return
	}
	if s.first.service == service {
		s.first = s.more[0]
		// Delete zeroes the vacated element, so the array pins no service name.
		s.more = slices.Delete(s.more, 0, 1)
	} else {
		s.more = slices.DeleteFunc(s.more, func(h holder) bool { return h.service == service })
	}
	if len(s.more) == 0 {
		s.ports = slices.Clip(s.first.ports)
		return
	}
	// A fresh slice: the old union may be a holder's own ports.
	s.ports = union(nil, s.first.ports)
	for _, h := range s.more {
		s.ports = union(s.ports, h.ports)
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
