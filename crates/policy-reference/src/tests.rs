//! Cases from the upstream conformance model: namespaces x, y and z, pods a, b and c in each,
//! serving 80 and 81 (and a named port `serve-81-udp` on UDP 81).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Container, ContainerPort, Namespace, Pod, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::*;

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn namespaces() -> Vec<Namespace> {
    ["x", "y", "z"]
        .iter()
        .map(|n| Namespace {
            metadata: ObjectMeta {
                name: Some(n.to_string()),
                labels: labels(&[("ns", n)]),
                ..Default::default()
            },
            ..Default::default()
        })
        .collect()
}

fn pods() -> Vec<Pod> {
    let mut out = Vec::new();
    for (i, ns) in ["x", "y", "z"].iter().enumerate() {
        for (j, name) in ["a", "b", "c"].iter().enumerate() {
            let port = |n: &str, p: i32, proto: &str| ContainerPort {
                name: Some(n.into()),
                container_port: p,
                protocol: Some(proto.into()),
                ..Default::default()
            };
            out.push(Pod {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some(ns.to_string()),
                    labels: labels(&[("pod", name)]),
                    ..Default::default()
                },
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "c".into(),
                        ports: Some(vec![
                            port("serve-80-tcp", 80, "TCP"),
                            port("serve-81-tcp", 81, "TCP"),
                            port("serve-81-udp", 81, "UDP"),
                        ]),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                status: Some(PodStatus {
                    pod_ip: Some(format!("10.244.{}.{}", i + 1, j + 2)),
                    ..Default::default()
                }),
            });
        }
    }
    out
}

fn policies(yaml: &str) -> Vec<NetworkPolicy> {
    yaml.split("\n---\n")
        .map(|doc| serde_saphyr::from_str(doc).unwrap())
        .collect()
}

/// The reachability matrix for one port and protocol: rows are sources, columns
/// destinations, `.` allowed and `X` denied, as `sluice lab probe` and the upstream tests print.
fn matrix(yaml: &str, port: u16, protocol: &str) -> String {
    let (namespaces, pods) = (namespaces(), pods());
    let policies = if yaml.is_empty() {
        vec![]
    } else {
        policies(yaml)
    };
    let cluster = Cluster {
        namespaces: &namespaces,
        policies: &policies,
    };
    let name = |p: &Pod| {
        format!(
            "{}/{}",
            p.metadata.namespace.as_deref().unwrap(),
            p.metadata.name.as_deref().unwrap()
        )
    };
    let mut out = String::new();
    for from in &pods {
        out.push_str(&name(from));
        out.push(' ');
        for to in &pods {
            let c = Connection {
                from: Peer::Pod(from),
                to: Peer::Pod(to),
                port,
                protocol,
            };
            out.push(if cluster.allows(&c) { '.' } else { 'X' });
        }
        out.push('\n');
    }
    out
}

/// Builds the expected matrix from the set of allowed (from, to) pairs, by pod name.
fn expect(allowed: impl Fn(&str, &str) -> bool) -> String {
    let names: Vec<String> = ["x", "y", "z"]
        .iter()
        .flat_map(|n| ["a", "b", "c"].iter().map(move |p| format!("{n}/{p}")))
        .collect();
    let mut out = String::new();
    for from in &names {
        out.push_str(from);
        out.push(' ');
        for to in &names {
            out.push(if allowed(from, to) { '.' } else { 'X' });
        }
        out.push('\n');
    }
    out
}

#[test]
fn no_policy_allows_everything() {
    assert_eq!(matrix("", 80, "TCP"), expect(|_, _| true));
}

#[test]
fn default_deny_ingress_isolates_the_namespace_for_ingress_only() {
    let p = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec:\n  podSelector: {}\n";
    assert_eq!(matrix(p, 80, "TCP"), expect(|_, to| !to.starts_with("x/")));
}

#[test]
fn default_deny_egress_isolates_for_egress_only() {
    let p = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n";
    assert_eq!(
        matrix(p, 80, "TCP"),
        expect(|from, _| !from.starts_with("x/"))
    );
}

#[test]
fn pod_and_namespace_selector_in_one_peer_mean_and_in_two_peers_mean_or() {
    let and = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n";
    assert_eq!(
        matrix(and, 80, "TCP"),
        expect(|from, to| to != "x/a" || from == "y/b")
    );
    let or = and.replace(
        "      podSelector: {matchLabels: {pod: b}}",
        "    - podSelector: {matchLabels: {pod: b}}",
    );
    // Separate peers: any pod of y, or pod b of the policy's own namespace x.
    assert_eq!(
        matrix(&or, 80, "TCP"),
        expect(|from, to| to != "x/a" || from.starts_with("y/") || from == "x/b")
    );
}

#[test]
fn namespace_selector_match_expressions() {
    let p = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: ns, operator: NotIn, values: [y]}\n";
    assert_eq!(
        matrix(p, 80, "TCP"),
        expect(|from, to| !to.starts_with("x/") || !from.starts_with("y/"))
    );
    let by_name = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}\n";
    assert_eq!(
        matrix(by_name, 80, "TCP"),
        expect(|from, to| !to.starts_with("x/") || from.starts_with("z/"))
    );
}

#[test]
fn ports_numbers_ranges_and_named_ports_with_their_protocol() {
    let p = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - ports:\n    - {port: 79, endPort: 80}\n    - {port: serve-81-udp, protocol: UDP}\n";
    let into_x = |_: &str, to: &str| !to.starts_with("x/");
    assert_eq!(
        matrix(p, 80, "TCP"),
        expect(|_, _| true),
        "80 is inside 79-80"
    );
    assert_eq!(matrix(p, 81, "TCP"), expect(into_x), "81/TCP is not listed");
    assert_eq!(
        matrix(p, 81, "UDP"),
        expect(|_, _| true),
        "the named port resolves to 81/UDP"
    );
    assert_eq!(
        matrix(p, 80, "UDP"),
        expect(into_x),
        "the range is TCP (the default protocol)"
    );
    // A named port with the wrong protocol matches nothing.
    let wrong = p.replace(
        "{port: serve-81-udp, protocol: UDP}",
        "{port: serve-81-udp, protocol: TCP}",
    );
    assert_eq!(matrix(&wrong, 81, "UDP"), expect(into_x));
    assert_eq!(matrix(&wrong, 81, "TCP"), expect(into_x));
}

#[test]
fn egress_rules_without_policy_types_isolate_egress_too() {
    let p = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  egress:\n  - to:\n    - podSelector: {matchLabels: {pod: b}}\n";
    let policy: NetworkPolicy = serde_saphyr::from_str(p).unwrap();
    assert_eq!(
        policy_types(&policy),
        vec![Direction::Ingress, Direction::Egress]
    );
    // x/a may only open connections to x/b, and accepts none (isolated for ingress, no rule).
    assert_eq!(
        matrix(p, 80, "TCP"),
        expect(|from, to| (from != "x/a" || to == "x/b") && to != "x/a")
    );
}

#[test]
fn an_empty_policy_types_list_is_defaulted_like_an_absent_one() {
    let p = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: []\n  egress:\n  - {}\n";
    let policy: NetworkPolicy = serde_saphyr::from_str(p).unwrap();
    assert_eq!(
        policy_types(&policy),
        vec![Direction::Ingress, Direction::Egress]
    );
}

#[test]
fn policies_combine_as_a_union() {
    let p = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-y, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-z, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: z}}}]\n";
    assert_eq!(
        matrix(p, 80, "TCP"),
        expect(|from, to| !to.starts_with("x/") || !from.starts_with("x/"))
    );
}

#[test]
fn ip_block_with_except_for_hosts_outside_the_cluster() {
    let p = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {cidr: 192.168.0.0/16, except: [192.168.9.0/24]}\n    ports:\n    - port: 80\n";
    let (namespaces, pods, policies) = (namespaces(), pods(), policies(p));
    let cluster = Cluster {
        namespaces: &namespaces,
        policies: &policies,
    };
    let xa = &pods[0];
    let to = |ip: &str, port| Connection {
        from: Peer::Pod(xa),
        to: Peer::External(ip.parse().unwrap()),
        port,
        protocol: "TCP",
    };
    assert!(cluster.allows(&to("192.168.1.1", 80)));
    assert!(
        !cluster.allows(&to("192.168.9.1", 80)),
        "except carves the /24 out"
    );
    assert!(!cluster.allows(&to("192.168.1.1", 81)), "only port 80");
    assert!(!cluster.allows(&to("10.0.0.1", 80)), "outside the cidr");
    // Inbound from the world is not restricted: the policy only isolates egress.
    let from_world = Connection {
        from: Peer::External("192.168.9.1".parse().unwrap()),
        to: Peer::Pod(xa),
        port: 80,
        protocol: "TCP",
    };
    assert!(cluster.allows(&from_world));
}
