use super::*;

fn parse(text: &str) -> Result<LabSpec, String> {
    LabSpec::parse(Path::new("lab.yaml"), text).map_err(|e| e.to_string())
}

const HEAD: &str = "apiVersion: sluice.dev/v1alpha1\nkind: Lab\n";

#[test]
fn parses_the_example_with_defaults() {
    let spec = parse(&format!(
        "{HEAD}nodes:\n  - name: node-1\n    podCIDR: 10.244.1.0/24\n  - name: node-2\n    podCIDR: 10.244.2.0/24\n"
    ))
    .unwrap();
    assert_eq!(spec.service_cidr.to_string(), "10.96.0.0/16");
    assert!(spec.tx_checksum_offload);
    assert_eq!(spec.nodes.len(), 2);
    assert_eq!(spec.nodes[1].router_ip(), Ipv4Addr::new(10, 244, 2, 1));
}

#[test]
fn observability_is_off_unless_asked_for() {
    let nodes = "nodes: [{name: a, podCIDR: 10.244.1.0/24}]\n";
    let spec = parse(&format!("{HEAD}{nodes}")).unwrap();
    assert_eq!(spec.observability, Observability::default());
    let spec = parse(&format!(
        "{HEAD}{nodes}observability: {{metrics: true, policyLog: deny, policyLogRate: 50}}\n"
    ))
    .unwrap();
    assert!(spec.observability.metrics);
    assert_eq!(spec.observability.policy_log.as_deref(), Some("deny"));
    assert_eq!(spec.observability.policy_log_rate, Some(50));
    let bad = parse(&format!(
        "{HEAD}{nodes}observability: {{policyLog: some}}\n"
    ))
    .unwrap_err();
    assert!(bad.contains("observability.policyLog"), "{bad}");
    let unknown = parse(&format!("{HEAD}{nodes}observability: {{tracing: true}}\n"));
    assert!(unknown.is_err());
}

#[test]
fn world_hosts_default_to_the_first_node_and_tcp() {
    let spec = parse(&format!(
        "{HEAD}nodes: [{{name: a, podCIDR: 10.244.1.0/24}}, {{name: b, podCIDR: 10.244.2.0/24}}]\nworld:\n  - name: internet\n    address: 203.0.113.10\n    ports: [{{port: 80}}, {{port: 53, protocol: UDP}}]\n  - {{name: partner, address: 198.51.100.7, node: b}}\n"
    ))
    .unwrap();
    assert_eq!(spec.world.len(), 2);
    let internet = spec.world_host("internet").unwrap();
    assert_eq!(internet.address, Ipv4Addr::new(203, 0, 113, 10));
    assert_eq!(internet.attach, WorldAttach::Node("a".into()));
    assert_eq!(internet.ports(), (vec![80], vec![53]));
    assert_eq!(spec.world[1].attach, WorldAttach::Node("b".into()));
    assert!(spec.world[1].ports.is_empty());
}

#[test]
fn world_host_errors_name_the_field() {
    let nodes = "nodes: [{name: a, podCIDR: 10.244.1.0/24}]\n";
    let cases = [
        ("world: [{address: 1.2.3.4}]", "world[0].name: required"),
        ("world: [{name: w}]", "world[0].address: required"),
        (
            "world: [{name: w, address: x}]",
            "world[0].address: \"x\" is not",
        ),
        (
            "world: [{name: w, address: 10.244.1.9}]",
            "world[0].address: 10.244.1.9 is in podCIDR",
        ),
        (
            "world: [{name: w, address: 10.96.0.1}]",
            "world[0].address: 10.96.0.1 is in serviceCIDR",
        ),
        (
            "world: [{name: w, address: 1.2.3.4}, {name: w, address: 1.2.3.5}]",
            "world[1].name: duplicate world host name",
        ),
        (
            "world: [{name: v, address: 1.2.3.4}, {name: w, address: 1.2.3.4}]",
            "world[1].address: 1.2.3.4 is also the address of world[0]",
        ),
        (
            "world: [{name: w, address: 1.2.3.4, node: z}]",
            "world[0].node: \"z\" is not a node",
        ),
        (
            "world: [{name: w, address: 1.2.3.4, ports: [{port: 0}]}]",
            "world[0].ports[0].port: 0 is not a port",
        ),
        (
            "world: [{name: w, address: 1.2.3.4, ports: [{port: 9, protocol: SCTP}]}]",
            "world[0].ports[0].protocol: must be TCP or UDP",
        ),
        (
            "world: [{name: w, address: 1.2.3.4, ports: [{port: 9}, {port: 9, protocol: TCP}]}]",
            "world[0].ports[1].port: duplicate port 9/TCP",
        ),
    ];
    for (world, expected) in cases {
        let text = format!("{HEAD}{nodes}{world}\n");
        let err = parse(&text).expect_err(world);
        assert!(
            err.starts_with(&format!("lab.yaml: {expected}")),
            "{world}\n  got: {err}\n want: {expected}"
        );
    }
}

#[test]
fn errors_name_the_field() {
    let cases = [
        ("kind: Lab\nnodes: []\n", "lab.yaml: apiVersion: required"),
        (
            "apiVersion: v1\nkind: Lab\n",
            "lab.yaml: apiVersion: must be \"sluice.dev/v1alpha1\"",
        ),
        (
            "apiVersion: sluice.dev/v1alpha1\nkind: Cluster\n",
            "lab.yaml: kind: must be \"Lab\"",
        ),
        (
            &format!("{HEAD}nodes: []\n"),
            "lab.yaml: nodes: at least one node",
        ),
        (
            &format!(
                "{HEAD}serviceCIDR: 10.96.0.0/33\nnodes: [{{name: a, podCIDR: 10.244.1.0/24}}]\n"
            ),
            "lab.yaml: serviceCIDR: \"10.96.0.0/33\" is not an IPv4 CIDR",
        ),
        (
            &format!("{HEAD}nodes: [{{name: a, podCIDR: 10.244.1.7/24}}]\n"),
            "lab.yaml: nodes[0].podCIDR: 10.244.1.7/24 has host bits set; the network is 10.244.1.0/24",
        ),
        (
            &format!("{HEAD}nodes: [{{name: a, podCIDR: 10.244.1.0/31}}]\n"),
            "lab.yaml: nodes[0].podCIDR: 10.244.1.0/31 is too small",
        ),
        (
            &format!(
                "{HEAD}nodes: [{{name: a, podCIDR: 10.244.0.0/16}}, {{name: b, podCIDR: 10.244.2.0/24}}]\n"
            ),
            "lab.yaml: nodes[1].podCIDR: 10.244.2.0/24 overlaps nodes[0].podCIDR 10.244.0.0/16",
        ),
        (
            &format!("{HEAD}nodes: [{{name: a, podCIDR: 10.96.1.0/24}}]\n"),
            "lab.yaml: nodes[0].podCIDR: 10.96.1.0/24 overlaps serviceCIDR 10.96.0.0/16",
        ),
        (
            &format!(
                "{HEAD}nodes: [{{name: a, podCIDR: 10.244.1.0/24}}, {{name: a, podCIDR: 10.244.2.0/24}}]\n"
            ),
            "lab.yaml: nodes[1].name: duplicate node name \"a\" (also nodes[0])",
        ),
        (
            &format!("{HEAD}nodes: [{{name: Node_1, podCIDR: 10.244.1.0/24}}]\n"),
            "lab.yaml: nodes[0].name: ",
        ),
        (
            &format!("{HEAD}nodes: [{{podCIDR: 10.244.1.0/24}}]\n"),
            "lab.yaml: nodes[0].name: required",
        ),
        (
            &format!("{HEAD}nodes: [{{name: a}}]\n"),
            "lab.yaml: nodes[0].podCIDR: required",
        ),
        (
            &format!("{HEAD}extra: 1\nnodes: []\n"),
            "lab.yaml: extra: unknown field `extra`",
        ),
        // A value of the wrong shape is refused naming its field (found by sluice-fuzz).
        (
            &format!("{HEAD}nodes: [{{name: a, podCIDR: 10.244.1.0/24, zone: [a]}}]\n"),
            "lab.yaml: nodes[0].zone: invalid type: sequence",
        ),
        (
            &format!("{HEAD}nodes: 53\n"),
            "lab.yaml: nodes: invalid type",
        ),
        (&format!("{HEAD}: [\n"), "lab.yaml: (document): "),
    ];
    for (text, expected) in cases {
        let err = parse(text).expect_err(text);
        assert!(
            err.starts_with(expected),
            "{text:?}\n  got: {err}\n want: {expected}"
        );
    }
}

#[test]
fn one_node_runs_local_and_several_are_joined_by_a_tunnel_underlay() {
    let one = parse(&format!(
        "{HEAD}nodes: [{{name: a, podCIDR: 10.244.1.0/24}}]\n"
    ))
    .unwrap();
    assert_eq!(one.routing_mode, RoutingMode::Local);
    assert_eq!(one.underlay, None);
    assert_eq!(one.nodes[0].underlay_address, None);
    assert_eq!(one.nodes[0].internal_ip(), Ipv4Addr::new(10, 244, 1, 1));
    assert_eq!(one.pod_mtu(), None);
    assert_eq!(one.cluster_cidr.to_string(), "10.244.0.0/16");

    let three = parse(&format!(
        "{HEAD}nodes: [{{name: a, podCIDR: 10.244.1.0/24}}, {{name: b, podCIDR: 10.244.2.0/24, underlayAddress: 172.30.0.50}}, {{name: c, podCIDR: 10.244.3.0/24}}]\n"
    ))
    .unwrap();
    assert_eq!(three.routing_mode, RoutingMode::Tunnel);
    assert_eq!(
        three.underlay,
        Some(UnderlaySpec {
            cidr: DEFAULT_UNDERLAY_CIDR,
            mtu: 1500
        })
    );
    let addresses: Vec<_> = three.nodes.iter().map(NodeSpec::internal_ip).collect();
    assert_eq!(
        addresses,
        [
            Ipv4Addr::new(172, 30, 0, 11),
            Ipv4Addr::new(172, 30, 0, 50),
            Ipv4Addr::new(172, 30, 0, 13)
        ]
    );
    assert_eq!(three.pod_mtu(), Some(1450));

    let native = parse(&format!(
        "{HEAD}routingMode: native\nunderlay: {{cidr: 192.168.50.0/24, mtu: 9000}}\nclusterCIDR: 10.240.0.0/12\nnodes: [{{name: a, podCIDR: 10.244.1.0/24}}]\nworld: [{{name: w, address: 192.168.50.200, attach: underlay}}]\n"
    ))
    .unwrap();
    assert_eq!(native.routing_mode, RoutingMode::Native);
    assert_eq!(native.pod_mtu(), Some(9000));
    assert_eq!(
        native.nodes[0].underlay_address,
        Some(Ipv4Addr::new(192, 168, 50, 11))
    );
    assert_eq!(native.world[0].attach, WorldAttach::Underlay);
}

#[test]
fn bad_nodes_and_underlays_are_refused_naming_the_field() {
    let two = "nodes: [{name: a, podCIDR: 10.244.1.0/24}, {name: b, podCIDR: 10.244.2.0/24}]";
    let cases = [
        (
            format!("clusterCIDR: 10.244.0.0/24\n{two}"),
            "nodes[0].podCIDR: 10.244.1.0/24 is outside clusterCIDR 10.244.0.0/24",
        ),
        (
            format!("routingMode: vxlan\n{two}"),
            "routingMode: must be tunnel or native (got \"vxlan\")",
        ),
        (
            format!("routingMode: local\n{two}"),
            "routingMode: must be tunnel or native",
        ),
        (
            format!("underlay: {{cidr: 172.30.0.0/29}}\n{two}"),
            "underlay.cidr: 172.30.0.0/29 is too small for 2 nodes",
        ),
        (
            format!("underlay: {{cidr: 10.244.2.0/24}}\n{two}"),
            "underlay.cidr: 10.244.2.0/24 overlaps clusterCIDR 10.244.0.0/16",
        ),
        (
            format!("underlay: {{mtu: 500}}\n{two}"),
            "underlay.mtu: 500 is outside 626-65535",
        ),
        (
            "nodes: [{name: a, podCIDR: 10.244.1.0/24}, {name: b, podCIDR: 10.244.2.0/24, underlayAddress: 172.30.0.11}]".into(),
            "nodes[1].underlayAddress: 172.30.0.11 is also nodes[0].underlayAddress",
        ),
        (
            "nodes: [{name: a, podCIDR: 10.244.1.0/24, underlayAddress: 10.1.1.1}, {name: b, podCIDR: 10.244.2.0/24}]".into(),
            "nodes[0].underlayAddress: 10.1.1.1 is not a host address of underlay.cidr",
        ),
        (
            "nodes: [{name: underlay, podCIDR: 10.244.1.0/24}]".into(),
            "nodes[0].name: \"underlay\" names the lab's underlay namespace",
        ),
        (
            format!("{two}\nworld: [{{name: w, address: 1.2.3.4, attach: moon}}]"),
            "world[0].attach: \"moon\" is neither underlay, router nor a node of the lab",
        ),
        (
            "nodes: [{name: a, podCIDR: 10.244.1.0/24}]\nworld: [{name: w, address: 1.2.3.4, attach: underlay}]".into(),
            "world[0].attach: the lab has no underlay",
        ),
        (
            format!("{two}\nworld: [{{name: w, address: 172.30.0.12, attach: underlay}}]"),
            "world[0].address: 172.30.0.12 is the underlay address of node b",
        ),
        (
            format!("{two}\nworld: [{{name: w, address: 172.30.0.99, attach: a}}]"),
            "world[0].address: 172.30.0.99 is in underlay.cidr",
        ),
    ];
    for (body, expected) in cases {
        let text = format!("{HEAD}{body}\n");
        let err = parse(&text).expect_err(&body);
        assert!(
            err.starts_with(&format!("lab.yaml: {expected}")),
            "{body}\n  got: {err}\n want: {expected}"
        );
    }
}

#[test]
fn the_node_port_range_is_the_default_unless_given() {
    let nodes = "nodes: [{name: a, podCIDR: 10.244.1.0/24}]\n";
    assert_eq!(
        parse(&format!("{HEAD}{nodes}")).unwrap().node_port_range,
        None
    );
    let spec = parse(&format!("{HEAD}{nodes}nodePortRange: 31000-31999\n")).unwrap();
    assert_eq!(
        spec.node_port_range.map(|r| r.to_string()).as_deref(),
        Some("31000-31999")
    );
    let bad = parse(&format!("{HEAD}{nodes}nodePortRange: 31999-31000\n")).unwrap_err();
    assert!(
        bad.contains("nodePortRange") && bad.contains("FIRST-LAST"),
        "{bad}"
    );
}

#[test]
fn zones_are_label_values_and_become_the_node_label() {
    let node = |zone: &str| {
        format!("{HEAD}nodes:\n  - name: a\n    podCIDR: 10.244.1.0/24\n    zone: {zone:?}\n")
    };
    let spec = parse(&node("eu-west1_a.1")).unwrap();
    assert_eq!(spec.nodes[0].zone.as_deref(), Some("eu-west1_a.1"));
    let labels = crate::state::node_object(&spec.nodes[0]).metadata.labels;
    assert_eq!(
        labels.unwrap()[sluice_store::nodes::ZONE_LABEL],
        "eu-west1_a.1",
        "the Node carries its zone"
    );
    let plain = parse(&format!(
        "{HEAD}nodes: [{{name: a, podCIDR: 10.244.1.0/24}}]\n"
    ))
    .unwrap();
    assert_eq!(plain.nodes[0].zone, None);
    assert_eq!(
        crate::state::node_object(&plain.nodes[0]).metadata.labels,
        None
    );
    for bad in ["", "-a", "a-", "a b", "zone/a", &"z".repeat(64)] {
        let message = parse(&node(bad)).unwrap_err();
        assert!(
            message.starts_with("lab.yaml: nodes[0].zone: "),
            "{bad:?}: {message}"
        );
    }
    assert!(parse(&node(&"z".repeat(63))).is_ok());
}

#[test]
fn masquerade_is_off_unless_asked_for_and_needs_an_underlay() {
    let native = "routingMode: native\nunderlay: {cidr: 192.168.50.0/24}\nnodes: [{name: a, podCIDR: 10.244.1.0/24}]\n";
    assert_eq!(parse(&format!("{HEAD}{native}")).unwrap().masquerade, None);
    let spec = parse(&format!(
        "{HEAD}{native}masquerade: {{nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]}}\n"
    ))
    .unwrap();
    let cidrs: Vec<String> = spec
        .masquerade
        .unwrap()
        .non_masquerade_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(cidrs, ["10.0.0.0/8", "192.0.2.0/24"]);
    let defaults = parse(&format!("{HEAD}{native}masquerade: {{}}\n")).unwrap();
    assert_eq!(defaults.masquerade, Some(MasqueradeSpec::default()));

    let bad = parse(&format!(
        "{HEAD}{native}masquerade: {{nonMasqueradeCIDRs: [10.0.0.0/8, 10.0.0.1/8]}}\n"
    ))
    .unwrap_err();
    assert!(
        bad.contains("masquerade.nonMasqueradeCIDRs[1]") && bad.contains("host bits"),
        "{bad}"
    );
    let bad = parse(&format!(
        "{HEAD}{native}masquerade: {{nonMasqueradeCIDRs: [outside]}}\n"
    ))
    .unwrap_err();
    assert!(bad.contains("masquerade.nonMasqueradeCIDRs[0]"), "{bad}");
    let local = "nodes: [{name: a, podCIDR: 10.244.1.0/24}]\n";
    let bad = parse(&format!("{HEAD}{local}masquerade: {{}}\n")).unwrap_err();
    assert!(
        bad.contains("masquerade") && bad.contains("underlay"),
        "{bad}"
    );
}
