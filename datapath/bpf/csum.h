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

/* csum_words returns the one's-complement sum of n 16-bit words at p, unfolded. */
static __always_inline __u64 csum_words(const __u16 *p, int n)
{
	__u64 sum = 0;
	int i;

#pragma unroll
	for (i = 0; i < n; i++)
		sum += p[i];
	return sum;
}

/* csum_dec_ttl decrements an IPv4 TTL, the first byte of the header's (TTL, protocol)
 * word, and returns diff with that word's change added, for the header checksum. */
static __always_inline __u64 csum_dec_ttl(__u8 *ttl, __u64 diff)
{
	__u16 *word = (__u16 *)ttl;
	__u16 old = *word;

	(*ttl)--;
	return csum_diff16(diff, old, *word);
}

#endif
