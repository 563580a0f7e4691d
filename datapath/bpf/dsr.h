/* dsr: direct server return to the endpoint's node. The node a client's packet reaches
 * picks the endpoint as in the other modes (the service's Maglev table, the same on every
 * node) and, when the endpoint runs on another node, sends the packet unchanged inside
 * one outer IP header (IPv4 in IPv4, IPv6 in IPv6: protocols 4 and 41) to that node. The
 * program there strips the header and treats the packet as if it had arrived directly:
 * the VIP is translated to the endpoint (the client's address kept) and the reply is
 * translated back to come from the VIP and leaves by that node's routing. The state the
 * reply needs is on the endpoint's node only, so a load-balancing node can be lost at
 * any time without losing a connection. */
#ifndef SHARDLB_DSR_H
#define SHARDLB_DSR_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "csum.h"
#include "forward.h"
#include "maps.h"
#include "nat.h"
#include "balance.h"
#include "parse.h"
#include "structs.h"

static __always_inline bool same_addr(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* dsr_clamp_mss lowers the MSS a dsr endpoint announces in its SYN-ACK by the
 * encapsulation's overhead: the client's segments to the VIP are encapsulated on their
 * way in, and without this a full-sized segment no longer fits the links between nodes.
 * Only an MSS option in first place is seen (where Linux, BSD and Windows put it). A
 * CHECKSUM_PARTIAL packet's option bytes are summed later, with the rest of the
 * segment; otherwise the checksum moves by what the option moves, so the segment's sum
 * (a CHECKSUM_COMPLETE csum) does not change. */
static __always_inline void dsr_clamp_mss(struct __sk_buff *skb, const struct flow *f, void *l4, void *data_end)
{
	struct tcphdr *th = l4;
	__u8 *opt = (void *)(th + 1);

	if (f->proto != IPPROTO_TCP || (void *)(opt + 4) > data_end || !th->syn || th->doff < 6 || opt[0] != 2 ||
	    opt[1] != 4)
		return;
	__u16 *field = (__u16 *)(opt + 2);
	__u16 old = *field;
	__u16 mss = bpf_ntohs(old);
	__u16 less = f->family == AF_INET ? DSR_OVERHEAD4 : DSR_OVERHEAD6;

	if (mss <= less)
		return;
	__u16 now = bpf_htons(mss - less);
#ifdef SHARDLB_NO_KERN_CTX
	/* The kernel applies a change of L4 bytes as the checksum state asks (nothing for
	 * CHECKSUM_PARTIAL); the call may move the packet, which the caller knows. */
	__u32 check_off = (void *)&th->check - (void *)(long)skb->data;

	*field = now;
	bpf_l4_csum_replace(skb, check_off, old, now, sizeof(__u16));
#else
	*field = now;
	if (!csum_partial(skb))
		th->check = csum_apply(th->check, csum_diff16(0, old, now));
#endif
}

/* dsr_decap strips the outer header of an IP-in-IP packet sent to this node for a dsr
 * service (the inner packet's VIP, port and protocol are a dsr service's, and the outer
 * destination is the node address that service entry holds), and returns
 * FURTHER_PROCESSING: the caller parses the packet again. Anything else is none of its
 * business (NOT_OURS): fragments of the outer packet, outer IPv4 options, another
 * family inside, a packet for another node or service. A GSO packet keeps its segment
 * size (BPF_F_ADJ_ROOM_FIXED_GSO): its segments were that long inside the header too. */
static __noinline int dsr_decap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct service_key k = {};
	__u32 outer_dst[4] = {};
	__u32 hlen;
	__be16 *ports;

	if ((void *)(eth + 1) > data_end)
		return NOT_OURS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *out = (void *)(eth + 1);
		struct iphdr *in = (void *)(out + 1);

		if ((void *)(in + 1) > data_end || out->ihl != 5 || (out->frag_off & bpf_htons(IP_MF | IP_OFFSET)) ||
		    in->version != 4 || in->ihl < 5 || (in->frag_off & bpf_htons(IP_MF | IP_OFFSET)) ||
		    (in->protocol != IPPROTO_TCP && in->protocol != IPPROTO_UDP))
			return NOT_OURS;
		ports = (void *)in + in->ihl * 4;
		if ((void *)(ports + 2) > data_end)
			return NOT_OURS;
		outer_dst[0] = out->daddr;
		k.vip[0] = in->daddr;
		k.proto = in->protocol;
		k.family = AF_INET;
		hlen = sizeof(*out);
	} else {
		struct ipv6hdr *out = (void *)(eth + 1);
		struct ipv6hdr *in = (void *)(out + 1);

		if ((void *)(in + 1) > data_end || in->version != 6 ||
		    (in->nexthdr != IPPROTO_TCP && in->nexthdr != IPPROTO_UDP))
			return NOT_OURS;
		ports = (void *)(in + 1);
		if ((void *)(ports + 2) > data_end)
			return NOT_OURS;
		__builtin_memcpy(outer_dst, &out->daddr, 16);
		__builtin_memcpy(k.vip, &in->daddr, 16);
		k.proto = in->nexthdr;
		k.family = AF_INET6;
		hlen = sizeof(*out);
	}
	k.port = ports[1];
	struct service *svc = bpf_map_lookup_elem(&services, &k);
	if (!svc || svc->mode != MODE_DSR || !same_addr(svc->snat_addr, outer_dst))
		return NOT_OURS;
	if (bpf_skb_adjust_room(skb, -(__s32)hlen, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
		return NOT_OURS;
	return FURTHER_PROCESSING;
}

/* dsr_outer4 and dsr_outer6 write the outer header in the room dsr_encap made. IPv4:
 * the inner packet's TOS and DF, TTL 64, no options. IPv6: the inner packet's traffic
 * class, the flow hash as flow label (routers that hash the label spread tunnels'
 * flows over their paths), hop limit 64. */
static __always_inline int dsr_outer4(struct __sk_buff *skb, const struct ct_entry *t, __u16 len)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *out = data + sizeof(struct ethhdr);
	struct iphdr *in = (void *)(out + 1);

	if ((void *)(in + 1) > data_end)
		return TC_ACT_SHOT;
	out->version = 4;
	out->ihl = 5;
	out->tos = in->tos;
	out->tot_len = bpf_htons(len + DSR_OVERHEAD4);
	out->id = 0;
	out->frag_off = in->frag_off & bpf_htons(IP_DF);
	out->ttl = 64;
	out->protocol = IPPROTO_IPIP;
	out->check = 0;
	out->saddr = t->saddr[0];
	out->daddr = t->daddr[0];
	/* A header with its checksum sums to zero: a CHECKSUM_COMPLETE csum is unchanged. */
	out->check = ~csum_fold(csum_words((__u16 *)out, sizeof(*out) / 2));
	return FURTHER_PROCESSING;
}

static __always_inline int dsr_outer6(struct __sk_buff *skb, const struct flow *f, const struct ct_entry *t,
				      __u16 len)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *out = data + sizeof(struct ethhdr);
	struct ipv6hdr *in = (void *)(out + 1);

	if ((void *)(in + 1) > data_end)
		return TC_ACT_SHOT;
	__u32 first = bpf_ntohl(*(__be32 *)in) & 0x0ff00000; /* the traffic class */
	*(__be32 *)out = bpf_htonl(0x60000000 | first | (flow_hash(f) & 0xfffff));
	out->payload_len = bpf_htons(len);
	out->nexthdr = IPPROTO_IPV6;
	out->hop_limit = 64;
	__builtin_memcpy(&out->saddr, t->saddr, 16);
	__builtin_memcpy(&out->daddr, t->daddr, 16);
	/* No checksum covers an IPv6 header: a CHECKSUM_COMPLETE csum takes its sum. */
	bpf_csum_update(skb, csum_fold(csum_words((__u16 *)out, sizeof(*out) / 2)));
	return FURTHER_PROCESSING;
}

/* dsr_encap sends a packet of t's flow (a CT_ENCAP entry: this node to the endpoint's
 * node) inside an outer header, after a route lookup for the outer packet (cached in t
 * as translate caches one). record: t is a new flow's entry, recorded here. A packet
 * that must not be fragmented and does not fit the next hop once encapsulated is
 * answered with "fragmentation needed" / "packet too big" for its MTU less the outer
 * header, from the VIP (returned as TOO_BIG with *mtu); a GSO packet's segments shrink
 * instead (the kernel lowers its segment size by the header's length). The outer
 * packet goes to the kernel's forwarding when the route lookup fails. */
static __noinline int dsr_encap(struct __sk_buff *skb, const struct flow *f, struct ct_entry *t, bool record,
				__u16 *mtu)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *iph = data + sizeof(struct ethhdr);
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	struct bpf_fib_lookup fib;
	__u32 iif = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	__u64 now = bpf_jiffies64();
	int rc = BPF_FIB_LKUP_RET_SUCCESS;
	bool v4 = f->family == AF_INET;
	__u16 len, over = v4 ? DSR_OVERHEAD4 : DSR_OVERHEAD6;
	__u64 flags;

	if (v4) {
		if ((void *)(iph + 1) > data_end)
			return TC_ACT_OK;
		len = bpf_ntohs(iph->tot_len);
	} else {
		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_OK;
		len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
	}
	if (record || !next_hop_cached(t, iif, len + over, now)) {
		__builtin_memset(&fib, 0, sizeof(fib));
		fib.family = f->family;
		fib.l4_protocol = v4 ? IPPROTO_IPIP : IPPROTO_IPV6;
		fib.tot_len = skb->gso_size ? 0 : len + over;
		fib.ifindex = iif;
		if (v4) {
			fib.ipv4_src = t->saddr[0];
			fib.ipv4_dst = t->daddr[0];
		} else {
			__builtin_memcpy(fib.ipv6_src, t->saddr, 16);
			__builtin_memcpy(fib.ipv6_dst, t->daddr, 16);
		}
		rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
		if (rc == BPF_FIB_LKUP_RET_SUCCESS)
			cache_next_hop(t, &fib, iif, skb->gso_size ? fib.mtu_result : len + over, now);
		if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && !record && fib.mtu_result > over &&
		    must_not_fragment(skb, f, data, data_end)) {
			*mtu = fib.mtu_result - over;
			return TOO_BIG;
		}
	}
	if (record && ct_insert(f, t, BPF_ANY)) {
		count_drop(DROP_CONNTRACK_FULL);
		return TC_ACT_SHOT;
	}
	count_service(t, skb->len);
	flags = v4 ? BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 : BPF_F_ADJ_ROOM_ENCAP_L3_IPV6;
	if (bpf_skb_adjust_room(skb, over, BPF_ADJ_ROOM_MAC, flags)) {
		count_drop(DROP_DSR_ENCAP);
		return TC_ACT_SHOT;
	}
	int ret = v4 ? dsr_outer4(skb, t, len) : dsr_outer6(skb, f, t, len);
	if (ret != FURTHER_PROCESSING)
		return ret;
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return redirect_neigh(&fib);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_OK;
	return redirect_cached(skb, t);
}

#endif
