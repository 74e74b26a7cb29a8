//! Table tests in the style of Cilium's: each `testdata/<case>/input.yaml` is compiled and
//! its `dump()` compared with `expected.txt`. `UPDATE_EXPECTED=1` rewrites the expected
//! files instead; review the diff before committing it.
//!
//! An input file starts with a `kind: TestNode` document naming the node under test, its
//! interfaces and the local endpoints (what the CNI plugin reports on a real node), and
//! the cluster's nodes; the other documents are Kubernetes manifests, read and validated
//! by `sluice-sources`. `alsoFor: [node-b, ...]` compiles the same input for other nodes
//! too, each compared with `expected.<node>.txt`.
//!
//! The same cases feed the determinism property: shuffling every list of the snapshot must
//! not change the compiled state.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde::Deserialize;
use sluice_compiler::{NodeContext, compile};
use sluice_sources::{Object, parse_str};
use sluice_store::{LocalEndpoint, Snapshot};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestNode {
    kind: String,
    name: String,
    /// Host-side interface name -> ifindex.
    #[serde(default)]
    interfaces: BTreeMap<String, u32>,
    #[serde(default)]
    endpoints: Vec<TestEndpoint>,
    /// Rows one endpoint's policy map holds (NodeContext::policy_map_max).
    #[serde(default, rename = "policyMapMax")]
    policy_map_max: Option<u32>,
    /// Nodes of the cluster with their addresses (this one included, by name).
    #[serde(default)]
    nodes: Vec<TestClusterNode>,
    /// The snapshot's cluster CIDR.
    #[serde(default, rename = "clusterCIDR")]
    cluster_cidr: Option<Ipv4Net>,
    /// Other nodes to compile the same snapshot for.
    #[serde(default, rename = "alsoFor")]
    also_for: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestClusterNode {
    name: String,
    /// InternalIP addresses; written as given, so a bad one reaches the compiler.
    addresses: Vec<String>,
    /// ExternalIP addresses (node ports listen on these too).
    #[serde(default, rename = "externalAddresses")]
    external_addresses: Vec<String>,
    /// spec.podCIDR, as written.
    #[serde(default, rename = "podCIDR")]
    pod_cidr: Option<String>,
    /// metadata.labels, e.g. the node's zone.
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestEndpoint {
    /// Defaults to the node under test.
    node: Option<String>,
    #[serde(default = "default_namespace")]
    namespace: String,
    pod: String,
    interface: String,
    ipv4: Ipv4Addr,
}

fn default_namespace() -> String {
    "default".into()
}

struct Case {
    /// The directory's name, and the node when compiled for another than the header's.
    name: String,
    expected: PathBuf,
    snapshot: Snapshot,
    node: NodeContext,
}

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

/// The case in `dir`, compiled for the header's node, then for each of `alsoFor`.
fn load_case(dir: &Path) -> Vec<Case> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let input = dir.join("input.yaml");
    let text =
        fs::read_to_string(&input).unwrap_or_else(|e| panic!("read {}: {e}", input.display()));
    let (header, manifests) = text
        .split_once("\n---\n")
        .unwrap_or_else(|| panic!("{name}: input.yaml must start with a TestNode document"));
    let header: TestNode =
        serde_saphyr::from_str(header).unwrap_or_else(|e| panic!("{name}: TestNode header: {e}"));
    assert_eq!(header.kind, "TestNode", "{name}: first document");

    let mut snapshot = Snapshot {
        revision: 1,
        ..Snapshot::default()
    };
    let manifests =
        parse_str(&input, manifests).unwrap_or_else(|e| panic!("{name}: manifests: {e}"));
    for manifest in manifests {
        match manifest.object {
            Object::Namespace(o) => snapshot.namespaces.push(o),
            Object::Pod(o) => snapshot.pods.push(o.into()),
            Object::Service(o) => snapshot.services.push(o),
            Object::EndpointSlice(o) => snapshot.endpoint_slices.push(o.into()),
            Object::NetworkPolicy(o) => snapshot.network_policies.push(o),
            // The store holds the Deployment's pods and slices, not the Deployment.
            Object::Deployment(_) => {}
        }
    }
    snapshot.endpoints = header
        .endpoints
        .into_iter()
        .map(|e| LocalEndpoint {
            node: e.node.unwrap_or_else(|| header.name.clone()),
            namespace: e.namespace,
            pod: e.pod,
            interface: e.interface,
            addresses: [e.ipv4.into()].into(),
        })
        .collect();
    snapshot.nodes = header
        .nodes
        .iter()
        .map(|n| {
            let addresses: Vec<serde_json::Value> = n
                .addresses
                .iter()
                .map(|a| serde_json::json!({"type": "InternalIP", "address": a}))
                .chain(
                    n.external_addresses
                        .iter()
                        .map(|a| serde_json::json!({"type": "ExternalIP", "address": a})),
                )
                .collect();
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": n.name, "labels": n.labels},
                "spec": {"podCIDR": n.pod_cidr},
                "status": {"addresses": addresses},
            }))
            .unwrap_or_else(|e| panic!("{name}: node {}: {e}", n.name))
        })
        .collect();
    snapshot.cluster_cidr = header.cluster_cidr;
    let mut node = NodeContext {
        node: header.name,
        interfaces: header.interfaces,
        ..NodeContext::default()
    };
    if let Some(max) = header.policy_map_max {
        node.policy_map_max = max;
    }
    let mut cases = vec![Case {
        name: name.clone(),
        expected: dir.join("expected.txt"),
        snapshot: snapshot.clone(),
        node: node.clone(),
    }];
    for other in header.also_for {
        cases.push(Case {
            name: format!("{name} on {other}"),
            expected: dir.join(format!("expected.{other}.txt")),
            snapshot: snapshot.clone(),
            node: NodeContext {
                node: other,
                ..node.clone()
            },
        });
    }
    cases
}

fn cases() -> Vec<Case> {
    let dir = testdata();
    let mut dirs: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let cases: Vec<Case> = dirs.iter().flat_map(|d| load_case(d)).collect();
    assert!(cases.len() >= 10, "found only {} cases", cases.len());
    cases
}

/// The lines only in `expected` (-) and only in `actual` (+); dumps are sorted and unique.
fn diff(expected: &str, actual: &str) -> String {
    let expected_lines: BTreeSet<&str> = expected.lines().collect();
    let actual_lines: BTreeSet<&str> = actual.lines().collect();
    let mut out = String::new();
    for line in expected_lines.difference(&actual_lines) {
        out.push_str(&format!("- {line}\n"));
    }
    for line in actual_lines.difference(&expected_lines) {
        out.push_str(&format!("+ {line}\n"));
    }
    if out.is_empty() {
        out.push_str("(same lines, different order)\n");
    }
    out
}

#[test]
fn table() {
    let update = std::env::var_os("UPDATE_EXPECTED").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    for case in cases() {
        let actual = compile(&case.snapshot, &case.node).dump();
        let path = &case.expected;
        if update {
            fs::write(path, &actual).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            continue;
        }
        let expected = fs::read_to_string(path).unwrap_or_default();
        if expected != actual {
            failures.push(format!("{}:\n{}", case.name, diff(&expected, &actual)));
        }
    }
    assert!(
        failures.is_empty(),
        "dumps differ from expected.txt (UPDATE_EXPECTED=1 rewrites them):\n{}",
        failures.join("\n")
    );
}

fn shuffle_snapshot(rng: &mut fastrand::Rng, snapshot: &mut Snapshot) {
    rng.shuffle(&mut snapshot.namespaces);
    rng.shuffle(&mut snapshot.pods);
    rng.shuffle(&mut snapshot.services);
    rng.shuffle(&mut snapshot.endpoint_slices);
    rng.shuffle(&mut snapshot.network_policies);
    rng.shuffle(&mut snapshot.endpoints);
    rng.shuffle(&mut snapshot.nodes);
    // Nor does the order of a policy's rules, peers and ports.
    for policy in &mut snapshot.network_policies {
        let Some(spec) = &mut policy.spec else {
            continue;
        };
        for rule in spec.ingress.iter_mut().flatten() {
            rule.from.iter_mut().for_each(|v| rng.shuffle(v));
            rule.ports.iter_mut().for_each(|v| rng.shuffle(v));
        }
        if let Some(rules) = &mut spec.ingress {
            rng.shuffle(rules);
        }
        for rule in spec.egress.iter_mut().flatten() {
            rule.to.iter_mut().for_each(|v| rng.shuffle(v));
            rule.ports.iter_mut().for_each(|v| rng.shuffle(v));
        }
        if let Some(rules) = &mut spec.egress {
            rng.shuffle(rules);
        }
    }
    // Within a slice, the order of endpoints and ports carries no meaning either.
    for slice in &mut snapshot.endpoint_slices {
        let slice = std::sync::Arc::make_mut(slice);
        rng.shuffle(&mut slice.endpoints);
        if let Some(ports) = &mut slice.ports {
            rng.shuffle(ports);
        }
    }
}

#[test]
fn compile_is_deterministic_under_shuffled_input() {
    let mut rng = fastrand::Rng::with_seed(0x51ce);
    for case in cases() {
        let expected = compile(&case.snapshot, &case.node);
        for round in 0..50 {
            let mut snapshot = case.snapshot.clone();
            shuffle_snapshot(&mut rng, &mut snapshot);
            assert_eq!(
                compile(&snapshot, &case.node),
                expected,
                "{}: shuffle round {round} changed the result",
                case.name
            );
        }
    }
}

#[test]
fn seed_demo_frontend_is_named() {
    let [case] = load_case(&testdata().join("seed-demo"))
        .try_into()
        .unwrap_or_else(|_| panic!("seed-demo is compiled for one node"));
    let state = compile(&case.snapshot, &case.node);
    let [frontend] = state.frontends.as_slice() else {
        panic!("expected one frontend, got {:?}", state.frontends);
    };
    assert_eq!(
        (
            frontend.service.as_str(),
            frontend.port_name.as_str(),
            frontend.kind.as_str()
        ),
        ("default/nginx", "", "ClusterIP")
    );
    assert_eq!(frontend.backends.len(), 2);
}

/// A snapshot full of collisions: shared VIPs, duplicate endpoints, not-ready endpoints,
/// interfaces claimed twice or missing.
fn generated_snapshot(rng: &mut fastrand::Rng) -> (Snapshot, NodeContext) {
    let mut snapshot = Snapshot::default();
    for i in 0..40 {
        let name = format!("svc-{}", rng.u8(0..30));
        let ports: Vec<serde_json::Value> = (0..rng.usize(1..4))
            .map(|p| {
                serde_json::json!({"name": format!("p{p}"), "port": rng.u16(78..82),
                                   "protocol": if rng.bool() { "TCP" } else { "UDP" }})
            })
            .collect();
        let service = serde_json::json!({
            "metadata": {"name": name, "namespace": if i % 3 == 0 { "a" } else { "b" }},
            "spec": {"clusterIP": format!("10.96.0.{}", rng.u8(1..6)), "ports": ports},
        });
        snapshot
            .services
            .push(serde_json::from_value(service).unwrap_or_else(|e| panic!("service: {e}")));
        let endpoints: Vec<serde_json::Value> = (0..rng.usize(0..6))
            .map(|_| {
                serde_json::json!({"addresses": [format!("10.244.0.{}", rng.u8(1..12))],
                                   "conditions": {"ready": rng.u8(0..4) != 0}})
            })
            .collect();
        let slice_ports: Vec<serde_json::Value> = (0..3)
            .map(|p| {
                serde_json::json!({"name": format!("p{p}"), "port": 8000 + rng.u16(0..3),
                                        "protocol": if rng.bool() { "TCP" } else { "UDP" }})
            })
            .collect();
        let slice = serde_json::json!({
            "metadata": {"name": format!("{name}-{i}"), "namespace": if rng.bool() { "a" } else { "b" },
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": slice_ports, "endpoints": endpoints,
        });
        snapshot
            .endpoint_slices
            .push(serde_json::from_value(slice).unwrap_or_else(|e| panic!("slice: {e}")));
    }
    for i in 0..20 {
        snapshot.endpoints.push(LocalEndpoint {
            node: if i % 5 == 0 { "node-b" } else { "node-a" }.into(),
            namespace: "a".into(),
            pod: format!("pod-{}", rng.u8(0..15)),
            interface: format!("lxc{}", rng.u8(0..12)),
            addresses: [Ipv4Addr::new(10, 244, 0, rng.u8(1..30)).into()].into(),
        });
    }
    let node = NodeContext {
        node: "node-a".into(),
        interfaces: (0..10).map(|i| (format!("lxc{i}"), 100 + i)).collect(),
        ..NodeContext::default()
    };
    (snapshot, node)
}

#[test]
fn compile_is_deterministic_on_generated_collisions() {
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for _ in 0..20 {
        let (snapshot, node) = generated_snapshot(&mut rng);
        let expected = compile(&snapshot, &node);
        assert!(
            !expected.problems.is_empty(),
            "generator should produce collisions"
        );
        for _ in 0..20 {
            let mut shuffled = snapshot.clone();
            shuffle_snapshot(&mut rng, &mut shuffled);
            assert_eq!(compile(&shuffled, &node), expected);
        }
    }
}
