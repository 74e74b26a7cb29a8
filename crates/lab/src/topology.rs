//! What joins a lab's nodes: the cluster CIDR every pod CIDR lies in, the routing mode, and
//! the underlay (a bridge in a namespace of its own, one link per node), with the checks a
//! set of nodes must pass, in the lab file and when a node is added to a running lab.

use std::{collections::BTreeSet, fmt, net::Ipv4Addr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{
    names,
    spec::{LabSpec, NodeSpec},
};

/// The underlay link in every node's namespace.
pub const UNDERLAY_DEVICE: &str = "underlay0";
/// The bridge inside the underlay namespace that every node's link is a port of.
pub const UNDERLAY_BRIDGE: &str = "br0";
/// The underlay namespace is `sluice-<lab>-underlay`, so no node may take this name.
pub const UNDERLAY_NETNS_SUFFIX: &str = "underlay";
/// The router's namespace is `sluice-<lab>-router`, so no node may take this name.
pub const ROUTER_NETNS_SUFFIX: &str = "router";
pub const DEFAULT_UNDERLAY_CIDR: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(172, 30, 0, 0), 24);
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;
/// Node k of the lab file takes `network + 11 + k`; the addresses below are left to
/// routers and hosts on the underlay, as on a real segment.
pub const FIRST_NODE_OFFSET: u32 = 11;
/// The router in front of the nodes (for LoadBalancer VIPs and world hosts behind it)
/// takes the underlay's network + 1, as a segment's gateway.
pub const ROUTER_OFFSET: u32 = 1;
/// VXLAN over IPv4: outer IPv4 (20), UDP (8), VXLAN (8) and the inner Ethernet header (14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// Pods keep at least IPv4's 576-byte datagram inside the tunnel.
pub const MIN_UNDERLAY_MTU: u32 = 576 + VXLAN_OVERHEAD;
/// The largest MTU a veth takes.
pub const MAX_UNDERLAY_MTU: u32 = 65_535;
/// Without a clusterCIDR, the smallest supernet of every pod CIDR, but at least a /16.
const DEFAULT_CLUSTER_PREFIX: u8 = 16;

/// How pod traffic crosses between nodes: the agents' `--routing-mode`, Cilium's
/// `routing-mode`. A lab of one node without an underlay runs `Local`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingMode {
    #[default]
    Local,
    /// VXLAN through each node's collect-metadata device, the sender's identity as VNI.
    Tunnel,
    /// Straight over the underlay, unencapsulated.
    Native,
}

impl RoutingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingMode::Local => "local",
            RoutingMode::Tunnel => "tunnel",
            RoutingMode::Native => "native",
        }
    }

    /// What the lab file may say: a lab with an underlay is never local.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "tunnel" => Ok(RoutingMode::Tunnel),
            "native" => Ok(RoutingMode::Native),
            other => Err(format!("must be tunnel or native (got {other:?})")),
        }
    }
}

impl fmt::Display for RoutingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `underlay:` in the lab file: the segment joining the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderlaySpec {
    pub cidr: Ipv4Net,
    /// On every underlay link; in tunnel mode the pods get 50 bytes less.
    pub mtu: u32,
}

impl UnderlaySpec {
    /// The lowest address from `network + 11` that `used` does not hold, short of broadcast.
    pub fn free_address(&self, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        crate::ipam::lowest_free(self.cidr, FIRST_NODE_OFFSET, used)
    }

    /// Node k's address when the lab file sets none; None past the end of the CIDR.
    pub fn default_address(&self, k: usize) -> Option<Ipv4Addr> {
        let offset = FIRST_NODE_OFFSET.checked_add(u32::try_from(k).ok()?)?;
        let address = u32::from(self.cidr.network()).checked_add(offset)?;
        (address < u32::from(self.cidr.broadcast())).then(|| Ipv4Addr::from(address))
    }
}

/// Where a world host hangs: on the underlay segment, or behind one node as a pod does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WorldAttach {
    Underlay,
    /// Behind the lab's router, on a subnet of its own: a client out on the internet,
    /// reaching the nodes (and LoadBalancer VIPs) through the router.
    Router,
    Node(String),
}

impl fmt::Display for WorldAttach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorldAttach::Underlay => f.write_str("underlay"),
            WorldAttach::Router => f.write_str("router"),
            WorldAttach::Node(node) => f.write_str(node),
        }
    }
}

/// The smallest supernet of every pod CIDR with a prefix of at most /16.
pub fn default_cluster_cidr(nodes: &[NodeSpec]) -> Ipv4Net {
    let first = nodes
        .first()
        .map_or(Ipv4Addr::UNSPECIFIED, |n| n.pod_cidr.addr());
    (0..=DEFAULT_CLUSTER_PREFIX)
        .rev()
        .filter_map(|prefix| Ipv4Net::new(first, prefix).ok().map(|n| n.trunc()))
        .find(|net| nodes.iter().all(|n| net.contains(&n.pod_cidr)))
        .unwrap_or_default()
}

pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A CIDR as the lab takes it: no host bits, a prefix of at most `max_prefix`.
pub fn check_cidr(net: Ipv4Net, max_prefix: u8) -> Result<(), String> {
    if net.network() != net.addr() {
        return Err(format!(
            "{net} has host bits set; the network is {}",
            net.trunc()
        ));
    }
    if net.prefix_len() > max_prefix {
        return Err(format!(
            "{net} is too small: the prefix may be at most /{max_prefix}"
        ));
    }
    Ok(())
}

/// The underlay's CIDR stays clear of the cluster's ranges: its addresses are not pods'.
pub fn check_underlay(spec: &LabSpec) -> Result<(), Violation> {
    let Some(underlay) = spec.underlay else {
        return Ok(());
    };
    let clash = [
        ("serviceCIDR", spec.service_cidr),
        ("clusterCIDR", spec.cluster_cidr),
    ]
    .into_iter()
    .find(|(_, net)| overlaps(*net, underlay.cidr));
    match clash {
        Some((name, net)) => Err((
            "underlay.cidr".into(),
            format!("{} overlaps {name} {net}", underlay.cidr),
        )),
        None => Ok(()),
    }
}

/// A violated rule: the field (as `field_of` names it) and what is wrong.
pub type Violation = (String, String);

/// The rules a set of nodes obeys, each node checked against those before it, so a node
/// added last is the one named. `field_of(i, "podCIDR")` names node i's field for the
/// error: `nodes[1].podCIDR` in a lab file.
pub fn check_nodes(
    spec: &LabSpec,
    field_of: &dyn Fn(usize, &str) -> String,
) -> Result<(), Violation> {
    for (i, node) in spec.nodes.iter().enumerate() {
        let fail = |f: &str, message: String| Err((field_of(i, f), message));
        if let Err(m) = names::check_dns_label(&node.name, names::MAX_NODE_NAME) {
            return fail("name", m);
        }
        if node.name == ROUTER_NETNS_SUFFIX {
            return fail(
                "name",
                format!(
                    "{:?} names the lab's load balancer router namespace; rename the node",
                    node.name
                ),
            );
        }
        if node.name == UNDERLAY_NETNS_SUFFIX {
            return fail(
                "name",
                format!(
                    "{:?} names the lab's underlay namespace; rename the node",
                    node.name
                ),
            );
        }
        let earlier = &spec.nodes[..i];
        if let Some(j) = earlier.iter().position(|n| n.name == node.name) {
            return fail(
                "name",
                format!(
                    "duplicate node name {:?} (also {})",
                    node.name,
                    field_of(j, "")
                ),
            );
        }
        if let Some(zone) = &node.zone
            && let Err(m) = names::check_label_value(zone)
        {
            return fail("zone", m);
        }
        check_pod_cidr(spec, i, field_of)?;
        check_underlay_address(spec, i, field_of)?;
    }
    Ok(())
}

/// Node i's pod CIDR: big enough, inside the cluster's, clear of every other range.
fn check_pod_cidr(
    spec: &LabSpec,
    i: usize,
    field_of: &dyn Fn(usize, &str) -> String,
) -> Result<(), Violation> {
    let node = &spec.nodes[i];
    let earlier = &spec.nodes[..i];
    let fail = |message: String| Err((field_of(i, "podCIDR"), message));
    // The node's router takes .1 and pods need at least one more address.
    if let Err(m) = check_cidr(node.pod_cidr, 30) {
        return fail(m);
    }
    if let Some(j) = earlier
        .iter()
        .position(|n| overlaps(n.pod_cidr, node.pod_cidr))
    {
        return fail(format!(
            "{} overlaps {} {}",
            node.pod_cidr,
            field_of(j, "podCIDR"),
            spec.nodes[j].pod_cidr
        ));
    }
    if overlaps(spec.service_cidr, node.pod_cidr) {
        return fail(format!(
            "{} overlaps serviceCIDR {}",
            node.pod_cidr, spec.service_cidr
        ));
    }
    if let Some(underlay) = spec.underlay
        && overlaps(underlay.cidr, node.pod_cidr)
    {
        return fail(format!(
            "{} overlaps underlay.cidr {}",
            node.pod_cidr, underlay.cidr
        ));
    }
    if !spec.cluster_cidr.contains(&node.pod_cidr) {
        return fail(format!(
            "{} is outside clusterCIDR {}",
            node.pod_cidr, spec.cluster_cidr
        ));
    }
    if let Some(w) = spec
        .world
        .iter()
        .find(|w| node.pod_cidr.contains(&w.address))
    {
        return fail(format!(
            "{} holds world host {}'s address {}",
            node.pod_cidr, w.name, w.address
        ));
    }
    Ok(())
}

/// Node i's underlay address: present exactly when the lab has an underlay, inside it, and
/// nobody else's.
fn check_underlay_address(
    spec: &LabSpec,
    i: usize,
    field_of: &dyn Fn(usize, &str) -> String,
) -> Result<(), Violation> {
    let node = &spec.nodes[i];
    let fail = |message: String| Err((field_of(i, "underlayAddress"), message));
    let (underlay, address) = match (&spec.underlay, node.underlay_address) {
        (None, None) => return Ok(()),
        (None, Some(address)) => {
            return fail(format!("{address}: the lab has no underlay"));
        }
        (Some(underlay), None) => {
            return fail(format!(
                "none left: underlay.cidr {} is too small for {} nodes (their addresses start at network + {FIRST_NODE_OFFSET})",
                underlay.cidr,
                spec.nodes.len()
            ));
        }
        (Some(underlay), Some(address)) => (underlay, address),
    };
    if !crate::ipam::is_assignable(underlay.cidr, address) {
        return fail(format!(
            "{address} is not a host address of underlay.cidr {}",
            underlay.cidr
        ));
    }
    if let Some(j) = spec.nodes[..i]
        .iter()
        .position(|n| n.underlay_address == Some(address))
    {
        return fail(format!(
            "{address} is also {}",
            field_of(j, "underlayAddress")
        ));
    }
    if let Some(w) = spec.world.iter().find(|w| w.address == address) {
        return fail(format!("{address} is also world host {}'s address", w.name));
    }
    Ok(())
}
