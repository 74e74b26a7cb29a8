//! Two real agents, one per node, in tunnel and in native routing mode (needs root and
//! bpffs; never skipped). Each test builds its own topology in namespaces it creates:
//!
//! ```text
//! pod-a eth0 10.244.1.2 ─veth─ lxc-a 10.244.1.1 ┐            ┌ lxc-b 10.244.2.1 ─veth─ eth0 10.244.2.2 pod-b
//!                        node-a ─ underlay0 172.30.0.11 ─veth─ underlay0 172.30.0.12 ─ node-b
//! ```
//!
//! The agents learn each other from the Node objects of one cluster file: the agent makes
//! the tunnel device, writes node_config (with the node's address), attaches the tunnel
//! programs and from_netdev on the underlay device, and routes the
//! node's own traffic to the other node's pod CIDR; the datapath carries the pods' (TCP
//! and UDP).
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    maps::lpm_trie::Key,
    programs::{SchedClassifier, TcAttachType},
};
use sluice_api::{Client, VerifyRequest};
use sluice_common::{NodeConfig, RoutingMode, addr_be, kinds::DriftKind};
use sluice_datapath::PinnedMaps;
use sluice_netns::{Ipv4Net, LinkKind, OwnedNetNs, Route, RouteEntry};
use sluice_store::Snapshot;
use support::Agent;

const NODE_A: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 11);
const NODE_B: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 12);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
const ROUTER_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const PORT: u16 = 8080;
const UNDERLAY: &str = "underlay0";
const TUNNEL: &str = "sluice_vxlan";
const ROUTE_PROTOCOL: u8 = sluice_agent::routing::ROUTE_PROTOCOL;
const TIMEOUT: Duration = Duration::from_secs(3);

fn net(text: &str) -> Ipv4Net {
    text.parse().unwrap()
}

/// The cluster file: both nodes (or node-a alone) with one pod each.
fn cluster(revision: u64, with_b: bool) -> Snapshot {
    let node = |name: &str, cidr: &str, address: Ipv4Addr| {
        serde_json::json!({"metadata": {"name": name}, "spec": {"podCIDR": cidr},
            "status": {"addresses": [{"type": "InternalIP", "address": address.to_string()}]}})
    };
    let pod = |name: &str, node: &str, address: Ipv4Addr| {
        serde_json::json!({"metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]},
            "status": {"podIP": address.to_string()}})
    };
    let endpoint = |name: &str, node: &str, interface: &str, address: Ipv4Addr| {
        serde_json::json!({"node": node, "namespace": "default", "pod": name,
            "interface": interface, "addresses": [address.to_string()]})
    };
    let mut nodes = vec![node("node-a", "10.244.1.0/24", NODE_A)];
    let mut pods = vec![pod("pod-a", "node-a", POD_A)];
    let mut endpoints = vec![endpoint("pod-a", "node-a", "lxc-a", POD_A)];
    if with_b {
        nodes.push(node("node-b", "10.244.2.0/24", NODE_B));
        pods.push(pod("pod-b", "node-b", POD_B));
        endpoints.push(endpoint("pod-b", "node-b", "lxc-b", POD_B));
    }
    serde_json::from_value(serde_json::json!({
        "revision": revision,
        "nodes": nodes,
        "namespaces": [{"metadata": {"name": "default",
                                      "labels": {"kubernetes.io/metadata.name": "default"}}}],
        "pods": pods,
        "endpoints": endpoints,
    }))
    .unwrap()
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two node namespaces joined by a veth underlay, a pod on each, and an agent on each.
/// Fields drop in order: agents before the namespaces they run in.
struct TwoNodes {
    agent_a: Agent,
    _agent_b: Agent,
    node_a: OwnedNetNs,
    _node_b: OwnedNetNs,
    pod_a: OwnedNetNs,
    pod_b: OwnedNetNs,
    cluster_file: PathBuf,
    _dir: TempDir,
}

/// A node's namespace with its pod behind `lxc` (router address on the host side).
fn node(suffix: char, subnet: u8, pod_mtu: u32) -> (OwnedNetNs, OwnedNetNs) {
    let ns = OwnedNetNs::unique(&format!("sat-node-{suffix}-")).unwrap();
    let pod = OwnedNetNs::unique(&format!("sat-pod-{suffix}-")).unwrap();
    ns.set_sysctls(&[
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ])
    .unwrap();
    let lxc = format!("lxc-{suffix}");
    let router = Ipv4Addr::new(10, 244, subnet, 1);
    let on_node = ns.netlink().unwrap();
    let in_pod = pod.netlink().unwrap();
    on_node.add_veth(&lxc, "eth0", Some(&*pod)).unwrap();
    on_node
        .add_address(&lxc, Ipv4Net::new(router, 24).unwrap().into())
        .unwrap();
    on_node.set_up(&lxc).unwrap();
    in_pod.set_mtu("eth0", pod_mtu).unwrap();
    in_pod
        .add_address(
            "eth0",
            Ipv4Net::new(Ipv4Addr::new(10, 244, subnet, 2), 24)
                .unwrap()
                .into(),
        )
        .unwrap();
    in_pod.set_up("eth0").unwrap();
    in_pod.add_route(&Route::default_via(router)).unwrap();
    (ns, pod)
}

impl TwoNodes {
    fn new(mode: RoutingMode) -> Self {
        let pod_mtu = match mode {
            RoutingMode::Tunnel => 1450,
            _ => 1500,
        };
        let (node_a, pod_a) = node('a', 1, pod_mtu);
        let (node_b, pod_b) = node('b', 2, pod_mtu);
        // Each end is called underlay0 in its own node.
        node_a
            .netlink()
            .unwrap()
            .add_veth(UNDERLAY, UNDERLAY, Some(&*node_b))
            .unwrap();
        for (ns, address) in [(&node_a, NODE_A), (&node_b, NODE_B)] {
            let links = ns.netlink().unwrap();
            links
                .add_address(UNDERLAY, Ipv4Net::new(address, 24).unwrap().into())
                .unwrap();
            links.set_up(UNDERLAY).unwrap();
        }
        let dir = TempDir(std::env::temp_dir().join(sluice_netns::unique_name("sat-cluster-")));
        std::fs::create_dir_all(&dir.0).unwrap();
        let cluster_file = dir.0.join("cluster.json");
        cluster(1, true).write_file(&cluster_file).unwrap();
        let args = [
            "--routing-mode",
            mode.as_str(),
            "--underlay-device",
            UNDERLAY,
            "--reconcile-interval",
            "0.5",
        ];
        let start = |name, node, ns: &OwnedNetNs| {
            let mut agent = Agent::start_node(name, node, ns.name(), &cluster_file, &args);
            agent.wait_realized(1);
            agent
        };
        let agent_a = start("net-a", "node-a", &node_a);
        let agent_b = start("net-b", "node-b", &node_b);
        Self {
            agent_a,
            _agent_b: agent_b,
            node_a,
            _node_b: node_b,
            pod_a,
            pod_b,
            cluster_file,
            _dir: dir,
        }
    }

    fn routes_a(&self) -> Vec<RouteEntry> {
        self.node_a
            .netlink()
            .unwrap()
            .routes(ROUTE_PROTOCOL)
            .unwrap()
    }

    fn node_config_a(&self) -> NodeConfig {
        let maps = PinnedMaps::open(self.agent_a.pins.path()).unwrap();
        maps.node_config.get(&0, 0).unwrap()
    }
}

/// Whether the node's underlay device runs from_netdev (external frontends).
fn runs_from_netdev(node: &OwnedNetNs) -> bool {
    let (_, programs) = node
        .run(|| SchedClassifier::query_tcx(UNDERLAY, TcAttachType::Ingress))
        .unwrap()
        .unwrap();
    programs
        .iter()
        .any(|p| p.name_as_str() == Some(sluice_common::programs::FROM_NETDEV))
}

fn listen(ns: &OwnedNetNs) -> TcpListener {
    ns.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).unwrap())
        .unwrap()
}

/// One request and answer over a new connection from `client` to pod-b: returns the
/// client address pod-b saw.
fn exchange(client: &OwnedNetNs, listener: &TcpListener) -> io::Result<String> {
    let to = SocketAddrV4::new(POD_B, PORT);
    let mut stream = client
        .run(move || TcpStream::connect_timeout(&to.into(), TIMEOUT))
        .unwrap()?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let (mut accepted, peer) = listener.accept()?;
    stream.write_all(b"ping")?;
    let mut request = [0u8; 4];
    accepted.read_exact(&mut request)?;
    accepted.write_all(peer.ip().to_string().as_bytes())?;
    drop(accepted);
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// A datagram from pod-a to pod-b and back: returns the sender address pod-b saw.
fn udp_round_trip(nodes: &TwoNodes) -> String {
    let bind = |ns: &OwnedNetNs, port| {
        let socket = ns
            .run(move || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap())
            .unwrap();
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        socket
    };
    let (server, client) = (bind(&nodes.pod_b, PORT), bind(&nodes.pod_a, 0));
    client.send_to(b"question", (POD_B, PORT)).unwrap();
    let mut buf = [0u8; 64];
    let (_, peer) = server.recv_from(&mut buf).expect("datagram across nodes");
    server
        .send_to(peer.ip().to_string().as_bytes(), peer)
        .unwrap();
    let n = client.recv(&mut buf).expect("answer across nodes");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Removing node-b from the cluster file takes its route and every ipcache entry behind
/// it away on node-a.
fn node_b_leaves(nodes: &mut TwoNodes) {
    let maps = PinnedMaps::open(nodes.agent_a.pins.path()).unwrap();
    let behind_b = || {
        maps.ipcache
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, entry)| entry.tunnel_endpoint == addr_be(NODE_B))
            .count()
    };
    assert!(
        behind_b() >= 3,
        "pod-b, node-b's router address and pod CIDR"
    );
    cluster(2, false).write_file(&nodes.cluster_file).unwrap();
    let written = Instant::now();
    nodes.agent_a.wait_realized(2);
    eprintln!(
        "node-b removed: realized on node-a after {:?}",
        written.elapsed()
    );
    assert_eq!(nodes.routes_a(), vec![], "node-b's route is gone");
    assert_eq!(
        behind_b(),
        0,
        "nothing in node-a's ipcache is behind node-b"
    );
    let pod_cidr_b = (24, addr_be(Ipv4Addr::new(10, 244, 2, 0)));
    assert!(
        !maps
            .ipcache
            .keys()
            .filter_map(Result::ok)
            .any(|k: Key<u32>| (k.prefix_len(), k.data()) == pod_cidr_b),
        "node-b's pod CIDR is gone"
    );
}

#[test]
fn tunnel_mode_agents_carry_pods_and_nodes_across() {
    let mut nodes = TwoNodes::new(RoutingMode::Tunnel);
    let links = nodes.node_a.netlink().unwrap();
    assert_eq!(
        links.link_kind(TUNNEL).unwrap(),
        LinkKind::Vxlan {
            port: 8472,
            external: true
        }
    );
    assert_eq!(
        links.mtu(TUNNEL).unwrap(),
        1450,
        "the underlay's MTU less 50"
    );
    assert_eq!(
        nodes.node_config_a(),
        NodeConfig::new(
            RoutingMode::Tunnel,
            links.index(TUNNEL).unwrap(),
            links.index(UNDERLAY).unwrap()
        )
        .with_node_address(NODE_A)
        .with_tunnel_port(8472)
    );
    assert!(
        runs_from_netdev(&nodes.node_a),
        "from_netdev on the underlay device"
    );
    assert_eq!(
        nodes.routes_a(),
        vec![RouteEntry {
            destination: net("10.244.2.0/24"),
            gateway: None,
            device: Some(TUNNEL.into()),
            source: Some(ROUTER_A),
            protocol: ROUTE_PROTOCOL,
        }]
    );
    let status = nodes.agent_a.status();
    assert_eq!(status.routing.mode, RoutingMode::Tunnel);
    assert_eq!(status.routing.tunnel_device.as_deref(), Some(TUNNEL));
    let client = Client::new(&nodes.agent_a.socket);
    let verify = || client.verify(VerifyRequest { repair: false }).unwrap();
    let report = verify();
    assert!(report.drift.is_empty(), "{report:?}");

    let listener = listen(&nodes.pod_b);
    assert_eq!(
        exchange(&nodes.pod_a, &listener).unwrap(),
        POD_A.to_string()
    );
    assert_eq!(udp_round_trip(&nodes), POD_A.to_string());
    // The node's own traffic takes the agent's route into the tunnel, from its router
    // address, so the reply comes back through the tunnel too.
    assert_eq!(
        exchange(&nodes.node_a, &listener).unwrap(),
        ROUTER_A.to_string()
    );

    // A route removed behind the agent's back is drift, and the next pass puts it back.
    // A periodic pass between the removal and verify repairs it first: then try again.
    let route = nodes.routes_a().remove(0);
    let reported = (0..5).any(|_| {
        nodes
            .agent_a
            .wait("the route", Duration::from_secs(5), |_| {
                links.routes(ROUTE_PROTOCOL).unwrap().len() == 1
            });
        links.delete_route(&route.route()).unwrap();
        verify()
            .drift
            .iter()
            .any(|d| d.map == "routes" && d.kind == DriftKind::Missing)
    });
    assert!(reported, "verify reports the missing route");
    let removed = Instant::now();
    nodes
        .agent_a
        .wait("the route restored", Duration::from_secs(5), |_| {
            links.routes(ROUTE_PROTOCOL).unwrap().len() == 1
        });
    eprintln!(
        "route removed behind the agent's back: restored after {:?} (interval 0.5 s)",
        removed.elapsed()
    );

    // The tunnel device deleted behind the agent's back (its route goes with it): the next
    // pass makes it again, points node_config at it, attaches the programs and routes.
    // As with the route, a pass may re-make it before verify asks.
    let mut old_index = 0;
    let reported = (0..5).any(|_| {
        nodes
            .agent_a
            .wait("the tunnel device", Duration::from_secs(5), |_| {
                links.index(TUNNEL).is_ok() && links.routes(ROUTE_PROTOCOL).unwrap().len() == 1
            });
        old_index = links.index(TUNNEL).unwrap();
        links.delete_link(TUNNEL).unwrap();
        verify()
            .drift
            .iter()
            .any(|d| d.map == "link" && d.key == TUNNEL && d.kind == DriftKind::Missing)
    });
    assert!(reported, "verify reports the missing tunnel device");
    let deleted = Instant::now();
    nodes
        .agent_a
        .wait("the tunnel device re-made", Duration::from_secs(5), |_| {
            links.index(TUNNEL).is_ok_and(|i| i != old_index)
                && links.routes(ROUTE_PROTOCOL).unwrap().len() == 1
        });
    let maps = PinnedMaps::open(nodes.agent_a.pins.path()).unwrap();
    nodes.agent_a.wait(
        "node_config names the new device",
        Duration::from_secs(5),
        |_| maps.node_config.get(&0, 0).unwrap().tunnel_ifindex == links.index(TUNNEL).unwrap(),
    );
    assert_eq!(
        exchange(&nodes.pod_a, &listener).unwrap(),
        POD_A.to_string()
    );
    eprintln!(
        "tunnel device deleted behind the agent's back: carrying pod traffic again after {:?}",
        deleted.elapsed()
    );
    assert!(verify().drift.is_empty());

    node_b_leaves(&mut nodes);
}

#[test]
fn native_mode_agents_carry_pods_and_nodes_across() {
    let mut nodes = TwoNodes::new(RoutingMode::Native);
    let links = nodes.node_a.netlink().unwrap();
    assert!(links.link_kind(TUNNEL).is_err(), "no tunnel device");
    assert_eq!(
        nodes.node_config_a(),
        NodeConfig::new(RoutingMode::Native, 0, links.index(UNDERLAY).unwrap())
            .with_node_address(NODE_A)
    );
    assert!(
        runs_from_netdev(&nodes.node_a),
        "from_netdev on the underlay device"
    );
    assert_eq!(
        nodes.routes_a(),
        vec![RouteEntry {
            destination: net("10.244.2.0/24"),
            gateway: Some(NODE_B),
            device: Some(UNDERLAY.into()),
            source: None,
            protocol: ROUTE_PROTOCOL,
        }]
    );
    assert_eq!(nodes.agent_a.status().routing.mode, RoutingMode::Native);

    // from_netdev's pin removed behind the agent's back: the agent holds the link too, so
    // it stays attached, and a pass pins it again.
    let from_netdev = sluice_datapath::PROGRAMS
        .iter()
        .find(|p| p.name == sluice_common::programs::FROM_NETDEV)
        .unwrap();
    let pin = sluice_datapath::link_pin_path(nodes.agent_a.pins.path(), from_netdev, UNDERLAY);
    std::fs::remove_file(&pin).unwrap();
    let node_a = &nodes.node_a;
    nodes
        .agent_a
        .wait("from_netdev attached again", Duration::from_secs(5), |_| {
            pin.exists() && runs_from_netdev(node_a)
        });

    let listener = listen(&nodes.pod_b);
    assert_eq!(
        exchange(&nodes.pod_a, &listener).unwrap(),
        POD_A.to_string()
    );
    assert_eq!(udp_round_trip(&nodes), POD_A.to_string());
    assert_eq!(
        exchange(&nodes.node_a, &listener).unwrap(),
        NODE_A.to_string()
    );
    node_b_leaves(&mut nodes);

    // Restarted without an underlay device, the agent takes from_netdev off it.
    let args = ["--routing-mode", "local", "--reconcile-interval", "0.5"];
    nodes.agent_a.restart(&args);
    let node_a = &nodes.node_a;
    nodes
        .agent_a
        .wait("from_netdev detached", Duration::from_secs(60), |_| {
            !pin.exists() && !runs_from_netdev(node_a)
        });
}

fn cluster_file_in(dir: &Path) -> PathBuf {
    let file = dir.join("cluster.json");
    cluster(1, false).write_file(&file).unwrap();
    file
}

#[test]
fn bad_routing_flags_and_a_foreign_tunnel_device_are_refused_at_start() {
    let ns = OwnedNetNs::unique("sat-bad-").unwrap();
    let dir = TempDir(std::env::temp_dir().join(sluice_netns::unique_name("sat-bad-")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = cluster_file_in(&dir.0);

    let mut agent = Agent::start_node(
        "bad-flags",
        "node-a",
        ns.name(),
        &file,
        &["--routing-mode", "native"],
    );
    assert!(!agent.exit(Duration::from_secs(10)).success());
    assert!(
        agent
            .log_text()
            .contains("--routing-mode native needs --underlay-device"),
        "{}",
        agent.log_text()
    );

    // Someone else's device under the tunnel device's name is not taken over.
    let links = ns.netlink().unwrap();
    links.add_veth(TUNNEL, "peer0", None).unwrap();
    links.add_veth(UNDERLAY, "peer1", None).unwrap();
    let mut agent = Agent::start_node(
        "foreign-tunnel",
        "node-a",
        ns.name(),
        &file,
        &["--routing-mode", "tunnel", "--underlay-device", UNDERLAY],
    );
    assert!(!agent.exit(Duration::from_secs(120)).success());
    assert!(
        agent.log_text().contains(
            "tunnel device sluice_vxlan is a veth device, not a VXLAN device with external and dstport 8472"
        ),
        "{}",
        agent.log_text()
    );
}
