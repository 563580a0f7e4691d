/* Maps of the shardlb datapath. Go owns every map except the conntrack ones and
 * new_entry, which only the program writes: it writes services, rings and endpoints
 * declaratively and reads the counters. */
#ifndef SHARDLB_MAPS_H
#define SHARDLB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "structs.h"

/* (VIP, port, protocol) -> service. Replacing a value is atomic for readers, which is how
 * a service switches to a new ring without a gap. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct service_key);
	__type(value, struct service);
	__uint(max_entries, MAX_SERVICES);
} services SEC(".maps");

/* Every VIP address, consulted only for packets that cannot be load-balanced (fragments,
 * truncated, extension headers) to decide between passing them and dropping them. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct vip_key);
	__type(value, __u32);
	__uint(max_entries, MAX_SERVICES);
} vips SEC(".maps");

/* All services' rings back to back, two slots per value; a slot holds an endpoint id.
 * Go allocates each ring a range and writes a new range before switching to it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct ring_pair);
	__uint(max_entries, MAX_RING_PAIRS);
} ring_slots SEC(".maps");

/* Endpoint id -> address and port. Ids of an endpoint that stays are kept across updates,
 * so established flows keep their endpoint. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct endpoint);
	__uint(max_entries, MAX_ENDPOINTS);
} endpoints SEC(".maps");

/* Source ranges: the client prefixes a service with SVC_SOURCE_RANGES lets through,
 * one longest-prefix-match trie per family keyed by (service id, prefix), so a client is
 * checked with one lookup whatever the number of prefixes. The kernel requires
 * BPF_F_NO_PREALLOC: the nodes are allocated as entries are added. The value is not
 * read: an entry is an allowed prefix. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct range4_key);
	__type(value, __u32);
	__uint(max_entries, MAX_SOURCE_RANGES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} source_ranges4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct range6_key);
	__type(value, __u32);
	__uint(max_entries, MAX_SOURCE_RANGES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} source_ranges6 SEC(".maps");

/* Connection tracking, one entry per direction of a flow, least recently used evicted.
 * IPv4 has a map per protocol so that its keys are 12 bytes (see struct flow4); IPv6
 * keys carry the protocol and share one map. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct flow4);
	__type(value, struct ct_entry);
	__uint(max_entries, MAX_CONNTRACK);
} conntrack4_tcp SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct flow4);
	__type(value, struct ct_entry);
	__uint(max_entries, MAX_CONNTRACK);
} conntrack4_udp SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct flow);
	__type(value, struct ct_entry);
	__uint(max_entries, MAX_CONNTRACK);
} conntrack6 SEC(".maps");

/* flow4_of is the IPv4 conntrack key of f. */
static __always_inline struct flow4 flow4_of(const struct flow *f)
{
	struct flow4 k = {
		.saddr = f->saddr[0],
		.daddr = f->daddr[0],
		.sport = f->sport,
		.dport = f->dport,
	};
	return k;
}

/* ct_lookup, ct_insert and ct_delete pick a flow's conntrack map: by family, and for
 * IPv4 by protocol (the parser lets only TCP and UDP through). Each map must keep a call
 * of its own: clang would otherwise merge the TCP and UDP calls into one call on either
 * map, which the verifier cannot inline (a lookup then costs an indirect call, about 10 ns
 * here). A compiler barrier after the TCP call makes the two branches end differently,
 * so there is nothing to merge. */
#define SEPARATE_CALL() asm volatile("" ::: "memory")
static __always_inline struct ct_entry *ct_lookup(const struct flow *f)
{
	if (f->family == AF_INET) {
		struct flow4 k = flow4_of(f);
		if (f->proto == IPPROTO_TCP) {
			struct ct_entry *e = bpf_map_lookup_elem(&conntrack4_tcp, &k);
			SEPARATE_CALL();
			return e;
		}
		return bpf_map_lookup_elem(&conntrack4_udp, &k);
	}
	return bpf_map_lookup_elem(&conntrack6, f);
}

static __always_inline long ct_insert(const struct flow *f, const struct ct_entry *v, __u64 flags)
{
	if (f->family == AF_INET) {
		struct flow4 k = flow4_of(f);
		if (f->proto == IPPROTO_TCP) {
			long ret = bpf_map_update_elem(&conntrack4_tcp, &k, v, flags);
			SEPARATE_CALL();
			return ret;
		}
		return bpf_map_update_elem(&conntrack4_udp, &k, v, flags);
	}
	return bpf_map_update_elem(&conntrack6, f, v, flags);
}

static __always_inline long ct_delete(const struct flow *f)
{
	if (f->family == AF_INET) {
		struct flow4 k = flow4_of(f);
		if (f->proto == IPPROTO_TCP) {
			long ret = bpf_map_delete_elem(&conntrack4_tcp, &k);
			SEPARATE_CALL();
			return ret;
		}
		return bpf_map_delete_elem(&conntrack4_udp, &k);
	}
	return bpf_map_delete_elem(&conntrack6, f);
}

/* The conntrack entry of a new flow while it is built, until translate inserts it: one
 * per CPU (the program is never interrupted by itself on a CPU: it runs with bottom
 * halves off). On the stack it would not fit BPF's 512 bytes next to translate's route
 * lookup once the established-flow path is inlined (forward_cached). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct ct_entry);
	__uint(max_entries, 1);
} new_entry SEC(".maps");

/* ct_reverse fills *o (zeroed by the caller) with the key of the other direction of the
 * flow whose entry, in either direction, is t: that direction's packets come from where
 * t sends this direction's and go to where t makes them come from. */
static __always_inline void ct_reverse(struct flow *o, const struct ct_entry *t, __u8 proto, __u8 family)
{
	__builtin_memcpy(o->saddr, t->daddr, 16);
	__builtin_memcpy(o->daddr, t->saddr, 16);
	o->sport = t->dport;
	o->dport = t->sport;
	o->proto = proto;
	o->family = family;
}

/* Per-service counters (and round-robin position), per CPU so no packet waits on
 * another CPU's cache line. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct svc_stats);
	__uint(max_entries, MAX_SERVICES);
} service_stats SEC(".maps");

/* The next hop of each endpoint's latest new flow, per CPU (see struct endpoint_nh and
 * translate): the route lookup was the costliest step left of a new flow after the two
 * conntrack inserts. Per CPU, so that an entry is never read while another CPU writes
 * it (a torn answer would be cached by the flow for NH_MAX_AGE_JIFFIES), at the price of
 * one lookup per CPU and endpoint every NH_MAX_AGE_JIFFIES. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct endpoint_nh);
	__uint(max_entries, NH_CACHE_SLOTS);
} endpoint_nhs SEC(".maps");

/* One counter per enum drop_reason. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, DROP_REASONS);
} drops SEC(".maps");

/* New SNAT flows given a port whose endpoint may still hold the tuple in TIME_WAIT
 * (CT_F_TIME_WAIT), every other port tried being taken. Not pinned: it counts from the
 * program's load, like the process's own counters. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} snat_time_wait_reuses SEC(".maps");

#endif
