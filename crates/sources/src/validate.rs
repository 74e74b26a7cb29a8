//! The API server's validation, for the objects and fields sluice reads.
//!
//! Each rule is a small function that returns the first offending field. Messages follow
//! the API server's wording where it has one, and say what was found. The rules for names,
//! labels and selectors are shared; each kind of object has its own module.

use k8s_openapi::apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString};

use crate::manifest::Object;

mod labels;
mod names;
mod pods;
mod policy;
mod services;
mod slices;

use self::{
    labels::labels,
    names::{dns1035_label, dns1123_label, dns1123_subdomain, iana_svc_name},
    pods::{deployment, pod_spec},
    policy::network_policy,
    services::service,
    slices::endpoint_slice,
};
// The string rules the tests exercise one by one.
#[cfg(test)]
use self::{
    labels::{label_key, label_value},
    policy::cidr,
};

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
        Object::Deployment(d) => deployment(d),
        Object::Service(s) => service(s),
        Object::EndpointSlice(slice) => endpoint_slice(slice),
        Object::NetworkPolicy(policy) => network_policy(policy),
    }
}

fn required<'a, T>(field: &str, value: &'a Option<T>) -> Result<&'a T, Invalid> {
    value.as_ref().ok_or_else(|| invalid(field, "is required"))
}

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

pub(crate) fn metadata(kind: &str, meta: &ObjectMeta) -> Check {
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

#[cfg(test)]
mod tests;
