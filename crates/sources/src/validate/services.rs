//! Services.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::IpNet;

use k8s_openapi::{
    api::core::v1::{Service, ServicePort},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{
    Check, check_str, dns1123_label, dns1123_subdomain, int_or_name, invalid, labels, one_of,
    port_number, protocol, required,
};

const SERVICE_TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
const TRAFFIC_POLICIES: &[&str] = &["Cluster", "Local"];

pub(super) fn service(service: &Service) -> Check {
    let spec = required("spec", &service.spec)?;
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    one_of("spec.type", kind, "service type", SERVICE_TYPES)?;
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
    let headless = cluster_ip == "None";
    if !cluster_ip.is_empty() && !headless && cluster_ip.parse::<Ipv4Addr>().is_err() {
        return Err(invalid(
            "spec.clusterIP",
            format!("must be an IPv4 address, \"None\" or empty (got {cluster_ip:?})"),
        ));
    }
    if kind == "ExternalName" {
        if !cluster_ip.is_empty() {
            return Err(invalid(
                "spec.clusterIP",
                "must be empty for an ExternalName service",
            ));
        }
        let name = required("spec.externalName", &spec.external_name)?;
        // A trailing dot marks the name as absolute; the API server accepts it.
        let bare = name.strip_suffix('.').unwrap_or(name);
        check_str(
            "spec.externalName",
            bare,
            "external name",
            dns1123_subdomain,
        )?;
    }
    labels("spec.selector", spec.selector.as_ref())?;
    addresses(service)?;
    traffic_policies(service, kind)?;

    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() && kind != "ExternalName" && !headless {
        return Err(invalid("spec.ports", "is required"));
    }
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        service_port(&field, port, ports.len(), kind)?;
        let name = port.name.as_deref().unwrap_or("");
        if !name.is_empty() && !names.insert(name) {
            return Err(invalid(
                format!("{field}.name"),
                format!("duplicate port name {name:?}"),
            ));
        }
        let proto = port.protocol.as_deref().unwrap_or("TCP");
        if !numbers.insert((port.port, proto)) {
            return Err(invalid(
                field,
                format!("duplicate port {}/{proto}", port.port),
            ));
        }
    }
    Ok(())
}

/// Traffic policies are Cluster or Local; an external one only where traffic comes from
/// outside (node ports, load balancers, external IPs), and a health check node port only
/// for a LoadBalancer with externalTrafficPolicy Local, as the API server has it.
fn traffic_policies(service: &Service, kind: &str) -> Check {
    let Some(spec) = &service.spec else {
        return Ok(());
    };
    let external = spec.external_traffic_policy.as_deref();
    if let Some(policy) = external {
        one_of(
            "spec.externalTrafficPolicy",
            policy,
            "traffic policy",
            TRAFFIC_POLICIES,
        )?;
        let outside = matches!(kind, "NodePort" | "LoadBalancer")
            || spec
                .external_ips
                .as_ref()
                .is_some_and(|ips| !ips.is_empty());
        if !outside {
            return Err(invalid(
                "spec.externalTrafficPolicy",
                "may only be set for a NodePort or LoadBalancer service or one with externalIPs",
            ));
        }
    }
    if let Some(policy) = spec.internal_traffic_policy.as_deref() {
        one_of(
            "spec.internalTrafficPolicy",
            policy,
            "traffic policy",
            TRAFFIC_POLICIES,
        )?;
    }
    let health_check = spec.health_check_node_port.is_some_and(|p| p != 0);
    if health_check && !(kind == "LoadBalancer" && external == Some("Local")) {
        return Err(invalid(
            "spec.healthCheckNodePort",
            "may only be set when type is LoadBalancer and externalTrafficPolicy is Local",
        ));
    }
    Ok(())
}

/// The addresses and ranges a Service lists must parse: the compiler would have to leave
/// them out.
fn addresses(service: &Service) -> Check {
    let Some(spec) = &service.spec else {
        return Ok(());
    };
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        if ip.parse::<IpAddr>().is_err() {
            return Err(invalid(
                format!("spec.externalIPs[{i}]"),
                format!("must be a valid IP address (got {ip:?})"),
            ));
        }
    }
    for (i, range) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        if range.trim().parse::<IpNet>().is_err() {
            return Err(invalid(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("must be a CIDR such as 192.0.2.0/24 (got {range:?})"),
            ));
        }
    }
    if let Some(port) = spec.health_check_node_port.filter(|&p| p != 0) {
        port_number("spec.healthCheckNodePort", port)?;
    }
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ingress) in ingress.into_iter().flatten().enumerate() {
        if let Some(ip) = &ingress.ip
            && ip.parse::<IpAddr>().is_err()
        {
            return Err(invalid(
                format!("status.loadBalancer.ingress[{i}].ip"),
                format!("must be a valid IP address (got {ip:?})"),
            ));
        }
    }
    Ok(())
}

fn service_port(field: &str, port: &ServicePort, count: usize, kind: &str) -> Check {
    match port.name.as_deref().unwrap_or("") {
        // Endpoints name their ports after the service's; with several, each needs a name.
        "" if count > 1 => {
            return Err(invalid(
                format!("{field}.name"),
                "is required when the service has more than one port",
            ));
        }
        "" => {}
        name => check_str(&format!("{field}.name"), name, "port name", dns1123_label)?,
    }
    port_number(&format!("{field}.port"), port.port)?;
    protocol(&format!("{field}.protocol"), port.protocol.as_ref())?;
    match &port.target_port {
        // The API server defaults a zero targetPort to the port.
        Some(IntOrString::Int(0)) | None => {}
        Some(target) => int_or_name(&format!("{field}.targetPort"), target)?,
    }
    // nodePort 0 asks for an allocated one.
    if let Some(node_port) = port.node_port.filter(|&p| p != 0) {
        if kind == "ClusterIP" {
            return Err(invalid(
                format!("{field}.nodePort"),
                "may not be used when type is ClusterIP",
            ));
        }
        port_number(&format!("{field}.nodePort"), node_port)?;
    }
    Ok(())
}
