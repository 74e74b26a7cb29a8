use serde_json::json;

use super::*;

fn node(name: &str, internal_ip: Option<&str>, pod_cidr: &str) -> Node {
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

fn cluster() -> Option<Ipv4Net> {
    Some("10.244.0.0/16".parse().expect("cluster CIDR"))
}

fn three() -> Vec<Node> {
    vec![
        node("node-a", Some("172.30.0.11"), "10.244.1.0/24"),
        node("node-b", Some("172.30.0.12"), "10.244.2.0/24"),
        node("node-c", Some("172.30.0.13"), "10.244.3.0/24"),
    ]
}

fn refusal(nodes: &[Node], cluster: Option<Ipv4Net>) -> String {
    match validate_nodes(nodes, cluster) {
        Ok(()) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn three_good_nodes_pass() {
    assert_eq!(validate_nodes(&three(), cluster()), Ok(()));
    assert_eq!(validate_nodes(&three(), None), Ok(()));
}

#[test]
fn overlapping_pod_cidrs_are_refused() {
    let mut nodes = three();
    nodes.push(node("node-d", Some("172.30.0.14"), "10.244.2.128/25"));
    assert_eq!(
        refusal(&nodes, cluster()),
        "Node node-b: spec.podCIDR: 10.244.2.0/24 overlaps node node-d's spec.podCIDR 10.244.2.128/25"
    );
}

#[test]
fn a_node_without_an_internal_ip_is_refused() {
    let mut nodes = three();
    nodes[1] = node("node-b", None, "10.244.2.0/24");
    assert_eq!(
        refusal(&nodes, cluster()),
        "Node node-b: status.addresses: no IPv4 address of type InternalIP: other nodes cannot reach the node"
    );
}

#[test]
fn a_pod_cidr_that_is_not_an_ipv4_cidr_is_refused() {
    for (cidr, why) in [
        ("10.244.2.0", "not a CIDR"),
        ("10.244.2.0/33", "not a CIDR"),
        ("fd00::/64", "not an IPv4 CIDR"),
        ("10.244.2.1/24", "has host bits set"),
    ] {
        let mut nodes = three();
        nodes[1] = node("node-b", Some("172.30.0.12"), cidr);
        assert_eq!(
            refusal(&nodes, None),
            format!("Node node-b: spec.podCIDR: invalid pod CIDR {cidr:?}: {why}")
        );
    }
}

#[test]
fn a_pod_cidr_outside_the_cluster_cidr_is_refused() {
    let mut nodes = three();
    nodes[2] = node("node-c", Some("172.30.0.13"), "10.245.3.0/24");
    assert_eq!(
        refusal(&nodes, cluster()),
        "Node node-c: spec.podCIDR: 10.245.3.0/24 is outside the cluster CIDR 10.244.0.0/16"
    );
    // Without a cluster CIDR there is nothing to be outside of.
    assert_eq!(validate_nodes(&nodes, None), Ok(()));
}

#[test]
fn names_are_validated_as_the_api_server_does() {
    let mut nodes = three();
    nodes[0] = node("Node_A", Some("172.30.0.11"), "10.244.1.0/24");
    assert!(
        refusal(&nodes, None).starts_with("Node Node_A: metadata.name: invalid name \"Node_A\""),
        "{}",
        refusal(&nodes, None)
    );
    nodes[0] = node("node-b", Some("172.30.0.11"), "10.244.1.0/24");
    assert_eq!(
        refusal(&nodes, None),
        "Node node-b: metadata.name: defined 2 times"
    );
}
