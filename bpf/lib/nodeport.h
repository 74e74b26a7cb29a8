/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * External frontends (NodePort, externalIPs, LoadBalancer VIPs) for clients outside the
 * node, whose packets from_netdev sees on the underlay device. The backend is chosen by
 * lb4_select_backend as for a ClusterIP, then:
 *  - a backend on this node gets the packet DNATed, with the client's own address, through
 *    the node's stack (its to_container judges it); its replies are rev-DNATed by its
 *    from_container (CT_NODEPORT) and sent straight out the device the client came in on
 *    (the tunnel for a pod on another node in tunnel mode);
 *  - a backend on another node gets it DNATed and SNATed to node_address with a port that
 *    keeps the tuple unique (CT_SNAT, CT_SNAT_PORT), forwarded with forward_to_node; the
 *    replies come back to node_address and from_netdev restores client and frontend.
 * Scopes in common.h.
 */
#ifndef SLUICE_NODEPORT_H
#define SLUICE_NODEPORT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"
#include "conntrack.h"
#include "events.h"
#include "icmp.h"
#include "maps.h"
#include "metrics.h"
#include "nat.h"
#include "parse.h"
#include "snat.h"

/* The frontends reached from outside the node; a ClusterIP is not one. */
#define SVC_FLAGS_EXTERNAL (SVC_FLAG_NODE_PORT | SVC_FLAG_EXTERNAL_IP | SVC_FLAG_LOAD_BALANCER)

/* Keeps the client's choice of backend (CT_SERVICE) alive on replies too, so a client
 * that only receives is not moved to another backend. */
static __always_inline void nodeport_touch_service(__be32 client, __be16 client_port,
						   const struct ct4_entry *ext,
						   const struct pkt4 *pkt, __u64 now)
{
	struct ct4_entry *service;
	struct ct4_key key;

	ct_key_init(&key, client, ext->nat_address, client_port, ext->nat_port, pkt->proto,
		    CT_SERVICE);
	service = bpf_map_lookup_elem(&ct4, &key);
	if (service) {
		ct_touch_reply(service, pkt, now);
		ct_release(&key, service, pkt);
	}
}

/* A backend's reply on the connection of @ext (its CT_NODEPORT entry): the source becomes
 * the frontend again and, when the connection was SNATed (@snat, a constant at each call
 * site), the destination @client:@client_port; then the packet leaves by the entry's
 * device. @direction is the metrics direction of the caller. */
static __always_inline int nodeport_reply(struct __sk_buff *skb, const struct pkt4 *pkt,
					  struct ct4_entry *ext, bool snat, __be32 client,
					  __be16 client_port, __u64 now, __u8 direction)
{
	__be32 frontend = ext->nat_address;
	__be16 frontend_port = ext->nat_port;
	__u32 ifindex = ext->ifindex;
	struct ct4_key key;

	/* The caller's own entry counts the packet and reports the close; this one only
	 * has to stay alive, with the lifetime of an answered connection. */
	ct_touch_reply(ext, pkt, now);
	nodeport_touch_service(client, client_port, ext, pkt, now);
	/* Found by the reply's tuple reversed (ct_lookup), by every caller. */
	ct_key_init(&key, pkt->daddr, pkt->saddr, pkt->dport, pkt->sport, pkt->proto,
		    CT_NODEPORT);
	ct_release(&key, ext, pkt);
	if (nat_rewrite_addr_direct(skb, pkt, IP_SADDR_OFF, pkt->saddr, frontend) < 0 ||
	    nat_rewrite_port(skb, pkt, l4_sport_off(pkt), pkt->sport, frontend_port, true) < 0)
		return verdict_drop(skb, pkt, DROP_WRITE_ERROR, direction);
	if (snat && (nat_rewrite_addr_direct(skb, pkt, IP_DADDR_OFF, pkt->daddr, client) < 0 ||
		     nat_rewrite_port(skb, pkt, l4_dport_off(pkt), pkt->dport, client_port,
				      true) < 0))
		return verdict_drop(skb, pkt, DROP_WRITE_ERROR, direction);
	metrics_count(skb, REASON_FORWARDED, direction);
	/* The frontend may be the node's own address, which its stack would not forward
	 * as a source: out of the device directly, its neighbour resolved by the kernel. */
	return bpf_redirect_neigh(ifindex, NULL, 0, 0);
}

/* A reply from a local backend, seen by its from_container, on a connection from
 * outside the node: handled if the connection has a CT_NODEPORT entry. Returns the
 * verdict, or -1 when @pkt belongs to no such connection. */
static __always_inline int nodeport_reply_local(struct __sk_buff *skb, const struct pkt4 *pkt,
						__u64 now)
{
	struct ct4_entry *ext = ct_lookup(pkt, CT_NODEPORT, true);

	if (!ext)
		return -1;
	return nodeport_reply(skb, pkt, ext, false, pkt->daddr, pkt->dport, now,
			      METRIC_DIR_EGRESS);
}

/* An ICMP error about a connection from outside the node (port unreachable from its
 * backend, fragmentation needed from a router on the way), quoting @quoted as it reached
 * the backend: its CT_NODEPORT entry names the frontend. The quote is rewritten to name
 * the client's tuple to the frontend again (@client:@client_port, the quoted source
 * unless the connection was SNATed), the outer header following it. Returns the entry
 * (its ifindex is the device toward the client), or NULL when @quoted belongs to no such
 * connection; *@err is set when a rewrite failed. */
static __always_inline struct ct4_entry *nodeport_icmp_error_nat(struct __sk_buff *skb,
								 const struct pkt4 *pkt,
								 const struct pkt4 *quoted,
								 __be32 client, __be16 client_port,
								 bool *err)
{
	struct ct4_entry *ext = ct_lookup(quoted, CT_NODEPORT, false);
	struct icmp_quote_tuple to;

	*err = false;
	if (!ext)
		return NULL;
	to = (struct icmp_quote_tuple){
		.saddr = client,
		.daddr = ext->nat_address,
		.sport = client_port,
		.dport = ext->nat_port,
	};
	*err = icmp_error_nat(skb, pkt, quoted, &to) < 0;
	return ext;
}

/* nodeport_icmp_error_nat, then the error leaves toward the client as the replies do.
 * Returns the verdict, or -1 when @quoted belongs to no connection from outside. */
static __always_inline int nodeport_icmp_error(struct __sk_buff *skb, const struct pkt4 *pkt,
					       const struct pkt4 *quoted, __be32 client,
					       __be16 client_port, __u8 direction)
{
	struct ct4_entry *ext;
	bool err;

	ext = nodeport_icmp_error_nat(skb, pkt, quoted, client, client_port, &err);
	if (!ext)
		return -1;
	if (err)
		return verdict_drop(skb, pkt, DROP_WRITE_ERROR, direction);
	metrics_count(skb, REASON_FORWARDED, direction);
	return bpf_redirect_neigh(ext->ifindex, NULL, 0, 0);
}

/* An ICMP error a local pod sends (@pkt, PARSE_IPV4), seen by its from_container: about
 * a connection a client outside the node opened to it through an external frontend, it
 * is rev-DNATed toward the client. Returns the verdict, or -1 for any other error. */
static __always_inline int nodeport_icmp_error_local(struct __sk_buff *skb,
						     const struct pkt4 *pkt)
{
	struct pkt4 quoted;

	if (!parse_icmp_quote(skb, pkt, &quoted) || quoted.saddr != pkt->daddr)
		return -1;
	return nodeport_icmp_error(skb, pkt, &quoted, quoted.saddr, quoted.sport,
				   METRIC_DIR_EGRESS);
}

#endif
