//! External frontends (NodePort, LoadBalancer VIP) reached from a world host outside the
//! cluster through from_netdev, in both routing modes: local and remote backends, SNAT,
//! events, bulk transfers, path MTU and the backends' ICMP errors (needs root; never
//! skipped). Each test builds its
//! own topology (underlay/mod.rs).
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod underlay;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    time::Instant,
};

use sluice_common::{
    DropReason, EVENT_CONFIG_F_ENABLED, EVENT_DROP, EVENT_F_SERVICE, EVENT_TRACE, EventConfig,
    FlowEvent, IDENTITY_WORLD, IPPROTO_TCP, METRIC_DIR_INGRESS, RoutingMode, SVC_FLAG_NODE_PORT,
    addr_be,
};
use sluice_datapath::{PinnedMaps, open_events};
use sluice_netns::Route;
use support::NetNs;
use underlay::*;

fn reaches_backends_from_the_world(mode: RoutingMode) {
    let cluster = Cluster::new(mode);
    let at_a = listen(&cluster.a.pod);
    let at_b = listen(&cluster.b.pod);

    // A backend on this node sees the client's own address.
    let peer = exchange(&cluster.world, &at_a, NODE_A, NODE_PORT_LOCAL).unwrap();
    assert_eq!(
        peer.ip(),
        WORLD,
        "{mode:?}: the local backend sees the world host"
    );
    // A backend on another node sees this node's address (SNAT); replies come back.
    for (to, port) in [(NODE_A, NODE_PORT_REMOTE), (VIP, VIP_PORT)] {
        let peer = exchange(&cluster.world, &at_b, to, port).unwrap();
        assert_eq!(
            peer.ip(),
            NODE_A,
            "{mode:?}: {to}:{port} is SNATed to node-a"
        );
    }

    let server_a = udp_socket(
        &cluster.a.pod,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
    );
    let server_b = udp_socket(
        &cluster.b.pod,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
    );
    let client = udp_socket(&cluster.world, SocketAddrV4::new(WORLD, 0));
    let peer = udp_exchange(&client, &server_a, NODE_A, NODE_PORT_LOCAL);
    assert_eq!(
        peer.ip(),
        WORLD,
        "{mode:?}: UDP keeps the client's address locally"
    );
    for (to, port) in [(NODE_A, NODE_PORT_REMOTE), (VIP, VIP_PORT)] {
        let client = udp_socket(&cluster.world, SocketAddrV4::new(WORLD, 0));
        let peer = udp_exchange(&client, &server_b, to, port);
        assert_eq!(peer.ip(), NODE_A, "{mode:?}: UDP to {to}:{port} is SNATed");
        // Later datagrams of the flow keep its SNAT port.
        assert_eq!(udp_exchange(&client, &server_b, to, port), peer);
    }
    assert_eq!(cluster.a.metric(DropReason::NatNoMapping), 0);

    // A pod reaches the same frontends through its own from_container, unSNATed.
    for (to, port) in [(NODE_A, NODE_PORT_REMOTE), (VIP, VIP_PORT)] {
        let peer = exchange(&cluster.a.pod, &at_b, to, port).unwrap();
        assert_eq!(peer.ip(), POD_A, "{mode:?}: pod-a to {to}:{port}");
    }
}

#[test]
fn world_reaches_local_and_remote_backends_natively() {
    reaches_backends_from_the_world(RoutingMode::Native);
}

#[test]
fn world_reaches_local_and_remote_backends_through_the_tunnel() {
    reaches_backends_from_the_world(RoutingMode::Tunnel);
}

#[test]
fn many_connections_through_snat_all_succeed() {
    const CONNECTIONS: usize = 200;
    let cluster = Cluster::new(RoutingMode::Native);
    let at_b = listen(&cluster.b.pod);
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..CONNECTIONS {
        let peer = exchange(&cluster.world, &at_b, VIP, VIP_PORT)
            .unwrap_or_else(|err| panic!("connection {i}: {err}"));
        assert_eq!(peer.ip(), NODE_A);
        ports.insert(peer.port());
    }
    println!(
        "{CONNECTIONS} sequential connections through SNAT, {} distinct SNAT ports",
        ports.len()
    );

    // Two clients on the same port want the same SNAT port toward the same backend:
    // the second gets another one, and both flows keep working side by side.
    let server = udp_socket(
        &cluster.b.pod,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
    );
    let first = udp_socket(&cluster.world, SocketAddrV4::new(WORLD, 40000));
    let second = udp_socket(&cluster.world, SocketAddrV4::new(WORLD_2, 40000));
    let seen_first = udp_exchange(&first, &server, VIP, VIP_PORT);
    let seen_second = udp_exchange(&second, &server, VIP, VIP_PORT);
    assert_eq!(
        seen_first,
        SocketAddr::from((NODE_A, 40000)),
        "the client's port is kept when free"
    );
    assert_eq!(seen_second.ip(), NODE_A);
    assert_ne!(
        seen_second.port(),
        40000,
        "a colliding flow gets a port of its own"
    );
    assert_eq!(udp_exchange(&first, &server, VIP, VIP_PORT), seen_first);
    assert_eq!(udp_exchange(&second, &server, VIP, VIP_PORT), seen_second);
    assert_eq!(cluster.a.metric(DropReason::NatNoMapping), 0);
}

#[test]
fn external_connections_emit_trace_and_drop_events_with_the_translation() {
    let cluster = Cluster::new(RoutingMode::Native);
    let mut maps = PinnedMaps::open(cluster.a.pins.path()).unwrap();
    let config = EventConfig {
        flags: EVENT_CONFIG_F_ENABLED,
        rate: 0,
        burst: 0,
        pad: 0,
    };
    maps.event_config.set(0, config, 0).unwrap();
    let mut ring = open_events(cluster.a.pins.path()).unwrap();

    let at_b = listen(&cluster.b.pod);
    exchange(&cluster.world, &at_b, NODE_A, NODE_PORT_REMOTE).unwrap();
    assert!(connect(&cluster.world, NODE_A, NODE_PORT_NONE).is_err());

    let mut events = Vec::new();
    while let Some(record) = ring.next() {
        events.push(FlowEvent::from_bytes(&record).unwrap());
    }
    let trace = events
        .iter()
        .find(|e| e.type_ == EVENT_TRACE)
        .unwrap_or_else(|| panic!("a trace event: {events:#?}"));
    assert_eq!(trace.flags & EVENT_F_SERVICE, EVENT_F_SERVICE);
    assert_eq!(trace.direction as u32, METRIC_DIR_INGRESS);
    assert_eq!(
        (trace.saddr, trace.daddr, u16::from_be(trace.dport)),
        (addr_be(WORLD), addr_be(POD_B), PORT),
        "the client and the backend"
    );
    assert_eq!(
        (trace.orig_daddr, u16::from_be(trace.orig_dport)),
        (addr_be(NODE_A), NODE_PORT_REMOTE),
        "the frontend"
    );
    assert_eq!(
        (trace.src_identity, trace.dst_identity),
        (IDENTITY_WORLD, IDENTITY_B),
        "the world client and the backend pod"
    );
    let drop = events
        .iter()
        .find(|e| e.type_ == EVENT_DROP)
        .unwrap_or_else(|| panic!("a drop event: {events:#?}"));
    assert_eq!(drop.reason, DropReason::NoService.code());
    assert_eq!(
        (drop.daddr, u16::from_be(drop.dport)),
        (addr_be(NODE_A), NODE_PORT_NONE)
    );
}

/// 1 MiB each way over a connection, checked byte for byte (large segments, GSO).
fn bulk(world: &NetNs, listener: &TcpListener, to: Ipv4Addr, port: u16) {
    let payload: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let mut stream = connect(world, to, port).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    accepted.set_read_timeout(Some(TIMEOUT)).unwrap();
    let upload = payload.clone();
    let writer = std::thread::spawn(move || {
        stream.write_all(&upload).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).unwrap();
        echoed
    });
    let mut received = Vec::new();
    accepted.read_to_end(&mut received).unwrap();
    assert!(
        received == payload,
        "{to}:{port}: the upload arrived intact"
    );
    accepted.write_all(&received).unwrap();
    drop(accepted);
    let echoed = support::join(writer);
    assert!(
        echoed == payload,
        "{to}:{port}: the download arrived intact"
    );
}

#[test]
fn bulk_transfers_through_dnat_and_snat_in_both_modes() {
    for mode in [RoutingMode::Native, RoutingMode::Tunnel] {
        let cluster = Cluster::new(mode);
        bulk(
            &cluster.world,
            &listen(&cluster.a.pod),
            NODE_A,
            NODE_PORT_LOCAL,
        );
        bulk(&cluster.world, &listen(&cluster.b.pod), VIP, VIP_PORT);
    }
}

/// In tunnel mode the path to a backend on another node carries 50 bytes less than the
/// underlay: a DF datagram too large for it is answered with fragmentation needed from
/// the frontend, and the client's kernel reports EMSGSIZE on its connected socket.
#[test]
fn path_mtu_discovery_works_for_world_clients() {
    let cluster = Cluster::new(RoutingMode::Tunnel);
    let client = udp_socket(&cluster.world, SocketAddrV4::new(WORLD, 0));
    client.connect((VIP, VIP_PORT)).unwrap();
    // 1500 bytes of IP: the underlay's MTU, 50 more than the tunnel's.
    client.send(&[0u8; 1472]).unwrap();
    let mut buf = [0u8; 16];
    let err = client.recv(&mut buf).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE), "{err}");
    assert!(cluster.a.metric(DropReason::FragNeeded) >= 1);
    let server = udp_socket(
        &cluster.b.pod,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
    );
    assert_eq!(udp_exchange(&client, &server, VIP, VIP_PORT).ip(), NODE_A);
}

/// A pod reaching another node's NodePort: the request crosses the underlay as it is, the
/// backend there sees the pod's address, and the reply takes the way back to a pod on
/// another node (the tunnel in tunnel mode).
#[test]
fn a_pod_reaches_the_node_port_of_another_node_in_both_modes() {
    for mode in [RoutingMode::Native, RoutingMode::Tunnel] {
        let mut cluster = Cluster::new(mode);
        let node_port = SVC_FLAG_NODE_PORT;
        cluster
            .b
            .frontend(NODE_B, NODE_PORT_LOCAL, IPPROTO_TCP, node_port, &[POD_B]);
        // node-b's route to pod-a's subnet, as the agent makes it.
        let to_pod_a = "10.1.1.0/24".parse().unwrap();
        let route = match mode {
            RoutingMode::Tunnel => Route::device(to_pod_a, VXLAN),
            _ => Route::via(to_pod_a, NODE_A),
        };
        cluster.b.ns.netlink().add_route(&route).unwrap();
        let at_b = listen(&cluster.b.pod);
        let peer = exchange(&cluster.a.pod, &at_b, NODE_B, NODE_PORT_LOCAL).unwrap();
        assert_eq!(peer.ip(), POD_A, "{mode:?}: the backend sees the pod");
    }
}

/// A backend with no socket on the port answers a world client's datagram with ICMP port
/// unreachable about the translated tuple. Translated back (rev-DNAT from a backend on
/// this node; rev-SNAT and rev-DNAT at node-a for one on another node), it names the
/// client's own tuple to the frontend, so the client's connected socket reports
/// ECONNREFUSED instead of waiting for an answer that never comes.
fn port_unreachable_reaches_the_world_client(mode: RoutingMode) {
    let cluster = Cluster::new(mode);
    for (to, port) in [
        (NODE_A, NODE_PORT_LOCAL),
        (NODE_A, NODE_PORT_REMOTE),
        (VIP, VIP_PORT),
    ] {
        let client = udp_socket(&cluster.world, SocketAddrV4::new(WORLD, 0));
        client.connect((to, port)).unwrap();
        let sent = Instant::now();
        client.send(b"anyone there?").unwrap();
        let mut buf = [0u8; 16];
        let err = client.recv(&mut buf).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ECONNREFUSED),
            "{mode:?}: {to}:{port}: {err}"
        );
        println!(
            "{mode:?}: {to}:{port} refused by the backend's port unreachable after {:?}",
            sent.elapsed()
        );
    }
    assert_eq!(cluster.a.metric(DropReason::WriteError), 0);
}

#[test]
fn a_backends_port_unreachable_reaches_the_world_client_natively() {
    port_unreachable_reaches_the_world_client(RoutingMode::Native);
}

#[test]
fn a_backends_port_unreachable_reaches_the_world_client_through_the_tunnel() {
    port_unreachable_reaches_the_world_client(RoutingMode::Tunnel);
}

/// node-a's own fragmentation needed, sent while it forwards a world client's DF datagram
/// to a local backend behind a narrower veth, quotes the DNATed datagram: to_netdev names
/// the node port in it again, so the client's socket learns the path MTU (EMSGSIZE), and
/// its next datagram arrives in fragments.
#[test]
fn the_nodes_frag_needed_about_a_node_port_flow_names_the_frontend() {
    const NARROW: u32 = 1300;
    let cluster = Cluster::new(RoutingMode::Native);
    cluster.a.ns.netlink().set_mtu("lxc-a", NARROW).unwrap();
    let server = udp_socket(
        &cluster.a.pod,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
    );
    let client = udp_socket(&cluster.world, SocketAddrV4::new(WORLD, 0));
    client.connect((NODE_A, NODE_PORT_LOCAL)).unwrap();
    // 1400 bytes of IP: the underlay carries them, lxc-a does not.
    let datagram = vec![0x5a; 1372];
    client.send(&datagram).unwrap();
    let err = client.recv(&mut [0u8; 16]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE), "{err}");
    client.send(&datagram).unwrap();
    let mut buf = [0u8; 2048];
    let (n, peer) = server
        .recv_from(&mut buf)
        .expect("the datagram, in fragments");
    assert_eq!((n, peer.ip()), (datagram.len(), WORLD.into()));
}
