//! The other nodes as the node's own routes need them, from the compiler's view of the
//! cluster (`DesiredState.nodes`, checked by the store's Node rules), never from a side
//! channel.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sluice_compiler::Nodes;

use crate::routing::OwnAddresses;

/// A node whose pod CIDR the node's own traffic is routed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    pub pod_cidr: Ipv4Net,
    /// Its InternalIP: where pod traffic for it is sent.
    pub address: Ipv4Addr,
}

/// The other nodes with a pod CIDR (one without has nothing to route to yet), and this
/// node's own addresses.
pub fn routed(nodes: &Nodes) -> (Vec<ClusterNode>, OwnAddresses) {
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
    let own = OwnAddresses {
        address: nodes.local.as_ref().map(|n| n.internal_ip),
        router: nodes.local.as_ref().and_then(|n| n.router()),
    };
    (others, own)
}
