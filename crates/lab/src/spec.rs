//! The lab file: which nodes exist, their pod CIDRs and the service CIDR, and the hosts
//! outside the cluster (the world) that ipBlock rules can be tested against.

use std::{net::Ipv4Addr, path::Path};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{
    LabError,
    error::io_err,
    ipam,
    topology::{
        self, DEFAULT_UNDERLAY_CIDR, DEFAULT_UNDERLAY_MTU, MAX_UNDERLAY_MTU, MIN_UNDERLAY_MTU,
        RoutingMode, UnderlaySpec, VXLAN_OVERHEAD, WorldAttach, check_cidr, overlaps,
    },
};

pub const API_VERSION: &str = "sluice.dev/v1alpha1";
pub const KIND: &str = "Lab";
const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/16";

/// The validated lab file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabSpec {
    pub service_cidr: Ipv4Net,
    /// Every node's pod CIDR lies inside; fixed for the lab's life, so nodes added later
    /// are held to it.
    pub cluster_cidr: Ipv4Net,
    /// Labs written before several nodes existed run local mode without an underlay.
    #[serde(default)]
    pub routing_mode: RoutingMode,
    #[serde(default)]
    pub underlay: Option<UnderlaySpec>,
    pub tx_checksum_offload: bool,
    pub nodes: Vec<NodeSpec>,
    /// Labs written before world hosts existed have none.
    #[serde(default)]
    pub world: Vec<WorldHostSpec>,
    /// Rows each endpoint's policy map holds (the agents' `--policy-map-max`); None: their
    /// default.
    #[serde(default)]
    pub policy_map_max: Option<u32>,
    /// Ports node port Services may use (the agents' `--node-port-range`); None: the
    /// default, 30000-32767.
    #[serde(default)]
    pub node_port_range: Option<NodePortRange>,
    /// What the agents expose besides the datapath; labs written before it have nothing.
    #[serde(default)]
    pub observability: Observability,
    /// The lab's cloud load balancer: a VIP pool and a router in front of the nodes.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSpec>,
    /// Egress masquerading (the agents' `--masquerade`); None: off.
    #[serde(default)]
    pub masquerade: Option<MasqueradeSpec>,
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

/// A host outside the cluster: its own network namespace behind one node or on the
/// underlay, serving its ports like a pod does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorldHostSpec {
    pub name: String,
    pub address: Ipv4Addr,
    /// The node it hangs off (default: the first node), or the underlay.
    pub attach: WorldAttach,
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
    /// On the node's `underlay0`, the Node's InternalIP; None without an underlay. A node
    /// given to [`crate::Lab::add_node`] without one gets the lowest free address.
    #[serde(default)]
    pub underlay_address: Option<Ipv4Addr>,
    /// The Node's `topology.kubernetes.io/zone` label, and the `zone` of the endpoints of
    /// its pods; None: no zone, so zones decide nothing for it.
    #[serde(default)]
    pub zone: Option<String>,
}

impl NodeSpec {
    /// The node's address in its own pod CIDR: every pod's gateway.
    pub fn router_ip(&self) -> Ipv4Addr {
        ipam::router_ip(self.pod_cidr)
    }

    /// The Node object's InternalIP: its underlay address, else its router address.
    pub fn internal_ip(&self) -> Ipv4Addr {
        self.underlay_address.unwrap_or_else(|| self.router_ip())
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
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    routing_mode: Option<String>,
    underlay: Option<RawUnderlay>,
    tx_checksum_offload: Option<bool>,
    policy_map_max: Option<u32>,
    node_port_range: Option<String>,
    observability: Option<RawObservability>,
    load_balancer: Option<cloud::RawLoadBalancer>,
    masquerade: Option<masquerade::RawMasquerade>,
    nodes: Option<Vec<RawNode>>,
    world: Option<Vec<RawWorldHost>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnderlay {
    cidr: Option<String>,
    mtu: Option<u32>,
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
    /// `underlay` or a node's name.
    attach: Option<String>,
    /// The older spelling of `attach: <node>`.
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
    #[serde(rename = "underlayAddress")]
    underlay_address: Option<String>,
    zone: Option<String>,
}

/// `nodes[i].field`, as the lab file's errors name a node's field.
fn node_field(i: usize, field: &str) -> String {
    if field.is_empty() {
        format!("nodes[{i}]")
    } else {
        format!("nodes[{i}].{field}")
    }
}

impl LabSpec {
    pub fn load(path: &Path) -> Result<Self, LabError> {
        let text = std::fs::read_to_string(path).map_err(io_err("read", path))?;
        Self::parse(path, &text)
    }

    /// Parses and validates; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, LabError> {
        Self::parse_explicit(path, text).map(|(spec, _)| spec)
    }

    /// [`Self::load`], and the names of the nodes whose `underlayAddress` the file sets
    /// (a running lab gives the others the lowest free address, not their position's).
    pub(crate) fn load_explicit(path: &Path) -> Result<(Self, Vec<String>), LabError> {
        let text = std::fs::read_to_string(path).map_err(io_err("read", path))?;
        Self::parse_explicit(path, &text)
    }

    fn parse_explicit(path: &Path, text: &str) -> Result<(Self, Vec<String>), LabError> {
        let err = |field: &str, message: String| LabError::LabFile {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        // YAML first, then the lab's fields: a value of the wrong shape is refused naming
        // its field, not only a position in the text.
        let value: serde_json::Value =
            serde_saphyr::from_str(text).map_err(|e| err("(document)", e.to_string()))?;
        let value = match value {
            serde_json::Value::Null => serde_json::Value::Object(serde_json::Map::new()),
            value => value,
        };
        let raw: RawLab = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { "(document)" } else { &field };
            err(field, e.into_inner().to_string())
        })?;
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
        let nodes = parse_nodes(raw.nodes.unwrap_or_default(), &err)?;
        let cluster_cidr = match raw.cluster_cidr.as_deref() {
            None => topology::default_cluster_cidr(&nodes),
            Some(text) => {
                parse_cluster_cidr(text, service_cidr).map_err(|m| err("clusterCIDR", m))?
            }
        };
        let (routing_mode, underlay) =
            parse_joining(raw.routing_mode.as_deref(), raw.underlay, nodes.len(), &err)?;
        let mut spec = LabSpec {
            service_cidr,
            cluster_cidr,
            routing_mode,
            underlay,
            tx_checksum_offload: raw.tx_checksum_offload.unwrap_or(true),
            nodes,
            world: Vec::new(),
            policy_map_max: raw.policy_map_max,
            node_port_range: raw
                .node_port_range
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|m| err("nodePortRange", m))?,
            observability: Observability::default(),
            load_balancer: None,
            masquerade: None,
        };
        topology::check_underlay(&spec).map_err(|(f, m)| err(&f, m))?;
        let explicit = spec
            .nodes
            .iter()
            .filter(|n| n.underlay_address.is_some())
            .map(|n| n.name.clone())
            .collect();
        spec.place_on_underlay(&err)?;
        topology::check_nodes(&spec, &node_field).map_err(|(f, m)| err(&f, m))?;
        spec.load_balancer = raw
            .load_balancer
            .map(|lb| cloud::parse_load_balancer(lb, &spec, &err))
            .transpose()?;
        for (i, host) in raw.world.unwrap_or_default().into_iter().enumerate() {
            let host = world::parse_world_host(i, host, &spec, &err)?;
            spec.world.push(host);
        }
        cloud::check_router_address(&spec, &err)?;
        spec.masquerade = raw
            .masquerade
            .map(|m| masquerade::parse_masquerade(m, &spec, &err))
            .transpose()?;
        if raw.policy_map_max == Some(0) {
            return Err(err("policyMapMax", "must be at least 1 (got 0)".into()));
        }
        if let Some(o) = raw.observability {
            if let Some(mode) = o.policy_log.as_deref()
                && !matches!(mode, "allow" | "deny" | "all")
            {
                return Err(err(
                    "observability.policyLog",
                    format!("must be allow, deny or all (got {mode:?})"),
                ));
            }
            spec.observability = Observability {
                metrics: o.metrics.unwrap_or(false),
                policy_log: o.policy_log,
                policy_log_rate: o.policy_log_rate,
            };
        }
        Ok((spec, explicit))
    }

    /// Gives node k without an `underlayAddress` the address `network + 11 + k`.
    fn place_on_underlay(
        &mut self,
        err: &impl Fn(&str, String) -> LabError,
    ) -> Result<(), LabError> {
        let Some(underlay) = self.underlay else {
            return Ok(());
        };
        let count = self.nodes.len();
        for (k, node) in self.nodes.iter_mut().enumerate() {
            if node.underlay_address.is_none() {
                let address = underlay.default_address(k).ok_or_else(|| {
                    err(
                        "underlay.cidr",
                        format!(
                            "{} is too small for {count} nodes: node k takes network + {} + k",
                            underlay.cidr,
                            topology::FIRST_NODE_OFFSET
                        ),
                    )
                })?;
                node.underlay_address = Some(address);
            }
        }
        Ok(())
    }

    /// Whether the lab has a router in front of its nodes: for a load balancer pool, or for
    /// world hosts behind it.
    pub fn has_router(&self) -> bool {
        self.underlay.is_some()
            && (self.load_balancer.is_some()
                || self.world.iter().any(|w| w.attach == WorldAttach::Router))
    }

    pub fn world_host(&self, name: &str) -> Option<&WorldHostSpec> {
        self.world.iter().find(|w| w.name == name)
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The MTU of pods' (and node-attached world hosts') links: the underlay's, less the
    /// VXLAN header in tunnel mode; None in local mode, which keeps the veth default.
    pub fn pod_mtu(&self) -> Option<u32> {
        let underlay = self.underlay?;
        match self.routing_mode {
            RoutingMode::Local => None,
            RoutingMode::Tunnel => Some(underlay.mtu - VXLAN_OVERHEAD),
            RoutingMode::Native => Some(underlay.mtu),
        }
    }
}

/// `nodes:` with each node's own fields checked; [`topology::check_nodes`] checks them
/// against each other once their underlay addresses are known.
fn parse_nodes(
    raw_nodes: Vec<RawNode>,
    err: &impl Fn(&str, String) -> LabError,
) -> Result<Vec<NodeSpec>, LabError> {
    if raw_nodes.is_empty() {
        return Err(err("nodes", "at least one node is required".into()));
    }
    let mut nodes: Vec<NodeSpec> = Vec::with_capacity(raw_nodes.len());
    for (i, node) in raw_nodes.into_iter().enumerate() {
        let name = node
            .name
            .ok_or_else(|| err(&node_field(i, "name"), "required".into()))?;
        let field = node_field(i, "podCIDR");
        let cidr = node
            .pod_cidr
            .ok_or_else(|| err(&field, "required".into()))?;
        // The node's router takes .1 and pods need at least one more address.
        let pod_cidr = parse_cidr(&cidr, 30).map_err(|m| err(&field, m))?;
        let underlay_address = node
            .underlay_address
            .map(|text| {
                text.parse::<Ipv4Addr>().map_err(|_| {
                    err(
                        &node_field(i, "underlayAddress"),
                        format!("{text:?} is not an IPv4 address"),
                    )
                })
            })
            .transpose()?;
        nodes.push(NodeSpec {
            name,
            pod_cidr,
            underlay_address,
            zone: node.zone,
        });
    }
    Ok(nodes)
}

fn parse_cluster_cidr(text: &str, service_cidr: Ipv4Net) -> Result<Ipv4Net, String> {
    let cidr = parse_cidr(text, 30)?;
    if overlaps(cidr, service_cidr) {
        return Err(format!("{cidr} overlaps serviceCIDR {service_cidr}"));
    }
    Ok(cidr)
}

/// `routingMode` and `underlay`: several nodes always need a segment between them, and so
/// does a lab that names a routing mode, to be able to grow; a lab of one node without
/// either runs local mode.
fn parse_joining(
    routing_mode: Option<&str>,
    underlay: Option<RawUnderlay>,
    nodes: usize,
    err: &impl Fn(&str, String) -> LabError,
) -> Result<(RoutingMode, Option<UnderlaySpec>), LabError> {
    let mode = routing_mode
        .map(RoutingMode::parse)
        .transpose()
        .map_err(|m| err("routingMode", m))?;
    let joined = underlay.is_some() || nodes > 1 || mode.is_some();
    let underlay = match underlay {
        Some(u) => parse_underlay(u, err)?,
        None if joined => UnderlaySpec {
            cidr: DEFAULT_UNDERLAY_CIDR,
            mtu: DEFAULT_UNDERLAY_MTU,
        },
        None => return Ok((RoutingMode::Local, None)),
    };
    Ok((mode.unwrap_or(RoutingMode::Tunnel), Some(underlay)))
}

fn parse_underlay(
    raw: RawUnderlay,
    err: &impl Fn(&str, String) -> LabError,
) -> Result<UnderlaySpec, LabError> {
    let cidr = match raw.cidr {
        None => DEFAULT_UNDERLAY_CIDR,
        Some(text) => parse_cidr(&text, 30).map_err(|m| err("underlay.cidr", m))?,
    };
    let mtu = raw.mtu.unwrap_or(DEFAULT_UNDERLAY_MTU);
    if !(MIN_UNDERLAY_MTU..=MAX_UNDERLAY_MTU).contains(&mtu) {
        return Err(err(
            "underlay.mtu",
            format!(
                "{mtu} is outside {MIN_UNDERLAY_MTU}-{MAX_UNDERLAY_MTU}: pods keep 576 bytes inside the tunnel"
            ),
        ));
    }
    Ok(UnderlaySpec { cidr, mtu })
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
    check_cidr(net, max_prefix)?;
    Ok(net)
}

mod cloud;
mod masquerade;
#[cfg(test)]
mod tests;
mod world;

pub use cloud::{HealthCheckSpec, LoadBalancerSpec, router_address};
pub use masquerade::MasqueradeSpec;
pub use sluice_sources::NodePortRange;
