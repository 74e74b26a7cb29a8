//! Service fields the datapath does not implement yet. A Service that sets one is still
//! programmed, as far as the datapath goes (its ClusterIP frontends), and each such field is
//! reported, so nothing is half-programmed silently.
//!
//! Fields are reported only when they ask for behaviour other than the default the API
//! server fills in (`ipFamilies: [IPv4]`, `ipFamilyPolicy: SingleStack`), so a Service read
//! from a real API server reports what its author asked for and nothing else.

use k8s_openapi::api::core::v1::Service;

use crate::{
    problem::{ObjectRef, ServiceField, Unsupported},
    topology::{TOPOLOGY_MODE_ANNOTATION, topology_mode, traffic_distribution},
};

/// The unimplemented fields `service` (named `object`) sets, in field order.
pub(crate) fn service_fields(object: &ObjectRef, service: &Service) -> Vec<Unsupported> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let set = |value: Option<&String>, default: &str| {
        value
            .filter(|v| !v.is_empty() && v.as_str() != default)
            .cloned()
    };
    let list = |values: Option<&Vec<String>>| values.filter(|v| !v.is_empty()).map(|v| v.join(","));
    let families = spec
        .ip_families
        .as_ref()
        .filter(|f| f.iter().any(|family| family != "IPv4"));
    let topology = service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TOPOLOGY_MODE_ANNOTATION));
    [
        (
            ServiceField::LoadBalancerIp,
            set(spec.load_balancer_ip.as_ref(), ""),
        ),
        (
            ServiceField::TrafficDistribution,
            spec.traffic_distribution
                .clone()
                .filter(|d| traffic_distribution(d).is_none()),
        ),
        (ServiceField::IpFamilies, list(families)),
        // PreferDualStack is met by one family; only a requirement goes unmet.
        (
            ServiceField::IpFamilyPolicy,
            spec.ip_family_policy
                .clone()
                .filter(|p| p == "RequireDualStack"),
        ),
        (
            ServiceField::TopologyMode,
            topology.filter(|m| topology_mode(m).is_none()).cloned(),
        ),
    ]
    .into_iter()
    .filter_map(|(field, value)| {
        Some(Unsupported {
            object: object.clone(),
            field,
            value: value?,
        })
    })
    .collect()
}
