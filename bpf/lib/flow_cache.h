/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The flow cache: a packet of an established connection between two pods of this node,
 * or from a pod of this node to one on another node (native routing or the tunnel),
 * costs one lookup. from_container looks the packet's tuple up in `flow4` (an array
 * indexed by a hash of it: flow_lookup); a decision that still holds (flow_usable) is
 * applied as the slow path would apply it: the rewrite to the tuple the packet entered
 * the destination pod with (service translation and reverse NAT alike), the MACs and TTL
 * host routing writes, the metrics both ends count, and the redirect into the pod. Policy
 * is not consulted: it judges new connections only, and a cached packet never opens one.
 *
 * Everything else takes the slow path, which records a decision (flow_record) when both
 * ends accounted the packet to an established conntrack entry and host routing
 * delivered it (struct flow_note, flow.h). A decision holds while the realizer's
 * generation is the one it was made in (a changed service, backend, endpoint or ipcache
 * entry sends every flow through the slow path once) and for FLOW4_DECISION_JIFFIES, after
 * which the slow path refreshes the conntrack entries the cached packets did not touch.
 *
 * The three entry points are global functions: the verifier checks each once, on its
 * own, instead of once for every path of from_container's slow path around them.
 * Included by lxc.c only.
 */
#ifndef SLUICE_FLOW_CACHE_H
#define SLUICE_FLOW_CACHE_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"
#include "conntrack.h"
#include "flow.h"
#include "maps.h"
#include "metrics.h"
#include "nat.h"
#include "parse.h"
#include "tunnel.h"

/* Whether @skb may use the cache, with its tuple in @key and its TCP flags in @flags if
 * so: option-less unfragmented IPv4 with a TTL that survives forwarding, UDP or
 * TCP without SYN, FIN or RST (they change conntrack state), headers valid and in the
 * linear data. Anything else, malformed packets included, takes the slow path. */
static __always_inline bool flow_parse(struct __sk_buff *skb, struct flow4_key *key,
				       __u8 *flags)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	struct l4_ports *ports = (void *)(ip + 1);
	struct tcphdr *tcp = (void *)(ip + 1);
	__u32 tot_len, l4_min = sizeof(struct udphdr);
	__u8 tcp_flags = 0;

	if (skb->protocol != bpf_htons(ETH_P_IP) || (void *)(tcp + 1) > data_end)
		return false;
	if (ip->version != 4 || ip->ihl != 5 || ip->ttl <= 1 ||
	    (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return false;
	if (ip->protocol == IPPROTO_TCP) {
		tcp_flags = ((__u8 *)tcp)[TCP_FLAGS_OFF];
		if (tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST) || tcp->doff < 5)
			return false;
		l4_min = tcp->doff * 4;
	} else if (ip->protocol != IPPROTO_UDP) {
		return false;
	}
	/* A GSO packet's tot_len 0 (BIG TCP) is left to parse_ipv4. */
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < sizeof(struct iphdr) + l4_min || tot_len > skb->len - ETH_HLEN)
		return false;

	*key = (struct flow4_key){
		.saddr = ip->saddr,
		.daddr = ip->daddr,
		.sport = ports->source,
		.dport = ports->dest,
		.proto = ip->protocol,
		.ifindex = skb->ifindex,
	};
	*flags = tcp_flags;
	return true;
}

/* The slot of @key's flow in `flow4`: a multiplicative hash of the tuple and the veth.
 * Flows that share a slot take turns in it, each decided again after the other replaced
 * it (a direct-mapped cache); a pod that aims its flows at another's slot only sends that
 * flow through the slow path. */
static __always_inline __u32 flow_slot_index(const struct flow4_key *key)
{
	__u32 hash = (key->saddr ^ key->ifindex) * 0x9e3779b1U;

	hash = (hash ^ key->daddr) * 0x85ebca6bU;
	hash = (hash ^ ((__u32)key->sport << 16 | key->dport) ^ key->proto) * 0xc2b2ae35U;
	return (hash ^ hash >> 16) & (FLOW4_MAX - 1);
}

static __always_inline bool flow_key_equal(const struct flow4_key *a, const struct flow4_key *b)
{
	return a->saddr == b->saddr && a->daddr == b->daddr && a->sport == b->sport &&
	       a->dport == b->dport && a->proto == b->proto && a->ifindex == b->ifindex;
}

/* Copies the decision for @key into @entry. Returns whether @key's slot held one, whole:
 * not torn by a write on another CPU meanwhile. */
static __always_inline bool flow_lookup(const struct flow4_key *key, struct flow4_entry *entry)
{
	__u32 index = flow_slot_index(key);
	struct flow4_slot *slot = bpf_map_lookup_elem(&flow4, &index);
	__u32 seq;

	if (!slot)
		return false;
	seq = *(volatile __u32 *)&slot->seq;
	flow_barrier();
	if ((seq & 1) || !flow_key_equal(&slot->key, key))
		return false;
	*entry = slot->entry;
	flow_barrier();
	return *(volatile __u32 *)&slot->seq == seq;
}

/* Writes @entry, the decision for @key, into its slot. Returns whether it did: not when
 * another CPU is writing the slot (a later packet of the flow records it then). */
static __always_inline bool flow_store(const struct flow4_key *key,
				       const struct flow4_entry *entry)
{
	__u32 index = flow_slot_index(key);
	struct flow4_slot *slot = bpf_map_lookup_elem(&flow4, &index);
	__u32 seq;

	if (!slot || !slot_lock(&slot->seq, &seq))
		return false;
	slot->key = *key;
	slot->entry = *entry;
	slot_unlock(&slot->seq, seq);
	return true;
}

static __always_inline struct flow4_stats *flow_stats(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&flow4_stats, &zero);
}

/* Whether @skb fits the destination veth's MTU as @entry recorded it, as bpf_check_mtu
 * judges without BPF_MTU_CHK_SEGS: a GSO packet is segmented on the way. The stack
 * answers a larger one with ICMP. A changed MTU holds from the next decision on. A GSO
 * packet to another node is left to the slow path, which checks its segments against
 * the MTU of the device it goes out of (forward_to_node). */
static __always_inline bool flow_fits(struct __sk_buff *skb, const struct flow4_entry *entry)
{
	return skb->len <= (__u32)entry->mtu + ETH_HLEN ||
	       (skb->gso_size != 0 && !entry->next_hop);
}

/* Whether @entry still decides @skb, whose TCP flags are @tcp_flags: made in this
 * generation, young enough, with every one of the flags already accounted by the slow
 * path, and @skb within the destination veth's MTU. @now is bpf_jiffies64(). */
static __always_inline bool flow_usable(struct __sk_buff *skb, const struct flow4_entry *entry,
					__u8 tcp_flags, __u64 now)
{
	return entry->generation == flow_generation_now() &&
	       now - entry->decided_jiffies < FLOW4_DECISION_JIFFIES &&
	       (tcp_flags & ~entry->tcp_flags) == 0 && flow_fits(skb, entry);
}

/* Whether @a and @b are the same ones' complement number (0 and 0xffff are both zero). */
static __always_inline bool flow_csum_equal(__u16 a, __u16 b)
{
	return a == b || ((__u16)(a ^ b) == 0xffff && (a == 0 || b == 0));
}

/* The addresses' and protocol's part of the pseudo-header sum of @key's packets, folded. */
static __always_inline __u16 flow_pseudo_base(const struct flow4_key *key)
{
	return csum32_fold(csum32_add(csum32_add(key->saddr, key->daddr),
					 bpf_htons((__u16)key->proto)));
}

/* The pseudo-header sum of @ip's packet, folded as an offload's checksum field holds it
 * (the kernel's ~csum_tcpudp_magic): @entry's part, which the flow's key fixes, and the
 * packet's L4 length. */
static __always_inline __u16 flow_pseudo_sum(const struct flow4_entry *entry,
					     const struct iphdr *ip)
{
	return csum32_fold(csum32_add(entry->pseudo_base,
					 bpf_htons(bpf_ntohs(ip->tot_len) - sizeof(struct iphdr))));
}

/* Whether the L4 checksum field @check of @ip's packet is of the kind @entry recorded.
 * An offload's field always equals the pseudo-header sum; a complete checksum does
 * once in 65,536, so a flow recorded complete sends such a packet to the slow path,
 * and one recorded for offload takes a complete checksum for its own kind only then
 * (its flow would have to change kinds midway, as when a pod turns offload off). */
static __always_inline bool flow_csum_holds(const struct flow4_entry *entry,
					    const struct iphdr *ip, __u16 check)
{
	switch (entry->l4_csum) {
	case FLOW4_L4_CSUM_ABSENT:
		return check == 0;
	case FLOW4_L4_CSUM_PSEUDO:
		return flow_csum_equal(check, flow_pseudo_sum(entry, ip));
	default:
		return (check != 0 || ip->protocol != IPPROTO_UDP) &&
		       !flow_csum_equal(check, flow_pseudo_sum(entry, ip));
	}
}

/* Rewrites @key's tuple in @skb to @entry's and writes the MACs, the TTL, the IP
 * checksum and the L4 checksum (the change flow_record computed for its kind) as
 * forwarding would, all directly: no helper call. Returns whether it did; when it did
 * not (a checksum of another kind), nothing was written. */
static __always_inline bool flow_rewrite(struct __sk_buff *skb, const struct flow4_key *key,
					 const struct flow4_entry *entry)
{
	__u32 addrs = csum32_replace(csum32_replace(0, key->saddr, entry->saddr),
				     key->daddr, entry->daddr);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	struct l4_ports *ports = (void *)(ip + 1);
	__sum16 *l4_check = (void *)(ip + 1) + (key->proto == IPPROTO_TCP ?
					       __builtin_offsetof(struct tcphdr, check) :
					       __builtin_offsetof(struct udphdr, check));
	/* Both MACs as three words (4-byte aligned in the entry): x86 writes the packet's
	 * unaligned ones whole. */
	const __u32 *macs = (const __u32 *)entry->dmac;
	__u32 *eth = data;
	__u32 check;

	if ((void *)(ports + 1) > data_end || (void *)(l4_check + 1) > data_end ||
	    !flow_csum_holds(entry, ip, *l4_check))
		return false;
	if (entry->l4_csum != FLOW4_L4_CSUM_ABSENT) {
		check = csum32_fold(csum32_add(*l4_check, entry->l4_csum_delta));
		/* Zero would mean no UDP checksum: 0xffff is the same sum (RFC 768). */
		*l4_check = (__sum16)(check || key->proto != IPPROTO_UDP ? check : 0xffff);
	}
	ip->saddr = entry->saddr;
	ip->daddr = entry->daddr;
	ports->source = entry->sport;
	ports->dest = entry->dport;
	/* The IP checksum is always complete: the addresses' change, then the TTL's, as
	 * flow_write_l2 forwards it. */
	ip->check = (__sum16)~csum32_fold(csum32_add((__u16)~ip->check, addrs));
	/* To another node, the neighbour table writes the MACs and the TTL stays, as
	 * forward_to_node sends it. */
	if (entry->next_hop)
		return true;
	eth[0] = macs[0];
	eth[1] = macs[1];
	eth[2] = macs[2];
	check = ip->check;
	check += bpf_htons(0x0100);
	ip->check = (__sum16)(check + (check >= 0xffff));
	ip->ttl -= 1;
	return true;
}

/* What flow_forward returns for a packet the cache sends to another node: its caller
 * redirects it (flow_redirect_node) to where the note says. */
#define FLOW_TO_NODE (-2)

/* Sends the packet to the node @note names under native routing, as forward_to_node
 * does. Out of line and called by from_container itself: the next hop's room on the
 * stack would not fit beside flow_forward's. */
static __noinline int flow_redirect_node(const struct flow_note *note)
{
	struct bpf_redir_neigh next_hop = { .nh_family = AF_INET };

	if (!note)
		return TC_ACT_SHOT;
	next_hop.ipv4_nh = note->next_hop;
	return bpf_redirect_neigh(note->ifindex, &next_hop, sizeof(next_hop), 0);
}

/* Sends @skb through the tunnel to the node @note names, as forward_to_node does.
 * Called by from_container itself, as flow_redirect_node: tunnel_send's room on the
 * stack fits beside no other subprogram's. */
static __always_inline int flow_tunnel_node(struct __sk_buff *skb, const struct flow_note *note)
{
	if (tunnel_send(skb, node_config_get(), note->next_hop, note->tunnel) == 0)
		return TC_ACT_REDIRECT;
	/* Counted, with no event: the cached path parsed no tuple for one. Its egress was
	 * counted forwarded already, where the slow path's would not be. */
	metrics_count(skb, DROP_WRITE_ERROR, METRIC_DIR_EGRESS);
	return TC_ACT_SHOT;
}

/* Forwards @skb from the cache when a decision holds for it. Returns the verdict,
 * FLOW_TO_NODE with the node in @note's ifindex and next_hop, or -1 for the slow path
 * (nothing was changed then); @note then starts over with the packet's
 * tuple and TCP flags for flow_record if it may use the cache, else zero. */
__noinline int flow_forward(struct __sk_buff *skb, struct flow_note *note)
{
	struct flow4_entry decision;
	struct flow4_entry *entry = &decision;
	struct flow4_stats *stats;
	__u8 tcp_flags;

	if (!note)
		return -1;
	if (!flow_parse(skb, &note->key, &tcp_flags)) {
		__builtin_memset(note, 0, sizeof(*note));
		return -1;
	}
	if (!flow_lookup(&note->key, entry) ||
	    !flow_usable(skb, entry, tcp_flags, bpf_jiffies64()) ||
	    !flow_rewrite(skb, &note->key, entry)) {
		/* The rest of the note, for the slow path only: a cached packet needs none. */
		note->tcp_flags = tcp_flags;
		note->source_flags = 0;
		note->dest_flags = 0;
		note->encapsulated = 0;
		note->ifindex = 0;
		__builtin_memset(&note->macs, 0, sizeof(note->macs));
		note->next_hop = 0;
		note->tunnel = 0;
		return -1;
	}
	stats = flow_stats();
	if (stats)
		stats->hits++;
	/* What the slow path counts: forwarded out of the pod, and into the other one when
	 * it is on this node. */
	metrics_count(skb, REASON_FORWARDED, METRIC_DIR_EGRESS);
	if (entry->next_hop) {
		note->ifindex = entry->ifindex;
		note->next_hop = entry->next_hop;
		note->tunnel = entry->tunnel;
		return FLOW_TO_NODE;
	}
	metrics_count(skb, REASON_FORWARDED, METRIC_DIR_INGRESS);
	return bpf_redirect_peer(entry->ifindex, 0);
}

/* Forgets the decision on @pkt's flow (its tuple as it left the pod on @pkt->ifindex), at
 * a FIN or RST, which the cache never forwards: the connection's last ACK must reach the
 * slow path, which removes the closed connection's conntrack entries (ct_release), and a
 * closed flow's decision would only fill the table until evicted. */
static __always_inline void flow_forget(const struct pkt4 *pkt)
{
	struct flow4_key key = {
		.saddr = pkt->saddr,
		.daddr = pkt->daddr,
		.sport = pkt->sport,
		.dport = pkt->dport,
		.proto = pkt->proto,
		.ifindex = pkt->ifindex,
	};
	__u32 index = flow_slot_index(&key);
	struct flow4_slot *slot = bpf_map_lookup_elem(&flow4, &index);
	__u32 seq;

	/* A slot another CPU is writing is left alone: at worst the last ACK takes the
	 * cached path and the entries wait out their closing lifetime. */
	if (!slot || !flow_key_equal(&slot->key, &key) || !slot_lock(&slot->seq, &seq))
		return;
	/* No packet has ifindex 0, so the zeroed key matches none. */
	__builtin_memset(&slot->key, 0, sizeof(slot->key));
	slot_unlock(&slot->seq, seq);
}

/* Whether conntrack entry flags (struct flow_note) name a connection the cache may keep:
 * established (a reply seen, no FIN or RST), neither hairpin nor from outside the node
 * (their replies are translated by paths the cache does not take). */
static __always_inline bool flow_settled(__u8 flags)
{
	return (flags & (CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING | CT_FLAG_LOOPBACK |
			 CT_FLAG_NODEPORT)) == CT_FLAG_SEEN_REPLY;
}

/* Sets @kind (FLOW4_L4_CSUM_*) and @delta (struct flow4_entry) from @skb, the packet the slow path just
 * rewrote from @note's tuple. Whether its field is an offload's pseudo-header sum only
 * the kernel knows: a change of one to the field, made and undone through the helper
 * the slow path writes with, moves a complete checksum and leaves a pseudo-header sum.
 * Returns 0, or -1 when the packet cannot be read or written. */
static __always_inline int flow_learn_csum(struct __sk_buff *skb, const struct flow_note *note,
					   __u32 l3, __u8 *kind, __u16 *delta)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + l3;
	struct l4_ports *ports = (void *)(ip + 1);
	bool udp = note->key.proto == IPPROTO_UDP;
	__u32 off = l3 + sizeof(struct iphdr) +
		    (udp ? __builtin_offsetof(struct udphdr, check) :
			   __builtin_offsetof(struct tcphdr, check));
	__u64 flags = udp ? BPF_F_MARK_MANGLED_0 : 0;
	__sum16 *field = data + off;
	__u32 addrs, ports_change;
	__u16 before;

	if ((void *)(ports + 1) > data_end || (void *)(field + 1) > data_end)
		return -1;
	addrs = csum32_replace(csum32_replace(0, note->key.saddr, ip->saddr),
			       note->key.daddr, ip->daddr);
	ports_change = csum32_replace(0, (__u32)note->key.sport | (__u32)note->key.dport << 16,
				      (__u32)ports->source | (__u32)ports->dest << 16);
	before = *field;
	if (udp && before == 0) {
		*kind = FLOW4_L4_CSUM_ABSENT;
		return 0;
	}
	if (bpf_l4_csum_replace(skb, off, 0, 1, flags) < 0)
		return -1;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	field = data + off;
	if ((void *)(field + 1) > data_end)
		return -1;
	if (*field == before) {
		*kind = FLOW4_L4_CSUM_PSEUDO;
		*delta = csum32_fold(addrs);
		return 0;
	}
	*kind = FLOW4_L4_CSUM_FULL;
	*delta = (__u16)~csum32_fold(csum32_add(addrs, ports_change));
	/* The one back: -1, ~1 in ones' complement. */
	return bpf_l4_csum_replace(skb, off, 0, ~1U, flags) < 0 ? -1 : 0;
}

/* Records the slow path's decision on @skb, which left its pod as @note's key and was
 * delivered as @note says: the tuple it now carries, the veth and MACs, the node and
 * tunnel. Returns whether it did. */
__noinline int flow_record(struct __sk_buff *skb, const struct flow_note *note)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct flow4_stats *stats;
	struct flow4_entry entry;
	__u16 l4_csum_delta = 0;
	struct l4_ports *ports;
	__u8 l4_csum = 0;
	struct iphdr *ip;
	__u32 mtu = 0;
	/* The pod's packet, inside the outer headers when the datapath encapsulated it. */
	__u32 l3;

	if (!note)
		return false;
	l3 = note->encapsulated ? ETH_HLEN + TUNNEL_OVERHEAD : ETH_HLEN;
	ip = data + l3;
	ports = (void *)(ip + 1);
	/* A packet to another node has no destination entry on this node. */
	if (!note->key.ifindex || !flow_settled(note->source_flags) ||
	    (!note->next_hop && !flow_settled(note->dest_flags)) || !note->ifindex ||
	    (void *)(ports + 1) > data_end)
		return false;
	/* The cached packets compare their length with it (flow_fits): the helper is a
	 * device lookup by index, once per decision instead of once per packet. An
	 * encapsulated packet exceeds the tunnel's MTU by the headers: the helper says so,
	 * and tells the MTU all the same. */
	if (bpf_check_mtu(skb, note->ifindex, &mtu, 0, 0) < 0 || mtu > 0xffff)
		return false;
	/* A packet the kernel received with a complete checksum (a NIC's, bridged into the
	 * pod: forwarding and local sockets never send one) is left to the slow path:
	 * flow_rewrite does not keep skb->csum, and the receiver would take the difference
	 * for a checksum fault. Its flow's packets all are. */
	if (bpf_csum_update(skb, 0) >= 0 ||
	    flow_learn_csum(skb, note, l3, &l4_csum, &l4_csum_delta) < 0)
		return false;
	/* The helper may have moved the data. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip = data + l3;
	ports = (void *)(ip + 1);
	if ((void *)(ports + 1) > data_end)
		return false;
	entry = (struct flow4_entry){
		.decided_jiffies = bpf_jiffies64(),
		.saddr = ip->saddr,
		.daddr = ip->daddr,
		.sport = ports->source,
		.dport = ports->dest,
		.ifindex = note->ifindex,
		.generation = flow_generation_now(),
		.tcp_flags = note->tcp_flags,
		.l4_csum = l4_csum,
		.mtu = mtu,
		.l4_csum_delta = l4_csum_delta,
		.pseudo_base = flow_pseudo_base(&note->key),
		.next_hop = note->next_hop,
		.tunnel = note->tunnel,
	};
	__builtin_memcpy(entry.dmac, note->macs.dest, ETH_ALEN);
	__builtin_memcpy(entry.smac, note->macs.source, ETH_ALEN);
	if (!flow_store(&note->key, &entry))
		return false;
	stats = flow_stats();
	if (stats)
		stats->decided++;
	return true;
}

#endif
