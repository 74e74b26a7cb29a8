/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* IPv4 fragment tracking: later fragments carry no L4 header, so the ports of their
 * datagram, learned from its first fragment, are kept in `frag4`. Entries are left to
 * the LRU: a datagram crossing two local pods is looked up by both of their programs,
 * and fragments may arrive out of order, so no fragment can tell it is the last user. */
#ifndef SLUICE_FRAG_H
#define SLUICE_FRAG_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "common.h"
#include "maps.h"

static __always_inline void frag4_key_init(struct frag4_key *key, __be32 saddr, __be32 daddr,
					   __be16 id, __u8 proto)
{
	*key = (struct frag4_key){
		.saddr = saddr,
		.daddr = daddr,
		.id = id,
		.proto = proto,
	};
}

/* The first fragment (offset 0, more fragments) of a datagram: remember its ports.
 * A failed update only costs the later fragments (dropped as FRAG_NOT_FOUND). */
static __always_inline void frag4_record(__be32 saddr, __be32 daddr, __be16 id, __u8 proto,
					 __be16 sport, __be16 dport)
{
	struct frag4_ports ports = { .sport = sport, .dport = dport };
	struct frag4_key key;

	frag4_key_init(&key, saddr, daddr, id, proto);
	bpf_map_update_elem(&frag4, &key, &ports, BPF_ANY);
}

/* A later fragment: the ports its first fragment recorded, or false if none did. */
static __always_inline bool frag4_ports_of(__be32 saddr, __be32 daddr, __be16 id, __u8 proto,
					   __be16 *sport, __be16 *dport)
{
	struct frag4_ports *ports;
	struct frag4_key key;

	frag4_key_init(&key, saddr, daddr, id, proto);
	ports = bpf_map_lookup_elem(&frag4, &key);
	if (!ports)
		return false;
	*sport = ports->sport;
	*dport = ports->dport;
	return true;
}

#endif
