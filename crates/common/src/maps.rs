//! `#[repr(C)]` mirrors of the keys and values in `bpf/lib/common.h`.
//!
//! Addresses and ports are stored in network byte order, as the datapath reads them
//! straight from packets; the constructors below take host values and convert.

use std::{fmt, net::Ipv4Addr};

/// Names of the maps as declared in the C object; also the names they are pinned under.
pub mod names {
    pub const SERVICES: &str = "lb4_services";
    pub const BACKENDS: &str = "lb4_backends";
    pub const CONNTRACK: &str = "ct4";
    pub const ENDPOINTS: &str = "endpoints";
    pub const METRICS: &str = "metrics";
    pub const IPCACHE: &str = "ipcache";
    /// The hash of maps from endpoint ifindex to that endpoint's policy LPM trie.
    pub const POLICY: &str = "policy";
    pub const FRAGMENTS: &str = "frag4";
    /// The ring buffer of flow events.
    pub const EVENTS: &str = "events";
    pub const EVENT_CONFIG: &str = "event_config";
    pub const EVENT_BUCKET: &str = "event_bucket";
    pub const EVENT_COUNTERS: &str = "event_counters";
}

/// Names of the programs in the C object.
pub mod programs {
    /// tc ingress of the host-side veth: packets leaving the pod.
    pub const FROM_CONTAINER: &str = "from_container";
    /// tc egress of the host-side veth: packets entering the pod.
    pub const TO_CONTAINER: &str = "to_container";
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// Network-order `u32` for an address, as the datapath stores it.
pub fn addr_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Address from a network-order `u32`.
pub fn addr_from_be(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

/// Protocol name as Kubernetes spells it.
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        IPPROTO_SCTP => "SCTP",
        0 => "ANY",
        _ => "OTHER",
    }
}

// ---- services ----

pub const SVC_FLAG_CLUSTER_IP: u8 = 1 << 0;
pub const SVC_FLAG_WILDCARD: u8 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lb4Key {
    pub address: u32,
    pub dport: u16,
    pub proto: u8,
    pub pad: u8,
    pub slot: u16,
    pub pad2: u16,
}

impl Lb4Key {
    pub fn new(vip: Ipv4Addr, port: u16, proto: u8, slot: u16) -> Self {
        Self {
            address: addr_be(vip),
            dport: port.to_be(),
            proto,
            pad: 0,
            slot,
            pad2: 0,
        }
    }
    /// The key that marks `vip` as a known service address on any port.
    pub fn wildcard(vip: Ipv4Addr) -> Self {
        Self::new(vip, 0, 0, 0)
    }
    pub fn vip(&self) -> Ipv4Addr {
        addr_from_be(self.address)
    }
    pub fn port(&self) -> u16 {
        u16::from_be(self.dport)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Lb4Service {
    pub backend_address: u32,
    pub backend_port: u16,
    pub count: u16,
    pub flags: u8,
    pub pad: [u8; 3],
}

impl Lb4Service {
    /// Slot 0 of a frontend.
    pub fn frontend(count: u16, flags: u8) -> Self {
        Self {
            count,
            flags,
            ..Self::default()
        }
    }
    /// Slot 1..=count of a frontend.
    pub fn slot(backend: Ipv4Addr, port: u16) -> Self {
        Self {
            backend_address: addr_be(backend),
            backend_port: port.to_be(),
            ..Self::default()
        }
    }
    pub fn backend(&self) -> Ipv4Addr {
        addr_from_be(self.backend_address)
    }
    pub fn port(&self) -> u16 {
        u16::from_be(self.backend_port)
    }
}

pub const BACKEND_STATE_ACTIVE: u8 = 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lb4BackendKey {
    pub address: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

impl Lb4BackendKey {
    pub fn new(addr: Ipv4Addr, port: u16, proto: u8) -> Self {
        Self {
            address: addr_be(addr),
            port: port.to_be(),
            proto,
            pad: 0,
        }
    }
    pub fn addr(&self) -> Ipv4Addr {
        addr_from_be(self.address)
    }
    pub fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Lb4Backend {
    pub state: u8,
    pub pad: [u8; 3],
}

// ---- conntrack ----

pub const CT_EGRESS: u8 = 0;
pub const CT_INGRESS: u8 = 1;
pub const CT_SERVICE: u8 = 2;

pub const CT_FLAG_LOOPBACK: u8 = 1 << 0;
pub const CT_FLAG_SEEN_REPLY: u8 = 1 << 1;
pub const CT_FLAG_CLOSING: u8 = 1 << 2;

/// Source address given to hairpin connections (a pod reaching itself through a service).
pub const LOOPBACK_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ct4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub scope: u8,
    pub pad: u16,
}

impl Ct4Key {
    pub fn new(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8, scope: u8) -> Self {
        Self {
            saddr: addr_be(src.0),
            daddr: addr_be(dst.0),
            sport: src.1.to_be(),
            dport: dst.1.to_be(),
            proto,
            scope,
            pad: 0,
        }
    }
    pub fn src(&self) -> (Ipv4Addr, u16) {
        (addr_from_be(self.saddr), u16::from_be(self.sport))
    }
    pub fn dst(&self) -> (Ipv4Addr, u16) {
        (addr_from_be(self.daddr), u16::from_be(self.dport))
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ct4Entry {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    pub nat_address: u32,
    pub nat_port: u16,
    pub flags: u8,
    pub tcp_flags_seen: u8,
    pub ifindex: u32,
    pub pad: u32,
}

impl Ct4Entry {
    /// The translation stored with the entry, if any.
    pub fn nat(&self) -> Option<(Ipv4Addr, u16)> {
        (self.nat_address != 0)
            .then(|| (addr_from_be(self.nat_address), u16::from_be(self.nat_port)))
    }
}

// ---- endpoints ----

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointInfo {
    pub ipv4: u32,
    pub identity: u32,
    pub flags: u32,
    pub pad: u32,
}

impl EndpointInfo {
    pub fn new(ip: Ipv4Addr, identity: u32) -> Self {
        Self {
            ipv4: addr_be(ip),
            identity,
            flags: 0,
            pad: 0,
        }
    }
    pub fn ip(&self) -> Ipv4Addr {
        addr_from_be(self.ipv4)
    }
}

pub const ENDPOINT_F_INGRESS_ENFORCED: u32 = 1 << 0;
pub const ENDPOINT_F_EGRESS_ENFORCED: u32 = 1 << 1;
pub const ENDPOINT_F_POLICY_OVERFLOW: u32 = 1 << 2;

// ---- identities ----

/// In policy keys: any remote identity.
pub const IDENTITY_ANY: u32 = 0;
pub const IDENTITY_HOST: u32 = 1;
pub const IDENTITY_WORLD: u32 = 2;
pub const IDENTITY_REMOTE_NODE: u32 = 6;
pub const IDENTITY_FIRST_ALLOCATED: u32 = 256;
/// Scope bits of identities allocated for policy CIDRs (Cilium's local scope).
pub const IDENTITY_SCOPE_CIDR: u32 = 0x01 << 24;

// ---- ipcache ----

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct IpcacheKey {
    pub prefixlen: u32,
    pub address: u32,
}

impl IpcacheKey {
    pub fn new(address: Ipv4Addr, prefixlen: u8) -> Self {
        Self {
            prefixlen: u32::from(prefixlen),
            address: addr_be(address),
        }
    }
    pub fn addr(&self) -> Ipv4Addr {
        addr_from_be(self.address)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IpcacheEntry {
    pub identity: u32,
    /// Node hosting the address; 0 for this node and the world.
    pub tunnel_endpoint: u32,
}

impl IpcacheEntry {
    pub fn local(identity: u32) -> Self {
        Self {
            identity,
            tunnel_endpoint: 0,
        }
    }
}

// ---- policy ----

pub const POLICY_INGRESS: u8 = 0;
pub const POLICY_EGRESS: u8 = 1;
/// Prefix lengths of a policy key: identity and direction; plus protocol; plus the port.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 40;
pub const POLICY_PREFIX_ANY_PORT: u32 = 48;
pub const POLICY_PREFIX_FULL: u32 = 64;

/// The matched part of a policy key (the LPM data after the prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PolicyMatch {
    pub identity: u32,
    pub direction: u8,
    pub proto: u8,
    pub dport: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PolicyKey {
    pub prefixlen: u32,
    pub rule: PolicyMatch,
}

impl PolicyKey {
    /// Any protocol and port from `identity` in `direction`.
    pub fn any(identity: u32, direction: u8) -> Self {
        Self::with_prefix(identity, direction, 0, 0, POLICY_PREFIX_ANY_PROTO)
    }
    /// Any port of `proto`.
    pub fn any_port(identity: u32, direction: u8, proto: u8) -> Self {
        Self::with_prefix(identity, direction, proto, 0, POLICY_PREFIX_ANY_PORT)
    }
    /// Ports that share the top `port_bits` bits of `port` (16: exactly `port`).
    pub fn ports(identity: u32, direction: u8, proto: u8, port: u16, port_bits: u8) -> Self {
        let bits = u32::from(port_bits.min(16));
        let mask = if bits == 0 {
            0
        } else {
            u16::MAX << (16 - bits)
        };
        Self::with_prefix(
            identity,
            direction,
            proto,
            port & mask,
            POLICY_PREFIX_ANY_PORT + bits,
        )
    }
    fn with_prefix(identity: u32, direction: u8, proto: u8, port: u16, prefixlen: u32) -> Self {
        Self {
            prefixlen,
            rule: PolicyMatch {
                identity,
                direction,
                proto,
                dport: port.to_be(),
            },
        }
    }
    /// The first and last destination port the key matches, or None for any protocol.
    pub fn port_range(&self) -> Option<(u16, u16)> {
        if self.prefixlen < POLICY_PREFIX_ANY_PORT {
            return None;
        }
        let bits = (self.prefixlen - POLICY_PREFIX_ANY_PORT).min(16);
        let first = u16::from_be(self.rule.dport);
        let span = if bits == 0 {
            u16::MAX
        } else {
            (1u32 << (16 - bits)) as u16 - 1
        };
        Some((first, first.saturating_add(span)))
    }
}

/// An allow row's counters: packets and bytes it admitted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyEntry {
    pub packets: u64,
    pub bytes: u64,
}

// ---- fragments ----

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Frag4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Frag4Ports {
    pub sport: u16,
    pub dport: u16,
}

// ---- flow events ----

pub const EVENT_DROP: u8 = 1;
pub const EVENT_TRACE: u8 = 4;
pub const EVENT_POLICY_VERDICT: u8 = 5;
pub const EVENT_CLOSE: u8 = 6;

pub const EVENT_F_SERVICE: u8 = 1 << 0;
pub const EVENT_F_REPLY: u8 = 1 << 1;
pub const EVENT_F_DENIED: u8 = 1 << 2;
pub const EVENT_F_HOST_ROW: u8 = 1 << 3;

/// One datapath event, as written to the `events` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    pub time_ns: u64,
    pub type_: u8,
    pub direction: u8,
    pub reason: u8,
    pub proto: u8,
    pub tcp_flags: u8,
    pub flags: u8,
    pub pad: u16,
    pub ifindex: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub orig_daddr: u32,
    pub orig_dport: u16,
    pub pad2: u16,
    pub len: u32,
    pub pad3: u32,
}

impl FlowEvent {
    /// Reads an event from a ring buffer record; None if the record is too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Self>() {
            return None;
        }
        // SAFETY: FlowEvent is #[repr(C)] plain data for which every bit pattern is valid,
        // and the length was checked; read_unaligned copes with any record alignment.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

pub const EVENT_CONFIG_F_ENABLED: u32 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EventConfig {
    pub flags: u32,
    /// Events per second per CPU; 0: no limit.
    pub rate: u32,
    pub burst: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EventCounter {
    pub emitted: u64,
    pub suppressed: u64,
    pub lost: u64,
}

pub const EVENT_COUNTERS_MAX: u32 = 8 * 2;

/// Index into `event_counters`: type * 2 + direction.
pub fn event_counter_index(type_: u8, direction: u32) -> u32 {
    u32::from(type_) * 2 + direction
}

// ---- metrics ----

pub const METRIC_DIR_EGRESS: u32 = 0;
pub const METRIC_DIR_INGRESS: u32 = 1;
pub const METRICS_MAX: u32 = 256 * 2;

/// Index into the metrics array: reason * 2 + direction.
pub fn metrics_index(reason: u8, dir: u32) -> u32 {
    u32::from(reason) * 2 + dir
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MetricsValue {
    pub packets: u64,
    pub bytes: u64,
}

// SAFETY: all of these are #[repr(C)] plain data with explicit padding fields, so every
// byte is initialized and any bit pattern is valid.
unsafe impl aya::Pod for Lb4Key {}
unsafe impl aya::Pod for Lb4Service {}
unsafe impl aya::Pod for Lb4BackendKey {}
unsafe impl aya::Pod for Lb4Backend {}
unsafe impl aya::Pod for Ct4Key {}
unsafe impl aya::Pod for Ct4Entry {}
unsafe impl aya::Pod for EndpointInfo {}
unsafe impl aya::Pod for MetricsValue {}
unsafe impl aya::Pod for IpcacheKey {}
unsafe impl aya::Pod for IpcacheEntry {}
unsafe impl aya::Pod for PolicyMatch {}
unsafe impl aya::Pod for PolicyKey {}
unsafe impl aya::Pod for PolicyEntry {}
unsafe impl aya::Pod for Frag4Key {}
unsafe impl aya::Pod for Frag4Ports {}
unsafe impl aya::Pod for FlowEvent {}
unsafe impl aya::Pod for EventConfig {}
unsafe impl aya::Pod for EventCounter {}

const _: () = {
    assert!(size_of::<Lb4Key>() == 12);
    assert!(size_of::<Lb4Service>() == 12);
    assert!(size_of::<Lb4BackendKey>() == 8);
    assert!(size_of::<Lb4Backend>() == 4);
    assert!(size_of::<Ct4Key>() == 16);
    assert!(size_of::<Ct4Entry>() == 48);
    assert!(size_of::<EndpointInfo>() == 16);
    assert!(size_of::<MetricsValue>() == 16);
    assert!(size_of::<IpcacheKey>() == 8);
    assert!(size_of::<IpcacheEntry>() == 8);
    assert!(size_of::<PolicyMatch>() == 8);
    assert!(size_of::<PolicyKey>() == 12);
    assert!(size_of::<PolicyEntry>() == 16);
    assert!(size_of::<Frag4Key>() == 12);
    assert!(size_of::<Frag4Ports>() == 4);
    assert!(size_of::<FlowEvent>() == 56);
    assert!(size_of::<EventConfig>() == 16);
    assert!(size_of::<EventCounter>() == 24);
};

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
            fields: &[$(FieldLayout { name: stringify!($field), offset: std::mem::offset_of!($ty, $field) }),*],
        }
    };
}

/// Every struct shared with the datapath, by its C name.
pub const LAYOUTS: &[StructLayout] = &[
    layout!("lb4_key", Lb4Key, [address, dport, proto, pad, slot, pad2]),
    layout!(
        "lb4_service",
        Lb4Service,
        [backend_address, backend_port, count, flags, pad]
    ),
    layout!(
        "lb4_backend_key",
        Lb4BackendKey,
        [address, port, proto, pad]
    ),
    layout!("lb4_backend", Lb4Backend, [state, pad]),
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
    StructLayout {
        name: "flow_event",
        size: size_of::<FlowEvent>(),
        // `type` is a Rust keyword: the mirror calls it `type_`.
        fields: &[
            FieldLayout {
                name: "time_ns",
                offset: std::mem::offset_of!(FlowEvent, time_ns),
            },
            FieldLayout {
                name: "type",
                offset: std::mem::offset_of!(FlowEvent, type_),
            },
            FieldLayout {
                name: "direction",
                offset: std::mem::offset_of!(FlowEvent, direction),
            },
            FieldLayout {
                name: "reason",
                offset: std::mem::offset_of!(FlowEvent, reason),
            },
            FieldLayout {
                name: "proto",
                offset: std::mem::offset_of!(FlowEvent, proto),
            },
            FieldLayout {
                name: "tcp_flags",
                offset: std::mem::offset_of!(FlowEvent, tcp_flags),
            },
            FieldLayout {
                name: "flags",
                offset: std::mem::offset_of!(FlowEvent, flags),
            },
            FieldLayout {
                name: "pad",
                offset: std::mem::offset_of!(FlowEvent, pad),
            },
            FieldLayout {
                name: "ifindex",
                offset: std::mem::offset_of!(FlowEvent, ifindex),
            },
            FieldLayout {
                name: "src_identity",
                offset: std::mem::offset_of!(FlowEvent, src_identity),
            },
            FieldLayout {
                name: "dst_identity",
                offset: std::mem::offset_of!(FlowEvent, dst_identity),
            },
            FieldLayout {
                name: "saddr",
                offset: std::mem::offset_of!(FlowEvent, saddr),
            },
            FieldLayout {
                name: "daddr",
                offset: std::mem::offset_of!(FlowEvent, daddr),
            },
            FieldLayout {
                name: "sport",
                offset: std::mem::offset_of!(FlowEvent, sport),
            },
            FieldLayout {
                name: "dport",
                offset: std::mem::offset_of!(FlowEvent, dport),
            },
            FieldLayout {
                name: "orig_daddr",
                offset: std::mem::offset_of!(FlowEvent, orig_daddr),
            },
            FieldLayout {
                name: "orig_dport",
                offset: std::mem::offset_of!(FlowEvent, orig_dport),
            },
            FieldLayout {
                name: "pad2",
                offset: std::mem::offset_of!(FlowEvent, pad2),
            },
            FieldLayout {
                name: "len",
                offset: std::mem::offset_of!(FlowEvent, len),
            },
            FieldLayout {
                name: "pad3",
                offset: std::mem::offset_of!(FlowEvent, pad3),
            },
        ],
    },
    layout!("event_config", EventConfig, [flags, rate, burst, pad]),
    layout!("event_counter", EventCounter, [emitted, suppressed, lost]),
];

// ---- one textual form per entry, shared by the compiler's dumps, verify and the CLI ----

impl fmt::Display for Lb4Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.proto == 0 && self.dport == 0 {
            write!(f, "{}:*", self.vip())
        } else {
            write!(
                f,
                "{}:{}/{} slot {}",
                self.vip(),
                self.port(),
                proto_name(self.proto),
                self.slot
            )
        }
    }
}

impl fmt::Display for Lb4Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.backend_address == 0 {
            write!(f, "count={} flags={:#04x}", self.count, self.flags)
        } else {
            write!(f, "backend={}:{}", self.backend(), self.port())
        }
    }
}

impl fmt::Display for Lb4BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.addr(),
            self.port(),
            proto_name(self.proto)
        )
    }
}

impl fmt::Display for Lb4Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state {
            BACKEND_STATE_ACTIVE => f.write_str("active"),
            other => write!(f, "state={other}"),
        }
    }
}

impl fmt::Display for EndpointInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ipv4={} identity={} flags={:#x}",
            self.ip(),
            self.identity,
            self.flags
        )
    }
}

impl fmt::Display for IpcacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.prefixlen)
    }
}

impl fmt::Display for IpcacheEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "identity={}", self.identity)?;
        if self.tunnel_endpoint != 0 {
            write!(f, " tunnel={}", addr_from_be(self.tunnel_endpoint))?;
        }
        Ok(())
    }
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let direction = match self.rule.direction {
            POLICY_INGRESS => "ingress",
            POLICY_EGRESS => "egress",
            _ => "direction?",
        };
        write!(f, "{direction} identity={} ", self.rule.identity)?;
        match self.port_range() {
            None => f.write_str("ANY"),
            Some((0, u16::MAX)) => write!(f, "ANY/{}", proto_name(self.rule.proto)),
            Some((first, last)) if first == last => {
                write!(f, "{first}/{}", proto_name(self.rule.proto))
            }
            Some((first, last)) => write!(f, "{first}-{last}/{}", proto_name(self.rule.proto)),
        }
    }
}

impl fmt::Display for PolicyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "packets={} bytes={}", self.packets, self.bytes)
    }
}
