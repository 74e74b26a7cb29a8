//! Several nodes (issue 10), end to end, in both routing modes: three node namespaces, each
//! with its own agent, joined by an underlay built from namespaces. Pods reach each other
//! and the nodes across nodes by TCP and UDP, a ClusterIP balances over backends on two
//! nodes from all three and scales under a request loop, 100 MB cross nodes intact, the
//! upstream conformance model spread over the nodes gets the reference's verdicts, path-MTU
//! discovery works over a lowered underlay, nodes come and go while traffic flows, bad node
//! input is refused, and `observe` merges every node's flows. This file: traffic, Services,
//! policy and flows on one shared lab per mode; `multinode_policy.rs` the conformance model,
//! `multinode_nodes.rs` nodes coming and going, bad nodes and path MTU.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use sluice_integration::{
    TestLab, http_get,
    multinode::{self, Mode, NODES, Sample, bulk_transfer, pod_on, request_loop, three_nodes},
    netpol::policy,
    udp_ask,
};

const BULK: usize = 100 << 20;

/// `client-k` on node-k (k = 1..3), `web-1` on node-1 and `web-2` on node-2 behind the
/// ClusterIP `web`.
fn workload() -> String {
    let mut yaml = String::new();
    for (k, node) in NODES.iter().enumerate() {
        yaml += &pod_on("default", &format!("client-{}", k + 1), node, "app: client");
        yaml += "---\n";
    }
    for (k, node) in NODES[..2].iter().enumerate() {
        yaml += &pod_on("default", &format!("web-{}", k + 1), node, "app: web");
        yaml += "---\n";
    }
    yaml + "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {port: 80, targetPort: 80, protocol: TCP}
"
}

fn pod_to_pod_across_nodes(lab: &TestLab, mode: Mode) {
    for i in 1..=3 {
        for j in (1..=3).filter(|j| *j != i) {
            let to = format!("client-{j}");
            let addr = SocketAddr::from((lab.pod_ip(&format!("default/{to}")), 80));
            let from = format!("default/client-{i}");
            let tcp = lab.in_pod(&from, move || http_get(addr));
            assert_eq!(tcp.unwrap(), to, "{mode:?}: TCP {from} -> {to}");
            let udp = lab.in_pod(&from, move || udp_ask(addr, b"hostname"));
            let (name, answered_by) = udp.unwrap();
            assert_eq!(name, to, "{mode:?}: UDP {from} -> {to}");
            assert_eq!(answered_by, addr, "{mode:?}: the answer comes from the pod");
        }
    }
}

/// A node reaches a pod on another node, and a pod reaches another node's address; the
/// node's server sees the pod's own address.
fn node_to_pod_both_ways(lab: &TestLab, mode: Mode) {
    for (node, pod) in [
        ("node-1", "client-2"),
        ("node-2", "client-3"),
        ("node-3", "client-1"),
    ] {
        let addr = SocketAddr::from((lab.pod_ip(&format!("default/{pod}")), 80));
        let answer = lab.in_node(node, move || http_get(addr));
        assert_eq!(answer.unwrap(), pod, "{mode:?}: {node} -> {pod}");
    }
    for (pod, k) in [("client-3", 0), ("client-1", 1)] {
        let node = NODES[k];
        let router = multinode::router_address(k);
        let port = multinode::serve_peer_address(lab, node, router);
        let addr = SocketAddr::from((router, port));
        let seen = lab.in_pod(&format!("default/{pod}"), move || {
            multinode::read_answer(addr)
        });
        let pod_ip = lab.pod_ip(&format!("default/{pod}"));
        assert_eq!(
            seen.unwrap(),
            pod_ip.to_string(),
            "{mode:?}: {pod} -> {node}'s address {router}"
        );
    }
}

/// Every node's client reaches the ClusterIP and is answered by backends on both nodes.
fn service_from_every_node(lab: &TestLab, mode: Mode) {
    let vip = SocketAddr::from((lab.cluster_ip("web"), 80));
    for k in 1..=3 {
        let answers: BTreeSet<String> = lab.in_pod(&format!("default/client-{k}"), move || {
            (0..30).map(|_| http_get(vip).unwrap()).collect()
        });
        assert_eq!(
            answers,
            BTreeSet::from(["web-1".to_owned(), "web-2".to_owned()]),
            "{mode:?}: client-{k} on node-{k} is balanced over both nodes' backends"
        );
    }
}

/// Adds a backend on node-3 and removes web-1 while client-3 loops requests: no request
/// fails once each change is realized, and web-1 gets no new connection after its removal.
fn scale_under_load(lab: &mut TestLab, mode: Mode) {
    let vip = SocketAddr::from((lab.cluster_ip("web"), 80));
    let (stop, samples, thread) = request_loop(lab, "default/client-3", vip);
    std::thread::sleep(Duration::from_millis(300));
    let web3 = pod_on("default", "web-3", "node-3", "app: web");
    let up_started = Instant::now();
    lab.apply_yaml("web-3.yaml", &web3);
    let up_realized = Instant::now();
    std::thread::sleep(Duration::from_millis(600));
    let web1 = pod_on("default", "web-1", "node-1", "app: web");
    let down_started = Instant::now();
    lab.delete_yaml("web-1.yaml", &web1);
    let down_realized = Instant::now();
    std::thread::sleep(Duration::from_millis(600));
    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();

    let samples = samples.lock().unwrap();
    let answered = |name: &str| samples.iter().any(|s| s.answer.as_deref() == Ok(name));
    eprintln!(
        "{mode:?}: {} requests while scaling (+web-3 realized in {:?}, -web-1 in {:?}), {} failed in all",
        samples.len(),
        up_realized - up_started,
        down_realized - down_started,
        samples.iter().filter(|s| s.answer.is_err()).count()
    );
    assert!(
        answered("web-3"),
        "{mode:?}: the new backend on node-3 got traffic"
    );
    // Realized windows only, as in scaling.rs: a request that started while a removal was
    // being applied may have been sent to the backend going away.
    let realized = |s: &&Sample| {
        (s.started >= up_realized && s.started < down_started) || s.started >= down_realized
    };
    for s in samples.iter().filter(realized) {
        let answer = s.answer.as_ref().unwrap_or_else(|e| {
            panic!(
                "{mode:?}: a request {:?} after a realized change failed: {e}",
                s.started.saturating_duration_since(up_started)
            )
        });
        if s.started >= down_realized {
            assert_ne!(
                answer, "web-1",
                "{mode:?}: removed backend got a new connection"
            );
        }
    }
}

/// The flows `sluice --lab L observe` merges from every node, as JSON.
fn observe(lab: &TestLab, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["observe", "--last", "4000", "-o", "json"];
    all.extend(args);
    lab.cli(&all)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect()
}

/// A policy on web-2 (node-2) admits only app=web; client-1 on node-1 is dropped there.
/// `observe` shows the drop on node-2 with both identities, and client-1's side on node-1.
fn cross_node_drop_is_observed(lab: &mut TestLab, mode: Mode) {
    let only_web = policy(
        "only-web",
        "default",
        "  podSelector:\n    matchLabels: {app: web}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {app: web}\n",
    );
    lab.apply_yaml("only-web.yaml", &only_web);
    lab.verify_every_node("after the policy");
    let addr = SocketAddr::from((lab.pod_ip("default/web-2"), 80));
    let denied = lab.in_pod("default/client-1", move || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(700))
    });
    assert!(denied.is_err(), "{mode:?}: client-1 -> web-2 is denied");

    let deadline = Instant::now() + Duration::from_secs(5);
    let (drop, flows) = loop {
        let flows = observe(
            lab,
            &[
                "--from-pod",
                "default/client-1",
                "--to-pod",
                "default/web-2",
            ],
        );
        let drop = flows.iter().find(|f| {
            f["flow"]["verdict"] == "DROPPED" && f["flow"]["drop_reason_desc"] == "POLICY_DENIED"
        });
        if let Some(drop) = drop {
            break (drop.clone(), flows);
        }
        assert!(
            Instant::now() < deadline,
            "{mode:?}: no POLICY_DENIED flow observed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("{mode:?}: observed {drop}");
    let node_of = |f: &serde_json::Value| {
        f["flow"]["node_name"]
            .as_str()
            .or_else(|| f["node_name"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(node_of(&drop), "node-2", "the drop happens where web-2 is");
    let flow = &drop["flow"];
    assert_eq!(flow["source"]["pod_name"], "client-1");
    assert_eq!(flow["destination"]["pod_name"], "web-2");
    let label = |side: &str, want: &str| {
        flow[side]["labels"]
            .as_array()
            .is_some_and(|ls| ls.iter().any(|l| l == want))
    };
    assert!(
        label("source", "k8s:app=client"),
        "sender's identity: {flow}"
    );
    assert!(
        label("destination", "k8s:app=web"),
        "receiver's identity: {flow}"
    );
    assert!(flow["source"]["identity"].as_u64().unwrap() >= 256);
    assert!(flow["destination"]["identity"].as_u64().unwrap() >= 256);
    let nodes: BTreeSet<String> = flows.iter().map(node_of).collect();
    assert!(
        nodes.contains("node-1") && nodes.contains("node-2"),
        "{mode:?}: the connection is seen on both nodes: {nodes:?}"
    );
    lab.delete_yaml("only-web.yaml", &only_web);
}

/// Policy on the pods of node-2 admitting only app=client: a 3,000-byte ping from node-1's
/// client arrives in fragments and passes whole; a datagram client-1 sends from an address
/// not its own is dropped; node-1 (remote-node there) is denied while node-2 (the pod's own
/// host) passes, until an ipBlock holding every node's address admits remote-node.
fn fragments_spoofing_and_nodes(lab: &mut TestLab, mode: Mode) {
    let clients_only = policy(
        "clients-only",
        "default",
        "  podSelector:\n    matchLabels: {app: client}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {app: client}\n",
    );
    lab.apply_yaml("clients-only.yaml", &clients_only);
    let to = lab.pod_ip("default/client-2").to_string();
    let ping = lab
        .lab
        .pod_command("default/client-1", "ping")
        .unwrap()
        .args(["-c", "2", "-W", "2", "-s", "3000", &to])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "{mode:?}: fragmented ping across nodes: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );

    let spoofed = Ipv4Addr::new(10, 244, 1, 250);
    let add = lab
        .lab
        .pod_command("default/client-1", "ip")
        .unwrap()
        .args(["addr", "add", &format!("{spoofed}/32"), "dev", "eth0"])
        .status()
        .unwrap();
    assert!(add.success(), "add a second address inside client-1");
    let peer = SocketAddr::from((lab.pod_ip("default/client-2"), 80));
    let before = multinode::dropped(
        lab,
        "node-1",
        sluice_common::DropReason::InvalidSource,
        sluice_common::METRIC_DIR_EGRESS,
    );
    let (honest, forged) = lab.in_pod("default/client-1", move || {
        let honest = udp_ask(peer, b"hostname").is_ok();
        let s = std::net::UdpSocket::bind((spoofed, 0)).unwrap();
        s.connect(peer).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.send(b"hostname").unwrap();
        let mut buf = [0u8; 64];
        (honest, s.recv(&mut buf).is_ok())
    });
    assert!(
        honest,
        "{mode:?}: from its own address client-1 is answered"
    );
    assert!(
        !forged,
        "{mode:?}: from a forged address nothing comes back"
    );
    let after = multinode::dropped(
        lab,
        "node-1",
        sluice_common::DropReason::InvalidSource,
        sluice_common::METRIC_DIR_EGRESS,
    );
    assert!(after > before, "{mode:?}: dropped at the sender's node");

    let pod = SocketAddr::from((lab.pod_ip("default/client-2"), 80));
    let from_node = |lab: &TestLab, node: &str| {
        lab.in_node(node, move || {
            TcpStream::connect_timeout(&pod, Duration::from_millis(700)).is_ok()
        })
    };
    assert!(
        from_node(lab, "node-2"),
        "{mode:?}: the pod's own host passes"
    );
    assert!(!from_node(lab, "node-1"), "{mode:?}: remote-node is denied");
    // Policy judges identities: remote-node is every other node at once, so the block
    // must hold every node's own address (router addresses are not judged).
    let nodes_too = policy(
        "node-1-too",
        "default",
        &format!(
            "  podSelector:\n    matchLabels: {{app: client}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: {}}}\n",
            multinode::UNDERLAY_CIDR
        ),
    );
    lab.apply_yaml("node-1-too.yaml", &nodes_too);
    assert!(
        from_node(lab, "node-1"),
        "{mode:?}: an ipBlock admits node-1"
    );
    lab.verify_every_node("with node policies");
    lab.delete_yaml("node-1-too.yaml", &nodes_too);
    lab.delete_yaml("clients-only.yaml", &clients_only);
}

fn pods_services_and_flows(mode: Mode) {
    let mut lab = three_nodes(&format!("mn-{}", mode.as_str()), mode);
    lab.apply_yaml("workload.yaml", &workload());
    lab.verify_every_node("after the workload");
    pod_to_pod_across_nodes(&lab, mode);
    node_to_pod_both_ways(&lab, mode);
    service_from_every_node(&lab, mode);
    let took = bulk_transfer(&lab, "default/client-1", "default/client-3", BULK);
    eprintln!(
        "{mode:?}: 100 MB node-1 -> node-3 in {took:?} ({:.2} Gbit/s)",
        BULK as f64 * 8.0 / took.as_secs_f64() / 1e9
    );
    scale_under_load(&mut lab, mode);
    fragments_spoofing_and_nodes(&mut lab, mode);
    cross_node_drop_is_observed(&mut lab, mode);
    lab.verify_every_node("at the end");
}

#[test]
fn tunnel_pods_nodes_services_and_flows_across_three_nodes() {
    pods_services_and_flows(Mode::Tunnel);
}

#[test]
fn native_pods_nodes_services_and_flows_across_three_nodes() {
    pods_services_and_flows(Mode::Native);
}
