//! Service frontends and their backend slots (`lb4_services`), and backends (`lb4_backends`).

use super::{addr_be, addr_from_be, proto_name};
use std::{fmt, net::Ipv4Addr};

pub const SVC_FLAG_CLUSTER_IP: u16 = 1 << 0;
pub const SVC_FLAG_WILDCARD: u16 = 1 << 1;
pub const SVC_FLAG_NODE_PORT: u16 = 1 << 2;
pub const SVC_FLAG_EXTERNAL_IP: u16 = 1 << 3;
pub const SVC_FLAG_LOAD_BALANCER: u16 = 1 << 4;
/// Traffic policy Local: node-local backends only, the client's source kept.
pub const SVC_FLAG_LOCAL: u16 = 1 << 5;
pub const SVC_FLAG_SOURCE_RANGES: u16 = 1 << 6;
pub const SVC_FLAG_AFFINITY: u16 = 1 << 7;
pub const SVC_FLAG_MAGLEV: u16 = 1 << 8;
/// An external frontend with traffic policy Local whose cluster-wide slots sit beside it
/// under [`LB4_SCOPE_INTERNAL`], for the node's own processes.
pub const SVC_FLAG_TWO_SCOPES: u16 = 1 << 9;

/// The frontend as every client but the node's own processes sees it.
pub const LB4_SCOPE_DEFAULT: u8 = 0;
/// The cluster-wide slots of a [`SVC_FLAG_TWO_SCOPES`] frontend, for the node's own
/// processes (socket load balancing), which kube-proxy sends to any endpoint.
pub const LB4_SCOPE_INTERNAL: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lb4Key {
    pub address: u32,
    pub dport: u16,
    pub proto: u8,
    /// `LB4_SCOPE_*`.
    pub scope: u8,
    pub slot: u16,
    pub pad2: u16,
}

impl Lb4Key {
    pub fn new(vip: Ipv4Addr, port: u16, proto: u8, slot: u16) -> Self {
        Self {
            address: addr_be(vip),
            dport: port.to_be(),
            proto,
            scope: LB4_SCOPE_DEFAULT,
            slot,
            pad2: 0,
        }
    }
    /// The same key in `scope` (`LB4_SCOPE_*`).
    pub fn in_scope(self, scope: u8) -> Self {
        Self { scope, ..self }
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4Service {
    pub backend_address: u32,
    pub backend_port: u16,
    pub count: u16,
    /// `SVC_FLAG_*`, on a frontend.
    pub flags: u16,
    /// `SVC_FLAG_MAGLEV`: M, the prime size of the frontend's Maglev table.
    pub maglev_size: u16,
    /// sessionAffinity ClientIP timeout in seconds, on a frontend.
    pub affinity_timeout: u32,
}

impl Lb4Service {
    /// Slot 0 of a frontend.
    pub fn frontend(count: u16, flags: u16) -> Self {
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

/// Layout 1 of the `lb4_services` value, before `count` was narrowed to 16 bits and
/// moved beside the backend port: what an agent of that layout left pinned. The C builds
/// it with `-DSLUICE_LAYOUT_V1` (the upgrade test's previous datapath);
/// [`Lb4Service::try_from`] it is the migration to today's layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4ServiceV1 {
    pub backend_address: u32,
    pub backend_port: u16,
    pub flags: u16,
    pub count: u32,
    pub affinity_timeout: u32,
    pub maglev_size: u16,
    pub pad: u16,
}

impl TryFrom<Lb4ServiceV1> for Lb4Service {
    type Error = crate::Unconvertible;

    /// A frontend with more backend slots than today's 16-bit `count` holds does not
    /// convert: truncating it would send connections to the wrong slots.
    fn try_from(old: Lb4ServiceV1) -> Result<Self, Self::Error> {
        let count = u16::try_from(old.count).map_err(|_| crate::Unconvertible {
            field: "count",
            value: old.count.into(),
            limit: u16::MAX.into(),
        })?;
        Ok(Self {
            backend_address: old.backend_address,
            backend_port: old.backend_port,
            count,
            flags: old.flags,
            maglev_size: old.maglev_size,
            affinity_timeout: old.affinity_timeout,
        })
    }
}

pub const BACKEND_STATE_ACTIVE: u8 = 0;

/// Maglev table positions packed into one element of a frontend's table map: the kernel
/// rounds array elements up to 8 bytes, so four u16 slots share one (M * 2 bytes).
pub const LB4_MAGLEV_SLOTS_PER_ENTRY: usize = 4;

/// One element of a Maglev table map: positions `4 i .. 4 i + 3`, each a backend slot.
pub type MaglevLanes = [u16; LB4_MAGLEV_SLOTS_PER_ENTRY];

/// sessionAffinity ClientIP: a client of one frontend (`lb4_affinity`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lb4AffinityKey {
    pub client: u32,
    pub address: u32,
    pub dport: u16,
    pub proto: u8,
    pub pad: u8,
}

impl Lb4AffinityKey {
    pub fn new(client: Ipv4Addr, frontend: Ipv4Addr, port: u16, proto: u8) -> Self {
        Self {
            client: addr_be(client),
            address: addr_be(frontend),
            dport: port.to_be(),
            proto,
            pad: 0,
        }
    }
}

/// The backend a client's last new connection to the frontend went to, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Lb4Affinity {
    pub last_used_ns: u64,
    pub backend_address: u32,
    pub backend_port: u16,
    pub pad: u16,
}

impl Lb4Affinity {
    pub fn backend(&self) -> Ipv4Addr {
        addr_from_be(self.backend_address)
    }
    pub fn port(&self) -> u16 {
        u16::from_be(self.backend_port)
    }
}

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4Backend {
    pub state: u8,
    pub pad: [u8; 3],
}

/// Bits of a [`Lb4SourceRangeKey`] before the source: the frontend, always matched whole.
pub const LB4_SOURCE_RANGE_PREFIX: u32 = 64;

/// The data of a `lb4_source_ranges` key: a load balancer frontend and a source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lb4SourceRange {
    pub address: u32,
    pub dport: u16,
    pub proto: u8,
    pub pad: u8,
    pub source: u32,
}

/// A `lb4_source_ranges` key: the sources `source/source_prefix` may use the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lb4SourceRangeKey {
    pub prefixlen: u32,
    pub range: Lb4SourceRange,
}

impl Lb4SourceRangeKey {
    pub fn new(frontend: Ipv4Addr, port: u16, proto: u8, source: Ipv4Addr, prefix: u8) -> Self {
        Self {
            prefixlen: LB4_SOURCE_RANGE_PREFIX + u32::from(prefix.min(32)),
            range: Lb4SourceRange {
                address: addr_be(frontend),
                dport: port.to_be(),
                proto,
                pad: 0,
                source: addr_be(source),
            },
        }
    }
    pub fn frontend(&self) -> Ipv4Addr {
        addr_from_be(self.range.address)
    }
    pub fn source(&self) -> Ipv4Addr {
        addr_from_be(self.range.source)
    }
    /// The source prefix length.
    pub fn source_prefix(&self) -> u32 {
        self.prefixlen.saturating_sub(LB4_SOURCE_RANGE_PREFIX)
    }
}

/// The value of a `lb4_source_ranges` entry: presence admits, the value is unused.
pub const SOURCE_RANGE_ALLOWED: u32 = 1;

plain_data!(
    Lb4SourceRange,
    Lb4SourceRangeKey,
    Lb4Key,
    Lb4Service,
    Lb4ServiceV1,
    Lb4BackendKey,
    Lb4Backend,
    Lb4AffinityKey,
    Lb4Affinity
);

const _: () = {
    assert!(size_of::<Lb4Key>() == 12);
    assert!(size_of::<Lb4Service>() == 16);
    assert!(size_of::<Lb4ServiceV1>() == 20);
    assert!(size_of::<Lb4BackendKey>() == 8);
    assert!(size_of::<Lb4Backend>() == 4);
    assert!(size_of::<Lb4SourceRange>() == 12);
    assert!(size_of::<Lb4SourceRangeKey>() == 16);
    assert!(size_of::<Lb4AffinityKey>() == 12);
    assert!(size_of::<Lb4Affinity>() == 16);
};

impl fmt::Display for Lb4SourceRangeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{} from {}/{}",
            self.frontend(),
            u16::from_be(self.range.dport),
            proto_name(self.range.proto),
            self.source(),
            self.source_prefix()
        )
    }
}

impl fmt::Display for Lb4Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.proto == 0 && self.dport == 0 {
            write!(f, "{}:*", self.vip())
        } else {
            let scope = if self.scope == LB4_SCOPE_INTERNAL {
                " internal"
            } else {
                ""
            };
            write!(
                f,
                "{}:{}/{}{scope} slot {}",
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
            write!(f, "count={} flags={:#04x}", self.count, self.flags)?;
            if self.flags & SVC_FLAG_AFFINITY != 0 {
                write!(f, " affinity={}s", self.affinity_timeout)?;
            }
            if self.flags & SVC_FLAG_MAGLEV != 0 {
                write!(f, " maglev={}", self.maglev_size)?;
            }
            Ok(())
        } else {
            write!(f, "backend={}:{}", self.backend(), self.port())
        }
    }
}

impl fmt::Display for Lb4AffinityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {}:{}/{}",
            addr_from_be(self.client),
            addr_from_be(self.address),
            u16::from_be(self.dport),
            proto_name(self.proto)
        )
    }
}

impl fmt::Display for Lb4Affinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend={}:{}", self.backend(), self.port())
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
