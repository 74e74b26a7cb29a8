//! The layout of every struct shared with the datapath, for the BTF comparison test
//! (`sluice-datapath`'s `btf_layouts_match`).

use std::mem::offset_of;

use super::*;

/// A field of a shared struct: its C name and byte offset.
pub struct FieldLayout {
    pub name: &'static str,
    pub offset: usize,
}

/// A shared struct: its C name, size and fields, for the BTF comparison test.
pub struct StructLayout {
    pub name: &'static str,
    pub size: usize,
    pub fields: &'static [FieldLayout],
}

macro_rules! layout {
    ($c_name:literal, $ty:ty, [$($field:ident),* $(,)?]) => {
        StructLayout {
            name: $c_name,
            size: size_of::<$ty>(),
            fields: &[$(FieldLayout { name: stringify!($field), offset: offset_of!($ty, $field) }),*],
        }
    };
}

/// Every struct shared with the datapath, by its C name.
pub const LAYOUTS: &[StructLayout] = &[
    layout!(
        "lb4_key",
        Lb4Key,
        [address, dport, proto, scope, slot, pad2]
    ),
    layout!(
        "lb4_service",
        Lb4Service,
        [
            backend_address,
            backend_port,
            count,
            flags,
            maglev_size,
            affinity_timeout
        ]
    ),
    layout!(
        "lb4_affinity_key",
        Lb4AffinityKey,
        [client, address, dport, proto, pad]
    ),
    layout!(
        "lb4_affinity",
        Lb4Affinity,
        [last_used_ns, backend_address, backend_port, pad]
    ),
    layout!(
        "lb4_backend_key",
        Lb4BackendKey,
        [address, port, proto, pad]
    ),
    layout!("lb4_backend", Lb4Backend, [state, pad]),
    layout!(
        "lb4_source_range",
        Lb4SourceRange,
        [address, dport, proto, pad, source]
    ),
    layout!(
        "lb4_source_range_key",
        Lb4SourceRangeKey,
        [prefixlen, range]
    ),
    layout!(
        "ct4_key",
        Ct4Key,
        [saddr, daddr, sport, dport, proto, scope, pad]
    ),
    layout!(
        "ct4_entry",
        Ct4Entry,
        [
            created_ns,
            last_seen_ns,
            packets,
            bytes,
            nat_address,
            nat_port,
            flags,
            tcp_flags_seen,
            ifindex,
            pad
        ]
    ),
    layout!(
        "ct_config",
        CtConfig,
        [tcp_syn_s, tcp_established_s, tcp_closing_s, non_tcp_s]
    ),
    layout!("ct_stats", CtStats, [created, service_lost]),
    layout!(
        "flow4_key",
        Flow4Key,
        [saddr, daddr, sport, dport, proto, pad, ifindex]
    ),
    layout!(
        "flow4_entry",
        Flow4Entry,
        [
            decided_jiffies,
            saddr,
            daddr,
            sport,
            dport,
            ifindex,
            generation,
            dmac,
            smac,
            tcp_flags,
            l4_csum,
            mtu,
            l4_csum_delta,
            pseudo_base,
            next_hop,
            tunnel
        ]
    ),
    layout!("flow4_slot", Flow4Slot, [seq, key, entry]),
    layout!("flow4_stats", Flow4Stats, [hits, decided]),
    layout!(
        "host_route4",
        HostRoute4,
        [
            seq,
            daddr,
            decided_jiffies,
            ifindex,
            generation,
            dmac,
            smac,
            mtu,
            pad
        ]
    ),
    layout!("endpoint_info", EndpointInfo, [ipv4, identity, flags, pad]),
    layout!("metrics_value", MetricsValue, [packets, bytes]),
    layout!("ipcache_key", IpcacheKey, [prefixlen, address]),
    layout!("ipcache_entry", IpcacheEntry, [identity, tunnel_endpoint]),
    layout!(
        "policy_match",
        PolicyMatch,
        [identity, direction, proto, dport]
    ),
    layout!("policy_key", PolicyKey, [prefixlen, rule]),
    layout!("policy_entry", PolicyEntry, [packets, bytes]),
    layout!("frag4_key", Frag4Key, [saddr, daddr, id, proto, pad]),
    layout!("frag4_ports", Frag4Ports, [sport, dport]),
    layout!(
        "lb4_revnat_sk_key",
        Lb4RevnatSkKey,
        [cookie, backend_address, backend_port, pad]
    ),
    layout!(
        "lb4_revnat_sk",
        Lb4RevnatSk,
        [frontend_address, frontend_port, pad]
    ),
    layout!(
        "node_config",
        NodeConfig,
        [
            tunnel_ifindex,
            underlay_ifindex,
            routing_mode,
            masquerade,
            tunnel_port,
            node_address
        ]
    ),
    StructLayout {
        name: "flow_event",
        size: size_of::<FlowEvent>(),
        // `type` is a Rust keyword: the mirror calls it `type_`.
        fields: &[
            FieldLayout {
                name: "time_ns",
                offset: offset_of!(FlowEvent, time_ns),
            },
            FieldLayout {
                name: "type",
                offset: offset_of!(FlowEvent, type_),
            },
            FieldLayout {
                name: "direction",
                offset: offset_of!(FlowEvent, direction),
            },
            FieldLayout {
                name: "reason",
                offset: offset_of!(FlowEvent, reason),
            },
            FieldLayout {
                name: "proto",
                offset: offset_of!(FlowEvent, proto),
            },
            FieldLayout {
                name: "tcp_flags",
                offset: offset_of!(FlowEvent, tcp_flags),
            },
            FieldLayout {
                name: "flags",
                offset: offset_of!(FlowEvent, flags),
            },
            FieldLayout {
                name: "pad",
                offset: offset_of!(FlowEvent, pad),
            },
            FieldLayout {
                name: "ifindex",
                offset: offset_of!(FlowEvent, ifindex),
            },
            FieldLayout {
                name: "src_identity",
                offset: offset_of!(FlowEvent, src_identity),
            },
            FieldLayout {
                name: "dst_identity",
                offset: offset_of!(FlowEvent, dst_identity),
            },
            FieldLayout {
                name: "saddr",
                offset: offset_of!(FlowEvent, saddr),
            },
            FieldLayout {
                name: "daddr",
                offset: offset_of!(FlowEvent, daddr),
            },
            FieldLayout {
                name: "sport",
                offset: offset_of!(FlowEvent, sport),
            },
            FieldLayout {
                name: "dport",
                offset: offset_of!(FlowEvent, dport),
            },
            FieldLayout {
                name: "orig_daddr",
                offset: offset_of!(FlowEvent, orig_daddr),
            },
            FieldLayout {
                name: "orig_dport",
                offset: offset_of!(FlowEvent, orig_dport),
            },
            FieldLayout {
                name: "pad2",
                offset: offset_of!(FlowEvent, pad2),
            },
            FieldLayout {
                name: "len",
                offset: offset_of!(FlowEvent, len),
            },
            FieldLayout {
                name: "pad3",
                offset: offset_of!(FlowEvent, pad3),
            },
        ],
    },
    layout!("event_config", EventConfig, [flags, rate, burst, pad]),
    layout!("event_counter", EventCounter, [emitted, suppressed, lost]),
];

/// The earlier layouts the migrations convert from (`crate::migrations`), as the test
/// objects built with `-DSLUICE_LAYOUT_V1` declare them.
pub const LAYOUTS_V1: &[StructLayout] = &[
    layout!(
        "ct4_entry",
        Ct4EntryV1,
        [
            created_ns,
            last_seen_ns,
            packets,
            bytes,
            nat_address,
            nat_port,
            flags,
            tcp_flags_seen,
            ifindex,
            pad
        ]
    ),
    layout!(
        "lb4_service",
        Lb4ServiceV1,
        [
            backend_address,
            backend_port,
            flags,
            count,
            affinity_timeout,
            maglev_size,
            pad
        ]
    ),
];
