// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The program on the node's underlay device, which carries traffic from the other nodes
 * and from the world:
 *  from_netdev at tc ingress: packets to an external frontend (NodePort, externalIPs,
 *              LoadBalancer VIPs) are balanced, translated and forwarded (nodeport.h), or
 *              refused at once when the frontend has no backend; replies of connections
 *              SNATed to a backend on another node are translated back to the client,
 *              and replies of masqueraded pod connections (pings included) back to the
 *              pod; ICMP errors about either are translated back the same way.
 *  to_netdev   at tc egress: pod traffic leaving the cluster (pings included) is
 *              masqueraded to the node's address when masquerading is on (masquerade.h),
 *              and ICMP errors about translated connections are translated as well.
 * Packets for a local pod (pod traffic between nodes in native mode, world hosts) are
 * delivered straight into the pod after its to_container's checks (host_routing.h), and
 * so is pod traffic from other nodes in VXLAN, decapsulated here (tunnel_decap.h).
 * Everything else (the VXLAN the tunnel device takes, the node's own traffic, ARP)
 * passes unchanged and uncounted.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/common.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/host_routing.h"
#include "lib/identity.h"
#include "lib/lb.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/nat.h"
#include "lib/nodeport.h"
#include "lib/parse.h"
#include "lib/masquerade.h"
#include "lib/reject.h"
#include "lib/tunnel.h"
#include "lib/tunnel_decap.h"

/* Packets from outside enter the node: events and metrics count them as ingress. */
#define NETDEV_DIR METRIC_DIR_INGRESS

/* The device the replies to @client leave by (the CT_NODEPORT entry's ifindex): the one
 * its packets came in on, except for a pod on another node in tunnel mode, which only
 * the tunnel reaches (to_tunnel keys the replies). */
static __always_inline __u32 nodeport_reply_device(struct __sk_buff *skb,
						   const struct node_config *cfg, __be32 client)
{
	__u32 device = skb->ifindex;
	struct ipcache_entry *peer;

	if (cfg && cfg->routing_mode == ROUTING_MODE_TUNNEL) {
		peer = ipcache_lookup(client);
		if (peer && peer->tunnel_endpoint)
			device = cfg->tunnel_ifindex;
	}
	return device;
}

/* A frontend without backends (externalTrafficPolicy Local on a node without one, or no
 * ready backend at all): refused at once back out the device, a TCP RST for TCP and ICMP
 * port unreachable otherwise, which the client sees as ECONNREFUSED. */
static __always_inline int nodeport_refuse(struct __sk_buff *skb, const struct pkt4 *pkt)
{
	int err;

	metrics_count(skb, DROP_NO_SERVICE, NETDEV_DIR);
	event_packet(skb, pkt, EVENT_DROP, NETDEV_DIR, DROP_NO_SERVICE, 0, IDENTITY_UNRESOLVED);
	/* A later fragment holds nothing to quote; an RST is never answered. */
	if (pkt->later_fragment || (pkt->tcp_flags & TCP_FLAG_RST))
		return TC_ACT_SHOT;
	if (pkt->proto == IPPROTO_TCP)
		err = reject_tcp_reset(skb, pkt);
	else
		err = reject_port_unreachable(skb, pkt);
	if (err < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* A DF packet that the path to @backend's node cannot carry is answered with ICMP
 * fragmentation needed from the frontend, before any translation, so path-MTU
 * discovery works for clients outside the cluster too. Returns whether it was. */
static __always_inline bool nodeport_too_big(struct __sk_buff *skb, const struct pkt4 *pkt,
					     const struct node_config *cfg, int *verdict)
{
	__u32 ifindex = cfg->routing_mode == ROUTING_MODE_TUNNEL ? cfg->tunnel_ifindex
								  : cfg->underlay_ifindex;
	__u32 mtu = 0;

	if (bpf_check_mtu(skb, ifindex, &mtu, 0, BPF_MTU_CHK_SEGS) <= 0 ||
	    !ip_dont_fragment(skb))
		return false;
	metrics_count(skb, DROP_FRAG_NEEDED, NETDEV_DIR);
	event_packet(skb, pkt, EVENT_DROP, NETDEV_DIR, DROP_FRAG_NEEDED, 0, IDENTITY_UNRESOLVED);
	*verdict = reject_unreachable(skb, pkt, ICMP_FRAG_NEEDED, mtu) < 0
			   ? TC_ACT_SHOT
			   : bpf_redirect(skb->ifindex, 0);
	return true;
}

/* @pkt goes to @backend on the node @node_ip: DNAT, SNAT to node_address with the
 * connection's port (picked on its first packet), then forward_to_node. */
static __always_inline int nodeport_to_remote(struct __sk_buff *skb, const struct pkt4 *pkt,
					      const struct lb4_service *backend,
					      const struct node_config *cfg, __be32 node_ip,
					      __u64 now)
{
	__be32 node = cfg->node_address;
	struct ct4_entry *fwd, *snat;
	struct ct4_key key;
	__be16 port = 0;
	bool opens;
	int verdict;

	if (!node)
		return verdict_drop_from(skb, pkt, DROP_NO_NODE_ADDRESS, NETDEV_DIR,
					 IDENTITY_UNRESOLVED);
	if (nodeport_too_big(skb, pkt, cfg, &verdict))
		return verdict;

	ct_key_init(&key, pkt->saddr, pkt->daddr, pkt->sport, pkt->dport, pkt->proto,
		    CT_SNAT_PORT);
	fwd = bpf_map_lookup_elem(&ct4, &key);
	opens = !fwd || ct_syn_starts_over(fwd, pkt) || ct_expired(fwd, pkt->proto, now) ||
		fwd->nat_address != node;
	if (!opens) {
		port = fwd->nat_port;
		if (ct_account(fwd, pkt, 0, now))
			event_emit(skb, pkt, EVENT_WHAT(EVENT_CLOSE, NETDEV_DIR, 0, 0,
							IDENTITY_UNRESOLVED),
				   backend);
		ct_release(&key, fwd, pkt);
		/* The backend may have changed under the connection (it was removed): the
		 * port must be claimed toward the new one. */
		ct_key_init(&key, node, backend->backend_address, port, backend->backend_port,
			    pkt->proto, CT_SNAT);
		snat = bpf_map_lookup_elem(&ct4, &key);
		if (snat && snat->nat_address == pkt->saddr && snat->nat_port == pkt->sport) {
			ct_account(snat, pkt, 0, now);
			ct_release(&key, snat, pkt);
		} else if (!snat_claim(skb, pkt, backend->backend_address, backend->backend_port,
				     node, port, 0, now))
			port = 0;
	}
	if (!port) {
		port = snat_pick_port(skb, pkt, backend->backend_address, backend->backend_port,
				      node, 0, now);
		if (!port)
			return verdict_drop_from(skb, pkt, DROP_NAT_NO_MAPPING, NETDEV_DIR,
						 IDENTITY_UNRESOLVED);
		/* The client's tuple remembers the port for the packets to come. */
		ct_key_init(&key, pkt->saddr, pkt->daddr, pkt->sport, pkt->dport, pkt->proto,
			    CT_SNAT_PORT);
		if (ct_create(&key, pkt, node, port, 0, skb->ifindex, now) < 0)
			return verdict_drop_from(skb, pkt, DROP_CT_CREATE_FAILED, NETDEV_DIR,
						 IDENTITY_UNRESOLVED);
	}
	if (opens)
		event_emit(skb, pkt, EVENT_WHAT(EVENT_TRACE, NETDEV_DIR, 0, 0, IDENTITY_UNRESOLVED),
			   backend);
	/* The SNATed tuple remembers the frontend, for the replies. */
	ct_key_init(&key, node, backend->backend_address, port, backend->backend_port,
		    pkt->proto, CT_NODEPORT);
	if (ct_track_established(&key, pkt, pkt->daddr, pkt->dport, 0, now, NULL) == CT_NEW &&
	    ct_create(&key, pkt, pkt->daddr, pkt->dport, 0,
		      nodeport_reply_device(skb, cfg, pkt->saddr), now) < 0)
		return verdict_drop_from(skb, pkt, DROP_CT_CREATE_FAILED, NETDEV_DIR,
					 IDENTITY_UNRESOLVED);

	if (nat_rewrite_addr_direct(skb, pkt, IP_DADDR_OFF, pkt->daddr,
				    backend->backend_address) < 0 ||
	    nat_rewrite_port(skb, pkt, l4_dport_off(pkt), pkt->dport,
			     backend->backend_port, true) < 0 ||
	    nat_rewrite_addr_direct(skb, pkt, IP_SADDR_OFF, pkt->saddr, node) < 0 ||
	    nat_rewrite_port(skb, pkt, l4_sport_off(pkt), pkt->sport, port, true) < 0)
		return verdict_drop_from(skb, pkt, DROP_WRITE_ERROR, NETDEV_DIR,
					 IDENTITY_UNRESOLVED);
	/* The source is this node now: the other node sees remote-node. */
	return forward_to_node(skb, pkt, cfg, node_ip, IDENTITY_HOST);
}

/* @pkt goes to @backend on this node: DNAT only, so the pod sees the client's address;
 * the node's stack routes it to the pod's veth, where to_container judges it. */
static __always_inline int nodeport_to_local(struct __sk_buff *skb, const struct pkt4 *pkt,
					     const struct lb4_service *backend,
					     const struct node_config *cfg, __u64 now)
{
	struct ct4_key key;
	enum ct_state state;

	ct_key_init(&key, pkt->saddr, backend->backend_address, pkt->sport, backend->backend_port,
		    pkt->proto, CT_NODEPORT);
	state = ct_track_established(&key, pkt, pkt->daddr, pkt->dport, 0, now, NULL);
	if (state == CT_NEW && ct_opens_connection(pkt)) {
		if (ct_create(&key, pkt, pkt->daddr, pkt->dport, 0,
			      nodeport_reply_device(skb, cfg, pkt->saddr), now) < 0)
			return verdict_drop_from(skb, pkt, DROP_CT_CREATE_FAILED, NETDEV_DIR,
						 IDENTITY_UNRESOLVED);
		event_emit(skb, pkt, EVENT_WHAT(EVENT_TRACE, NETDEV_DIR, 0, 0, IDENTITY_UNRESOLVED),
			   backend);
	} else if (state == CT_CLOSING) {
		event_emit(skb, pkt, EVENT_WHAT(EVENT_CLOSE, NETDEV_DIR, 0, 0, IDENTITY_UNRESOLVED),
			   backend);
	}
	if (nat_rewrite_addr_direct(skb, pkt, IP_DADDR_OFF, pkt->daddr,
				    backend->backend_address) < 0 ||
	    nat_rewrite_port(skb, pkt, l4_dport_off(pkt), pkt->dport,
			     backend->backend_port, true) < 0)
		return verdict_drop_from(skb, pkt, DROP_WRITE_ERROR, NETDEV_DIR,
					 IDENTITY_UNRESOLVED);
	return verdict_pass(skb, NETDEV_DIR);
}

/* A packet to the external frontend @svc. */
static __always_inline int nodeport_lb(struct __sk_buff *skb, const struct pkt4 *pkt,
				       const struct lb4_service *svc,
				       const struct node_config *cfg, __u64 now)
{
	struct lb4_service backend = {};
	struct ipcache_entry *dest;
	int reason;

	/* loadBalancerSourceRanges hold before anything else, refusals included. */
	if (!lb4_source_allowed(svc, pkt->daddr, pkt->dport, pkt->proto, pkt->saddr))
		return verdict_drop_from(skb, pkt, DROP_NOT_IN_SRC_RANGE, NETDEV_DIR,
					 IDENTITY_UNRESOLVED);
	if (svc->count == 0)
		return nodeport_refuse(skb, pkt);
	reason = lb4_select_backend(skb, pkt, svc, LB4_SCOPE_DEFAULT, now, &backend);
	if (reason)
		return verdict_drop_from(skb, pkt, reason, NETDEV_DIR, IDENTITY_UNRESOLVED);
	dest = cfg && cfg->routing_mode != ROUTING_MODE_LOCAL
		       ? ipcache_lookup(backend.backend_address)
		       : NULL;
	if (dest && dest->tunnel_endpoint)
		return nodeport_to_remote(skb, pkt, &backend, cfg, dest->tunnel_endpoint, now);
	return nodeport_to_local(skb, pkt, &backend, cfg, now);
}

/* A reply to node_address from a backend on another node, on the connection SNATed as
 * @snat: back to the client from the frontend. Returns the verdict, or -1 to let the
 * packet pass. */
static __always_inline int nodeport_rev_snat(struct __sk_buff *skb, const struct pkt4 *pkt,
					     struct ct4_entry *snat, __u64 now)
{
	struct ct4_entry *ext;
	struct ct4_entry *fwd;
	struct ct4_key key;
	__be32 client;
	__be16 client_port;

	ext = ct_lookup(pkt, CT_NODEPORT, true);
	if (!ext)
		return -1;
	client = snat->nat_address;
	client_port = snat->nat_port;
	if (ct_account(snat, pkt, CT_FLAG_SEEN_REPLY, now))
		event_packet(skb, pkt, EVENT_CLOSE, NETDEV_DIR, 0, EVENT_F_REPLY,
			     IDENTITY_UNRESOLVED);
	ct_key_init(&key, pkt->daddr, pkt->saddr, pkt->dport, pkt->sport, pkt->proto, CT_SNAT);
	ct_release(&key, snat, pkt);
	ct_key_init(&key, client, ext->nat_address, client_port, ext->nat_port, pkt->proto,
		    CT_SNAT_PORT);
	fwd = bpf_map_lookup_elem(&ct4, &key);
	if (fwd) {
		ct_touch_reply(fwd, pkt, now);
		ct_release(&key, fwd, pkt);
	}
	return nodeport_reply(skb, pkt, ext, true, client, client_port, now, NETDEV_DIR);
}

/* A packet from_netdev leaves as it is: one for a local pod (from another node in
 * native mode, or from the world) goes straight in (host_routing.h), anything else to
 * the node's stack, uncounted. The node's own address (VXLAN, its own traffic) skips
 * the route lookup. */
static __always_inline int netdev_pass(struct __sk_buff *skb, const struct node_config *cfg,
				       const struct pkt4 *pkt)
{
	int verdict;

	if (cfg && cfg->node_address && pkt->daddr == cfg->node_address)
		return TC_ACT_OK;
	verdict = host_route_local(skb, IDENTITY_UNRESOLVED, NULL, NULL);
	return verdict >= 0 ? verdict : TC_ACT_OK;
}

/* An ICMP error to node_address (@pkt, PARSE_IPV4) about a connection SNATed to it,
 * found by the quoted tuple as it left the node: to the pod of a masqueraded connection,
 * or to the client of an external frontend's connection to a backend on another node. */
static __always_inline int snat_icmp_error(struct __sk_buff *skb, const struct pkt4 *pkt)
{
	struct ct4_entry *snat;
	struct pkt4 quoted;
	int verdict;

	if (!parse_icmp_quote(skb, pkt, &quoted) || quoted.saddr != pkt->daddr ||
	    !snat_port_range(quoted.sport))
		return TC_ACT_OK;
	snat = ct_lookup(&quoted, CT_SNAT, false);
	if (!snat)
		return TC_ACT_OK;
	if (snat->flags & CT_FLAG_MASQUERADE)
		return masquerade_icmp_error(skb, pkt, &quoted, snat);
	verdict = nodeport_icmp_error(skb, pkt, &quoted, snat->nat_address, snat->nat_port,
				      NETDEV_DIR);
	return verdict >= 0 ? verdict : TC_ACT_OK;
}

SEC("classifier")
int from_netdev(struct __sk_buff *skb)
{
	struct ct4_entry *snat;
	struct node_config *cfg;
	struct lb4_service *svc;
	enum parse_result parsed;
	struct pkt4 pkt;
	__u64 now;
	int verdict;

	parsed = parse_ipv4(skb, &pkt);
	cfg = node_config_get();
	if (parsed == PARSE_IPV4 && cfg && cfg->node_address && pkt.daddr == cfg->node_address)
		return snat_icmp_error(skb, &pkt);
	if (parsed == PARSE_L4 && tunnel_addressed(cfg, &pkt)) {
		verdict = tunnel_receive(skb, &pkt);
		return verdict >= 0 ? verdict : TC_ACT_OK;
	}
	/* Pings take part for their replies to masqueraded ones. */
	if (parsed != PARSE_L4 || !snat_translated(skb, &pkt, ICMP_ECHOREPLY))
		return netdev_pass(skb, cfg, &pkt);
	now = ct_now();

	if (cfg && cfg->node_address && pkt.daddr == cfg->node_address &&
	    snat_port_range(pkt.dport)) {
		snat = ct_lookup(&pkt, CT_SNAT, true);
		if (snat && (snat->flags & CT_FLAG_MASQUERADE))
			return masquerade_rev_snat(skb, &pkt, snat, now);
		if (snat) {
			verdict = nodeport_rev_snat(skb, &pkt, snat, now);
			if (verdict >= 0)
				return verdict;
		}
	}

	if (!lb4_balanced(pkt.proto))
		return netdev_pass(skb, cfg, &pkt);
	svc = lb4_lookup(pkt.daddr, pkt.dport, pkt.proto, 0);
	if (svc && (svc->flags & SVC_FLAGS_EXTERNAL))
		return nodeport_lb(skb, &pkt, svc, cfg, now);
	return netdev_pass(skb, cfg, &pkt);
}

/* An ICMP error (@pkt, PARSE_IPV4) leaving by the underlay device about a translated
 * connection: a pod's about its masqueraded connection leaves from node_address, naming
 * the SNATed tuple; the node's own (fragmentation needed while forwarding to a local
 * backend narrower than the underlay) about an external frontend's connection names the
 * frontend again. */
static __always_inline int icmp_error_to_netdev(struct __sk_buff *skb, const struct pkt4 *pkt,
						const struct node_config *cfg)
{
	struct pkt4 quoted;
	int verdict;
	bool err;

	if (!parse_icmp_quote(skb, pkt, &quoted) || quoted.saddr != pkt->daddr)
		return TC_ACT_OK;
	if (cfg->masquerade && cfg->node_address) {
		verdict = masquerade_icmp_error_out(skb, pkt, &quoted, cfg->node_address);
		if (verdict >= 0)
			return verdict;
	}
	/* The route chose this device: only the quote changes. */
	if (nodeport_icmp_error_nat(skb, pkt, &quoted, quoted.saddr, quoted.sport, &err) && err)
		return verdict_drop(skb, pkt, DROP_WRITE_ERROR, METRIC_DIR_EGRESS);
	return TC_ACT_OK;
}

SEC("classifier")
int to_netdev(struct __sk_buff *skb)
{
	struct node_config *cfg = node_config_get();
	enum parse_result parsed;
	__u8 proto = 0;
	struct pkt4 pkt;

	if (!cfg)
		return TC_ACT_OK;
	/* Without masquerading only ICMP errors are translated here: the rest (tunnel and
	 * the node's own traffic) is spared the parse. */
	if ((!cfg->masquerade || !cfg->node_address) &&
	    (bpf_skb_load_bytes(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, protocol), &proto,
				sizeof(proto)) < 0 ||
	     proto != IPPROTO_ICMP))
		return TC_ACT_OK;
	parsed = parse_ipv4(skb, &pkt);
	if (parsed == PARSE_IPV4)
		return icmp_error_to_netdev(skb, &pkt, cfg);
	if (!cfg->masquerade || !cfg->node_address || parsed != PARSE_L4 ||
	    !snat_translated(skb, &pkt, ICMP_ECHO) || !masquerade_wanted(&pkt))
		return TC_ACT_OK;
	return masquerade(skb, &pkt, cfg->node_address, ct_now());
}

char _license[] SEC("license") = "Dual BSD/GPL";
