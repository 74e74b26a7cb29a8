//! Nodes of a running multi-node lab (issue 10): a node added and removed while traffic
//! flows between the others, bad nodes refused with nothing changed, and path-MTU discovery
//! over an underlay lowered under the running lab.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use sluice_integration::{
    TestLab, http_get,
    multinode::{self, Mode, NODES, bulk_transfer, lab_yaml, pod_on, request_loop},
};

/// Lowers the MTU of every underlay link (each node's `underlay0`, the underlay bridge and
/// its ports) to `underlay`, and each node's tunnel device to `underlay` − 50.
fn lower_underlay_mtu(lab: &TestLab, underlay: u32) {
    let bridge_side = sluice_netns::NetNs::named(lab.lab.underlay_netns());
    let links = bridge_side.netlink().unwrap();
    for link in links.links().unwrap() {
        if link.name != "lo" {
            links.set_mtu(&link.name, underlay).unwrap();
        }
    }
    for node in lab.lab.nodes() {
        let links = sluice_netns::NetNs::named(lab.lab.node_netns(&node))
            .netlink()
            .unwrap();
        links.set_mtu("underlay0", underlay).unwrap();
        links.set_mtu("sluice_vxlan", underlay - 50).unwrap();
    }
}

/// Path MTU: a lab whose underlay carries 1,400 bytes moves a TCP transfer (DF, as Linux
/// TCP sends) intact; then the underlay shrinks under the running lab, the pods keep their
/// larger MTU, and a new transfer still completes because the sender's node answers the
/// DF packets that no longer fit with ICMP fragmentation needed.
#[test]
fn tunnel_path_mtu_discovery_over_a_lowered_underlay() {
    let mut lab = TestLab::up("mn-pmtu", &lab_yaml(Mode::Tunnel, 3, 1400));
    let mut yaml = pod_on("default", "client-1", "node-1", "app: client");
    yaml += "---\n";
    yaml += &pod_on("default", "client-2", "node-2", "app: client");
    lab.apply_yaml("pods.yaml", &yaml);
    let took = bulk_transfer(&lab, "default/client-1", "default/client-2", 8 << 20);
    eprintln!("8 MiB over a 1,400-byte underlay in {took:?}");

    lower_underlay_mtu(&lab, 1300);
    let before = multinode::dropped(
        &lab,
        "node-1",
        sluice_common::DropReason::FragNeeded,
        sluice_common::METRIC_DIR_EGRESS,
    );
    let took = bulk_transfer(&lab, "default/client-1", "default/client-2", 8 << 20);
    let frag_needed = multinode::dropped(
        &lab,
        "node-1",
        sluice_common::DropReason::FragNeeded,
        sluice_common::METRIC_DIR_EGRESS,
    ) - before;
    eprintln!(
        "8 MiB after the underlay shrank to 1,300 in {took:?}; {frag_needed} packets answered with fragmentation needed"
    );
    assert!(frag_needed > 0, "path-MTU discovery was exercised");
}

fn node_spec(name: &str, pod_cidr: &str) -> sluice_lab::NodeSpec {
    serde_json::from_value(serde_json::json!({"name": name, "podCidr": pod_cidr})).unwrap()
}

/// Whether `node`'s ipcache holds exactly `address/prefix` (a lookup would find the
/// longest prefix holding it, 0.0.0.0/0 at worst).
fn in_ipcache(lab: &TestLab, node: &str, address: Ipv4Addr, prefix: u32) -> bool {
    let maps = sluice_datapath::PinnedMaps::open(&lab.lab.pin_dir(node)).unwrap();
    let want = sluice_common::addr_be(address);
    maps.ipcache
        .keys()
        .map(Result::unwrap)
        .any(|key| key.prefix_len() == prefix && key.data() == want)
}

/// A third node joins and leaves while node-1's pod loops requests to node-2's: no request
/// fails; the new node's pods are reached while it is there, and when it goes every other
/// node forgets it (ipcache). Bad nodes are refused and change nothing.
fn nodes_come_and_go(mode: Mode) {
    let mut lab = TestLab::up(
        &format!("mn-churn-{}", mode.as_str()),
        &lab_yaml(mode, 2, 1500),
    );
    let mut yaml = pod_on("default", "client-1", "node-1", "app: client");
    yaml += "---\n";
    yaml += &pod_on("default", "web-2", "node-2", "app: web");
    lab.apply_yaml("pods.yaml", &yaml);
    let addr = SocketAddr::from((lab.pod_ip("default/web-2"), 80));
    let (stop, samples, thread) = request_loop(&lab, "default/client-1", addr);
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    lab.lab
        .add_node(node_spec("node-3", "10.244.3.0/24"))
        .unwrap();
    eprintln!("{mode:?}: node-3 added in {:?}", started.elapsed());
    lab.apply_yaml(
        "web-3.yaml",
        &pod_on("default", "web-3", "node-3", "app: web"),
    );
    let to_new = SocketAddr::from((lab.pod_ip("default/web-3"), 80));
    for from in ["default/client-1", "default/web-2"] {
        let answer = lab.in_pod(from, move || http_get(to_new));
        assert_eq!(
            answer.unwrap(),
            "web-3",
            "{mode:?}: {from} reaches node-3's pod"
        );
    }
    lab.verify_every_node("with node-3");
    let node3 = multinode::underlay_address(2);
    assert!(in_ipcache(&lab, "node-1", node3, 32));

    lab.delete_yaml(
        "web-3.yaml",
        &pod_on("default", "web-3", "node-3", "app: web"),
    );
    let started = Instant::now();
    lab.lab.remove_node("node-3").unwrap();
    eprintln!("{mode:?}: node-3 removed in {:?}", started.elapsed());
    assert_eq!(lab.lab.nodes(), NODES[..2]);
    for node in ["node-1", "node-2"] {
        assert!(!in_ipcache(&lab, node, node3, 32), "{node} forgot node-3");
        assert!(
            !in_ipcache(&lab, node, Ipv4Addr::new(10, 244, 3, 0), 24),
            "{node} forgot node-3's pod CIDR"
        );
    }
    lab.verify_every_node("after node-3 left");

    // Bad nodes: an overlapping pod CIDR, one outside the cluster CIDR. Nothing changes.
    let generation = lab.agent("node-1").status().unwrap().realized_generation;
    for (spec, field) in [
        (node_spec("node-4", "10.244.2.0/24"), "podCIDR"),
        (node_spec("node-4", "10.99.0.0/24"), "podCIDR"),
    ] {
        let err = lab.lab.add_node(spec).expect_err("a bad node").to_string();
        eprintln!("{mode:?}: refused: {err}");
        assert!(err.contains("node-4") && err.contains(field), "{err}");
    }
    assert_eq!(lab.lab.nodes(), NODES[..2], "no node was added");
    assert_eq!(
        lab.agent("node-1").status().unwrap().realized_generation,
        generation,
        "the dataplane did not change"
    );

    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
    let samples = samples.lock().unwrap();
    let failed: Vec<&String> = samples
        .iter()
        .filter_map(|s| s.answer.as_ref().err())
        .collect();
    eprintln!(
        "{mode:?}: {} requests node-1 -> node-2 while node-3 came and went, {} failed",
        samples.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{mode:?}: failed requests: {failed:?}");
}

#[test]
fn tunnel_nodes_come_and_go_while_traffic_flows() {
    nodes_come_and_go(Mode::Tunnel);
}

#[test]
fn native_nodes_come_and_go_while_traffic_flows() {
    nodes_come_and_go(Mode::Native);
}

/// A lab file whose nodes overlap is refused before anything is made.
#[test]
fn a_lab_with_overlapping_pod_cidrs_is_refused_and_makes_nothing() {
    let yaml = lab_yaml(Mode::Tunnel, 2, 1500).replace("10.244.2.0/24", "10.244.1.128/25");
    let Err(failed) = TestLab::try_up("mn-overlap", &yaml) else {
        panic!("a lab with overlapping pod CIDRs came up");
    };
    let err = failed.error.to_string();
    eprintln!("refused: {err}");
    // The lab file's second node, by name or by its place in the file.
    assert!(
        (err.contains("node-2") || err.contains("nodes[1]")) && err.contains("podCIDR"),
        "{err}"
    );
    let left = sluice_netns::NetNs::list_with_prefix(&format!("sluice-{}", failed.name));
    assert!(left.is_empty(), "namespaces were made: {left:?}");
}
