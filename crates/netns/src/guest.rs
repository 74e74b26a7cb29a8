//! How a namespace hangs off its node: a pod (the lab's, or one the CNI plugin attaches) or
//! a lab world host. One veth, the guest's end with a /32 and a default route via the node's
//! router address, the node's end with a /32 route back; and the interface that holds the
//! router address on the node. Shared by the lab and `sluice-cni`, so a pod is wired the same
//! way whoever makes it.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::{NetNs, NetNsError, Netlink, Route};

/// Interface holding the node's router address: one end of a veth pair, like Cilium's
/// cilium_host/cilium_net (a dummy would do, but kernels without CONFIG_DUMMY exist; veth is
/// needed for the pods anyway).
pub const ROUTER_INTERFACE: &str = "sluice_host";
const ROUTER_PEER: &str = "sluice_net";

/// What connects one guest namespace to its node.
#[derive(Clone, Debug)]
pub struct Guest<'a> {
    /// Node-side veth name.
    pub interface: &'a str,
    /// The guest's side of the veth (`eth0`; a CNI runtime's `CNI_IFNAME`).
    pub device: &'a str,
    pub address: Ipv4Addr,
    /// The node's router address, the guest's gateway.
    pub router: Ipv4Addr,
    /// Both ends' MTU; None keeps the veth default.
    pub mtu: Option<u32>,
    /// An alias for the guest's device (the lab marks what it made); None sets none.
    pub alias: Option<&'a str>,
}

/// `address/32`.
fn host(address: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::from(address)
}

/// The guest's device with its /32, routed through the node's router address, and the
/// node's /32 route back. The node's end has no address: the node answers ARP for its router
/// address on any interface.
pub fn wire_guest(on_node: &Netlink, guest: &NetNs, g: &Guest<'_>) -> Result<(), NetNsError> {
    on_node.add_veth(g.interface, g.device, Some(guest))?;
    if let Some(mtu) = g.mtu {
        on_node.set_mtu(g.interface, mtu)?;
    }
    on_node.set_up(g.interface)?;
    on_node.add_route(&Route::device(host(g.address), g.interface).src(g.router))?;
    let inside = guest.netlink()?;
    if let Some(alias) = g.alias {
        inside.set_alias(g.device, alias)?;
    }
    if let Some(mtu) = g.mtu {
        inside.set_mtu(g.device, mtu)?;
    }
    inside.add_address(g.device, host(g.address).into())?;
    inside.set_up(g.device)?;
    inside.add_route(&Route::device(host(g.router), g.device))?;
    inside.add_route(&Route::default_via(g.router).dev(g.device))?;
    Ok(())
}

/// Puts the router address on [`ROUTER_INTERFACE`], made here with its peer, both up.
pub fn add_router_interface(
    on_node: &Netlink,
    router: Ipv4Addr,
    alias: Option<&str>,
) -> Result<(), NetNsError> {
    on_node.add_veth(ROUTER_INTERFACE, ROUTER_PEER, None)?;
    if let Some(alias) = alias {
        on_node.set_alias(ROUTER_INTERFACE, alias)?;
    }
    on_node.add_address(ROUTER_INTERFACE, host(router).into())?;
    on_node.set_up(ROUTER_PEER)?;
    on_node.set_up(ROUTER_INTERFACE)
}
