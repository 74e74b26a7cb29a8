// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Socket load balancing, on two cgroups (never the root cgroup: the agent refuses it):
 * the one the node's own processes live in (sock4_*), and the parent of the node's pods'
 * cgroups (pod4_*, the kubelet's kubepods on a real node):
 *  sock4_connect     at cgroup/connect4:     TCP and connected UDP;
 *  sock4_sendmsg     at cgroup/sendmsg4:     unconnected UDP, per datagram;
 *  sock4_recvmsg     at cgroup/recvmsg4:     the sender of a UDP reply;
 *  sock4_getpeername at cgroup/getpeername4: the peer of a connected socket.
 * A frontend in lb4_services is rewritten to one of its backends (chosen as the tc path
 * chooses: lb.h) once, in the socket address, before any packet exists, so the packets
 * need no translation, conntrack or reverse NAT on their way (Cilium's bpf_sock.c does
 * the same). recvmsg4 and getpeername4 show the frontend again from lb4_reverse_nat_sk.
 */
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/errno.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "lib/common.h"
#include "lib/conntrack.h"
#include "lib/lb.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/parse.h"
#include "lib/tunnel.h"

#define SYS_REJECT  0
#define SYS_PROCEED 1

/* Whose sockets a program serves: the client lb.h balances for, and what the per-packet
 * path is left to do. */
enum sock_client {
	/* The node's processes: the node's address is their source, and no other program
	 * sees their packets before they leave. */
	CLIENT_NODE,
	/* A pod's processes: from_container sees every packet, and connect4 does not know
	 * the pod's address (the socket is not bound yet), so frontends whose backend or
	 * admission depends on the client's address (ClientIP affinity,
	 * loadBalancerSourceRanges) stay with from_container, which does. */
	CLIENT_POD,
};

enum xlate {
	XLATE_NONE,     /* no frontend, or one left to the per-packet path: unchanged */
	XLATE_DONE,     /* rewritten to a backend */
	XLATE_NO_BACKEND,
	XLATE_NOT_IN_SRC_RANGE, /* loadBalancerSourceRanges leave the node out */
};

/* The connection a socket opens to the frontend ctx names, as lb.h sees a flow: the
 * node (node_address; 0 until the agent wrote it) is the client, so ClientIP affinity
 * holds for all of the node's processes alike as kube-proxy's does for the node's
 * address; and the socket's cookie stands in for the source port the tc path hashes for
 * Maglev (connect4 runs before an unbound socket has one), so one socket always hashes
 * alike. */
static __always_inline void sock4_flow(struct bpf_sock_addr *ctx, enum sock_client client,
				       __u64 cookie, struct pkt4 *flow)
{
	struct node_config *cfg = client == CLIENT_NODE ? node_config_get() : NULL;

	*flow = (struct pkt4){
		.saddr = cfg ? cfg->node_address : 0,
		.daddr = ctx->user_ip4,
		.sport = (__be16)(cookie ^ (cookie >> 16) ^ (cookie >> 32) ^ (cookie >> 48)),
		.dport = (__be16)ctx->user_port,
		.proto = (__u8)ctx->protocol,
	};
}

/* Rewrites ctx's destination when it is a frontend, choosing the backend as
 * lb4_select_backend does for a new connection (affinity, Maglev or a random slot), and
 * records the frontend for the reverse direction. The node's processes and pods are
 * clients inside the cluster (lb4_cluster_frontend); the node's are judged by
 * loadBalancerSourceRanges with the node's address as their source, as the tc path judges
 * a pod by its own (a pod's frontends with ranges or affinity stay with the tc path). */
static __always_inline enum xlate sock4_xlate_fwd(struct bpf_sock_addr *ctx,
						  enum sock_client client)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct lb4_revnat_sk_key key = { .cookie = cookie };
	struct lb4_service backend = {};
	struct lb4_revnat_sk frontend = {};
	const struct lb4_service *svc;
	struct pkt4 flow;
	__u8 scope;

	sock4_flow(ctx, client, cookie, &flow);
	if (!lb4_balanced(flow.proto))
		return XLATE_NONE;
	svc = lb4_lookup(flow.daddr, flow.dport, flow.proto, 0);
	if (!svc || (svc->flags & SVC_FLAG_WILDCARD))
		return XLATE_NONE;
	if (client == CLIENT_POD && (svc->flags & SVC_FLAG_SOURCE_RANGES))
		return XLATE_NONE;
	if (!lb4_source_allowed(svc, flow.daddr, flow.dport, flow.proto, flow.saddr))
		return XLATE_NOT_IN_SRC_RANGE;
	svc = lb4_cluster_frontend(svc, flow.daddr, flow.dport, flow.proto, &scope);
	if (client == CLIENT_POD && (svc->flags & SVC_FLAG_AFFINITY))
		return XLATE_NONE;
	if (svc->count == 0 || lb4_choose_backend(&flow, svc, scope, ct_now(), &backend))
		return XLATE_NO_BACKEND;

	key.backend_address = backend.backend_address;
	key.backend_port = backend.backend_port;
	frontend.frontend_address = flow.daddr;
	frontend.frontend_port = flow.dport;
	/* Without the entry replies would show the backend: better refuse than lie. */
	if (bpf_map_update_elem(&lb4_reverse_nat_sk, &key, &frontend, BPF_ANY) < 0)
		return XLATE_NO_BACKEND;

	ctx->user_ip4 = backend.backend_address;
	ctx->user_port = (__u32)backend.backend_port;
	return XLATE_DONE;
}

/* A frontend without a backend refuses the call at once with ECONNREFUSED, as the pod
 * path's ICMP port unreachable makes a pod's connect() fail. A source outside the
 * loadBalancerSourceRanges fails with EPERM, the kernel's answer to any refusal of a
 * cgroup socket program: it is a policy verdict, not a missing service. It is counted as
 * the tc path counts its drop (DROP_NOT_IN_SRC_RANGE, egress), with no bytes since no
 * packet exists yet. */
static __always_inline int sock4_verdict(struct bpf_sock_addr *ctx, enum sock_client client)
{
	switch (sock4_xlate_fwd(ctx, client)) {
	case XLATE_NO_BACKEND:
		bpf_set_retval(-ECONNREFUSED);
		return SYS_REJECT;
	case XLATE_NOT_IN_SRC_RANGE:
		metrics_add(DROP_NOT_IN_SRC_RANGE, METRIC_DIR_EGRESS, 0);
		bpf_set_retval(-EPERM);
		return SYS_REJECT;
	default:
		return SYS_PROCEED;
	}
}

/* Shows the frontend instead of the backend the socket talks to. */
static __always_inline void sock4_xlate_rev(struct bpf_sock_addr *ctx)
{
	struct lb4_revnat_sk_key key = {
		.cookie = bpf_get_socket_cookie(ctx),
		.backend_address = ctx->user_ip4,
		.backend_port = (__be16)ctx->user_port,
	};
	struct lb4_revnat_sk *frontend;

	frontend = bpf_map_lookup_elem(&lb4_reverse_nat_sk, &key);
	if (!frontend)
		return;
	ctx->user_ip4 = frontend->frontend_address;
	ctx->user_port = (__u32)frontend->frontend_port;
}

SEC("cgroup/connect4")
int sock4_connect(struct bpf_sock_addr *ctx)
{
	return sock4_verdict(ctx, CLIENT_NODE);
}

SEC("cgroup/sendmsg4")
int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return sock4_verdict(ctx, CLIENT_NODE);
}

SEC("cgroup/recvmsg4")
int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx);
	return SYS_PROCEED;
}

SEC("cgroup/getpeername4")
int sock4_getpeername(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx);
	return SYS_PROCEED;
}

/* The pods' sockets: translated once here, so their packets reach from_container with
 * the backend as destination, a flow like any other to a pod (policy judges it by the
 * backend's identity; no service conntrack entry, no reverse NAT on the reply). */
SEC("cgroup/connect4")
int pod4_connect(struct bpf_sock_addr *ctx)
{
	return sock4_verdict(ctx, CLIENT_POD);
}

SEC("cgroup/sendmsg4")
int pod4_sendmsg(struct bpf_sock_addr *ctx)
{
	return sock4_verdict(ctx, CLIENT_POD);
}

SEC("cgroup/recvmsg4")
int pod4_recvmsg(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx);
	return SYS_PROCEED;
}

SEC("cgroup/getpeername4")
int pod4_getpeername(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx);
	return SYS_PROCEED;
}

char _license[] SEC("license") = "Dual BSD/GPL";
