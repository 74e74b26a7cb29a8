//! Issue 14 item 4, bounded memory under churn: in a three-node lab, rounds of pod,
//! Service and NetworkPolicy churn run while a client loops requests through a ClusterIP
//! that the churn leaves alone. After every round each node's kernel matches its compiler
//! output (`verify`); once the churn's objects are gone, every node's desired-state maps
//! hold exactly what they held before, and its agent holds the same pins and descriptors
//! of BPF objects: nothing leaks. The agents' RSS is sampled every round and printed (a
//! figure for the report, not an assertion). CI runs a few rounds; the long run is
//! `SLUICE_CHURN_MINUTES=30 cargo test -p sluice-integration --test churn_memory -- --nocapture`.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use sluice_common::names;
use sluice_integration::{
    TestLab,
    multinode::{Mode, NODES, pod_on, request_loop, three_nodes},
};

/// Rounds CI runs when no duration is asked for.
const CI_ROUNDS: usize = 4;

/// Maps whose content is the compiler's output alone: traffic never adds to them.
const DESIRED_MAPS: &[&str] = &[
    names::SERVICES,
    names::BACKENDS,
    names::ENDPOINTS,
    names::IPCACHE,
    names::POLICY,
    names::SOURCE_RANGES,
    names::MAGLEV,
    names::NON_MASQ_CIDRS,
];

fn steady() -> String {
    let mut yaml = String::new();
    for (pod, node, labels) in [
        ("web-2", "node-2", "app: web"),
        ("web-3", "node-3", "app: web"),
        ("client", "node-1", "app: client"),
    ] {
        yaml += &pod_on("default", pod, node, labels);
        yaml += "---\n";
    }
    yaml + "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 80}]
"
}

/// Round `round`'s objects: two pods on two nodes, a NodePort Service over them and a
/// policy that selects them.
fn churn(round: usize) -> String {
    let mut yaml = String::new();
    for (k, node) in [(0, NODES[round % 3]), (1, NODES[(round + 1) % 3])] {
        yaml += &pod_on(
            "default",
            &format!("churn-{round}-{k}"),
            node,
            &format!("churn: r{round}"),
        );
        yaml += "---\n";
    }
    yaml + &format!(
        "apiVersion: v1
kind: Service
metadata: {{name: churn-{round}}}
spec:
  type: NodePort
  selector: {{churn: r{round}}}
  ports: [{{port: 80, targetPort: 80}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: churn-{round}}}
spec:
  podSelector: {{matchLabels: {{churn: r{round}}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]
"
    )
}

/// What one node's agent holds: its desired-state map entries, pins, descriptors of BPF
/// objects (maps, programs, links), all descriptors, RSS.
#[derive(Debug, PartialEq, Eq)]
struct Holdings {
    map_entries: BTreeMap<String, u64>,
    pins: usize,
    bpf_fds: usize,
    fds: usize,
    rss_kib: u64,
}

fn files_under(dir: &Path) -> usize {
    fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    files_under(&e.path())
                } else {
                    1
                }
            })
            .sum()
    })
}

fn holdings(lab: &TestLab, node: &str) -> Holdings {
    let pid = *lab
        .agent_pids_of(node)
        .first()
        .unwrap_or_else(|| panic!("no agent for {node}"));
    let status = lab.agent(node).status().unwrap();
    let map_entries = status
        .maps
        .into_iter()
        .filter(|m| DESIRED_MAPS.contains(&m.name.as_str()))
        .map(|m| (m.name, m.entries))
        .collect();
    let rss_kib = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let fds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .collect();
    Holdings {
        map_entries,
        pins: files_under(&lab.lab.pin_dir(node)),
        bpf_fds: fds
            .iter()
            .filter(|target| target.starts_with("anon_inode:bpf"))
            .count(),
        fds: fds.len(),
        rss_kib,
    }
}

/// Holdings without the RSS and the count of all descriptors, which are figures: the API
/// connection that asked for the status may or may not be closed yet.
fn invariant(h: &Holdings) -> (BTreeMap<String, u64>, usize, usize) {
    (h.map_entries.clone(), h.pins, h.bpf_fds)
}

#[test]
fn churn_leaves_maps_pins_and_descriptors_as_they_were() {
    let minutes: Option<u64> = std::env::var("SLUICE_CHURN_MINUTES")
        .ok()
        .map(|m| m.parse().expect("SLUICE_CHURN_MINUTES: whole minutes"));
    let mut lab = three_nodes("churnmem", Mode::Tunnel);
    lab.apply_yaml("steady.yaml", &steady());
    let vip = SocketAddr::from((lab.cluster_ip("web"), 80));
    let (stop, samples, thread) = request_loop(&lab, "default/client", vip);
    let before: BTreeMap<&str, Holdings> = NODES.iter().map(|n| (*n, holdings(&lab, n))).collect();

    let started = Instant::now();
    let mut round = 0;
    let mut rss: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    while minutes.map_or(round < CI_ROUNDS, |m| {
        started.elapsed() < Duration::from_secs(m * 60)
    }) {
        lab.apply_yaml(&format!("churn-{round}.yaml"), &churn(round));
        if round > 0 {
            let previous = round - 1;
            lab.delete_yaml(&format!("churn-{previous}.yaml"), &churn(previous));
        }
        lab.verify_every_node(&format!("churn round {round}"));
        for node in NODES {
            rss.entry(node)
                .or_default()
                .push(holdings(&lab, node).rss_kib);
        }
        round += 1;
    }
    lab.delete_yaml(&format!("churn-{}.yaml", round - 1), &churn(round - 1));
    lab.verify_every_node("after the churn");

    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
    let samples = samples.lock().unwrap();
    let failed: Vec<&String> = samples
        .iter()
        .filter_map(|s| s.answer.as_ref().err())
        .collect();

    println!(
        "{round} rounds in {:.0} s, {} requests through the steady ClusterIP, {} failed",
        started.elapsed().as_secs_f64(),
        samples.len(),
        failed.len()
    );
    let mut wrong = Vec::new();
    for node in NODES {
        let after = holdings(&lab, node);
        let first = &before[node];
        let series = &rss[node];
        println!(
            "{node}: RSS {} KiB before, {:?} KiB per round, {} KiB after; pins {} / {}; BPF fds {} / {}; fds {} / {}; map entries {:?}",
            first.rss_kib,
            series,
            after.rss_kib,
            first.pins,
            after.pins,
            first.bpf_fds,
            after.bpf_fds,
            first.fds,
            after.fds,
            after.map_entries
        );
        if invariant(first) != invariant(&after) {
            wrong.push(format!("{node}: before {first:?}, after {after:?}"));
        }
    }
    assert!(
        failed.is_empty(),
        "requests failed during churn: {failed:?}"
    );
    assert!(
        wrong.is_empty(),
        "the churn left something behind:\n{}",
        wrong.join("\n")
    );
}
