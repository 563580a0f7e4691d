/* Sending a packet on after a route lookup, shared by translated and handed-off
 * packets. */
#ifndef SHARDLB_FORWARD_H
#define SHARDLB_FORWARD_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"

/* redirect_neigh sends a packet whose next hop has no resolved neighbour yet through the
 * kernel's neighbour subsystem, which resolves it and queues the packet meanwhile. fib
 * is the lookup's answer: its destination is the next hop. */
static __always_inline int redirect_neigh(const struct bpf_fib_lookup *fib)
{
	struct bpf_redir_neigh nh = {};

	nh.nh_family = fib->family;
	if (fib->family == AF_INET)
		nh.ipv4_nh = fib->ipv4_dst;
	else
		__builtin_memcpy(nh.ipv6_nh, fib->ipv6_dst, 16);
	return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
}

#endif
