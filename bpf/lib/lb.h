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

/* Frontend (slot 0) of vip:port/proto in @scope (LB4_SCOPE_*), or one of its slots. */
static __always_inline struct lb4_service *lb4_lookup_scoped(__be32 vip, __be16 port, __u8 proto,
							     __u8 scope, __u16 slot)
{
	struct lb4_key key = {
		.address = vip,
		.dport = port,
		.proto = proto,
		.scope = scope,
		.slot = slot,
	};

	return bpf_map_lookup_elem(&lb4_services, &key);
}

/* Frontend (slot 0) of vip:port/proto, or one of its backend slots, as every client but
 * the node's own processes sees it. */
static __always_inline struct lb4_service *lb4_lookup(__be32 vip, __be16 port, __u8 proto, __u16 slot)
{
	return lb4_lookup_scoped(vip, port, proto, LB4_SCOPE_DEFAULT, slot);
}

/* The frontend a client inside the cluster (a pod, a node's own process) uses for @svc,
 * found for @daddr:@dport/@proto, with its scope in *scope. externalTrafficPolicy Local
 * restricts only clients outside the cluster to this node's backends: kube-proxy's
 * KUBE-EXT chain sends traffic from the cluster on to the Service's cluster-wide KUBE-SVC
 * chain (kubernetes#77523, #78662), so an external frontend with traffic policy Local
 * (SVC_FLAG_TWO_SCOPES) gives such clients its cluster-wide slots (LB4_SCOPE_INTERNAL).
 * While those are not there (not yet, or being removed) the local slots serve. */
static __always_inline const struct lb4_service *
lb4_cluster_frontend(const struct lb4_service *svc, __be32 daddr, __be16 dport, __u8 proto,
		     __u8 *scope)
{
	const struct lb4_service *internal;

	*scope = LB4_SCOPE_DEFAULT;
	if (!(svc->flags & SVC_FLAG_TWO_SCOPES))
		return svc;
	internal = lb4_lookup_scoped(daddr, dport, proto, LB4_SCOPE_INTERNAL, 0);
	if (!internal)
		return svc;
	*scope = LB4_SCOPE_INTERNAL;
	return internal;
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
 * choosing a backend, and drops with DROP_NOT_IN_SRC_RANGE when it says no (sock.c
 * refuses the call, counted under the same reason). */
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

/* Murmur3's 32-bit mixing of @k into @h. */
static __always_inline __u32 lb4_hash_mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51;
	k = (k << 15) | (k >> 17);
	k *= 0x1b873593;
	h ^= k;
	h = (h << 13) | (h >> 19);
	return h * 5 + 0xe6546b64;
}

/* The hash of @pkt's flow as the client sent it, which every backend choice that is not
 * the client's affinity starts from (the Maglev table's position, else the slot): source
 * address and port, protocol and frontend port. The frontend address is left out because
 * it is the one part that differs between nodes (a NodePort is reached on each node's own
 * address), so a flow that lands on another node hashes the same there and keeps its
 * backend. */
static __always_inline __u32 lb4_flow_hash(const struct pkt4 *pkt)
{
	__u32 h = 0;

	h = lb4_hash_mix(h, pkt->saddr);
	h = lb4_hash_mix(h, ((__u32)pkt->sport << 16) | pkt->dport);
	h = lb4_hash_mix(h, pkt->proto);
	/* fmix32: every input bit reaches every output bit before the modulo. */
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	return h ^ (h >> 16);
}

/* The backend slot the Maglev table of the frontend @svc in @scope gives @pkt's flow, or
 * 0 when the table is not there (yet: the realizer writes it before the frontend that
 * names it). */
static __always_inline __u16 lb4_maglev_slot(const struct pkt4 *pkt, const struct lb4_service *svc,
					     __u8 scope)
{
	struct lb4_key key = {
		.address = pkt->daddr,
		.dport = pkt->dport,
		.proto = pkt->proto,
		.scope = scope,
	};
	__u32 position, entry;
	__u16 *lanes;
	void *table;

	if (!svc->maglev_size)
		return 0;
	table = bpf_map_lookup_elem(&lb4_maglev, &key);
	if (!table)
		return 0;
	position = lb4_flow_hash(pkt) % svc->maglev_size;
	entry = position / LB4_MAGLEV_SLOTS_PER_ENTRY;
	lanes = bpf_map_lookup_elem(table, &entry);
	if (!lanes)
		return 0;
	return lanes[position % LB4_MAGLEV_SLOTS_PER_ENTRY];
}

/* The slot, of the @svc frontend's count, that @pkt's flow hashes to. A flow whose
 * conntrack entry was lost (LRU eviction under connection churn) gets the same slot
 * again, so the same backend while the frontend's slots stay as they are; a drawn slot
 * would move it to another backend, which resets a TCP connection. */
static __always_inline __u16 lb4_hash_slot(const struct pkt4 *pkt, const struct lb4_service *svc)
{
	return (__u16)(lb4_flow_hash(pkt) % svc->count + 1);
}

static __always_inline void lb4_affinity_key_init(struct lb4_affinity_key *key,
						  const struct pkt4 *pkt)
{
	*key = (struct lb4_affinity_key){
		.client = pkt->saddr,
		.address = pkt->daddr,
		.dport = pkt->dport,
		.proto = pkt->proto,
	};
}

/* sessionAffinity ClientIP: the backend this client's last new connection to the
 * frontend went to, if that was within the frontend's timeout and the backend may still
 * take traffic. */
static __always_inline bool lb4_affinity_backend(const struct pkt4 *pkt,
						 const struct lb4_service *svc, __u64 now,
						 struct lb4_service *backend)
{
	struct lb4_affinity_key key;
	struct lb4_affinity *entry;

	lb4_affinity_key_init(&key, pkt);
	entry = bpf_map_lookup_elem(&lb4_affinity, &key);
	if (!entry)
		return false;
	if (now > entry->last_used_ns &&
	    now - entry->last_used_ns > (__u64)svc->affinity_timeout * NSEC_PER_SEC)
		return false;
	if (!lb4_backend_active(entry->backend_address, entry->backend_port, pkt->proto))
		return false;
	backend->backend_address = entry->backend_address;
	backend->backend_port = entry->backend_port;
	return true;
}

/* Records that a new connection of @pkt's client went to @backend now. A failed write
 * only costs the next connection its affinity, so it does not drop this one. */
static __always_inline void lb4_affinity_update(const struct pkt4 *pkt,
						const struct lb4_service *backend, __u64 now)
{
	struct lb4_affinity_key key;
	struct lb4_affinity entry = {
		.last_used_ns = now,
		.backend_address = backend->backend_address,
		.backend_port = backend->backend_port,
	};

	lb4_affinity_key_init(&key, pkt);
	bpf_map_update_elem(&lb4_affinity, &key, &entry, BPF_ANY);
}

/* A backend for a flow to @svc, the frontend of @pkt's destination in @scope, that has no
 * conntrack entry (a new connection, or one whose entry was lost): the client's affinity
 * backend if it has one, else the slot the Maglev table gives the flow (SVC_FLAG_MAGLEV)
 * or the slot its hash gives (lb4_hash_slot; the `random` algorithm). Returns 0, or a
 * DROP_* reason. */
static __always_inline int lb4_choose_backend(const struct pkt4 *pkt,
					      const struct lb4_service *svc, __u8 scope,
					      __u64 now, struct lb4_service *backend)
{
	bool affinity = svc->flags & SVC_FLAG_AFFINITY;
	struct lb4_service *slot;
	__u16 number = 0;

	if (!affinity || !lb4_affinity_backend(pkt, svc, now, backend)) {
		if (svc->flags & SVC_FLAG_MAGLEV)
			number = lb4_maglev_slot(pkt, svc, scope);
		/* A slot past the count belongs to a table written for backends whose slots
		 * are not all there yet: the slot hash until the realizer's pass is through. */
		if (number == 0 || number > svc->count)
			number = lb4_hash_slot(pkt, svc);
		slot = lb4_lookup_scoped(pkt->daddr, pkt->dport, pkt->proto, scope, number);
		if (!slot)
			return DROP_NO_BACKEND_SLOT;
		/* The realizer writes a backend before any slot names it and removes it after
		 * the last slot that did: a slot without its backend is a dangling reference,
		 * counted (the realizer's kill trials assert it never happens) and refused. */
		if (!lb4_backend_active(slot->backend_address, slot->backend_port, pkt->proto))
			return DROP_SLOT_BACKEND_MISSING;
		backend->backend_address = slot->backend_address;
		backend->backend_port = slot->backend_port;
	}
	if (affinity)
		lb4_affinity_update(pkt, backend, now);
	return 0;
}

/* Picks the backend of @pkt's connection to the frontend @svc, in @scope, into *backend.
 * The CT_SERVICE entry pins a connection to its backend; a new one is chosen when
 * there is no entry, a pure SYN starts a new connection on a reused tuple, the
 * backend has been removed, or the entry has outlived its lifetime. Without an entry
 * the choice is by the flow's hash (lb4_choose_backend), so a connection whose entry was
 * lost returns to its backend; a TCP segment that shows it is counted (ct_stats).
 * Returns 0, or a DROP_* reason. */
static __always_inline int lb4_select_backend(struct __sk_buff *skb, const struct pkt4 *pkt,
					      const struct lb4_service *svc, __u8 scope, __u64 now,
					      struct lb4_service *backend)
{
	struct ct4_key key;
	struct ct4_entry *entry;
	int reason;

	ct_key_init(&key, pkt->saddr, pkt->daddr, pkt->sport, pkt->dport, pkt->proto, CT_SERVICE);
	entry = bpf_map_lookup_elem(&ct4, &key);
	if (entry && !ct_syn_starts_over(entry, pkt) && !ct_expired(entry, pkt->proto, now) &&
	    lb4_backend_active(entry->nat_address, entry->nat_port, pkt->proto)) {
		backend->backend_address = entry->nat_address;
		backend->backend_port = entry->nat_port;
		ct_account(entry, pkt, 0, now);
		ct_release(&key, entry, pkt);
		return 0;
	}
	if (!entry && ct_entry_lost(pkt))
		ct_count_service_lost();

	reason = lb4_choose_backend(pkt, svc, scope, now, backend);
	if (reason)
		return reason;
	if (ct_create(&key, pkt, backend->backend_address, backend->backend_port, 0,
		      skb->ifindex, now) < 0)
		return DROP_CT_CREATE_FAILED;
	return 0;
}

#endif
