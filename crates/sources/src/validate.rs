//! The API server's validation, for the objects and fields sluice reads.
//!
//! Each rule is a small function that returns the first offending field. Messages follow
//! the API server's wording where it has one, and say what was found.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Container, ContainerPort, PodSpec, Service, ServicePort},
        discovery::v1::{EndpointPort, EndpointSlice},
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

use crate::manifest::Object;

/// A field that fails validation: its path (`spec.ports[0].port`, empty for the object
/// itself) and why.
#[derive(Debug)]
pub(crate) struct Invalid {
    pub field: String,
    pub message: String,
}

type Check = Result<(), Invalid>;

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Runs a string rule and, if it fails, reports `value` at `field`.
fn check_str(field: &str, value: &str, what: &str, rule: fn(&str) -> Result<(), String>) -> Check {
    rule(value).map_err(|reason| invalid(field, format!("invalid {what} {value:?}: {reason}")))
}

const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP"];
const SERVICE_TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
const ADDRESS_TYPES: &[&str] = &["IPv4", "IPv6", "FQDN"];
const POLICY_TYPES: &[&str] = &["Ingress", "Egress"];
const SELECTOR_OPERATORS: &[&str] = &["In", "NotIn", "Exists", "DoesNotExist"];
/// The API server's limit on addresses per endpoint of a slice.
const MAX_ENDPOINT_ADDRESSES: usize = 100;

fn one_of(field: &str, value: &str, what: &str, allowed: &[&str]) -> Check {
    if allowed.contains(&value) {
        return Ok(());
    }
    Err(invalid(
        field,
        format!(
            "unsupported {what} {value:?}: must be one of {}",
            allowed.join(", ")
        ),
    ))
}

pub(crate) fn object(object: &Object) -> Check {
    metadata(object.kind(), object.metadata())?;
    match object {
        Object::Namespace(_) => Ok(()),
        Object::Pod(pod) => pod_spec("spec", required("spec", &pod.spec)?),
        Object::Deployment(deployment) => self::deployment(deployment),
        Object::Service(service) => self::service(service),
        Object::EndpointSlice(slice) => endpoint_slice(slice),
        Object::NetworkPolicy(policy) => network_policy(policy),
    }
}

fn required<'a, T>(field: &str, value: &'a Option<T>) -> Result<&'a T, Invalid> {
    value.as_ref().ok_or_else(|| invalid(field, "is required"))
}

// ---- names ----

/// Lower-case alphanumerics and '-', starting and ending with an alphanumeric.
fn label_chars(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 label: names of Namespaces, ports, containers.
fn dns1123_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if !label_chars(s) {
        return Err(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric \
                    characters or '-', and must start and end with an alphanumeric character"
                .into(),
        );
    }
    Ok(())
}

/// RFC 1035 label: Service names, which become DNS names and so must start with a letter.
fn dns1035_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if !label_chars(s) || !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(
            "a DNS-1035 label must consist of lower case alphanumeric characters \
                    or '-', start with an alphabetic character, and end with an \
                    alphanumeric character"
                .into(),
        );
    }
    Ok(())
}

/// RFC 1123 subdomain: names of most objects, label key prefixes.
fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err("must be no more than 253 characters".into());
    }
    if !s.split('.').all(label_chars) {
        return Err(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
                    characters, '-' or '.', and must start and end with an alphanumeric \
                    character"
                .into(),
        );
    }
    Ok(())
}

/// IANA_SVC_NAME (RFC 6335): named ports.
fn iana_svc_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 15 {
        return Err("must be 1 to 15 characters".into());
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("must contain only lower case alphanumeric characters or '-'".into());
    }
    if !s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("must contain at least one letter".into());
    }
    if s.starts_with('-') || s.ends_with('-') || s.contains("--") {
        return Err("must not begin or end with '-' or contain '--'".into());
    }
    Ok(())
}

// ---- labels and selectors ----

/// Name part of a label key, and a non-empty label value.
fn label_name_chars(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Qualified name: an optional DNS subdomain prefix and '/', then a name of up to 63 characters.
fn label_key(key: &str) -> Result<(), String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() {
                return Err("prefix part must be non-empty".into());
            }
            dns1123_subdomain(prefix).map_err(|e| format!("prefix part {e}"))?;
            name
        }
        None => key,
    };
    if name.len() > 63 {
        return Err("name part must be no more than 63 characters".into());
    }
    if !label_name_chars(name) {
        return Err(
            "name part must consist of alphanumeric characters, '-', '_' or '.', \
                    and must start and end with an alphanumeric character"
                .into(),
        );
    }
    Ok(())
}

fn label_value(value: &str) -> Result<(), String> {
    if value.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if !value.is_empty() && !label_name_chars(value) {
        return Err(
            "a valid label must be an empty string or consist of alphanumeric \
                    characters, '-', '_' or '.', and must start and end with an alphanumeric \
                    character"
                .into(),
        );
    }
    Ok(())
}

fn labels(field: &str, labels: Option<&BTreeMap<String, String>>) -> Check {
    for (key, value) in labels.into_iter().flatten() {
        check_str(field, key, "label key", label_key)?;
        check_str(&format!("{field}.{key}"), value, "label value", label_value)?;
    }
    Ok(())
}

fn label_selector(field: &str, selector: &LabelSelector) -> Check {
    labels(
        &format!("{field}.matchLabels"),
        selector.match_labels.as_ref(),
    )?;
    for (i, requirement) in selector.match_expressions.iter().flatten().enumerate() {
        let field = format!("{field}.matchExpressions[{i}]");
        check_str(
            &format!("{field}.key"),
            &requirement.key,
            "label key",
            label_key,
        )?;
        let operator = requirement.operator.as_str();
        one_of(
            &format!("{field}.operator"),
            operator,
            "operator",
            SELECTOR_OPERATORS,
        )?;
        let values = requirement.values.as_deref().unwrap_or_default();
        match (operator, values.is_empty()) {
            ("In" | "NotIn", true) => {
                return Err(invalid(
                    format!("{field}.values"),
                    format!("must be specified when operator is {operator}"),
                ));
            }
            ("Exists" | "DoesNotExist", false) => {
                return Err(invalid(
                    format!("{field}.values"),
                    format!("may not be specified when operator is {operator}"),
                ));
            }
            _ => {}
        }
        for (j, value) in values.iter().enumerate() {
            check_str(
                &format!("{field}.values[{j}]"),
                value,
                "label value",
                label_value,
            )?;
        }
    }
    Ok(())
}

fn selector_is_empty(selector: &LabelSelector) -> bool {
    selector
        .match_labels
        .as_ref()
        .is_none_or(BTreeMap::is_empty)
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty)
}

// ---- ports ----

fn port_number(field: &str, port: i32) -> Check {
    if (1..=65535).contains(&port) {
        return Ok(());
    }
    Err(invalid(
        field,
        format!("must be between 1 and 65535 (got {port})"),
    ))
}

fn protocol(field: &str, protocol: Option<&String>) -> Check {
    match protocol {
        Some(p) => one_of(field, p, "protocol", PROTOCOLS),
        None => Ok(()),
    }
}

/// A port given as a number or as the name of a container port.
fn int_or_name(field: &str, port: &IntOrString) -> Check {
    match port {
        IntOrString::Int(n) => port_number(field, *n),
        IntOrString::String(name) => check_str(field, name, "port name", iana_svc_name),
    }
}

// ---- metadata ----

fn metadata(kind: &str, meta: &ObjectMeta) -> Check {
    let name = match meta.name.as_deref() {
        Some(name) if !name.is_empty() => name,
        _ => return Err(invalid("metadata.name", "is required")),
    };
    let rule = match kind {
        "Namespace" => dns1123_label,
        "Service" => dns1035_label,
        _ => dns1123_subdomain,
    };
    check_str("metadata.name", name, "name", rule)?;
    if let Some(namespace) = &meta.namespace {
        check_str("metadata.namespace", namespace, "namespace", dns1123_label)?;
    }
    labels("metadata.labels", meta.labels.as_ref())
}

// ---- pods and deployments ----

fn pod_spec(field: &str, spec: &PodSpec) -> Check {
    if spec.containers.is_empty() {
        return Err(invalid(
            format!("{field}.containers"),
            "must have at least one container",
        ));
    }
    let mut names = BTreeSet::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let field = format!("{field}.containers[{i}]");
        container(&field, c)?;
        if !names.insert(&c.name) {
            return Err(invalid(
                format!("{field}.name"),
                format!("duplicate container name {:?}", c.name),
            ));
        }
    }
    Ok(())
}

fn container(field: &str, c: &Container) -> Check {
    if c.name.is_empty() {
        return Err(invalid(format!("{field}.name"), "is required"));
    }
    check_str(&format!("{field}.name"), &c.name, "name", dns1123_label)?;
    if c.image.as_deref().is_none_or(str::is_empty) {
        return Err(invalid(format!("{field}.image"), "is required"));
    }
    let mut names = BTreeSet::new();
    for (i, port) in c.ports.iter().flatten().enumerate() {
        let field = format!("{field}.ports[{i}]");
        container_port(&field, port)?;
        if let Some(name) = &port.name
            && !names.insert(name)
        {
            return Err(invalid(
                format!("{field}.name"),
                format!("duplicate port name {name:?}"),
            ));
        }
    }
    Ok(())
}

fn container_port(field: &str, port: &ContainerPort) -> Check {
    port_number(&format!("{field}.containerPort"), port.container_port)?;
    // hostPort 0 means no host port.
    if let Some(host_port) = port.host_port.filter(|&p| p != 0) {
        port_number(&format!("{field}.hostPort"), host_port)?;
    }
    if let Some(name) = &port.name {
        check_str(&format!("{field}.name"), name, "port name", iana_svc_name)?;
    }
    protocol(&format!("{field}.protocol"), port.protocol.as_ref())
}

fn deployment(deployment: &Deployment) -> Check {
    let spec = required("spec", &deployment.spec)?;
    if let Some(replicas) = spec.replicas.filter(|&r| r < 0) {
        return Err(invalid(
            "spec.replicas",
            format!("must be greater than or equal to 0 (got {replicas})"),
        ));
    }
    if selector_is_empty(&spec.selector) {
        return Err(invalid(
            "spec.selector",
            "is required (an empty selector would select every pod)",
        ));
    }
    label_selector("spec.selector", &spec.selector)?;
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref());
    labels("spec.template.metadata.labels", template_labels)?;
    if !sluice_store::selector::matches(&spec.selector, template_labels.unwrap_or(&BTreeMap::new()))
    {
        return Err(invalid(
            "spec.template.metadata.labels",
            "`selector` does not match template `labels`",
        ));
    }
    pod_spec(
        "spec.template.spec",
        required("spec.template.spec", &spec.template.spec)?,
    )
}

// ---- services ----

fn service(service: &Service) -> Check {
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

// ---- endpoint slices ----

fn endpoint_slice(slice: &EndpointSlice) -> Check {
    let address_type = slice.address_type.as_str();
    if address_type.is_empty() {
        return Err(invalid("addressType", "is required"));
    }
    one_of("addressType", address_type, "address type", ADDRESS_TYPES)?;
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        let field = format!("endpoints[{i}].addresses");
        if endpoint.addresses.is_empty() || endpoint.addresses.len() > MAX_ENDPOINT_ADDRESSES {
            return Err(invalid(
                field,
                format!("must hold 1 to {MAX_ENDPOINT_ADDRESSES} addresses"),
            ));
        }
        for (j, address) in endpoint.addresses.iter().enumerate() {
            endpoint_address(&format!("{field}[{j}]"), address, address_type)?;
        }
    }
    let mut names = BTreeSet::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        endpoint_port(&field, port)?;
        let name = port.name.as_deref().unwrap_or("");
        if !names.insert(name) {
            return Err(invalid(
                format!("{field}.name"),
                format!("duplicate port name {name:?}"),
            ));
        }
    }
    Ok(())
}

fn endpoint_address(field: &str, address: &str, address_type: &str) -> Check {
    let valid = match address_type {
        "IPv4" => address.parse::<Ipv4Addr>().is_ok(),
        "IPv6" => address.parse::<Ipv6Addr>().is_ok(),
        _ => dns1123_subdomain(address).is_ok(),
    };
    if valid {
        return Ok(());
    }
    Err(invalid(
        field,
        format!("must be a valid {address_type} address (got {address:?})"),
    ))
}

fn endpoint_port(field: &str, port: &EndpointPort) -> Check {
    if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
        check_str(&format!("{field}.name"), name, "port name", dns1123_label)?;
    }
    if let Some(number) = port.port {
        port_number(&format!("{field}.port"), number)?;
    }
    protocol(&format!("{field}.protocol"), port.protocol.as_ref())
}

// ---- network policies ----

fn network_policy(policy: &NetworkPolicy) -> Check {
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
            check_str(&format!("{field}.ipBlock.cidr"), &block.cidr, "CIDR", cidr)?;
            for (i, except) in block.except.iter().flatten().enumerate() {
                let field = format!("{field}.ipBlock.except[{i}]");
                check_str(&field, except, "CIDR", cidr)?;
                if !strictly_inside(except, &block.cidr) {
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

/// A CIDR as (address as a 128-bit number, prefix length, whether IPv4); expects a
/// validated CIDR.
fn parse_cidr(s: &str) -> Option<(u128, u32, bool)> {
    let (addr, len) = s.split_once('/')?;
    let len = len.parse::<u32>().ok()?;
    match addr.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) => Some((u128::from(u32::from(a)) << 96, len, true)),
        IpAddr::V6(a) => Some((u128::from(a), len, false)),
    }
}

/// Whether CIDR `inner` lies strictly inside CIDR `outer` (same family, longer prefix).
fn strictly_inside(inner: &str, outer: &str) -> bool {
    let (Some((a, a_len, a_v4)), Some((b, b_len, b_v4))) = (parse_cidr(inner), parse_cidr(outer))
    else {
        return false;
    };
    // IPv4 addresses sit in the top 32 bits, so prefix lengths count from the top for both.
    if a_v4 != b_v4 || a_len <= b_len {
        return false;
    }
    let mask = if b_len == 0 {
        0
    } else {
        u128::MAX << (128 - b_len)
    };
    a & mask == b & mask
}

fn cidr(s: &str) -> Result<(), String> {
    let parsed = s.split_once('/').and_then(|(addr, len)| {
        let addr = addr.parse::<IpAddr>().ok()?;
        let len = len.parse::<u8>().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(())
    });
    parsed.ok_or_else(|| "must be an address and prefix length such as 10.0.0.0/16".into())
}

#[cfg(test)]
mod tests;
