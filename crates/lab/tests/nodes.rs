//! Labs of several nodes on the real kernel: the underlay between node namespaces, world
//! hosts on it, nodes added and removed while the lab runs, and the node changes the lab
//! refuses. Needs root; fails (never skips) without it.

// Helpers outside #[test] functions are test code too.
#![allow(clippy::unwrap_used)]

mod support;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use sluice_lab::{
    Lab, LabError, NodeSpec, ProbeOptions, ProbeRequest, Protocol, UNDERLAY_DEVICE, Via,
};
use sluice_netns::NetNs;
use sluice_store::Snapshot;
use support::{Agent, TestLab, examples, netns_of, unique};

const HEAD: &str = "apiVersion: sluice.dev/v1alpha1\nkind: Lab\n";

fn two_nodes() -> String {
    format!(
        "{HEAD}clusterCIDR: 10.244.0.0/16\nnodes:\n- {{name: node-1, podCIDR: 10.244.1.0/24}}\n- {{name: node-2, podCIDR: 10.244.2.0/24}}\n"
    )
}

fn pinned_pod(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {name}}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: agnhost\n    ports: [{{containerPort: 80}}]\n"
    )
}

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: c, image: agnhost, ports: [{containerPort: 80}]}]
";

/// `(node, InternalIP, podCIDR)` of every Node object in the snapshot.
fn nodes_of(snapshot: &Snapshot) -> Vec<(String, String, String)> {
    snapshot
        .nodes
        .iter()
        .map(|n| {
            let address = n.status.as_ref().unwrap().addresses.as_ref().unwrap()[0]
                .address
                .clone();
            let cidr = n.spec.as_ref().unwrap().pod_cidr.clone().unwrap();
            (n.metadata.name.clone().unwrap(), address, cidr)
        })
        .collect()
}

fn mtu(netns: &str, device: &str) -> u32 {
    NetNs::named(netns).netlink().unwrap().mtu(device).unwrap()
}

/// One ICMP echo from `netns` to `to`.
fn ping(netns: &str, to: Ipv4Addr) -> bool {
    NetNs::named(netns)
        .command("ping")
        .unwrap()
        .args(["-c1", "-W2", &to.to_string()])
        .output()
        .unwrap()
        .status
        .success()
}

/// A TCP exchange between two node namespaces over their underlay addresses.
fn tcp_between(lab: &Lab, from: &str, to: &str, address: Ipv4Addr) {
    let listener = NetNs::named(lab.node_netns(to))
        .run(move || TcpListener::bind((address, 7000)).unwrap())
        .unwrap();
    let mut stream = NetNs::named(lab.node_netns(from))
        .run(move || TcpStream::connect_timeout(&(address, 7000).into(), Duration::from_secs(3)))
        .unwrap()
        .unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    stream.write_all(b"over the underlay").unwrap();
    drop(stream);
    let mut got = String::new();
    accepted.read_to_string(&mut got).unwrap();
    assert_eq!(got, "over the underlay");
}

#[test]
fn three_nodes_come_up_on_an_underlay_and_go_down_leaving_nothing() {
    let name = unique("mn");
    // The example, and a world host behind node-3.
    let text = std::fs::read_to_string(examples().join("lab-3nodes.yaml"))
        .unwrap()
        .replace(
            "world:\n",
            "world:\n  - {name: partner, address: 198.51.100.7, attach: node-3}\n",
        );
    assert!(text.contains("partner"));
    let started = Instant::now();
    let mut t = TestLab::up(&name, &text, Agent::None);
    let took = started.elapsed();
    eprintln!("lab up, 3 nodes and 2 world hosts, no agents: {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    let expected: std::collections::BTreeSet<String> = [
        "node-1",
        "node-2",
        "node-3",
        "underlay",
        "world-internet",
        "world-partner",
    ]
    .iter()
    .map(|n| format!("sluice-{name}-{n}"))
    .collect();
    assert_eq!(netns_of(&name), expected);
    assert_eq!(t.lab.underlay_netns(), format!("sluice-{name}-underlay"));

    // Node objects carry the underlay address as InternalIP, and their pod CIDR.
    assert_eq!(
        nodes_of(&t.snapshot()),
        [
            (
                "node-1".into(),
                "172.30.0.11".into(),
                "10.244.1.0/24".into()
            ),
            (
                "node-2".into(),
                "172.30.0.12".into(),
                "10.244.2.0/24".into()
            ),
            (
                "node-3".into(),
                "172.30.0.13".into(),
                "10.244.3.0/24".into()
            ),
        ]
    );
    // Every node's underlay0 is a port of br0, at the underlay MTU.
    let bridge_links = NetNs::named(t.lab.underlay_netns())
        .netlink()
        .unwrap()
        .links()
        .unwrap();
    let br0 = bridge_links.iter().find(|l| l.name == "br0").unwrap();
    let ports = bridge_links
        .iter()
        .filter(|l| l.controller == Some(br0.index))
        .count();
    assert_eq!(ports, 4, "three nodes and the world host: {bridge_links:?}");
    for node in t.lab.nodes() {
        assert_eq!(mtu(&t.lab.node_netns(&node), UNDERLAY_DEVICE), 1500);
    }

    // The underlay carries packets between every pair of nodes.
    let n = |node: &str| format!("sluice-{name}-{node}");
    assert!(ping(&n("node-1"), Ipv4Addr::new(172, 30, 0, 12)));
    assert!(ping(&n("node-1"), Ipv4Addr::new(172, 30, 0, 13)));
    assert!(ping(&n("node-3"), Ipv4Addr::new(172, 30, 0, 11)));
    tcp_between(&t.lab, "node-2", "node-3", Ipv4Addr::new(172, 30, 0, 13));
    // Other nodes reach a world host behind node-3 through node-3.
    assert!(ping(&n("node-1"), Ipv4Addr::new(198, 51, 100, 7)));

    // Tunnel mode: pods get the underlay MTU less VXLAN's 50 bytes, on both veth ends.
    let pod = t.write("pod.yaml", &pinned_pod("web", "node-2"));
    t.lab.apply(&[pod]).unwrap();
    let pod_netns = t.lab.pod_netns("default/web").unwrap();
    assert_eq!(mtu(&pod_netns, "eth0"), 1450);
    let node_links = NetNs::named(n("node-2"))
        .netlink()
        .unwrap()
        .links()
        .unwrap();
    let lxc = node_links
        .iter()
        .find(|l| l.name.starts_with("lxc"))
        .unwrap();
    assert_eq!(mtu(&n("node-2"), &lxc.name), 1450);

    // The world host on the underlay and a pod on node-2 reach each other (no agents:
    // the node's and the world host's routes).
    let options = ProbeOptions {
        via: Via::PodIp,
        timeout: Duration::from_secs(2),
    };
    let out = t
        .lab
        .probe_one("default/web", "world/internet", 80, Protocol::Tcp, &options)
        .unwrap();
    assert!(out.allowed, "{out:?}");
    let back = t
        .lab
        .probe_one("world/internet", "default/web", 80, Protocol::Tcp, &options)
        .unwrap();
    assert!(back.allowed, "{back:?}");

    Lab::down(&name, &t.opts).unwrap();
    assert!(netns_of(&name).is_empty(), "{:?}", netns_of(&name));
    assert!(!Path::new("/sys/fs/bpf/sluice").join(&name).exists());
    assert!(!t.opts.state_root.join(&name).exists());
}

/// Every `gen-N.json` the fake agent of `node` kept, in generation order.
fn generations_seen(t: &TestLab, node: &str) -> Vec<Snapshot> {
    let dir = t.opts.state_root.join(&t.name).join("nodes").join(node);
    let mut seen: Vec<(u64, Snapshot)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let generation = name
                .strip_prefix("gen-")?
                .strip_suffix(".json")?
                .parse()
                .ok()?;
            Some((generation, name))
        })
        .map(|(g, file)| {
            let path = t
                .opts
                .state_root
                .join(&t.name)
                .join("nodes")
                .join(node)
                .join(file);
            (g, Snapshot::read_file(&path).unwrap())
        })
        .collect();
    seen.sort_by_key(|(g, _)| *g);
    seen.into_iter().map(|(_, s)| s).collect()
}

#[test]
fn nodes_join_and_leave_a_running_lab() {
    let name = unique("mj");
    let world =
        "world: [{name: far, address: 198.51.100.9, attach: underlay, ports: [{port: 80}]}]\n";
    let mut t = TestLab::up(&name, &format!("{}{world}", two_nodes()), Agent::Fake);
    let log = std::fs::read_to_string(t.lab.agent_log("node-1")).unwrap();
    assert!(
        log.contains("--routing-mode tunnel --underlay-device underlay0"),
        "{log}"
    );

    let started = Instant::now();
    t.lab
        .add_node(NodeSpec {
            name: "node-3".into(),
            pod_cidr: "10.244.3.0/24".parse().unwrap(),
            underlay_address: None,
            zone: None,
        })
        .unwrap();
    eprintln!(
        "node added, every agent realized it: {:?}",
        started.elapsed()
    );
    assert_eq!(nodes_of(&t.snapshot())[2].1, "172.30.0.13");
    assert!(ping(
        &t.lab.node_netns("node-3"),
        Ipv4Addr::new(172, 30, 0, 11)
    ));
    let log = std::fs::read_to_string(t.lab.agent_log("node-3")).unwrap();
    assert!(log.contains("--node node-3"), "{log}");
    // Node-1's agent learned the new node from the snapshot.
    let last = generations_seen(&t, "node-1").pop().unwrap();
    assert_eq!(last.nodes.len(), 3);

    // One replica per node (the least loaded first), then a pod on node-3.
    let deployment = t.write("deployment.yaml", DEPLOYMENT);
    t.lab.apply(&[deployment]).unwrap();
    let pod = t.write("pod.yaml", &pinned_pod("on-3", "node-3"));
    t.lab.apply(&[pod]).unwrap();
    let replicas = |lab: &Lab| -> Vec<String> {
        let mut nodes: Vec<String> = lab
            .pods()
            .into_iter()
            .filter(|p| p.name.starts_with("web-"))
            .map(|p| p.node)
            .collect();
        nodes.sort();
        nodes
    };
    assert_eq!(replicas(&t.lab), ["node-1", "node-2", "node-3"]);
    let pod_netns = t.lab.pod_netns("default/on-3").unwrap();

    // The world host on the underlay routes the new node's pod CIDR to it.
    let options = ProbeOptions {
        via: Via::PodIp,
        timeout: Duration::from_secs(2),
    };
    let probe = t
        .lab
        .probe_one("world/far", "default/on-3", 80, Protocol::Tcp, &options)
        .unwrap();
    assert!(probe.allowed, "{probe:?}");

    let started = Instant::now();
    t.lab.remove_node("node-3").unwrap();
    eprintln!(
        "node removed, every agent realized it: {:?}",
        started.elapsed()
    );
    assert!(t.lab.pods().iter().all(|p| p.node != "node-3"));
    assert!(!NetNs::named(pod_netns.as_str()).exists());
    // The Deployment's replica on node-3 was replaced on a remaining node.
    let after = replicas(&t.lab);
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(!NetNs::named(t.lab.node_netns("node-3").as_str()).exists());
    assert_eq!(nodes_of(&t.snapshot()).len(), 2);
    // Its pod left every dataplane (terminating, node still there) before the node went.
    let seen = generations_seen(&t, "node-1");
    let terminating = seen.iter().position(|s| {
        s.nodes.len() == 3 && s.pods.iter().any(|p| p.deletion_timestamp().is_some())
    });
    let gone = seen.iter().rposition(|s| s.nodes.len() == 2);
    assert!(
        terminating.is_some() && terminating < gone,
        "{terminating:?} {gone:?}"
    );

    // Re-applying the lab file: node-2 goes, node-4 comes (at the lowest free address).
    let file = t.write(
        "lab-2.yaml",
        &format!(
            "{HEAD}clusterCIDR: 10.244.0.0/16\nnodes:\n- {{name: node-1, podCIDR: 10.244.1.0/24}}\n- {{name: node-4, podCIDR: 10.244.4.0/24}}\n{world}"
        ),
    );
    t.lab.reapply(&file).unwrap();
    assert_eq!(t.lab.nodes(), ["node-1", "node-4"]);
    assert_eq!(nodes_of(&t.snapshot())[1].1, "172.30.0.12");
    let expected: std::collections::BTreeSet<String> =
        ["node-1", "node-4", "underlay", "world-far"]
            .iter()
            .map(|n| format!("sluice-{name}-{n}"))
            .collect();
    let pods: std::collections::BTreeSet<String> = t
        .lab
        .pods()
        .iter()
        .map(|p| t.lab.pod_netns(&format!("default/{}", p.name)).unwrap())
        .collect();
    let nodes_and_hosts: std::collections::BTreeSet<String> =
        netns_of(&name).difference(&pods).cloned().collect();
    assert_eq!(nodes_and_hosts, expected);
    t.lab
        .add_node(NodeSpec {
            name: "node-3".into(),
            pod_cidr: "10.244.3.0/24".parse().unwrap(),
            underlay_address: Some(Ipv4Addr::new(172, 30, 0, 40)),
            zone: None,
        })
        .unwrap();
    assert_eq!(nodes_of(&t.snapshot())[2].1, "172.30.0.40");
}

#[test]
fn bad_node_changes_are_refused_and_change_nothing() {
    let name = unique("mr");
    let mut t = TestLab::up(&name, &two_nodes(), Agent::None);
    let cluster = |t: &TestLab| std::fs::read_to_string(t.lab.cluster_file()).unwrap();
    let before = (netns_of(&name), t.lab.generation(), cluster(&t));
    let node = |name: &str, cidr: &str, address: Option<Ipv4Addr>| NodeSpec {
        name: name.into(),
        pod_cidr: cidr.parse().unwrap(),
        underlay_address: address,
        zone: None,
    };
    let cases = [
        (
            node("node-3", "10.244.1.0/25", None),
            "node node-3: podCIDR: 10.244.1.0/25 overlaps podCIDR of node node-1 10.244.1.0/24",
        ),
        (
            node("node-3", "10.245.0.0/24", None),
            "node node-3: podCIDR: 10.245.0.0/24 is outside clusterCIDR 10.244.0.0/16",
        ),
        (
            node("node-2", "10.244.9.0/24", None),
            "node node-2: name: duplicate node name \"node-2\" (also node node-2)",
        ),
        (
            node("underlay", "10.244.9.0/24", None),
            "node underlay: name: \"underlay\" names the lab's underlay namespace",
        ),
        (
            node(
                "node-3",
                "10.244.3.0/24",
                Some(Ipv4Addr::new(172, 30, 0, 12)),
            ),
            "node node-3: underlayAddress: 172.30.0.12 is also underlayAddress of node node-2",
        ),
    ];
    let zoned = NodeSpec {
        zone: Some("zone a".into()),
        ..node("node-3", "10.244.3.0/24", None)
    };
    let cases = cases.into_iter().chain([(
        zoned,
        "node node-3: zone: \"zone a\" must consist of letters, digits",
    )]);
    for (spec, expected) in cases {
        let err = t.lab.add_node(spec).unwrap_err().to_string();
        assert!(err.starts_with(expected), "got: {err}\nwant: {expected}");
    }
    let err = t.lab.remove_node("node-9").unwrap_err();
    assert!(matches!(err, LabError::NodeNotFound(_)), "{err}");
    let changed = t.write(
        "changed.yaml",
        &two_nodes().replace("kind: Lab\n", "kind: Lab\nroutingMode: native\n"),
    );
    let err = t.lab.reapply(&changed).unwrap_err().to_string();
    assert!(
        err.contains("routingMode: differs from the running lab's"),
        "{err}"
    );
    let rezoned = t.write(
        "rezoned.yaml",
        &two_nodes().replace("{name: node-2,", "{name: node-2, zone: b,"),
    );
    let err = t.lab.reapply(&rezoned).unwrap_err().to_string();
    assert!(
        err.contains("nodes[1].zone: node node-2 runs in zone (none)"),
        "{err}"
    );
    assert_eq!(
        (netns_of(&name), t.lab.generation(), cluster(&t)),
        before,
        "a refused change changes nothing"
    );

    t.lab.remove_node("node-2").unwrap();
    let err = t.lab.remove_node("node-1").unwrap_err();
    assert!(matches!(err, LabError::LastNode(_)), "{err}");
    assert!(NetNs::named(t.lab.node_netns("node-1").as_str()).exists());

    // A one-node lab without an underlay runs local mode and cannot grow.
    let local = TestLab::up(
        &unique("ml"),
        &format!("{HEAD}nodes: [{{name: node-1, podCIDR: 10.244.1.0/24}}]\n"),
        Agent::None,
    );
    assert!(!NetNs::named(local.lab.underlay_netns().as_str()).exists());
    let mut lab = Lab::open(&local.name, &local.opts).unwrap();
    let err = lab
        .add_node(node("node-2", "10.244.2.0/24", None))
        .unwrap_err();
    assert!(matches!(err, LabError::NoUnderlay(_)), "{err}");
}

/// Pods on every node, and the world host on the underlay, reach each other over TCP and
/// UDP with the real agents, in `mode`; also after a node joins and another leaves.
fn pods_across_nodes(file: &str) {
    let mode = if file.ends_with("native.yaml") {
        " (native)"
    } else {
        " (tunnel)"
    };
    let name = unique("mx");
    let text = std::fs::read_to_string(examples().join(file)).unwrap();
    let started = Instant::now();
    let mut t = TestLab::up(&name, &text, Agent::Real);
    eprintln!("lab up{mode}, 3 nodes with agents: {:?}", started.elapsed());
    let pods: String = ["node-1", "node-2", "node-3", "node-1"]
        .iter()
        .enumerate()
        .map(|(i, node)| udp_tcp_pod(&format!("p{i}"), node))
        .collect();
    let file = t.write("pods.yaml", &pods);
    t.lab.apply(&[file]).unwrap();
    let all_allowed = |lab: &Lab, expect: usize| {
        let matrix = lab
            .probe(&ProbeRequest {
                namespaces: Vec::new(),
                selector: Default::default(),
                world: true,
                nodes: false,
                ports: vec![80],
                protocols: vec![Protocol::Tcp, Protocol::Udp],
                options: ProbeOptions {
                    via: Via::PodIp,
                    timeout: Duration::from_secs(2),
                },
            })
            .unwrap();
        let denied: Vec<_> = matrix.probes.iter().filter(|p| !p.allowed).collect();
        assert!(denied.is_empty(), "{mode}: {denied:?}");
        assert_eq!(matrix.probes.len(), expect);
    };
    // 4 pods and the world host, both ways, TCP and UDP.
    all_allowed(&t.lab, 5 * 5 * 2);

    let started = Instant::now();
    t.lab
        .add_node(NodeSpec {
            name: "node-4".into(),
            pod_cidr: "10.244.4.0/24".parse().unwrap(),
            underlay_address: None,
            zone: None,
        })
        .unwrap();
    eprintln!("node added{mode}, agents healthy: {:?}", started.elapsed());
    let file = t.write("p4.yaml", &udp_tcp_pod("p4", "node-4"));
    t.lab.apply(&[file]).unwrap();
    all_allowed(&t.lab, 6 * 6 * 2);
    let started = Instant::now();
    t.lab.remove_node("node-3").unwrap();
    eprintln!("node removed{mode}: {:?}", started.elapsed());
    all_allowed(&t.lab, 5 * 5 * 2);
}

fn udp_tcp_pod(name: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: agnhost\n    ports: [{{containerPort: 80}}, {{containerPort: 80, protocol: UDP}}]\n"
    )
}

#[test]
fn pods_across_nodes_by_tunnel() {
    pods_across_nodes("lab-3nodes.yaml");
}

#[test]
fn pods_across_nodes_natively() {
    pods_across_nodes("lab-3nodes-native.yaml");
}
