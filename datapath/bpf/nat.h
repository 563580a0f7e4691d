/* Rewriting a packet's addresses and ports from a struct ct_entry, with incremental IP,
 * TCP and UDP checksums. Only changed words enter the checksum difference. */
#ifndef SHARDLB_NAT_H
#define SHARDLB_NAT_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "csum.h"
#include "structs.h"

#ifndef SHARDLB_NO_KERN_CTX
/* The kernel's sk_buff, for the one field read here; CO-RE finds it in the running
 * kernel's layout. */
struct sk_buff___shardlb {
	__u8 ip_summed : 2;
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *ctx) __ksym;

#define CHECKSUM_PARTIAL 3

/* csum_partial tells whether the packet's L4 checksum is left to be completed
 * (CHECKSUM_PARTIAL): segments merged by GRO, and packets of a local sender over a
 * veth or virtio device with checksum offload, which carry only the pseudo-header
 * sum. The verifier turns the cast into a register move. It is never negative (see the
 * other variant's). */
static __always_inline int csum_partial(struct __sk_buff *ctx)
{
	struct sk_buff___shardlb *skb = bpf_cast_to_kern_ctx(ctx);

	return BPF_CORE_READ_BITFIELD(skb, ip_summed) == CHECKSUM_PARTIAL;
}

/* l4_again gives the L4 header back after csum_partial: it is where it was. */
static __always_inline void *l4_again(const struct flow *f, void *data, void *data_end, void *l4)
{
	return l4;
}
#else
/* The variant for kernels without bpf_cast_to_kern_ctx (before Linux 6.2), which cannot
 * read ip_summed, asks the kernel instead. bpf_l4_csum_replace without BPF_F_PSEUDO_HDR
 * updates a checksum field for a change of bytes it covers in every checksum state but
 * CHECKSUM_PARTIAL, where those bytes are summed later and the field is left alone
 * (inet_proto_csum_replace4, net/core/utils.c): one call on a field that must move
 * tells the states apart. The field is the packet's first two bytes (the destination
 * MAC, under no checksum and no skb->csum), put back as they were when they moved.
 *
 * csum_partial returns 1 for CHECKSUM_PARTIAL, 0 for the others, and -1 when the kernel
 * refuses the call, which does not happen: the bytes are in the linear part and the
 * program's direct writes made the packet its own (the verifier's prologue for them).
 * The helper may move the packet's data: callers take their packet pointers again
 * (l4_again). */
static __always_inline int csum_partial(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u16 *word = data;
	__u16 before;

	if ((void *)(word + 1) > data_end)
		return -1;
	before = *word;
	if (bpf_l4_csum_replace(skb, 0, 0, 1, sizeof(__u16)))
		return -1;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	word = data;
	if ((void *)(word + 1) > data_end)
		return -1;
	if (*word == before)
		return 1;
	*word = before;
	return 0;
}

/* l4_again finds f's L4 header again in a packet csum_partial may have moved (data and
 * data_end taken after it; the IP header already checked to be in the packet). */
static __always_inline void *l4_again(const struct flow *f, void *data, void *data_end, void *l4)
{
	struct iphdr *iph = data + sizeof(struct ethhdr);

	if (f->family == AF_INET)
		return (void *)iph + iph->ihl * 4;
	return data + sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
}

/* l4_reload is l4_again from the skb, for a caller whose pointers a helper call may
 * have invalidated; 0 when the IP header is not in the packet (never: it was parsed). */
static __always_inline void *l4_reload(struct __sk_buff *skb, const struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (data + sizeof(struct ethhdr) + sizeof(struct iphdr) > data_end)
		return 0;
	return l4_again(f, data, data_end, 0);
}
#endif

/* rewrite_l4 writes the ports and fixes the L4 checksum for a pseudo-header change of
 * addr_diff. It returns the change of the one's-complement sum of the L4 bytes, which a
 * CHECKSUM_COMPLETE skb must learn about, or -1 when the header is not in the packet.
 *
 * A CHECKSUM_PARTIAL packet's checksum field holds the folded pseudo-header sum, not
 * complemented, and the device or the segmentation sums the L4 bytes into it later.
 * There only the pseudo-header change goes into the field, in the other direction; the
 * ports are L4 bytes and are summed then. */
static __always_inline __s64 rewrite_l4(void *l4, void *data_end, __u8 proto, const struct ct_entry *t,
					__u64 addr_diff, bool v4, bool partial)
{
	__be16 *ports = l4;
	__u16 *check;

	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			return -1;
		check = &th->check;
	} else {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			return -1;
		check = &uh->check;
	}
	__u64 port_diff = csum_diff16(0, ports[0], t->sport);
	port_diff = csum_diff16(port_diff, ports[1], t->dport);
	ports[0] = t->sport;
	ports[1] = t->dport;

	if (partial) {
		*check = ~csum_apply(~*check, addr_diff);
		return 0;
	}
	/* IPv4 UDP may carry no checksum (0), and then must keep carrying none. */
	if (proto == IPPROTO_UDP && v4 && *check == 0)
		return csum_fold(port_diff);
	__u16 sum = csum_apply(*check, addr_diff + port_diff);
	if (proto == IPPROTO_UDP && sum == 0)
		sum = 0xffff;
	*check = sum;
	/* Ports and checksum together moved the L4 sum by minus the address change. */
	return (__u16)~csum_fold(addr_diff);
}

/* rewrite_ipv4 rewrites iph and its L4 header from t, decrementing the TTL when the
 * packet is forwarded here rather than by the kernel. */
static __always_inline int rewrite_ipv4(struct __sk_buff *skb, struct iphdr *iph, void *l4, void *data_end,
					const struct ct_entry *t, bool dec_ttl, bool partial)
{
	__u64 addr_diff = csum_diff32(0, iph->saddr, t->saddr[0]);
	addr_diff = csum_diff32(addr_diff, iph->daddr, t->daddr[0]);
	__u64 ip_diff = addr_diff;

	__s64 l4_sum = rewrite_l4(l4, data_end, iph->protocol, t, addr_diff, true, partial);
	/* Never true (the parser checked the L4 header; the verifier needs it checked
	 * again): the packet is untouched. NOT_OURS rather than TC_ACT_OK here keeps
	 * lb_ingress's frame 8 bytes smaller, which the 512-byte stack of its deepest call
	 * chain needs. */
	if (l4_sum < 0)
		return NOT_OURS;
	if (dec_ttl)
		ip_diff = csum_dec_ttl(&iph->ttl, ip_diff);
	iph->saddr = t->saddr[0];
	iph->daddr = t->daddr[0];
	iph->check = csum_apply(iph->check, ip_diff);
	/* The IP header's own sum is unchanged (its checksum compensates), the L4 part moved
	 * by l4_sum: a CHECKSUM_COMPLETE skb must carry that; others ignore the call. */
	bpf_csum_update(skb, (__u32)l4_sum);
	return FURTHER_PROCESSING;
}

/* rewrite_ipv6: no IP checksum; the address change and the L4 checksum cancel out in the
 * packet's sum, so a CHECKSUM_COMPLETE skb needs no update. */
static __always_inline int rewrite_ipv6(struct ipv6hdr *ip6, void *l4, void *data_end, const struct ct_entry *t,
					bool dec_ttl, bool partial)
{
	__u64 addr_diff = 0;
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		addr_diff = csum_diff32(addr_diff, ip6->saddr.in6_u.u6_addr32[i], t->saddr[i]);
		addr_diff = csum_diff32(addr_diff, ip6->daddr.in6_u.u6_addr32[i], t->daddr[i]);
	}
	if (rewrite_l4(l4, data_end, ip6->nexthdr, t, addr_diff, false, partial) < 0)
		return NOT_OURS; /* never: see rewrite_ipv4 */
	__builtin_memcpy(&ip6->saddr, t->saddr, 16);
	__builtin_memcpy(&ip6->daddr, t->daddr, 16);
	if (dec_ttl)
		ip6->hop_limit--;
	return FURTHER_PROCESSING;
}

#endif
