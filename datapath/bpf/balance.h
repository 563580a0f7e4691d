/* The load-balancing decision for one parsed flow: conntrack first, then the service and
 * a new endpoint. The result is a struct ct_entry saying what to write into the packet. */
#ifndef SHARDLB_BALANCE_H
#define SHARDLB_BALANCE_H

#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "handoff.h"
#include "jhash.h"
#include "maps.h"
#include "parse.h"
#include "ranges.h"
#include "structs.h"

/* Source ports for SNAT flows, set by the loader. The default range sits below Linux's
 * ip_local_port_range (32768-60999) so replies to the node's own sockets are never taken
 * for a load-balanced flow's. */
volatile const __u16 snat_port_min = 1024;
volatile const __u16 snat_port_count = 31744;
/* How long a closing flow's SNAT port stays taken after its last packet, in jiffies,
 * and how long when its endpoint closed first (CT_F_TIME_WAIT) while other ports are
 * free. */
volatile const __u64 ct_closing_timeout = CT_CLOSING_TIMEOUT;
volatile const __u64 ct_time_wait_timeout = CT_TIME_WAIT_TIMEOUT;

static __always_inline __u32 flow_hash(const struct flow *f)
{
	/* saddr, daddr and the two ports are the first nine words of struct flow. */
	return jhash_9words((const __u32 *)f, FLOW_HASH_SEED ^ f->proto);
}

/* snat_reclaim is called when the SNAT reply tuple r is taken. If the flow holding it is
 * expired (see CT_CLOSING_TIMEOUT), both of its entries are deleted and it returns true:
 * the caller then inserts r again only if absent, so that of two CPUs reclaiming the same
 * port one wins. The flow's last packet is the later of its two directions', so a flow
 * sending one way only keeps its port. With time_wait, a flow whose endpoint closed
 * first (CT_F_TIME_WAIT) expires only after ct_time_wait_timeout. */
static __noinline bool snat_reclaim(const struct flow *r, __u64 now, bool time_wait)
{
	struct ct_entry *e = ct_lookup(r);
	struct flow o = {};
	__u64 seen, limit;
	bool closing, own = false;

	if (!e)
		return true; /* evicted meanwhile */
	if (e->dir != CT_REPLY)
		return false;
	seen = e->seen;
	closing = e->closing;
	ct_reverse(&o, e, r->proto, r->family);
	struct ct_entry *fw = ct_lookup(&o);
	/* The client's tuple may already carry a newer flow on another port. */
	if (fw && fw->dir == CT_FORWARD && fw->sport == r->dport && fw->saddr[0] == r->daddr[0] &&
	    fw->saddr[1] == r->daddr[1] && fw->saddr[2] == r->daddr[2] && fw->saddr[3] == r->daddr[3]) {
		own = true;
		if ((__s64)(fw->seen - seen) > 0)
			seen = fw->seen;
		closing |= fw->closing;
	}
	if (closing)
		limit = time_wait && (e->flags & CT_F_TIME_WAIT) ? ct_time_wait_timeout : ct_closing_timeout;
	else
		limit = r->proto == IPPROTO_TCP ? CT_TCP_TIMEOUT : CT_UDP_TIMEOUT;
	if (now - seen <= limit)
		return false;
	if (own)
		ct_delete(&o);
	ct_delete(r);
	return true;
}

/* dsr_local tells whether endpoint ep of the dsr service svc runs on this node, whose
 * address the service entry holds. An endpoint without a node address (Go writes none)
 * is taken as local: it is delivered directly. */
static __always_inline bool dsr_local(const struct endpoint *ep, const struct service *svc)
{
	return !(ep->node[0] | ep->node[1] | ep->node[2] | ep->node[3]) ||
	       (ep->node[0] == svc->snat_addr[0] && ep->node[1] == svc->snat_addr[1] &&
		ep->node[2] == svc->snat_addr[2] && ep->node[3] == svc->snat_addr[3]);
}

/* new_flow picks an endpoint of svc for f, records the reply direction in conntrack
 * and fills *t with the forward rewrite, which translate records once it knows the
 * flow's next hop, so that the flow's second packet needs no route lookup.
 *
 * dsr: an endpoint on another node gets no reply entry here (its node makes it) and *t
 * becomes a CT_ENCAP entry toward that node, which dsr_encap records; decap (the packet
 * came encapsulated from another node) means that node picked an endpoint here, so a
 * pick of another node's endpoint is a disagreement between the nodes' tables (an
 * update reaching them at different times): the packet is dropped and counted rather
 * than sent on again. An endpoint on this node is served as in default mode, its reply
 * entry marked CT_F_DSR. */
static __noinline int new_flow(const struct flow *f, const struct service *svc, struct ct_entry *t, bool decap)
{
	__u32 size = svc->ring_size;
	__u32 id = svc->id;
	__u32 hash = flow_hash(f);
	__u32 idx;

	if (size == 0) {
		count_drop(DROP_NO_ENDPOINT);
		return TC_ACT_SHOT;
	}
	switch (svc->select) {
	case SELECT_RR: {
		struct svc_stats *st = bpf_map_lookup_elem(&service_stats, &id);
		if (!st) {
			count_drop(DROP_NO_ENDPOINT);
			return TC_ACT_SHOT;
		}
		idx = st->rr_next++ % size;
		break;
	}
	case SELECT_PERSIST:
		idx = jhash_4words(f->saddr, FLOW_HASH_SEED) % size;
		break;
	default:
		idx = hash % size;
	}

	__u32 slot = svc->ring_start + idx;
	__u32 pair = slot >> 1;
	struct ring_pair *rp = bpf_map_lookup_elem(&ring_slots, &pair);
	if (!rp) {
		count_drop(DROP_NO_ENDPOINT);
		return TC_ACT_SHOT;
	}
	__u32 ep_id = rp->endpoint[slot & 1];
	struct endpoint *ep = bpf_map_lookup_elem(&endpoints, &ep_id);
	if (!ep || !ep->valid) {
		count_drop(DROP_NO_ENDPOINT);
		return TC_ACT_SHOT;
	}

	if (svc->mode == MODE_DSR && !dsr_local(ep, svc)) {
		if (decap) {
			count_drop(DROP_DSR_MISDIRECTED);
			return TC_ACT_SHOT;
		}
		__builtin_memcpy(t->saddr, svc->snat_addr, 16);
		__builtin_memcpy(t->daddr, ep->node, 16);
		t->sport = f->sport;
		t->dport = f->dport;
		t->service_id = id;
		t->endpoint_id = ep_id;
		t->endpoint_gen = ep->gen;
		t->range_gen = svc->range_gen;
		t->dir = CT_ENCAP;
		struct svc_stats *st = bpf_map_lookup_elem(&service_stats, &id);
		if (st)
			st->new_flows++;
		return NEW_FLOW;
	}

	struct flow reply = {};

	__builtin_memcpy(reply.saddr, ep->addr, 16);
	__builtin_memcpy(reply.daddr, f->saddr, 16);
	reply.sport = ep->port;
	reply.dport = f->sport;
	reply.proto = f->proto;
	reply.family = f->family;

	/* *t (zeroed by the caller) holds the reply entry until it is inserted, then becomes
	 * the forward one: one entry is enough. */
	__builtin_memcpy(t->saddr, f->daddr, 16);
	__builtin_memcpy(t->daddr, f->saddr, 16);
	t->sport = f->dport;
	t->dport = f->sport;
	t->service_id = id;
	t->dir = CT_REPLY;

	if (svc->mode == MODE_DEFAULT || svc->mode == MODE_DSR) {
		t->seen = bpf_jiffies64();
		t->flags = svc->mode == MODE_DSR ? CT_F_DSR : 0;
		if (ct_insert(&reply, t, BPF_ANY)) {
			count_drop(DROP_CONNTRACK_FULL);
			return TC_ACT_SHOT;
		}
		t->flags = 0;
		__builtin_memcpy(t->saddr, f->saddr, 16);
	} else {
		/* The reply tuple (endpoint -> SNAT address:port) is inserted only if absent, so
		 * two flows can never share one: the map is the arbiter, also between CPUs. The
		 * first port tried follows from the flow hash, so it is reproducible. A port
		 * held by an expired flow is taken over. A port whose endpoint may still hold
		 * the tuple in TIME_WAIT is taken only when the SNAT_TRIES ports are all
		 * otherwise taken (the second pass), and counted: the endpoint may answer the
		 * SYN with the old connection's ACK, which the client resets before it
		 * retransmits its SYN. */
		__u16 count = snat_port_count;
		__u16 min = snat_port_min;
		__u64 now = bpf_jiffies64();
		int i;

		if (count == 0)
			count = 1;
		__builtin_memcpy(reply.daddr, svc->snat_addr, 16);
		for (i = 0; i < SNAT_TRIES; i++) {
			reply.dport = bpf_htons(min + (hash + i) % count);
			t->seen = now;
			if (ct_insert(&reply, t, BPF_NOEXIST) == 0)
				break;
			if (snat_reclaim(&reply, now, true) && ct_insert(&reply, t, BPF_NOEXIST) == 0)
				break;
		}
		if (i == SNAT_TRIES) {
			for (i = 0; i < SNAT_TRIES; i++) {
				reply.dport = bpf_htons(min + (hash + i) % count);
				if (snat_reclaim(&reply, now, false) && ct_insert(&reply, t, BPF_NOEXIST) == 0)
					break;
			}
			if (i == SNAT_TRIES) {
				count_drop(DROP_SNAT_EXHAUSTED);
				return TC_ACT_SHOT;
			}
			__u32 zero = 0;
			__u64 *n = bpf_map_lookup_elem(&snat_time_wait_reuses, &zero);
			if (n)
				*n += 1;
		}
		__builtin_memcpy(t->saddr, svc->snat_addr, 16);
	}
	__builtin_memcpy(t->daddr, ep->addr, 16);
	t->sport = reply.dport;
	t->dport = ep->port;
	t->endpoint_id = ep_id;
	t->endpoint_gen = ep->gen;
	t->range_gen = svc->range_gen; /* balance checked the client */
	t->dir = CT_FORWARD;
	struct svc_stats *st = bpf_map_lookup_elem(&service_stats, &id);
	if (st)
		st->new_flows++;
	return NEW_FLOW;
}

/* ct_idle_past tells whether the flow of forward entry e, idle in that direction past
 * its timeout, is idle in the reply direction too (as snat_reclaim judges a flow without
 * the TIME_WAIT hold: past it, a new SYN on the client's tuple is balanced again and
 * gets another port while the old one is held).
 * Not inlined: it runs only for entries idle that long. */
static __noinline bool ct_idle_past(const struct flow *f, const struct ct_entry *e, __u64 now)
{
	__u64 seen = e->seen;
	bool closing = e->closing;
	struct flow o = {};

	ct_reverse(&o, e, f->proto, f->family);
	struct ct_entry *r = ct_lookup(&o);
	if (r && r->dir == CT_REPLY) {
		if ((__s64)(r->seen - seen) > 0)
			seen = r->seen;
		closing |= r->closing;
	}
	return now - seen > (closing ? ct_closing_timeout : f->proto == IPPROTO_TCP ? CT_TCP_TIMEOUT : CT_UDP_TIMEOUT);
}

/* ct_stale tells whether a forward entry no longer names a live flow: both directions
 * idle past their timeout (as snat_reclaim judges a flow, which may already have given
 * its SNAT port to another flow). Entries are never deleted on a timer, and one adopted
 * across a restart or left from an earlier mastership would otherwise translate a new
 * connection's segments with another connection's port; its tuple is taken for a new
 * connection's instead (balanced, or handed off). A closing entry that is not expired
 * still translates a SYN: when the endpoint answers a reused SNAT tuple's SYN from its
 * TIME_WAIT with the old connection's ACK, the client's RST must reach that TIME_WAIT
 * on the same tuple (which ends it) and its SYN retransmitted 10 ms later must follow,
 * which a new translation would send to another port, maybe another TIME_WAIT. */
static __always_inline bool ct_stale(const struct flow *f, const struct ct_entry *e)
{
	__u64 now = bpf_jiffies64();
	__u64 limit = e->closing ? ct_closing_timeout : f->proto == IPPROTO_TCP ? CT_TCP_TIMEOUT : CT_UDP_TIMEOUT;

	return now - e->seen > limit && ct_idle_past(f, e, now);
}

/* balance decides flow f: NOT_OURS when it is not load-balanced traffic, a drop (a
 * client outside the service's source ranges among others, ranges.h) or a redirect (a
 * segment handed off to the service's previous master, handoff.h), FURTHER_PROCESSING
 * with *entry pointing at the flow's conntrack entry, used in place (not copied) so
 * that translate can cache the next hop in it, or NEW_FLOW with *entry pointing at this
 * CPU's new_entry, holding the rewrite of a flow not recorded yet. */
static __always_inline int balance(struct __sk_buff *skb, const struct flow *f, void *l4, void *data_end,
				   struct ct_entry **entry, bool decap)
{
	struct ct_entry *ct = ct_lookup(f);
	if (ct) {
		if (ct->dir == CT_REPLY) {
			if (ct->denied)
				return source_range_drop(ct->service_id);
			*entry = ct;
			return FURTHER_PROCESSING;
		}
		/* A forward flow keeps its endpoint while that endpoint is in the service; once
		 * it is gone the flow is balanced again like a new one, as is a stale entry's
		 * tuple (ct_stale; a dsr cache, CT_ENCAP, is never stale: it only keeps the
		 * flow's endpoint). */
		struct endpoint *ep = bpf_map_lookup_elem(&endpoints, &ct->endpoint_id);
		if (ep && ep->valid && ep->gen == ct->endpoint_gen && (ct->dir != CT_FORWARD || !ct_stale(f, ct))) {
			if (ep->range_gen != ct->range_gen)
				recheck_source(f, ct);
			if (ct->denied)
				return source_range_drop(ct->service_id);
			*entry = ct;
			return FURTHER_PROCESSING;
		}
	}

	struct service_key k = {};
	__builtin_memcpy(k.vip, f->daddr, 16);
	k.port = f->dport;
	k.proto = f->proto;
	k.family = f->family;
	struct service *svc = bpf_map_lookup_elem(&services, &k);
	if (!svc)
		return NOT_OURS;
	/* Before the handoff too: the previous master would let the segment through. */
	if ((svc->flags & SVC_SOURCE_RANGES) && !source_allowed(f, svc->id))
		return source_range_drop(svc->id);
	if (wants_handoff(f, svc, l4, data_end)) {
		int ret = handoff(skb, f, svc->handoff, svc->id);
		if (ret != FURTHER_PROCESSING)
			return ret;
		/* Not handed off (handoff.h says when): balanced here. */
	}
	__u32 zero = 0;
	struct ct_entry *t = bpf_map_lookup_elem(&new_entry, &zero);
	if (!t)
		return TC_ACT_OK;
	__builtin_memset(t, 0, sizeof(*t));
	*entry = t;
	return new_flow(f, svc, t, decap);
}

#endif
