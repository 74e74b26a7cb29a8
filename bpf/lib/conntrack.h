/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Conntrack on the single LRU map `ct4`; the three scopes are described in common.h. */
#ifndef SLUICE_CONNTRACK_H
#define SLUICE_CONNTRACK_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "common.h"
#include "maps.h"
#include "parse.h"

#define NSEC_PER_SEC 1000000000ULL

/* The clock of conntrack timestamps: CLOCK_MONOTONIC at tick resolution. Lifetimes are
 * seconds to hours, and reading the coarse clock costs no TSC read, which is most of a
 * precise read's cost in a VM (a per-packet saving of about 20 ns). */
static __always_inline __u64 ct_now(void)
{
	return bpf_ktime_get_coarse_ns();
}

static __always_inline void ct_key_init(struct ct4_key *key, __be32 saddr, __be32 daddr,
					__be16 sport, __be16 dport, __u8 proto, __u8 scope)
{
	*key = (struct ct4_key){
		.saddr = saddr,
		.daddr = daddr,
		.sport = sport,
		.dport = dport,
		.proto = proto,
		.scope = scope,
	};
}

/* The entry of @pkt's tuple, or of the reversed tuple (the reply direction). */
static __always_inline struct ct4_entry *ct_lookup(const struct pkt4 *pkt, __u8 scope, bool reversed)
{
	struct ct4_key key;

	if (reversed)
		ct_key_init(&key, pkt->daddr, pkt->saddr, pkt->dport, pkt->sport, pkt->proto, scope);
	else
		ct_key_init(&key, pkt->saddr, pkt->daddr, pkt->sport, pkt->dport, pkt->proto, scope);
	return bpf_map_lookup_elem(&ct4, &key);
}

/* The flags @pkt sets on an entry it is accounted to, travelling in the entry's reply
 * direction or not (@reply): closing from its first FIN or RST, and which way a FIN went. */
static __always_inline __u8 ct_flags_of(const struct pkt4 *pkt, bool reply)
{
	__u8 flags = pkt->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) ? CT_FLAG_CLOSING : 0;

	if (pkt->tcp_flags & TCP_FLAG_FIN)
		flags |= reply ? CT_FLAG_FIN_REPLY : CT_FLAG_FIN_ORIGINAL;
	return flags;
}

/* Whether @pkt, just accounted to @entry, ends a TCP connection that closed cleanly: a
 * segment without SYN, FIN or RST after a FIN went each way, which is the last ACK.
 * Nothing more is to come on the connection, so its entries are removed at once
 * (ct_release) rather than filling the table for the closing lifetime: under connection
 * churn a full LRU table costs every new connection its evictions. A connection reset or
 * closed one way only keeps the closing lifetime. */
static __always_inline bool ct_closed(const struct ct4_entry *entry, const struct pkt4 *pkt)
{
	return pkt->proto == IPPROTO_TCP &&
	       (entry->flags & (CT_FLAG_FIN_ORIGINAL | CT_FLAG_FIN_REPLY)) ==
		       (CT_FLAG_FIN_ORIGINAL | CT_FLAG_FIN_REPLY) &&
	       !(pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST));
}

/* Removes the entry under @key when @pkt, just accounted to @entry, ended its connection
 * (ct_closed). The caller reads what it needs of @entry first: a removed entry's memory
 * may be reused at once. */
static __always_inline void ct_release(const struct ct4_key *key, const struct ct4_entry *entry,
				       const struct pkt4 *pkt)
{
	if (ct_closed(entry, pkt))
		bpf_map_delete_elem(&ct4, key);
}

/* The lifetime of @entry in its state (struct ct_config). Datapath::load writes the
 * configuration before any program is attached; zero seconds would expire at once. */
static __always_inline __u64 ct_lifetime(const struct ct4_entry *entry, __u8 proto)
{
	__u32 zero = 0;
	const struct ct_config *config = bpf_map_lookup_elem(&ct_config, &zero);
	__u32 seconds;

	if (!config)
		return 0;
	if (proto != IPPROTO_TCP)
		seconds = config->non_tcp_s;
	else if (entry->flags & CT_FLAG_CLOSING)
		seconds = config->tcp_closing_s;
	else if (entry->flags & CT_FLAG_SEEN_REPLY)
		seconds = config->tcp_established_s;
	else
		seconds = config->tcp_syn_s;
	return seconds * NSEC_PER_SEC;
}

static __always_inline bool ct_expired(const struct ct4_entry *entry, __u8 proto, __u64 now)
{
	/* Another CPU may have stamped the entry with a slightly later clock than this
	 * packet's: that is a fresh entry, not one from the far past. */
	return now > entry->last_seen_ns && now - entry->last_seen_ns > ct_lifetime(entry, proto);
}

/* This CPU's conntrack counters (struct ct_stats), or NULL. */
static __always_inline struct ct_stats *ct_stats_this_cpu(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&ct_stats, &zero);
}

/* Counts a lost CT_SERVICE entry. */
static __always_inline void ct_count_service_lost(void)
{
	struct ct_stats *stats = ct_stats_this_cpu();

	if (stats)
		stats->service_lost++;
}

/* Accounts @pkt to an existing entry in place, without a map update: only counters,
 * last_seen and flags change. Flag bytes race benignly (a lost bit comes back with the
 * next packet); the counters use atomic adds. Returns whether @pkt is the first FIN or
 * RST the entry sees (its connection's CLOSE event; two CPUs racing on the first FINs
 * of both directions may both see it). */
static __always_inline bool ct_account(struct ct4_entry *entry, const struct pkt4 *pkt,
				       __u8 flags, __u64 now)
{
	__u8 new_flags;

	flags |= ct_flags_of(pkt, flags & CT_FLAG_SEEN_REPLY);
	entry->last_seen_ns = now;
	__sync_fetch_and_add(&entry->packets, 1);
	__sync_fetch_and_add(&entry->bytes, pkt->len);
	if ((entry->tcp_flags_seen & pkt->tcp_flags) != pkt->tcp_flags)
		entry->tcp_flags_seen |= pkt->tcp_flags;
	new_flags = flags & ~entry->flags;
	if (new_flags)
		entry->flags |= new_flags;
	return new_flags & CT_FLAG_CLOSING;
}

/* How many packets (both ways) a connection carries before the flow cache may keep it. A
 * short connection (connect, one request and its answer, close: the CRR pattern) never
 * reuses a decision, as the TCP flags of its packets change at every step, and recording
 * one costs about four helper calls (flow_record); a longer one is kept from its fourth
 * or fifth round trip on. */
#define CT_FLOW_MIN_PACKETS 8

/* The flags of @entry as the flow cache judges them (struct flow_note): a connection
 * younger than CT_FLOW_MIN_PACKETS reads as not yet answered, so it is not recorded. */
static __always_inline __u8 ct_flow_flags(const struct ct4_entry *entry)
{
	return entry->packets < CT_FLOW_MIN_PACKETS ? entry->flags & ~CT_FLAG_SEEN_REPLY
						    : entry->flags;
}

/* Writes the entry of a new connection under @key; @map_flags BPF_NOEXIST claims a
 * tuple only if it is free (SNAT ports, nodeport.h). */
/* Keeps @entry, the entry of another scope of @pkt's connection, alive on a reply: the
 * reply also moves it out of SYN (and into closing), as its lifetime follows the
 * connection's state. Counters stay with the scope the caller accounts the packet to. */
static __always_inline void ct_touch_reply(struct ct4_entry *entry, const struct pkt4 *pkt,
					   __u64 now)
{
	__u8 new_flags = (CT_FLAG_SEEN_REPLY | ct_flags_of(pkt, true)) & ~entry->flags;

	entry->last_seen_ns = now;
	if (new_flags)
		entry->flags |= new_flags;
}

static __always_inline int ct_write(const struct ct4_key *key, const struct pkt4 *pkt,
				    __be32 nat_address, __be16 nat_port, __u8 flags,
				    __u32 ifindex, __u64 now, __u64 map_flags)
{
	struct ct4_entry entry = {
		.created_ns = now,
		.last_seen_ns = now,
		.packets = 1,
		.bytes = pkt->len,
		.nat_address = nat_address,
		.nat_port = nat_port,
		.flags = flags | ct_flags_of(pkt, false),
		.tcp_flags_seen = pkt->tcp_flags,
		.ifindex = ifindex,
	};
	struct ct_stats *stats;
	int err = bpf_map_update_elem(&ct4, key, &entry, map_flags);

	stats = err ? NULL : ct_stats_this_cpu();
	if (stats)
		stats->created++;
	return err;
}

static __always_inline int ct_create(const struct ct4_key *key, const struct pkt4 *pkt,
				     __be32 nat_address, __be16 nat_port, __u8 flags,
				     __u32 ifindex, __u64 now)
{
	return ct_write(key, pkt, nat_address, nat_port, flags, ifindex, now, BPF_ANY);
}

/* Whether @pkt, a packet on @entry's tuple, starts a new connection there: a pure SYN
 * after the tuple's earlier connection was closed (FIN or RST seen), as when a client
 * reuses its port. Any other pure SYN retransmits the same attempt, which keeps its
 * entry, its backend and its single trace event; a SYN-ACK lost after it passed us
 * must not turn the retransmission into a second connection. */
static __always_inline bool ct_syn_starts_over(const struct ct4_entry *entry,
					       const struct pkt4 *pkt)
{
	return tcp_pure_syn(pkt) && (entry->flags & CT_FLAG_CLOSING);
}

/* Whether @pkt, seen with no conntrack entry, may open a connection. A TCP RST never
 * does: it is judged by policy but leaves no entry and no trace event. Its entry may
 * have been evicted while the connection lived, and it must still reach the peer to
 * end the connection. */
static __always_inline bool ct_opens_connection(const struct pkt4 *pkt)
{
	return !(pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & TCP_FLAG_RST));
}

/* Whether @pkt, which found no entry of its scope, belongs to a connection that had one:
 * a TCP segment that is not a pure SYN cannot open a connection, so its entry was evicted
 * or removed while the connection lived. UDP cannot tell, as every datagram may open. */
static __always_inline bool ct_entry_lost(const struct pkt4 *pkt)
{
	return pkt->proto == IPPROTO_TCP && !tcp_pure_syn(pkt);
}

/* What ct_track_established found. */
enum ct_state {
	CT_NEW,         /* @pkt starts a new connection */
	CT_ESTABLISHED, /* accounted to its entry */
	CT_CLOSING,     /* accounted, and the entry's first FIN or RST */
};

/* Accounts @pkt to the entry of @key if that still describes this connection, and
 * says whether it did; CT_NEW means @pkt starts a new connection, to be judged by policy
 * and recorded with ct_create. An entry no longer describes the connection when its
 * translation differs, when a pure SYN shows the tuple was reused for a new connection
 * (ct_syn_starts_over: stale tuples after source port reuse would otherwise be
 * rev-NATed wrongly), or when
 * it has outlived its lifetime (an idle flow is judged again, as after Cilium's GC).
 * @entry_flags, if not NULL, gets the flags of the entry it accounted @pkt to as the flow
 * cache judges them (ct_flow_flags, for struct flow_note). */
static __always_inline enum ct_state ct_track_established(const struct ct4_key *key,
							  const struct pkt4 *pkt,
							  __be32 nat_address, __be16 nat_port,
							  __u8 flags, __u64 now, __u8 *entry_flags)
{
	enum ct_state state;
	struct ct4_entry *entry = bpf_map_lookup_elem(&ct4, key);

	if (!entry || ct_syn_starts_over(entry, pkt) || entry->nat_address != nat_address ||
	    entry->nat_port != nat_port ||
	    (entry->flags & CT_FLAG_LOOPBACK) != (flags & CT_FLAG_LOOPBACK) ||
	    ct_expired(entry, pkt->proto, now))
		return CT_NEW;
	state = ct_account(entry, pkt, 0, now) ? CT_CLOSING : CT_ESTABLISHED;
	if (entry_flags)
		*entry_flags = ct_flow_flags(entry);
	ct_release(key, entry, pkt);
	return state;
}

#endif
