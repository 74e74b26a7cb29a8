//! The lab file: which nodes exist, their pod CIDRs and the service CIDR, and the hosts
//! outside the cluster (the world) that ipBlock rules can be tested against.

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
    /// Labs written before world hosts existed have none.
    #[serde(default)]
    pub world: Vec<WorldHostSpec>,
    /// Rows each endpoint's policy map holds (the agents' `--policy-map-max`); None: their
    /// default.
    #[serde(default)]
    pub policy_map_max: Option<u32>,
    /// What the agents expose besides the datapath; labs written before it have nothing.
    #[serde(default)]
    pub observability: Observability,
}

/// `observability:` in the lab file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observability {
    /// Each agent serves Prometheus metrics on [`METRICS_PORT`] in its node's namespace.
    pub metrics: bool,
    /// Policy action logging: `allow`, `deny` or `all` (the agents' `--policy-log`).
    pub policy_log: Option<String>,
    /// Policy log lines per second (the agents' `--policy-log-rate`); None: their default.
    pub policy_log_rate: Option<u32>,
}

/// Where each lab agent serves metrics, on every address of its node's namespace.
pub const METRICS_PORT: u16 = 9962;

/// A host outside the cluster: its own network namespace behind one node, serving its ports
/// like a pod does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorldHostSpec {
    pub name: String,
    pub address: Ipv4Addr,
    /// The node it hangs off (default: the first node).
    pub node: String,
    pub ports: Vec<WorldPort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldPort {
    pub port: u16,
    /// `TCP` or `UDP`: the lab's servers speak nothing else.
    pub protocol: String,
}

impl WorldHostSpec {
    /// TCP and UDP ports, as the pod server takes them.
    pub fn ports(&self) -> (Vec<u16>, Vec<u16>) {
        let pick = |proto: &str| {
            self.ports
                .iter()
                .filter(|p| p.protocol == proto)
                .map(|p| p.port)
                .collect()
        };
        (pick("TCP"), pick("UDP"))
    }
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
    policy_map_max: Option<u32>,
    observability: Option<RawObservability>,
    nodes: Option<Vec<RawNode>>,
    world: Option<Vec<RawWorldHost>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawObservability {
    metrics: Option<bool>,
    policy_log: Option<String>,
    policy_log_rate: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorldHost {
    name: Option<String>,
    address: Option<String>,
    node: Option<String>,
    ports: Option<Vec<RawWorldPort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorldPort {
    port: Option<u32>,
    protocol: Option<String>,
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
        let mut world: Vec<WorldHostSpec> = Vec::new();
        for (i, host) in raw.world.unwrap_or_default().into_iter().enumerate() {
            world.push(parse_world_host(
                i,
                host,
                service_cidr,
                &nodes,
                &world,
                &err,
            )?);
        }
        if raw.policy_map_max == Some(0) {
            return Err(err("policyMapMax", "must be at least 1 (got 0)".into()));
        }
        let observability = match raw.observability {
            None => Observability::default(),
            Some(o) => {
                if let Some(mode) = o.policy_log.as_deref()
                    && !matches!(mode, "allow" | "deny" | "all")
                {
                    return Err(err(
                        "observability.policyLog",
                        format!("must be allow, deny or all (got {mode:?})"),
                    ));
                }
                Observability {
                    metrics: o.metrics.unwrap_or(false),
                    policy_log: o.policy_log,
                    policy_log_rate: o.policy_log_rate,
                }
            }
        };
        Ok(LabSpec {
            service_cidr,
            tx_checksum_offload: raw.tx_checksum_offload.unwrap_or(true),
            nodes,
            world,
            policy_map_max: raw.policy_map_max,
            observability,
        })
    }

    pub fn world_host(&self, name: &str) -> Option<&WorldHostSpec> {
        self.world.iter().find(|w| w.name == name)
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// One `world[i]` entry, checked against the nodes and the hosts before it.
fn parse_world_host(
    i: usize,
    host: RawWorldHost,
    service_cidr: Ipv4Net,
    nodes: &[NodeSpec],
    before: &[WorldHostSpec],
    err: &impl Fn(&str, String) -> LabError,
) -> Result<WorldHostSpec, LabError> {
    let field = |f: &str| format!("world[{i}].{f}");
    let name = host
        .name
        .ok_or_else(|| err(&field("name"), "required".into()))?;
    names::check_dns_label(&name, names::MAX_NODE_NAME).map_err(|m| err(&field("name"), m))?;
    if let Some(j) = before.iter().position(|w| w.name == name) {
        return Err(err(
            &field("name"),
            format!("duplicate world host name {name:?} (also world[{j}])"),
        ));
    }
    // World hosts live in `sluice-<lab>-world-<name>`, which a node name could also produce.
    if let Some(node) = nodes.iter().find(|n| n.name == format!("world-{name}")) {
        return Err(err(
            &field("name"),
            format!(
                "its network namespace name would be that of node {:?}; rename one",
                node.name
            ),
        ));
    }
    let text = host
        .address
        .ok_or_else(|| err(&field("address"), "required".into()))?;
    let address: Ipv4Addr = text.parse().map_err(|_| {
        err(
            &field("address"),
            format!("{text:?} is not an IPv4 address"),
        )
    })?;
    if address.is_unspecified() || address.is_loopback() || address.is_multicast() {
        return Err(err(
            &field("address"),
            format!("{address} cannot be a host's address"),
        ));
    }
    if service_cidr.contains(&address) {
        return Err(err(
            &field("address"),
            format!("{address} is in serviceCIDR {service_cidr}"),
        ));
    }
    if let Some(node) = nodes.iter().find(|n| n.pod_cidr.contains(&address)) {
        return Err(err(
            &field("address"),
            format!(
                "{address} is in podCIDR {} of node {}: world hosts are outside the cluster",
                node.pod_cidr, node.name
            ),
        ));
    }
    if let Some(j) = before.iter().position(|w| w.address == address) {
        return Err(err(
            &field("address"),
            format!("{address} is also the address of world[{j}]"),
        ));
    }
    let node = match host.node {
        Some(node) if nodes.iter().any(|n| n.name == node) => node,
        Some(node) => {
            return Err(err(
                &field("node"),
                format!("{node:?} is not a node of the lab"),
            ));
        }
        None => nodes
            .first()
            .map(|n| n.name.clone())
            .ok_or_else(|| err(&field("node"), "the lab has no nodes".into()))?,
    };
    let mut ports: Vec<WorldPort> = Vec::new();
    for (j, p) in host.ports.unwrap_or_default().into_iter().enumerate() {
        let pfield = |f: &str| field(&format!("ports[{j}].{f}"));
        let port = p
            .port
            .ok_or_else(|| err(&pfield("port"), "required".into()))?;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err(&pfield("port"), format!("{port} is not a port (1-65535)")))?;
        let protocol = p.protocol.unwrap_or_else(|| "TCP".into());
        if protocol != "TCP" && protocol != "UDP" {
            return Err(err(
                &pfield("protocol"),
                format!("must be TCP or UDP (got {protocol:?}): the lab serves nothing else"),
            ));
        }
        if ports
            .iter()
            .any(|q| q.port == port && q.protocol == protocol)
        {
            return Err(err(
                &pfield("port"),
                format!("duplicate port {port}/{protocol}"),
            ));
        }
        ports.push(WorldPort { port, protocol });
    }
    Ok(WorldHostSpec {
        name,
        address,
        node,
        ports,
    })
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
    fn observability_is_off_unless_asked_for() {
        let nodes = "nodes: [{name: a, podCIDR: 10.244.1.0/24}]\n";
        let spec = parse(&format!("{HEAD}{nodes}")).unwrap();
        assert_eq!(spec.observability, Observability::default());
        let spec = parse(&format!(
            "{HEAD}{nodes}observability: {{metrics: true, policyLog: deny, policyLogRate: 50}}\n"
        ))
        .unwrap();
        assert!(spec.observability.metrics);
        assert_eq!(spec.observability.policy_log.as_deref(), Some("deny"));
        assert_eq!(spec.observability.policy_log_rate, Some(50));
        let bad = parse(&format!(
            "{HEAD}{nodes}observability: {{policyLog: some}}\n"
        ))
        .unwrap_err();
        assert!(bad.contains("observability.policyLog"), "{bad}");
        let unknown = parse(&format!("{HEAD}{nodes}observability: {{tracing: true}}\n"));
        assert!(unknown.is_err());
    }

    #[test]
    fn world_hosts_default_to_the_first_node_and_tcp() {
        let spec = parse(&format!(
            "{HEAD}nodes: [{{name: a, podCIDR: 10.244.1.0/24}}, {{name: b, podCIDR: 10.244.2.0/24}}]\nworld:\n  - name: internet\n    address: 203.0.113.10\n    ports: [{{port: 80}}, {{port: 53, protocol: UDP}}]\n  - {{name: partner, address: 198.51.100.7, node: b}}\n"
        ))
        .unwrap();
        assert_eq!(spec.world.len(), 2);
        let internet = spec.world_host("internet").unwrap();
        assert_eq!(internet.address, Ipv4Addr::new(203, 0, 113, 10));
        assert_eq!(internet.node, "a");
        assert_eq!(internet.ports(), (vec![80], vec![53]));
        assert_eq!(spec.world[1].node, "b");
        assert!(spec.world[1].ports.is_empty());
    }

    #[test]
    fn world_host_errors_name_the_field() {
        let nodes = "nodes: [{name: a, podCIDR: 10.244.1.0/24}]\n";
        let cases = [
            ("world: [{address: 1.2.3.4}]", "world[0].name: required"),
            ("world: [{name: w}]", "world[0].address: required"),
            (
                "world: [{name: w, address: x}]",
                "world[0].address: \"x\" is not",
            ),
            (
                "world: [{name: w, address: 10.244.1.9}]",
                "world[0].address: 10.244.1.9 is in podCIDR",
            ),
            (
                "world: [{name: w, address: 10.96.0.1}]",
                "world[0].address: 10.96.0.1 is in serviceCIDR",
            ),
            (
                "world: [{name: w, address: 1.2.3.4}, {name: w, address: 1.2.3.5}]",
                "world[1].name: duplicate world host name",
            ),
            (
                "world: [{name: v, address: 1.2.3.4}, {name: w, address: 1.2.3.4}]",
                "world[1].address: 1.2.3.4 is also the address of world[0]",
            ),
            (
                "world: [{name: w, address: 1.2.3.4, node: z}]",
                "world[0].node: \"z\" is not a node",
            ),
            (
                "world: [{name: w, address: 1.2.3.4, ports: [{port: 0}]}]",
                "world[0].ports[0].port: 0 is not a port",
            ),
            (
                "world: [{name: w, address: 1.2.3.4, ports: [{port: 9, protocol: SCTP}]}]",
                "world[0].ports[0].protocol: must be TCP or UDP",
            ),
            (
                "world: [{name: w, address: 1.2.3.4, ports: [{port: 9}, {port: 9, protocol: TCP}]}]",
                "world[0].ports[1].port: duplicate port 9/TCP",
            ),
        ];
        for (world, expected) in cases {
            let text = format!("{HEAD}{nodes}{world}\n");
            let err = parse(&text).expect_err(world);
            assert!(
                err.starts_with(&format!("lab.yaml: {expected}")),
                "{world}\n  got: {err}\n want: {expected}"
            );
        }
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
