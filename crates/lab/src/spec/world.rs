//! `world:` in the lab file: hosts outside the cluster, behind a node or on the underlay.

use std::net::Ipv4Addr;

use super::{LabSpec, RawWorldHost, RawWorldPort, WorldHostSpec, WorldPort};
use crate::{LabError, names, topology::WorldAttach};

/// One `world[i]` entry, checked against the nodes, the underlay and the hosts before it.
pub(super) fn parse_world_host(
    i: usize,
    host: RawWorldHost,
    spec: &LabSpec,
    err: &impl Fn(&str, String) -> LabError,
) -> Result<WorldHostSpec, LabError> {
    let field = |f: &str| format!("world[{i}].{f}");
    let (nodes, before) = (&spec.nodes, &spec.world);
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
    check_world_address(spec, address).map_err(|m| err(&field("address"), m))?;
    if let Some(j) = before.iter().position(|w| w.address == address) {
        return Err(err(
            &field("address"),
            format!("{address} is also the address of world[{j}]"),
        ));
    }
    let attach =
        parse_attach(spec, host.attach, host.node, address).map_err(|(f, m)| err(&field(f), m))?;
    let ports = parse_world_ports(host.ports.unwrap_or_default(), &|f: &str| field(f), err)?;
    Ok(WorldHostSpec {
        name,
        address,
        attach,
        ports,
    })
}

/// A world host's address: a real host's, outside the cluster's ranges and no node's.
fn check_world_address(spec: &LabSpec, address: Ipv4Addr) -> Result<(), String> {
    if address.is_unspecified() || address.is_loopback() || address.is_multicast() {
        return Err(format!("{address} cannot be a host's address"));
    }
    if spec.service_cidr.contains(&address) {
        return Err(format!("{address} is in serviceCIDR {}", spec.service_cidr));
    }
    if let Some(node) = spec.nodes.iter().find(|n| n.pod_cidr.contains(&address)) {
        return Err(format!(
            "{address} is in podCIDR {} of node {}: world hosts are outside the cluster",
            node.pod_cidr, node.name
        ));
    }
    if let Some(node) = spec
        .nodes
        .iter()
        .find(|n| n.underlay_address == Some(address))
    {
        return Err(format!(
            "{address} is the underlay address of node {}",
            node.name
        ));
    }
    Ok(())
}

/// `attach:` (or the older `node:`): `underlay`, `router` or a node of the lab; default
/// the first node. Only a host on the underlay may take an address inside it.
fn parse_attach(
    spec: &LabSpec,
    attach: Option<String>,
    node: Option<String>,
    address: Ipv4Addr,
) -> Result<WorldAttach, (&'static str, String)> {
    let (field, value) = match (attach, node) {
        (Some(_), Some(_)) => {
            return Err(("node", "give attach or node, not both".into()));
        }
        (Some(a), None) => ("attach", Some(a)),
        (None, node) => ("node", node),
    };
    let attach = match value.as_deref() {
        Some("underlay") if field == "attach" => match spec.underlay {
            Some(_) => WorldAttach::Underlay,
            None => {
                return Err((
                    field,
                    "the lab has no underlay (one node and no `underlay:` entry)".into(),
                ));
            }
        },
        Some("router") if field == "attach" => match spec.underlay {
            Some(_) => WorldAttach::Router,
            None => {
                return Err((
                    field,
                    "the router sits on the underlay, and the lab has none (one node and no `underlay:` entry)".into(),
                ));
            }
        },
        Some(name) if spec.node(name).is_some() => WorldAttach::Node(name.to_string()),
        Some(other) if field == "attach" => {
            return Err((
                field,
                format!("{other:?} is neither underlay, router nor a node of the lab"),
            ));
        }
        Some(other) => return Err((field, format!("{other:?} is not a node of the lab"))),
        None => WorldAttach::Node(
            spec.nodes
                .first()
                .map(|n| n.name.clone())
                .ok_or_else(|| (field, "the lab has no nodes".to_string()))?,
        ),
    };
    if let (WorldAttach::Node(_) | WorldAttach::Router, Some(underlay)) = (&attach, spec.underlay)
        && underlay.cidr.contains(&address)
    {
        return Err((
            "address",
            format!(
                "{address} is in underlay.cidr {}: only a host with attach: underlay may be there",
                underlay.cidr
            ),
        ));
    }
    Ok(attach)
}

fn parse_world_ports(
    raw: Vec<RawWorldPort>,
    field: &dyn Fn(&str) -> String,
    err: &impl Fn(&str, String) -> LabError,
) -> Result<Vec<WorldPort>, LabError> {
    let mut ports: Vec<WorldPort> = Vec::new();
    for (j, p) in raw.into_iter().enumerate() {
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
    Ok(ports)
}
