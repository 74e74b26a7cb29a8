//! Every lab actor as a probe source: nodes (`node/<name>`, the node's own namespace: `host`
//! on its node, `remote-node` on the others) and world hosts, in single probes and in the
//! matrix, allowed and denied by NetworkPolicy.

use sluice_integration::{
    TestLab,
    multinode::{Mode, lab_yaml, pod_on},
};
use sluice_lab::{ProbeOptions, ProbeRequest, Protocol};

const WORLD: &str = "world:
  - name: internet
    address: 203.0.113.10
    attach: underlay
    ports: [{port: 80, protocol: TCP}]
";

fn probe(lab: &TestLab, from: &str, to: &str) -> bool {
    lab.lab
        .probe_one(from, to, 80, Protocol::Tcp, &ProbeOptions::default())
        .unwrap_or_else(|e| panic!("probe {from} -> {to}: {e}"))
        .allowed
}

#[test]
fn nodes_and_world_hosts_probe_pods_as_policy_allows() {
    let mut lab = TestLab::up("probesrc", &(lab_yaml(Mode::Tunnel, 2, 1500) + WORLD));
    lab.apply_yaml("web.yaml", &pod_on("default", "web", "node-2", "app: web"));

    // Without policy every source reaches the pod.
    for from in ["node/node-1", "node/node-2", "world/internet"] {
        assert!(probe(&lab, from, "default/web"), "{from} before any policy");
    }

    // Isolated for ingress with an empty rule set: the node's own traffic (host) still
    // passes, as kubelet probes need; another node and the world are denied.
    lab.apply_yaml(
        "deny.yaml",
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all}
spec:
  podSelector: {}
  policyTypes: [Ingress]
",
    );
    assert!(probe(&lab, "node/node-2", "default/web"), "host");
    assert!(!probe(&lab, "node/node-1", "default/web"), "remote-node");
    assert!(!probe(&lab, "world/internet", "default/web"), "world");

    // The matrix with nodes and the world as sources: nodes are rows, never columns.
    let matrix = lab
        .lab
        .probe(&ProbeRequest {
            world: true,
            nodes: true,
            ports: vec![80],
            protocols: vec![Protocol::Tcp],
            ..Default::default()
        })
        .unwrap();
    assert!(matrix.sources.iter().any(|s| s == "node/node-1"));
    assert!(!matrix.destinations.iter().any(|d| d.starts_with("node/")));
    assert_eq!(
        matrix.allowed("node/node-2", "default/web", 80, Protocol::Tcp),
        Some(true)
    );
    assert_eq!(
        matrix.allowed("node/node-1", "default/web", 80, Protocol::Tcp),
        Some(false)
    );
    assert_eq!(
        matrix.allowed("world/internet", "default/web", 80, Protocol::Tcp),
        Some(false)
    );

    // An ipBlock holding node-1's and the world host's addresses admits both.
    lab.apply_yaml(
        "allow.yaml",
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-outside}
spec:
  podSelector: {}
  ingress:
  - from:
    - ipBlock: {cidr: 0.0.0.0/0}
",
    );
    assert!(
        probe(&lab, "node/node-1", "default/web"),
        "remote-node by ipBlock"
    );
    assert!(
        probe(&lab, "world/internet", "default/web"),
        "world by ipBlock"
    );

    // A node is a source only, and an unknown one is named.
    let err = lab
        .lab
        .probe_one(
            "default/web",
            "node/node-1",
            80,
            Protocol::Tcp,
            &ProbeOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("a node is a probe source only"), "{err}");
    let err = lab
        .lab
        .probe_one(
            "node/node-9",
            "default/web",
            80,
            Protocol::Tcp,
            &ProbeOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("no node node-9"), "{err}");

    // The CLI's single probe from a node: exit status 0 allowed.
    let out = lab.cli_output(&[
        "lab",
        "probe",
        "--from",
        "node/node-2",
        "--to",
        "default/web",
        "--port",
        "80",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
