//! External frontends without a backend (externalTrafficPolicy Local on a node without
//! one) refused at once, SNAT port exhaustion dropped with its reason, and the underlay's
//! other traffic left alone by from_netdev (needs root; never skipped). Each socket test
//! builds its own topology (underlay/mod.rs).
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod underlay;

use std::{
    io::ErrorKind,
    net::{SocketAddrV4, TcpListener},
    time::Instant,
};

use aya::maps::lpm_trie::Key;
use sluice_common::{
    CT_SNAT, Ct4Entry, Ct4Key, DropReason, IPPROTO_TCP, IPPROTO_UDP, IpcacheEntry, Lb4Key,
    Lb4Service, METRIC_DIR_INGRESS, NodeConfig, RoutingMode, SVC_FLAG_LOAD_BALANCER,
    SVC_FLAG_LOCAL, SVC_FLAG_NODE_PORT, addr_be, programs::FROM_NETDEV,
};
use sluice_datapath::PinnedMaps;
use support::Frame;
use underlay::*;

#[test]
fn local_policy_without_a_local_backend_refuses_at_once() {
    let cluster = Cluster::new(RoutingMode::Native);
    let before = cluster.a.metric(DropReason::NoService);

    let started = Instant::now();
    let refused = connect(&cluster.world, NODE_A, NODE_PORT_NONE).unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    println!(
        "ETP=Local, no local backend: TCP connect() refused after {elapsed:?} (target < 50 ms)"
    );

    let client = udp_socket(&cluster.world, SocketAddrV4::new(WORLD, 0));
    client.connect((NODE_A, NODE_PORT_NONE)).unwrap();
    let started = Instant::now();
    client.send(b"anyone?").unwrap();
    let mut buf = [0u8; 16];
    let refused = client.recv(&mut buf).unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    println!("ETP=Local, no local backend: UDP answered with port unreachable after {elapsed:?}");

    assert!(cluster.a.metric(DropReason::NoService) >= before + 2);
}

#[test]
fn other_underlay_traffic_passes_unchanged() {
    let mut cluster = Cluster::new(RoutingMode::Native);
    // The node's own sockets on its address, below and inside the SNAT port range.
    for port in [8081, 45000] {
        let listener = cluster
            .a
            .ns
            .run(move || TcpListener::bind((NODE_A, port)).unwrap());
        let peer = exchange(&cluster.world, &listener, NODE_A, port).unwrap();
        assert_eq!(peer.ip(), WORLD);
    }
    // A ClusterIP is no external frontend: from outside it is routed as any address.
    support::add_service(
        &mut cluster.a.maps,
        SocketAddrV4::new(NODE_A, 8082),
        IPPROTO_TCP,
        &[SocketAddrV4::new(POD_B, PORT)],
    );
    let listener = cluster
        .a
        .ns
        .run(|| TcpListener::bind((NODE_A, 8082)).unwrap());
    let peer = exchange(&cluster.world, &listener, NODE_A, 8082).unwrap();
    assert_eq!(peer.ip(), WORLD, "the node's own socket answered");
}

/// The refusals as BPF_PROG_TEST_RUN sees them: whole packets with correct checksums
/// (over veth the world host's kernel would not check them).
#[test]
fn refusals_are_well_formed_rst_and_icmp() {
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    let frontend = SocketAddrV4::new(NODE_A, NODE_PORT_NONE);
    let client = SocketAddrV4::new(WORLD, 40000);
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        maps.services
            .insert(
                Lb4Key::new(NODE_A, NODE_PORT_NONE, proto, 0),
                Lb4Service::frontend(0, SVC_FLAG_NODE_PORT | SVC_FLAG_LOCAL),
                0,
            )
            .unwrap();
    }
    let program = datapath.program(FROM_NETDEV).unwrap();
    let tcp_field = |frame: &[u8], at: usize| {
        let l4 = Frame(frame).l4().to_vec();
        u32::from_be_bytes([l4[at], l4[at + 1], l4[at + 2], l4[at + 3]])
    };

    // A SYN: <SEQ=0><ACK=SEG.SEQ+1><CTL=RST,ACK>, back to the client.
    let syn = support::tcp(client, frontend, support::TCP_SYN, b"");
    let out = support::run(program, &syn);
    assert_eq!(out.verdict, support::TC_ACT_REDIRECT);
    let reset = Frame(&out.packet);
    reset.assert_checksums();
    assert_eq!((reset.src(), reset.dst()), (frontend, client));
    assert_eq!(reset.eth_dst(), support::POD_MAC, "to the sender's MAC");
    assert_eq!(reset.tot_len(), 40, "bare IP and TCP headers");
    assert_eq!(reset.l4()[13], support::TCP_RST | support::TCP_ACK);
    assert_eq!(
        (tcp_field(&out.packet, 4), tcp_field(&out.packet, 8)),
        (0, 1001)
    );

    // A segment with ACK and 5 bytes: <SEQ=SEG.ACK><CTL=RST>.
    let data = support::tcp(
        client,
        frontend,
        support::TCP_ACK | support::TCP_PSH,
        b"hello",
    );
    let out = support::run(program, &data);
    assert_eq!(out.verdict, support::TC_ACT_REDIRECT);
    Frame(&out.packet).assert_checksums();
    assert_eq!(Frame(&out.packet).l4()[13], support::TCP_RST);
    assert_eq!(tcp_field(&out.packet, 4), 2000);

    // An RST is never answered.
    let rst = support::tcp(client, frontend, support::TCP_RST, b"");
    assert_eq!(support::run(program, &rst).verdict, support::TC_ACT_SHOT);

    // UDP: ICMP port unreachable from the frontend, quoting the datagram.
    let datagram = support::udp(client, frontend, b"anyone?");
    let out = support::run(program, &datagram);
    assert_eq!(out.verdict, support::TC_ACT_REDIRECT);
    let icmp = Frame(&out.packet);
    icmp.assert_checksums();
    assert_eq!(
        (icmp.proto(), icmp.l4()[0], icmp.l4()[1]),
        (support::IPPROTO_ICMP, 3, 3)
    );
    assert_eq!((icmp.src_ip(), icmp.dst_ip()), (NODE_A, WORLD));

    // Anything else on the device passes untouched: VXLAN to the node, a pod's packet.
    for packet in [
        support::udp(
            SocketAddrV4::new(NODE_B, 40000),
            SocketAddrV4::new(NODE_A, VXLAN_PORT),
            b"x",
        ),
        support::tcp(
            client,
            SocketAddrV4::new(POD_A, PORT),
            support::TCP_SYN,
            b"",
        ),
    ] {
        let out = support::run(program, &packet);
        assert_eq!(out.verdict, support::TC_ACT_OK);
        assert_eq!(out.packet, packet);
    }
    assert_eq!(
        maps.counted(DropReason::NoService.code(), METRIC_DIR_INGRESS)
            .unwrap()
            .packets,
        4
    );
}

/// Every SNAT port toward a backend taken (by live connections of another client): a new
/// connection is dropped with NAT_NO_MAPPING rather than given a port in use; once its
/// own port is free again it gets that one.
#[test]
fn snat_port_exhaustion_drops_with_a_reason() {
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    // Native mode through the test run's loopback device (ifindex 1).
    maps.node_config
        .set(
            0,
            NodeConfig::new(RoutingMode::Native, 0, 1).with_node_address(NODE_A),
            0,
        )
        .unwrap();
    let remote = IpcacheEntry {
        identity: 301,
        tunnel_endpoint: addr_be(NODE_B),
    };
    maps.ipcache
        .insert(&Key::new(32, addr_be(POD_B)), remote, 0)
        .unwrap();
    maps.services
        .insert(
            Lb4Key::new(VIP, VIP_PORT, IPPROTO_TCP, 1),
            Lb4Service::slot(POD_B, PORT),
            0,
        )
        .unwrap();
    support::add_backend(&mut maps, SocketAddrV4::new(POD_B, PORT), IPPROTO_TCP);
    maps.services
        .insert(
            Lb4Key::new(VIP, VIP_PORT, IPPROTO_TCP, 0),
            Lb4Service::frontend(1, SVC_FLAG_LOAD_BALANCER),
            0,
        )
        .unwrap();
    let taken = |port: u16| Ct4Key::new((NODE_A, port), (POD_B, PORT), IPPROTO_TCP, CT_SNAT);
    // Seen in the far future: never expired.
    let other_client = Ct4Entry {
        last_seen_ns: u64::MAX / 2,
        nat_address: addr_be(WORLD_2),
        nat_port: 40000u16.to_be(),
        ..Ct4Entry::default()
    };
    for port in 32768..=u16::MAX {
        maps.conntrack.insert(taken(port), other_client, 0).unwrap();
    }

    let client = SocketAddrV4::new(WORLD, 40000);
    let syn = support::tcp(
        client,
        SocketAddrV4::new(VIP, VIP_PORT),
        support::TCP_SYN,
        b"",
    );
    let program = datapath.program(FROM_NETDEV).unwrap();
    assert_eq!(support::run(program, &syn).verdict, support::TC_ACT_SHOT);
    let dropped = |maps: &PinnedMaps| {
        maps.counted(DropReason::NatNoMapping.code(), METRIC_DIR_INGRESS)
            .unwrap()
            .packets
    };
    assert_eq!(dropped(&maps), 1);

    maps.conntrack.remove(&taken(40000)).unwrap();
    let out = support::run(program, &syn);
    assert_eq!(out.verdict, support::TC_ACT_REDIRECT);
    let frame = Frame(&out.packet);
    frame.assert_checksums();
    assert_eq!(
        (frame.src(), frame.dst()),
        (
            SocketAddrV4::new(NODE_A, 40000),
            SocketAddrV4::new(POD_B, PORT)
        )
    );
    assert_eq!(dropped(&maps), 1);
}
