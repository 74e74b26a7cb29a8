// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Programs on the node's collect-metadata VXLAN device (tunnel routing mode):
 *  from_tunnel at tc ingress: pod traffic from other nodes, decapsulated, that
 *              from_netdev did not decapsulate and deliver itself (tunnel_decap.h):
 *              GSO aggregates, and what is not for a local pod;
 *  to_tunnel   at tc egress:  what the node's stack routes into the tunnel.
 * The VNI carries the sending pod's security identity. from_tunnel accepts it only
 * from an address the ipcache knows as another node, and the destination pod's policy
 * judges the sender by it: from_tunnel delivers a local pod's packet itself
 * (host_routing.h), and hands anything the node's stack routes to to_container in the
 * packet's mark. Pod packets arrive with their keys set by from_container; to_tunnel
 * keys the rest (the node's own traffic, and packets the stack fragmented).
 */
#include <linux/bpf.h>
#include <linux/if_packet.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/common.h"
#include "lib/events.h"
#include "lib/host_routing.h"
#include "lib/identity.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/parse.h"
#include "lib/tunnel.h"

/* The inner addresses of a tunneled packet, for events and lookups; no L4 parsing and
 * no fragment tracking here (to_container does both). Returns false if it is no IPv4. */
static __always_inline bool inner_addresses(struct __sk_buff *skb, struct pkt4 *pkt)
{
	*pkt = (struct pkt4){ .len = skb->len, .ifindex = skb->ifindex };
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return false;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, saddr),
			       &pkt->saddr, sizeof(pkt->saddr)) < 0 ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, daddr),
			       &pkt->daddr, sizeof(pkt->daddr)) < 0)
		return false;
	return true;
}

SEC("classifier")
int from_tunnel(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};
	__u32 identity = 0;
	struct pkt4 pkt;
	int verdict, reason;

	if (!inner_addresses(skb, &pkt)) {
		if (skb->protocol == bpf_htons(ETH_P_ARP))
			return verdict_pass(skb, METRIC_DIR_INGRESS);
		return verdict_drop(skb, &pkt, DROP_UNKNOWN_L3, METRIC_DIR_INGRESS);
	}
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return verdict_drop(skb, &pkt, DROP_NO_TUNNEL_KEY, METRIC_DIR_INGRESS);
	reason = tunnel_sender_identity(bpf_htonl(key.remote_ipv4), key.tunnel_id, &identity);
	if (reason)
		return verdict_drop(skb, &pkt, reason, METRIC_DIR_INGRESS);
	/* The inner Ethernet header names the sending node's devices; the stack would
	 * discard the packet as addressed to another host. */
	if (bpf_skb_change_type(skb, PACKET_HOST) < 0)
		return verdict_drop(skb, &pkt, DROP_WRITE_ERROR, METRIC_DIR_INGRESS);
	metrics_count(skb, REASON_FORWARDED, METRIC_DIR_INGRESS);
	/* A local pod's packet goes straight in, judged on the identity carried. */
	verdict = host_route_local(skb, identity, NULL, NULL);
	if (verdict >= 0)
		return verdict;
	/* Anything else through the node's stack; to_container takes the identity. */
	skb->mark = MARK_MAGIC_IDENTITY | identity;
	return TC_ACT_OK;
}

SEC("classifier")
int to_tunnel(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};
	struct ipcache_entry *dest;
	struct pkt4 pkt;

	/* from_container keyed its packets already. */
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) == 0)
		return TC_ACT_OK;
	if (!inner_addresses(skb, &pkt))
		return verdict_drop(skb, &pkt, DROP_UNKNOWN_L3, METRIC_DIR_EGRESS);
	dest = ipcache_lookup(pkt.daddr);
	if (!dest || !dest->tunnel_endpoint)
		return verdict_drop(skb, &pkt, DROP_NO_TUNNEL_ENDPOINT, METRIC_DIR_EGRESS);
	/* The node's own addresses are host in its ipcache; local pods are themselves. */
	key.tunnel_id = ipcache_identity(pkt.saddr);
	if (!identity_carriable(key.tunnel_id))
		return verdict_drop(skb, &pkt, DROP_INVALID_IDENTITY, METRIC_DIR_EGRESS);
	key.remote_ipv4 = bpf_ntohl(dest->tunnel_endpoint);
	key.tunnel_ttl = TUNNEL_TTL;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return verdict_drop(skb, &pkt, DROP_WRITE_ERROR, METRIC_DIR_EGRESS);
	return verdict_pass(skb, METRIC_DIR_EGRESS);
}

char _license[] SEC("license") = "Dual BSD/GPL";
