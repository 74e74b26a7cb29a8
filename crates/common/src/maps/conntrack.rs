//! Connection tracking (`ct4`): one entry per connection and scope, with its translation.

use super::{addr_be, addr_from_be};
use std::net::Ipv4Addr;

pub const CT_EGRESS: u8 = 0;
pub const CT_INGRESS: u8 = 1;
pub const CT_SERVICE: u8 = 2;
/// A connection from outside the node to an external frontend, keyed as it reaches the
/// backend; holds the frontend.
pub const CT_NODEPORT: u8 = 3;
/// The same connection SNATed to a backend on another node, keyed as it reaches the
/// backend; holds the client.
pub const CT_SNAT: u8 = 4;
/// The same connection keyed as the client sent it; holds node address and SNAT port.
pub const CT_SNAT_PORT: u8 = 5;

pub const CT_FLAG_LOOPBACK: u8 = 1 << 0;
pub const CT_FLAG_SEEN_REPLY: u8 = 1 << 1;
pub const CT_FLAG_CLOSING: u8 = 1 << 2;
/// A CT_SNAT entry of a pod's connection masqueraded out of the cluster.
pub const CT_FLAG_MASQUERADE: u8 = 1 << 3;
/// A CT_INGRESS entry of a connection that reached its pod through an external frontend.
pub const CT_FLAG_NODEPORT: u8 = 1 << 4;
/// A FIN seen in the direction of the entry's tuple.
pub const CT_FLAG_FIN_ORIGINAL: u8 = 1 << 5;
/// A FIN seen in the reply direction.
pub const CT_FLAG_FIN_REPLY: u8 = 1 << 6;

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

impl Ct4Entry {
    /// Whether the entry no longer describes its connection at `now_ns` (CLOCK_MONOTONIC),
    /// by the datapath's rule (`ct_expired` in bpf/lib/conntrack.h): idle for longer than
    /// the lifetime of its state. A stamp later than `now_ns` (another CPU's clock) is fresh.
    pub fn expired(&self, proto: u8, now_ns: u64, config: &CtConfig) -> bool {
        now_ns > self.last_seen_ns
            && now_ns - self.last_seen_ns
                > u64::from(config.lifetime_s(proto, self.flags)) * NS_PER_SEC
    }
}

const NS_PER_SEC: u64 = 1_000_000_000;

/// `struct ct_config`: idle lifetimes in seconds by connection state (`ct_config`, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CtConfig {
    /// TCP before any reply was seen.
    pub tcp_syn_s: u32,
    /// TCP after a reply, until a FIN or RST.
    pub tcp_established_s: u32,
    /// TCP after a FIN or RST.
    pub tcp_closing_s: u32,
    /// Every other protocol.
    pub non_tcp_s: u32,
}

/// Cilium's defaults (`--bpf-ct-timeout-regular-tcp-syn` 1m, `-tcp` 6h, `-tcp-fin` 10s,
/// `-any` 1m).
impl Default for CtConfig {
    fn default() -> Self {
        Self {
            tcp_syn_s: 60,
            tcp_established_s: 6 * 3600,
            tcp_closing_s: 10,
            non_tcp_s: 60,
        }
    }
}

impl CtConfig {
    /// The lifetime of an entry of `proto` with `flags` (`ct_lifetime` in conntrack.h).
    pub fn lifetime_s(&self, proto: u8, flags: u8) -> u32 {
        if proto != crate::IPPROTO_TCP {
            self.non_tcp_s
        } else if flags & CT_FLAG_CLOSING != 0 {
            self.tcp_closing_s
        } else if flags & CT_FLAG_SEEN_REPLY != 0 {
            self.tcp_established_s
        } else {
            self.tcp_syn_s
        }
    }
}

/// `struct ct_stats`: what conntrack saw that no entry shows (`ct_stats`, index 0, per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtStats {
    /// Entries written for new connections, overwrites of a stale entry included: an upper
    /// bound of what the table grew by since an earlier reading.
    pub created: u64,
    /// TCP segments to a frontend, not a pure SYN, that found no `CT_SERVICE` entry: a live
    /// connection's entry was evicted or removed, and the flow hash chose its backend again.
    pub service_lost: u64,
}

/// Layout 1 of the `ct4` value, before its counters were 64-bit: what an agent of that
/// layout left pinned. The C builds it with `-DSLUICE_LAYOUT_V1` (the upgrade test's
/// previous datapath); [`Ct4Entry::from`] it is the migration to today's layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ct4EntryV1 {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u32,
    pub bytes: u32,
    pub nat_address: u32,
    pub nat_port: u16,
    pub flags: u8,
    pub tcp_flags_seen: u8,
    pub ifindex: u32,
    pub pad: u32,
}

/// Widening the counters loses nothing, so every layout 1 entry converts.
impl From<Ct4EntryV1> for Ct4Entry {
    fn from(old: Ct4EntryV1) -> Self {
        Self {
            created_ns: old.created_ns,
            last_seen_ns: old.last_seen_ns,
            packets: old.packets.into(),
            bytes: old.bytes.into(),
            nat_address: old.nat_address,
            nat_port: old.nat_port,
            flags: old.flags,
            tcp_flags_seen: old.tcp_flags_seen,
            ifindex: old.ifindex,
            pad: 0,
        }
    }
}

plain_data!(CtStats, Ct4Key, Ct4Entry, Ct4EntryV1, CtConfig);

const _: () = {
    assert!(size_of::<Ct4Key>() == 16);
    assert!(size_of::<Ct4Entry>() == 48);
    assert!(size_of::<Ct4EntryV1>() == 40);
    assert!(size_of::<CtConfig>() == 16);
    assert!(size_of::<CtStats>() == 16);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetime_follows_the_tcp_state() {
        let config = CtConfig::default();
        let tcp = crate::IPPROTO_TCP;
        assert_eq!(config.lifetime_s(tcp, 0), 60);
        assert_eq!(config.lifetime_s(tcp, CT_FLAG_SEEN_REPLY), 21_600);
        assert_eq!(
            config.lifetime_s(tcp, CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING),
            10
        );
        assert_eq!(
            config.lifetime_s(crate::IPPROTO_UDP, CT_FLAG_SEEN_REPLY),
            60
        );
        let entry = Ct4Entry {
            last_seen_ns: 100 * NS_PER_SEC,
            ..Ct4Entry::default()
        };
        assert!(!entry.expired(tcp, 160 * NS_PER_SEC, &config));
        assert!(entry.expired(tcp, 161 * NS_PER_SEC, &config));
        assert!(
            !entry.expired(tcp, 50 * NS_PER_SEC, &config),
            "a later stamp is fresh"
        );
    }
}
