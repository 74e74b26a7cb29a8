//! Traffic policy Local across two nodes, from pods: the node port of an
//! externalTrafficPolicy Local Service is refused at once on the node without a backend
//! (its frontend has no slots) and answers on the node with one, while the ClusterIP of
//! the same Service reaches the backend from both; internalTrafficPolicy Local keeps a
//! node's pods on that node's backends. The refusal time is printed, not asserted.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use sluice_integration::{
    TestLab, http_get,
    multinode::{Mode, lab_yaml, pod_on, underlay_address},
};

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
    let mut lab = TestLab::up("etplocal", &lab_yaml(Mode::Tunnel, 2, 1500));
    let pods = [
        pod_on("default", "web-1", "node-1", "app: web"),
        pod_on("default", "client-1", "node-1", "app: client"),
        pod_on("default", "client-2", "node-2", "app: client"),
    ]
    .join("---\n");
    lab.apply_yaml("pods.yaml", &pods);
    lab.apply_yaml("local.yaml", LOCAL);
    let vip = SocketAddr::from((lab.cluster_ip("local"), 80));

    // node-2 has no backend: its node port is refused at once.
    let empty = SocketAddr::from((underlay_address(1), 30090));
    let (refused, took) = lab.in_pod("default/client-2", move || {
        let started = Instant::now();
        let result = TcpStream::connect_timeout(&empty, Duration::from_secs(5));
        (result.map(|_| ()), started.elapsed())
    });
    let refused = refused.expect_err("no local backend on node-2");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    println!("node port without a local backend refused in {took:?}");

    // node-1 has one: its node port answers from it.
    let full = SocketAddr::from((underlay_address(0), 30090));
    let answer = lab.in_pod("default/client-1", move || http_get(full));
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
