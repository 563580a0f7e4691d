/* Incremental Internet checksums (RFC 1624) on 16-bit words as they sit in the packet:
 * one's-complement sums do not depend on byte order, so no swapping is needed. */
#ifndef SHARDLB_CSUM_H
#define SHARDLB_CSUM_H

#include <linux/types.h>

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* csum_diff32 adds the change of one 32-bit field to a running difference. A 32-bit
 * word is congruent to the sum of its halves modulo 0xffff (2^16 = 1), and so is its
 * 32-bit complement to their negation (0xffffffff = 0xffff * 0x10001): whole words can
 * be added, which halves the instructions and the registers they need. */
static __always_inline __u64 csum_diff32(__u64 acc, __u32 from, __u32 to)
{
	return acc + (__u32)~from + to;
}

static __always_inline __u64 csum_diff16(__u64 acc, __u16 from, __u16 to)
{
	return acc + (__u16)~from + to;
}

/* csum_apply returns the checksum field after the fields behind diff changed. */
static __always_inline __u16 csum_apply(__u16 check, __u64 diff)
{
	return ~csum_fold((__u64)(__u16)~check + diff);
}

#endif
