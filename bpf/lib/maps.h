/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * BTF map definitions, one per entry of the map registry (crates/common/src/registry.rs
 * `MAPS`; a test compares the two). Names are the pin names;
 * user space pins every map itself, so no `pinning` attribute here.
 */
#ifndef SLUICE_MAPS_H
#define SLUICE_MAPS_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>

#include "common.h"

#define LB4_SERVICES_MAX (1 << 20) /* user space may override with set_max_entries */
#define LB4_BACKENDS_MAX (1 << 20)
#define CT4_MAX          65536 /* user space may override with set_max_entries */
#define ENDPOINTS_MAX    4096
#define IPCACHE_MAX      (1 << 19) /* pods, nodes and policy CIDRs of the whole cluster */
#define LB4_SOURCE_RANGES_MAX 65536
#define POLICY_MAX       16384 /* template only: user space sizes each endpoint's map */
#define FRAG4_MAX        8192
#define LB4_REVNAT_SK_MAX 65536 /* sockets of the node talking to frontends */
#define EVENTS_RING_SIZE (1 << 20) /* 1 MiB: about 17,000 events */
#define NON_MASQ_CIDRS_MAX 1024 /* ip-masq-agent nonMasqueradeCIDRs */
#define LB4_AFFINITY_MAX 65536 /* clients x frontends with sessionAffinity, as Cilium's */
#define LB4_MAGLEV_MAX   8192  /* Maglev frontends per node */
#define LB4_MAGLEV_TABLE_ENTRIES 4096 /* template only: user space sizes each table */
#define FLOW4_MAX        65536 /* a cache: an evicted flow is decided again; a power of two */
#define HOST_ROUTE4_MAX  4096  /* a cache of local pods' routes; a power of two */

/* The service, backend and endpoint maps are written by user space only, so they
 * need no preallocation (Cilium does the same); LRU maps are always preallocated. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_key);
	__type(value, struct lb4_service);
	__uint(max_entries, LB4_SERVICES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} lb4_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_backend_key);
	__type(value, struct lb4_backend);
	__uint(max_entries, LB4_BACKENDS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} lb4_backends SEC(".maps");

/* Presence admits the source; the value is unused. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lb4_source_range_key);
	__type(value, __u32);
	__uint(max_entries, LB4_SOURCE_RANGES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} lb4_source_ranges SEC(".maps");

/* Runtime state like conntrack: written by the datapath, never realized. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_affinity_key);
	__type(value, struct lb4_affinity);
	__uint(max_entries, LB4_AFFINITY_MAX);
} lb4_affinity SEC(".maps");

/* One table per Maglev frontend, swapped in whole like a policy map. BPF_F_INNER_MAP lets
 * each table have its own max_entries (M / 4 rounded up), so the table size can change
 * without reloading the programs. */
struct lb4_maglev_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u16) * LB4_MAGLEV_SLOTS_PER_ENTRY);
	__uint(max_entries, LB4_MAGLEV_TABLE_ENTRIES);
	__uint(map_flags, BPF_F_INNER_MAP);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__type(key, struct lb4_key); /* the frontend (slot 0) */
	__uint(max_entries, LB4_MAGLEV_MAX);
	__array(values, struct lb4_maglev_inner);
} lb4_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct4_key);
	__type(value, struct ct4_entry);
	__uint(max_entries, CT4_MAX);
} ct4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32); /* always 0 */
	__type(value, struct ct_config);
	__uint(max_entries, 1);
} ct_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32); /* always 0 */
	__type(value, struct ct_stats);
	__uint(max_entries, 1);
} ct_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); /* ifindex of the host-side veth */
	__type(value, struct endpoint_info);
	__uint(max_entries, ENDPOINTS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_entry);
	__uint(max_entries, IPCACHE_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ipcache SEC(".maps");

/* The inner definition names sizes rather than types: a struct reached only through
 * __array would be emitted as a BTF forward declaration without a size. The kernel
 * does not compare max_entries of LPM inner maps, so each endpoint's map is created
 * by user space with the configured capacity. */
struct policy_inner {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(key_size, sizeof(struct policy_key));
	__uint(value_size, sizeof(struct policy_entry));
	__uint(max_entries, POLICY_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__type(key, __u32); /* ifindex of the host-side veth */
	__uint(max_entries, ENDPOINTS_MAX);
	__array(values, struct policy_inner);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag4_key);
	__type(value, struct frag4_ports);
	__uint(max_entries, FRAG4_MAX);
} frag4 SEC(".maps");

/* Written by the socket programs only; an entry lives as long as LRU keeps it, as the
 * kernel tells no program when a socket closes. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_revnat_sk_key);
	__type(value, struct lb4_revnat_sk);
	__uint(max_entries, LB4_REVNAT_SK_MAX);
} lb4_reverse_nat_sk SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32); /* reason * 2 + direction */
	__type(value, struct metrics_value);
	__uint(max_entries, METRICS_MAX);
} metrics SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32); /* always 0 */
	__type(value, struct node_config);
	__uint(max_entries, 1);
} node_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, EVENTS_RING_SIZE);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32); /* always 0 */
	__type(value, struct event_config);
	__uint(max_entries, 1);
} event_config SEC(".maps");

/* The rate limit's bucket: tokens left and when it was last refilled. */
struct event_bucket {
	__u64 tokens;
	__u64 refilled_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32); /* always 0 */
	__type(value, struct event_bucket);
	__uint(max_entries, 1);
} event_bucket SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32); /* type * 2 + direction */
	__type(value, struct event_counter);
	__uint(max_entries, EVENT_COUNTERS_MAX);
} event_counters SEC(".maps");

/* nonMasqueradeCIDRs: pod traffic to these prefixes keeps the pod's address. Presence
 * exempts; the value is unused. Written by the agent at start from its flags. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, __u32);
	__uint(max_entries, NON_MASQ_CIDRS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} non_masq_cidrs SEC(".maps");

/* The Ethernet addresses of a delivered frame: the pod's MAC, and its veth's as the
 * sender, as the node's neighbour output would have written them. */
struct eth_addrs {
	__u8 dest[ETH_ALEN];
	__u8 source[ETH_ALEN];
};

/* One packet of from_container: its tuple, and what the slow path learnt about it, for
 * flow_record (flow_cache.h). In a per-CPU map rather than on the stack: the slow path's
 * stack has no room left, and the verifier forks no state over what it writes there. */
struct flow_note {
	struct flow4_key key; /* the packet as it left the pod; zero when it may not use
			       * the cache (flow_parse) */
	__u8 tcp_flags;       /* its TCP flags */
	/* The flags (CT_FLAG_*) of the conntrack entry each end accounted the packet to, if
	 * any: kept raw, so noting them forks no verifier state; flow_record judges them. */
	__u8 source_flags;
	__u8 dest_flags;
	__u8 encapsulated;   /* the datapath wrapped it in VXLAN (tunnel_encap) already */
	__u32 ifindex;       /* the destination pod's veth, once host routing delivered it,
			      * or the device forward_to_node sent it to (the tunnel device
			      * even when the datapath encapsulates) */
	struct eth_addrs macs;
	__be32 next_hop;     /* the node forward_to_node sent it to (flow_note_remote), or 0 */
	__u32 tunnel;        /* as flow4_entry.tunnel */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32); /* always 0 */
	__type(value, struct flow_note);
	__uint(max_entries, 1);
} flow4_notes SEC(".maps");

/* The flow cache (flow_cache.h): established flows' decisions, written by the datapath.
 * An array indexed by a hash of the flow's key, not a hash map: the verifier inlines an
 * array's lookup, where a hash map's is a call. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32); /* flow_slot_index */
	__type(value, struct flow4_slot);
	__uint(max_entries, FLOW4_MAX);
} flow4 SEC(".maps");

/* Bumped by the realizer after every pass that changed a map: a decision of an older
 * generation is taken again, so no removed backend or endpoint is served from the cache. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32); /* always 0 */
	__type(value, __u32);
	__uint(max_entries, 1);
} flow4_generation SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32); /* always 0 */
	__type(value, struct flow4_stats);
	__uint(max_entries, 1);
} flow4_stats SEC(".maps");

/* Host routing's routes to local pods (host_routing.h), written by the datapath: an
 * inlined array lookup instead of bpf_fib_lookup and the endpoints check. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32); /* host_route_slot */
	__type(value, struct host_route4);
	__uint(max_entries, HOST_ROUTE4_MAX);
} host_route4 SEC(".maps");

#endif
