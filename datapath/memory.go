package datapath

import (
	"fmt"
	"math/bits"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
)

// sizeMaps sets the number of entries of every map Config sizes in spec.
func sizeMaps(spec *ebpf.CollectionSpec, cfg Config) error {
	if cfg.MaxSourceRanges < 0 || cfg.SourceRangeEntries < 0 {
		return fmt.Errorf("MaxSourceRanges %d and SourceRangeEntries %d must not be negative", cfg.MaxSourceRanges, cfg.SourceRangeEntries)
	}
	sizes := map[string]int{
		lbMapConntrack4Tcp: cfg.ConntrackSize,
		lbMapConntrack4Udp: cfg.ConntrackSize,
		lbMapConntrack6:    cfg.ConntrackSize,
		lbMapServices:      cfg.MaxServices,
		lbMapVips:          cfg.MaxServices,
		lbMapServiceStats:  cfg.MaxServices,
		lbMapEndpoints:     cfg.MaxEndpoints,
		lbMapRingSlots:     cfg.RingSlots / 2,
		// Room for one frontend's old and new prefixes side by side: SetServices writes
		// a frontend's new prefixes before it removes the old ones.
		lbMapSourceRanges4: cfg.SourceRangeEntries + cfg.MaxSourceRanges,
		lbMapSourceRanges6: cfg.SourceRangeEntries + cfg.MaxSourceRanges,
	}
	for name, n := range sizes {
		if n <= 0 || n > 1<<31 {
			return fmt.Errorf("size of map %s must be from 1 to 2^31, got %d", name, n)
		}
		spec.Maps[name].MaxEntries = uint32(n)
	}
	return nil
}

// The kernel's overhead in a hash map: each element's header (struct htab_elem before
// the key: list node, LRU node, hash) and a bucket (list head and lock) per entry,
// the entries rounded up to a power of two; on 64-bit kernels.
const (
	htabElemHeader = 48
	htabBucket     = 16
)

// MapEstimate is one map's share of a MemoryEstimate.
type MapEstimate struct {
	Name               string
	Type               ebpf.MapType
	MaxEntries         uint32
	KeySize, ValueSize uint32
	PerCPU             bool
	Bytes              uint64
}

// MemoryEstimate is the memory the datapath's maps take at some sizes, estimated from
// their specifications (see EstimateMemory).
type MemoryEstimate struct {
	Total uint64
	CPUs  int
	Maps  []MapEstimate // by name
}

// EstimateMemory estimates the memory the maps New creates with cfg take on a node of
// cpus CPUs. Each map counts MaxEntries x (key + value), both rounded up to 8 bytes,
// with the value once per CPU in per-CPU maps and no key in arrays; hash maps add the
// kernel's 48-byte element header per entry and a 16-byte bucket per entry rounded up
// to a power of two. All of it is allocated at load (the conntrack maps, the largest
// share, are preallocated) except the source-range tries', counted here full. It is an
// estimate: the kernel's per-CPU LRU lists, locks and page rounding are left out
// (MapMemory reports what the kernel accounts to the loaded maps).
func EstimateMemory(cfg Config, cpus int) (MemoryEstimate, error) {
	cfg.setDefaults()
	spec, err := loadLb()
	if err != nil {
		return MemoryEstimate{}, fmt.Errorf("estimate map memory: %w", err)
	}
	if err := sizeMaps(spec, cfg); err != nil {
		return MemoryEstimate{}, fmt.Errorf("estimate map memory: %w", err)
	}
	return estimateMemory(spec, cpus)
}

func estimateMemory(spec *ebpf.CollectionSpec, cpus int) (MemoryEstimate, error) {
	est := MemoryEstimate{CPUs: cpus}
	for name, m := range spec.Maps {
		if !slices.Contains(sizedMaps, name) {
			continue // the program's global variables
		}
		e := mapEstimate(name, m.Type, m.MaxEntries, m.KeySize, m.ValueSize, cpus)
		est.Maps = append(est.Maps, e)
		est.Total += e.Bytes
	}
	slices.SortFunc(est.Maps, func(a, b MapEstimate) int { return strings.Compare(a.Name, b.Name) })
	return est, nil
}

// sizedMaps are the datapath's maps, those MapMemory reports.
var sizedMaps = []string{
	lbMapConntrack4Tcp, lbMapConntrack4Udp, lbMapConntrack6, lbMapDrops, lbMapEndpoints, lbMapRingSlots,
	lbMapServiceStats, lbMapServices, lbMapVips, lbMapEndpointNhs, lbMapNewEntry, lbMapSourceRanges4, lbMapSourceRanges6,
	lbMapSnatTimeWaitReuses,
}

// perCPUTypes are the map types with a value per CPU.
var perCPUTypes = []ebpf.MapType{ebpf.PerCPUArray, ebpf.PerCPUHash, ebpf.LRUCPUHash, ebpf.PerCPUCGroupStorage}

// mapEstimate is the estimated memory of one map (see EstimateMemory).
func mapEstimate(name string, typ ebpf.MapType, entries, keySize, valueSize uint32, cpus int) MapEstimate {
	round8 := func(n uint32) uint64 { return (uint64(n) + 7) &^ 7 }
	e := MapEstimate{Name: name, Type: typ, MaxEntries: entries, KeySize: keySize, ValueSize: valueSize, PerCPU: slices.Contains(perCPUTypes, typ)}
	per := round8(valueSize)
	if e.PerCPU {
		per *= uint64(max(cpus, 1))
	}
	switch typ {
	case ebpf.Array, ebpf.PerCPUArray:
	case ebpf.Hash, ebpf.LRUHash, ebpf.PerCPUHash, ebpf.LRUCPUHash:
		per += htabElemHeader + round8(keySize)
		e.Bytes = htabBucket << bits.Len32(max(entries, 1)-1)
	default:
		per += round8(keySize)
	}
	e.Bytes += uint64(entries) * per
	return e
}
