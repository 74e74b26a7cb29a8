//! Local endpoints (`endpoints`): a pod's host-side veth ifindex to its address, identity and policy flags.

use super::{addr_be, addr_from_be};
use std::{fmt, net::Ipv4Addr};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
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

plain_data!(EndpointInfo);

const _: () = {
    assert!(size_of::<EndpointInfo>() == 16);
};

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
