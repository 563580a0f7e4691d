package datapath

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/shardlb/shardlb/shard"
)

// dropReasons names the kernel's enum drop_reason, in its order.
var dropReasons = []string{
	"no_endpoint",
	"snat_ports_exhausted",
	"conntrack_full",
	"fragment",
	"truncated",
	"ipv6_extension_header",
	"dsr_misdirected",
	"dsr_encap",
}

// DropReasons lists the names Stats reports drops under.
func DropReasons() []string { return slices.Clone(dropReasons) }

// Stats are the datapath's counters since its maps were created (a Datapath that
// adopted pinned maps continues their counters), summed over CPUs.
type Stats struct {
	Services []ServiceStats
	// Drops counts dropped packets by reason (see DropReasons).
	Drops map[string]uint64
	// SNATTimeWaitReuses counts new SNAT flows given a port whose endpoint may still
	// hold the old connection's tuple in TIME_WAIT, every other port tried being taken
	// (see the package doc, "SNAT ports"). Unlike the others it counts from the
	// program's load, not the maps' creation.
	SNATTimeWaitReuses uint64
}

// ServiceStats are one frontend's counters; a frontend's counters start at zero when
// it is added.
type ServiceStats struct {
	Service  string
	VIP      netip.Addr
	Port     uint16
	Protocol shard.Protocol
	// Packets and Bytes toward endpoints; ReplyPackets and ReplyBytes back to clients.
	Packets, Bytes           uint64
	ReplyPackets, ReplyBytes uint64
	NewFlows                 uint64
	// HandoffPackets went on to the previous master (see shard.Frontend.Handoff).
	HandoffPackets uint64
	// ICMPErrors are ICMP errors about the frontend's flows, translated back and sent
	// to the host that sent the packet they quote.
	ICMPErrors uint64
	// SourceRangeDrops are packets dropped because their client is outside the
	// frontend's source ranges (shard.Frontend.SourceRanges), both directions of
	// flows cut off by a change of the ranges included.
	SourceRangeDrops uint64
}

// Stats reads the counters. A map that cannot be read is logged and reads as zero.
func (d *Datapath) Stats() Stats {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := Stats{Drops: make(map[string]uint64, len(dropReasons))}
	for i, name := range dropReasons {
		var per []uint64
		if err := d.objs.Drops.Lookup(uint32(i), &per); err != nil {
			d.log.Error("read drop counter", "reason", name, "err", err)
		}
		var n uint64
		for _, v := range per {
			n += v
		}
		st.Drops[name] = n
	}
	var per []uint64
	if err := d.objs.SnatTimeWaitReuses.Lookup(uint32(0), &per); err != nil {
		d.log.Error("read SNAT TIME_WAIT reuse counter", "err", err)
	}
	for _, v := range per {
		st.SNATTimeWaitReuses += v
	}
	for k, a := range d.applied {
		s := ServiceStats{Service: a.fe.Service, VIP: k.vip, Port: k.port, Protocol: k.proto}
		var per []lbSvcStats
		if err := d.objs.ServiceStats.Lookup(a.id, &per); err != nil {
			d.log.Error("read service counters", "frontend", k, "err", err)
		}
		for _, v := range per {
			s.Packets += v.FwdPackets
			s.Bytes += v.FwdBytes
			s.ReplyPackets += v.ReplyPackets
			s.ReplyBytes += v.ReplyBytes
			s.NewFlows += v.NewFlows
			s.HandoffPackets += v.HandoffPackets
			s.ICMPErrors += v.IcmpErrors
			s.SourceRangeDrops += v.SourceRangeDrops
		}
		st.Services = append(st.Services, s)
	}
	slices.SortFunc(st.Services, func(a, b ServiceStats) int {
		if c := a.VIP.Compare(b.VIP); c != 0 {
			return c
		}
		if a.Port != b.Port {
			return int(a.Port) - int(b.Port)
		}
		return int(a.Protocol) - int(b.Protocol)
	})
	return st
}

// resetStats zeroes a service id's counters before a new frontend takes it over.
func (d *Datapath) resetStats(id uint32) error {
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return fmt.Errorf("reset service counters: %w", err)
	}
	if err := d.objs.ServiceStats.Put(id, make([]lbSvcStats, n)); err != nil {
		return fmt.Errorf("reset service counters: %w", err)
	}
	return nil
}
