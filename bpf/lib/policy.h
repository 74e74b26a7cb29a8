/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The policy verdict on a new connection of a local endpoint. Only new connections are
 * judged: replies and established flows follow their conntrack entry. */
#ifndef SLUICE_POLICY_H
#define SLUICE_POLICY_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "common.h"
#include "identity.h"
#include "maps.h"
#include "parse.h"

/* The row of the endpoint's policy map @rows admitting @key: the remote identity's own
 * row, else the row for any peer. Out of line on purpose: BTF describes the types of
 * function signatures but not those of locals in inlined code, and user space checks
 * its mirrors of policy_key and policy_entry against the object's BTF. */
static __noinline struct policy_entry *policy_row_lookup(void *rows, struct policy_key *key)
{
	struct policy_entry *row = bpf_map_lookup_elem(rows, key);

	if (row)
		return row;
	key->rule.identity = IDENTITY_ANY;
	return bpf_map_lookup_elem(rows, key);
}

/* What policy_verdict learnt besides the verdict, for the POLICY_VERDICT event. */
struct policy_trace {
	__u32 remote_identity; /* in: the identity a tunnel carried, or IDENTITY_UNRESOLVED;
				* out: also what the ipcache said, if it was consulted */
	bool judged;           /* the direction is enforced: policy decided */
	bool host_row;         /* admitted by a row for reserved:host itself */
};

/* Judges a new connection of the endpoint on @ifindex (@ep; NULL when the interface
 * is no known endpoint, which enforces nothing) with the peer @remote on @dport (after
 * service translation). Returns 0 when allowed, after counting the packet on the
 * admitting row, or the DROP_* reason; fills in @trace, whose remote identity the
 * caller set (IDENTITY_UNRESOLVED: look @remote up). */
static __always_inline int policy_verdict(const struct endpoint_info *ep, __u32 ifindex,
					  __u8 direction, __be32 remote, const struct pkt4 *pkt,
					  __be16 dport, struct policy_trace *trace)
{
	__u32 enforced = direction == POLICY_INGRESS ? ENDPOINT_F_INGRESS_ENFORCED
						     : ENDPOINT_F_EGRESS_ENFORCED;
	struct policy_entry *row;
	struct policy_key key;
	void *rows;

	trace->judged = false;
	trace->host_row = false;
	if (!ep || !(ep->flags & enforced))
		return 0;
	trace->judged = true;
	/* Fail closed: a policy that did not fit is not installed, and a map that is
	 * missing cannot say what is allowed. */
	if (ep->flags & ENDPOINT_F_POLICY_OVERFLOW)
		return DROP_POLICY_UNAVAILABLE;
	rows = bpf_map_lookup_elem(&policy, &ifindex);
	if (!rows)
		return DROP_POLICY_UNAVAILABLE;

	/* The identity a tunnel carried is the sender's own; otherwise the ipcache says. */
	if (trace->remote_identity == IDENTITY_UNRESOLVED)
		trace->remote_identity = ipcache_identity(remote);
	key = (struct policy_key){
		.prefixlen = POLICY_PREFIX_FULL,
		.rule = {
			.identity = trace->remote_identity,
			.direction = direction,
			.proto = pkt->proto,
			/* ICMP echo has no port: only rows for any protocol match it. */
			.dport = pkt->proto == IPPROTO_ICMP ? 0 : dport,
		},
	};
	row = policy_row_lookup(rows, &key);
	if (!row)
		return DROP_POLICY;
	/* policy_row_lookup widens the key to any peer when the identity's own row misses. */
	trace->host_row = key.rule.identity == IDENTITY_HOST;
	__sync_fetch_and_add(&row->packets, 1);
	__sync_fetch_and_add(&row->bytes, pkt->len);
	return 0;
}

#endif
