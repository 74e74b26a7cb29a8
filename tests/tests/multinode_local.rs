//! Traffic policy Local across two nodes: the node port of an externalTrafficPolicy Local
//! Service is refused at once to a world host on the node without a backend (its frontend
//! has no local slots) and answers on the node with one; pods, clients inside the
//! cluster, reach it on both nodes through its cluster-wide slots, as kube-proxy sends
//! cluster traffic to an external frontend on to every endpoint; the ClusterIP of the
//! same Service reaches the backend from both; internalTrafficPolicy Local keeps a node's
//! pods on that node's backends. The refusal time is printed, not asserted.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use sluice_integration::{
    TestLab, http_get, in_netns,
    multinode::{Mode, lab_yaml, pod_on, underlay_address},
};

/// A host outside the cluster, on the underlay.
const WORLD: &str = "world:
  - {name: client, address: 203.0.113.10, attach: underlay}
";

const LOCAL: &str = "apiVersion: v1
kind: Service
metadata: {name: local}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{port: 80, nodePort: 30090}]
---
apiVersion: v1
kind: Service
metadata: {name: near}
spec:
  internalTrafficPolicy: Local
  selector: {app: web}
  ports: [{port: 80}]
";

#[test]
fn traffic_policy_local_uses_this_nodes_backends_only() {
    let mut lab = TestLab::up("etplocal", &(lab_yaml(Mode::Tunnel, 2, 1500) + WORLD));
    let pods = [
        pod_on("default", "web-1", "node-1", "app: web"),
        pod_on("default", "client-1", "node-1", "app: client"),
        pod_on("default", "client-2", "node-2", "app: client"),
    ]
    .join("---\n");
    lab.apply_yaml("pods.yaml", &pods);
    lab.apply_yaml("local.yaml", LOCAL);
    let vip = SocketAddr::from((lab.cluster_ip("local"), 80));

    // node-2 has no backend: its node port is refused at once to the world host.
    let empty = SocketAddr::from((underlay_address(1), 30090));
    let world = lab.lab.netns_of("world/client").unwrap();
    let (refused, took) = in_netns(&world, move || {
        let started = Instant::now();
        let result = TcpStream::connect_timeout(&empty, Duration::from_secs(5));
        (result.map(|_| ()), started.elapsed())
    });
    let refused = refused.expect_err("no local backend on node-2");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    println!("node port without a local backend refused to a world host in {took:?}");

    // node-1 has one: its node port answers from it, to the world host and to pods.
    let full = SocketAddr::from((underlay_address(0), 30090));
    let answer = in_netns(&world, move || http_get(full));
    assert_eq!(answer.as_deref().ok(), Some("web-1"), "{answer:?}");
    let answer = lab.in_pod("default/client-1", move || http_get(full));
    assert_eq!(answer.as_deref().ok(), Some("web-1"), "{answer:?}");
    // A pod on node-2 is inside the cluster: node-2's node port sends it to web-1 on
    // node-1, as kube-proxy's KUBE-EXT chain does for traffic from the cluster.
    let answer = lab.in_pod("default/client-2", move || http_get(empty));
    assert_eq!(answer.as_deref().ok(), Some("web-1"), "{answer:?}");
    // The ClusterIP keeps every node's backends.
    let answer = lab.in_pod("default/client-2", move || http_get(vip));
    assert_eq!(answer.as_deref().ok(), Some("web-1"), "{answer:?}");

    // internalTrafficPolicy Local: node-1's pods reach web-1, node-2's pods are refused.
    let near = SocketAddr::from((lab.cluster_ip("near"), 80));
    let answer = lab.in_pod("default/client-1", move || http_get(near));
    assert_eq!(answer.as_deref().ok(), Some("web-1"), "{answer:?}");
    let answer = lab.in_pod("default/client-2", move || http_get(near));
    let refused = answer.expect_err("no backend of near on node-2");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
}
