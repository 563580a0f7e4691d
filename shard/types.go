// Package shard decides which load-balancer instance (shard) serves each service,
// which live member should master each instance, and what one node must announce and
// program: the Plan. It is pure: values in, values out, no clocks, sockets or clients.
//
// The types here are also the vocabulary the effectful packages speak: bgp applies a
// Plan's Advertisements, datapath applies its Frontends.
package shard

import (
	"fmt"
	"net/netip"
)

// Role is how a node announces a VIP.
type Role uint8

const (
	// RoleEqual: roles are off (no --setRoles); every node announces with the same
	// attributes and routers spread traffic by ECMP.
	RoleEqual Role = iota
	// RoleMaster: this node holds the mastership of the VIP's instance.
	RoleMaster
	// RoleBackup: another node (or nobody) masters the VIP's instance.
	RoleBackup
)

func (r Role) String() string {
	switch r {
	case RoleEqual:
		return "EQUAL"
	case RoleMaster:
		return "MASTER"
	case RoleBackup:
		return "BACKUP"
	}
	return fmt.Sprintf("Role(%d)", uint8(r))
}

// Protocol is a transport protocol of a service port.
type Protocol uint8

const (
	TCP Protocol = 6
	UDP Protocol = 17
)

func (p Protocol) String() string {
	switch p {
	case TCP:
		return "TCP"
	case UDP:
		return "UDP"
	}
	return fmt.Sprintf("Protocol(%d)", uint8(p))
}

// Mode is the NAT mode of a service (annotation loxilb.io/lbmode, default --setLBMode).
type Mode uint8

const (
	// ModeDefault rewrites the destination only (DNAT); replies come back through the
	// load balancer because it is the endpoint's route to the client.
	ModeDefault Mode = iota
	// ModeOneArm also rewrites the source to the node's address toward the endpoint.
	ModeOneArm
	// ModeFullNAT also rewrites the source to the VIP toward the endpoint.
	ModeFullNAT
	// ModeDSR is direct server return: the node a packet reaches sends it unchanged,
	// encapsulated, to its endpoint's node (Endpoint.Node), which translates the VIP to
	// the endpoint and the reply back to the VIP, and sends the reply by its own routing.
	ModeDSR
)

func (m Mode) String() string {
	switch m {
	case ModeDefault:
		return "default"
	case ModeOneArm:
		return "onearm"
	case ModeFullNAT:
		return "fullnat"
	case ModeDSR:
		return "dsr"
	}
	return fmt.Sprintf("Mode(%d)", uint8(m))
}

// KeepsClientAddr reports whether the endpoints see a connection's client address as
// its source in mode m: default and dsr translate only the destination, onearm and
// fullnat also the source.
func KeepsClientAddr(m Mode) bool { return m == ModeDefault || m == ModeDSR }

// Select is how a new flow picks its endpoint (annotation loxilb.io/epselect).
type Select uint8

const (
	// SelectHash is Maglev consistent hashing over the 5-tuple: every node picks the
	// same endpoint for a flow.
	SelectHash Select = iota
	// SelectRoundRobin cycles through the endpoints.
	SelectRoundRobin
	// SelectPersist hashes the source address only, so a client sticks to one endpoint.
	SelectPersist
)

func (s Select) String() string {
	switch s {
	case SelectHash:
		return "hash"
	case SelectRoundRobin:
		return "rr"
	case SelectPersist:
		return "persist"
	}
	return fmt.Sprintf("Select(%d)", uint8(s))
}

// Endpoint is one ready backend of a service port.
type Endpoint struct {
	Addr netip.Addr
	Port uint16
	// Node is the address of the node the endpoint runs on, of the endpoint's family
	// (that node's shardlb member address); zero when unknown. Only dsr uses it.
	Node netip.Addr
}

// ServicePort is one port of a service and the ready endpoints behind it.
type ServicePort struct {
	Protocol  Protocol
	Port      uint16
	Endpoints []Endpoint
}

// Service is a LoadBalancer service as the planner sees it.
type Service struct {
	Key      string // namespace/name
	Instance string // canonical instance name ("default", "llb-inst1", ...)
	VIPs     []netip.Addr
	Ports    []ServicePort
	Mode     Mode
	Select   Select
	// SourceRanges are the client prefixes allowed through the VIPs
	// (spec.loadBalancerSourceRanges); empty allows every client.
	SourceRanges []netip.Prefix
}

// Advertisement is one VIP prefix a node announces, and with which role.
type Advertisement struct {
	Prefix   netip.Prefix // /32 or /128
	Role     Role
	Instance string
	// Successor marks a backup that takes the instance over if its master fails
	// (Input.Successors): announced with attributes between master and backup, so
	// routers fall back to it and a failover moves traffic once.
	Successor bool
}

// Frontend is one (VIP, port, protocol) the datapath serves, with its endpoints.
type Frontend struct {
	Service   string // namespace/name, for counters and logs
	VIP       netip.Addr
	Port      uint16
	Protocol  Protocol
	Mode      Mode
	Select    Select
	Endpoints []Endpoint
	// Handoff, set on the master for a while after a planned switch of the VIP to it, is
	// the previous master's node address: segments of TCP connections this node has no
	// state for are sent there (modes with SNAT only; see datapath). Zero = none.
	Handoff netip.Addr
	// SourceRanges are the client prefixes allowed (Service.SourceRanges, sorted and
	// without duplicates); empty allows every client. Packets from elsewhere are dropped
	// and counted.
	SourceRanges []netip.Prefix
}

// Plan is what one node must announce and program. Both slices are sorted, so equal
// inputs give equal Plans.
type Plan struct {
	Advertisements []Advertisement
	Frontends      []Frontend
}
