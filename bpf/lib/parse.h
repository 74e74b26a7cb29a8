/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Ethernet + IPv4 + TCP/UDP/SCTP/ICMP echo header parsing with bounds-checked direct
 * packet access; later fragments take their ports from their first fragment (frag.h). */
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

#include "frag.h"

/* Not in the uapi headers (they live in include/net/ip.h). */
#define IP_MF     0x2000
#define IP_OFFSET 0x1fff

/* TCP flags as they appear in byte 13 of the header (and in ct4_entry.tcp_flags_seen). */
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10
#define TCP_FLAGS_OFF 13

/* <linux/icmp.h> includes glibc's <sys/socket.h> (through <linux/if.h>), which does
 * not build for the BPF target, so the values used are repeated here. */
#define ICMP_ECHOREPLY     0
#define ICMP_DEST_UNREACH  3
#define ICMP_SOURCE_QUENCH 4
#define ICMP_REDIRECT      5
#define ICMP_ECHO          8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12

/* The SCTP common header is 12 bytes; its ports sit where TCP's and UDP's do. */
#define SCTP_HDR_LEN 12

/* The start of every L4 header with ports (TCP, UDP, SCTP). */
struct l4_ports {
	__be16 source;
	__be16 dest;
};

/* An ICMP echo request or reply header. */
struct icmp4_echo {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 id;
	__be16 sequence;
};

/* The headers of an IPv4 packet of a connection, addresses and ports in network order.
 * ICMP echo uses its identifier as both ports, so the reversed tuple of a request is
 * its reply's; other ICMP messages and protocols without ports have ports 0, so they
 * are tracked (and judged) per address pair and protocol. */
struct pkt4 {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;      /* 0 for other protocols and for later fragments */
	__u16 l4_off;        /* from the start of the Ethernet header */
	__u32 len;           /* skb->len, for counters */
	__u32 ifindex;       /* the endpoint's interface events and policy name: skb's own,
			      * or a pod's lxc when a node device's program delivers into it */
	bool later_fragment; /* no L4 header here: ports came from frag4, nothing L4 to rewrite */
};

enum parse_result {
	PARSE_L4,             /* a connection's packet: pkt is filled in */
	PARSE_IPV4,           /* IPv4 with nothing to track (ICMP errors): addresses filled in */
	PARSE_ARP,            /* ARP, which IPv4 needs: passes */
	PARSE_UNSUPPORTED_L3, /* IPv6 (until it is supported) and every other L3: drop */
	PARSE_INVALID,        /* malformed: drop */
	PARSE_FRAG_NOT_FOUND, /* later fragment whose first fragment was not seen: drop */
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

/* Protocols whose header names the connection (ports, or the ICMP echo identifier). */
static __always_inline bool l4_has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP ||
	       proto == IPPROTO_ICMP;
}

/* ICMP errors quote a packet of a connection of their own; they pass unjudged. */
static __always_inline bool icmp_is_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_SOURCE_QUENCH || type == ICMP_REDIRECT ||
	       type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

static __always_inline enum parse_result parse_ipv4(struct __sk_buff *skb, struct pkt4 *pkt)
{
	void *data, *data_end;
	struct iphdr *ip;
	__u32 ip_len, tot_len, l4_min;
	__be16 frag_off, ip_id;
	__u8 *l4;

	/* A malformed packet's drop event carries what was parsed before the fault. */
	*pkt = (struct pkt4){ .len = skb->len, .ifindex = skb->ifindex };
	/* skb->protocol comes from the Ethernet header. Nothing passes unjudged but ARP:
	 * an IPv6 packet would bypass policy and services, so it is dropped until the
	 * datapath handles IPv6. */
	if (skb->protocol == bpf_htons(ETH_P_ARP))
		return PARSE_ARP;
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return PARSE_UNSUPPORTED_L3;
	if (!pkt_make_linear(skb, ETH_HLEN + sizeof(struct iphdr)))
		return PARSE_INVALID;

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return PARSE_INVALID;
	pkt->saddr = ip->saddr;
	pkt->daddr = ip->daddr;
	pkt->proto = ip->protocol;
	if (ip->version != 4 || ip->ihl < 5)
		return PARSE_INVALID;

	ip_len = ip->ihl * 4;
	tot_len = bpf_ntohs(ip->tot_len);
	/* BIG TCP GSO packets over 64 KiB carry tot_len 0; the skb length is authoritative. */
	if (tot_len == 0 && skb->gso_size)
		tot_len = skb->len - ETH_HLEN;
	if (tot_len < ip_len || tot_len > skb->len - ETH_HLEN)
		return PARSE_INVALID;

	pkt->l4_off = ETH_HLEN + ip_len;
	frag_off = ip->frag_off;
	ip_id = ip->id;

	if (!l4_has_ports(pkt->proto)) {
		pkt->later_fragment = frag_off & bpf_htons(IP_OFFSET);
		return PARSE_L4;
	}
	if (frag_off & bpf_htons(IP_OFFSET)) {
		if (!frag4_ports_of(pkt->saddr, pkt->daddr, ip_id, pkt->proto, &pkt->sport,
				    &pkt->dport))
			return PARSE_FRAG_NOT_FOUND;
		pkt->later_fragment = true;
		return PARSE_L4;
	}

	if (pkt->proto == IPPROTO_TCP)
		l4_min = sizeof(struct tcphdr);
	else if (pkt->proto == IPPROTO_SCTP)
		l4_min = SCTP_HDR_LEN;
	else /* UDP, ICMP */
		l4_min = 8;

	/* A first fragment too short for the L4 header would hide its ports. */
	if (tot_len < ip_len + l4_min)
		return PARSE_INVALID;
	if (!pkt_make_linear(skb, ETH_HLEN + ip_len + l4_min))
		return PARSE_INVALID;

	/* The pull may have moved the data: reload and check again. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	l4 = data + ETH_HLEN + ip_len;
	if (pkt->proto == IPPROTO_ICMP) {
		struct icmp4_echo *icmp = (struct icmp4_echo *)l4;

		if ((void *)(icmp + 1) > data_end)
			return PARSE_INVALID;
		if (icmp_is_error(icmp->type))
			return PARSE_IPV4;
		if (icmp->type == ICMP_ECHO || icmp->type == ICMP_ECHOREPLY) {
			pkt->sport = icmp->id;
			pkt->dport = icmp->id;
		}
	} else {
		struct l4_ports *ports = (struct l4_ports *)l4;

		if ((void *)(ports + 1) > data_end)
			return PARSE_INVALID;
		pkt->sport = ports->source;
		pkt->dport = ports->dest;
		if (pkt->proto == IPPROTO_TCP) {
			struct tcphdr *tcp = (struct tcphdr *)l4;

			if ((void *)(tcp + 1) > data_end)
				return PARSE_INVALID;
			if (tcp->doff < 5 || ip_len + tcp->doff * 4 > tot_len)
				return PARSE_INVALID;
			pkt->tcp_flags = l4[TCP_FLAGS_OFF];
		}
	}

	if (frag_off & bpf_htons(IP_MF))
		frag4_record(pkt->saddr, pkt->daddr, ip_id, pkt->proto, pkt->sport, pkt->dport);
	return PARSE_L4;
}

/* Where an ICMP error's quoted packet sits: the ICMP header (8 bytes: type, code,
 * checksum, 4 more) at pkt->l4_off, then the quoted IP header, then its L4 header. */
#define ICMP_HDR_LEN    8
#define ICMP_QUOTED_L4  8 /* the L4 bytes RFC 792 guarantees: the ports and, for UDP, the checksum */

/* The packet an ICMP error quotes (@pkt is the error, PARSE_IPV4 from parse_ipv4): its
 * tuple as its sender sent it into *@quoted, l4_off naming the quoted L4 header.
 * Returns whether the error quotes an option-less IPv4 header of a protocol with ports
 * (TCP, UDP, SCTP) or of an ICMP echo (its identifier as both ports) with at least its
 * first 8 L4 bytes; other errors carry nothing to translate. */
static __always_inline bool parse_icmp_quote(struct __sk_buff *skb, const struct pkt4 *pkt,
					     struct pkt4 *quoted)
{
	__u32 ip_off = pkt->l4_off + ICMP_HDR_LEN;
	void *data, *data_end;
	struct icmp4_echo *echo;
	struct l4_ports *ports;
	struct iphdr *ip;
	__u8 *icmp;

	if (pkt->proto != IPPROTO_ICMP || pkt->l4_off != ETH_HLEN + sizeof(struct iphdr))
		return false;
	if (!pkt_make_linear(skb, ETH_HLEN + sizeof(struct iphdr) + ICMP_HDR_LEN +
				       sizeof(struct iphdr) + ICMP_QUOTED_L4))
		return false;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	icmp = data + ETH_HLEN + sizeof(struct iphdr);
	ip = data + ETH_HLEN + sizeof(struct iphdr) + ICMP_HDR_LEN;
	ports = (void *)(ip + 1);
	echo = (void *)(ip + 1);
	if ((void *)(echo + 1) > data_end || (void *)(icmp + ICMP_HDR_LEN) > data_end)
		return false;
	if (!icmp_is_error(icmp[0]) || ip->version != 4 || ip->ihl != 5)
		return false;
	/* A quoted later fragment holds no ports. */
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return false;
	*quoted = (struct pkt4){
		.saddr = ip->saddr,
		.daddr = ip->daddr,
		.sport = ports->source,
		.dport = ports->dest,
		.proto = ip->protocol,
		.l4_off = ip_off + sizeof(struct iphdr),
		.len = pkt->len,
		.ifindex = pkt->ifindex,
	};
	if (ip->protocol == IPPROTO_ICMP) {
		if (echo->type != ICMP_ECHO && echo->type != ICMP_ECHOREPLY)
			return false;
		quoted->sport = echo->id;
		quoted->dport = echo->id;
		return true;
	}
	return ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP ||
	       ip->protocol == IPPROTO_SCTP;
}

#endif
