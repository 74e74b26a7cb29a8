// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The drift check's in-kernel digest, run on demand by BPF_PROG_TEST_RUN (socket filter
 * programs, attached nowhere; the packet is a dummy):
 *  digest_services, digest_backends, digest_endpoints  fold every entry of their map;
 *  digest_maglev  folds the Maglev table of the frontend `run` names.
 * Each leaves its fold in `run` (.bss), which user space reads back. bpf_for_each_map_elem
 * walks the map in the kernel and lib/digest.h folds each entry, so user space compares
 * three numbers with the desired content's instead of reading a million entries. (A map
 * element iterator, iter/bpf_map_elem, would fold the same into a seq_file, but this
 * kernel refuses to load one: EPERM before verification; aya 0.14 loads no syscall
 * programs.) LPM tries have no for_each: the ipcache, source ranges and policy rows are
 * read with batched lookups.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lib/common.h"
#include "lib/digest.h"
#include "lib/maps.h"

#define WORDS(type) (sizeof(type) / sizeof(__u32))

/* Set by the loader (crates/datapath/src/digest.rs): per process, so no content can be
 * crafted to match another's digest. */
const volatile __u64 seed = 0;

/* One run at a time (user space holds the programs exclusively). */
struct digest_run run = {};

static long fold_service(void *map, struct lb4_key *key, struct lb4_service *value,
			 struct digest *fold)
{
	digest_add(fold, digest_entry(seed, (const __u32 *)key, WORDS(*key),
				      (const __u32 *)value, WORDS(*value)));
	return 0;
}

static long fold_backend(void *map, struct lb4_backend_key *key, struct lb4_backend *value,
			 struct digest *fold)
{
	digest_add(fold, digest_entry(seed, (const __u32 *)key, WORDS(*key),
				      (const __u32 *)value, WORDS(*value)));
	return 0;
}

static long fold_endpoint(void *map, __u32 *key, struct endpoint_info *value,
			  struct digest *fold)
{
	digest_add(fold, digest_entry(seed, key, 1, (const __u32 *)value, WORDS(*value)));
	return 0;
}

static long fold_lanes(void *map, __u32 *key, __u16 *lanes, struct digest *fold)
{
	digest_add(fold, digest_entry(seed, key, 1, (const __u32 *)lanes,
				      LB4_MAGLEV_SLOTS_PER_ENTRY / 2));
	return 0;
}

SEC("socket")
int digest_services(struct __sk_buff *skb)
{
	struct digest fold = {};

	bpf_for_each_map_elem(&lb4_services, fold_service, &fold, 0);
	run.fold = fold;
	return 0;
}

SEC("socket")
int digest_backends(struct __sk_buff *skb)
{
	struct digest fold = {};

	bpf_for_each_map_elem(&lb4_backends, fold_backend, &fold, 0);
	run.fold = fold;
	return 0;
}

SEC("socket")
int digest_endpoints(struct __sk_buff *skb)
{
	struct digest fold = {};

	bpf_for_each_map_elem(&endpoints, fold_endpoint, &fold, 0);
	run.fold = fold;
	return 0;
}

SEC("socket")
int digest_maglev(struct __sk_buff *skb)
{
	struct lb4_key frontend = run.frontend;
	struct digest fold = {};
	void *table;

	table = bpf_map_lookup_elem(&lb4_maglev, &frontend);
	run.found = table != NULL;
	if (table)
		bpf_for_each_map_elem(table, fold_lanes, &fold, 0);
	run.fold = fold;
	return 0;
}

char _license[] SEC("license") = "Dual BSD/GPL";
