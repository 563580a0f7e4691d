/* Bob Jenkins' lookup3 hash as in the Linux kernel (and Katran): a fixed function of its
 * input, so every node computes the same flow hash. */
#ifndef SHARDLB_JHASH_H
#define SHARDLB_JHASH_H

#include <linux/types.h>

static __always_inline __u32 rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((-shift) & 31));
}

#define __jhash_mix(a, b, c)                                                                       \
	{                                                                                          \
		a -= c; a ^= rol32(c, 4); c += b;                                                  \
		b -= a; b ^= rol32(a, 6); a += c;                                                  \
		c -= b; c ^= rol32(b, 8); b += a;                                                  \
		a -= c; a ^= rol32(c, 16); c += b;                                                 \
		b -= a; b ^= rol32(a, 19); a += c;                                                 \
		c -= b; c ^= rol32(b, 4); b += a;                                                  \
	}

#define __jhash_final(a, b, c)                                                                     \
	{                                                                                          \
		c ^= b; c -= rol32(b, 14);                                                         \
		a ^= c; a -= rol32(c, 11);                                                         \
		b ^= a; b -= rol32(a, 25);                                                         \
		c ^= b; c -= rol32(b, 16);                                                         \
		a ^= c; a -= rol32(c, 4);                                                          \
		b ^= a; b -= rol32(a, 14);                                                         \
		c ^= b; c -= rol32(b, 24);                                                         \
	}

#define JHASH_INITVAL 0xdeadbeef

/* jhash_9words is jhash2() over the nine words of a flow (source, destination, ports). */
static __always_inline __u32 jhash_9words(const __u32 *k, __u32 initval)
{
	__u32 a, b, c;

	a = b = c = JHASH_INITVAL + (9 << 2) + initval;
	a += k[0]; b += k[1]; c += k[2];
	__jhash_mix(a, b, c);
	a += k[3]; b += k[4]; c += k[5];
	__jhash_mix(a, b, c);
	a += k[6]; b += k[7]; c += k[8];
	__jhash_final(a, b, c);
	return c;
}

/* jhash_4words is jhash2() over one 16-byte address. */
static __always_inline __u32 jhash_4words(const __u32 *k, __u32 initval)
{
	__u32 a, b, c;

	a = b = c = JHASH_INITVAL + (4 << 2) + initval;
	a += k[0]; b += k[1]; c += k[2];
	__jhash_mix(a, b, c);
	a += k[3];
	__jhash_final(a, b, c);
	return c;
}

#endif
