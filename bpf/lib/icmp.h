/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Reverse NAT of ICMP errors about translated connections: a backend's (or a router's)
 * port unreachable or fragmentation needed quotes the packet as the backend received it,
 * but the client's kernel matches an error to its socket by the quoted header, which
 * must name the frontend the client sent to (service and external frontends) and the
 * client's own address and port (SNAT: nodeport.h, masquerade.h). */
#ifndef SLUICE_ICMP_H
#define SLUICE_ICMP_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "nat.h"
#include "parse.h"
#include "reject.h"

/* The ICMP header and the quoted headers, as rewritten: 8 + 20 + 8 bytes, a multiple of
 * four as bpf_csum_diff wants. */
struct icmp4_quote_hdrs {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 rest;
	struct iphdr ip;
	/* A quoted ICMP echo has its type and code, checksum, identifier and sequence here. */
	__be16 sport;
	__be16 dport;
	__be16 l4_word; /* UDP: length; TCP and SCTP: part of the sequence number or tag */
	__sum16 udp_check;
};

/* The quoted packet's addresses and ports, laid out in 32-bit words for bpf_csum_diff.
 * All of it is covered by a quoted UDP or TCP checksum (the addresses through the
 * pseudo-header), so one difference updates that checksum for any translation. */
struct icmp_quote_tuple {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
};

/* A 16-bit one's complement checksum @check updated for @from becoming @to. */
static __always_inline __sum16 csum_update(__sum16 check, const struct icmp_quote_tuple *from,
					   const struct icmp_quote_tuple *to)
{
	return csum_fold(bpf_csum_diff((__be32 *)from, sizeof(*from), (__be32 *)to, sizeof(*to),
				       (__u16)~check));
}

/* Rewrites the ICMP error @pkt quoting @quoted so that the quote reads @to: the quoted
 * addresses and ports (quoted IP checksum recomputed, quoted UDP or TCP checksum
 * updated where the quote holds it), the ICMP checksum following. The outer header
 * follows the quote: an error the quoted destination sent itself comes from @to's
 * destination, and the error goes to @to's source. Returns 0 or -1. */
static __always_inline int icmp_error_nat(struct __sk_buff *skb, const struct pkt4 *pkt,
					  const struct pkt4 *quoted,
					  const struct icmp_quote_tuple *to)
{
	struct icmp_quote_tuple from = {
		.saddr = quoted->saddr,
		.daddr = quoted->daddr,
		.sport = quoted->sport,
		.dport = quoted->dport,
	};
	struct icmp4_quote_hdrs old, new;
	__u32 tcp_check_off = quoted->l4_off + 16; /* offsetof(struct tcphdr, check) */
	__sum16 old_check;
	__be16 tcp_check;

	if (bpf_skb_load_bytes(skb, pkt->l4_off, &old, sizeof(old)) < 0)
		return -1;
	new = old;
	new.ip.saddr = to->saddr;
	new.ip.daddr = to->daddr;
	new.ip.check = 0;
	new.ip.check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&new.ip, sizeof(new.ip), 0));
	if (quoted->proto == IPPROTO_ICMP) {
		/* An echo's identifier (its source's) is both its ports; the echo's checksum
		 * covers no pseudo-header, only the identifier changes under it. */
		struct icmp_quote_tuple was = { .sport = old.l4_word };
		struct icmp_quote_tuple now = { .sport = to->sport };

		new.l4_word = to->sport;
		new.dport = csum_update(old.dport, &was, &now);
	} else {
		new.sport = to->sport;
		new.dport = to->dport;
	}
	/* A zero UDP checksum means none and stays zero; a computed zero is sent as 0xffff. */
	if (quoted->proto == IPPROTO_UDP && old.udp_check) {
		new.udp_check = csum_update(old.udp_check, &from, to);
		if (!new.udp_check)
			new.udp_check = 0xffff;
	}

	old_check = old.checksum;
	old.checksum = 0;
	new.checksum = 0;
	new.checksum = csum_fold(bpf_csum_diff((__be32 *)&old, sizeof(old), (__be32 *)&new,
					       sizeof(new), (__u16)~old_check));

	/* TCP's checksum lies past the 8 bytes every error quotes; Linux quotes more. The
	 * field is one more word under the ICMP checksum, which follows its change. */
	if (quoted->proto == IPPROTO_TCP && tcp_check_off + sizeof(tcp_check) <= skb->len &&
	    bpf_skb_load_bytes(skb, tcp_check_off, &tcp_check, sizeof(tcp_check)) == 0) {
		struct icmp_quote_tuple was = { .sport = tcp_check };
		struct icmp_quote_tuple now = { .sport = csum_update(tcp_check, &from, to) };

		new.checksum = csum_update(new.checksum, &was, &now);
		if (bpf_skb_store_bytes(skb, tcp_check_off, &now.sport, sizeof(now.sport), 0) < 0)
			return -1;
	}

	if (bpf_skb_store_bytes(skb, pkt->l4_off, &new, sizeof(new), 0) < 0)
		return -1;
	if (pkt->saddr == quoted->daddr &&
	    nat_rewrite_addr(skb, pkt, IP_SADDR_OFF, pkt->saddr, to->daddr) < 0)
		return -1;
	if (pkt->daddr == quoted->saddr)
		return nat_rewrite_addr(skb, pkt, IP_DADDR_OFF, pkt->daddr, to->saddr);
	return 0;
}

/* The ICMP error @pkt, quoting @quoted, a packet the client sent to the backend
 * @quoted->daddr through the frontend @frontend:@frontend_port: the quote names the
 * frontend again (and an error the backend itself sent comes from the frontend).
 * Returns 0 or -1. */
static __always_inline int icmp_error_rev_nat(struct __sk_buff *skb, const struct pkt4 *pkt,
					      const struct pkt4 *quoted, __be32 frontend,
					      __be16 frontend_port)
{
	struct icmp_quote_tuple to = {
		.saddr = quoted->saddr,
		.daddr = frontend,
		.sport = quoted->sport,
		.dport = frontend_port,
	};

	return icmp_error_nat(skb, pkt, quoted, &to);
}

#endif
