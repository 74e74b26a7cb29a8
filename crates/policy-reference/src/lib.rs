//! The reference evaluator: whether Kubernetes NetworkPolicy (networking.k8s.io/v1) allows a
//! new connection, read straight off the API documentation.
//!
//! It is deliberately written apart from the compiler and shares no code with it, so that the
//! property tests can compare the real datapath's verdicts with an independent reading of the
//! spec. It favours the spec's wording over speed: every call scans every policy.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod},
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

/// One end of a connection: a pod of the cluster, or an address outside it.
#[derive(Clone, Copy, Debug)]
pub enum Peer<'a> {
    Pod(&'a Pod),
    /// A host outside the cluster (the world).
    External(Ipv4Addr),
}

/// A new connection: who opens it, to whom, on which port and protocol ("TCP", "UDP", "SCTP").
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    pub from: Peer<'a>,
    pub to: Peer<'a>,
    pub port: u16,
    pub protocol: &'a str,
}

/// One rule as the spec reads it: its peers (`from` or `to`) and its ports.
type Rule<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

/// The cluster state the verdict depends on.
pub struct Cluster<'a> {
    pub namespaces: &'a [Namespace],
    pub policies: &'a [NetworkPolicy],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Cluster<'_> {
    /// Whether the connection is allowed: the source's egress and the destination's ingress
    /// must both allow it. A side that is not a pod of the cluster enforces nothing.
    pub fn allows(&self, c: &Connection<'_>) -> bool {
        let egress_ok = match c.from {
            Peer::Pod(pod) => self.direction_allows(pod, Direction::Egress, c.to, c),
            Peer::External(_) => true,
        };
        let ingress_ok = match c.to {
            Peer::Pod(pod) => self.direction_allows(pod, Direction::Ingress, c.from, c),
            Peer::External(_) => true,
        };
        egress_ok && ingress_ok
    }

    /// "A pod is isolated for a direction if any NetworkPolicy that selects it has that
    /// direction in its policyTypes"; an isolated pod accepts only what the union of those
    /// policies' rules allows.
    fn direction_allows(
        &self,
        pod: &Pod,
        dir: Direction,
        other: Peer<'_>,
        c: &Connection<'_>,
    ) -> bool {
        let mut isolated = false;
        for policy in self
            .policies
            .iter()
            .filter(|p| selects(p, pod) && policy_types(p).contains(&dir))
        {
            isolated = true;
            if self.policy_allows(policy, dir, other, c) {
                return true;
            }
        }
        !isolated
    }

    fn policy_allows(
        &self,
        policy: &NetworkPolicy,
        dir: Direction,
        other: Peer<'_>,
        c: &Connection<'_>,
    ) -> bool {
        let Some(spec) = &policy.spec else {
            return false;
        };
        let namespace = policy.metadata.namespace.as_deref().unwrap_or("default");
        // The port is always the destination's: for egress the peer, for ingress this pod.
        let destination = c.to;
        let rules: Vec<Rule<'_>> = match dir {
            Direction::Ingress => spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            Direction::Egress => spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        };
        rules.into_iter().any(|(peers, ports)| {
            // "If this field is empty or missing, this rule matches all sources/destinations."
            let peer_ok = match peers {
                None => true,
                Some(p) if p.is_empty() => true,
                Some(p) => p
                    .iter()
                    .any(|peer| self.peer_matches(peer, namespace, other)),
            };
            // "If this field is empty or missing, this rule matches all ports."
            let port_ok = match ports {
                None => true,
                Some(p) if p.is_empty() => true,
                Some(p) => p.iter().any(|port| port_matches(port, destination, c)),
            };
            peer_ok && port_ok
        })
    }

    fn peer_matches(
        &self,
        peer: &NetworkPolicyPeer,
        policy_namespace: &str,
        other: Peer<'_>,
    ) -> bool {
        if let Some(block) = &peer.ip_block {
            let Some(ip) = peer_ip(other) else {
                return false;
            };
            let Ok(cidr) = block.cidr.parse::<Ipv4Net>() else {
                return false;
            };
            let excepted = block
                .except
                .iter()
                .flatten()
                .filter_map(|e| e.parse::<Ipv4Net>().ok())
                .any(|e| e.contains(&ip));
            return cidr.contains(&ip) && !excepted;
        }
        let Peer::Pod(pod) = other else { return false };
        let pod_namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let namespace_ok = match &peer.namespace_selector {
            // "If NamespaceSelector is also set, ... Otherwise it selects the pods matching
            // podSelector in the policy's own namespace."
            None => pod_namespace == policy_namespace,
            Some(sel) => self
                .namespace(pod_namespace)
                .is_some_and(|ns| selector_matches(sel, &namespace_labels(ns))),
        };
        let pod_ok = peer
            .pod_selector
            .as_ref()
            .is_none_or(|sel| selector_matches(sel, &pod_labels(pod)));
        namespace_ok && pod_ok
    }

    fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
    }
}

/// policyTypes, with the API server's defaulting: Ingress always, Egress when the policy has
/// egress rules.
pub fn policy_types(policy: &NetworkPolicy) -> Vec<Direction> {
    let Some(spec) = &policy.spec else {
        return vec![];
    };
    // The API server defaults an empty list exactly like an absent one.
    match spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
        Some(types) => types
            .iter()
            .filter_map(|t| match t.as_str() {
                "Ingress" => Some(Direction::Ingress),
                "Egress" => Some(Direction::Egress),
                _ => None,
            })
            .collect(),
        None => {
            let mut types = vec![Direction::Ingress];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                types.push(Direction::Egress);
            }
            types
        }
    }
}

/// Whether the policy's podSelector selects `pod` (in the policy's namespace only).
fn selects(policy: &NetworkPolicy, pod: &Pod) -> bool {
    let ns = policy.metadata.namespace.as_deref().unwrap_or("default");
    let pod_ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let selector = policy.spec.as_ref().and_then(|s| s.pod_selector.as_ref());
    ns == pod_ns && selector.is_none_or(|s| selector_matches(s, &pod_labels(pod)))
}

fn port_matches(port: &NetworkPolicyPort, destination: Peer<'_>, c: &Connection<'_>) -> bool {
    if port.protocol.as_deref().unwrap_or("TCP") != c.protocol {
        return false;
    }
    match &port.port {
        // "If this field is not provided, this matches all port names and numbers."
        None => true,
        Some(IntOrString::Int(p)) => {
            let end = port.end_port.unwrap_or(*p);
            (*p..=end).contains(&i32::from(c.port))
        }
        // A named port is looked up among the destination pod's container ports with the
        // same protocol; anything else (an external host, the wrong protocol) never matches.
        Some(IntOrString::String(name)) => match destination {
            Peer::Pod(pod) => pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| c.ports.iter().flatten())
                .any(|cp| {
                    cp.name.as_deref() == Some(name.as_str())
                        && cp.protocol.as_deref().unwrap_or("TCP") == c.protocol
                        && cp.container_port == i32::from(c.port)
                }),
            Peer::External(_) => false,
        },
    }
}

fn peer_ip(peer: Peer<'_>) -> Option<Ipv4Addr> {
    match peer {
        Peer::External(ip) => Some(ip),
        Peer::Pod(pod) => pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok(),
    }
}

fn pod_labels(pod: &Pod) -> Vec<(String, String)> {
    pod.metadata
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A namespace's labels, including `kubernetes.io/metadata.name`, which the API server sets
/// on every namespace.
fn namespace_labels(ns: &Namespace) -> Vec<(String, String)> {
    let mut labels: Vec<_> = ns
        .metadata
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(name) = &ns.metadata.name {
        labels.push(("kubernetes.io/metadata.name".into(), name.clone()));
    }
    labels
}

/// LabelSelector semantics: every matchLabels pair and every matchExpressions requirement
/// must hold; an empty selector matches everything.
fn selector_matches(selector: &LabelSelector, labels: &[(String, String)]) -> bool {
    let get = |key: &str| {
        labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let pairs_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| get(k) == Some(v.as_str()));
    let exprs_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => get(&e.key).is_some_and(|v| values.iter().any(|x| x == v)),
            "NotIn" => get(&e.key).is_none_or(|v| values.iter().all(|x| x != v)),
            "Exists" => get(&e.key).is_some(),
            "DoesNotExist" => get(&e.key).is_none(),
            _ => false,
        }
    });
    pairs_ok && exprs_ok
}

#[cfg(test)]
mod tests;
