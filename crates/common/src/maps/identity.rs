//! Security identities and the ipcache (`ipcache`), the LPM trie from prefix to identity.

use super::{addr_be, addr_from_be};
use std::{fmt, net::Ipv4Addr};

/// In policy keys: any remote identity.
pub const IDENTITY_ANY: u32 = 0;
pub const IDENTITY_HOST: u32 = 1;
pub const IDENTITY_WORLD: u32 = 2;
pub const IDENTITY_REMOTE_NODE: u32 = 6;
pub const IDENTITY_FIRST_ALLOCATED: u32 = 256;
/// Scope bits of identities allocated for policy CIDRs (Cilium's local scope).
pub const IDENTITY_SCOPE_CIDR: u32 = 0x01 << 24;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
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

plain_data!(IpcacheKey, IpcacheEntry);

const _: () = {
    assert!(size_of::<IpcacheKey>() == 8);
    assert!(size_of::<IpcacheEntry>() == 8);
};

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
