/* Constants of the shardlb datapath. Sizes are defaults: the loader resizes maps from
 * its Config before loading, so these only bound what a test or build without a Config
 * gets. */
#ifndef SHARDLB_CONSTS_H
#define SHARDLB_CONSTS_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <stdbool.h>

#define AF_INET 2
#define AF_INET6 10

#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF

/* tc verdicts (linux/pkt_cls.h). They mean the same at tcx (TCX_NEXT, TCX_PASS,
 * TCX_DROP, TCX_REDIRECT) and from a direct-action tc filter: TC_ACT_UNSPEC hands the
 * packet on to the hook's next program (tcx, then the clsact filters) or next filter
 * (tc), and to the stack when none is left; TC_ACT_OK hands it to the stack at once,
 * and no program or filter after this one sees it. */
#define TC_ACT_UNSPEC -1
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define TC_ACT_REDIRECT 7

/* The verdict of a packet that is none of the program's business (not to a VIP, not of
 * a tracked flow, not an ICMP error about one, not for this host): untouched, it goes
 * on to whatever is attached after the program, as if the program were not there. A
 * packet the program decided (translated, dropped, redirected, or of a tracked flow)
 * gets a final verdict: TC_ACT_OK, TC_ACT_SHOT or TC_ACT_REDIRECT. */
#define NOT_OURS TC_ACT_UNSPEC

/* Helpers return FURTHER_PROCESSING when the packet is not decided yet (Katran's
 * convention), any other value is the final tc verdict. These answers lie outside the
 * verdicts' numbers (TC_ACT_UNSPEC is -1). */
#define FURTHER_PROCESSING -16
/* balance's answer for the first packet of a flow: translate it, then record the flow. */
#define NEW_FLOW -17
/* The parsers' answer for ICMP and ICMPv6: maybe an error about a translated flow. */
#define ICMP_MESSAGE -18
/* translate's answer for a packet too big for its next hop that must not be
 * fragmented: its sender is to be told (icmp.h). */
#define TOO_BIG -19
/* The parsers' answer for an IP-in-IP packet (IPv4 in IPv4, IPv6 in IPv6): maybe a dsr
 * packet for an endpoint on this node (dsr.h). */
#define ENCAPSULATED -20

/* What the dsr encapsulation adds to a packet: one outer IP header. */
#define DSR_OVERHEAD4 20
#define DSR_OVERHEAD6 40

#ifndef MAX_SERVICES
#define MAX_SERVICES 16384
#endif
#ifndef MAX_ENDPOINTS
#define MAX_ENDPOINTS 65536
#endif
#ifndef MAX_RING_PAIRS
#define MAX_RING_PAIRS (1 << 20)
#endif
#ifndef MAX_CONNTRACK
#define MAX_CONNTRACK 262144
#endif
#ifndef MAX_SOURCE_RANGES
#define MAX_SOURCE_RANGES 65536
#endif

/* Source-port attempts for a new SNAT flow before it is dropped: each attempt is an
 * atomic insert of the reply tuple, so a port is never given to two flows. */
#define SNAT_TRIES 16

/* How long a flow's cached next hop is used before it is looked up again, which bounds
 * how late a route or neighbour change reaches established flows: 64 jiffies are 256 ms
 * at Debian's HZ=250 (64 ms at HZ=1000, 640 ms at HZ=100). Jiffies, not nanoseconds,
 * because the verifier inlines bpf_jiffies64 into one load while the ktime helpers stay
 * calls. */
#ifndef NH_MAX_AGE_JIFFIES
#define NH_MAX_AGE_JIFFIES 64
#endif

/* Slots of the per-CPU next-hop cache of new flows (endpoint_nhs): endpoint id modulo
 * this, a power of two. Endpoints whose ids collide take turns (a miss is a route
 * lookup, as without the cache). 4096 slots of 56 bytes are 224 KiB per CPU. */
#ifndef NH_CACHE_SLOTS
#define NH_CACHE_SLOTS 4096
#endif

/* Conntrack timeouts in jiffies (the values assume HZ=250, Debian's: seconds times 250;
 * a HZ=1000 kernel makes them four times shorter, HZ=100 2.5 times longer). Entries are
 * never deleted on a timer: the LRU evicts them when the map is full, and a SNAT port
 * whose flow is expired is taken over by a new flow (see new_flow). A flow is expired
 * when it is closing (a TCP FIN or RST was seen in either direction) and idle longer
 * than CT_CLOSING_TIMEOUT, or idle longer than CT_TCP_TIMEOUT (TCP) or CT_UDP_TIMEOUT
 * (UDP). The closing timeout is the default of the loader-set ct_closing_timeout. */
#ifndef CT_CLOSING_TIMEOUT
#define CT_CLOSING_TIMEOUT (10 * 250)
#endif
/* Linux's TCP_TIMEWAIT_LEN (60 s, not tunable) and a second of margin for the last ACK's
 * way: how long a SNAT port whose endpoint closed first stays with its flow (see
 * CT_F_TIME_WAIT). The default of the loader-set ct_time_wait_timeout. */
#ifndef CT_TIME_WAIT_TIMEOUT
#define CT_TIME_WAIT_TIMEOUT (61 * 250)
#endif
#ifndef CT_TCP_TIMEOUT
#define CT_TCP_TIMEOUT (300 * 250)
#endif
#ifndef CT_UDP_TIMEOUT
#define CT_UDP_TIMEOUT (30 * 250)
#endif

/* Seed of the flow hash. Part of the contract between nodes: all of them must pick the
 * same endpoint for a flow, so it is a constant and never random. */
#define FLOW_HASH_SEED 0x5a4d1b0bU

/* Service modes and selections, the values of shard.Mode and shard.Select. */
enum lb_mode {
	MODE_DEFAULT = 0,
	MODE_ONEARM = 1,
	MODE_FULLNAT = 2,
	MODE_DSR = 3,
};

enum lb_select {
	SELECT_HASH = 0,
	SELECT_RR = 1,
	SELECT_PERSIST = 2,
};

/* Why a packet was dropped: one counter each in the drops map. The Go side names them in
 * the same order (dropReasons), a test checks the count matches. */
enum drop_reason {
	DROP_NO_ENDPOINT = 0,   /* service exists but has no ready endpoint */
	DROP_SNAT_EXHAUSTED,    /* every source port tried for a SNAT flow was taken */
	DROP_CONNTRACK_FULL,    /* the conntrack insert failed */
	DROP_FRAGMENT,          /* IP fragment to a VIP: no ports to pick an endpoint with */
	DROP_TRUNCATED,         /* packet to a VIP shorter than its headers say */
	DROP_IPV6_EXT_HEADER,   /* IPv6 extension header before TCP/UDP on a VIP */
	DROP_DSR_MISDIRECTED,   /* decapsulated for a dsr service whose endpoint is on another node */
	DROP_DSR_ENCAP,         /* the kernel refused room for the outer header */
	DROP_REASONS,
};

/* struct service flags. */
enum svc_flags {
	/* Only clients in the service's source ranges (the tries, ranges.h) get through. */
	SVC_SOURCE_RANGES = 1,
};

/* Flow directions recorded in conntrack entries. */
enum ct_dir {
	CT_FORWARD = 0, /* client -> service, rewritten toward the endpoint */
	CT_REPLY = 1,   /* endpoint -> client, rewritten back to the VIP */
	/* dsr, client -> service on a load-balancing node whose endpoint runs on another
	 * node: saddr and daddr are the outer header's (this node, the endpoint's node), the
	 * packet itself is not rewritten (dsr.h). A cache: any node recomputes it. */
	CT_ENCAP = 2,
};

/* struct ct_entry flags. */
enum ct_flags {
	/* A reply entry of a dsr flow: its SYN-ACK's MSS is lowered by the encapsulation's
	 * overhead, which the client's segments carry on their way in (dsr.h). */
	CT_F_DSR = 1,
	/* A reply entry whose endpoint sent the flow's first FIN: the endpoint holds the
	 * tuple in TIME_WAIT for 60 s after the close, and a SYN on it then may be answered
	 * with the old connection's ACK, so its SNAT port is held for ct_time_wait_timeout
	 * rather than ct_closing_timeout while other ports are free (new_flow). */
	CT_F_TIME_WAIT = 2,
};

#endif
