/* Layouts shared with Go: bpf2go generates the Go types from these, so they are the only
 * definition. Addresses are 16 bytes for both families (IPv4 in the first word, the rest
 * zero), in network byte order, as are ports. */
#ifndef SHARDLB_STRUCTS_H
#define SHARDLB_STRUCTS_H

#include <linux/types.h>

/* A directional flow: the IPv6 conntrack key and the input of the flow hash. */
struct flow {
	__u32 saddr[4];
	__u32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

/* The IPv4 conntrack key: struct flow without the 24 bytes of zeros and without the
 * protocol (TCP and UDP flows have a map each), because the kernel hashes and compares a
 * hash map's whole key on every lookup and insert, and a 12-byte key is hashed in one
 * jhash round where 16 bytes take two. */
struct flow4 {
	__u32 saddr;
	__u32 daddr;
	__be16 sport;
	__be16 dport;
};

struct service_key {
	__u32 vip[4];
	__be16 port;
	__u8 proto;
	__u8 family;
};

struct service {
	__u32 id;         /* index into service_stats, stable while the service exists */
	__u32 ring_start; /* first slot of the service's ring in ring_slots */
	__u32 ring_size;  /* Maglev table size, or endpoint count for rr; 0 = no endpoint */
	__u8 mode;        /* enum lb_mode */
	__u8 select;      /* enum lb_select */
	__u8 flags;       /* SVC_SOURCE_RANGES */
	__u8 pad;
	/* onearm: the node address; fullnat: the VIP; dsr: the node address, the outer
	 * source of encapsulated packets and how the program knows its endpoints' node */
	__u32 snat_addr[4];
	/* onearm and fullnat after a planned switch: the previous master's address, where
	 * TCP segments of connections unknown here go (handoff.h); zero = none. */
	__u32 handoff[4];
	/* Bumped by Go whenever the service's source ranges (or its flag) change; its
	 * endpoints carry it too, after the change is complete (ranges.h). */
	__u32 range_gen;
};

/* Two ring slots per map value: array values are rounded up to 8 bytes anyway. */
struct ring_pair {
	__u32 endpoint[2];
};

struct endpoint {
	__u32 addr[4];
	__be16 port;
	__u8 family;
	__u8 valid;
	__u32 gen; /* bumped when the slot is freed, so flows never follow a reused slot */
	/* Its service's range_gen once a change of the source ranges is complete: a flow
	 * that checked its client under another one checks it again (ranges.h). */
	__u32 range_gen;
	/* dsr: the address of the node the endpoint runs on, where its packets go
	 * encapsulated unless that is this node (dsr.h); zero in the other modes. */
	__u32 node[4];
};

/* What to write into a packet of a tracked flow, and where to send it. */
struct ct_entry {
	__u32 saddr[4];
	__u32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u32 service_id;
	__u32 endpoint_id; /* forward entries: the endpoint slot, checked on every packet */
	__u32 endpoint_gen;
	__u8 dir;     /* enum ct_dir */
	__u8 closing; /* TCP: a FIN or RST was seen in either direction */
	/* The client is outside the service's source ranges (as of range_gen): the
	 * flow's packets are dropped in both directions. */
	__u8 denied;
	__u8 flags; /* enum ct_flags */
	/* The direction's next hop as bpf_fib_lookup last gave it, so that most packets skip
	 * the route lookup (the costliest step of an established flow). It is valid for
	 * packets arriving on nh_iif no longer than nh_len (the MTU check the lookup made)
	 * until NH_MAX_AGE_JIFFIES after nh_time; nh_ifindex 0 means none. */
	__u32 nh_ifindex;
	__u32 nh_iif;
	__u16 nh_len;
	__u8 nh_dmac[6];
	__u8 nh_smac[6];
	__u8 pad2[2];
	/* Forward entries: the service's range_gen when the client was last checked
	 * against the source ranges; a flow whose endpoint carries another one checks
	 * again on its next packet. */
	__u32 range_gen;
	__u64 nh_time; /* jiffies */
	/* When this direction last carried a packet (jiffies), written only when it changed
	 * so that an established flow stores at most once a jiffy. A SNAT port whose reply
	 * entry and forward entry are both older than their timeout is free again. */
	__u64 seen;
};

/* The next hop of the last new flow this CPU sent toward an endpoint, which new flows to
 * the same endpoint reuse instead of a route lookup of their own (see endpoint_nhs). The
 * lookup it answers is identified by the endpoint (id and generation: its address, port
 * and protocol), the source address the flow leaves with and the ingress device; it
 * checked packets up to len bytes at jiffy time. ifindex 0 means none. */
struct endpoint_nh {
	__u32 saddr[4];
	__u32 endpoint_id;
	__u32 endpoint_gen;
	__u32 iif;
	__u32 ifindex;
	__u64 time;
	__u16 len;
	__u8 dmac[6];
	__u8 smac[6];
	__u8 pad[2];
};

struct svc_stats {
	__u64 fwd_packets;
	__u64 fwd_bytes;
	__u64 reply_packets;
	__u64 reply_bytes;
	__u64 new_flows;
	__u64 rr_next; /* this CPU's round-robin position */
	__u64 handoff_packets; /* sent on to the previous master (handoff.h) */
	__u64 icmp_errors;     /* ICMP errors about its flows, sent to the quoted sender (icmp.h) */
	__u64 source_range_drops; /* packets from clients outside its source ranges (ranges.h) */
};

/* Keys of the source-range tries, one per family: a service's allowed client prefix.
 * prefixlen counts the bits that must match from service_id on: 32 for the service id,
 * which always matches whole, plus the prefix's length; a lookup gives the full
 * length, so it finds the service's longest prefix holding the address, if any. */
struct range4_key {
	__u32 prefixlen;
	__u32 service_id;
	__u32 addr;
};

struct range6_key {
	__u32 prefixlen;
	__u32 service_id;
	__u32 addr[4];
};

struct vip_key {
	__u32 addr[4];
	__u8 family;
	__u8 pad[3];
};

#endif
