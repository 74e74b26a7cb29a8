/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Source NAT to node_address, shared by the external frontends' connections to backends
 * on other nodes (host.c, nodeport_to_remote) and by egress masquerading of pod traffic
 * leaving the cluster (host.c, to_netdev). One port allocator: a SNATed tuple toward a
 * destination is held by its CT_SNAT entry, claimed atomically. An ICMP echo's identifier
 * is its port, taken from the same allocator. Scopes in common.h.
 */
#ifndef SLUICE_SNAT_H
#define SLUICE_SNAT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"
#include "conntrack.h"
#include "maps.h"
#include "nat.h"
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

/* The destination port of a SNATed tuple whose source port is @port: an ICMP echo's
 * identifier is both its ports (parse.h), so a translated echo and its reply carry the
 * SNAT port on both sides. */
static __always_inline __be16 snat_peer_port(__u8 proto, __be16 dport, __be16 port)
{
	return proto == IPPROTO_ICMP ? port : dport;
}

/* Whether @pkt belongs to a connection SNAT translates: TCP, UDP and SCTP by port, and an
 * ICMP echo of @echo_type (the request leaving, the reply coming back) by its identifier.
 * A later fragment holds no ICMP header: it goes by the identifier of its first. */
static __always_inline bool snat_translated(struct __sk_buff *skb, const struct pkt4 *pkt,
					    __u8 echo_type)
{
	__u8 type;

	if (pkt->proto == IPPROTO_TCP || pkt->proto == IPPROTO_UDP ||
	    pkt->proto == IPPROTO_SCTP)
		return true;
	if (pkt->proto != IPPROTO_ICMP)
		return false;
	if (pkt->later_fragment)
		return true;
	return bpf_skb_load_bytes(skb, pkt->l4_off, &type, sizeof(type)) == 0 &&
	       type == echo_type;
}

/* Rewrites the port at @off (l4_sport_off or l4_dport_off) of a SNATed packet; an ICMP
 * echo has its identifier rewritten instead. */
static __always_inline int snat_rewrite_port(struct __sk_buff *skb, const struct pkt4 *pkt,
					     __u32 off, __be16 old_port, __be16 new_port)
{
	if (pkt->proto == IPPROTO_ICMP)
		return nat_rewrite_echo_id(skb, pkt, old_port, new_port);
	return nat_rewrite_port(skb, pkt, off, old_port, new_port, false);
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

	ct_key_init(&key, node, daddr, port, snat_peer_port(pkt->proto, dport, port), pkt->proto,
		    CT_SNAT);
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
