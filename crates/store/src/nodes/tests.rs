use serde_json::json;

use super::*;

fn node(name: &str, internal_ip: Option<&str>, pod_cidr: Option<&str>) -> Node {
    let addresses: Vec<_> = internal_ip
        .map(|a| json!({"type": "InternalIP", "address": a}))
        .into_iter()
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"podCIDR": pod_cidr},
        "status": {"addresses": addresses},
    }))
    .expect("node decodes")
}

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("test CIDR")
}

fn lines(checked: &CheckedNodes) -> Vec<String> {
    checked.faults.iter().map(ToString::to_string).collect()
}

#[test]
fn good_nodes_are_kept_sorted_with_their_router() {
    let nodes = [
        node("b", Some("172.30.0.12"), Some("10.244.2.0/24")),
        node("a", Some("172.30.0.11"), Some("10.244.1.0/24")),
        node("c", Some("172.30.0.13"), None),
    ];
    let checked = check_nodes(&nodes, Some(net("10.244.0.0/16")));
    assert_eq!(lines(&checked), Vec::<String>::new());
    let names: Vec<_> = checked.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(
        checked.nodes[0].router(),
        Some(Ipv4Addr::new(10, 244, 1, 1))
    );
    assert_eq!(checked.nodes[1].internal_ip, Ipv4Addr::new(172, 30, 0, 12));
    assert_eq!(checked.nodes[2].router(), None);
}

#[test]
fn only_an_ipv4_internal_ip_counts() {
    let mut external: Node = node("x", None, None);
    external.status = serde_json::from_value(json!({"addresses": [
        {"type": "ExternalIP", "address": "203.0.113.1"},
        {"type": "InternalIP", "address": "fd00::1"},
        {"type": "Hostname", "address": "x"},
    ]}))
    .expect("status decodes");
    let checked = check_nodes(&[external], None);
    assert!(checked.nodes.is_empty());
    assert_eq!(
        lines(&checked),
        [
            "Node x: status.addresses: no IPv4 address of type InternalIP: other nodes cannot reach the node"
        ]
    );
}

#[test]
fn every_bad_pod_cidr_is_named() {
    let cases = [
        (
            "10.244.1/24",
            "invalid pod CIDR \"10.244.1/24\": not a CIDR",
        ),
        (
            "fd00:1::/64",
            "invalid pod CIDR \"fd00:1::/64\": not an IPv4 CIDR",
        ),
        (
            "10.244.1.5/24",
            "invalid pod CIDR \"10.244.1.5/24\": has host bits set",
        ),
        (
            "10.244.1.0/31",
            "invalid pod CIDR \"10.244.1.0/31\": longer than /30, no room for a router and a pod",
        ),
        (
            "10.245.1.0/24",
            "10.245.1.0/24 is outside the cluster CIDR 10.244.0.0/16",
        ),
    ];
    for (cidr, message) in cases {
        let checked = check_nodes(
            &[node("n", Some("172.30.0.11"), Some(cidr))],
            Some(net("10.244.0.0/16")),
        );
        assert!(checked.nodes.is_empty(), "{cidr} kept");
        assert_eq!(
            lines(&checked),
            [format!("Node n: spec.podCIDR: {message}")]
        );
    }
}

#[test]
fn overlapping_nodes_are_both_left_out_whatever_the_order() {
    let mut nodes = vec![
        node("a", Some("172.30.0.11"), Some("10.244.0.0/23")),
        node("b", Some("172.30.0.12"), Some("10.244.1.0/24")),
        node("c", Some("172.30.0.13"), Some("10.244.2.0/24")),
        node("d", Some("172.30.0.14"), Some("10.244.2.0/24")),
        node("e", Some("172.30.0.15"), Some("10.244.3.0/24")),
    ];
    let expected = [
        "Node a: spec.podCIDR: 10.244.0.0/23 overlaps node b's spec.podCIDR 10.244.1.0/24",
        "Node b: spec.podCIDR: 10.244.1.0/24 overlaps node a's spec.podCIDR 10.244.0.0/23",
        "Node c: spec.podCIDR: 10.244.2.0/24 overlaps node d's spec.podCIDR 10.244.2.0/24",
        "Node d: spec.podCIDR: 10.244.2.0/24 overlaps node c's spec.podCIDR 10.244.2.0/24",
    ];
    for _ in 0..2 {
        let checked = check_nodes(&nodes, None);
        assert_eq!(lines(&checked), expected);
        let kept: Vec<_> = checked.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(kept, ["e"]);
        nodes.reverse();
    }
}

#[test]
fn names_must_be_present_and_unique() {
    let nodes = [
        node("", Some("172.30.0.11"), None),
        node("a", Some("172.30.0.12"), None),
        node("a", Some("172.30.0.13"), None),
    ];
    let checked = check_nodes(&nodes, None);
    assert!(checked.nodes.is_empty());
    assert_eq!(
        lines(&checked),
        [
            "Node: metadata.name: is required",
            "Node a: metadata.name: defined 2 times"
        ]
    );
}
