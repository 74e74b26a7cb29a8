/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * A local pod's side of its connections: ct_open opens one in either direction (policy
 * verdict, conntrack entry, events), endpoint_ingress judges and tracks what enters the
 * pod. to_container runs endpoint_ingress on the pod's host-side veth; the programs on
 * the node's devices run the same function before they deliver a packet straight into
 * the pod (host_routing.h), which skips that veth's egress.
 */
#ifndef SLUICE_ENDPOINT_H
#define SLUICE_ENDPOINT_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"
#include "conntrack.h"
#include "events.h"
#include "flow.h"
#include "icmp.h"
#include "maps.h"
#include "metrics.h"
#include "nat.h"
#include "parse.h"
#include "policy.h"

#define LOOPBACK_IPV4 bpf_htonl(LOOPBACK_IPV4_HOST_ORDER)

/* The first packet of a connection, with no live entry under @key, at the endpoint
 * pkt->ifindex names. Unless it is exempt (@judge false: hairpin), @ep's policy judges
 * it in @direction against @remote:@dport, with its verdict event; then it gets its
 * entry (a TCP RST gets none) and its TRACE event. @remote_identity is the identity a
 * tunnel carried for @remote, or IDENTITY_UNRESOLVED. @backend, if not NULL, is the
 * service backend the packet goes to. Returns 0 to forward the packet or the DROP_*
 * reason; @trace names the remote identity either way. */
static __always_inline int ct_open(struct __sk_buff *skb, const struct pkt4 *pkt,
				   const struct ct4_key *key, const struct endpoint_info *ep,
				   bool judge, __u8 direction, __be32 remote, __u32 remote_identity,
				   __be16 dport, __be32 nat_address, __be16 nat_port, __u8 ct_flags,
				   __u64 now, const struct lb4_service *backend,
				   struct policy_trace *trace)
{
	/* Events count directions as the metrics do: egress leaves the pod. */
	__u8 event_dir = direction == POLICY_EGRESS ? METRIC_DIR_EGRESS : METRIC_DIR_INGRESS;
	bool opens = ct_opens_connection(pkt);
	int reason;

	*trace = (struct policy_trace){ .remote_identity = remote_identity };
	if (judge) {
		reason = policy_verdict(ep, pkt->ifindex, direction, remote, pkt, dport, trace);
		if (trace->judged && opens)
			event_emit(skb, pkt,
				   EVENT_WHAT(EVENT_POLICY_VERDICT, event_dir, reason,
					      policy_event_flags(reason, trace),
					      trace->remote_identity),
				   backend);
		if (reason)
			return reason;
	}
	if (!opens)
		return 0;
	if (ct_create(key, pkt, nat_address, nat_port, ct_flags, pkt->ifindex, now) < 0)
		return DROP_CT_CREATE_FAILED;
	event_emit(skb, pkt, EVENT_WHAT(EVENT_TRACE, event_dir, 0, 0, trace->remote_identity),
		   backend);
	return 0;
}

/* Whether @pkt, entering a pod from LOOPBACK_IPV4, is the pod reaching itself
 * through a service (hairpin): its own from_container recorded the translated tuple.
 * Checked against conntrack so a forged loopback source gains nothing. */
static __always_inline bool hairpin_request(const struct pkt4 *pkt)
{
	struct ct4_entry *entry;

	if (pkt->saddr != LOOPBACK_IPV4)
		return false;
	entry = ct_lookup(pkt, CT_EGRESS, false);
	return entry && (entry->flags & CT_FLAG_LOOPBACK);
}

/* An ICMP error entering a pod about a connection it opened through a service: it names
 * the backend, and is translated back to the frontend (icmp.h). Other untracked IPv4
 * (errors about other connections) passes as it is. */
static __always_inline int icmp_error_to_container(struct __sk_buff *skb, const struct pkt4 *pkt)
{
	struct ct4_entry *entry;
	struct pkt4 quoted;

	if (!parse_icmp_quote(skb, pkt, &quoted) || quoted.saddr != pkt->daddr)
		return verdict_pass(skb, METRIC_DIR_INGRESS);
	entry = ct_lookup(&quoted, CT_EGRESS, false);
	if (!entry || !entry->nat_address || (entry->flags & CT_FLAG_LOOPBACK))
		return verdict_pass(skb, METRIC_DIR_INGRESS);
	if (icmp_error_rev_nat(skb, pkt, &quoted, entry->nat_address, entry->nat_port) < 0)
		return verdict_drop(skb, pkt, DROP_WRITE_ERROR, METRIC_DIR_INGRESS);
	return verdict_pass(skb, METRIC_DIR_INGRESS);
}

/* @skb enters the local pod whose host-side veth is @ifindex: replies are reverse-NATed,
 * new connections judged by the pod's ingress policy against @carried (the identity a
 * tunnel carried for the sender, or IDENTITY_UNRESOLVED) and tracked, with their events
 * and metrics. Returns TC_ACT_OK to let the packet in, else the verdict that drops it.
 * @note, if not NULL, learns the flags of the entry the packet was accounted to.
 * @parsed, if not NULL, is @skb's tuple as it is now (PARSE_L4, unfragmented), which the
 * caller parsed and translated already: the packet is not parsed a second time. */
static __always_inline int endpoint_ingress(struct __sk_buff *skb, __u32 ifindex, __u32 carried,
					    struct flow_note *note, const struct pkt4 *parsed)
{
	struct policy_trace trace = { .remote_identity = IDENTITY_UNRESOLVED };
	enum parse_result result;
	struct endpoint_info *ep;
	struct ct4_entry *entry;
	enum ct_state state;
	struct ct4_key key;
	struct pkt4 pkt;
	__u64 now;
	int reason;

	if (parsed) {
		pkt = *parsed;
		result = PARSE_L4;
	} else {
		result = parse_ipv4(skb, &pkt);
	}
	pkt.ifindex = ifindex;
	switch (result) {
	case PARSE_ARP:
		return verdict_pass(skb, METRIC_DIR_INGRESS);
	case PARSE_IPV4:
		return icmp_error_to_container(skb, &pkt);
	case PARSE_UNSUPPORTED_L3:
		return verdict_drop(skb, &pkt, DROP_UNKNOWN_L3, METRIC_DIR_INGRESS);
	case PARSE_INVALID:
		return verdict_drop(skb, &pkt, DROP_INVALID, METRIC_DIR_INGRESS);
	case PARSE_FRAG_NOT_FOUND:
		return verdict_drop(skb, &pkt, DROP_FRAG_NOT_FOUND, METRIC_DIR_INGRESS);
	case PARSE_L4:
		break;
	}
	now = ct_now();

	ct_key_init(&key, pkt.daddr, pkt.saddr, pkt.dport, pkt.sport, pkt.proto, CT_EGRESS);
	entry = bpf_map_lookup_elem(&ct4, &key);
	if (entry) {
		/* A reply on a connection the pod opened. */
		__be32 frontend = entry->nat_address;
		__be16 frontend_port = entry->nat_port;
		bool loopback = entry->flags & CT_FLAG_LOOPBACK;
		struct ct4_entry *service;

		if (ct_account(entry, &pkt, CT_FLAG_SEEN_REPLY, now))
			event_packet(skb, &pkt, EVENT_CLOSE, METRIC_DIR_INGRESS, 0, EVENT_F_REPLY,
				     IDENTITY_UNRESOLVED);
		if (note)
			note->dest_flags = ct_flow_flags(entry);
		ct_release(&key, entry, &pkt);
		if (!frontend || loopback)
			return verdict_pass(skb, METRIC_DIR_INGRESS);

		/* Replies keep the connection's backend choice alive too, so a client that
		 * only receives does not get moved to another backend; they also move it out
		 * of SYN (and into closing), as its lifetime follows the connection's state. */
		ct_key_init(&key, pkt.daddr, frontend, pkt.dport, frontend_port, pkt.proto, CT_SERVICE);
		service = bpf_map_lookup_elem(&ct4, &key);
		if (service) {
			ct_touch_reply(service, &pkt, now);
			ct_release(&key, service, &pkt);
		}

		if (nat_rewrite_addr_direct(skb, &pkt, IP_SADDR_OFF, pkt.saddr, frontend) < 0 ||
		    nat_rewrite_port(skb, &pkt, l4_sport_off(&pkt), pkt.sport,
				     frontend_port, true) < 0)
			return verdict_drop(skb, &pkt, DROP_WRITE_ERROR, METRIC_DIR_INGRESS);
		return verdict_pass(skb, METRIC_DIR_INGRESS);
	}

	entry = ct_lookup(&pkt, CT_SERVICE, true);
	if (entry && entry->nat_address == pkt.daddr) {
		/* A hairpin reply, already rev-NATed by from_container: the pod is its own
		 * backend. Any other service connection is answered by its backend (the
		 * CT_EGRESS reply above); a packet from its frontend is judged like any other,
		 * as the service entry is written even when policy then denies the connection. */
		ct_account(entry, &pkt, CT_FLAG_SEEN_REPLY, now);
		return verdict_pass(skb, METRIC_DIR_INGRESS);
	}

	/* A new or ongoing inbound connection. */
	ct_key_init(&key, pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto, CT_INGRESS);
	state = ct_track_established(&key, &pkt, 0, 0, 0, now, note ? &note->dest_flags : NULL);
	if (state == CT_NEW) {
		bool judge = !hairpin_request(&pkt);

		/* from_netdev recorded a connection from outside the node: its replies are
		 * rev-DNATed in from_container, which the flag tells, once per connection. */
		__u8 ct_flags = ct_lookup(&pkt, CT_NODEPORT, false) ? CT_FLAG_NODEPORT : 0;

		ep = judge ? bpf_map_lookup_elem(&endpoints, &ifindex) : NULL;
		reason = ct_open(skb, &pkt, &key, ep, judge, POLICY_INGRESS, pkt.saddr, carried,
				 pkt.dport, 0, 0, ct_flags, now, NULL, &trace);
		if (reason)
			return verdict_drop_from(skb, &pkt, reason, METRIC_DIR_INGRESS,
						 trace.remote_identity);
	} else if (state == CT_CLOSING) {
		event_packet(skb, &pkt, EVENT_CLOSE, METRIC_DIR_INGRESS, 0, 0, IDENTITY_UNRESOLVED);
	}
	return verdict_pass(skb, METRIC_DIR_INGRESS);
}

#endif
