// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* shardlb's ingress program (tcx): load-balances packets to a service's VIP over its
 * endpoints, translates the replies back, and forwards both itself after a route lookup
 * when the kernel knows the next hop; everything else passes untouched. */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "balance.h"
#include "consts.h"
#include "maps.h"
#include "nat.h"
#include "parse.h"
#include "structs.h"

static __always_inline void count_service(const struct ct_entry *t, __u32 len)
{
	__u32 id = t->service_id;
	struct svc_stats *st = bpf_map_lookup_elem(&service_stats, &id);

	if (!st)
		return;
	if (t->dir == CT_REPLY) {
		st->reply_packets++;
		st->reply_bytes += len;
	} else {
		st->fwd_packets++;
		st->fwd_bytes += len;
	}
}

/* route looks up the rewritten packet's next hop. Forwarding here skips the kernel's
 * forwarding path, which costs more than the whole translation (see the package doc). */
static __always_inline int route(struct __sk_buff *skb, const struct flow *f, const struct ct_entry *t,
				 __u16 tot_len, struct bpf_fib_lookup *fib)
{
	fib->family = f->family;
	fib->l4_protocol = f->proto;
	fib->sport = t->sport;
	fib->dport = t->dport;
	fib->tot_len = tot_len;
	fib->ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	if (f->family == AF_INET) {
		fib->ipv4_src = t->saddr[0];
		fib->ipv4_dst = t->daddr[0];
	} else {
		__builtin_memcpy(fib->ipv6_src, t->saddr, 16);
		__builtin_memcpy(fib->ipv6_dst, t->daddr, 16);
	}
	return bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
}

/* transmit sends a rewritten packet to its next hop: straight out of the egress device
 * when the neighbour is known, through the neighbour subsystem when not. */
static __always_inline int transmit(struct ethhdr *eth, int rc, struct bpf_fib_lookup *fib)
{
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
		return bpf_redirect(fib->ifindex, 0);
	}
	struct bpf_redir_neigh nh = {};
	nh.nh_family = fib->family;
	if (fib->family == AF_INET)
		nh.ipv4_nh = fib->ipv4_dst;
	else
		__builtin_memcpy(nh.ipv6_nh, fib->ipv6_dst, 16);
	return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
}

static __always_inline bool routable(int rc)
{
	return rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH;
}

/* translate rewrites the packet of a balanced flow and sends it on. Not inlined: its
 * stack frame and new_flow's are never live at once, and together with the caller's they
 * must fit the 512 bytes BPF allows. */
static __noinline int translate(struct __sk_buff *skb, const struct flow *f, const struct ct_entry *t, void *l4)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct bpf_fib_lookup fib = {};
	int rc, ret;
	bool fwd;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (f->family == AF_INET) {
		struct iphdr *iph = (void *)(eth + 1);
		if ((void *)(iph + 1) > data_end)
			return TC_ACT_OK;
		rc = route(skb, f, t, bpf_ntohs(iph->tot_len), &fib);
		fwd = routable(rc) && iph->ttl > 1;
		ret = rewrite_ipv4(skb, iph, l4, data_end, t, fwd);
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_OK;
		rc = route(skb, f, t, bpf_ntohs(ip6->payload_len) + sizeof(*ip6), &fib);
		fwd = routable(rc) && ip6->hop_limit > 1;
		ret = rewrite_ipv6(ip6, l4, data_end, t, fwd);
	}
	if (ret != FURTHER_PROCESSING)
		return ret;
	count_service(t, skb->len);
	if (!fwd)
		return TC_ACT_OK;
	return transmit(eth, rc, &fib);
}

/* One path for both families (Katran's habit): only parsing and the header rewrite
 * differ, and sharing the locals keeps the stack small. */
SEC("tc")
int lb_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct flow f = {};
	struct ct_entry t = {};
	void *l4 = 0;
	int ret;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		ret = parse_ipv4(skb, (void *)(eth + 1), data_end, &f, &l4);
	else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		ret = parse_ipv6(skb, (void *)(eth + 1), data_end, &f, &l4);
	else
		return TC_ACT_OK;
	if (ret != FURTHER_PROCESSING)
		return ret;
	ret = balance(&f, &t);
	if (ret != FURTHER_PROCESSING)
		return ret;

	return translate(skb, &f, &t, l4);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
