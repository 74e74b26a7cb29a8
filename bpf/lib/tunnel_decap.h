/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * VXLAN from another node, decapsulated by from_netdev itself and delivered straight
 * into the local pod it is for, judged on the identity its VNI carries: the kernel's
 * VXLAN device would cost a UDP socket lookup and a second receive (its own queue)
 * per packet. The checks are from_tunnel's; whatever this path does not take passes
 * unchanged to the device, where from_tunnel judges it (and drops, with its events,
 * what it must):
 *  - GSO aggregates: kernel 6.18 cannot clear their tunnel offload state on a
 *    decapsulation by bpf_skb_adjust_room (BPF_F_ADJ_ROOM_DECAP_L4_UDP came later),
 *    and the device's decapsulation does;
 *  - a sender that is not another node, a VNI that is no carriable identity, VXLAN
 *    flags other than the VNI's, and inner frames that are not IPv4;
 *  - inner packets for anything but a local pod (host_route_lookup says).
 */
#ifndef SLUICE_TUNNEL_DECAP_H
#define SLUICE_TUNNEL_DECAP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"
#include "host_routing.h"
#include "identity.h"
#include "metrics.h"
#include "parse.h"
#include "tunnel.h"

/* The VXLAN header and the inner frame's headers, as they follow the outer UDP header. */
struct vxlan_frame {
	__be32 vx_flags;
	__be32 vx_vni;
	struct ethhdr eth;
	struct iphdr ip;
} __attribute__((packed));

/* Whether @outer (PARSE_L4) is VXLAN to this node that the datapath may decapsulate. */
static __always_inline bool tunnel_addressed(const struct node_config *cfg,
					     const struct pkt4 *outer)
{
	return cfg && tunnel_in_datapath(cfg) && outer->proto == IPPROTO_UDP &&
	       outer->dport == cfg->tunnel_port && outer->daddr == cfg->node_address &&
	       !outer->later_fragment;
}

/* Decapsulates the VXLAN packet @outer and delivers the pod packet inside. Returns the
 * verdict, or -1 when the tunnel device is to take it (nothing changed then). Once
 * decapsulated, a packet host_route_deliver cannot deliver goes to the node's stack,
 * which routes it to the pod's veth. */
static __always_inline int tunnel_receive(struct __sk_buff *skb, const struct pkt4 *outer)
{
	struct vxlan_frame f;
	struct eth_addrs macs;
	__u32 identity = 0, ifindex;
	__s32 headers;
	int verdict;

	if (skb->gso_size ||
	    bpf_skb_load_bytes(skb, outer->l4_off + sizeof(struct udphdr), &f, sizeof(f)) < 0)
		return -1;
	if (f.vx_flags != bpf_htonl(VXLAN_FLAG_VNI) || f.eth.h_proto != bpf_htons(ETH_P_IP) ||
	    f.ip.version != 4 || f.ip.ttl <= 1)
		return -1;
	/* A refusal is from_tunnel's to drop, with its events. */
	if (tunnel_sender_identity(outer->saddr, bpf_ntohl(f.vx_vni) >> VXLAN_VNI_SHIFT,
				   &identity))
		return -1;
	/* The inner packet's length: the outer one is 50 bytes longer than the pod's MTU. */
	ifindex = host_route_lookup(skb, f.ip.saddr, f.ip.daddr, bpf_ntohs(f.ip.tot_len), &macs);
	if (!ifindex)
		return -1;
	/* Outer IP and UDP, VXLAN and the inner Ethernet header go; the outer Ethernet
	 * header stays, for host_route_deliver to readdress. */
	headers = outer->l4_off - ETH_HLEN + sizeof(struct udphdr) + 2 * sizeof(__be32) + ETH_HLEN;
	if (bpf_skb_adjust_room(skb, -headers, BPF_ADJ_ROOM_MAC, 0) < 0)
		return verdict_drop(skb, outer, DROP_WRITE_ERROR, METRIC_DIR_INGRESS);
	metrics_count(skb, REASON_FORWARDED, METRIC_DIR_INGRESS);
	verdict = host_route_deliver(skb, ifindex, &macs, identity, NULL, NULL);
	return verdict >= 0 ? verdict : TC_ACT_OK;
}

#endif
