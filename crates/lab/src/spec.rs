//! The lab file: which nodes exist, their pod CIDRs and the service CIDR.

use std::{net::Ipv4Addr, path::Path};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{LabError, error::io_err, ipam, names};

pub const API_VERSION: &str = "sluice.dev/v1alpha1";
pub const KIND: &str = "Lab";
const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/16";

/// The validated lab file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabSpec {
    pub service_cidr: Ipv4Net,
    pub tx_checksum_offload: bool,
    pub nodes: Vec<NodeSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    pub name: String,
    pub pod_cidr: Ipv4Net,
}

impl NodeSpec {
    /// The node's address in its own pod CIDR: every pod's gateway.
    pub fn router_ip(&self) -> Ipv4Addr {
        ipam::router_ip(self.pod_cidr)
    }
}

/// The file as written; every field optional so that a missing one gets a message naming it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawLab {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(rename = "serviceCIDR")]
    service_cidr: Option<String>,
    tx_checksum_offload: Option<bool>,
    nodes: Option<Vec<RawNode>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<String>,
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
}

impl LabSpec {
    pub fn load(path: &Path) -> Result<Self, LabError> {
        let text = std::fs::read_to_string(path).map_err(io_err("read", path))?;
        Self::parse(path, &text)
    }

    /// Parses and validates; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, LabError> {
        let err = |field: &str, message: String| LabError::LabFile {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let raw: RawLab =
            serde_saphyr::from_str(text).map_err(|e| err("(document)", e.to_string()))?;
        match raw.api_version.as_deref() {
            Some(API_VERSION) => {}
            Some(other) => {
                return Err(err(
                    "apiVersion",
                    format!("must be {API_VERSION:?} (got {other:?})"),
                ));
            }
            None => return Err(err("apiVersion", format!("required ({API_VERSION:?})"))),
        }
        match raw.kind.as_deref() {
            Some(KIND) => {}
            Some(other) => return Err(err("kind", format!("must be {KIND:?} (got {other:?})"))),
            None => return Err(err("kind", format!("required ({KIND:?})"))),
        }
        let service_cidr = parse_cidr(
            raw.service_cidr.as_deref().unwrap_or(DEFAULT_SERVICE_CIDR),
            // ClusterIPs are handed out from .10 upwards, so the range must reach past it.
            28,
        )
        .map_err(|m| err("serviceCIDR", m))?;
        let raw_nodes = raw.nodes.unwrap_or_default();
        if raw_nodes.is_empty() {
            return Err(err("nodes", "at least one node is required".into()));
        }
        let mut nodes: Vec<NodeSpec> = Vec::with_capacity(raw_nodes.len());
        for (i, node) in raw_nodes.into_iter().enumerate() {
            let name = node
                .name
                .ok_or_else(|| err(&format!("nodes[{i}].name"), "required".into()))?;
            names::check_dns_label(&name, names::MAX_NODE_NAME)
                .map_err(|m| err(&format!("nodes[{i}].name"), m))?;
            if let Some(j) = nodes.iter().position(|n| n.name == name) {
                return Err(err(
                    &format!("nodes[{i}].name"),
                    format!("duplicate node name {name:?} (also nodes[{j}])"),
                ));
            }
            let field = format!("nodes[{i}].podCIDR");
            let cidr = node
                .pod_cidr
                .ok_or_else(|| err(&field, "required".into()))?;
            // The node's router takes .1 and pods need at least one more address.
            let pod_cidr = parse_cidr(&cidr, 30).map_err(|m| err(&field, m))?;
            if let Some(j) = nodes.iter().position(|n| overlaps(n.pod_cidr, pod_cidr)) {
                return Err(err(
                    &field,
                    format!(
                        "{pod_cidr} overlaps nodes[{j}].podCIDR {}",
                        nodes[j].pod_cidr
                    ),
                ));
            }
            if overlaps(service_cidr, pod_cidr) {
                return Err(err(
                    &field,
                    format!("{pod_cidr} overlaps serviceCIDR {service_cidr}"),
                ));
            }
            nodes.push(NodeSpec { name, pod_cidr });
        }
        Ok(LabSpec {
            service_cidr,
            tx_checksum_offload: raw.tx_checksum_offload.unwrap_or(true),
            nodes,
        })
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

fn parse_cidr(text: &str, max_prefix: u8) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = text
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv4 CIDR like 10.244.1.0/24"))?;
    if net.network() != net.addr() {
        return Err(format!(
            "{text} has host bits set; the network is {}",
            net.trunc()
        ));
    }
    if net.prefix_len() > max_prefix {
        return Err(format!(
            "{text} is too small: the prefix may be at most /{max_prefix}"
        ));
    }
    Ok(net)
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LabSpec, String> {
        LabSpec::parse(Path::new("lab.yaml"), text).map_err(|e| e.to_string())
    }

    const HEAD: &str = "apiVersion: sluice.dev/v1alpha1\nkind: Lab\n";

    #[test]
    fn parses_the_example_with_defaults() {
        let spec = parse(&format!(
            "{HEAD}nodes:\n  - name: node-1\n    podCIDR: 10.244.1.0/24\n  - name: node-2\n    podCIDR: 10.244.2.0/24\n"
        ))
        .unwrap();
        assert_eq!(spec.service_cidr.to_string(), "10.96.0.0/16");
        assert!(spec.tx_checksum_offload);
        assert_eq!(spec.nodes.len(), 2);
        assert_eq!(spec.nodes[1].router_ip(), Ipv4Addr::new(10, 244, 2, 1));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("kind: Lab\nnodes: []\n", "lab.yaml: apiVersion: required"),
            (
                "apiVersion: v1\nkind: Lab\n",
                "lab.yaml: apiVersion: must be \"sluice.dev/v1alpha1\"",
            ),
            (
                "apiVersion: sluice.dev/v1alpha1\nkind: Cluster\n",
                "lab.yaml: kind: must be \"Lab\"",
            ),
            (
                &format!("{HEAD}nodes: []\n"),
                "lab.yaml: nodes: at least one node",
            ),
            (
                &format!(
                    "{HEAD}serviceCIDR: 10.96.0.0/33\nnodes: [{{name: a, podCIDR: 10.244.1.0/24}}]\n"
                ),
                "lab.yaml: serviceCIDR: \"10.96.0.0/33\" is not an IPv4 CIDR",
            ),
            (
                &format!("{HEAD}nodes: [{{name: a, podCIDR: 10.244.1.7/24}}]\n"),
                "lab.yaml: nodes[0].podCIDR: 10.244.1.7/24 has host bits set; the network is 10.244.1.0/24",
            ),
            (
                &format!("{HEAD}nodes: [{{name: a, podCIDR: 10.244.1.0/31}}]\n"),
                "lab.yaml: nodes[0].podCIDR: 10.244.1.0/31 is too small",
            ),
            (
                &format!(
                    "{HEAD}nodes: [{{name: a, podCIDR: 10.244.0.0/16}}, {{name: b, podCIDR: 10.244.2.0/24}}]\n"
                ),
                "lab.yaml: nodes[1].podCIDR: 10.244.2.0/24 overlaps nodes[0].podCIDR 10.244.0.0/16",
            ),
            (
                &format!("{HEAD}nodes: [{{name: a, podCIDR: 10.96.1.0/24}}]\n"),
                "lab.yaml: nodes[0].podCIDR: 10.96.1.0/24 overlaps serviceCIDR 10.96.0.0/16",
            ),
            (
                &format!(
                    "{HEAD}nodes: [{{name: a, podCIDR: 10.244.1.0/24}}, {{name: a, podCIDR: 10.244.2.0/24}}]\n"
                ),
                "lab.yaml: nodes[1].name: duplicate node name \"a\" (also nodes[0])",
            ),
            (
                &format!("{HEAD}nodes: [{{name: Node_1, podCIDR: 10.244.1.0/24}}]\n"),
                "lab.yaml: nodes[0].name: ",
            ),
            (
                &format!("{HEAD}nodes: [{{podCIDR: 10.244.1.0/24}}]\n"),
                "lab.yaml: nodes[0].name: required",
            ),
            (
                &format!("{HEAD}nodes: [{{name: a}}]\n"),
                "lab.yaml: nodes[0].podCIDR: required",
            ),
            (
                &format!("{HEAD}extra: 1\nnodes: []\n"),
                "lab.yaml: (document): ",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text).expect_err(text);
            assert!(
                err.starts_with(expected),
                "{text:?}\n  got: {err}\n want: {expected}"
            );
        }
    }
}
