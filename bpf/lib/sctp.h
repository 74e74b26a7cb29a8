/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* SCTP's checksum: CRC32c over the whole packet (RFC 4960 appendix B). It covers the
 * ports but no IP address, and unlike the Internet checksum it cannot be updated for a
 * changed field: a port rewrite recomputes it. */
#ifndef SLUICE_SCTP_H
#define SLUICE_SCTP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "parse.h"

#define SCTP_CSUM_OFF 8 /* in the common header, after the ports and the verification tag */

/* Bytes read from the packet at once, and how many such chunks a packet may have: 4 KiB,
 * more than an MTU-sized packet (larger ones are GSO, whose segments get their CRC when
 * they are cut). */
#define SCTP_CRC_CHUNK      64
#define SCTP_CRC_MAX_CHUNKS 64

/* One byte into the reflected CRC32c (polynomial 0x1EDC6F41, reversed 0x82F63B78), four
 * bits at a time: @table[i] is the CRC of the nibble i. A 16-entry table is 64 bytes of
 * constant data (the object's .rodata); a byte-wide one would take 1 KiB. */
static __always_inline __u32 crc32c_byte(const __u32 *table, __u32 crc, __u8 byte)
{
	crc ^= byte;
	crc = (crc >> 4) ^ table[crc & 0xf];
	return (crc >> 4) ^ table[crc & 0xf];
}

/* CRC32c of the @len bytes of @skb at @off, into *@crc (as the value, not yet in wire
 * order). A global function: the verifier checks its loops once, not at every caller.
 * Returns 0, or -1 when the bytes cannot be read or exceed the bound. */
__noinline int sctp_crc32c(struct __sk_buff *skb, __u32 off, __u32 len, __u32 *crc)
{
	const __u32 table[16] = {
		0x00000000, 0x105ec76f, 0x20bd8ede, 0x30e349b1, 0x417b1dbc, 0x5125dad3,
		0x61c69362, 0x7198540d, 0x82f63b78, 0x92a8fc17, 0xa24bb5a6, 0xb21572c9,
		0xc38d26c4, 0xd3d3e1ab, 0xe330a81a, 0xf36e6f75,
	};
	__u8 buf[SCTP_CRC_CHUNK];
	__u32 sum = 0xffffffff;
	__u32 done = 0;
	__u32 rest;
	int c, i;

	if (!crc)
		return -1;
	/* Whole chunks: a fixed inner loop, so the verifier walks each chunk once. Loops stay
	 * loops: unrolled, they would add a thousand instructions to every program. */
#pragma clang loop unroll(disable)
	for (c = 0; c < SCTP_CRC_MAX_CHUNKS; c++) {
		if (len - done < SCTP_CRC_CHUNK || done >= len)
			break;
		if (bpf_skb_load_bytes(skb, off + done, buf, SCTP_CRC_CHUNK) < 0)
			return -1;
#pragma clang loop unroll(disable)
		for (i = 0; i < SCTP_CRC_CHUNK; i++)
			sum = crc32c_byte(table, sum, buf[i]);
		done += SCTP_CRC_CHUNK;
	}
	if (done > len)
		return -1;
	rest = len - done;
	if (rest >= SCTP_CRC_CHUNK)
		return -1;
	if (rest) {
		if (bpf_skb_load_bytes(skb, off + done, buf, rest) < 0)
			return -1;
#pragma clang loop unroll(disable)
		for (i = 0; i < SCTP_CRC_CHUNK - 1; i++) {
			if (i >= rest)
				break;
			sum = crc32c_byte(table, sum, buf[i]);
		}
	}
	*crc = ~sum;
	return 0;
}

/* Recomputes the CRC32c of the SCTP packet whose header starts at @l4_off, after its ports
 * were rewritten. A GSO packet is left alone: the kernel computes each segment's CRC
 * when it cuts them. So is the first fragment of a fragmented packet, whose CRC covers
 * bytes this packet does not hold (SCTP fragments into chunks itself; IP fragments of it
 * are not expected). A global function, so its code is not repeated at every port
 * rewrite. Returns 0 or -1. */
__noinline int sctp_csum_update(struct __sk_buff *skb, __u32 l4_off)
{
	__u32 zero = 0, crc;
	struct iphdr ip;
	__u8 wire[4];
	__u32 len;

	if (skb->gso_size)
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.frag_off & bpf_htons(IP_MF))
		return 0;
	len = bpf_ntohs(ip.tot_len);
	if (l4_off < ETH_HLEN || len < l4_off - ETH_HLEN)
		return -1;
	len -= l4_off - ETH_HLEN;
	/* The checksum is computed with its own field zero. */
	if (bpf_skb_store_bytes(skb, l4_off + SCTP_CSUM_OFF, &zero, sizeof(zero), 0) < 0)
		return -1;
	if (sctp_crc32c(skb, l4_off, len, &crc) < 0)
		return -1;
	/* On the wire the CRC's least significant byte comes first. */
	wire[0] = crc;
	wire[1] = crc >> 8;
	wire[2] = crc >> 16;
	wire[3] = crc >> 24;
	return bpf_skb_store_bytes(skb, l4_off + SCTP_CSUM_OFF, wire, sizeof(wire), 0);
}

#endif
