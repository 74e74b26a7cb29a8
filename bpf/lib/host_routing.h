/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * eBPF host routing: a packet for a pod of this node is delivered straight into the
 * pod's namespace with bpf_redirect_peer by the program that sees it first (from_tunnel,
 * from_netdev, or from_container of another local pod). That skips the node's IP stack
 * (routing, netfilter, neighbour output) and the transmit on the pod's host-side veth
 * with its queueing, so to_container's work on that veth runs here first: the same
 * function, endpoint_ingress, with the same policy, conntrack, events and metrics.
 *
 * The node's own routing table and neighbour cache name the pod's veth and the MACs
 * (bpf_fib_lookup), so a packet goes exactly where the stack would have sent it, and
 * the TTL is decremented as forwarding does. What they named for a pod's address is kept
 * in `host_route4` as a flow cache decision is kept (the realizer's generation, at most
 * FLOW4_DECISION_JIFFIES), so a connection's later packets skip the helper and the
 * endpoints check; the node's routes to a local pod do not depend on the source.
 * Left to the node's stack, where to_container judges them as before:
 *  - destinations that are no local pod (the node itself, the world, other nodes);
 *  - a pod whose neighbour entry the node has not resolved (the stack resolves it,
 *    the next packets take this path);
 *  - a packet larger than the pod's MTU, or whose TTL would expire (the stack answers
 *    them with ICMP);
 *  - what is not IPv4, and headers outside the linear data.
 */
#ifndef SLUICE_HOST_ROUTING_H
#define SLUICE_HOST_ROUTING_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"
#include "endpoint.h"
#include "flow.h"
#include "maps.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* The slot of @daddr in `host_route4`: the high bits of a multiplicative hash, which
 * every bit of the address reaches. */
static __always_inline __u32 host_route_slot(__be32 daddr)
{
	return (daddr * 0x9e3779b1U) >> 20 & (HOST_ROUTE4_MAX - 1);
}

/* The veth of the local pod @daddr from `host_route4`, with its MACs in @macs, if a route
 * found in this generation and recently is kept there and the packet fits the veth's MTU
 * as bpf_fib_lookup judges it: @tot_len, its IP length, or if 0 @skb as it is (a GSO
 * packet is segmented on the way); else 0. */
static __always_inline __u32 host_route_cached(struct __sk_buff *skb, __be32 daddr,
					       __u16 tot_len, struct eth_addrs *macs)
{
	__u32 index = host_route_slot(daddr);
	struct host_route4 *slot = bpf_map_lookup_elem(&host_route4, &index);
	__u32 seq, ifindex;

	if (!slot)
		return 0;
	seq = *(volatile __u32 *)&slot->seq;
	flow_barrier();
	if ((seq & 1) || slot->daddr != daddr || slot->generation != flow_generation_now() ||
	    bpf_jiffies64() - slot->decided_jiffies >= FLOW4_DECISION_JIFFIES ||
	    (tot_len ? tot_len > slot->mtu :
		       skb->len > (__u32)slot->mtu + ETH_HLEN && !skb->gso_size))
		return 0;
	ifindex = slot->ifindex;
	__builtin_memcpy(macs->dest, slot->dmac, ETH_ALEN);
	__builtin_memcpy(macs->source, slot->smac, ETH_ALEN);
	flow_barrier();
	return *(volatile __u32 *)&slot->seq == seq ? ifindex : 0;
}

/* Keeps what @fib found for @daddr, a local pod's address, made in @generation, with the
 * veth's @mtu. A slot another CPU is writing is left alone: a later packet keeps it. */
static __always_inline void host_route_keep(__be32 daddr, const struct bpf_fib_lookup *fib,
					    __u16 mtu, __u32 generation)
{
	__u32 index = host_route_slot(daddr);
	struct host_route4 *slot = bpf_map_lookup_elem(&host_route4, &index);
	__u32 seq;

	if (!slot || !slot_lock(&slot->seq, &seq))
		return;
	slot->daddr = daddr;
	slot->decided_jiffies = bpf_jiffies64();
	slot->ifindex = fib->ifindex;
	slot->generation = generation;
	__builtin_memcpy(slot->dmac, fib->dmac, ETH_ALEN);
	__builtin_memcpy(slot->smac, fib->smac, ETH_ALEN);
	slot->mtu = mtu;
	slot_unlock(&slot->seq, seq);
}

/* The host-side veth of the local pod @daddr, and in @macs the addresses to deliver a
 * packet from @saddr with, from the node's routing table and neighbour cache; 0 when the
 * node's stack is to route it, also when the packet is larger than the veth's MTU:
 * @tot_len is its IP length, or 0 for @skb as it is (the kernel's check is GSO aware).
 * Out of line, so the lookup's parameters take no room on the caller's stack beside
 * endpoint_ingress's. */
static __noinline __u32 host_route_lookup(struct __sk_buff *skb, __be32 saddr, __be32 daddr,
					  __u16 tot_len, struct eth_addrs *macs)
{
	/* Read before the lookup: a map written meanwhile moves it on, and what the
	 * lookup found is taken again. */
	__u32 generation = flow_generation_now();
	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.ifindex = skb->ifindex,
		.ipv4_src = saddr,
		.ipv4_dst = daddr,
		.tot_len = tot_len,
	};
	__u32 ifindex, mtu = 0;

	ifindex = host_route_cached(skb, daddr, tot_len, macs);
	if (ifindex)
		return ifindex;
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS ||
	    !bpf_map_lookup_elem(&endpoints, &fib.ifindex))
		return 0;
	__builtin_memcpy(macs->dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(macs->source, fib.smac, ETH_ALEN);
	/* The helper reports the veth's MTU only when it judged @skb itself; the other
	 * lookup (a decapsulated packet's, tunnel_decap.h) asks the device. */
	if (!tot_len)
		mtu = fib.mtu_result;
	else
		bpf_check_mtu(skb, fib.ifindex, &mtu, 0, 0);
	if (mtu && mtu <= 0xffff)
		host_route_keep(daddr, &fib, mtu, generation);
	return fib.ifindex;
}

/* host_route_lookup for the IPv4 packet @skb holds; 0 also when its TTL would expire.
 * *@fragment says whether the packet is a fragment. */
static __always_inline __u32 host_route_target(struct __sk_buff *skb, struct eth_addrs *macs,
					       bool *fragment)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;

	if (skb->protocol != bpf_htons(ETH_P_IP) || (void *)(ip + 1) > data_end || ip->ttl <= 1)
		return 0;
	*fragment = ip->frag_off & bpf_htons(IP_MF | IP_OFFSET);
	return host_route_lookup(skb, ip->saddr, ip->daddr, 0, macs);
}

/* Delivers @skb into the local pod behind @ifindex with @macs, after endpoint_ingress has
 * let it in; @carried is the identity a tunnel carried for the sender, or
 * IDENTITY_UNRESOLVED. Returns the verdict (the redirect, or the drop endpoint_ingress
 * chose), or -1 when the node's stack is to route the packet. @note, if not NULL, learns
 * what the flow cache needs; @parsed, if not NULL, is the packet's tuple for
 * endpoint_ingress. Inline: endpoint_ingress's stack beside a caller's would
 * pass the verifier's 512 bytes for a call chain. */
static __always_inline int host_route_deliver(struct __sk_buff *skb, __u32 ifindex,
					 const struct eth_addrs *macs, __u32 carried,
					 struct flow_note *note, const struct pkt4 *parsed)
{
	int verdict;

	if (flow_write_l2(skb, macs) < 0)
		return -1;
	verdict = endpoint_ingress(skb, ifindex, carried, note, parsed);
	if (verdict != TC_ACT_OK)
		return verdict;
	if (note) {
		note->ifindex = ifindex;
		note->macs = *macs;
	}
	return bpf_redirect_peer(ifindex, 0);
}

/* Delivers @skb into the local pod it is addressed to (host_route_deliver), or returns -1
 * when the node's stack is to route it (nothing changed then that it would not redo).
 * @parsed, if not NULL, is the packet's tuple as the caller parsed and translated it;
 * a fragment is parsed again all the same, as its destination records its own tuple
 * for the later fragments (frag.h). */
static __always_inline int host_route_local(struct __sk_buff *skb, __u32 carried,
					    struct flow_note *note, const struct pkt4 *parsed)
{
	bool fragment = false;
	struct eth_addrs macs;
	__u32 ifindex;

	ifindex = host_route_target(skb, &macs, &fragment);
	if (!ifindex)
		return -1;
	return host_route_deliver(skb, ifindex, &macs, carried, note, fragment ? NULL : parsed);
}

#endif
