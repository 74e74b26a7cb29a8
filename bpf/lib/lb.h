/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Service load balancing: frontend lookup and backend selection. */
#ifndef SLUICE_LB_H
#define SLUICE_LB_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "common.h"
#include "conntrack.h"
#include "maps.h"
#include "parse.h"

/* Services balance TCP, UDP and SCTP by port; anything else to a service address
 * goes where the node routes it. */
static __always_inline bool lb4_balanced(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* Frontend (slot 0) of vip:port/proto, or one of its backend slots. */
static __always_inline struct lb4_service *lb4_lookup(__be32 vip, __be16 port, __u8 proto, __u16 slot)
{
	struct lb4_key key = {
		.address = vip,
		.dport = port,
		.proto = proto,
		.slot = slot,
	};

	return bpf_map_lookup_elem(&lb4_services, &key);
}

/* Whether @vip is a service address at all (the wildcard key {vip, 0, 0, 0}). */
static __always_inline bool lb4_vip_known(__be32 vip)
{
	return lb4_lookup(vip, 0, 0, 0) != NULL;
}

/* loadBalancerSourceRanges: whether @saddr may use the frontend @svc, found for
 * @daddr:@dport/@proto. Only a frontend flagged SVC_FLAG_SOURCE_RANGES (the load
 * balancer frontends of a Service with ranges) is restricted, to the prefixes
 * lb4_source_ranges holds for it. Every program that finds a frontend calls this before
 * choosing a backend, and drops with DROP_NOT_IN_SRC_RANGE when it says no. */
static __always_inline bool lb4_source_allowed(const struct lb4_service *svc, __be32 daddr,
					       __be16 dport, __u8 proto, __be32 saddr)
{
	struct lb4_source_range_key key = {
		.prefixlen = LB4_SOURCE_RANGE_PREFIX + 32,
		.range = {
			.address = daddr,
			.dport = dport,
			.proto = proto,
			.source = saddr,
		},
	};

	if (!(svc->flags & SVC_FLAG_SOURCE_RANGES))
		return true;
	return bpf_map_lookup_elem(&lb4_source_ranges, &key) != NULL;
}

/* Presence in lb4_backends means the backend may take traffic. */
static __always_inline bool lb4_backend_active(__be32 address, __be16 port, __u8 proto)
{
	struct lb4_backend_key key = {
		.address = address,
		.port = port,
		.proto = proto,
	};

	return bpf_map_lookup_elem(&lb4_backends, &key) != NULL;
}

/* Picks the backend of @pkt's connection to the frontend @svc into *backend.
 * The CT_SERVICE entry pins a connection to its backend; a new one is chosen when
 * there is no entry, a pure SYN starts a new connection on a reused tuple, the
 * backend has been removed, or the entry has outlived its lifetime.
 * Returns 0, or a DROP_* reason. */
static __always_inline int lb4_select_backend(struct __sk_buff *skb, const struct pkt4 *pkt,
					      const struct lb4_service *svc, __u64 now,
					      struct lb4_service *backend)
{
	struct ct4_key key;
	struct ct4_entry *entry;
	struct lb4_service *slot;

	ct_key_init(&key, pkt->saddr, pkt->daddr, pkt->sport, pkt->dport, pkt->proto, CT_SERVICE);
	entry = bpf_map_lookup_elem(&ct4, &key);
	if (entry && !ct_syn_starts_over(entry, pkt) && !ct_expired(entry, pkt->proto, now) &&
	    lb4_backend_active(entry->nat_address, entry->nat_port, pkt->proto)) {
		backend->backend_address = entry->nat_address;
		backend->backend_port = entry->nat_port;
		ct_account(entry, pkt, 0, now);
		return 0;
	}

	slot = lb4_lookup(pkt->daddr, pkt->dport, pkt->proto,
			  (__u16)(bpf_get_prandom_u32() % svc->count + 1));
	if (!slot)
		return DROP_NO_BACKEND_SLOT;
	backend->backend_address = slot->backend_address;
	backend->backend_port = slot->backend_port;
	if (ct_create(&key, pkt, backend->backend_address, backend->backend_port, 0,
		      skb->ifindex, now) < 0)
		return DROP_CT_CREATE_FAILED;
	return 0;
}

#endif
