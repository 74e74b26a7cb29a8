/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Pod traffic between nodes. The ipcache names the node that hosts every remote pod
 * address (tunnel_endpoint); a packet from a local pod to such an address is sent
 * straight to that node by the datapath, never left to the node's routing table:
 *  tunnel mode: VXLAN, the VNI carrying the sending pod's security identity, so the
 *               receiving node judges the sender's real identity without an ipcache
 *               lookup. The datapath writes the outer headers itself and sends the
 *               packet out of the underlay device (tunnel_encap): the kernel's VXLAN
 *               device would cost a second transmit and a route lookup per packet.
 *               Without a tunnel port in node_config, the node's collect-metadata
 *               device encapsulates instead (bpf_skb_set_tunnel_key);
 *  native mode: out of the underlay device to the node's address, which the
 *               underlay routes to.
 * A DF packet the path cannot carry is answered with ICMP fragmentation needed, so
 * path-MTU discovery works; a packet without DF goes to the node's stack, which
 * fragments it and routes it through the tunnel device (to_tunnel gives it its key).
 * The tunnel device's MTU is the tunnel's, whichever encapsulates.
 */
#ifndef SLUICE_TUNNEL_H
#define SLUICE_TUNNEL_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"
#include "events.h"
#include "flow.h"
#include "identity.h"
#include "maps.h"
#include "metrics.h"
#include "parse.h"
#include "reject.h"

#ifndef AF_INET
#define AF_INET 2
#endif

#define TUNNEL_TTL 64
#define IP_DF      0x4000

/* VXLAN (RFC 7348): the I flag says the VNI is valid; the VNI is the top 24 bits of
 * the second word. */
#define VXLAN_FLAG_VNI 0x08000000U
#define VXLAN_VNI_SHIFT 8

/* What tunnel_encap puts between the outer Ethernet header and the pod's IP header. */
struct vxlan_encap {
	struct iphdr ip;
	struct udphdr udp;
	__be32 vx_flags;
	__be32 vx_vni;
	struct ethhdr inner;
} __attribute__((packed));

#define TUNNEL_OVERHEAD ((__s32)sizeof(struct vxlan_encap))

/* The identity the tunnel carried travels from from_tunnel to to_container in the
 * packet's mark: the top byte says the rest is an identity (a VNI has 24 bits). */
#define MARK_MAGIC_IDENTITY 0xe5000000U
#define MARK_MAGIC_MASK     0xff000000U
#define MARK_IDENTITY_MASK  0x00ffffffU

static __always_inline struct node_config *node_config_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&node_config, &zero);
}

/* Takes the identity from_tunnel left in the mark, or IDENTITY_UNRESOLVED. */
static __always_inline __u32 tunnel_identity_take(struct __sk_buff *skb)
{
	__u32 identity;

	if ((skb->mark & MARK_MAGIC_MASK) != MARK_MAGIC_IDENTITY)
		return IDENTITY_UNRESOLVED;
	identity = skb->mark & MARK_IDENTITY_MASK;
	skb->mark = 0;
	return identity;
}

/* The identity a tunnel may carry: a pod's (label identities) or a node's own traffic
 * (host, which is remote-node on the receiving node). CIDR identities and world never
 * travel. */
static __always_inline bool identity_carriable(__u32 identity)
{
	return identity == IDENTITY_HOST ||
	       (identity >= IDENTITY_FIRST_ALLOCATED && identity < IDENTITY_SCOPE_CIDR);
}

/* The identity a VXLAN packet from @sender (network order) carries in @vni, as the
 * receiving node judges it: anyone can send a VXLAN datagram, but only another node may
 * name an identity, and only a carriable one (the sender's host is remote-node here).
 * Returns 0 with *@identity set, or the DROP_* reason. The one rule for both receivers:
 * from_tunnel and the datapath's own decapsulation (tunnel_decap.h). */
static __always_inline int tunnel_sender_identity(__be32 sender, __u32 vni, __u32 *identity)
{
	if (ipcache_identity(sender) != IDENTITY_REMOTE_NODE)
		return DROP_UNKNOWN_SENDER;
	if (!identity_carriable(vni))
		return DROP_INVALID_IDENTITY;
	*identity = vni == IDENTITY_HOST ? IDENTITY_REMOTE_NODE : vni;
	return 0;
}

/* Whether the datapath encapsulates pod traffic itself (tunnel_encap). */
static __always_inline bool tunnel_in_datapath(const struct node_config *cfg)
{
	return cfg->routing_mode == ROUTING_MODE_TUNNEL && cfg->tunnel_port && cfg->node_address;
}

/* Wraps the Ethernet frame @skb holds in VXLAN from this node to @node with @identity
 * in the VNI, as the kernel's device would: UDP source port from the flow's hash (so
 * the underlay spreads flows), no UDP checksum (RFC 7348 allows it over IPv4; the inner
 * packet keeps its own). GSO packets stay GSO: the kernel segments the inner packets
 * at the device that needs it. The headers are written directly, their IP checksum
 * summed here: the programs that send to other nodes (from_container, from_netdev)
 * write packets directly anyway, so the verifier's prologue has made the data writable,
 * and each helper call saved is tens of ns per packet. Returns 0, or < 0 if the packet
 * could not be grown. */
static __always_inline int tunnel_encap(struct __sk_buff *skb, const struct node_config *cfg,
					__be32 node, __u32 identity)
{
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
		      BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
		      BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN);
	__u32 frame = skb->len;
	__be16 tot_len = bpf_htons(frame + TUNNEL_OVERHEAD - ETH_HLEN);
	__be16 id = (__be16)bpf_get_prandom_u32();
	__be16 source = bpf_htons(0xc000 | (bpf_get_hash_recalc(skb) & 0x3fff));
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct vxlan_encap *h;
	struct ethhdr inner;
	__u32 sum;

	if (data + sizeof(inner) > data_end)
		return -1;
	__builtin_memcpy(&inner, data, sizeof(inner));
	if (bpf_skb_adjust_room(skb, TUNNEL_OVERHEAD, BPF_ADJ_ROOM_MAC, flags) < 0)
		return -1;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	h = data + ETH_HLEN;
	if ((void *)(h + 1) > data_end)
		return -1;
	/* The header's ones' complement sum, by 16-bit words in the packet's byte order. */
	sum = bpf_htons(0x4500) + tot_len + id + bpf_htons(TUNNEL_TTL << 8 | IPPROTO_UDP);
	sum = csum32_add(csum32_add(sum, cfg->node_address), node);
	h->ip = (struct iphdr){
		.version = 4,
		.ihl = sizeof(struct iphdr) / 4,
		.ttl = TUNNEL_TTL,
		.protocol = IPPROTO_UDP,
		.tot_len = tot_len,
		.id = id,
		.check = (__sum16)~csum32_fold(sum),
		.saddr = cfg->node_address,
		.daddr = node,
	};
	h->udp = (struct udphdr){
		.source = source,
		.dest = cfg->tunnel_port,
		.len = bpf_htons(frame + TUNNEL_OVERHEAD - ETH_HLEN - sizeof(struct iphdr)),
	};
	h->vx_flags = bpf_htonl(VXLAN_FLAG_VNI);
	h->vx_vni = bpf_htonl((identity & MARK_IDENTITY_MASK) << VXLAN_VNI_SHIFT);
	h->inner = inner;
	return 0;
}

/* Sends @skb, a pod's packet from a pod with @identity, through the tunnel to the node
 * @node (network order): wrapped in VXLAN by the datapath (tunnel_encap) and redirected
 * to the underlay's neighbour @node, or given its key for the tunnel device. Returns 0
 * with the redirect set (the program returns TC_ACT_REDIRECT), or < 0 when the packet
 * could not be written. One copy, out of line, for the slow path (forward_to_node) and
 * the flow cache. */
static __noinline int tunnel_send(struct __sk_buff *skb, const struct node_config *cfg,
				  __be32 node, __u32 identity)
{
	struct bpf_redir_neigh next_hop = { .nh_family = AF_INET, .ipv4_nh = node };
	struct bpf_tunnel_key key = {
		.tunnel_id = identity & MARK_IDENTITY_MASK,
		.remote_ipv4 = bpf_ntohl(node),
		.tunnel_ttl = TUNNEL_TTL,
	};

	if (!cfg)
		return -1;
	if (tunnel_in_datapath(cfg)) {
		if (tunnel_encap(skb, cfg, node, identity) < 0)
			return -1;
		return bpf_redirect_neigh(cfg->underlay_ifindex, &next_hop, sizeof(next_hop), 0) ==
		       TC_ACT_REDIRECT ? 0 : -1;
	}
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return -1;
	return bpf_redirect(cfg->tunnel_ifindex, 0) == TC_ACT_REDIRECT ? 0 : -1;
}

static __always_inline bool ip_dont_fragment(struct __sk_buff *skb)
{
	__be16 frag_off = 0;

	if (bpf_skb_load_bytes(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, frag_off),
			       &frag_off, sizeof(frag_off)) < 0)
		return false;
	return frag_off & bpf_htons(IP_DF);
}

/* @pkt, from a local pod with @identity, goes to the pod network of the node at
 * @node (network order). Returns the program's verdict. */
static __always_inline int forward_to_node(struct __sk_buff *skb, const struct pkt4 *pkt,
					   const struct node_config *cfg, __be32 node,
					   __u32 identity)
{
	bool tunnel = cfg->routing_mode == ROUTING_MODE_TUNNEL;
	__u32 ifindex = tunnel ? cfg->tunnel_ifindex : cfg->underlay_ifindex;
	__u32 mtu = 0;

	if (bpf_check_mtu(skb, ifindex, &mtu, 0, BPF_MTU_CHK_SEGS) > 0) {
		if (!ip_dont_fragment(skb))
			return verdict_pass(skb, METRIC_DIR_EGRESS);
		metrics_count(skb, DROP_FRAG_NEEDED, METRIC_DIR_EGRESS);
		event_packet(skb, pkt, EVENT_DROP, METRIC_DIR_EGRESS, DROP_FRAG_NEEDED, 0,
			     IDENTITY_UNRESOLVED);
		if (reject_unreachable(skb, pkt, ICMP_FRAG_NEEDED, mtu) < 0)
			return TC_ACT_SHOT;
		/* Back into the pod's end of the veth, as a service rejection goes. */
		return bpf_redirect_peer(skb->ifindex, 0);
	}

	/* For the flow cache, which sends the flow's next packets the same way
	 * (tunnel_send); the MTU it checks them against is ifindex's. */
	flow_note_remote(ifindex, node, tunnel ? FLOW4_TUNNEL | (identity & MARK_IDENTITY_MASK) : 0,
			 tunnel_in_datapath(cfg));
	if (tunnel) {
		if (tunnel_send(skb, cfg, node, identity) < 0)
			return verdict_drop(skb, pkt, DROP_WRITE_ERROR, METRIC_DIR_EGRESS);
		metrics_count(skb, REASON_FORWARDED, METRIC_DIR_EGRESS);
		return TC_ACT_REDIRECT;
	}

	struct bpf_redir_neigh next_hop = { .nh_family = AF_INET, .ipv4_nh = node };

	metrics_count(skb, REASON_FORWARDED, METRIC_DIR_EGRESS);
	return bpf_redirect_neigh(ifindex, &next_hop, sizeof(next_hop), 0);
}

/* Forwards @pkt, leaving the local pod @ep for @daddr (after any service translation):
 * to another node when the ipcache says a node hosts @daddr, else to the node's stack
 * (this node's pods and the world). */
static __always_inline int forward_egress(struct __sk_buff *skb, const struct pkt4 *pkt,
					  __be32 daddr, const struct endpoint_info *ep)
{
	struct node_config *cfg = node_config_get();
	struct ipcache_entry *dest;

	if (!cfg || cfg->routing_mode == ROUTING_MODE_LOCAL)
		return verdict_pass(skb, METRIC_DIR_EGRESS);
	dest = ipcache_lookup(daddr);
	if (!dest || !dest->tunnel_endpoint)
		return verdict_pass(skb, METRIC_DIR_EGRESS);
	return forward_to_node(skb, pkt, cfg, dest->tunnel_endpoint,
			       ep ? ep->identity : ipcache_identity(pkt->saddr));
}

#endif
