package kube

import (
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"

	coordinationv1 "k8s.io/api/coordination/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/shardlb/shardlb/shard"
)

// dsr sends a packet to the node its endpoint runs on, whose shardlb strips the outer
// header and translates the VIP. That node's address comes from its member Lease
// (shardlb.io/addresses, its --nodeIP), found by the EndpointSlice's nodeName, which is
// the member's name: a node that runs no shardlb cannot serve a dsr endpoint, so it
// needs no other source (Node objects would also name nodes without shardlb, and take
// a cluster-wide watch of every Node). An address, once seen, is remembered for the
// life of the process: a pod that restarts deletes its member Lease for a moment, and
// its endpoints must not lose their node meanwhile (the datapath refuses a dsr frontend
// with an endpoint whose node address is unknown, with a DatapathRefused Event).

// nodeAddressBook is member name -> node addresses, from the member Leases in leases
// and remembered after a Lease goes.
type nodeAddressBook struct {
	leases    cache.Store
	namespace string

	mu    sync.Mutex
	known map[string][]netip.Addr
}

func newNodeAddressBook(leases cache.Store, namespace string) *nodeAddressBook {
	return &nodeAddressBook{leases: leases, namespace: namespace, known: map[string][]netip.Addr{}}
}

// addresses is every member's node addresses as now known. The map returned is not
// changed afterwards.
func (b *nodeAddressBook) addresses() map[string][]netip.Addr {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refreshLocked()
	return b.known
}

// refresh reads the member Leases again and reports whether an address changed: the
// Lease informer's handler asks the node loop for an apply then, which Lease renewals
// alone do not need.
func (b *nodeAddressBook) refresh() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.refreshLocked()
}

func (b *nodeAddressBook) refreshLocked() bool {
	prefix := MemberLeaseName("")
	next := maps.Clone(b.known)
	for _, o := range b.leases.List() {
		l, ok := o.(*coordinationv1.Lease)
		if !ok || l.Namespace != b.namespace || !strings.HasPrefix(l.Name, prefix) {
			continue
		}
		var addrs []netip.Addr
		for _, f := range strings.Split(l.Annotations[annotationAddresses], ",") {
			if a, err := netip.ParseAddr(strings.TrimSpace(f)); err == nil {
				addrs = append(addrs, a.Unmap())
			}
		}
		if len(addrs) > 0 {
			next[strings.TrimPrefix(l.Name, prefix)] = addrs
		}
	}
	if maps.EqualFunc(next, b.known, slices.Equal) {
		return false
	}
	b.known = next
	return true
}

// endpointNodes gives each endpoint of ports (those of service s, from the slices in
// sliceIndex) the address of its node of the endpoint's family, when the slice names
// the node and that node's member Lease has such an address (addrs).
func endpointNodes(s *service, sliceIndex cache.Indexer, ports []shard.ServicePort, addrs map[string][]netip.Addr) {
	objs, _ := sliceIndex.ByIndex(indexByService, s.key())
	nodeOf := map[netip.Addr]string{}
	for _, o := range objs {
		es, ok := o.(*endpointSlice)
		if !ok {
			continue
		}
		for i, a := range es.Ready {
			if i < len(es.ReadyNodes) && es.ReadyNodes[i] != "" {
				nodeOf[a] = es.ReadyNodes[i]
			}
		}
	}
	for _, p := range ports {
		for i := range p.Endpoints {
			ep := &p.Endpoints[i]
			name, ok := nodeOf[ep.Addr]
			if !ok {
				continue
			}
			if j := slices.IndexFunc(addrs[name], func(a netip.Addr) bool { return a.Is4() == ep.Addr.Unmap().Is4() }); j >= 0 {
				ep.Node = addrs[name][j]
			}
		}
	}
}

// dsrNodesChanged marks every dsr service dirty when the node addresses changed since
// the last call, so that its endpoints get their node's new address; it returns the
// addresses to plan with.
func (n *node) dsrNodesChanged(dirty map[string]struct{}) map[string][]netip.Addr {
	if n.nodeAddrs == nil {
		return nil
	}
	addrs := n.nodeAddrs()
	if maps.EqualFunc(addrs, n.lastNodeAddrs, slices.Equal) {
		return addrs
	}
	n.lastNodeAddrs = addrs
	for _, o := range n.services.List() {
		if s, ok := o.(*service); ok {
			if m, _ := s.mode(n.cfg.DefaultMode); m == shard.ModeDSR {
				dirty[s.key()] = struct{}{}
			}
		}
	}
	return addrs
}
