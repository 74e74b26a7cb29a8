// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Programs on the host-side veth of every local pod (the lxc* interface):
 *  from_container at tc ingress: packets leaving the pod;
 *  to_container   at tc egress:  packets entering the pod.
 * Each judges the new connections of its direction against the pod's policy where
 * it creates their conntrack entry (CT_EGRESS, CT_INGRESS), and reports there what
 * the flow events describe (common.h): the verdict, the new connection (TRACE), its
 * first FIN or RST (CLOSE) and every drop.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/common.h"
#include "lib/conntrack.h"
#include "lib/endpoint.h"
#include "lib/events.h"
#include "lib/flow.h"
#include "lib/flow_cache.h"
#include "lib/host_routing.h"
#include "lib/icmp.h"
#include "lib/lb.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/nat.h"
#include "lib/nodeport.h"
#include "lib/parse.h"
#include "lib/policy.h"
#include "lib/reject.h"
#include "lib/tunnel.h"

/* The backend's reply on a hairpin connection (it reached itself through a service
 * and its own connection was source-NATed to LOOPBACK_IPV4): restore the frontend as
 * source and the pod as destination, and turn it around into the pod. */
static __always_inline int hairpin_reply(struct __sk_buff *skb, const struct pkt4 *pkt,
					 const struct ct4_entry *entry)
{
	__be32 frontend = entry->nat_address;
	__be16 frontend_port = entry->nat_port;

	if (nat_rewrite_addr_direct(skb, pkt, IP_SADDR_OFF, pkt->saddr, frontend) < 0 ||
	    nat_rewrite_addr_direct(skb, pkt, IP_DADDR_OFF, pkt->daddr, pkt->saddr) < 0 ||
	    nat_rewrite_port(skb, pkt, l4_sport_off(pkt), pkt->sport,
			     frontend_port, true) < 0 ||
	    eth_swap_macs(skb) < 0)
		return verdict_drop(skb, pkt, DROP_WRITE_ERROR, METRIC_DIR_EGRESS);
	metrics_count(skb, REASON_FORWARDED, METRIC_DIR_EGRESS);
	return bpf_redirect(skb->ifindex, 0);
}

/* A packet to a service frontend: pick the backend (a pod is a client inside the
 * cluster: lb4_cluster_frontend), judge a new connection against the backend's address
 * and port, record it and DNAT it (plus SNAT to LOOPBACK_IPV4 when the pod reaches
 * itself). @note learns the flags of the entry the packet was accounted to. When the
 * packet goes on to the node (TC_ACT_OK), @pkt names its translated tuple. */
static __always_inline int service_forward(struct __sk_buff *skb, struct pkt4 *pkt,
					   const struct lb4_service *svc,
					   const struct endpoint_info *ep, __u64 now,
					   struct flow_note *note)
{
	struct policy_trace trace = { .remote_identity = IDENTITY_UNRESOLVED };
	struct lb4_service backend = {};
	__be32 saddr = pkt->saddr;
	enum ct_state state;
	__u8 ct_flags = 0;
	struct ct4_key key;
	__u8 scope;
	int reason;

	svc = lb4_cluster_frontend(svc, pkt->daddr, pkt->dport, pkt->proto, &scope);
	if (svc->count == 0) {
		/* Its first fragment was rejected already; this one holds nothing to quote. */
		if (pkt->later_fragment)
			return verdict_drop(skb, pkt, DROP_NO_SERVICE, METRIC_DIR_EGRESS);
		/* No ready backend: refuse at once instead of letting the client time out. */
		metrics_count(skb, DROP_NO_SERVICE, METRIC_DIR_EGRESS);
		event_packet(skb, pkt, EVENT_DROP, METRIC_DIR_EGRESS, DROP_NO_SERVICE, 0,
			     IDENTITY_UNRESOLVED);
		if (reject_port_unreachable(skb, pkt) < 0)
			return TC_ACT_SHOT;
		/* Straight into the pod's end of the veth. Through the lxc's own transmit
		 * path, a locally generated (CHECKSUM_PARTIAL) packet would get its old TCP/UDP
		 * checksum filled in by the kernel when the lxc has tx checksumming off, right
		 * inside the quoted header. */
		return bpf_redirect_peer(skb->ifindex, 0);
	}

	reason = lb4_select_backend(skb, pkt, svc, scope, now, &backend);
	if (reason)
		return verdict_drop(skb, pkt, reason, METRIC_DIR_EGRESS);

	if (backend.backend_address == pkt->saddr) {
		/* The backend would see its own address as source and answer itself. */
		saddr = LOOPBACK_IPV4;
		ct_flags = CT_FLAG_LOOPBACK;
	}

	ct_key_init(&key, saddr, backend.backend_address, pkt->sport, backend.backend_port,
		    pkt->proto, CT_EGRESS);
	state = ct_track_established(&key, pkt, pkt->daddr, pkt->dport, ct_flags, now,
				     &note->source_flags);
	if (state == CT_NEW) {
		/* Hairpin is the pod talking to itself: never judged. */
		reason = ct_open(skb, pkt, &key, ep, !ct_flags, POLICY_EGRESS,
				 backend.backend_address, IDENTITY_UNRESOLVED, backend.backend_port,
				 pkt->daddr, pkt->dport, ct_flags, now, &backend, &trace);
		if (reason)
			return verdict_drop_service(skb, pkt, reason, trace.remote_identity,
						    &backend);
	} else if (state == CT_CLOSING) {
		event_service(skb, pkt, EVENT_CLOSE, 0, 0, IDENTITY_UNRESOLVED,
			      &backend);
	}

	if (nat_rewrite_addr_direct(skb, pkt, IP_DADDR_OFF, pkt->daddr,
				    backend.backend_address) < 0 ||
	    nat_rewrite_port(skb, pkt, l4_dport_off(pkt), pkt->dport,
			     backend.backend_port, true) < 0 ||
	    nat_rewrite_addr_direct(skb, pkt, IP_SADDR_OFF, pkt->saddr, saddr) < 0)
		return verdict_drop_service(skb, pkt, DROP_WRITE_ERROR, trace.remote_identity,
					    &backend);
	reason = forward_egress(skb, pkt, backend.backend_address, ep);
	pkt->saddr = saddr;
	pkt->daddr = backend.backend_address;
	pkt->dport = backend.backend_port;
	return reason;
}

/* What leaves a pod: anti-spoofing, hairpin and NodePort replies, service translation,
 * egress policy and conntrack, then the forwarding decision. Returns the verdict;
 * TC_ACT_OK hands the packet to the node's stack. @note learns the flags of the
 * conntrack entry the packet was accounted to (the flow cache's condition). With
 * TC_ACT_OK, *@tracked says whether @pkt names the packet's tuple as it now is (a
 * connection's packet, translated if it was), so host routing need not parse it again. */
static __always_inline int container_egress(struct __sk_buff *skb, struct flow_note *note,
					    struct pkt4 *pkt, bool *tracked)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint_info *ep;
	enum parse_result parsed;
	struct policy_trace trace;
	struct lb4_service *svc;
	struct ct4_entry *entry;
	enum ct_state state;
	struct ct4_key key;
	__u64 now;
	int reason;

	parsed = parse_ipv4(skb, pkt);
	switch (parsed) {
	case PARSE_ARP:
		return verdict_pass(skb, METRIC_DIR_EGRESS);
	case PARSE_UNSUPPORTED_L3:
		return verdict_drop(skb, pkt, DROP_UNKNOWN_L3, METRIC_DIR_EGRESS);
	case PARSE_INVALID:
		return verdict_drop(skb, pkt, DROP_INVALID, METRIC_DIR_EGRESS);
	case PARSE_FRAG_NOT_FOUND:
		return verdict_drop(skb, pkt, DROP_FRAG_NOT_FOUND, METRIC_DIR_EGRESS);
	case PARSE_IPV4:
	case PARSE_L4:
		break;
	}

	/* A pod may only send from its own address (an unknown interface is not checked). */
	ep = bpf_map_lookup_elem(&endpoints, &ifindex);
	if (ep && pkt->saddr != ep->ipv4)
		return verdict_drop(skb, pkt, DROP_INVALID_SOURCE, METRIC_DIR_EGRESS);
	if (parsed == PARSE_IPV4) {
		/* An error about a connection from outside the node goes back rev-DNATed. */
		reason = nodeport_icmp_error_local(skb, pkt);
		if (reason >= 0)
			return reason;
		return forward_egress(skb, pkt, pkt->daddr, ep);
	}
	now = ct_now();
	if (pkt->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		flow_forget(pkt);

	/* Only a hairpin reply goes to LOOPBACK_IPV4: other packets skip the lookup. */
	entry = pkt->daddr == LOOPBACK_IPV4 ? ct_lookup(pkt, CT_EGRESS, true) : NULL;
	if (entry && (entry->flags & CT_FLAG_LOOPBACK)) {
		if (ct_account(entry, pkt, CT_FLAG_SEEN_REPLY, now))
			event_packet(skb, pkt, EVENT_CLOSE, METRIC_DIR_EGRESS, 0, EVENT_F_REPLY,
				     IDENTITY_UNRESOLVED);
		return hairpin_reply(skb, pkt, entry);
	}

	ct_key_init(&key, pkt->daddr, pkt->saddr, pkt->dport, pkt->sport, pkt->proto, CT_INGRESS);
	entry = bpf_map_lookup_elem(&ct4, &key);
	if (entry) {
		if (ct_account(entry, pkt, CT_FLAG_SEEN_REPLY, now))
			event_packet(skb, pkt, EVENT_CLOSE, METRIC_DIR_EGRESS, 0, EVENT_F_REPLY,
				     IDENTITY_UNRESOLVED);
		note->source_flags = ct_flow_flags(entry);
		ct_release(&key, entry, pkt);
		/* A reply to a client outside the node that reached this pod through an
		 * external frontend: rev-DNATed and sent straight back toward the client.
		 * The flag spares every other reply the CT_NODEPORT lookup. */
		if (note->source_flags & CT_FLAG_NODEPORT) {
			reason = nodeport_reply_local(skb, pkt, now);
			if (reason >= 0)
				return reason;
		}
		*tracked = true;
		return forward_egress(skb, pkt, pkt->daddr, ep);
	}

	if (lb4_balanced(pkt->proto)) {
		svc = lb4_lookup(pkt->daddr, pkt->dport, pkt->proto, 0);
		if (svc && lb4_source_allowed(svc, pkt->daddr, pkt->dport, pkt->proto, pkt->saddr)) {
			*tracked = true;
			return service_forward(skb, pkt, svc, ep, now, note);
		}
		/* One drop for both: each inlined copy costs the event code again. */
		reason = svc ? DROP_NOT_IN_SRC_RANGE :
		       lb4_vip_known(pkt->daddr) ? DROP_SERVICE_PORT_UNKNOWN : 0;
		if (reason)
			return verdict_drop(skb, pkt, reason, METRIC_DIR_EGRESS);
	}

	/* A new or ongoing connection to a non-service destination. */
	ct_key_init(&key, pkt->saddr, pkt->daddr, pkt->sport, pkt->dport, pkt->proto, CT_EGRESS);
	state = ct_track_established(&key, pkt, 0, 0, 0, now, &note->source_flags);
	if (state == CT_NEW) {
		reason = ct_open(skb, pkt, &key, ep, true, POLICY_EGRESS, pkt->daddr,
				 IDENTITY_UNRESOLVED, pkt->dport, 0, 0, 0, now, NULL, &trace);
		if (reason)
			return verdict_drop_from(skb, pkt, reason, METRIC_DIR_EGRESS,
						 trace.remote_identity);
	} else if (state == CT_CLOSING) {
		event_packet(skb, pkt, EVENT_CLOSE, METRIC_DIR_EGRESS, 0, 0, IDENTITY_UNRESOLVED);
	}
	*tracked = true;
	return forward_egress(skb, pkt, pkt->daddr, ep);
}

SEC("classifier")
int from_container(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct flow_note *note = bpf_map_lookup_elem(&flow4_notes, &zero);
	bool tracked = false;
	struct pkt4 pkt;
	int verdict;

	/* Index 0 of an array always exists. */
	if (!note)
		return TC_ACT_SHOT;
	/* An established flow to a pod of this node: one lookup (flow_cache.h). Whether the
	 * packet may use the cache is in the note, not in a branch here, so the verifier
	 * checks the slow path once. */
	verdict = flow_forward(skb, note);
	if (verdict == FLOW_TO_NODE)
		return note->tunnel ? flow_tunnel_node(skb, note) : flow_redirect_node(note);
	if (verdict >= 0)
		return verdict;
	verdict = container_egress(skb, note, &pkt, &tracked);
	/* Sent to another node: the cache keeps that decision too. */
	if (verdict == TC_ACT_REDIRECT && note->next_hop)
		flow_record(skb, note);
	if (verdict != TC_ACT_OK)
		return verdict;
	/* What the node's stack would route to a pod of this node goes straight in, its
	 * tuple handed over rather than parsed again. */
	verdict = host_route_local(skb, IDENTITY_UNRESOLVED, note, tracked ? &pkt : NULL);
	if (verdict < 0)
		return TC_ACT_OK;
	if (verdict == TC_ACT_REDIRECT)
		flow_record(skb, note);
	return verdict;
}

SEC("classifier")
int to_container(struct __sk_buff *skb)
{
	/* Taken first, so no mark of ours ever reaches the pod. */
	__u32 carried = tunnel_identity_take(skb);

	return endpoint_ingress(skb, skb->ifindex, carried, NULL, NULL);
}

char _license[] SEC("license") = "Dual BSD/GPL";
