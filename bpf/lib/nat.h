/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Address and port rewrites with incremental checksum updates. */
#ifndef SLUICE_NAT_H
#define SLUICE_NAT_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>

#include "parse.h"
#include "sctp.h"

#define IP_CSUM_OFF  (ETH_HLEN + __builtin_offsetof(struct iphdr, check))
#define IP_SADDR_OFF (ETH_HLEN + __builtin_offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF (ETH_HLEN + __builtin_offsetof(struct iphdr, daddr))

/* Source and destination ports sit at the same offsets in TCP, UDP and SCTP. */
static __always_inline __u32 l4_sport_off(const struct pkt4 *pkt)
{
	return pkt->l4_off + __builtin_offsetof(struct tcphdr, source);
}

static __always_inline __u32 l4_dport_off(const struct pkt4 *pkt)
{
	return pkt->l4_off + __builtin_offsetof(struct tcphdr, dest);
}

/* Whether this packet holds a TCP or UDP checksum to update. A later fragment has no
 * L4 header (its datagram's checksum sits in the first fragment, which was updated by
 * the same difference). SCTP's CRC32c covers no IP address, and a changed port cannot
 * be folded into it incrementally: nat_rewrite_port recomputes it (sctp.h). */
static __always_inline bool l4_csum_present(const struct pkt4 *pkt)
{
	return !pkt->later_fragment && (pkt->proto == IPPROTO_TCP || pkt->proto == IPPROTO_UDP);
}

static __always_inline __u32 l4_csum_off(const struct pkt4 *pkt)
{
	if (pkt->proto == IPPROTO_TCP)
		return pkt->l4_off + __builtin_offsetof(struct tcphdr, check);
	return pkt->l4_off + __builtin_offsetof(struct udphdr, check);
}

/* A zero UDP checksum means "none" and must stay zero; a result of zero is
 * written as 0xffff instead (RFC 768). */
static __always_inline __u64 l4_csum_flags(const struct pkt4 *pkt)
{
	return pkt->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* Ones' complement arithmetic on raw (memory order) words, as the kernel's csum_add:
 * a checksum and the words it covers are summed alike whatever the byte order. */
static __always_inline __u32 csum32_add(__u32 sum, __u32 value)
{
	sum += value;
	return sum + (sum < value);
}

/* @sum plus what replacing @from by @to changes (RFC 1624). */
static __always_inline __u32 csum32_replace(__u32 sum, __u32 from, __u32 to)
{
	return csum32_add(csum32_add(sum, ~from), to);
}

static __always_inline __u16 csum32_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)((sum & 0xffff) + (sum >> 16));
}

/* Whether the L4 checksum's share of rewriting @from to @to failed (an address, with
 * BPF_F_PSEUDO_HDR in @flags as it sits in the pseudo-header, or a port). Common to the
 * helper and the direct rewrites: always through the kernel's helper, which alone knows
 * whether the field holds a complete checksum or an offload's pseudo-header sum. */
static __always_inline bool nat_l4_csum_failed(struct __sk_buff *skb, const struct pkt4 *pkt,
					       __be32 from, __be32 to, __u64 flags)
{
	return l4_csum_present(pkt) &&
	       bpf_l4_csum_replace(skb, l4_csum_off(pkt), from, to,
				   flags | l4_csum_flags(pkt)) < 0;
}

/* Rewrites the IPv4 address at @off (IP_SADDR_OFF or IP_DADDR_OFF). The address is
 * part of the L4 pseudo-header, hence BPF_F_PSEUDO_HDR on the L4 update. */
static __always_inline int nat_rewrite_addr(struct __sk_buff *skb, const struct pkt4 *pkt,
					    __u32 off, __be32 old_addr, __be32 new_addr)
{
	if (old_addr == new_addr)
		return 0;
	if (nat_l4_csum_failed(skb, pkt, old_addr, new_addr,
			       BPF_F_PSEUDO_HDR | sizeof(new_addr)))
		return -1;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, &new_addr, sizeof(new_addr), 0);
}

/* The port rewrite of TCP and UDP, whose checksum takes it incrementally. */
static __always_inline int nat_rewrite_port_csum(struct __sk_buff *skb, const struct pkt4 *pkt,
						 __u32 off, __be16 old_port, __be16 new_port)
{
	if (nat_l4_csum_failed(skb, pkt, old_port, new_port, sizeof(new_port)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new_port, sizeof(new_port), 0);
}

/*
 * The direct flavours of nat_rewrite_addr and nat_rewrite_port, for the programs that
 * write packet data directly anyway (host routing's flow_write_l2 in from_container,
 * from_netdev and from_tunnel): the verifier's prologue has made their linear data
 * writable before they run, so the address, the port and the IP checksum are plain
 * stores, and only the L4 checksum goes through the kernel's helper
 * (nat_l4_csum_failed). That is two helper calls fewer per address and one per port,
 * about 40 ns each on this machine's CPU. to_container shares endpoint_ingress and so
 * writes directly too, which costs it the prologue on a cloned packet: it only sees what
 * the node's stack routes into a pod. A program that passes most packets unchanged and
 * writes none directly (to_netdev) keeps the helpers: the prologue would cost every
 * cloned packet it sees.
 */

/* nat_rewrite_addr, written directly. Out of line, as is nat_write_port: one
 * copy instead of one at each of from_container's call sites (cost.rs holds its size).
 * Unused where only reject.h needs this header (sock.c), as is nat_write_port. */
static __noinline __attribute__((unused)) int
nat_rewrite_addr_direct(struct __sk_buff *skb, const struct pkt4 *pkt, __u32 off,
			__be32 old_addr, __be32 new_addr)
{
	void *data, *data_end;
	struct iphdr *ip;

	if (old_addr == new_addr)
		return 0;
	if (nat_l4_csum_failed(skb, pkt, old_addr, new_addr,
			       BPF_F_PSEUDO_HDR | sizeof(new_addr)))
		return -1;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return -1;
	if (off == IP_SADDR_OFF)
		ip->saddr = new_addr;
	else
		ip->daddr = new_addr;
	ip->check = (__sum16)~csum32_fold(csum32_replace((__u16)~ip->check, old_addr, new_addr));
	return 0;
}

/* nat_rewrite_port_csum, written directly: out of line, and without SCTP's CRC32c
 * subprograms below it, which would take the caller's call chain past the verifier's
 * 512 bytes of stack (from_netdev's). */
static __noinline __attribute__((unused)) int
nat_write_port(struct __sk_buff *skb, const struct pkt4 *pkt, __u32 off, __be16 old_port,
	       __be16 new_port)
{
	void *data, *data_end;
	__be16 *port;

	if (nat_l4_csum_failed(skb, pkt, old_port, new_port, sizeof(new_port)))
		return -1;
	/* An IP header is at most 60 bytes: the bound lets the verifier check the store. */
	if (off > ETH_HLEN + 60 + __builtin_offsetof(struct tcphdr, dest))
		return -1;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	port = data + off;
	if ((void *)(port + 1) > data_end)
		return -1;
	*port = new_port;
	return 0;
}

/* Rewrites the port at @off (l4_sport_off or l4_dport_off); ports are not in the
 * pseudo-header. A later fragment has no port to rewrite. @direct (a constant at each
 * call): written directly (nat_write_port) rather than by the helpers. */
static __always_inline int nat_rewrite_port(struct __sk_buff *skb, const struct pkt4 *pkt,
					    __u32 off, __be16 old_port, __be16 new_port,
					    const bool direct)
{
	if (old_port == new_port || pkt->later_fragment)
		return 0;
	if ((direct ? nat_write_port(skb, pkt, off, old_port, new_port) :
		      nat_rewrite_port_csum(skb, pkt, off, old_port, new_port)) < 0)
		return -1;
	if (pkt->proto == IPPROTO_SCTP)
		return sctp_csum_update(skb, pkt->l4_off);
	return 0;
}

/* Rewrites the identifier of an ICMP echo request or reply, its "port" (both ports of
 * pkt4). The ICMP checksum covers no pseudo-header; a later fragment has no header. */
static __always_inline int nat_rewrite_echo_id(struct __sk_buff *skb, const struct pkt4 *pkt,
					       __be16 old_id, __be16 new_id)
{
	__u32 off = pkt->l4_off + __builtin_offsetof(struct icmp4_echo, id);

	if (old_id == new_id || pkt->later_fragment)
		return 0;
	if (bpf_l4_csum_replace(skb, pkt->l4_off + __builtin_offsetof(struct icmp4_echo, checksum),
				old_id, new_id, sizeof(new_id)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, &new_id, sizeof(new_id), 0);
}

/* Swaps the Ethernet addresses so a frame turned around towards its sender is
 * addressed to it (the pod drops frames not sent to its own MAC). */
static __always_inline int eth_swap_macs(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u8 tmp[ETH_ALEN];

	if ((void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
	return 0;
}

#endif
