package perf

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/shardlb/shardlb/shard"
)

// installer programs the LB namespace to serve the frontends and returns what undoes
// it. It is the seam where each load balancer under test plugs in.
type installer func(t testing.TB, tp *topology, fes []shard.Frontend) (remove func())

// variant is one way the client's traffic reaches the backend.
type variant struct {
	name    string    // benchmark case
	install installer // nil: nothing programmed in the LB namespace
	dst     netip.Addr
	direct  bool // over c1 straight to the backend, bypassing the LB namespace
}

// The variants every measurement alternates between. direct is the subtrahend: the
// same sender and sink with no LB hop at all. forward is plain kernel routing through
// the LB namespace without NAT: the floor for any design that hands packets to the
// kernel's forwarding path.
var (
	direct   = variant{name: "direct", dst: directAddr, direct: true}
	forward  = variant{name: "forward", dst: backendAddr}
	nftables = variant{name: "baseline", install: installNftables, dst: vip}
)

// frontends are the services of every measurement: the flood's UDP port and HTTP.
func frontends() []shard.Frontend {
	fe := func(p shard.Protocol, port uint16) shard.Frontend {
		return shard.Frontend{
			Service:   "perf/" + strings.ToLower(p.String()),
			VIP:       vip,
			Port:      port,
			Protocol:  p,
			Mode:      shard.ModeDefault,
			Select:    shard.SelectHash,
			Endpoints: []shard.Endpoint{{Addr: backendAddr, Port: port}},
		}
	}
	return []shard.Frontend{fe(shard.UDP, udpPort), fe(shard.TCP, httpPort)}
}

// installNftables programs what kube-proxy's nftables mode does on the NAT path: one
// verdict map from (VIP, protocol, port) to a service chain, which picks an endpoint
// chain with numgen, which DNATs (and so turns conntrack on).
func installNftables(t testing.TB, tp *topology, fes []shard.Frontend) func() {
	t.Helper()
	var b strings.Builder
	b.WriteString("table ip perf-lb {\n")
	var elems []string
	for i, fe := range fes {
		proto := strings.ToLower(fe.Protocol.String())
		elems = append(elems, fmt.Sprintf("%s . %s . %d : goto svc-%d", fe.VIP, proto, fe.Port, i))
		var eps []string
		for j, ep := range fe.Endpoints {
			eps = append(eps, fmt.Sprintf("%d : goto ep-%d-%d", j, i, j))
			fmt.Fprintf(&b, "\tchain ep-%d-%d {\n\t\tmeta l4proto %s dnat to %s\n\t}\n", i, j, proto, net.JoinHostPort(ep.Addr.String(), fmt.Sprint(ep.Port)))
		}
		fmt.Fprintf(&b, "\tchain svc-%d {\n\t\tnumgen random mod %d vmap { %s }\n\t}\n", i, len(fe.Endpoints), strings.Join(eps, ", "))
	}
	fmt.Fprintf(&b, "\tmap services {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\telements = { %s }\n\t}\n", strings.Join(elems, ", "))
	b.WriteString("\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tip daddr . meta l4proto . th dport vmap @services\n\t}\n")
	b.WriteString("}\n")
	nftApply(t, tp.lb, b.String())
	return func() { tp.lb.Run(t, "nft", "delete", "table", "ip", "perf-lb") }
}
