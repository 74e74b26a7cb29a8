//! NetworkPolicies; CIDR arithmetic is ipnet's.

use ipnet::IpNet;
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{
    Check, check_str, int_or_name, invalid, labels::label_selector, one_of, port_number, protocol,
    required,
};

const POLICY_TYPES: &[&str] = &["Ingress", "Egress"];

pub(super) fn network_policy(policy: &NetworkPolicy) -> Check {
    let spec = required("spec", &policy.spec)?;
    if let Some(selector) = &spec.pod_selector {
        label_selector("spec.podSelector", selector)?;
    }
    let types = spec.policy_types.as_deref().unwrap_or_default();
    for (i, kind) in types.iter().enumerate() {
        let field = format!("spec.policyTypes[{i}]");
        one_of(&field, kind, "policy type", POLICY_TYPES)?;
        if types[..i].contains(kind) {
            return Err(invalid(field, format!("duplicate value {kind:?}")));
        }
    }
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let field = format!("spec.ingress[{i}]");
        policy_ports(&field, rule.ports.as_deref())?;
        policy_peers(&format!("{field}.from"), rule.from.as_deref())?;
    }
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let field = format!("spec.egress[{i}]");
        policy_ports(&field, rule.ports.as_deref())?;
        policy_peers(&format!("{field}.to"), rule.to.as_deref())?;
    }
    Ok(())
}

fn policy_ports(field: &str, ports: Option<&[NetworkPolicyPort]>) -> Check {
    for (i, port) in ports.unwrap_or_default().iter().enumerate() {
        policy_port(&format!("{field}.ports[{i}]"), port)?;
    }
    Ok(())
}

fn policy_port(field: &str, port: &NetworkPolicyPort) -> Check {
    protocol(&format!("{field}.protocol"), port.protocol.as_ref())?;
    if let Some(number) = &port.port {
        int_or_name(&format!("{field}.port"), number)?;
    }
    let Some(end_port) = port.end_port else {
        return Ok(());
    };
    let field = format!("{field}.endPort");
    match &port.port {
        Some(IntOrString::Int(start)) if end_port < *start => Err(invalid(
            field,
            format!("must be greater than or equal to port {start} (got {end_port})"),
        )),
        Some(IntOrString::Int(_)) => port_number(&field, end_port),
        _ => Err(invalid(field, "may not be set unless port is a number")),
    }
}

fn policy_peers(field: &str, peers: Option<&[NetworkPolicyPeer]>) -> Check {
    for (i, peer) in peers.unwrap_or_default().iter().enumerate() {
        policy_peer(&format!("{field}[{i}]"), peer)?;
    }
    Ok(())
}

fn policy_peer(field: &str, peer: &NetworkPolicyPeer) -> Check {
    let selectors = [
        ("podSelector", &peer.pod_selector),
        ("namespaceSelector", &peer.namespace_selector),
    ];
    let has_selector = selectors.iter().any(|(_, s)| s.is_some());
    match &peer.ip_block {
        Some(_) if has_selector => Err(invalid(
            field,
            "may not combine ipBlock with podSelector or namespaceSelector",
        )),
        Some(block) => {
            let cidr_field = format!("{field}.ipBlock.cidr");
            check_str(&cidr_field, &block.cidr, "CIDR", cidr)?;
            let outer = parse_cidr(&block.cidr).map_err(|e| invalid(cidr_field, e))?;
            for (i, except) in block.except.iter().flatten().enumerate() {
                let field = format!("{field}.ipBlock.except[{i}]");
                check_str(&field, except, "CIDR", cidr)?;
                let inner = parse_cidr(except).map_err(|e| invalid(&field, e))?;
                if !strictly_inside(&inner, &outer) {
                    return Err(invalid(
                        field,
                        format!(
                            "must be a strict subset of cidr {} (got {except})",
                            block.cidr
                        ),
                    ));
                }
            }
            Ok(())
        }
        None if !has_selector => Err(invalid(
            field,
            "must specify podSelector, namespaceSelector or ipBlock",
        )),
        None => {
            for (name, selector) in selectors {
                if let Some(selector) = selector {
                    label_selector(&format!("{field}.{name}"), selector)?;
                }
            }
            Ok(())
        }
    }
}

/// Whether `inner` lies strictly inside `outer`: same family, longer prefix, and inside
/// `outer`'s range.
fn strictly_inside(inner: &IpNet, outer: &IpNet) -> bool {
    inner.prefix_len() > outer.prefix_len() && outer.contains(inner)
}

pub(super) fn cidr(s: &str) -> Result<(), String> {
    parse_cidr(s).map(|_| ())
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .map_err(|_| "must be an address and prefix length such as 10.0.0.0/16".into())
}
