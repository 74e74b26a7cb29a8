//! Flows and verify across the nodes of a lab, from one place (like Hubble Relay): `observe`
//! merges every node's agent in time order, each flow tagged with its node; `verify` checks
//! every node and names the one whose maps were changed behind its agent's back.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failed step must fail the test loudly"
)]

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use sluice_integration::{TestLab, http_get};

const TWO_NODE_LAB: &str = "apiVersion: sluice.dev/v1alpha1
kind: Lab
serviceCIDR: 10.96.0.0/16
txChecksumOffload: false
nodes:
  - name: node-1
    podCIDR: 10.244.1.0/24
  - name: node-2
    podCIDR: 10.244.2.0/24
";

/// A client and a server on each node; each client talks to the server of its own node,
/// so every flow is seen on exactly one node.
fn pods_yaml() -> String {
    let mut out = String::new();
    for node in ["1", "2"] {
        for role in ["client", "server"] {
            out += &format!(
                "apiVersion: v1
kind: Pod
metadata:
  name: {role}-{node}
  labels: {{app: {role}}}
spec:
  nodeName: node-{node}
  containers:
  - name: c
    image: agnhost
    ports:
    - {{containerPort: 80, protocol: TCP}}
---
"
            );
        }
    }
    out
}

fn two_nodes(prefix: &str) -> TestLab {
    let mut lab = TestLab::up(prefix, TWO_NODE_LAB);
    lab.apply_yaml("pods.yaml", &pods_yaml());
    for node in ["1", "2"] {
        let pod = lab
            .lab
            .pods()
            .into_iter()
            .find(|p| p.name == format!("server-{node}"))
            .unwrap();
        assert_eq!(pod.node, format!("node-{node}"), "spec.nodeName is kept");
    }
    lab
}

/// `sluice observe ... -o json`: each line's flow.
fn observe(lab: &TestLab, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["observe", "-o", "json"];
    all.extend(args);
    lab.cli(&all)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["flow"].clone())
        .collect()
}

fn node_of(flow: &serde_json::Value) -> &str {
    flow["node_name"].as_str().unwrap()
}

fn time_of(flow: &serde_json::Value) -> &str {
    // RFC 3339 with nanoseconds, always the same width: text order is time order.
    flow["time"].as_str().unwrap()
}

/// The pod a flow names on its local side.
fn pods_of(flow: &serde_json::Value) -> Vec<&str> {
    ["source", "destination"]
        .iter()
        .filter_map(|side| flow[side]["pod_name"].as_str())
        .collect()
}

#[test]
fn observe_merges_the_flows_of_every_node_in_time_order() {
    let lab = two_nodes("relayobs");
    let server = |n: &str| SocketAddr::from((lab.pod_ip(&format!("default/server-{n}")), 80));
    // Alternate between the nodes, so their flows interleave in time.
    for round in 0..3 {
        for n in ["1", "2"] {
            let to = server(n);
            let answer = lab.in_pod(&format!("default/client-{n}"), move || http_get(to));
            assert_eq!(answer.unwrap(), format!("server-{n}"), "round {round}");
        }
    }
    // Flows reach the buffer within the reader's 100 ms drain.
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    let all = observe(&lab, &["--last", "1000"]);
    let merged_in = started.elapsed();
    let started = Instant::now();
    let one_node = observe(&lab, &["--last", "1000", "--node", "node-1"]);
    eprintln!(
        "observe --last 1000: {} flows of 2 nodes merged in {merged_in:?} (the CLI process \
         included); {} flows of one node in {:?}",
        all.len(),
        one_node.len(),
        started.elapsed()
    );
    let nodes: Vec<&str> = all.iter().map(node_of).collect();
    assert!(
        nodes.contains(&"node-1") && nodes.contains(&"node-2"),
        "flows of both nodes: {nodes:?}"
    );
    let times: Vec<&str> = all.iter().map(time_of).collect();
    assert!(times.is_sorted(), "merged in time order: {times:?}");
    for flow in &all {
        let node = node_of(flow);
        let suffix = &node[node.len() - 1..];
        for pod in pods_of(flow) {
            assert!(pod.ends_with(suffix), "{pod} seen on {node}: {flow}");
        }
    }
    // The nodes' flows interleave: node-1, node-2, node-1 again somewhere in the list.
    let switches = nodes.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches >= 2, "interleaved by time: {nodes:?}");

    // Pods keep sending IPv6 router solicitations (dropped, 139); the TCP flows are done.
    let tcp = observe(&lab, &["--last", "1000", "--protocol", "tcp"]);
    let tcp_nodes: Vec<&str> = tcp.iter().map(node_of).collect();
    // Per connection: SYN from and to the endpoint, close on both sides.
    assert_eq!(tcp.len(), 6 * 4, "{tcp_nodes:?}");
    // --last N: the N newest across both nodes, not N per node.
    let last = observe(&lab, &["--last", "3", "--protocol", "tcp"]);
    assert!(
        last == tcp[tcp.len() - 3..],
        "the newest 3 of {tcp_nodes:?}"
    );

    // --node picks one node's agent; filters apply on every agent.
    let one = observe(&lab, &["--last", "1000", "--node", "node-2"]);
    assert!(!one.is_empty() && one.iter().all(|f| node_of(f) == "node-2"));
    let to_server_1 = observe(&lab, &["--last", "1000", "--to-pod", "default/server-1"]);
    assert!(!to_server_1.is_empty() && to_server_1.iter().all(|f| node_of(f) == "node-1"));

    // The compact line names the node when several are merged.
    let table = lab.cli(&["observe", "--last", "1000"]);
    assert!(
        table.contains("[node-1]: ") && table.contains("[node-2]: "),
        "{table}"
    );

    // --agents: the same merge from a list of sockets; a dead one is reported, the rest
    // still come; none reachable is exit 2.
    let sockets = format!(
        "{},{}",
        lab.lab.agent_socket("node-1").display(),
        lab.lab.agent_socket("node-2").display()
    );
    let merged = observe(
        &lab,
        &["--last", "1000", "--protocol", "tcp", "--agents", &sockets],
    );
    assert!(merged == tcp, "--agents merges as the lab does");
    let dead = "/nonexistent/agent.sock";
    let with_dead = format!("{},{dead}", lab.lab.agent_socket("node-2").display());
    let out = lab.cli_output(&["observe", "--last", "1000", "--agents", &with_dead]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(dead));
    assert!(String::from_utf8_lossy(&out.stdout).contains("server-2"));
    let none = lab.cli_output(&["observe", "--agents", dead]);
    assert_eq!(none.status.code(), Some(2), "{none:?}");
}

/// A spawned `sluice observe --follow`, killed when dropped (also when the test fails).
struct Follower {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl Follower {
    fn start(lab: &TestLab, args: &[&str]) -> Self {
        let mut all = vec!["observe", "--follow", "-o", "json"];
        all.extend(args);
        let mut child = lab
            .cli_command(&all)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let flow =
                    serde_json::from_str::<serde_json::Value>(&line).unwrap()["flow"].clone();
                if sender.send(flow).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// The next `n` flows, each within 5 s.
    fn take(&self, n: usize) -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| {
                self.lines
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("flow {i} of {n}: {e}"))
            })
            .collect()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--follow --last N`: the N newest buffered flows of both nodes first, then new flows of
/// both nodes as they come, none twice.
#[test]
fn follow_merges_buffered_then_live_flows_of_every_node() {
    let lab = two_nodes("relayfollow");
    let server = |n: &str| SocketAddr::from((lab.pod_ip(&format!("default/server-{n}")), 80));
    let connect = |n: &str| {
        let to = server(n);
        let answer = lab.in_pod(&format!("default/client-{n}"), move || http_get(to));
        assert_eq!(answer.unwrap(), format!("server-{n}"));
    };
    connect("1");
    connect("2");
    std::thread::sleep(Duration::from_millis(300));
    let buffered = observe(&lab, &["--last", "1000", "--protocol", "tcp"]);
    assert_eq!(buffered.len(), 8);

    let follower = Follower::start(&lab, &["--last", "3", "--protocol", "tcp"]);
    assert!(follower.take(3) == buffered[5..], "the newest 3 first");
    connect("2");
    connect("1");
    let live = follower.take(8);
    let nodes: Vec<&str> = live.iter().map(node_of).collect();
    assert_eq!(
        nodes.iter().filter(|n| **n == "node-2").count(),
        4,
        "{nodes:?}"
    );
    assert_eq!(
        nodes.iter().filter(|n| **n == "node-1").count(),
        4,
        "{nodes:?}"
    );
    assert!(
        live.iter().all(|f| !buffered.contains(f)),
        "no buffered flow comes again"
    );
    assert!(
        follower
            .lines
            .recv_timeout(Duration::from_millis(500))
            .is_err(),
        "nothing more: each live flow came once"
    );
}

#[test]
fn verify_checks_every_node_and_names_the_one_that_drifts() {
    let lab = two_nodes("relayverify");
    let clean = lab.cli(&["verify"]);
    assert!(
        clean.contains("node node-1: generation")
            && clean.contains("node node-2: generation")
            && clean.matches("every map matches").count() == 2,
        "{clean}"
    );

    // An ipcache entry the compiler never asked for, on node-2 only. The periodic
    // reconcile (every 2 s) removes it, so write it again if it won that race.
    let forged = Ipv4Addr::new(192, 0, 2, 77);
    let mut maps = sluice_datapath::PinnedMaps::open(&lab.lab.pin_dir("node-2")).unwrap();
    let mut attempts = 0;
    let (out, reports) = loop {
        attempts += 1;
        maps.ipcache
            .insert(
                &aya::maps::lpm_trie::Key::new(32, sluice_common::addr_be(forged)),
                sluice_common::IpcacheEntry::local(sluice_common::IDENTITY_WORLD),
                0,
            )
            .unwrap();
        let out = lab.cli_output(&["verify"]);
        let reports = lab.cli_output(&["verify", "-o", "json"]);
        if out.status.code() == Some(1) && reports.status.code() == Some(1) || attempts == 5 {
            break (out, reports);
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("drift on: node-2"), "{stderr}");
    assert!(
        stdout.contains("node node-1: generation") && stdout.contains("every map matches"),
        "{stdout}"
    );
    assert!(stdout.contains(&forged.to_string()), "{stdout}");

    let reports: serde_json::Value = serde_json::from_slice(&reports.stdout).unwrap();
    let reports = reports.as_array().unwrap();
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0]["node"], "node-1");
    assert!(reports[0]["report"]["drift"].as_array().unwrap().is_empty());
    assert_eq!(reports[1]["node"], "node-2");
    let drift = reports[1]["report"]["drift"].as_array().unwrap();
    assert!(
        drift
            .iter()
            .any(|d| d["map"] == sluice_common::names::IPCACHE
                && d["key"].as_str().unwrap().contains(&forged.to_string())),
        "{drift:?}"
    );

    // --node limits it to one node: node-1 alone is clean.
    let one = lab.cli_output(&["verify", "--node", "node-1"]);
    assert!(one.status.success(), "{one:?}");
    // Other commands take --node too, and a node the lab lacks is named.
    assert_eq!(
        lab.cli_json(&["status", "--node", "node-2"])["node"],
        "node-2"
    );
    let bad = lab.cli_output(&["status", "--node", "node-9"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("node-9"));
    // endpoint get of a pod goes to the pod's own node without --node.
    let ep = lab.cli_json(&["endpoint", "get", "default/server-2"]);
    assert_eq!(ep["pod"], "server-2");
}
