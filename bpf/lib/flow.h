/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The layer-2 forwarding host routing and the flow cache (flow_cache.h) both write. What
 * the slow path tells the cache about a packet, struct flow_note, is in maps.h with its
 * per-CPU map.
 */
#ifndef SLUICE_FLOW_H
#define SLUICE_FLOW_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"
#include "maps.h"

/* Writes @macs and forwards the TTL (RFC 1624, as the kernel's ip_decrease_ttl), as the
 * node's forwarding would. Returns 0, or -1 when the header cannot be written. All
 * direct writes: a program that writes packet data directly gets the verifier's prologue,
 * which makes the linear data writable before it runs, so a helper's store (about 40 ns
 * a call here) would buy nothing. */
static __always_inline int flow_write_l2(struct __sk_buff *skb, const struct eth_addrs *macs)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	__u32 check;

	if ((void *)(ip + 1) > data_end)
		return -1;
	__builtin_memcpy(data, macs, sizeof(*macs));
	check = ip->check;
	check += bpf_htons(0x0100);
	ip->check = (__sum16)(check + (check >= 0xffff));
	ip->ttl -= 1;
	return 0;
}

/* Orders a slot's accesses for the compiler. x86, the only architecture sluice is built
 * for, keeps loads in order with loads and stores with stores, so, as for the kernel's
 * seqcount there, that is all a slot's sequence needs. */
#define flow_barrier() asm volatile("" ::: "memory")

/* Takes a slot (of `flow4` or `host_route4`) whose sequence is *@slot_seq for writing
 * unless another CPU is writing it; @seq is then its sequence before, for slot_unlock. */
static __always_inline bool slot_lock(__u32 *slot_seq, __u32 *seq)
{
	*seq = *(volatile __u32 *)slot_seq;
	return !(*seq & 1) && __sync_val_compare_and_swap(slot_seq, *seq, *seq + 1) == *seq;
}

static __always_inline void slot_unlock(__u32 *slot_seq, __u32 seq)
{
	flow_barrier();
	*(volatile __u32 *)slot_seq = seq + 2;
}

static __always_inline __u32 flow_generation_now(void)
{
	__u32 zero = 0;
	__u32 *generation = bpf_map_lookup_elem(&flow4_generation, &zero);

	return generation ? *generation : 0;
}

/* Notes for the flow cache (flow_record) that forward_to_node sent the packet to the node
 * @node through the device @ifindex, with @tunnel as flow4_entry.tunnel, @encapsulated
 * when the datapath wrote the VXLAN headers itself. Through the per-CPU note rather than
 * a parameter: the programs that share forward_to_node with from_container leave a note
 * that is never recorded, as only from_container records, and it starts its note over
 * for every packet it decides. */
static __always_inline void flow_note_remote(__u32 ifindex, __be32 node, __u32 tunnel,
					     bool encapsulated)
{
	__u32 zero = 0;
	struct flow_note *note = bpf_map_lookup_elem(&flow4_notes, &zero);

	if (note) {
		note->ifindex = ifindex;
		note->next_hop = node;
		note->tunnel = tunnel;
		note->encapsulated = encapsulated;
	}
}

#endif
