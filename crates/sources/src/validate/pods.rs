//! Pods and Deployments.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Container, ContainerPort, PodSpec},
};

use super::{
    Check, check_str, dns1123_label, iana_svc_name, invalid,
    labels::{label_selector, labels, selector_is_empty},
    port_number, protocol, required,
};

pub(super) fn pod_spec(field: &str, spec: &PodSpec) -> Check {
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

pub(super) fn deployment(deployment: &Deployment) -> Check {
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
