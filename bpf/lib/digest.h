/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The drift check's digest of a map: an order-free fold of a 64-bit hash of each entry's
 * key and value bytes. User space computes the same (crates/datapath/src/digest.rs, `Digest`
 * and `entry_hash`), so change both.
 */
#ifndef SLUICE_DIGEST_H
#define SLUICE_DIGEST_H

#include <linux/types.h>

#include "common.h"

/* A map's fold: its entry count, and the sum and the xor of its entries' hashes. Sum and
 * xor together: a pair of forged entries that cancels in one does not in the other. */
struct digest {
	__u64 entries;
	__u64 sum;
	__u64 xor;
};

/* The context of one run of a digest program (BPF_PROG_TEST_RUN hands it in and back):
 * the fold it leaves, and for a Maglev table the frontend whose table to fold and whether
 * it has one. */
struct digest_run {
	struct digest fold;
	struct lb4_key frontend;
	__u32 found;
};

/* The Rust mirror asserts the same sizes and offsets. */
_Static_assert(sizeof(struct digest) == 24, "struct digest");
_Static_assert(sizeof(struct digest_run) == 40, "struct digest_run");
_Static_assert(__builtin_offsetof(struct digest_run, frontend) == 24, "digest_run.frontend");
_Static_assert(__builtin_offsetof(struct digest_run, found) == 36, "digest_run.found");

#define DIGEST_WORD_MUL 0x9e3779b97f4a7c15ULL

/* One word into the running hash: xor in, multiply by an odd constant, fold the high
 * bits down, so every input bit reaches every output bit over a few words. */
static __always_inline __u64 digest_word(__u64 h, __u32 word)
{
	h = (h ^ word) * DIGEST_WORD_MUL;
	return h ^ (h >> 29);
}

/* The finalizer of MurmurHash3 (fmix64): a bijection that spreads the last words. */
static __always_inline __u64 digest_finish(__u64 h)
{
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdULL;
	h ^= h >> 33;
	h *= 0xc4ceb9fe1a85ec53ULL;
	h ^= h >> 33;
	return h;
}

/* The hash of one entry: its key's then its value's bytes in 32-bit words (the registry's
 * keys and values are whole words: common.h's size checks), from `seed`. */
static __always_inline __u64 digest_entry(__u64 seed, const __u32 *key, __u32 key_words,
					  const __u32 *value, __u32 value_words)
{
	__u64 h = seed;

	for (__u32 i = 0; i < key_words; i++)
		h = digest_word(h, key[i]);
	for (__u32 i = 0; i < value_words; i++)
		h = digest_word(h, value[i]);
	return digest_finish(h);
}

static __always_inline void digest_add(struct digest *fold, __u64 h)
{
	fold->entries++;
	fold->sum += h;
	fold->xor ^= h;
}

#endif
