// Package datapath loads shardlb's eBPF load balancer and programs it: services keyed by
// (VIP, port, protocol), Maglev rings computed in Go, conntrack in both directions and
// the default, onearm and fullnat NAT modes, for IPv4 and IPv6.
package datapath
