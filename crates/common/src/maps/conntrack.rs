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

// SAFETY: #[repr(C)] plain data with explicit padding fields, so every byte is
// initialized and any bit pattern is valid.
unsafe impl aya::Pod for Ct4Key {}
unsafe impl aya::Pod for Ct4Entry {}

const _: () = {
    assert!(size_of::<Ct4Key>() == 16);
    assert!(size_of::<Ct4Entry>() == 48);
};
