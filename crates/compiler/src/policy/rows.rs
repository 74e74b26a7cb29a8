//! Each local endpoint's flags and allow rows.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::networking::v1::NetworkPolicyPort, apimachinery::pkg::util::intstr::IntOrString,
};
use sluice_common::{
    ENDPOINT_F_EGRESS_ENFORCED, ENDPOINT_F_INGRESS_ENFORCED, ENDPOINT_F_POLICY_OVERFLOW,
    EndpointInfo, IDENTITY_ANY, IDENTITY_HOST, POLICY_EGRESS, POLICY_INGRESS, PolicyKey,
};
use sluice_store::LocalEndpoint;

use super::{
    Policy, PolicyInput,
    peers::{Peers, World},
    ports::{named, port_prefixes},
    rules, selects,
    workloads::Workload,
};
use crate::{
    EndpointDetails, EndpointPolicy, ObjectKind, ObjectRef, Problem, problem::Problems,
    protocol_number,
};
use sluice_common::kinds::RuleOrigin;

/// Rows with what allows each: the policies, or the host.
type Rows = BTreeMap<PolicyKey, BTreeSet<RuleOrigin>>;

/// One local endpoint's map entries.
pub(super) struct CompiledEndpoint {
    pub info: EndpointInfo,
    pub details: EndpointDetails,
    /// None when no direction is enforced or the rows do not fit.
    pub policy: Option<EndpointPolicy>,
    /// What its rows could not represent, kept apart so that one endpoint can be compiled
    /// again alone (`super::PolicyIndex`).
    pub problems: Problems,
}

impl CompiledEndpoint {
    /// An endpoint whose Pod is defined twice (reported with the pods): which labels apply
    /// is unknown, so it fails closed in both directions.
    fn unknown(endpoint: &LocalEndpoint) -> Self {
        let mut info = EndpointInfo::new(crate::admitted_ipv4(endpoint), IDENTITY_ANY);
        info.flags = ENDPOINT_F_INGRESS_ENFORCED | ENDPOINT_F_EGRESS_ENFORCED;
        Self {
            info,
            details: EndpointDetails {
                namespace: endpoint.namespace.clone(),
                pod: endpoint.pod.clone(),
                interface: endpoint.interface.clone(),
                ipv4: crate::admitted_ipv4(endpoint),
                identity: IDENTITY_ANY,
                ingress_enforced: true,
                egress_enforced: true,
                policy_rows: 0,
                overflow: false,
                policies: Vec::new(),
            },
            policy: None,
            problems: Problems::default(),
        }
    }
}

impl World<'_> {
    /// Every local endpoint of `input`, by ifindex, compiled against `policies`.
    pub(super) fn endpoints(
        &self,
        input: &PolicyInput<'_>,
        policies: &[Policy<'_>],
    ) -> Vec<(u32, CompiledEndpoint)> {
        let by_name: BTreeMap<(&str, &str), &Workload<'_>> = self
            .workloads
            .iter()
            .map(|w| ((w.namespace, w.name), w))
            .collect();
        let capacity = input.node.policy_map_max;
        input
            .endpoints
            .iter()
            .map(|(&ifindex, endpoint)| {
                let key = (endpoint.namespace.as_str(), endpoint.pod.as_str());
                let compiled = match by_name.get(&key) {
                    Some(w) => self.endpoint(endpoint, w, policies, capacity),
                    None => CompiledEndpoint::unknown(endpoint),
                };
                (ifindex, compiled)
            })
            .collect()
    }

    /// The flags, details and rows of a local endpoint.
    pub(super) fn endpoint(
        &self,
        endpoint: &LocalEndpoint,
        w: &Workload<'_>,
        policies: &[Policy<'_>],
        capacity: u32,
    ) -> CompiledEndpoint {
        let mut problems = Problems::default();
        let selecting: Vec<&Policy<'_>> = policies.iter().filter(|p| selects(p, w)).collect();
        let ingress = selecting.iter().any(|p| p.ingress);
        let egress = selecting.iter().any(|p| p.egress);
        let mut rows = Rows::new();
        for p in &selecting {
            self.policy_rows(p, w, &mut rows, &mut problems);
        }
        let mut flags = 0;
        for (enforced, direction, flag) in [
            (ingress, POLICY_INGRESS, ENDPOINT_F_INGRESS_ENFORCED),
            (egress, POLICY_EGRESS, ENDPOINT_F_EGRESS_ENFORCED),
        ] {
            if enforced {
                flags |= flag;
                rows.entry(PolicyKey::any(IDENTITY_HOST, direction))
                    .or_default()
                    .insert(RuleOrigin::Host);
            }
        }
        let overflow = rows.len() > capacity as usize;
        if overflow {
            flags |= ENDPOINT_F_POLICY_OVERFLOW;
            problems.insert(Problem::PolicyOverflow {
                endpoint: ObjectRef::new(ObjectKind::Endpoint, &endpoint.namespace, &endpoint.pod),
                rows: rows.len(),
                capacity,
            });
        }
        let mut info = EndpointInfo::new(crate::admitted_ipv4(endpoint), w.identity);
        info.flags = flags;
        CompiledEndpoint {
            info,
            details: EndpointDetails {
                namespace: endpoint.namespace.clone(),
                pod: endpoint.pod.clone(),
                interface: endpoint.interface.clone(),
                ipv4: crate::admitted_ipv4(endpoint),
                identity: w.identity,
                ingress_enforced: ingress,
                egress_enforced: egress,
                policy_rows: rows.len(),
                overflow,
                policies: selecting.iter().map(|p| p.owner.clone()).collect(),
            },
            policy: ((ingress || egress) && !overflow).then_some(EndpointPolicy { rows }),
            problems,
        }
    }

    /// Adds the rows `policy` allows for endpoint `w`, in the directions it isolates.
    fn policy_rows(
        &self,
        policy: &Policy<'_>,
        w: &Workload<'_>,
        rows: &mut Rows,
        problems: &mut Problems,
    ) {
        for ((direction, _, ports), peers) in rules(policy.policy).zip(&policy.peers) {
            let isolates = if direction == POLICY_INGRESS {
                policy.ingress
            } else {
                policy.egress
            };
            if !isolates {
                continue;
            }
            let ports = ports.map(Vec::as_slice).unwrap_or_default();
            if ports.is_empty() {
                for id in peers.ids() {
                    add(rows, policy, PolicyKey::any(id, direction));
                }
                continue;
            }
            for port in ports {
                let rule = RulePort {
                    policy,
                    endpoint: w,
                    direction,
                    peers,
                };
                self.port_rows(&rule, port, rows, problems);
            }
        }
    }

    /// Adds the rows of one port of a rule.
    fn port_rows(
        &self,
        rule: &RulePort<'_>,
        port: &NetworkPolicyPort,
        rows: &mut Rows,
        problems: &mut Problems,
    ) {
        let RulePort {
            policy,
            endpoint,
            direction,
            peers,
        } = *rule;
        let Some(proto) = protocol_number(port.protocol.as_ref()) else {
            problems.insert(Problem::PolicyPortProtocol {
                policy: policy.object.clone(),
                protocol: port.protocol.clone().unwrap_or_default(),
            });
            return;
        };
        match &port.port {
            None => {
                for id in peers.ids() {
                    add(rows, policy, PolicyKey::any_port(id, direction, proto));
                }
            }
            Some(IntOrString::Int(first)) => {
                let last = port.end_port.unwrap_or(*first);
                let range = u16::try_from(*first).ok().zip(u16::try_from(last).ok());
                let Some((first_port, last_port)) = range.filter(|(f, l)| f <= l) else {
                    problems.insert(Problem::PolicyPortRange {
                        policy: policy.object.clone(),
                        first: *first,
                        last,
                    });
                    return;
                };
                for (start, bits) in port_prefixes(first_port, last_port) {
                    for id in peers.ids() {
                        add(
                            rows,
                            policy,
                            PolicyKey::ports(id, direction, proto, start, bits),
                        );
                    }
                }
            }
            Some(IntOrString::String(name)) if direction == POLICY_INGRESS => {
                // The destination is this endpoint.
                for number in named(endpoint, name, proto) {
                    for id in peers.ids() {
                        add(
                            rows,
                            policy,
                            PolicyKey::ports(id, direction, proto, number, 16),
                        );
                    }
                }
            }
            Some(IntOrString::String(name)) => {
                // The destination is the peer: resolve per destination pod, so only pod
                // identities get rows and each with its own numbers.
                for (identity, number) in self.peers.named_ports(peers, name, proto) {
                    let key = PolicyKey::ports(identity, direction, proto, number, 16);
                    add(rows, policy, key);
                }
            }
        }
    }
}

/// One rule of a policy, for one endpoint: what each of its ports makes rows from.
#[derive(Clone, Copy)]
struct RulePort<'a> {
    policy: &'a Policy<'a>,
    endpoint: &'a Workload<'a>,
    direction: u8,
    peers: &'a Peers,
}

fn add(rows: &mut Rows, policy: &Policy<'_>, key: PolicyKey) {
    rows.entry(key)
        .or_default()
        .insert(RuleOrigin::Policy(policy.owner.clone()));
}
