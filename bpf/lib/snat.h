/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Source NAT to node_address, shared by the external frontends' connections to backends
 * on other nodes (host.c, nodeport_to_remote) and by egress masquerading of pod traffic
 * leaving the cluster (host.c, to_netdev). One port allocator: a SNATed tuple toward a
 * destination is held by its CT_SNAT entry, claimed atomically. Scopes in common.h.
 */
#ifndef SLUICE_SNAT_H
#define SLUICE_SNAT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"
#include "conntrack.h"
#include "maps.h"
#include "parse.h"

/* Source ports of SNATed connections: above the nodePort range (30000-32767), so a
 * reply's destination port tells it from traffic to the node's own services; a port
 * collides with the node's own sockets only toward the same destination address and port. */
#define SNAT_PORT_MIN 32768
#define SNAT_PORT_MAX 65535
/* Random ports tried after the client's own before the connection is refused. */
#define SNAT_TRIES 16

/* Whether a packet to node_address:@dport may be the reply of a SNATed connection. */
static __always_inline bool snat_port_range(__be16 dport)
{
	return bpf_ntohs(dport) >= SNAT_PORT_MIN;
}

/* Records the SNAT of @pkt's connection to @node:@port toward @daddr:@dport, if that
 * tuple is free (or already this connection's, or its entry has expired). A free tuple
 * is claimed atomically, so two CPUs can never give it to two connections. @flags mark
 * the entry (CT_FLAG_MASQUERADE). Returns whether it was recorded. */
static __always_inline bool snat_claim(struct __sk_buff *skb, const struct pkt4 *pkt,
				       __be32 daddr, __be16 dport, __be32 node, __be16 port,
				       __u8 flags, __u64 now)
{
	struct ct4_entry *held;
	struct ct4_key key;

	ct_key_init(&key, node, daddr, port, dport, pkt->proto, CT_SNAT);
	if (ct_write(&key, pkt, pkt->saddr, pkt->sport, flags, skb->ifindex, now, BPF_NOEXIST) ==
	    0)
		return true;
	held = bpf_map_lookup_elem(&ct4, &key);
	if (held && !ct_expired(held, pkt->proto, now) &&
	    (held->nat_address != pkt->saddr || held->nat_port != pkt->sport))
		return false;
	return ct_create(&key, pkt, pkt->saddr, pkt->sport, flags, skb->ifindex, now) == 0;
}

/* The SNAT port of a new connection toward @daddr:@dport: the client's own if it is in
 * the SNAT range and free, else the first free one of SNAT_TRIES random ports. Returns 0
 * if none is free. */
static __always_inline __be16 snat_pick_port(struct __sk_buff *skb, const struct pkt4 *pkt,
					     __be32 daddr, __be16 dport, __be32 node, __u8 flags,
					     __u64 now)
{
	__be16 port;
	int i;

	if (snat_port_range(pkt->sport) &&
	    snat_claim(skb, pkt, daddr, dport, node, pkt->sport, flags, now))
		return pkt->sport;
	for (i = 0; i < SNAT_TRIES; i++) {
		port = bpf_htons(SNAT_PORT_MIN +
				 bpf_get_prandom_u32() % (SNAT_PORT_MAX - SNAT_PORT_MIN + 1));
		if (snat_claim(skb, pkt, daddr, dport, node, port, flags, now))
			return port;
	}
	return 0;
}

#endif
