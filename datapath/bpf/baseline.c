// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The cheapest program of the same hook as lb_ingress: the baseline the ns/packet
 * benchmark divides by, so a change of machine or kernel does not read as a regression. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"

SEC("tc")
int baseline(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
