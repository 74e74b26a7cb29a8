//! Per-endpoint policy rows: the keys and counters of each endpoint's LPM trie in `policy`.

use super::proto_name;
use std::fmt;

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

plain_data!(PolicyMatch, PolicyKey, PolicyEntry);

const _: () = {
    assert!(size_of::<PolicyMatch>() == 8);
    assert!(size_of::<PolicyKey>() == 12);
    assert!(size_of::<PolicyEntry>() == 16);
};

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
