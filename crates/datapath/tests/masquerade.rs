//! Egress masquerading (ip-masq-agent): a pod's connections to a host outside the cluster
//! leave SNATed to its node's address by to_netdev and their replies come back to the pod
//! through from_netdev; a nonMasqueradeCIDR and pods on other nodes see the pod's own
//! address (needs root; never skipped). Each test builds its own topology (underlay/mod.rs).
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod underlay;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};

use aya::maps::lpm_trie::Key;
use sluice_common::{DropReason, RoutingMode, addr_be};
use sluice_netns::{Ipv4Net, Route};
use support::NetNs;
use underlay::*;

/// The topology of nodeport.rs with masquerading on at node-a.
fn masquerading_cluster(mode: RoutingMode) -> Cluster {
    let mut cluster = Cluster::new(mode);
    let config = cluster.a.maps.node_config.get(&0, 0).unwrap();
    cluster
        .a
        .maps
        .node_config
        .set(0, config.with_masquerade(true), 0)
        .unwrap();
    cluster
}

/// A TCP server on the world host, on every address it has.
fn world_listener(world: &NetNs) -> TcpListener {
    world.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).unwrap())
}

fn pod_reaches_the_world_as_its_node(mode: RoutingMode) {
    let cluster = masquerading_cluster(mode);
    let at_world = world_listener(&cluster.world);

    let peer = exchange(&cluster.a.pod, &at_world, WORLD, PORT).unwrap();
    assert_eq!(peer.ip(), NODE_A, "{mode:?}: the world host sees node-a");

    let server = udp_socket(
        &cluster.world,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
    );
    let client = udp_socket(&cluster.a.pod, SocketAddrV4::new(POD_A, 0));
    let peer = udp_exchange(&client, &server, WORLD, PORT);
    assert_eq!(peer.ip(), NODE_A, "{mode:?}: UDP is masqueraded too");
    // Later datagrams of the flow keep its port.
    assert_eq!(udp_exchange(&client, &server, WORLD, PORT), peer);

    // Pod to pod across nodes keeps the pod's address.
    let at_b = listen(&cluster.b.pod);
    let peer = exchange(&cluster.a.pod, &at_b, POD_B, PORT).unwrap();
    assert_eq!(peer.ip(), POD_A, "{mode:?}: pod-b sees pod-a");

    // External frontends keep working beside it: their replies leave from the frontend.
    let at_a = listen(&cluster.a.pod);
    let peer = exchange(&cluster.world, &at_a, NODE_A, NODE_PORT_LOCAL).unwrap();
    assert_eq!(
        peer.ip(),
        WORLD,
        "{mode:?}: the local backend sees the client"
    );
    let peer = exchange(&cluster.world, &at_b, NODE_A, NODE_PORT_REMOTE).unwrap();
    assert_eq!(
        peer.ip(),
        NODE_A,
        "{mode:?}: the remote backend sees node-a"
    );
    assert_eq!(cluster.a.metric(DropReason::NatNoMapping), 0);
}

#[test]
fn pod_reaches_the_world_as_its_node_natively() {
    pod_reaches_the_world_as_its_node(RoutingMode::Native);
}

#[test]
fn pod_reaches_the_world_as_its_node_through_the_tunnel() {
    pod_reaches_the_world_as_its_node(RoutingMode::Tunnel);
}

#[test]
fn a_non_masquerade_cidr_sees_the_pod() {
    let mut cluster = masquerading_cluster(RoutingMode::Native);
    cluster
        .a
        .maps
        .non_masq_cidrs
        .insert(&Key::new(32, addr_be(WORLD_2)), 1, 0)
        .unwrap();
    // Unmasqueraded replies need a way back to the pod.
    cluster
        .world
        .netlink()
        .add_route(&Route::via(
            Ipv4Net::new(Ipv4Addr::new(10, 1, 1, 0), 24).unwrap(),
            NODE_A,
        ))
        .unwrap();
    let at_world = world_listener(&cluster.world);

    let peer = exchange(&cluster.a.pod, &at_world, WORLD_2, PORT).unwrap();
    assert_eq!(peer.ip(), POD_A, "{WORLD_2} is a nonMasqueradeCIDR");
    let peer = exchange(&cluster.a.pod, &at_world, WORLD, PORT).unwrap();
    assert_eq!(peer.ip(), NODE_A, "{WORLD} is not");
}

#[test]
fn replies_to_a_world_host_that_reached_the_pod_directly_keep_the_pod_address() {
    let cluster = masquerading_cluster(RoutingMode::Native);
    cluster
        .world
        .netlink()
        .add_route(&Route::via(
            Ipv4Net::new(Ipv4Addr::new(10, 1, 1, 0), 24).unwrap(),
            NODE_A,
        ))
        .unwrap();
    let at_a = listen(&cluster.a.pod);
    // exchange checks that the answer came from the address the world host asked.
    let peer = exchange(&cluster.world, &at_a, POD_A, PORT).unwrap();
    assert_eq!(peer.ip(), WORLD);
}

#[test]
fn masquerading_off_leaves_the_pod_address() {
    let cluster = Cluster::new(RoutingMode::Native);
    cluster
        .world
        .netlink()
        .add_route(&Route::via(
            Ipv4Net::new(Ipv4Addr::new(10, 1, 1, 0), 24).unwrap(),
            NODE_A,
        ))
        .unwrap();
    let at_world = world_listener(&cluster.world);
    let peer = exchange(&cluster.a.pod, &at_world, WORLD, PORT).unwrap();
    assert_eq!(peer.ip(), POD_A);
}

#[test]
fn many_masqueraded_connections_all_succeed() {
    const CONNECTIONS: usize = 200;
    let cluster = masquerading_cluster(RoutingMode::Native);
    let at_world = world_listener(&cluster.world);
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..CONNECTIONS {
        let peer = exchange(&cluster.a.pod, &at_world, WORLD, PORT)
            .unwrap_or_else(|err| panic!("connection {i}: {err}"));
        assert_eq!(peer.ip(), NODE_A);
        ports.insert(peer.port());
    }
    println!(
        "{CONNECTIONS} sequential masqueraded connections, {} distinct SNAT ports",
        ports.len()
    );
    assert_eq!(cluster.a.metric(DropReason::NatNoMapping), 0);
}
