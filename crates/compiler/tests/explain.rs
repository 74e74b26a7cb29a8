//! `explain`'s reasons: which policies isolate each side, which rule, peer and port allow
//! the flow, the node's own row, ends that are no pod, and an unknown pod named.

use std::net::Ipv4Addr;

use serde_json::{Value, json};
use sluice_common::{IPPROTO_TCP, POLICY_EGRESS, POLICY_INGRESS};
use sluice_compiler::{
    Allow, FlowEnd, FlowQuery, NodeContext, ObjectKind, ObjectRef, Unexplained, explain,
};
use sluice_store::{LocalEndpoint, Snapshot};

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"))
}

fn policy_ref(name: &str) -> ObjectRef {
    ObjectRef::new(ObjectKind::NetworkPolicy, "x", name)
}

fn pod(name: &str) -> FlowEnd {
    FlowEnd::Pod {
        namespace: "x".into(),
        name: name.into(),
    }
}

/// Pods x/a and x/b on node-a; x/p lets b reach a's named port, x/q denies all egress.
fn cluster() -> (Snapshot, NodeContext) {
    let mut snapshot = Snapshot::default();
    let mut node = NodeContext {
        node: "node-a".into(),
        ..NodeContext::default()
    };
    snapshot.namespaces.push(from_json(
        json!({"metadata": {"name": "x", "labels": {"ns": "x"}}}),
    ));
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        let ip = Ipv4Addr::new(10, 0, 1, 2 + i as u8);
        snapshot.pods.push(from_json(json!({
            "metadata": {"name": name, "namespace": "x", "labels": {"pod": name}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "i",
                "ports": [{"name": "serve", "containerPort": 80}]}]},
            "status": {"phase": "Running", "podIP": ip.to_string()},
        })));
        let interface = format!("lxc{name}");
        node.interfaces.insert(interface.clone(), 10 + i as u32);
        snapshot.endpoints.push(LocalEndpoint {
            node: "node-a".into(),
            namespace: "x".into(),
            pod: name.into(),
            interface,
            addresses: [ip.into()].into(),
        });
    }
    snapshot.nodes.push(from_json(json!({
        "metadata": {"name": "node-a"},
        "status": {"addresses": [{"type": "InternalIP", "address": "172.16.0.1"}]},
    })));
    for (name, spec) in [
        (
            "p",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"pod": "c"}}},
                          {"podSelector": {"matchLabels": {"pod": "b"}}}],
                 "ports": [{"port": 81}, {"port": "serve"}]}]}),
        ),
        ("q", json!({"podSelector": {}, "policyTypes": ["Egress"]})),
    ] {
        snapshot.network_policies.push(from_json(json!({
            "metadata": {"name": name, "namespace": "x"}, "spec": spec,
        })));
    }
    (snapshot, node)
}

fn flow(from: FlowEnd, to: FlowEnd, port: u16) -> FlowQuery {
    FlowQuery {
        from,
        to,
        port,
        protocol: IPPROTO_TCP,
    }
}

#[test]
fn explanations_name_the_policy_rule_peer_and_port() {
    let (snapshot, node) = cluster();
    let e = explain(&snapshot, &node, &flow(pod("b"), pod("a"), 80)).expect("explained");
    assert_eq!(e.ingress.direction, POLICY_INGRESS);
    assert_eq!(e.ingress.isolating, [policy_ref("p")]);
    assert_eq!(
        e.ingress.allowed_by,
        [Allow::Rule {
            policy: policy_ref("p"),
            rule: 0,
            peer: Some(1),
            port: Some(1),
        }]
    );
    assert!(e.ingress.allowed());
    // Egress: isolated by x/q, which has no rule.
    assert_eq!(e.egress.direction, POLICY_EGRESS);
    assert_eq!(e.egress.isolating, [policy_ref("q")]);
    assert!(e.egress.allowed_by.is_empty());
    assert!(!e.allowed());

    // Port 82 is neither 81 nor the named port: isolated, nothing matches.
    let e = explain(&snapshot, &node, &flow(pod("b"), pod("a"), 82)).expect("explained");
    assert!(e.ingress.allowed_by.is_empty() && !e.ingress.allowed());

    // The node's own address: the host row, whatever the rules say.
    let host = FlowEnd::Address(Ipv4Addr::new(172, 16, 0, 1));
    let e = explain(&snapshot, &node, &flow(host, pod("a"), 9999)).expect("explained");
    assert_eq!(e.ingress.allowed_by, [Allow::Host]);
    assert!(!e.egress.pod && e.egress.allowed());
    assert!(e.allowed());

    // A world address as destination: no ingress to judge; x/q denies the egress. A pod's
    // address is that pod.
    let world = FlowEnd::Address(Ipv4Addr::new(192, 0, 2, 1));
    let e = explain(&snapshot, &node, &flow(pod("a"), world, 80)).expect("explained");
    assert!(!e.ingress.pod && !e.allowed());
    let by_address = FlowEnd::Address(Ipv4Addr::new(10, 0, 1, 3));
    let e = explain(&snapshot, &node, &flow(by_address, pod("a"), 80)).expect("explained");
    assert_eq!(e.from.pod, Some(ObjectRef::new(ObjectKind::Pod, "x", "b")));

    let unknown = explain(&snapshot, &node, &flow(pod("nope"), pod("a"), 80));
    let pod_ref = ObjectRef::new(ObjectKind::Pod, "x", "nope");
    assert_eq!(unknown, Err(Unexplained::UnknownPod(pod_ref)));
    assert!(
        unknown
            .map(|_| ())
            .unwrap_err()
            .to_string()
            .contains("pod x/nope")
    );
}
