//! Nodes as routing sees them: each node's InternalIP and pod CIDR, judged together.
//!
//! One set of rules for the two places that read Node objects: a source refuses a list
//! that breaks one (`sluice_sources::validate_nodes`, before anything changes), and the
//! compiler leaves each offending node out of routing and reports why. Both see the same
//! faults, so what the lab refuses is exactly what an agent would skip.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;

/// The `status.addresses` type other nodes reach a node at.
pub const INTERNAL_IP: &str = "InternalIP";

/// The Node label naming its zone, by which trafficDistribution prefers endpoints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A node that routing can use: named once, reachable at an IPv4 InternalIP, and with a
/// pod CIDR (if any) that is valid, inside the cluster CIDR and overlaps no other node's.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterNode {
    pub name: String,
    /// Where other nodes reach it over the underlay (the tunnel endpoint): the first IPv4
    /// address of type InternalIP in `status.addresses`.
    pub internal_ip: Ipv4Addr,
    /// `spec.podCIDR`; None while the node has none allocated.
    pub pod_cidr: Option<Ipv4Net>,
}

impl ClusterNode {
    /// The node's address on the pod network: the first host of its pod CIDR, as the lab
    /// and a CNI plugin configure it (10.244.1.0/24 -> 10.244.1.1).
    pub fn router(&self) -> Option<Ipv4Addr> {
        self.pod_cidr.and_then(|cidr| cidr.hosts().next())
    }
}

/// The field of a Node that a fault is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeField {
    Name,
    PodCidr,
    Addresses,
}

impl NodeField {
    /// The field's path, as the API server names it in errors.
    pub fn path(self) -> &'static str {
        match self {
            Self::Name => "metadata.name",
            Self::PodCidr => "spec.podCIDR",
            Self::Addresses => "status.addresses",
        }
    }
}

/// Why a pod CIDR string is not one routing can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CidrDefect {
    Unparsable,
    /// An IPv6 CIDR: the datapath routes IPv4 only.
    NotIpv4,
    /// Bits set after the prefix: which network is meant is ambiguous.
    HostBits,
    /// Longer than /30: no room for the router address and a pod.
    TooLong,
}

/// What makes a Node unusable for routing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeFault {
    Unnamed,
    /// The same name on more than one Node: every copy is left out.
    Duplicate {
        copies: usize,
    },
    NoInternalIp,
    PodCidrInvalid {
        value: String,
        defect: CidrDefect,
    },
    PodCidrOutsideCluster {
        pod_cidr: Ipv4Net,
        cluster: Ipv4Net,
    },
    /// Both nodes are left out: either one's pods could be sent to the other.
    PodCidrOverlap {
        pod_cidr: Ipv4Net,
        other: String,
        other_cidr: Ipv4Net,
    },
}

impl NodeFault {
    pub fn field(&self) -> NodeField {
        match self {
            Self::Unnamed | Self::Duplicate { .. } => NodeField::Name,
            Self::NoInternalIp => NodeField::Addresses,
            Self::PodCidrInvalid { .. }
            | Self::PodCidrOutsideCluster { .. }
            | Self::PodCidrOverlap { .. } => NodeField::PodCidr,
        }
    }
}

impl fmt::Display for NodeFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unnamed => write!(f, "is required"),
            Self::Duplicate { copies } => write!(f, "defined {copies} times"),
            Self::NoInternalIp => write!(
                f,
                "no IPv4 address of type {INTERNAL_IP}: other nodes cannot reach the node"
            ),
            Self::PodCidrInvalid { value, defect } => {
                let why = match defect {
                    CidrDefect::Unparsable => "not a CIDR",
                    CidrDefect::NotIpv4 => "not an IPv4 CIDR",
                    CidrDefect::HostBits => "has host bits set",
                    CidrDefect::TooLong => "longer than /30, no room for a router and a pod",
                };
                write!(f, "invalid pod CIDR {value:?}: {why}")
            }
            Self::PodCidrOutsideCluster { pod_cidr, cluster } => {
                write!(f, "{pod_cidr} is outside the cluster CIDR {cluster}")
            }
            Self::PodCidrOverlap {
                pod_cidr,
                other,
                other_cidr,
            } => write!(
                f,
                "{pod_cidr} overlaps node {other}'s spec.podCIDR {other_cidr}"
            ),
        }
    }
}

/// A fault with the node it is about (empty name for an unnamed Node).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeFaultAt {
    pub node: String,
    pub fault: NodeFault,
}

/// `Node node-b: spec.podCIDR: 10.244.1.0/24 overlaps ...`, in the style of the manifest
/// source's errors.
impl fmt::Display for NodeFaultAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.node.is_empty() {
            write!(f, "Node: ")?;
        } else {
            write!(f, "Node {}: ", self.node)?;
        }
        write!(f, "{}: {}", self.fault.field().path(), self.fault)
    }
}

/// The nodes routing can use, and what is wrong with the others.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckedNodes {
    /// Sorted by name.
    pub nodes: Vec<ClusterNode>,
    /// Sorted by node, then field; a node may have several.
    pub faults: Vec<NodeFaultAt>,
}

/// Judges `nodes` together: each must be named once and have an IPv4 InternalIP; a pod
/// CIDR, if set, must be an IPv4 network of at most /30, inside `cluster` when given, and
/// overlap no other node's. The result does not depend on the order of `nodes`.
pub fn check_nodes(nodes: &[Node], cluster: Option<Ipv4Net>) -> CheckedNodes {
    let mut faults = Vec::new();
    let mut by_name: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
    for node in nodes {
        match node.metadata.name.as_deref() {
            Some(name) if !name.is_empty() => by_name.entry(name).or_default().push(node),
            _ => faults.push(fault("", NodeFault::Unnamed)),
        }
    }
    let mut candidates = Vec::new();
    for (name, copies) in by_name {
        let [node] = copies.as_slice() else {
            let copies = copies.len();
            faults.push(fault(name, NodeFault::Duplicate { copies }));
            continue;
        };
        let internal_ip = internal_ip(node);
        if internal_ip.is_none() {
            faults.push(fault(name, NodeFault::NoInternalIp));
        }
        let pod_cidr = match pod_cidr(node, cluster) {
            Ok(cidr) => Some(cidr),
            Err(f) => {
                faults.push(fault(name, f));
                None
            }
        };
        if let (Some(internal_ip), Some(pod_cidr)) = (internal_ip, pod_cidr) {
            candidates.push(ClusterNode {
                name: name.to_string(),
                internal_ip,
                pod_cidr,
            });
        }
    }
    let overlapping = overlaps(&candidates);
    candidates.retain(|n| !overlapping.iter().any(|f| f.node == n.name));
    faults.extend(overlapping);
    faults.sort();
    CheckedNodes {
        nodes: candidates,
        faults,
    }
}

fn fault(node: &str, fault: NodeFault) -> NodeFaultAt {
    NodeFaultAt {
        node: node.to_string(),
        fault,
    }
}

/// The first IPv4 address of type InternalIP.
pub fn internal_ip(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == INTERNAL_IP)
        .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
}

/// The node's pod CIDR: None when unset, a fault when unusable.
fn pod_cidr(node: &Node, cluster: Option<Ipv4Net>) -> Result<Option<Ipv4Net>, NodeFault> {
    let value = match node.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()) {
        None | Some("") => return Ok(None),
        Some(value) => value,
    };
    let invalid = |defect| NodeFault::PodCidrInvalid {
        value: value.to_string(),
        defect,
    };
    let cidr = match value.parse::<IpNet>() {
        Ok(IpNet::V4(cidr)) => cidr,
        Ok(IpNet::V6(_)) => return Err(invalid(CidrDefect::NotIpv4)),
        // `ipnet` wants a prefix; tell an address apart from garbage for the message.
        Err(_) if value.parse::<IpAddr>().is_ok_and(|a| a.is_ipv6()) => {
            return Err(invalid(CidrDefect::NotIpv4));
        }
        Err(_) => return Err(invalid(CidrDefect::Unparsable)),
    };
    if cidr.trunc() != cidr {
        return Err(invalid(CidrDefect::HostBits));
    }
    if cidr.prefix_len() > 30 {
        return Err(invalid(CidrDefect::TooLong));
    }
    match cluster {
        Some(cluster) if !cluster.contains(&cidr) => Err(NodeFault::PodCidrOutsideCluster {
            pod_cidr: cidr,
            cluster,
        }),
        _ => Ok(Some(cidr)),
    }
}

/// A fault for every node whose pod CIDR overlaps another's. Two prefixes overlap only if
/// one contains the other, so in (network, length) order each prefix needs comparing only
/// with the earlier one that reaches furthest.
fn overlaps(nodes: &[ClusterNode]) -> Vec<NodeFaultAt> {
    let mut cidrs: Vec<(Ipv4Net, &str)> = nodes
        .iter()
        .filter_map(|n| Some((n.pod_cidr?, n.name.as_str())))
        .collect();
    cidrs.sort();
    let mut out: BTreeMap<&str, NodeFaultAt> = BTreeMap::new();
    let mut widest: Option<(Ipv4Net, &str)> = None;
    for (cidr, name) in cidrs {
        match widest {
            Some((outer, outer_name)) if outer.contains(&cidr) => {
                let overlap = |at: &str, pod_cidr, other: &str, other_cidr| NodeFaultAt {
                    node: at.to_string(),
                    fault: NodeFault::PodCidrOverlap {
                        pod_cidr,
                        other: other.to_string(),
                        other_cidr,
                    },
                };
                out.entry(name)
                    .or_insert_with(|| overlap(name, cidr, outer_name, outer));
                out.entry(outer_name)
                    .or_insert_with(|| overlap(outer_name, outer, name, cidr));
            }
            _ => widest = Some((cidr, name)),
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests;
