//! The lab's wiring of nodes, pods and world hosts, through sluice-netns (rtnetlink,
//! sysctls and offloads inside each namespace). Every call names its namespace, so nothing
//! here can touch the root namespace.

use std::net::Ipv4Addr;

use sluice_netns::{Guest, Ipv4Net, NetNs, Route, add_router_interface, wire_guest};

use crate::{
    LabError,
    topology::{UNDERLAY_BRIDGE, UNDERLAY_DEVICE},
};

/// Interface alias that marks a namespace as the lab's, for `lab down` without `lab.json`.
pub fn alias(lab: &str) -> String {
    format!("sluice-lab={lab}")
}

/// `address/32`.
fn host(address: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::from(address)
}

/// A node: forwarding on, reverse-path filtering off (replies from a service's backends carry
/// the ClusterIP as source, which has no route back), and the router address on
/// `sluice_host`.
pub fn setup_node(lab: &str, netns: &str, router: Ipv4Addr) -> Result<(), LabError> {
    let ns = NetNs::open(netns)?;
    // Before any lxc exists: new interfaces copy `default`, so every lxc gets rp_filter 0.
    ns.set_sysctls(&[
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ])?;
    add_router_interface(&ns.netlink()?, router, Some(&alias(lab)))?;
    Ok(())
}

/// What connects one pod to its node.
pub struct PodLink<'a> {
    pub lab: &'a str,
    pub node_netns: &'a str,
    pub pod_netns: &'a str,
    /// Host-side veth name.
    pub interface: &'a str,
    pub ip: Ipv4Addr,
    pub router: Ipv4Addr,
    pub tx_checksum_offload: bool,
    /// Both ends' MTU; None keeps the veth default (local mode).
    pub mtu: Option<u32>,
}

/// The pod's `eth0` with its /32, routed through the node's router address, and the node's
/// /32 route back. The host side has no address: the node answers ARP for its router address
/// on any interface.
pub fn setup_pod(l: &PodLink<'_>) -> Result<(), LabError> {
    let (node, pod) = (NetNs::open(l.node_netns)?, NetNs::open(l.pod_netns)?);
    let alias = alias(l.lab);
    wire_guest(
        &node.netlink()?,
        &pod,
        &Guest {
            interface: l.interface,
            device: "eth0",
            address: l.ip,
            router: l.router,
            mtu: l.mtu,
            alias: Some(&alias),
        },
    )?;
    if !l.tx_checksum_offload {
        // Forces real checksums on packets the node sends into the pod, so NAT checksum
        // bugs show up in the lab rather than on a real NIC.
        node.set_tx_checksum(l.interface, false)?;
    }
    Ok(())
}

/// What connects a world host to its node.
pub struct WorldLink<'a> {
    pub lab: &'a str,
    pub node_netns: &'a str,
    pub world_netns: &'a str,
    /// Node-side veth name.
    pub interface: &'a str,
    pub address: Ipv4Addr,
    pub router: Ipv4Addr,
    pub mtu: Option<u32>,
}

/// Wired like a pod (its `eth0` with a /32, default route via the node's router address, the
/// node's /32 route back), but on an interface no agent attaches to: a host outside the
/// cluster, whose traffic the pods' own interfaces judge.
pub fn setup_world(l: &WorldLink<'_>) -> Result<(), LabError> {
    let (node, world) = (NetNs::open(l.node_netns)?, NetNs::open(l.world_netns)?);
    let alias = alias(l.lab);
    wire_guest(
        &node.netlink()?,
        &world,
        &Guest {
            interface: l.interface,
            device: "eth0",
            address: l.address,
            router: l.router,
            mtu: l.mtu,
            alias: Some(&alias),
        },
    )?;
    Ok(())
}

/// The underlay namespace: a bridge with the underlay's MTU, carrying the lab's alias.
pub fn setup_underlay(lab: &str, netns: &str, mtu: u32) -> Result<(), LabError> {
    let nl = NetNs::open(netns)?.netlink()?;
    nl.add_bridge(UNDERLAY_BRIDGE)?;
    nl.set_alias(UNDERLAY_BRIDGE, &alias(lab))?;
    nl.set_mtu(UNDERLAY_BRIDGE, mtu)?;
    nl.set_up(UNDERLAY_BRIDGE)?;
    Ok(())
}

/// A namespace on the underlay segment: a node, or a world host with `attach: underlay`.
pub struct UnderlayLink<'a> {
    pub lab: &'a str,
    pub underlay_netns: &'a str,
    pub netns: &'a str,
    /// The bridge port, in the underlay namespace.
    pub port: &'a str,
    /// `underlay0` for a node, `eth0` for a world host.
    pub device: &'a str,
    pub address: Ipv4Addr,
    /// The underlay's CIDR: a node's address carries its prefix; a world host's address is
    /// its own /32 and the segment is routed on-link.
    pub cidr: Ipv4Net,
    pub mtu: u32,
}

/// A veth from the namespace to a port of the underlay bridge, with the underlay's MTU on
/// both ends.
pub fn join_underlay(l: &UnderlayLink<'_>) -> Result<(), LabError> {
    let (underlay, ns) = (NetNs::open(l.underlay_netns)?, NetNs::open(l.netns)?);
    let on_bridge = underlay.netlink()?;
    on_bridge.add_veth(l.port, l.device, Some(&ns))?;
    on_bridge.set_mtu(l.port, l.mtu)?;
    on_bridge.set_controller(l.port, UNDERLAY_BRIDGE)?;
    on_bridge.set_up(l.port)?;
    let inside = ns.netlink()?;
    inside.set_alias(l.device, &alias(l.lab))?;
    inside.set_mtu(l.device, l.mtu)?;
    if l.device == UNDERLAY_DEVICE {
        let address =
            Ipv4Net::new(l.address, l.cidr.prefix_len()).map_err(|_| LabError::Command {
                command: format!("ip addr add {}/{}", l.address, l.cidr.prefix_len()),
                detail: "invalid prefix".into(),
            })?;
        inside.add_address(l.device, address.into())?;
        inside.set_up(l.device)?;
    } else {
        inside.add_address(l.device, host(l.address).into())?;
        inside.set_up(l.device)?;
        inside.add_route(&Route::device(l.cidr, l.device))?;
    }
    Ok(())
}

/// Removes a namespace's port from the underlay bridge, with its peer, if it is there.
pub fn leave_underlay(underlay_netns: &str, port: &str) -> Result<(), LabError> {
    let underlay = NetNs::named(underlay_netns);
    if !underlay.exists() {
        return Ok(());
    }
    let nl = underlay.netlink()?;
    if nl.links()?.iter().any(|l| l.name == port) {
        nl.delete_link(port)?;
    }
    Ok(())
}

/// Adds a route in `netns`.
pub fn add_route(netns: &str, route: &Route<'_>) -> Result<(), LabError> {
    NetNs::open(netns)?.netlink()?.add_route(route)?;
    Ok(())
}

/// Deletes a route from `netns`.
pub fn delete_route(netns: &str, route: &Route<'_>) -> Result<(), LabError> {
    NetNs::open(netns)?.netlink()?.delete_route(route)?;
    Ok(())
}

/// Whether an interface of `netns` carries the lab's alias.
pub fn has_alias(netns: &str, lab: &str) -> bool {
    let want = alias(lab);
    NetNs::named(netns)
        .netlink()
        .and_then(|nl| nl.links())
        .is_ok_and(|links| links.iter().any(|l| l.alias.as_deref() == Some(&want)))
}
