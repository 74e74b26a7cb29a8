/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The flow cache: a packet of an established connection between two pods of this node
 * costs one lookup. from_container looks the packet's tuple up in `flow4`; a decision
 * that still holds (flow_usable) is applied as the slow path would apply it: the
 * rewrite to the tuple the packet entered the destination pod with (service
 * translation and reverse NAT alike), the MACs and TTL host routing writes, the metrics
 * both ends count, and the redirect into the pod. Policy is not consulted: it judges
 * new connections only, and a cached packet never opens one.
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

/* Whether @skb may use the cache, with its tuple in @key and @pkt (as parse_ipv4 fills
 * it) if so: option-less unfragmented IPv4 with a TTL that survives forwarding, UDP or
 * TCP without SYN, FIN or RST (they change conntrack state), headers valid and in the
 * linear data. Anything else, malformed packets included, takes the slow path. */
static __always_inline bool flow_parse(struct __sk_buff *skb, struct flow4_key *key,
				       struct pkt4 *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	struct l4_ports *ports = (void *)(ip + 1);
	struct tcphdr *tcp = (void *)(ip + 1);
	__u32 tot_len, l4_min = sizeof(struct udphdr);
	__u8 flags = 0;

	if (skb->protocol != bpf_htons(ETH_P_IP) || (void *)(tcp + 1) > data_end)
		return false;
	if (ip->version != 4 || ip->ihl != 5 || ip->ttl <= 1 ||
	    (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return false;
	if (ip->protocol == IPPROTO_TCP) {
		flags = ((__u8 *)tcp)[TCP_FLAGS_OFF];
		if (flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST) || tcp->doff < 5)
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
	*pkt = (struct pkt4){
		.saddr = ip->saddr,
		.daddr = ip->daddr,
		.sport = ports->source,
		.dport = ports->dest,
		.proto = ip->protocol,
		.tcp_flags = flags,
		.l4_off = ETH_HLEN + sizeof(struct iphdr),
		.len = skb->len,
		.ifindex = skb->ifindex,
	};
	return true;
}

static __always_inline __u32 flow_generation_now(void)
{
	__u32 zero = 0;
	__u32 *generation = bpf_map_lookup_elem(&flow4_generation, &zero);

	return generation ? *generation : 0;
}

static __always_inline struct flow4_stats *flow_stats(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&flow4_stats, &zero);
}

/* Whether @skb fits the destination veth's MTU as @entry recorded it, as bpf_check_mtu
 * judges without BPF_MTU_CHK_SEGS: a GSO packet is segmented on the way. The stack
 * answers a larger one with ICMP. A changed MTU holds from the next decision on. */
static __always_inline bool flow_fits(struct __sk_buff *skb, const struct flow4_entry *entry)
{
	return skb->len <= (__u32)entry->mtu + ETH_HLEN || skb->gso_size != 0;
}

/* Whether @entry still decides @pkt: made in this generation, young enough, with every
 * TCP flag of @pkt already accounted by the slow path, and @skb within the destination
 * veth's MTU. @now is bpf_jiffies64(). */
static __always_inline bool flow_usable(struct __sk_buff *skb, const struct flow4_entry *entry,
					const struct pkt4 *pkt, __u64 now)
{
	return entry->generation == flow_generation_now() &&
	       now - entry->decided_jiffies < FLOW4_DECISION_JIFFIES &&
	       (pkt->tcp_flags & ~entry->tcp_flags) == 0 && flow_fits(skb, entry);
}

/* Ones' complement arithmetic on raw (memory order) words, as the kernel's csum_add:
 * a checksum and the words it covers are summed alike whatever the byte order. */
static __always_inline __u32 flow_csum_add(__u32 sum, __u32 value)
{
	sum += value;
	return sum + (sum < value);
}

/* @sum plus what replacing @from by @to changes (RFC 1624). */
static __always_inline __u32 flow_csum_replace(__u32 sum, __u32 from, __u32 to)
{
	return flow_csum_add(flow_csum_add(sum, ~from), to);
}

static __always_inline __u16 flow_csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)((sum & 0xffff) + (sum >> 16));
}

/* Whether @a and @b are the same ones' complement number (0 and 0xffff are both zero). */
static __always_inline bool flow_csum_equal(__u16 a, __u16 b)
{
	return a == b || ((__u16)(a ^ b) == 0xffff && (a == 0 || b == 0));
}

/* The pseudo-header sum of @ip's packet, folded as an offload's checksum field holds it
 * (the kernel's ~csum_tcpudp_magic). */
static __always_inline __u16 flow_pseudo_sum(const struct iphdr *ip)
{
	__u32 sum = flow_csum_add(ip->saddr, ip->daddr);

	sum = flow_csum_add(sum, bpf_htons((__u16)ip->protocol));
	sum = flow_csum_add(sum, bpf_htons(bpf_ntohs(ip->tot_len) - sizeof(struct iphdr)));
	return flow_csum_fold(sum);
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
		return flow_csum_equal(check, flow_pseudo_sum(ip));
	default:
		return (check != 0 || ip->protocol != IPPROTO_UDP) &&
		       !flow_csum_equal(check, flow_pseudo_sum(ip));
	}
}

/* Rewrites @pkt's tuple in @skb to @entry's and writes the MACs, the TTL, the IP
 * checksum and the L4 checksum (the change flow_record computed for its kind) as
 * forwarding would, all directly: no helper call. Returns whether it did; when it did
 * not (a checksum of another kind), nothing was written. */
static __always_inline bool flow_rewrite(struct __sk_buff *skb, const struct pkt4 *pkt,
					 const struct flow4_entry *entry)
{
	__u32 addrs = flow_csum_replace(flow_csum_replace(0, pkt->saddr, entry->saddr),
					pkt->daddr, entry->daddr);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	struct l4_ports *ports = (void *)(ip + 1);
	__sum16 *l4_check = data + l4_csum_off(pkt);
	__u32 check;

	if ((void *)(ports + 1) > data_end || (void *)(l4_check + 1) > data_end ||
	    !flow_csum_holds(entry, ip, *l4_check))
		return false;
	if (entry->l4_csum != FLOW4_L4_CSUM_ABSENT) {
		check = flow_csum_fold(flow_csum_add(*l4_check, entry->l4_csum_delta));
		/* Zero would mean no UDP checksum: 0xffff is the same sum (RFC 768). */
		*l4_check = (__sum16)(check || pkt->proto != IPPROTO_UDP ? check : 0xffff);
	}
	__builtin_memcpy(data, entry->dmac, ETH_ALEN);
	__builtin_memcpy(data + ETH_ALEN, entry->smac, ETH_ALEN);
	ip->saddr = entry->saddr;
	ip->daddr = entry->daddr;
	ports->source = entry->sport;
	ports->dest = entry->dport;
	/* The IP checksum is always complete: the addresses' change, then the TTL's, as
	 * flow_write_l2 forwards it. */
	ip->check = (__sum16)~flow_csum_fold(flow_csum_add((__u16)~ip->check, addrs));
	check = ip->check;
	check += bpf_htons(0x0100);
	ip->check = (__sum16)(check + (check >= 0xffff));
	ip->ttl -= 1;
	return true;
}

/* Forwards @skb from the cache when a decision holds for it. Returns the verdict, or -1
 * for the slow path (nothing was changed then); @note starts over with the packet's
 * tuple and TCP flags for flow_record if it may use the cache, else zero. */
__noinline int flow_forward(struct __sk_buff *skb, struct flow_note *note)
{
	struct flow4_entry *entry;
	struct flow4_stats *stats;
	struct pkt4 packet;
	struct pkt4 *pkt = &packet;

	if (!note)
		return -1;
	__builtin_memset(note, 0, sizeof(*note));
	if (!flow_parse(skb, &note->key, pkt))
		return -1;
	note->tcp_flags = pkt->tcp_flags;
	entry = bpf_map_lookup_elem(&flow4, &note->key);
	if (!entry || !flow_usable(skb, entry, pkt, bpf_jiffies64()))
		return -1;
	if (!flow_rewrite(skb, pkt, entry))
		return -1;
	/* What the slow path counts: forwarded out of one pod and into the other. */
	metrics_count(skb, REASON_FORWARDED, METRIC_DIR_EGRESS);
	metrics_count(skb, REASON_FORWARDED, METRIC_DIR_INGRESS);
	stats = flow_stats();
	if (stats)
		stats->hits++;
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

	bpf_map_delete_elem(&flow4, &key);
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
					   __u8 *kind, __u16 *delta)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	struct l4_ports *ports = (void *)(ip + 1);
	bool udp = note->key.proto == IPPROTO_UDP;
	__u32 off = ETH_HLEN + sizeof(struct iphdr) +
		    (udp ? __builtin_offsetof(struct udphdr, check) :
			   __builtin_offsetof(struct tcphdr, check));
	__u64 flags = udp ? BPF_F_MARK_MANGLED_0 : 0;
	__sum16 *field = data + off;
	__u32 addrs, ports_change;
	__u16 before;

	if ((void *)(ports + 1) > data_end || (void *)(field + 1) > data_end)
		return -1;
	addrs = flow_csum_replace(flow_csum_replace(0, note->key.saddr, ip->saddr),
				  note->key.daddr, ip->daddr);
	ports_change = flow_csum_replace(0, (__u32)note->key.sport | (__u32)note->key.dport << 16,
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
		*delta = flow_csum_fold(addrs);
		return 0;
	}
	*kind = FLOW4_L4_CSUM_FULL;
	*delta = (__u16)~flow_csum_fold(flow_csum_add(addrs, ports_change));
	/* The one back: -1, ~1 in ones' complement. */
	return bpf_l4_csum_replace(skb, off, 0, ~1U, flags) < 0 ? -1 : 0;
}

/* Records the slow path's decision on @skb, which left its pod as @note's key and was
 * delivered as @note says: the tuple it now carries, the veth and MACs. Returns whether
 * it did. */
__noinline int flow_record(struct __sk_buff *skb, const struct flow_note *note)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	struct l4_ports *ports = (void *)(ip + 1);
	struct flow4_stats *stats;
	struct flow4_entry entry;
	__u16 l4_csum_delta = 0;
	__u8 l4_csum = 0;
	__u32 mtu = 0;

	if (!note || !note->key.ifindex || !flow_settled(note->source_flags) ||
	    !flow_settled(note->dest_flags) || !note->ifindex || (void *)(ports + 1) > data_end)
		return false;
	/* The cached packets compare their length with it (flow_fits): the helper is a
	 * device lookup by index, once per decision instead of once per packet. */
	if (bpf_check_mtu(skb, note->ifindex, &mtu, 0, 0) < 0 || mtu > 0xffff)
		return false;
	/* A packet the kernel received with a complete checksum (a NIC's, bridged into the
	 * pod: forwarding and local sockets never send one) is left to the slow path:
	 * flow_rewrite does not keep skb->csum, and the receiver would take the difference
	 * for a checksum fault. Its flow's packets all are. */
	if (bpf_csum_update(skb, 0) >= 0 || flow_learn_csum(skb, note, &l4_csum, &l4_csum_delta) < 0)
		return false;
	/* The helper may have moved the data. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip = data + ETH_HLEN;
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
	};
	__builtin_memcpy(entry.dmac, note->macs.dest, ETH_ALEN);
	__builtin_memcpy(entry.smac, note->macs.source, ETH_ALEN);
	if (bpf_map_update_elem(&flow4, &note->key, &entry, BPF_ANY) < 0)
		return false;
	stats = flow_stats();
	if (stats)
		stats->decided++;
	return true;
}

#endif
