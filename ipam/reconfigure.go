package ipam

import (
	"cmp"
	"fmt"
	"slices"
)

// Reconfigure returns an allocator over pools (checked as New checks them) that holds
// every allocation a holds, so that changing the pools live moves no service's
// address. An address now in no pool is kept as a static address outside every pool
// is: it stays its service's, still conflicts, and is never handed out again once
// released. Those allocations are returned as orphaned (with the pool they had), for
// the caller to warn their services and pools. a is left as it was.
func (a *Allocator) Reconfigure(pools []PoolSpec) (next *Allocator, orphaned []Allocation, err error) {
	next, err = New(pools, a.unique)
	if err != nil {
		return nil, nil, err
	}
	var held []Allocation
	for service := range a.services {
		held = append(held, a.Lookup(service)...)
	}
	// Deterministic, though nothing held conflicts: a held every address once.
	slices.SortFunc(held, func(x, y Allocation) int {
		return cmp.Or(cmp.Compare(x.Service, y.Service), x.IP.Compare(y.IP))
	})
	if err := next.Restore(held); err != nil {
		return nil, nil, fmt.Errorf("reconfigure pools: %w", err)
	}
	for _, al := range held {
		if al.Pool != "" && next.poolOf(al.IP) == nil {
			orphaned = append(orphaned, al)
		}
	}
	return next, orphaned, nil
}
