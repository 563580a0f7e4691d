// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* shardlb's ingress program (tcx, or a direct-action tc filter): load-balances packets
 * to a service's VIP over its endpoints, translates the replies back, and forwards both
 * itself after a route lookup when the kernel knows the next hop; everything else passes
 * on untouched (NOT_OURS). */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "balance.h"
#include "consts.h"
#include "forward.h"
#include "handoff.h"
#include "icmp.h"
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
				 __u16 tot_len, __u32 iif, struct bpf_fib_lookup *fib)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = f->family;
	fib->l4_protocol = f->proto;
	fib->sport = t->sport;
	fib->dport = t->dport;
	/* A GSO skb's length is its merged segments': the MTU is checked per segment (the
	 * kernel does that when tot_len is 0) and mtu_result gives the device's MTU. */
	fib->tot_len = skb->gso_size ? 0 : tot_len;
	fib->ifindex = iif;
	if (f->family == AF_INET) {
		fib->ipv4_src = t->saddr[0];
		fib->ipv4_dst = t->daddr[0];
	} else {
		__builtin_memcpy(fib->ipv6_src, t->saddr, 16);
		__builtin_memcpy(fib->ipv6_dst, t->daddr, 16);
	}
	return bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
}

/* next_hop tells whether t's cached next hop answers the lookup route would make now:
 * the same ingress device (an input of policy routing), a packet no longer than one the
 * lookup's MTU check passed, and not older than NH_MAX_AGE_JIFFIES. */
static __always_inline bool next_hop_cached(const struct ct_entry *t, __u32 iif, __u16 len, __u64 now)
{
	return t->nh_ifindex && t->nh_iif == iif && len <= t->nh_len && now - t->nh_time < NH_MAX_AGE_JIFFIES;
}

static __always_inline void cache_next_hop(struct ct_entry *t, const struct bpf_fib_lookup *fib, __u32 iif,
					   __u16 len, __u64 now)
{
	t->nh_ifindex = fib->ifindex;
	t->nh_iif = iif;
	t->nh_len = len;
	__builtin_memcpy(t->nh_dmac, fib->dmac, ETH_ALEN);
	__builtin_memcpy(t->nh_smac, fib->smac, ETH_ALEN);
	t->nh_time = now;
}

/* endpoint_next_hop gives t, a new flow's forward entry, the next hop this CPU last
 * looked up for a new flow to the same endpoint when that lookup had the inputs this one
 * would have (see struct endpoint_nh), checked a packet at least len bytes long and is
 * younger than NH_MAX_AGE_JIFFIES. The flow keeps the lookup's time, not now, so a route
 * or neighbour change still reaches every flow within NH_MAX_AGE_JIFFIES. */
static __always_inline bool endpoint_next_hop(struct ct_entry *t, __u32 iif, __u16 len, __u64 now)
{
	__u32 slot = t->endpoint_id & (NH_CACHE_SLOTS - 1);
	struct endpoint_nh *nh = bpf_map_lookup_elem(&endpoint_nhs, &slot);

	if (!nh || !nh->ifindex || nh->endpoint_id != t->endpoint_id || nh->endpoint_gen != t->endpoint_gen ||
	    nh->iif != iif || len > nh->len || now - nh->time >= NH_MAX_AGE_JIFFIES || nh->saddr[0] != t->saddr[0] ||
	    nh->saddr[1] != t->saddr[1] || nh->saddr[2] != t->saddr[2] || nh->saddr[3] != t->saddr[3])
		return false;
	t->nh_ifindex = nh->ifindex;
	t->nh_iif = iif;
	t->nh_len = nh->len;
	__builtin_memcpy(t->nh_dmac, nh->dmac, ETH_ALEN);
	__builtin_memcpy(t->nh_smac, nh->smac, ETH_ALEN);
	t->nh_time = nh->time;
	return true;
}

/* remember_next_hop stores the next hop t, a new flow's forward entry, just cached, for
 * the endpoint's next new flows on this CPU. */
static __always_inline void remember_next_hop(const struct ct_entry *t)
{
	__u32 slot = t->endpoint_id & (NH_CACHE_SLOTS - 1);
	struct endpoint_nh *nh = bpf_map_lookup_elem(&endpoint_nhs, &slot);

	if (!nh)
		return;
	__builtin_memcpy(nh->saddr, t->saddr, 16);
	nh->endpoint_id = t->endpoint_id;
	nh->endpoint_gen = t->endpoint_gen;
	nh->iif = t->nh_iif;
	nh->ifindex = t->nh_ifindex;
	nh->time = t->nh_time;
	nh->len = t->nh_len;
	__builtin_memcpy(nh->dmac, t->nh_dmac, ETH_ALEN);
	__builtin_memcpy(nh->smac, t->nh_smac, ETH_ALEN);
}

/* mark_closing marks the other direction of t's flow closing too: a port is reclaimed
 * from its reply entry, and either side may close first. Only FIN and RST packets come
 * here. */
static __noinline void mark_closing(const struct flow *f, const struct ct_entry *t)
{
	struct ct_entry *other;

	/* IPv4's key is built directly rather than through a struct flow: this frame is the
	 * last of the program's deepest call chain, which must fit BPF's 512 bytes. */
	if (f->family == AF_INET) {
		struct flow4 k = {.saddr = t->daddr[0], .daddr = t->saddr[0], .sport = t->dport, .dport = t->sport};

		if (f->proto == IPPROTO_TCP) {
			other = bpf_map_lookup_elem(&conntrack4_tcp, &k);
			SEPARATE_CALL();
		} else {
			other = bpf_map_lookup_elem(&conntrack4_udp, &k);
		}
	} else {
		struct flow o = {};

		ct_reverse(&o, t, f->proto, f->family);
		other = bpf_map_lookup_elem(&conntrack6, &o);
	}
	if (other && !other->closing)
		other->closing = 1;
}

/* ip_header gives the length and TTL of the packet's IP header, 0 when it is not in the
 * packet. */
static __always_inline __u16 ip_header(const struct flow *f, void *data, void *data_end, __u8 *ttl)
{
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	struct ipv6hdr *ip6 = (void *)(eth + 1);

	if (f->family == AF_INET) {
		if ((void *)(iph + 1) > data_end)
			return 0;
		*ttl = iph->ttl;
		return bpf_ntohs(iph->tot_len);
	}
	if ((void *)(ip6 + 1) > data_end)
		return 0;
	*ttl = ip6->hop_limit;
	return bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
}

/* seen records that t's direction carried a packet now (stored only when the jiffy
 * changed: most packets of a busy flow store nothing) and, on a TCP FIN or RST, that
 * the flow is closing; a FIN from the endpoint that comes first (the reply direction is
 * not closing yet) leaves the endpoint in TIME_WAIT once the flow is closed
 * (CT_F_TIME_WAIT). */
static __always_inline void seen(const struct flow *f, struct ct_entry *t, void *l4, void *data_end, __u64 now)
{
	if (t->seen != now)
		t->seen = now;
	if (f->proto == IPPROTO_TCP && !t->closing) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) <= data_end && (th->fin || th->rst)) {
			if (t->dir == CT_REPLY && th->fin && !th->rst)
				t->flags |= CT_F_TIME_WAIT;
			t->closing = 1;
			mark_closing(f, t);
		}
	}
}

/* rewrite writes t into the packet's headers, decrementing the TTL when fwd, and counts
 * it for t's service. */
static __always_inline int rewrite(struct __sk_buff *skb, const struct flow *f, const struct ct_entry *t, void *l4,
				   bool fwd)
{
	int partial = csum_partial(skb);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	int ret;

	if (partial < 0)
		return TC_ACT_SHOT; /* never: see csum_partial */
	/* Checked again: the helper calls before make the compiler reload f->family, and
	 * the verifier must see each family's bound on the path that writes its header. */
	if (f->family == AF_INET) {
		if ((void *)(iph + 1) > data_end)
			return TC_ACT_OK;
		ret = rewrite_ipv4(skb, iph, l4_again(f, data, data_end, l4), data_end, t, fwd, partial);
	} else {
		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_OK;
		ret = rewrite_ipv6(ip6, l4_again(f, data, data_end, l4), data_end, t, fwd, partial);
	}
	if (ret == FURTHER_PROCESSING)
		count_service(t, skb->len);
	return ret;
}

/* redirect_cached sends a rewritten packet to the next hop t caches. */
static __always_inline int redirect_cached(struct __sk_buff *skb, const struct ct_entry *t)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	__builtin_memcpy(eth->h_dest, t->nh_dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, t->nh_smac, ETH_ALEN);
	return bpf_redirect(t->nh_ifindex, 0);
}

/* forward_cached sends a packet of a tracked flow whose entry caches the next hop (all
 * but about one packet per NH_MAX_AGE_JIFFIES of a busy flow): inlined into the
 * program, without translate's call and route lookup frame. It returns
 * FURTHER_PROCESSING, having changed nothing, for any other packet. */
static __always_inline int forward_cached(struct __sk_buff *skb, const struct flow *f, struct ct_entry *t, void *l4)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 iif = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	__u64 now = bpf_jiffies64();
	__u8 ttl = 0;
	__u16 len = ip_header(f, data, data_end, &ttl);
	int ret;

	if (!len || ttl <= 1 || !next_hop_cached(t, iif, len, now))
		return FURTHER_PROCESSING;
	seen(f, t, l4, data_end, now);
	ret = rewrite(skb, f, t, l4, true);
	if (ret != FURTHER_PROCESSING)
		return ret;
	return redirect_cached(skb, t);
}

/* must_not_fragment tells whether a packet too big for its next hop is to be answered
 * (icmp.h) rather than left to the kernel: IPv4 with DF and any IPv6, unless it is GSO
 * (checked per segment) or its checksum is left to the device (CHECKSUM_PARTIAL, whose
 * offsets would point into the answer). */
static __always_inline bool must_not_fragment(struct __sk_buff *skb, const struct flow *f, void *data,
					      void *data_end)
{
	struct iphdr *iph = data + sizeof(struct ethhdr);

	if (skb->gso_size)
		return false;
	if (f->family == AF_INET && ((void *)(iph + 1) > data_end || !(iph->frag_off & bpf_htons(IP_DF))))
		return false;
	/* Last: in the variant without the kfunc it may move the packet (translate then
	 * takes its pointers again). Never negative there for a packet whose headers were
	 * read; if it were, the kernel's own handling is the safe side. */
	return csum_partial(skb) == 0;
}

/* dsr.h sends packets on with the helpers above. */
#include "dsr.h"

/* translate rewrites the packet of a balanced flow and sends it on. t is the flow's
 * conntrack entry, with mtu where the answer to a packet too big goes: a tracked flow's
 * packet too big for its next hop that must not be fragmented is left untouched, and
 * translate returns TOO_BIG with the next hop's MTU in *mtu. For a new flow mtu is NULL
 * and t the entry to insert (record) once its next hop is known. Not inlined: its
 * stack frame and new_flow's are never live at once, and together with the caller's
 * they must fit the 512 bytes BPF allows (and BPF functions take 5 arguments). */
static __noinline int translate(struct __sk_buff *skb, const struct flow *f, struct ct_entry *t, void *l4,
				__u16 *mtu)
{
	bool record = !mtu;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct bpf_fib_lookup fib;
	__u32 iif = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	__u64 now = bpf_jiffies64();
	int rc = BPF_FIB_LKUP_RET_SUCCESS;
	__u8 ttl = 0;
	__u16 len = ip_header(f, data, data_end, &ttl);
	int ret;
	bool fwd;

	if (!len)
		return TC_ACT_OK;
	/* A new flow (record) has no next hop of its own yet, but usually the one of an
	 * earlier new flow to its endpoint. */
	if (record ? !endpoint_next_hop(t, iif, len, now) : !next_hop_cached(t, iif, len, now)) {
		rc = route(skb, f, t, len, iif, &fib);
		/* Only a complete answer is kept: an unresolved neighbour is looked up again on
		 * the next packet, a failed lookup leaves the packet to the kernel. */
		if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
			/* A GSO skb passed the check per segment: later packets may be as long as
			 * the device's MTU. */
			cache_next_hop(t, &fib, iif, skb->gso_size ? fib.mtu_result : len, now);
			if (record)
				remember_next_hop(t);
		}
	}
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && mtu) {
		if (must_not_fragment(skb, f, data, data_end)) {
			*mtu = fib.mtu_result;
			return TOO_BIG;
		}
#ifdef SHARDLB_NO_KERN_CTX
		/* must_not_fragment may have moved the packet. */
		l4 = l4_reload(skb, f);
		if (!l4)
			return TC_ACT_OK;
		data_end = (void *)(long)skb->data_end;
#endif
	}
	seen(f, t, l4, data_end, now);
	if (record && ct_insert(f, t, BPF_ANY)) {
		count_drop(DROP_CONNTRACK_FULL);
		return TC_ACT_SHOT;
	}
	fwd = (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH) && ttl > 1;
	ret = rewrite(skb, f, t, l4, fwd);
	if (ret != FURTHER_PROCESSING)
		return ret;
	if (!fwd)
		return TC_ACT_OK;
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return redirect_neigh(&fib);
	return redirect_cached(skb, t);
}

/* parse fills f and *l4 from the packet's IP header, or returns the verdict (or
 * ICMP_MESSAGE, ENCAPSULATED). */
static __always_inline int parse(struct __sk_buff *skb, struct flow *f, void **l4)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return NOT_OURS;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(skb, (void *)(eth + 1), data_end, f, l4);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(skb, (void *)(eth + 1), data_end, f, l4);
	return NOT_OURS;
}

/* One path for both families (Katran's habit): only parsing and the header rewrite
 * differ, and sharing the locals keeps the stack small. */
SEC("tc")
int lb_ingress(struct __sk_buff *skb)
{
	struct flow f = {};
	struct ct_entry *t = 0;
	void *l4 = 0;
	__u16 mtu = 0;
	bool decap = false;
	int ret;

	/* Frames for other hosts (a bridge flooding unknown unicast to every node) are none
	 * of ours: translating them would give the endpoint one copy per node. VIP traffic
	 * is sent to this node's MAC as next hop, and replies are addressed to the node. */
	if (skb->pkt_type != PACKET_HOST)
		return NOT_OURS;
	ret = parse(skb, &f, &l4);
	if (ret == ENCAPSULATED) {
		/* A dsr packet from another node, for an endpoint here: without its outer
		 * header it is balanced as if it had come directly. */
		ret = dsr_decap(skb);
		if (ret != FURTHER_PROCESSING)
			return ret;
		decap = true;
		__builtin_memset(&f, 0, sizeof(f));
		ret = parse(skb, &f, &l4);
		if (ret == ENCAPSULATED || ret == ICMP_MESSAGE)
			return TC_ACT_SHOT; /* never: dsr_decap checked the inner header */
	}
	/* parse_ipv6 names the family before it answers ICMP_MESSAGE; parse_ipv4 does not. */
	if (ret == ICMP_MESSAGE)
		return f.family == AF_INET6 ? icmp6_error(skb) : icmp4_error(skb);
	if (ret != FURTHER_PROCESSING)
		return ret;
	void *data_end = (void *)(long)skb->data_end;
	ret = balance(skb, &f, l4, data_end, &t, decap);
	if (ret != FURTHER_PROCESSING && ret != NEW_FLOW)
		return ret;
	/* Set on both answers; checked for the verifier, which cannot tell that a noinline
	 * helper's verdict passed on by balance is never one of them. */
	if (!t)
		return TC_ACT_OK;
	if (t->dir == CT_ENCAP) {
		ret = dsr_encap(skb, &f, t, ret == NEW_FLOW, &mtu);
		if (ret != TOO_BIG)
			return ret;
		return f.family == AF_INET ? icmp4_too_big(skb, mtu, t->service_id)
					   : icmp6_too_big(skb, mtu, t->service_id);
	}
	if (t->flags & CT_F_DSR) {
		dsr_clamp_mss(skb, &f, l4, data_end);
#ifdef SHARDLB_NO_KERN_CTX
		/* dsr_clamp_mss's helper call may have moved the packet. */
		l4 = l4_reload(skb, &f);
		if (!l4)
			return TC_ACT_OK;
#endif
	}
	if (ret == NEW_FLOW)
		return translate(skb, &f, t, l4, 0);
	ret = forward_cached(skb, &f, t, l4);
	if (ret != FURTHER_PROCESSING)
		return ret;
#ifdef SHARDLB_NO_KERN_CTX
	/* forward_cached returns FURTHER_PROCESSING only before its helper calls, which
	 * the verifier cannot tell from bpf_redirect's verdict. */
	l4 = l4_reload(skb, &f);
	if (!l4)
		return TC_ACT_OK;
#endif
	ret = translate(skb, &f, t, l4, &mtu);
	if (ret != TOO_BIG)
		return ret;
	return f.family == AF_INET ? icmp4_too_big(skb, mtu, t->service_id) : icmp6_too_big(skb, mtu, t->service_id);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
