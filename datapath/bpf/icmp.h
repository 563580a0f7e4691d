/* ICMP errors about translated flows. A router that cannot deliver a packet this node
 * translated (no route, TTL exceeded, and above all "fragmentation needed" / "packet too
 * big", which path MTU discovery depends on) answers the packet's translated source:
 * the VIP for a reply, the node's SNAT address for an onearm request, the client behind
 * a default-mode request. Left alone, the error reaches a host that never sent the
 * quoted packet, or none, and a server whose replies are too big for the client's path
 * keeps sending them. Here the quoted packet is translated back to what its sender sent
 * and the error goes to that sender, as the kernel's NAT does.
 *
 * The quoted packet is one this node sent, so the reverse of its tuple is a tracked
 * direction of the same flow: that entry t rewrites D->S packets into
 * (t.saddr:t.sport -> t.daddr:t.dport), which makes the quoted S->D packet the
 * translation of (t.daddr:t.dport -> t.saddr:t.sport), sent by t.daddr. */
#ifndef SHARDLB_ICMP_H
#define SHARDLB_ICMP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "csum.h"
#include "forward.h"
#include "maps.h"
#include "structs.h"

/* The ICMP and ICMPv6 header (linux/icmp.h pulls in libc headers BPF cannot build
 * with): type, code, checksum, then four bytes that depend on the type. */
struct icmp_hdr {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u32 rest;
};

/* The errors translated: they quote the packet they are about. */
#define ICMP4_DEST_UNREACH 3
#define ICMP4_TIME_EXCEEDED 11
#define ICMP4_PARAMETER_PROBLEM 12
#define ICMP6_DEST_UNREACH 1
#define ICMP6_PACKET_TOO_BIG 2
#define ICMP6_TIME_EXCEEDED 3
#define ICMP6_PARAMETER_PROBLEM 4

/* The quoted packet's first 8 bytes of TCP or UDP: its ports, then the UDP length and
 * checksum or the TCP sequence number. */
struct quoted_l4 {
	__be16 sport;
	__be16 dport;
	__be16 word2;
	__be16 word3;
};

/* icmp_quoted_check returns where the quoted L4 header's checksum is, or 0 when the
 * quote is too short to hold it (only 8 bytes of L4 are certain: the TCP checksum is at
 * 16) or carries none (IPv4 UDP checksum 0). */
static __always_inline __u16 *icmp_quoted_check(struct quoted_l4 *q, __u8 proto, void *data_end, bool v4)
{
	if (proto == IPPROTO_UDP)
		return v4 && q->word3 == 0 ? 0 : &q->word3;
	__u16 *check = (void *)q + 16;
	if ((void *)(check + 1) > data_end)
		return 0;
	return check;
}

/* icmp_quoted_rewrite writes the sender's ports into the quoted L4 header and fixes its
 * checksum when it is quoted, for an address change of addr_diff. It returns the change
 * of the bytes' one's-complement sum the ICMP checksum must follow (apart from the
 * addresses, which the caller adds). */
static __always_inline __u64 icmp_quoted_rewrite(struct quoted_l4 *q, __u8 proto, void *data_end, bool v4,
						 __be16 sport, __be16 dport, __u64 addr_diff)
{
	__u64 port_diff = csum_diff16(0, q->sport, sport);
	port_diff = csum_diff16(port_diff, q->dport, dport);
	__u64 diff = port_diff;
	__u16 *check = icmp_quoted_check(q, proto, data_end, v4);

	if (check) {
		__u16 old = *check;
		__u16 sum = csum_apply(old, addr_diff + port_diff);
		if (proto == IPPROTO_UDP && sum == 0)
			sum = 0xffff;
		*check = sum;
		diff = csum_diff16(diff, old, sum);
	}
	q->sport = sport;
	q->dport = dport;
	return diff;
}

/* count_icmp_error counts an ICMP error sent about one of the service's flows. */
static __always_inline void count_icmp_error(__u32 service_id)
{
	struct svc_stats *st = bpf_map_lookup_elem(&service_stats, &service_id);
	if (st)
		st->icmp_errors++;
}

/* icmp_send_on sends the translated error to fib's answer and counts it for the flow's
 * service. */
static __always_inline int icmp_send_on(struct ethhdr *eth, struct bpf_fib_lookup *fib, int rc, __u32 service_id)
{
	count_icmp_error(service_id);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return redirect_neigh(fib);
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	return bpf_redirect(fib->ifindex, 0);
}

/* icmp4_error translates an ICMPv4 destination unreachable, time exceeded or parameter
 * problem quoting a packet of a tracked flow, and sends it to that packet's sender; any
 * other ICMP passes on untouched (NOT_OURS), as do outer and quoted IP headers with
 * options. */
static __noinline int icmp4_error(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	struct icmp_hdr *ic = (void *)(iph + 1);
	struct iphdr *in = (void *)(ic + 1);
	struct quoted_l4 *q = (void *)(in + 1);
	struct bpf_fib_lookup fib = {};
	struct flow k = {};
	int rc;

	if ((void *)(q + 1) > data_end)
		return NOT_OURS;
	if (iph->ihl != 5 || (iph->frag_off & bpf_htons(IP_MF | IP_OFFSET)) || iph->ttl <= 1)
		return NOT_OURS;
	if (ic->type != ICMP4_DEST_UNREACH && ic->type != ICMP4_TIME_EXCEEDED && ic->type != ICMP4_PARAMETER_PROBLEM)
		return NOT_OURS;
	/* The error goes to the quoted packet's source; anything else is not about a packet
	 * this node sent. */
	if (in->ihl != 5 || (in->protocol != IPPROTO_TCP && in->protocol != IPPROTO_UDP) || in->saddr != iph->daddr)
		return NOT_OURS;
	k.saddr[0] = in->daddr;
	k.daddr[0] = in->saddr;
	k.sport = q->dport;
	k.dport = q->sport;
	k.proto = in->protocol;
	k.family = AF_INET;
	struct ct_entry *t = ct_lookup(&k);
	if (!t)
		return NOT_OURS;
	__be32 sender = t->daddr[0], peer = t->saddr[0];
	__be16 sender_port = t->dport, peer_port = t->sport;
	__u32 service_id = t->service_id;

	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_ICMP;
	fib.ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	fib.tot_len = bpf_ntohs(iph->tot_len);
	fib.ipv4_src = iph->saddr;
	fib.ipv4_dst = sender;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return NOT_OURS;

	/* The quoted header: addresses, its checksum, ports and L4 checksum. */
	__u64 addr_diff = csum_diff32(0, in->saddr, sender);
	addr_diff = csum_diff32(addr_diff, in->daddr, peer);
	__u16 in_check = csum_apply(in->check, addr_diff);
	__u64 icmp_diff = addr_diff + csum_diff16(0, in->check, in_check);
	icmp_diff += icmp_quoted_rewrite(q, in->protocol, data_end, true, sender_port, peer_port, addr_diff);
	in->saddr = sender;
	in->daddr = peer;
	in->check = in_check;
	ic->checksum = csum_apply(ic->checksum, icmp_diff);

	/* The outer header: the new destination and, forwarded here, one TTL less. */
	__u64 ip_diff = csum_dec_ttl(&iph->ttl, csum_diff32(0, iph->daddr, sender));
	iph->daddr = sender;
	iph->check = csum_apply(iph->check, ip_diff);
	return icmp_send_on(eth, &fib, rc, service_id);
}

/* icmp6_error is icmp4_error for ICMPv6 destination unreachable, packet too big, time
 * exceeded and parameter problem. Extension headers, outer or quoted, pass untouched. */
static __noinline int icmp6_error(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	struct icmp_hdr *ic = (void *)(ip6 + 1);
	struct ipv6hdr *in = (void *)(ic + 1);
	struct quoted_l4 *q = (void *)(in + 1);
	struct bpf_fib_lookup fib = {};
	struct flow k = {};
	__u32 sender[4], peer[4];
	int rc, i;

	if ((void *)(q + 1) > data_end)
		return NOT_OURS;
	if (ip6->nexthdr != IPPROTO_ICMPV6 || ip6->hop_limit <= 1)
		return NOT_OURS;
	if (ic->type != ICMP6_DEST_UNREACH && ic->type != ICMP6_PACKET_TOO_BIG && ic->type != ICMP6_TIME_EXCEEDED &&
	    ic->type != ICMP6_PARAMETER_PROBLEM)
		return NOT_OURS;
	if (in->nexthdr != IPPROTO_TCP && in->nexthdr != IPPROTO_UDP)
		return NOT_OURS;
	__builtin_memcpy(k.saddr, &in->daddr, 16);
	__builtin_memcpy(k.daddr, &in->saddr, 16);
	if (k.daddr[0] != ip6->daddr.in6_u.u6_addr32[0] || k.daddr[1] != ip6->daddr.in6_u.u6_addr32[1] ||
	    k.daddr[2] != ip6->daddr.in6_u.u6_addr32[2] || k.daddr[3] != ip6->daddr.in6_u.u6_addr32[3])
		return NOT_OURS;
	k.sport = q->dport;
	k.dport = q->sport;
	k.proto = in->nexthdr;
	k.family = AF_INET6;
	struct ct_entry *t = ct_lookup(&k);
	if (!t)
		return NOT_OURS;
	__builtin_memcpy(sender, t->daddr, 16);
	__builtin_memcpy(peer, t->saddr, 16);
	__be16 sender_port = t->dport, peer_port = t->sport;
	__u32 service_id = t->service_id;

	fib.family = AF_INET6;
	fib.l4_protocol = IPPROTO_ICMPV6;
	fib.ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	fib.tot_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
	__builtin_memcpy(fib.ipv6_src, &ip6->saddr, 16);
	__builtin_memcpy(fib.ipv6_dst, sender, 16);
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return NOT_OURS;

	/* No IPv6 header checksum: the quoted addresses count in the quoted L4 checksum's
	 * pseudo-header, and with the outer destination in the ICMPv6 checksum's. */
	__u64 addr_diff = 0, outer_diff = 0;
#pragma unroll
	for (i = 0; i < 4; i++) {
		addr_diff = csum_diff32(addr_diff, in->saddr.in6_u.u6_addr32[i], sender[i]);
		addr_diff = csum_diff32(addr_diff, in->daddr.in6_u.u6_addr32[i], peer[i]);
		outer_diff = csum_diff32(outer_diff, ip6->daddr.in6_u.u6_addr32[i], sender[i]);
	}
	__u64 icmp_diff = addr_diff + outer_diff;
	icmp_diff += icmp_quoted_rewrite(q, in->nexthdr, data_end, false, sender_port, peer_port, addr_diff);
	__builtin_memcpy(&in->saddr, sender, 16);
	__builtin_memcpy(&in->daddr, peer, 16);
	__builtin_memcpy(&ip6->daddr, sender, 16);
	ic->checksum = csum_apply(ic->checksum, icmp_diff);
	ip6->hop_limit--;
	return icmp_send_on(eth, &fib, rc, service_id);
}

/* Answering a packet too big for its next hop (its route lookup said FRAG_NEEDED) that
 * must not be fragmented (IPv4 with DF, any IPv6): the packet, still as its sender sent
 * it, is cut down and rewritten in place into "fragmentation needed" (ICMPv4) or
 * "packet too big" (ICMPv6) with the next hop's MTU, from the packet's destination back
 * to its sender, quoting the packet's IP header and 8 bytes of TCP or UDP, and sent out
 * where it came in, to the previous hop. That is what a router does; the kernel's own
 * answer would go to the packet's translated source instead. */

#define ICMP4_FRAG_NEEDED 4
#define TOO_BIG4_LEN (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct icmp_hdr) + sizeof(struct iphdr) + 8)
#define TOO_BIG6_LEN (sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct icmp_hdr) + sizeof(struct ipv6hdr) + 8)

static __noinline int icmp4_too_big(struct __sk_buff *skb, __u16 mtu, __u32 service_id)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	__u8 quote[sizeof(struct iphdr) + 8];
	__u8 macs[2 * ETH_ALEN];

	if ((void *)iph + sizeof(quote) > data_end || iph->ihl != 5)
		return TC_ACT_OK;
	__builtin_memcpy(quote, iph, sizeof(quote));
	__builtin_memcpy(macs, eth, sizeof(macs));
	__be32 from = iph->daddr, to = iph->saddr;
	if (bpf_skb_change_tail(skb, TOO_BIG4_LEN, 0))
		return TC_ACT_OK;

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if (data + TOO_BIG4_LEN > data_end)
		return TC_ACT_SHOT;
	iph = (void *)(eth + 1);
	struct icmp_hdr *ic = (void *)(iph + 1);
	__builtin_memcpy(eth->h_dest, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(eth->h_source, macs, ETH_ALEN);
	iph->version = 4;
	iph->ihl = 5;
	iph->tos = 0;
	iph->tot_len = bpf_htons(TOO_BIG4_LEN - sizeof(struct ethhdr));
	iph->id = 0;
	iph->frag_off = 0;
	iph->ttl = 64;
	iph->protocol = IPPROTO_ICMP;
	iph->check = 0;
	iph->saddr = from;
	iph->daddr = to;
	iph->check = ~csum_fold(csum_words((__u16 *)iph, sizeof(*iph) / 2));
	ic->type = ICMP4_DEST_UNREACH;
	ic->code = ICMP4_FRAG_NEEDED;
	ic->checksum = 0;
	ic->rest = bpf_htonl(mtu);
	__builtin_memcpy(ic + 1, quote, sizeof(quote));
	ic->checksum = ~csum_fold(csum_words((__u16 *)ic, (sizeof(*ic) + sizeof(quote)) / 2));
	count_icmp_error(service_id);
	return bpf_redirect(skb->ifindex, 0);
}

static __noinline int icmp6_too_big(struct __sk_buff *skb, __u16 mtu, __u32 service_id)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	__u8 quote[sizeof(struct ipv6hdr) + 8];
	__u8 macs[2 * ETH_ALEN];
	__u32 from[4], to[4];

	if ((void *)ip6 + sizeof(quote) > data_end)
		return TC_ACT_OK;
	__builtin_memcpy(quote, ip6, sizeof(quote));
	__builtin_memcpy(macs, eth, sizeof(macs));
	__builtin_memcpy(from, &ip6->daddr, 16);
	__builtin_memcpy(to, &ip6->saddr, 16);
	if (bpf_skb_change_tail(skb, TOO_BIG6_LEN, 0))
		return TC_ACT_OK;

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if (data + TOO_BIG6_LEN > data_end)
		return TC_ACT_SHOT;
	ip6 = (void *)(eth + 1);
	struct icmp_hdr *ic = (void *)(ip6 + 1);
	__u16 len = TOO_BIG6_LEN - sizeof(struct ethhdr) - sizeof(struct ipv6hdr);
	__builtin_memcpy(eth->h_dest, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(eth->h_source, macs, ETH_ALEN);
	*(__be32 *)ip6 = bpf_htonl(0x60000000); /* version 6, no traffic class or flow label */
	ip6->payload_len = bpf_htons(len);
	ip6->nexthdr = IPPROTO_ICMPV6;
	ip6->hop_limit = 64;
	__builtin_memcpy(&ip6->saddr, from, 16);
	__builtin_memcpy(&ip6->daddr, to, 16);
	ic->type = ICMP6_PACKET_TOO_BIG;
	ic->code = 0;
	ic->checksum = 0;
	ic->rest = bpf_htonl(mtu);
	__builtin_memcpy(ic + 1, quote, sizeof(quote));
	/* The pseudo-header: both addresses, the length and the next header. */
	__u64 sum = csum_words((__u16 *)&ip6->saddr, 16) + bpf_htons(len) + bpf_htons(IPPROTO_ICMPV6);
	sum += csum_words((__u16 *)ic, (sizeof(*ic) + sizeof(quote)) / 2);
	ic->checksum = ~csum_fold(sum);
	count_icmp_error(service_id);
	return bpf_redirect(skb->ifindex, 0);
}

#endif
