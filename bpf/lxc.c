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
#include "lib/events.h"
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

#define LOOPBACK_IPV4 bpf_htonl(LOOPBACK_IPV4_HOST_ORDER)

/* The backend's reply on a hairpin connection (it reached itself through a service
 * and its own connection was source-NATed to LOOPBACK_IPV4): restore the frontend as
 * source and the pod as destination, and turn it around into the pod. */
static __always_inline int hairpin_reply(struct __sk_buff *skb, const struct pkt4 *pkt,
					 const struct ct4_entry *entry)
{
	__be32 frontend = entry->nat_address;
	__be16 frontend_port = entry->nat_port;

	if (nat_rewrite_addr(skb, pkt, IP_SADDR_OFF, pkt->saddr, frontend) < 0 ||
	    nat_rewrite_addr(skb, pkt, IP_DADDR_OFF, pkt->daddr, pkt->saddr) < 0 ||
	    nat_rewrite_port(skb, pkt, l4_sport_off(pkt), pkt->sport, frontend_port) < 0 ||
	    eth_swap_macs(skb) < 0)
		return verdict_drop(skb, pkt, DROP_WRITE_ERROR, METRIC_DIR_EGRESS);
	metrics_count(skb, REASON_FORWARDED, METRIC_DIR_EGRESS);
	return bpf_redirect(skb->ifindex, 0);
}

/* The first packet of a connection, with no live entry under @key. Unless it is exempt
 * (@judge false: hairpin), @ep's policy judges it in @direction against @remote:@dport,
 * with its verdict event; then it gets its entry (a TCP RST gets none) and its TRACE
 * event. @remote_identity is the identity a tunnel carried for @remote, or
 * IDENTITY_UNRESOLVED. @backend, if not NULL, is the service backend the packet goes
 * to. Returns 0 to forward the packet or the DROP_* reason; @trace names the remote
 * identity either way. */
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
		reason = policy_verdict(ep, skb->ifindex, direction, remote, pkt, dport, trace);
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
	if (ct_create(key, pkt, nat_address, nat_port, ct_flags, skb->ifindex, now) < 0)
		return DROP_CT_CREATE_FAILED;
	event_emit(skb, pkt, EVENT_WHAT(EVENT_TRACE, event_dir, 0, 0, trace->remote_identity),
		   backend);
	return 0;
}

/* A packet to a service frontend: pick the backend, judge a new connection against
 * the backend's address and port, record it and DNAT it (plus SNAT to LOOPBACK_IPV4
 * when the pod reaches itself). */
static __always_inline int service_forward(struct __sk_buff *skb, const struct pkt4 *pkt,
					   const struct lb4_service *svc,
					   const struct endpoint_info *ep, __u64 now)
{
	struct policy_trace trace = { .remote_identity = IDENTITY_UNRESOLVED };
	struct lb4_service backend = {};
	__be32 saddr = pkt->saddr;
	enum ct_state state;
	__u8 ct_flags = 0;
	struct ct4_key key;
	int reason;

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

	reason = lb4_select_backend(skb, pkt, svc, now, &backend);
	if (reason)
		return verdict_drop(skb, pkt, reason, METRIC_DIR_EGRESS);

	if (backend.backend_address == pkt->saddr) {
		/* The backend would see its own address as source and answer itself. */
		saddr = LOOPBACK_IPV4;
		ct_flags = CT_FLAG_LOOPBACK;
	}

	ct_key_init(&key, saddr, backend.backend_address, pkt->sport, backend.backend_port,
		    pkt->proto, CT_EGRESS);
	state = ct_track_established(&key, pkt, pkt->daddr, pkt->dport, ct_flags, now);
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

	if (nat_rewrite_addr(skb, pkt, IP_DADDR_OFF, pkt->daddr, backend.backend_address) < 0 ||
	    nat_rewrite_port(skb, pkt, l4_dport_off(pkt), pkt->dport, backend.backend_port) < 0 ||
	    nat_rewrite_addr(skb, pkt, IP_SADDR_OFF, pkt->saddr, saddr) < 0)
		return verdict_drop_service(skb, pkt, DROP_WRITE_ERROR, trace.remote_identity,
					    &backend);
	return forward_egress(skb, pkt, backend.backend_address, ep);
}

SEC("classifier")
int from_container(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint_info *ep;
	enum parse_result parsed;
	struct policy_trace trace;
	struct lb4_service *svc;
	struct ct4_entry *entry;
	enum ct_state state;
	struct ct4_key key;
	struct pkt4 pkt;
	__u64 now;
	int reason;

	parsed = parse_ipv4(skb, &pkt);
	switch (parsed) {
	case PARSE_ARP:
		return verdict_pass(skb, METRIC_DIR_EGRESS);
	case PARSE_UNSUPPORTED_L3:
		return verdict_drop(skb, &pkt, DROP_UNKNOWN_L3, METRIC_DIR_EGRESS);
	case PARSE_INVALID:
		return verdict_drop(skb, &pkt, DROP_INVALID, METRIC_DIR_EGRESS);
	case PARSE_FRAG_NOT_FOUND:
		return verdict_drop(skb, &pkt, DROP_FRAG_NOT_FOUND, METRIC_DIR_EGRESS);
	case PARSE_IPV4:
	case PARSE_L4:
		break;
	}

	/* A pod may only send from its own address (an unknown interface is not checked). */
	ep = bpf_map_lookup_elem(&endpoints, &ifindex);
	if (ep && pkt.saddr != ep->ipv4)
		return verdict_drop(skb, &pkt, DROP_INVALID_SOURCE, METRIC_DIR_EGRESS);
	if (parsed == PARSE_IPV4) {
		/* An error about a connection from outside the node goes back rev-DNATed. */
		reason = nodeport_icmp_error_local(skb, &pkt);
		if (reason >= 0)
			return reason;
		return forward_egress(skb, &pkt, pkt.daddr, ep);
	}
	now = ct_now();

	/* Only a hairpin reply goes to LOOPBACK_IPV4: other packets skip the lookup. */
	entry = pkt.daddr == LOOPBACK_IPV4 ? ct_lookup(&pkt, CT_EGRESS, true) : NULL;
	if (entry && (entry->flags & CT_FLAG_LOOPBACK)) {
		if (ct_account(entry, &pkt, CT_FLAG_SEEN_REPLY, now))
			event_packet(skb, &pkt, EVENT_CLOSE, METRIC_DIR_EGRESS, 0, EVENT_F_REPLY,
				     IDENTITY_UNRESOLVED);
		return hairpin_reply(skb, &pkt, entry);
	}

	entry = ct_lookup(&pkt, CT_INGRESS, true);
	if (entry) {
		if (ct_account(entry, &pkt, CT_FLAG_SEEN_REPLY, now))
			event_packet(skb, &pkt, EVENT_CLOSE, METRIC_DIR_EGRESS, 0, EVENT_F_REPLY,
				     IDENTITY_UNRESOLVED);
		/* A reply to a client outside the node that reached this pod through an
		 * external frontend: rev-DNATed and sent straight back toward the client.
		 * The flag spares every other reply the CT_NODEPORT lookup. */
		if (entry->flags & CT_FLAG_NODEPORT) {
			reason = nodeport_reply_local(skb, &pkt, now);
			if (reason >= 0)
				return reason;
		}
		return forward_egress(skb, &pkt, pkt.daddr, ep);
	}

	if (lb4_balanced(pkt.proto)) {
		svc = lb4_lookup(pkt.daddr, pkt.dport, pkt.proto, 0);
		if (svc && lb4_source_allowed(svc, pkt.daddr, pkt.dport, pkt.proto, pkt.saddr))
			return service_forward(skb, &pkt, svc, ep, now);
		/* One drop for both: each inlined copy costs the event code again. */
		reason = svc ? DROP_NOT_IN_SRC_RANGE :
		       lb4_vip_known(pkt.daddr) ? DROP_SERVICE_PORT_UNKNOWN : 0;
		if (reason)
			return verdict_drop(skb, &pkt, reason, METRIC_DIR_EGRESS);
	}

	/* A new or ongoing connection to a non-service destination. */
	ct_key_init(&key, pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto, CT_EGRESS);
	state = ct_track_established(&key, &pkt, 0, 0, 0, now);
	if (state == CT_NEW) {
		reason = ct_open(skb, &pkt, &key, ep, true, POLICY_EGRESS, pkt.daddr,
				 IDENTITY_UNRESOLVED, pkt.dport, 0, 0, 0, now, NULL, &trace);
		if (reason)
			return verdict_drop_from(skb, &pkt, reason, METRIC_DIR_EGRESS,
						 trace.remote_identity);
	} else if (state == CT_CLOSING) {
		event_packet(skb, &pkt, EVENT_CLOSE, METRIC_DIR_EGRESS, 0, 0, IDENTITY_UNRESOLVED);
	}
	return forward_egress(skb, &pkt, pkt.daddr, ep);
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

SEC("classifier")
int to_container(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct policy_trace trace = { .remote_identity = IDENTITY_UNRESOLVED };
	/* Taken first, so no mark of ours ever reaches the pod. */
	__u32 carried = tunnel_identity_take(skb);
	struct endpoint_info *ep;
	struct ct4_entry *entry;
	enum ct_state state;
	struct ct4_key key;
	struct pkt4 pkt;
	__u64 now;
	int reason;

	switch (parse_ipv4(skb, &pkt)) {
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

	entry = ct_lookup(&pkt, CT_EGRESS, true);
	if (entry) {
		/* A reply on a connection the pod opened. */
		__be32 frontend = entry->nat_address;
		__be16 frontend_port = entry->nat_port;
		struct ct4_entry *service;

		if (ct_account(entry, &pkt, CT_FLAG_SEEN_REPLY, now))
			event_packet(skb, &pkt, EVENT_CLOSE, METRIC_DIR_INGRESS, 0, EVENT_F_REPLY,
				     IDENTITY_UNRESOLVED);
		if (!frontend || (entry->flags & CT_FLAG_LOOPBACK))
			return verdict_pass(skb, METRIC_DIR_INGRESS);

		/* Replies keep the connection's backend choice alive too, so a client that
		 * only receives does not get moved to another backend; they also move it out
		 * of SYN (and into closing), as its lifetime follows the connection's state. */
		ct_key_init(&key, pkt.daddr, frontend, pkt.dport, frontend_port, pkt.proto, CT_SERVICE);
		service = bpf_map_lookup_elem(&ct4, &key);
		if (service)
			ct_touch_reply(service, &pkt, now);

		if (nat_rewrite_addr(skb, &pkt, IP_SADDR_OFF, pkt.saddr, frontend) < 0 ||
		    nat_rewrite_port(skb, &pkt, l4_sport_off(&pkt), pkt.sport, frontend_port) < 0)
			return verdict_drop(skb, &pkt, DROP_WRITE_ERROR, METRIC_DIR_INGRESS);
		return verdict_pass(skb, METRIC_DIR_INGRESS);
	}

	entry = ct_lookup(&pkt, CT_SERVICE, true);
	if (entry) {
		/* A hairpin reply, already rev-NATed by from_container. */
		ct_account(entry, &pkt, CT_FLAG_SEEN_REPLY, now);
		return verdict_pass(skb, METRIC_DIR_INGRESS);
	}

	/* A new or ongoing inbound connection. */
	ct_key_init(&key, pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto, CT_INGRESS);
	state = ct_track_established(&key, &pkt, 0, 0, 0, now);
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

char _license[] SEC("license") = "Dual BSD/GPL";
