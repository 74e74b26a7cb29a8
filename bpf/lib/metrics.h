/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-CPU packet and byte counters by verdict reason and direction. */
#ifndef SLUICE_METRICS_H
#define SLUICE_METRICS_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "common.h"
#include "maps.h"

/* Counts one packet of @len bytes (a socket call, of none) under @reason and @dir. */
static __always_inline void metrics_add(__u8 reason, __u32 dir, __u32 len)
{
	__u32 index = (__u32)reason * 2 + dir;
	struct metrics_value *value = bpf_map_lookup_elem(&metrics, &index);

	/* Per-CPU slot: no other writer, so plain adds are enough. */
	if (value) {
		value->packets += 1;
		value->bytes += len;
	}
}

static __always_inline void metrics_count(struct __sk_buff *skb, __u8 reason, __u32 dir)
{
	metrics_add(reason, dir, skb->len);
}

/* Counts the packet as forwarded and lets it continue. */
static __always_inline int verdict_pass(struct __sk_buff *skb, __u32 dir)
{
	metrics_count(skb, REASON_FORWARDED, dir);
	return TC_ACT_OK;
}

#endif
