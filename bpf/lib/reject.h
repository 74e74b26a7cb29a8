/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Turning a packet back to its sender as ICMP destination unreachable: port unreachable
 * for a service without backends, fragmentation needed for a DF packet the path to
 * another node cannot carry; or, for a TCP segment from outside the node, as a TCP RST. */
#ifndef SLUICE_REJECT_H
#define SLUICE_REJECT_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "nat.h"
#include "parse.h"

/* Not from <linux/icmp.h>, for the reason given in parse.h (ICMP_DEST_UNREACH is there). */
#define ICMP_PORT_UNREACH 3
#define ICMP_FRAG_NEEDED  4

#define REJECT_TTL 64

/* The ICMP message: header, then the offending IP header and the first 8 bytes
 * of its payload (RFC 792). No padding: 8 + 20 + 8 bytes. */
struct icmp4_unreach {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 unused;
	__be16 mtu; /* next-hop MTU of fragmentation needed (RFC 1191); 0 otherwise */
	struct iphdr quoted_ip;
	__u8 quoted_l4[8];
};

#define REJECT_LEN (ETH_HLEN + sizeof(struct iphdr) + sizeof(struct icmp4_unreach))

static __always_inline __sum16 csum_fold(__s64 csum)
{
	__u32 sum = (__u32)csum;

	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__sum16)~sum;
}

/* Rewrites @pkt in place into an ICMP destination unreachable with @code (and @mtu
 * for fragmentation needed) from its destination back to its sender, ready to be
 * redirected to the sender. Only option-less IP headers are quoted (the caller drops
 * others). Returns 0 or a negative value when a helper failed. */
static __always_inline int reject_unreachable(struct __sk_buff *skb, const struct pkt4 *pkt,
					      __u8 code, __u16 mtu)
{
	struct icmp4_unreach msg = {};
	struct iphdr ip = {};
	void *data, *data_end;

	if (pkt->l4_off != ETH_HLEN + sizeof(struct iphdr))
		return -1;

	/* parse_ipv4 made the IP header and at least 8 bytes of L4 linear. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + ETH_HLEN + sizeof(struct iphdr) + sizeof(msg.quoted_l4) > data_end)
		return -1;
	__builtin_memcpy(&msg.quoted_ip, data + ETH_HLEN, sizeof(msg.quoted_ip));
	__builtin_memcpy(msg.quoted_l4, data + ETH_HLEN + sizeof(struct iphdr), sizeof(msg.quoted_l4));

	if (eth_swap_macs(skb) < 0)
		return -1;
	/* Trim (or pad, for a bare UDP header) to exactly the reply. */
	if (bpf_skb_change_tail(skb, REJECT_LEN, 0) < 0)
		return -1;

	msg.type = ICMP_DEST_UNREACH;
	msg.code = code;
	msg.mtu = bpf_htons(mtu);
	msg.checksum = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&msg, sizeof(msg), 0));

	ip.version = 4;
	ip.ihl = sizeof(struct iphdr) / 4;
	ip.tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(msg));
	ip.ttl = REJECT_TTL;
	ip.protocol = IPPROTO_ICMP;
	ip.saddr = pkt->daddr;
	ip.daddr = pkt->saddr;
	ip.check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&ip, sizeof(ip), 0));

	if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &msg, sizeof(msg), 0);
}

/* A packet to a service without backends, from the service address back to the
 * client: Linux reports it as ECONNREFUSED to TCP connect() and to connected UDP
 * sockets. */
static __always_inline int reject_port_unreachable(struct __sk_buff *skb, const struct pkt4 *pkt)
{
	return reject_unreachable(skb, pkt, ICMP_PORT_UNREACH, 0);
}

/* The TCP pseudo-header the RST's checksum covers (RFC 9293 3.1). */
struct tcp4_pseudo {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len;
};

#define RESET_LEN (ETH_HLEN + sizeof(struct iphdr) + sizeof(struct tcphdr))

/* Rewrites the TCP segment @pkt in place into the RST that refuses it, from its
 * destination back to its sender (RFC 9293 3.10.7.1: a segment with ACK gets
 * <SEQ=SEG.ACK><CTL=RST>, one without gets <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>).
 * The caller drops an incoming RST instead. Returns 0 or a negative value. */
static __always_inline int reject_tcp_reset(struct __sk_buff *skb, const struct pkt4 *pkt)
{
	struct tcp4_pseudo pseudo = {};
	struct tcphdr in, out = {};
	struct iphdr ip = {};
	__u32 seg_len;
	__s64 csum;

	if (pkt->l4_off != ETH_HLEN + sizeof(struct iphdr) || pkt->later_fragment)
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 ||
	    bpf_skb_load_bytes(skb, pkt->l4_off, &in, sizeof(in)) < 0)
		return -1;
	/* SYN and FIN take a sequence number each. */
	seg_len = bpf_ntohs(ip.tot_len) - sizeof(ip) - in.doff * 4 + in.syn + in.fin;

	out.source = in.dest;
	out.dest = in.source;
	out.doff = sizeof(out) / 4;
	out.rst = 1;
	if (in.ack) {
		out.seq = in.ack_seq;
	} else {
		out.ack = 1;
		out.ack_seq = bpf_htonl(bpf_ntohl(in.seq) + seg_len);
	}
	pseudo.saddr = pkt->daddr;
	pseudo.daddr = pkt->saddr;
	pseudo.proto = IPPROTO_TCP;
	pseudo.len = bpf_htons(sizeof(out));
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&pseudo, sizeof(pseudo), 0);
	if (csum < 0)
		return -1;
	out.check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&out, sizeof(out), csum));

	ip = (struct iphdr){
		.version = 4,
		.ihl = sizeof(struct iphdr) / 4,
		.tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(out)),
		.ttl = REJECT_TTL,
		.protocol = IPPROTO_TCP,
		.saddr = pkt->daddr,
		.daddr = pkt->saddr,
	};
	ip.check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&ip, sizeof(ip), 0));

	if (eth_swap_macs(skb) < 0 || bpf_skb_change_tail(skb, RESET_LEN, 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &out, sizeof(out), 0);
}

#endif
