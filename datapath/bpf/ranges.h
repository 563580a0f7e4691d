/* Source ranges (a service's loadBalancerSourceRanges): a service with SVC_SOURCE_RANGES
 * lets through only clients in one of its prefixes. A new flow is checked when it is
 * balanced, with one trie lookup. A tracked flow is checked again only when its
 * service's ranges changed since its last check, which the flow learns from its
 * endpoint entry, read for every packet anyway: established packets pay a comparison,
 * not a lookup. */
#ifndef SHARDLB_RANGES_H
#define SHARDLB_RANGES_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "maps.h"
#include "structs.h"

/* source_allowed tells whether f's source is in one of service id's source ranges: one
 * lookup in the trie of f's family, which finds the longest of the service's prefixes
 * holding the address. Not inlined, like source_range_drop: the keys would grow
 * lb_ingress's frame, which with translate's and mark_closing's must fit the 512 bytes
 * BPF allows, and only new packets of restricted services come here. */
static __noinline bool source_allowed(const struct flow *f, __u32 id)
{
	if (f->family == AF_INET) {
		struct range4_key k = {.prefixlen = 32 + 32, .service_id = id, .addr = f->saddr[0]};
		bool found = bpf_map_lookup_elem(&source_ranges4, &k) != 0;
		SEPARATE_CALL();
		return found;
	}
	struct range6_key k = {.prefixlen = 32 + 128, .service_id = id};
	__builtin_memcpy(k.addr, f->saddr, 16);
	return bpf_map_lookup_elem(&source_ranges6, &k) != 0;
}

/* source_range_drop drops a packet of a client outside service id's source ranges and
 * counts it for the service. Dropped, not passed on: the kernel would forward a packet
 * to a VIP, or answer it. */
static __noinline int source_range_drop(__u32 id)
{
	struct svc_stats *st = bpf_map_lookup_elem(&service_stats, &id);

	if (st)
		st->source_range_drops++;
	return TC_ACT_SHOT;
}

/* recheck_source checks the client of tracked flow f (t, its forward entry) again, its
 * service's ranges having changed since t's last check. The service entry gives the
 * flag and the generation the verdict holds for: Go writes it once the tries hold the
 * new ranges, and bumps the endpoints' generation after it. The verdict goes into both
 * of the flow's entries, so that a client cut off gets no replies either. A service
 * entry that is gone or another service's leaves t as it is: the endpoints of a removed
 * service are invalidated next, and its flows balanced again. */
static __noinline void recheck_source(const struct flow *f, struct ct_entry *t)
{
	struct service_key k = {};
	struct flow o = {};
	bool denied;

	__builtin_memcpy(k.vip, f->daddr, 16);
	k.port = f->dport;
	k.proto = f->proto;
	k.family = f->family;
	struct service *svc = bpf_map_lookup_elem(&services, &k);
	if (!svc || svc->id != t->service_id)
		return;
	denied = (svc->flags & SVC_SOURCE_RANGES) && !source_allowed(f, svc->id);
	t->range_gen = svc->range_gen;
	if (t->denied == denied)
		return;
	t->denied = denied;
	ct_reverse(&o, t, f->proto, f->family);
	struct ct_entry *r = ct_lookup(&o);
	if (r && r->dir == CT_REPLY)
		r->denied = denied;
}

#endif
