/* Packet parsing: from the Ethernet header to a struct flow and the L4 header, deciding
 * on the way what happens to packets that cannot be load-balanced. */
#ifndef SHARDLB_PARSE_H
#define SHARDLB_PARSE_H

#include <linux/bpf.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "maps.h"
#include "structs.h"

static __always_inline void count_drop(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&drops, &reason);
	if (n)
		*n += 1;
}

/* not_balanceable decides a packet that cannot be load-balanced: to a VIP it is dropped
 * and counted (forwarding it untranslated would hand it to the wrong host); to anything
 * else it is none of our business and passes on untouched (NOT_OURS). */
static __always_inline int not_balanceable(const struct flow *f, __u32 reason)
{
	struct vip_key k = {};

	__builtin_memcpy(k.addr, f->daddr, sizeof(k.addr));
	k.family = f->family;
	if (!bpf_map_lookup_elem(&vips, &k))
		return NOT_OURS;
	count_drop(reason);
	return TC_ACT_SHOT;
}

static __always_inline __u32 l4_header_len(__u8 proto)
{
	return proto == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);
}

/* parse_ipv4 fills f and *l4 for a TCP or UDP packet, returns ICMP_MESSAGE for ICMP, or
 * returns the verdict. IP options
 * are fine: the L4 header is found from the header length and the options are not
 * touched by the rewrite. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct iphdr *iph, void *data_end,
				      struct flow *f, void **l4)
{
	if ((void *)(iph + 1) > data_end)
		return NOT_OURS;
	if (iph->version != 4 || iph->ihl < 5)
		return NOT_OURS;
	if (iph->protocol == IPPROTO_ICMP)
		return ICMP_MESSAGE;
	if (iph->protocol == IPPROTO_IPIP)
		return ENCAPSULATED;
	if (iph->protocol != IPPROTO_TCP && iph->protocol != IPPROTO_UDP)
		return NOT_OURS;
	f->saddr[0] = iph->saddr;
	f->daddr[0] = iph->daddr;
	f->proto = iph->protocol;
	f->family = AF_INET;
	if (iph->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return not_balanceable(f, DROP_FRAGMENT);

	__u32 hlen = iph->ihl * 4;
	__u32 need = hlen + l4_header_len(f->proto);
	void *p = (void *)iph + hlen;
	if (p + sizeof(struct tcphdr) > data_end && (f->proto == IPPROTO_TCP || p + sizeof(struct udphdr) > data_end))
		return not_balanceable(f, DROP_TRUNCATED);
	if (bpf_ntohs(iph->tot_len) < need || skb->len < sizeof(struct ethhdr) + bpf_ntohs(iph->tot_len))
		return not_balanceable(f, DROP_TRUNCATED);
	__be16 *ports = p;
	f->sport = ports[0];
	f->dport = ports[1];
	*l4 = p;
	return FURTHER_PROCESSING;
}

/* parse_ipv6 is parse_ipv4 for IPv6. Extension headers are not walked: a VIP's traffic
 * carrying them is dropped with a named counter rather than mistranslated. */
static __always_inline int parse_ipv6(struct __sk_buff *skb, struct ipv6hdr *ip6, void *data_end,
				      struct flow *f, void **l4)
{
	if ((void *)(ip6 + 1) > data_end)
		return NOT_OURS;
	if (ip6->version != 6)
		return NOT_OURS;
	__builtin_memcpy(f->saddr, &ip6->saddr, 16);
	__builtin_memcpy(f->daddr, &ip6->daddr, 16);
	f->family = AF_INET6;
	f->proto = ip6->nexthdr;
	switch (ip6->nexthdr) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
		break;
	case IPPROTO_ICMPV6:
		return ICMP_MESSAGE;
	case IPPROTO_IPV6:
		return ENCAPSULATED;
	case IPPROTO_FRAGMENT:
		return not_balanceable(f, DROP_FRAGMENT);
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
		return not_balanceable(f, DROP_IPV6_EXT_HEADER);
	default:
		return NOT_OURS;
	}

	void *p = ip6 + 1;
	if (p + sizeof(struct tcphdr) > data_end && (f->proto == IPPROTO_TCP || p + sizeof(struct udphdr) > data_end))
		return not_balanceable(f, DROP_TRUNCATED);
	__u32 plen = bpf_ntohs(ip6->payload_len);
	if (plen < l4_header_len(f->proto) || skb->len < sizeof(struct ethhdr) + sizeof(*ip6) + plen)
		return not_balanceable(f, DROP_TRUNCATED);
	__be16 *ports = p;
	f->sport = ports[0];
	f->dport = ports[1];
	*l4 = p;
	return FURTHER_PROCESSING;
}

#endif
