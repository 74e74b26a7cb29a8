//! `#[repr(C)]` mirrors of the keys and values in `bpf/lib/common.h`, one module per concern.
//!
//! Addresses and ports are stored in network byte order, as the datapath reads them
//! straight from packets; the constructors take host values and convert. Each entry has
//! one textual form (`Display`), shared by the compiler's dumps, `verify` and the CLI.

/// Marks map layouts as [`aya::Pod`], so aya copies them to and from the kernel as bytes.
/// Only for `#[repr(C)]` structs of integers and byte arrays whose padding is spelled out
/// as fields: the BTF test (`crates/datapath/tests/btf.rs`) checks each against the C.
macro_rules! plain_data {
    ($($layout:ty),+ $(,)?) => {
        $(
            // SAFETY: a #[repr(C)] struct of integers with every padding byte a named field
            // has no uninitialized bytes, and every bit pattern is a valid value.
            unsafe impl aya::Pod for $layout {}
        )+
    };
}

mod conntrack;
mod endpoints;
mod events;
mod flow;
mod fragments;
mod identity;
mod layout;
mod metrics;
mod node;
mod policy;
mod services;
mod sockets;

use std::net::Ipv4Addr;

pub use conntrack::*;
pub use endpoints::*;
pub use events::*;
pub use flow::*;
pub use fragments::*;
pub use identity::*;
pub use layout::*;
pub use metrics::*;
pub use node::*;
pub use policy::*;
pub use services::*;
pub use sockets::*;

/// Names of the programs in the C object.
pub mod programs {
    /// tc ingress of the host-side veth: packets leaving the pod.
    pub const FROM_CONTAINER: &str = "from_container";
    /// tc egress of the host-side veth: packets entering the pod.
    pub const TO_CONTAINER: &str = "to_container";
    /// tc ingress of the VXLAN device: pod traffic from other nodes.
    pub const FROM_TUNNEL: &str = "from_tunnel";
    /// tc egress of the VXLAN device: what the node's stack routes into the tunnel.
    pub const TO_TUNNEL: &str = "to_tunnel";
    /// cgroup connect4 of the node's cgroup: TCP and connected UDP to a frontend.
    pub const SOCK4_CONNECT: &str = "sock4_connect";
    /// cgroup sendmsg4: unconnected UDP datagrams to a frontend.
    pub const SOCK4_SENDMSG: &str = "sock4_sendmsg";
    /// cgroup recvmsg4: a UDP reply's sender shown as the frontend.
    pub const SOCK4_RECVMSG: &str = "sock4_recvmsg";
    /// cgroup getpeername4: a connected socket's peer shown as the frontend.
    pub const SOCK4_GETPEERNAME: &str = "sock4_getpeername";
    /// cgroup connect4 of the node's pods' parent cgroup: a pod's TCP and connected UDP
    /// to a frontend, translated once so its packets need no service NAT.
    pub const POD4_CONNECT: &str = "pod4_connect";
    /// cgroup sendmsg4 of the pods' cgroup: a pod's unconnected UDP datagrams.
    pub const POD4_SENDMSG: &str = "pod4_sendmsg";
    /// cgroup recvmsg4 of the pods' cgroup.
    pub const POD4_RECVMSG: &str = "pod4_recvmsg";
    /// cgroup getpeername4 of the pods' cgroup.
    pub const POD4_GETPEERNAME: &str = "pod4_getpeername";
    /// tc ingress of the underlay device: external frontends and their SNATed replies.
    pub const FROM_NETDEV: &str = "from_netdev";
    /// tc egress of the underlay device: pod traffic leaving the cluster, masqueraded.
    pub const TO_NETDEV: &str = "to_netdev";
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
