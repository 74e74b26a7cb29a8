/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Egress masquerading, as GKE's ip-masq-agent: a connection a pod of this node opens to a
 * destination outside the cluster leaves the underlay device (to_netdev) SNATed to
 * node_address, except toward the nonMasqueradeCIDRs (non_masq_cidrs). Its replies reach
 * node_address on the SNAT port, and from_netdev restores the pod as destination before
 * the node's stack routes them to the pod's veth, where to_container sees the reply of the
 * pod's own CT_EGRESS connection. The port allocator is the external frontends' (snat.h):
 * CT_SNAT (flagged CT_FLAG_MASQUERADE) holds the pod, CT_SNAT_PORT the node's port. A
 * pod's ping is masqueraded too, its echo identifier taking the place of the port, and
 * ICMP errors about a masqueraded connection are translated back to the pod.
 */
#ifndef SLUICE_MASQUERADE_H
#define SLUICE_MASQUERADE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "common.h"
#include "conntrack.h"
#include "events.h"
#include "icmp.h"
#include "identity.h"
#include "maps.h"
#include "metrics.h"
#include "nat.h"
#include "parse.h"
#include "snat.h"

/* Whether an identity is a pod's (label identities), not a reserved or CIDR one. */
static __always_inline bool masquerade_pod_identity(__u32 identity)
{
	return identity >= IDENTITY_FIRST_ALLOCATED && identity < IDENTITY_SCOPE_CIDR;
}

/* Whether @pkt, leaving by the underlay device, is masqueraded: from a pod of this node
 * (in the ipcache with no tunnel endpoint) to an address outside the cluster (world or a
 * policy CIDR in the ipcache, so not a pod, a node or a pod CIDR) that no
 * nonMasqueradeCIDR holds, and not the pod's reply on a connection opened to it from
 * outside (its CT_INGRESS entry), which the client knows by the pod's address. */
static __always_inline bool masquerade_wanted(const struct pkt4 *pkt)
{
	struct ipcache_key key = { .prefixlen = 32, .address = pkt->daddr };
	struct ipcache_entry *source = ipcache_lookup(pkt->saddr);
	struct ipcache_entry *dest;

	if (!source || source->tunnel_endpoint || !masquerade_pod_identity(source->identity))
		return false;
	dest = ipcache_lookup(pkt->daddr);
	if (dest && dest->identity != IDENTITY_WORLD && !(dest->identity & IDENTITY_SCOPE_CIDR))
		return false;
	if (bpf_map_lookup_elem(&non_masq_cidrs, &key))
		return false;
	return !ct_lookup(pkt, CT_INGRESS, true);
}

/* The pod's packet @pkt leaves SNATed to @node with its connection's port, picked on its
 * first packet (or again when the connection starts over or its entry expired). */
static __always_inline int masquerade(struct __sk_buff *skb, const struct pkt4 *pkt,
				      __be32 node, __u64 now)
{
	struct ct4_entry *fwd, *snat;
	struct ct4_key key;
	__be16 port = 0;

	ct_key_init(&key, pkt->saddr, pkt->daddr, pkt->sport, pkt->dport, pkt->proto,
		    CT_SNAT_PORT);
	fwd = bpf_map_lookup_elem(&ct4, &key);
	if (fwd && !ct_syn_starts_over(fwd, pkt) && !ct_expired(fwd, pkt->proto, now) &&
	    fwd->nat_address == node) {
		port = fwd->nat_port;
		ct_account(fwd, pkt, 0, now);
		/* The port stays this connection's only while its CT_SNAT entry says so. */
		ct_key_init(&key, node, pkt->daddr, port,
			    snat_peer_port(pkt->proto, pkt->dport, port), pkt->proto, CT_SNAT);
		snat = bpf_map_lookup_elem(&ct4, &key);
		if (snat && snat->nat_address == pkt->saddr && snat->nat_port == pkt->sport)
			ct_account(snat, pkt, 0, now);
		else if (!snat_claim(skb, pkt, pkt->daddr, pkt->dport, node, port,
				     CT_FLAG_MASQUERADE, now))
			port = 0;
	}
	if (!port) {
		port = snat_pick_port(skb, pkt, pkt->daddr, pkt->dport, node, CT_FLAG_MASQUERADE,
				      now);
		if (!port)
			return verdict_drop(skb, pkt, DROP_NAT_NO_MAPPING, METRIC_DIR_EGRESS);
		ct_key_init(&key, pkt->saddr, pkt->daddr, pkt->sport, pkt->dport, pkt->proto,
			    CT_SNAT_PORT);
		if (ct_create(&key, pkt, node, port, 0, skb->ifindex, now) < 0)
			return verdict_drop(skb, pkt, DROP_CT_CREATE_FAILED, METRIC_DIR_EGRESS);
	}
	if (nat_rewrite_addr(skb, pkt, IP_SADDR_OFF, pkt->saddr, node) < 0 ||
	    snat_rewrite_port(skb, pkt, l4_sport_off(pkt), pkt->sport, port) < 0)
		return verdict_drop(skb, pkt, DROP_WRITE_ERROR, METRIC_DIR_EGRESS);
	return TC_ACT_OK;
}

/* A reply to a masqueraded connection (@snat, its CT_SNAT entry): to the pod again, which
 * the node's stack routes to its veth. */
static __always_inline int masquerade_rev_snat(struct __sk_buff *skb, const struct pkt4 *pkt,
					       struct ct4_entry *snat, __u64 now)
{
	__be32 pod = snat->nat_address;
	__be16 pod_port = snat->nat_port;
	struct ct4_entry *fwd;
	struct ct4_key key;

	ct_account(snat, pkt, CT_FLAG_SEEN_REPLY, now);
	ct_key_init(&key, pod, pkt->saddr, pod_port,
		    snat_peer_port(pkt->proto, pkt->sport, pod_port), pkt->proto, CT_SNAT_PORT);
	fwd = bpf_map_lookup_elem(&ct4, &key);
	if (fwd)
		ct_touch_reply(fwd, pkt, now);
	if (nat_rewrite_addr(skb, pkt, IP_DADDR_OFF, pkt->daddr, pod) < 0 ||
	    snat_rewrite_port(skb, pkt, l4_dport_off(pkt), pkt->dport, pod_port) < 0)
		return verdict_drop(skb, pkt, DROP_WRITE_ERROR, METRIC_DIR_INGRESS);
	return TC_ACT_OK;
}

/* An ICMP error about a masqueraded connection (@snat, its CT_SNAT entry, found by the
 * quoted tuple as it left the node), from its destination or a router on the way: to the
 * pod again, the quote naming the pod's own tuple so that its socket learns of it (path
 * MTU, ECONNREFUSED). The node's stack routes it to the pod's veth. */
static __always_inline int masquerade_icmp_error(struct __sk_buff *skb, const struct pkt4 *pkt,
						 const struct pkt4 *quoted,
						 const struct ct4_entry *snat)
{
	struct icmp_quote_tuple to = {
		.saddr = snat->nat_address,
		.daddr = quoted->daddr,
		.sport = snat->nat_port,
		.dport = snat_peer_port(quoted->proto, quoted->dport, snat->nat_port),
	};

	if (icmp_error_nat(skb, pkt, quoted, &to) < 0)
		return verdict_drop(skb, pkt, DROP_WRITE_ERROR, METRIC_DIR_INGRESS);
	return TC_ACT_OK;
}

/* An ICMP error a pod of this node sends about its masqueraded connection (@quoted, a
 * reply the pod received, found reversed in CT_SNAT_PORT: port unreachable for a datagram
 * that came after its socket closed): it leaves from @node, the quote naming the SNATed
 * tuple the world host knows. Returns the verdict, or -1 for any other error. */
static __always_inline int masquerade_icmp_error_out(struct __sk_buff *skb,
						     const struct pkt4 *pkt,
						     const struct pkt4 *quoted, __be32 node)
{
	struct ct4_entry *fwd = ct_lookup(quoted, CT_SNAT_PORT, true);
	struct icmp_quote_tuple to;

	if (!fwd || fwd->nat_address != node || quoted->daddr != pkt->saddr)
		return -1;
	to = (struct icmp_quote_tuple){
		.saddr = quoted->saddr,
		.daddr = node,
		.sport = snat_peer_port(quoted->proto, quoted->sport, fwd->nat_port),
		.dport = fwd->nat_port,
	};
	if (icmp_error_nat(skb, pkt, quoted, &to) < 0)
		return verdict_drop(skb, pkt, DROP_WRITE_ERROR, METRIC_DIR_EGRESS);
	return TC_ACT_OK;
}

#endif
