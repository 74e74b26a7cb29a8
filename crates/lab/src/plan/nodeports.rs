//! nodePorts and healthCheckNodePorts, allocated as the API server does: a NodePort or
//! LoadBalancer Service port without a nodePort gets one from the lab's `nodePortRange`, an
//! externalTrafficPolicy=Local LoadBalancer Service gets a healthCheckNodePort, a port
//! already allocated is never handed out again, and a given one is honoured (refusing a
//! clash is the sources' validation, not the allocator's).
//!
//! Like the API server since KEP-3668, automatic allocation prefers the upper band of the
//! range and leaves the lowest ports (16 to 128 of them, 1/32 of the range) to Services
//! that ask for a number; the lab takes the lowest free port of a band, so a lab file and
//! its manifests always give the same numbers.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use sluice_sources::{Manifest, Object};

use super::Apply;
use crate::{
    spec::NodePortRange,
    state::{LabState, key},
};

/// nodePorts and healthCheckNodePorts taken, by the `namespace/name` of their Service.
pub(super) type NodePorts = BTreeMap<u16, String>;

/// The ports a Service holds: every port's nodePort and its healthCheckNodePort.
fn held(spec: &ServiceSpec) -> impl Iterator<Item = u16> + '_ {
    spec.ports
        .iter()
        .flatten()
        .filter_map(|p| p.node_port)
        .chain(spec.health_check_node_port)
        .filter_map(|p| u16::try_from(p).ok().filter(|p| *p != 0))
}

/// Every port the lab's Services hold, and those the applied Services ask for.
pub(super) fn claimed(st: &LabState, manifests: &[Manifest]) -> NodePorts {
    let stored = st.services.iter().flat_map(|(k, s)| {
        s.object
            .spec
            .iter()
            .flat_map(held)
            .map(move |port| (port, k.clone()))
    });
    let requested = manifests.iter().filter_map(|m| match &m.object {
        Object::Service(svc) => Some((key(m.namespace(), m.name()), svc.spec.as_ref()?)),
        _ => None,
    });
    let mut claimed: NodePorts = stored.collect();
    for (k, spec) in requested {
        for port in held(spec) {
            claimed.entry(port).or_insert_with(|| k.clone());
        }
    }
    claimed
}

/// The automatic band first (from `first + offset`), then the lowest ports.
fn lowest_free(range: NodePortRange, claimed: &NodePorts) -> Option<u16> {
    let size = u32::from(range.last) - u32::from(range.first) + 1;
    let offset = (size / 32).clamp(16, 128);
    let split = u32::from(range.first) + offset;
    let upper = (split..=u32::from(range.last)).filter_map(|p| u16::try_from(p).ok());
    let lower = range.first..=u16::try_from(split - 1).map_or(range.last, |p| p.min(range.last));
    upper.chain(lower).find(|p| !claimed.contains_key(p))
}

fn needs_node_ports(spec: &ServiceSpec) -> bool {
    match spec.type_.as_deref() {
        Some("NodePort") => true,
        Some("LoadBalancer") => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    }
}

fn needs_health_check_port(spec: &ServiceSpec) -> bool {
    spec.type_.as_deref() == Some("LoadBalancer")
        && spec.external_traffic_policy.as_deref() == Some("Local")
}

/// The nodePort `port` had before this apply: an apply that leaves it out keeps it, as
/// the API server's merge does.
fn previous_node_port(previous: Option<&Service>, port: &ServicePort) -> Option<i32> {
    let ports = previous?.spec.as_ref()?.ports.as_ref()?;
    let protocol = |p: &ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
    ports
        .iter()
        .find(|p| p.port == port.port && protocol(p) == protocol(port))
        .and_then(|p| p.node_port)
}

impl Apply<'_> {
    /// Fills in the nodePorts and healthCheckNodePort of Service `m`, keeping those
    /// it had; a full range is a violation naming the field.
    pub(super) fn allocate_node_ports(
        &mut self,
        m: &Manifest,
        spec: &mut ServiceSpec,
        previous: Option<&Service>,
    ) {
        let k = key(m.namespace(), m.name());
        if needs_node_ports(spec) {
            for (i, port) in spec.ports.iter_mut().flatten().enumerate() {
                if port.node_port.is_some_and(|p| p != 0) {
                    continue;
                }
                port.node_port = previous_node_port(previous, port)
                    .or_else(|| self.take(m, &k, &format!("spec.ports[{i}].nodePort")));
            }
        }
        if needs_health_check_port(spec) && spec.health_check_node_port.is_none_or(|p| p == 0) {
            spec.health_check_node_port = previous
                .and_then(|p| p.spec.as_ref()?.health_check_node_port)
                .or_else(|| self.take(m, &k, "spec.healthCheckNodePort"));
        }
    }

    fn take(&mut self, m: &Manifest, k: &str, field: &str) -> Option<i32> {
        let range = self.st.spec.node_port_range.unwrap_or_default();
        match lowest_free(range, &self.claimed_node_ports) {
            Some(port) => {
                self.claimed_node_ports.insert(port, k.to_string());
                Some(i32::from(port))
            }
            None => {
                self.violation(
                    m,
                    field,
                    format!("no free port in the lab's nodePortRange {range}"),
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn automatic_ports_start_above_the_static_band_then_fill_it() {
        let range = NodePortRange {
            first: 30000,
            last: 32767,
        };
        // 2,768 ports: 1/32 of them (86) are kept for Services that ask for a number.
        let mut claimed = NodePorts::new();
        assert_eq!(lowest_free(range, &claimed), Some(30086));
        claimed.insert(30086, "a/b".into());
        assert_eq!(lowest_free(range, &claimed), Some(30087));
        for p in 30086..=32767 {
            claimed.insert(p, "a/b".into());
        }
        assert_eq!(lowest_free(range, &claimed), Some(30000));
        for p in 30000..30086 {
            claimed.insert(p, "a/b".into());
        }
        assert_eq!(lowest_free(range, &claimed), None);
    }

    #[test]
    fn a_small_range_keeps_sixteen_and_a_tiny_one_is_all_static() {
        let range = NodePortRange {
            first: 31000,
            last: 31099,
        };
        assert_eq!(lowest_free(range, &NodePorts::new()), Some(31016));
        let tiny = NodePortRange {
            first: 31000,
            last: 31003,
        };
        assert_eq!(lowest_free(tiny, &NodePorts::new()), Some(31000));
        let claimed: NodePorts = (31000..=31003).map(|p| (p, "a/b".to_string())).collect();
        assert_eq!(lowest_free(tiny, &claimed), None);
    }
}
