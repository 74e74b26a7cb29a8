//! Node objects as a source provides them (the lab file's nodes today, a Kubernetes watch
//! later), refused before anything changes when routing could not use them.

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use sluice_store::nodes::{NodeFaultAt, check_nodes};

use crate::validate;

/// Why a list of Nodes was refused. Displays as `Node node-b: spec.podCIDR: 10.244.1.0/24
/// overlaps node node-a's spec.podCIDR 10.244.1.0/24`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}", self.render())]
pub struct ValidationError {
    /// The node's name; empty when it has none.
    pub node: String,
    /// Path of the offending field, e.g. `spec.podCIDR`.
    pub field: String,
    pub message: String,
}

impl ValidationError {
    fn render(&self) -> String {
        let object = if self.node.is_empty() {
            "Node".to_string()
        } else {
            format!("Node {}", self.node)
        };
        format!("{object}: {}: {}", self.field, self.message)
    }
}

impl From<NodeFaultAt> for ValidationError {
    fn from(at: NodeFaultAt) -> Self {
        Self {
            node: at.node,
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
            node: node.metadata.name.clone().unwrap_or_default(),
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
