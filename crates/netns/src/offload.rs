//! Transmit checksum offload of an interface (`ethtool -K <dev> tx on|off`), through the
//! SIOCETHTOOL ioctl's ETHTOOL_GTXCSUM / ETHTOOL_STXCSUM.
//!
//! Why the ioctl and not the ethtool netlink family: the `ethtool` crate of the
//! rust-netlink family reads features but cannot set them, and these two commands are one
//! call each on a socket of the namespace, with no generic-netlink family to resolve.

use std::os::fd::AsRawFd;

use nix::{
    errno::Errno,
    sys::socket::{AddressFamily, SockFlag, SockType, socket},
};

use crate::{NetNs, NetNsError};

// From <linux/ethtool.h>; the libc crate has SIOCETHTOOL but not these.
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// One ETHTOOL_* get or set of a `struct ethtool_value` on `interface`: its data after
/// the call.
fn ethtool_value(interface: &str, cmd: u32, data: u32) -> Result<u32, Errno> {
    // SAFETY: ifreq is plain old data (a name and a union of integers and pointers), for
    // which all zeroes is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = interface.as_bytes();
    if name.is_empty() || name.len() >= request.ifr_name.len() || name.contains(&0) {
        return Err(Errno::EINVAL);
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(name) {
        *slot = *byte as libc::c_char;
    }
    let mut value = EthtoolValue { cmd, data };
    request.ifr_ifru.ifru_data = (&raw mut value).cast();
    let socket = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points to, both alive
    // and exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &raw mut request) };
    Errno::result(rc)?;
    Ok(value.data)
}

impl NetNs {
    /// Turns transmit checksum offload of `interface` on or off. Off makes the kernel
    /// finish checksums in software before a packet leaves the interface (and turns off
    /// the segmentation offloads that depend on it, as `ethtool -K` does).
    pub fn set_tx_checksum(&self, interface: &str, on: bool) -> Result<(), NetNsError> {
        self.run(|| ethtool_value(interface, ETHTOOL_STXCSUM, u32::from(on)))?
            .map(drop)
            .map_err(|source| NetNsError::Sys {
                call: "ioctl(SIOCETHTOOL, ETHTOOL_STXCSUM)",
                what: format!("{interface} in netns {}", self.name()),
                source,
            })
    }

    /// Whether transmit checksum offload of `interface` is on (`ethtool -k`'s
    /// `tx-checksumming`).
    pub fn tx_checksum(&self, interface: &str) -> Result<bool, NetNsError> {
        self.run(|| ethtool_value(interface, ETHTOOL_GTXCSUM, 0))?
            .map(|data| data != 0)
            .map_err(|source| NetNsError::Sys {
                call: "ioctl(SIOCETHTOOL, ETHTOOL_GTXCSUM)",
                what: format!("{interface} in netns {}", self.name()),
                source,
            })
    }
}
