//! Node ports across Services, as the API server's allocator keeps them: every nodePort and
//! healthCheckNodePort inside the configured range, and none used twice for one protocol.
//! A snapshot that breaks either is refused whole, before anything changes.

use std::{collections::BTreeMap, fmt, str::FromStr};

use k8s_openapi::api::core::v1::Service;

use crate::ValidationError;

/// The ports node port Services may use (kube-apiserver's `--service-node-port-range`);
/// written `first-last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodePortRange {
    pub first: u16,
    pub last: u16,
}

impl Default for NodePortRange {
    fn default() -> Self {
        Self {
            first: 30000,
            last: 32767,
        }
    }
}

impl NodePortRange {
    pub fn contains(self, port: i32) -> bool {
        (i32::from(self.first)..=i32::from(self.last)).contains(&port)
    }
}

impl fmt::Display for NodePortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// `first-last`, both port numbers, first not above last.
impl FromStr for NodePortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid node port range {s:?}: want FIRST-LAST, e.g. 30000-32767");
        let (first, last) = s.split_once('-').ok_or_else(bad)?;
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|&p| p != 0);
        match (port(first), port(last)) {
            (Some(first), Some(last)) if first <= last => Ok(Self { first, last }),
            _ => Err(bad()),
        }
    }
}

impl TryFrom<String> for NodePortRange {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<NodePortRange> for String {
    fn from(range: NodePortRange) -> Self {
        range.to_string()
    }
}

/// Who holds a node port: the Service (`namespace/name`) and the field.
struct Holder {
    service: String,
    field: String,
}

/// Checks every nodePort and healthCheckNodePort of `services` (0 or unset: none) against
/// `range` and against each other: a port may serve one Service port per protocol, and a
/// health check (TCP) takes its port for TCP. The first fault in the given order is the
/// error, so a source that lists what it already accepted first has the newcomer named; a
/// clash names both Services.
pub fn validate_services(
    services: &[Service],
    range: NodePortRange,
) -> Result<(), ValidationError> {
    let named = services.iter().map(|s| {
        let namespace = s.metadata.namespace.as_deref().unwrap_or("default");
        let name = s.metadata.name.as_deref().unwrap_or("");
        (format!("{namespace}/{name}"), s)
    });
    let mut held: BTreeMap<(i32, &str), Holder> = BTreeMap::new();
    for (name, service) in named {
        let Some(spec) = &service.spec else {
            continue;
        };
        let ports = spec
            .ports
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, p)| {
                let proto = p.protocol.as_deref().unwrap_or("TCP");
                Some((format!("spec.ports[{i}].nodePort"), p.node_port?, proto))
            });
        let health = spec
            .health_check_node_port
            .map(|p| ("spec.healthCheckNodePort".to_string(), p, "TCP"));
        for (field, port, proto) in ports.chain(health).filter(|(_, p, _)| *p != 0) {
            let refuse = |message: String| ValidationError {
                kind: "Service",
                name: name.clone(),
                field: field.clone(),
                message,
            };
            if !range.contains(port) {
                return Err(refuse(format!(
                    "{port} is outside the node port range {range}"
                )));
            }
            if let Some(holder) = held.get(&(port, proto)) {
                let by = if holder.service == name {
                    holder.field.clone()
                } else {
                    format!("Service {} ({})", holder.service, holder.field)
                };
                return Err(refuse(format!("{port}/{proto} is already used by {by}")));
            }
            held.insert(
                (port, proto),
                Holder {
                    service: name.clone(),
                    field,
                },
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
