//! The other nodes as the node's own routes need them, from the compiler's view of the
//! cluster (`DesiredState.nodes`, checked by the store's Node rules), never from a side
//! channel.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sluice_compiler::Nodes;

/// A node whose pod CIDR the node's own traffic is routed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    pub pod_cidr: Ipv4Net,
    /// Its InternalIP: where pod traffic for it is sent.
    pub address: Ipv4Addr,
}

/// The other nodes with a pod CIDR (one without has nothing to route to yet), and this
/// node's router address: the source of what it sends into the tunnel.
pub fn routed(nodes: &Nodes) -> (Vec<ClusterNode>, Option<Ipv4Addr>) {
    let others = nodes
        .remote
        .iter()
        .filter_map(|node| {
            Some(ClusterNode {
                name: node.name.clone(),
                pod_cidr: node.pod_cidr?,
                address: node.internal_ip,
            })
        })
        .collect();
    (others, nodes.local.as_ref().and_then(|n| n.router()))
}
