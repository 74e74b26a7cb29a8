//! Node objects as a source provides them (the lab file's nodes today, a Kubernetes watch
//! later), refused before anything changes when routing could not use them.

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use sluice_store::nodes::{NodeFaultAt, check_nodes};

use crate::{ValidationError, validate};

impl From<NodeFaultAt> for ValidationError {
    fn from(at: NodeFaultAt) -> Self {
        Self {
            kind: "Node",
            name: at.node,
            field: at.fault.field().path().to_string(),
            message: at.fault.to_string(),
        }
    }
}

/// Checks `nodes` as the compiler will read them: names (as the API server would), an IPv4
/// InternalIP on each, and pod CIDRs that are IPv4 networks, inside `cluster_cidr` when
/// given, and overlap no other node's. The first fault, in node order, is the error.
pub fn validate_nodes(
    nodes: &[Node],
    cluster_cidr: Option<Ipv4Net>,
) -> Result<(), ValidationError> {
    for node in nodes {
        validate::metadata("Node", &node.metadata).map_err(|invalid| ValidationError {
            kind: "Node",
            name: node.metadata.name.clone().unwrap_or_default(),
            field: invalid.field,
            message: invalid.message,
        })?;
    }
    match check_nodes(nodes, cluster_cidr).faults.into_iter().next() {
        Some(at) => Err(at.into()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
