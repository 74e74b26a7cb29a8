/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Ethernet + IPv4 + TCP/UDP header parsing with bounds-checked direct packet access. */
#ifndef SLUICE_PARSE_H
#define SLUICE_PARSE_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Not in the uapi headers (they live in include/net/ip.h). */
#define IP_MF     0x2000
#define IP_OFFSET 0x1fff

/* TCP flags as they appear in byte 13 of the header (and in ct4_entry.tcp_flags_seen). */
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10
#define TCP_FLAGS_OFF 13

/* The headers of an IPv4 TCP/UDP packet, addresses and ports in network order. */
struct pkt4 {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags; /* 0 for UDP */
	__u16 l4_off;   /* from the start of the Ethernet header */
	__u32 len;      /* skb->len, for counters */
};

enum parse_result {
	PARSE_L4,      /* IPv4 TCP/UDP with its ports: pkt is filled in */
	PARSE_OTHER,   /* not ours to handle (other L3/L4, non-first fragment): pass */
	PARSE_INVALID, /* malformed: drop */
};

/* Makes the first @len bytes reachable by direct packet access. Callers still
 * bounds-check their pointers, which the verifier needs anyway. */
static __always_inline bool pkt_make_linear(struct __sk_buff *skb, __u32 len)
{
	if ((void *)(long)skb->data + len <= (void *)(long)skb->data_end)
		return true;
	/* Headers can sit in paged data (GRO, small linear area). */
	if (len > skb->len || bpf_skb_pull_data(skb, len) < 0)
		return false;
	return (void *)(long)skb->data + len <= (void *)(long)skb->data_end;
}

static __always_inline bool tcp_pure_syn(const struct pkt4 *pkt)
{
	return pkt->proto == IPPROTO_TCP &&
	       (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

static __always_inline enum parse_result parse_ipv4(struct __sk_buff *skb, struct pkt4 *pkt)
{
	void *data, *data_end;
	struct iphdr *ip;
	__u32 ip_len, tot_len, l4_min;
	__u8 *l4;

	/* skb->protocol comes from the Ethernet header (ARP, IPv6 and others pass). */
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return PARSE_OTHER;
	if (!pkt_make_linear(skb, ETH_HLEN + sizeof(struct iphdr)))
		return PARSE_INVALID;

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return PARSE_INVALID;
	if (ip->version != 4 || ip->ihl < 5)
		return PARSE_INVALID;

	ip_len = ip->ihl * 4;
	tot_len = bpf_ntohs(ip->tot_len);
	/* BIG TCP GSO packets over 64 KiB carry tot_len 0; the skb length is authoritative. */
	if (tot_len == 0 && skb->gso_size)
		tot_len = skb->len - ETH_HLEN;
	if (tot_len < ip_len || tot_len > skb->len - ETH_HLEN)
		return PARSE_INVALID;

	/* Later fragments carry no L4 header; fragment tracking is not implemented yet. */
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return PARSE_OTHER;

	pkt->saddr = ip->saddr;
	pkt->daddr = ip->daddr;
	pkt->proto = ip->protocol;
	pkt->tcp_flags = 0;
	pkt->l4_off = ETH_HLEN + ip_len;
	pkt->len = skb->len;

	if (pkt->proto == IPPROTO_TCP)
		l4_min = sizeof(struct tcphdr);
	else if (pkt->proto == IPPROTO_UDP)
		l4_min = sizeof(struct udphdr);
	else
		return PARSE_OTHER;

	if (tot_len < ip_len + l4_min)
		return PARSE_INVALID;
	if (!pkt_make_linear(skb, ETH_HLEN + ip_len + l4_min))
		return PARSE_INVALID;

	/* The pull may have moved the data: reload and check again. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	l4 = data + ETH_HLEN + ip_len;
	if (pkt->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = (struct tcphdr *)l4;

		if ((void *)(tcp + 1) > data_end)
			return PARSE_INVALID;
		if (tcp->doff < 5 || ip_len + tcp->doff * 4 > tot_len)
			return PARSE_INVALID;
		pkt->sport = tcp->source;
		pkt->dport = tcp->dest;
		pkt->tcp_flags = l4[TCP_FLAGS_OFF];
	} else {
		struct udphdr *udp = (struct udphdr *)l4;

		if ((void *)(udp + 1) > data_end)
			return PARSE_INVALID;
		pkt->sport = udp->source;
		pkt->dport = udp->dest;
	}
	return PARSE_L4;
}

#endif
