/* Flow handoff: after a planned switch of a VIP to this node (a mastership handover or
 * the previous master's clean stop), TCP segments of connections this node has no state
 * for are sent on, unchanged but for the TTL, to the previous master, which still has
 * them in its conntrack. Without it the first such segment would be balanced here, with
 * this node's SNAT address, and the endpoint, knowing the connection by the previous
 * master's address, would reset it. */
#ifndef SHARDLB_HANDOFF_H
#define SHARDLB_HANDOFF_H

#include <linux/bpf.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "csum.h"
#include "forward.h"
#include "maps.h"
#include "structs.h"

/* wants_handoff tells whether a packet of flow f, which has no conntrack entry, goes to
 * svc's previous master: only TCP segments other than a SYN (a SYN starts a connection
 * here), and only while Go has set a previous master for the service. */
static __always_inline bool wants_handoff(const struct flow *f, const struct service *svc, void *l4, void *data_end)
{
	if (f->proto != IPPROTO_TCP || !(svc->handoff[0] | svc->handoff[1] | svc->handoff[2] | svc->handoff[3]))
		return false;
	struct tcphdr *th = l4;
	return (void *)(th + 1) <= data_end && !th->syn;
}

/* handoff sends the packet to peer (the previous master) as a router would, with the
 * TTL decremented, or returns FURTHER_PROCESSING when it cannot: the peer is not on a
 * directly connected network (the packet would go to a router, which routes the VIP back
 * here), there is no route to it, or the TTL is spent. The packet is then balanced here
 * as before. */
static __noinline int handoff(struct __sk_buff *skb, const struct flow *f, const __u32 *peer, __u32 service_id)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct bpf_fib_lookup fib = {};
	__u32 iif = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	int rc;

	fib.family = f->family;
	fib.l4_protocol = f->proto;
	fib.sport = f->sport;
	fib.dport = f->dport;
	fib.ifindex = iif;
	if (f->family == AF_INET) {
		struct iphdr *iph = (void *)(eth + 1);
		if ((void *)(iph + 1) > data_end || iph->ttl <= 1)
			return FURTHER_PROCESSING;
		fib.tot_len = skb->gso_size ? 0 : bpf_ntohs(iph->tot_len); /* see route() */
		fib.ipv4_dst = peer[0];
		rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
		if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) || fib.ipv4_dst != peer[0])
			return FURTHER_PROCESSING;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		eth = data;
		iph = (void *)(eth + 1);
		if ((void *)(iph + 1) > data_end)
			return FURTHER_PROCESSING;
		/* The checksum moves by what the TTL moves, so the header's ones' complement
		 * sum (and a CHECKSUM_COMPLETE csum) is unchanged. */
		iph->check = csum_apply(iph->check, csum_dec_ttl(&iph->ttl, 0));
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end || ip6->hop_limit <= 1)
			return FURTHER_PROCESSING;
		fib.tot_len = skb->gso_size ? 0 : bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
		__builtin_memcpy(fib.ipv6_dst, peer, 16);
		rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
		if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
		    fib.ipv6_dst[0] != peer[0] || fib.ipv6_dst[1] != peer[1] || fib.ipv6_dst[2] != peer[2] ||
		    fib.ipv6_dst[3] != peer[3])
			return FURTHER_PROCESSING;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		eth = data;
		ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return FURTHER_PROCESSING;
		ip6->hop_limit--;
	}

	struct svc_stats *st = bpf_map_lookup_elem(&service_stats, &service_id);
	if (st)
		st->handoff_packets++;
	/* The lookup's destination is the peer itself (checked above): its next hop. */
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return redirect_neigh(&fib);
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	return bpf_redirect(fib.ifindex, 0);
}

#endif
