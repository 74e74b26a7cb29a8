/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Layouts of every key and value that user space and the datapath share.
 * The Rust mirror is crates/common/src/maps.rs; the test `btf_layouts_match`
 * compares the two through the BTF of the compiled object, so change both.
 * All addresses and ports are in network byte order.
 */
#ifndef SLUICE_COMMON_H
#define SLUICE_COMMON_H

#include <linux/types.h>

/* ---- services: one map holds frontends (slot 0) and their backend slots ---- */

/* Key (vip, dport, proto, scope, slot). Slot 0 is the frontend; slots 1..count name
 * the backends. A key with dport 0 and proto 0 marks the VIP as known, so a
 * packet to a known VIP on an unknown port is dropped rather than routed. */
struct lb4_key {
	__be32 address;
	__be16 dport;
	__u8 proto;
	__u8 scope; /* LB4_SCOPE_* */
	__u16 slot;
	__u16 pad2;
};

/* Which clients a frontend's key serves. An external frontend with traffic policy Local
 * (SVC_FLAG_TWO_SCOPES) holds this node's backends under LB4_SCOPE_DEFAULT, for clients
 * outside the node, and every ready backend of the cluster under LB4_SCOPE_INTERNAL, for
 * the node's own processes (sock.c), which kube-proxy sends to any endpoint. */
#define LB4_SCOPE_DEFAULT  0
#define LB4_SCOPE_INTERNAL 1

/* Frontend (slot 0): count, flags and the frontend's options. Backend slot: backend
 * address and port. */
#ifndef SLUICE_LAYOUT_V1
struct lb4_service {
	__be32 backend_address;
	__be16 backend_port;
	__u16 count;
	__u16 flags;            /* SVC_FLAG_* (frontend) */
	__u16 maglev_size;      /* SVC_FLAG_MAGLEV: M, the prime size of its table (frontend) */
	__u32 affinity_timeout; /* sessionAffinity ClientIP: seconds (frontend) */
};
#else
/* Layout 1 (Lb4ServiceV1 in crates/common), built only into the test objects that the
 * upgrade test (crates/datapath/tests/migrate.rs) runs as the previous agent's datapath. */
struct lb4_service {
	__be32 backend_address;
	__be16 backend_port;
	__u16 flags;
	__u32 count;
	__u32 affinity_timeout;
	__u16 maglev_size;
	__u16 pad;
};
#endif

/* What kind of frontend a key is; one Service yields several (seed 003: ClusterIP,
 * NodePort and LoadBalancer VIP). NodePort frontends sit on this node's own addresses. */
#define SVC_FLAG_CLUSTER_IP    (1 << 0)
#define SVC_FLAG_WILDCARD      (1 << 1) /* the VIP itself, any port */
#define SVC_FLAG_NODE_PORT     (1 << 2)
#define SVC_FLAG_EXTERNAL_IP   (1 << 3)
#define SVC_FLAG_LOAD_BALANCER (1 << 4)
/* externalTrafficPolicy (external frontends) or internalTrafficPolicy (ClusterIP)
 * Local: the slots hold this node's backends only, the client's source address is
 * kept, and a frontend without slots refuses at once. */
#define SVC_FLAG_LOCAL         (1 << 5)
#define SVC_FLAG_SOURCE_RANGES (1 << 6) /* loadBalancerSourceRanges apply */
#define SVC_FLAG_AFFINITY      (1 << 7) /* sessionAffinity ClientIP */
#define SVC_FLAG_MAGLEV        (1 << 8) /* backends chosen by the Maglev table */
#define SVC_FLAG_TWO_SCOPES    (1 << 9) /* a LB4_SCOPE_INTERNAL frontend exists beside it */

/* Backends are keyed by address so conntrack can name a backend without an
 * allocated ID; presence in this map means the backend may take traffic. */
struct lb4_backend_key {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct lb4_backend {
	__u8 state; /* BACKEND_STATE_* */
	__u8 pad[3];
};

#define BACKEND_STATE_ACTIVE 0

/* ---- socket load balancing: the node's own sockets (bpf/sock.c) ----
 * connect4 and sendmsg4 rewrite a frontend to a backend in the socket address; this
 * entry lets recvmsg4 and getpeername4 show the frontend again (Cilium's
 * lb4_reverse_nat_sk). Keyed by socket cookie and backend, as one UDP socket may
 * talk to several frontends. */
struct lb4_revnat_sk_key {
	__u64 cookie;
	__be32 backend_address;
	__be16 backend_port;
	__u16 pad;
};

struct lb4_revnat_sk {
	__be32 frontend_address;
	__be16 frontend_port;
	__u16 pad;
};

/* ---- sessionAffinity ClientIP: the backend each client last got from a frontend ---- */

struct lb4_affinity_key {
	__be32 client;  /* the client's address */
	__be32 address; /* the frontend */
	__be16 dport;
	__u8 proto;
	__u8 pad;
};

/* The backend, and when a new connection last went to it by this entry: the timeout
 * counts from there, as with kube-proxy's `recent` match and Cilium's affinity map. */
struct lb4_affinity {
	__u64 last_used_ns;
	__be32 backend_address;
	__be16 backend_port;
	__u16 pad;
};

/* loadBalancerSourceRanges: LPM trie of the sources each load balancer frontend with
 * SVC_FLAG_SOURCE_RANGES admits. The frontend part of the key is always matched whole,
 * so prefixlen is LB4_SOURCE_RANGE_PREFIX plus the source prefix. */
struct lb4_source_range {
	__be32 address; /* frontend */
	__be16 dport;
	__u8 proto;
	__u8 pad;
	__be32 source;
};

struct lb4_source_range_key {
	__u32 prefixlen;
	struct lb4_source_range range;
};

#define LB4_SOURCE_RANGE_PREFIX 64 /* bits of address, dport, proto and pad */

/* ---- Maglev: per frontend, a table of M backend slot numbers (M prime) ----
 * The inner array packs LB4_MAGLEV_SLOTS_PER_ENTRY u16 slots into each element, since the
 * kernel rounds every array element up to 8 bytes: M * 2 bytes per frontend. Entry i / 4,
 * lane i % 4 holds table position i. */
#define LB4_MAGLEV_SLOTS_PER_ENTRY 4

/* ---- conntrack: one LRU map, node-wide ---- */

/* Scopes keep the entries of one connection apart:
 *  CT_EGRESS  - tuple as it leaves a pod after translation; nat_* hold the
 *               frontend to restore on replies (0 when no service was used).
 *  CT_INGRESS - tuple as it enters a pod; replies from the pod match it.
 *  CT_SERVICE - tuple as the client sent it to the VIP; nat_* hold the chosen
 *               backend so every packet of the connection goes there. */
#define CT_EGRESS  0
#define CT_INGRESS 1
#define CT_SERVICE 2
/* Connections from outside the node to an external frontend (NodePort, externalIP,
 * LoadBalancer VIP), made by from_netdev (nodeport.h):
 *  CT_NODEPORT  - tuple as it reaches the backend (after DNAT, and SNAT when the backend
 *                 is on another node); nat_* hold the frontend to restore on replies,
 *                 ifindex the device replies leave by (the client's, or the tunnel).
 *  CT_SNAT      - tuple as it reaches a backend on another node, source node_address:port;
 *                 nat_* hold the client, the destination of the replies.
 *  CT_SNAT_PORT - tuple as the client sent it to the frontend; nat_* hold the
 *                 node_address:port it is SNATed to, so every packet keeps the same port. */
#define CT_NODEPORT  3
#define CT_SNAT      4
#define CT_SNAT_PORT 5

struct ct4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 scope;
	__u16 pad;
};

#ifndef SLUICE_LAYOUT_V1
struct ct4_entry {
	__u64 created_ns;
	__u64 last_seen_ns;
	__u64 packets;
	__u64 bytes;
	__be32 nat_address;
	__be16 nat_port;
	__u8 flags;          /* CT_FLAG_* */
	__u8 tcp_flags_seen; /* TCP flags seen in either direction */
	__u32 ifindex;       /* endpoint interface that created the entry */
	__u32 pad;
};
#else
/* Layout 1 (Ct4EntryV1 in crates/common), for the upgrade test only: 32-bit counters. */
struct ct4_entry {
	__u64 created_ns;
	__u64 last_seen_ns;
	__u32 packets;
	__u32 bytes;
	__be32 nat_address;
	__be16 nat_port;
	__u8 flags;
	__u8 tcp_flags_seen;
	__u32 ifindex;
	__u32 pad;
};
#endif

#define CT_FLAG_LOOPBACK   (1 << 0) /* hairpin: source rewritten to LOOPBACK_IPV4 */
#define CT_FLAG_SEEN_REPLY (1 << 1)
#define CT_FLAG_CLOSING    (1 << 2) /* FIN or RST seen */
#define CT_FLAG_MASQUERADE (1 << 3) /* CT_SNAT: a pod's connection out of the cluster */
#define CT_FLAG_NODEPORT   (1 << 4) /* CT_INGRESS: reached the pod through an external frontend */
/* A FIN seen in the direction of the entry's tuple, and in the reply direction: once both
 * were, the next segment without FIN (the last ACK) ends the connection (ct_closed). */
#define CT_FLAG_FIN_ORIGINAL (1 << 5)
#define CT_FLAG_FIN_REPLY    (1 << 6)

/* How long an idle entry keeps describing its connection, in seconds, by state: a TCP
 * connection is in SYN until its entry sees a reply (CT_FLAG_SEEN_REPLY), established
 * after that, closing once a FIN or RST was seen (CT_FLAG_CLOSING). One entry (index 0),
 * written by the agent from its flags whenever it loads the datapath; the datapath and
 * the agent's conntrack GC both judge expiry by it. */
struct ct_config {
	__u32 tcp_syn_s;
	__u32 tcp_established_s;
	__u32 tcp_closing_s;
	__u32 non_tcp_s;
};

/* What conntrack saw that no entry shows (index 0 of the per-CPU `ct_stats`), read by
 * the agent for `status` and the metrics. */
struct ct_stats {
	/* Entries written for new connections (ct_write), overwrites of a stale entry
	 * included: an upper bound of what the table grew by, which lets the agent skip
	 * counting the table while it cannot have reached its pressure threshold. */
	__u64 created;
	/* TCP segments to a frontend that do not open a connection (not a pure SYN) and found
	 * no CT_SERVICE entry: the entry of a live connection was evicted or removed, and the
	 * flow hash chose its backend again (lb4_select_backend). */
	__u64 service_lost;
};

/* ---- flow cache: the established path (flow.h) ----
 * A packet of an established connection between two pods of this node is decided once
 * by the slow path (parse, conntrack of both ends, service translation, host routing);
 * the decision is kept under the packet's tuple as it leaves the source pod, and the
 * flow's next packets only apply it. */
struct flow4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
	__u32 ifindex; /* the source pod's host-side veth: the entry passed its anti-spoofing */
};

struct flow4_entry {
	__u64 decided_jiffies; /* the kernel's tick count when the slow path decided it */
	__be32 saddr;      /* the packet as it enters the destination pod */
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 ifindex;     /* the destination pod's host-side veth, or the underlay device */
	__u32 generation;  /* flow4_generation when decided */
	__u8 dmac[6];      /* the destination pod's MAC */
	__u8 smac[6];      /* its veth's MAC, the sender as the node would write it */
	__u8 tcp_flags;    /* TCP flags the slow path accounted to both ends' entries */
	__u8 l4_csum;      /* FLOW4_L4_CSUM_*: what the L4 checksum field held when decided */
	__u16 mtu;         /* the destination veth's MTU when decided */
	__u16 l4_csum_delta; /* what the rewrite adds to the field, as l4_csum says */
	__u16 pseudo_base;   /* the key's addresses and protocol summed as in the pseudo-header */
	__be32 next_hop;     /* the node it is sent to through ifindex (no MACs, no TTL
			      * written); 0 for a local pod */
	__u32 tunnel;        /* FLOW4_TUNNEL | the VNI (the sender's identity) when it is sent
			      * through the tunnel, ifindex then the tunnel device; else 0 */
};

/* flow4_entry.tunnel's flag: a VNI has 24 bits, and 0 may be one. */
#define FLOW4_TUNNEL 0x80000000U

/* One slot of the flow cache, an array indexed by a hash of the key (flow_cache.h): the
 * decision and the key it is for. @seq is odd while the slow path writes the slot, and
 * moves on with every write, so a reader knows a whole decision from a torn one. */
struct flow4_slot {
	__u32 seq;
	struct flow4_key key;
	struct flow4_entry entry;
};

/* What a flow's L4 checksum field holds (flow_cache.h): none (a UDP zero), a complete
 * checksum (every rewritten field changes it), or an offload's pseudo-header sum (only
 * the addresses change it: the device sums the rest). */
#define FLOW4_L4_CSUM_ABSENT 0
#define FLOW4_L4_CSUM_FULL   1
#define FLOW4_L4_CSUM_PSEUDO 2

/* How long a decision holds, in kernel ticks: past it the slow path decides again, which
 * also refreshes the conntrack entries the cached packets did not touch (their last_seen,
 * counters and flags lag by at most this; every lifetime is whole seconds). Ticks, as
 * reading them is one load where a clock is a helper call: 500 ms at HZ=100, 200 ms at
 * the usual 250, 50 ms at 1000. */
#define FLOW4_DECISION_JIFFIES 50

/* What host routing found for a local pod's address (host_routing.h), kept in
 * `host_route4`, an array indexed by a hash of the address: the pod's host-side veth, its
 * MTU and the MACs to deliver with. Held as a flow cache decision is (the generation,
 * FLOW4_DECISION_JIFFIES); @seq as in struct flow4_slot. */
struct host_route4 {
	__u32 seq;
	__be32 daddr;
	__u64 decided_jiffies;
	__u32 ifindex;
	__u32 generation; /* flow4_generation when found */
	__u8 dmac[6];
	__u8 smac[6];
	__u16 mtu;
	__u8 pad[2];
};

/* What the flow cache did, per CPU (index 0 of `flow4_stats`). */
struct flow4_stats {
	__u64 hits;    /* packets forwarded from the cache */
	__u64 decided; /* decisions recorded by the slow path */
};

/* Source address for hairpin connections, so the backend's reply to its own
 * service leaves the pod instead of looping inside it (Cilium's IPV4_LOOPBACK). */
#define LOOPBACK_IPV4_HOST_ORDER 0xa9fe2a01 /* 169.254.42.1 */

/* ---- endpoints: local pods, keyed by the ifindex of their host-side veth ---- */

struct endpoint_info {
	__be32 ipv4;
	__u32 identity;
	__u32 flags; /* ENDPOINT_F_* */
	__u32 pad;
};

/* A direction is enforced once any NetworkPolicy selects the pod for it; an
 * unenforced direction allows every new connection. */
#define ENDPOINT_F_INGRESS_ENFORCED (1 << 0)
#define ENDPOINT_F_EGRESS_ENFORCED  (1 << 1)
/* The computed policy did not fit the endpoint's policy map: no map is installed
 * and every new connection in an enforced direction is dropped (fail closed). */
#define ENDPOINT_F_POLICY_OVERFLOW  (1 << 2)

/* ---- identities (numbers as in Cilium's numericidentity.go) ---- */

#define IDENTITY_ANY        0 /* in policy keys: any remote identity */
#define IDENTITY_HOST       1 /* this node */
#define IDENTITY_WORLD      2 /* outside the cluster, 0.0.0.0/0 */
#define IDENTITY_REMOTE_NODE 6
#define IDENTITY_FIRST_ALLOCATED 256 /* label identities, below IDENTITY_SCOPE_CIDR */
#define IDENTITY_SCOPE_CIDR (0x01 << 24) /* scope bits of the identities of policy CIDRs */

/* ---- ipcache: LPM trie from address prefix to identity ---- */

struct ipcache_key {
	__u32 prefixlen; /* LPM prefix, 0..32 */
	__be32 address;
};

struct ipcache_entry {
	__u32 identity;
	__be32 tunnel_endpoint; /* node that hosts the address; 0: this node or the world */
};

/* ---- node: how this node reaches the others ---- */

#define ROUTING_MODE_LOCAL  0 /* one node: the node's stack routes every packet */
#define ROUTING_MODE_TUNNEL 1 /* VXLAN to the node in the ipcache, identity in the VNI */
#define ROUTING_MODE_NATIVE 2 /* the underlay routes pod addresses: straight to the node */

/* One entry (index 0), written by the agent at start. */
struct node_config {
	__u32 tunnel_ifindex;   /* the collect-metadata VXLAN device (tunnel mode) */
	__u32 underlay_ifindex; /* the device toward the other nodes (native mode) */
	__u8 routing_mode;      /* ROUTING_MODE_* */
	__u8 masquerade;        /* 1: pod traffic leaving the cluster is SNATed (to_netdev) */
	__be16 tunnel_port;     /* VXLAN's UDP port: the datapath encapsulates and decapsulates
				 * pod traffic itself; 0: only the tunnel device does */
	__be32 node_address;    /* the node's InternalIP: source of SNATed external traffic */
};

/* ---- policy: per endpoint, an LPM trie inside a hash of maps keyed by ifindex ----
 * The remote identity and the direction always match whole; the protocol and the
 * destination port may be wildcarded by a shorter prefix, and a port range is a set
 * of power-of-two aligned port prefixes (Cilium's PortRangeToMaskedPorts). */
#define POLICY_INGRESS 0
#define POLICY_EGRESS  1

/* The matched part of a policy key, what follows the LPM prefix length. */
struct policy_match {
	__u32 identity;   /* remote identity; IDENTITY_ANY matches every peer */
	__u8 direction;   /* POLICY_INGRESS or POLICY_EGRESS */
	__u8 proto;
	__be16 dport;     /* the destination port, after service translation */
};

struct policy_key {
	__u32 prefixlen;  /* bits of `rule` that must match */
	struct policy_match rule;
};

#define POLICY_PREFIX_ANY_PROTO 40 /* identity and direction only */
#define POLICY_PREFIX_ANY_PORT  48 /* plus the protocol */
#define POLICY_PREFIX_FULL      64 /* plus the whole port */

/* An allow row. The counters count the packets the row admitted (each the first
 * packet of a connection: policy judges new connections only). */
struct policy_entry {
	__u64 packets;
	__u64 bytes;
};

/* ---- fragments: the L4 ports of a datagram, learned from its first fragment ---- */

struct frag4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;
	__u8 proto;
	__u8 pad;
};

struct frag4_ports {
	__be16 sport;
	__be16 dport;
};

/* ---- flow events: one ring buffer the agent's observer drains ----
 * Allowed traffic yields events per connection, never per packet: the first packet
 * (TRACE, with the service translation if any; POLICY_VERDICT where policy judged it)
 * and, for TCP, the first FIN or RST (CLOSE). Every drop yields a DROP event. Events are
 * rate-limited per CPU; what is suppressed or lost is counted in `event_counters`. */
#define EVENT_DROP           1 /* Hubble's monitor type numbers */
#define EVENT_TRACE          4
#define EVENT_POLICY_VERDICT 5
#define EVENT_CLOSE          6 /* sluice's own: first FIN/RST of a TCP connection */

#define EVENT_F_SERVICE (1 << 0) /* translated: orig_daddr:orig_dport was the frontend */
#define EVENT_F_REPLY   (1 << 1) /* the packet travels in the reply direction */
#define EVENT_F_DENIED  (1 << 2) /* POLICY_VERDICT: denied (reason says why) */
#define EVENT_F_HOST_ROW (1 << 3) /* POLICY_VERDICT: allowed by the reserved:host row */

struct flow_event {
	__u64 time_ns;        /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	__u8 type;            /* EVENT_* */
	__u8 direction;       /* METRIC_DIR_*: egress leaves the pod, ingress enters it */
	__u8 reason;          /* DROP_* for drops and denials; 0 otherwise */
	__u8 proto;
	__u8 tcp_flags;
	__u8 flags;           /* EVENT_F_* */
	__u16 pad;
	__u32 ifindex;        /* the endpoint's host-side veth */
	__u32 src_identity;
	__u32 dst_identity;
	__be32 saddr;         /* as the endpoint sees it: after DNAT on egress */
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__be32 orig_daddr;    /* the service frontend before DNAT (EVENT_F_SERVICE) */
	__be16 orig_dport;
	__u16 pad2;
	__u32 len;            /* bytes of the packet */
	__u32 pad3;
};

/* Which events to emit, and how many per second per CPU (token bucket). */
#define EVENT_CONFIG_F_ENABLED (1 << 0)
struct event_config {
	__u32 flags;          /* EVENT_CONFIG_F_* */
	__u32 rate;           /* events per second per CPU; 0: no limit */
	__u32 burst;          /* bucket size */
	__u32 pad;
};

/* Per event type and direction (index type * 2 + direction): emitted, suppressed by
 * the rate limit, lost because the ring buffer was full. */
#define EVENT_COUNTERS_MAX (8 * 2)
struct event_counter {
	__u64 emitted;
	__u64 suppressed;
	__u64 lost;
};

/* ---- metrics: per-CPU packet and byte counters by reason and direction ---- */

#define METRIC_DIR_EGRESS  0 /* leaving a pod (from_container) */
#define METRIC_DIR_INGRESS 1 /* entering a pod (to_container) */
#define METRICS_MAX (256 * 2)

/* Index is reason * 2 + direction; reason 0 counts forwarded packets. */
struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

/* ---- drop reasons (metrics index and, later, flow events) ----
 * Numbers follow Cilium's drop_reasons.h where the meaning is the same;
 * 210 and up are sluice's own. Mirrored by DropReason in crates/common. */
#define REASON_FORWARDED             0
#define DROP_INVALID_SOURCE        132 /* pod sent from an address not its own */
#define DROP_POLICY                133 /* no policy row allows the new connection */
#define DROP_INVALID               134 /* malformed IPv4 or L4 header */
#define DROP_FRAG_NEEDED           136 /* DF packet larger than the path: answered with ICMP */
#define DROP_UNKNOWN_L3            139 /* neither IPv4 nor ARP (IPv6 is not supported yet) */
#define DROP_WRITE_ERROR           141 /* a packet rewrite helper failed */
#define DROP_NO_TUNNEL_KEY         147 /* a packet on the tunnel device without tunnel metadata */
#define DROP_CT_CREATE_FAILED      155 /* conntrack entry could not be written */
#define DROP_NO_SERVICE            158 /* service has no ready backend: rejected */
#define DROP_NO_TUNNEL_ENDPOINT    160 /* no node in the ipcache for a tunneled destination */
#define DROP_NAT_NO_MAPPING        167 /* no free SNAT port toward the backend */
#define DROP_INVALID_IDENTITY      171 /* the tunnel carried an identity no pod or node has */
#define DROP_UNKNOWN_SENDER        172 /* a tunnel packet from an address that is no node */
#define DROP_FRAG_NOT_FOUND        175 /* later fragment whose first fragment was not seen */
#define DROP_NOT_IN_SRC_RANGE      177 /* source outside the frontend's loadBalancerSourceRanges */
#define DROP_SERVICE_PORT_UNKNOWN  210 /* known VIP, no frontend for this port */
#define DROP_NO_BACKEND_SLOT       211 /* frontend count points past its slots */
#define DROP_POLICY_UNAVAILABLE    212 /* enforced endpoint without a realized policy map (overflow): fail closed */
#define DROP_NO_NODE_ADDRESS       213 /* external frontend's backend on another node, no node_address to SNAT to */
#define DROP_SLOT_BACKEND_MISSING  214 /* a backend slot names a backend lb4_backends does not hold */

#endif
