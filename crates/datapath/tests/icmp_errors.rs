//! ICMP errors about translated connections, on crafted packets (BPF_PROG_TEST_RUN; needs
//! root, never skipped): about a service connection through to_container, about an
//! external frontend's connection through the backend's from_container (rev-DNAT) or, to
//! node_address, through from_netdev (rev-SNAT and rev-DNAT), and about a masqueraded
//! connection through from_netdev (rev-SNAT to the pod). The outer addresses and the
//! quoted header are translated back with every checksum right. The real-socket side (a
//! connected UDP socket gets ECONNREFUSED, path MTU is learned) is in traffic.rs,
//! nodeport.rs and masquerade.rs.
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddrV4};

use sluice_common::{
    CT_EGRESS, CT_FLAG_MASQUERADE, CT_FLAG_SEEN_REPLY, CT_NODEPORT, CT_SNAT, Ct4Entry, Ct4Key,
    IPPROTO_TCP, IPPROTO_UDP, NodeConfig, RoutingMode, addr_be,
    programs::{FROM_CONTAINER, FROM_NETDEV, TO_CONTAINER},
};
use sluice_datapath::PinnedMaps;
use support::{
    ETH_HLEN, Frame, ICMP_ECHO, IPPROTO_ICMP, NODE_MAC, POD_MAC, TC_ACT_OK, TC_ACT_REDIRECT,
    TCP_ACK, TCP_PSH, checksum, ethernet, icmp_echo, ip_checksum_ok, ipv4_header, l4_checksum_ok,
    run, tcp, udp,
};

const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 2), 50000);
const FRONTEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53);
const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 5353);
/// A router between client and backend, as the sender of fragmentation needed.
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// A client outside the cluster, the node's address (a NodePort frontend and the source
/// of SNATed connections) and the port a connection was SNATed to.
const WORLD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 100), 41000);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE, 30080);
const SNAT_PORT: u16 = 40000;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;

/// An ICMP destination unreachable from `from` to the quoted packet's sender, quoting the
/// IP packet of `frame` whole (Linux quotes up to 576 bytes).
fn unreachable(from: Ipv4Addr, code: u8, mtu: u16, frame: &[u8]) -> Vec<u8> {
    icmp_error(from, ICMP_DEST_UNREACH, code, mtu, frame)
}

/// An ICMP error of `kind` and `code` from `from` to the sender of `frame`, quoting it.
fn icmp_error(from: Ipv4Addr, kind: u8, code: u8, mtu: u16, frame: &[u8]) -> Vec<u8> {
    let quoted = &frame[ETH_HLEN..];
    let mut icmp = vec![kind, code, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let to = Ipv4Addr::new(quoted[12], quoted[13], quoted[14], quoted[15]);
    let mut ip = ipv4_header(from, to, IPPROTO_ICMP, icmp.len());
    ip.extend_from_slice(&icmp);
    ethernet(NODE_MAC, POD_MAC, &ip)
}

/// The client's connection through the frontend to the backend, as from_container
/// records it.
fn service_connection(maps: &mut PinnedMaps, client: SocketAddrV4, proto: u8) {
    let key = Ct4Key::new(
        (*client.ip(), client.port()),
        (*BACKEND.ip(), BACKEND.port()),
        proto,
        CT_EGRESS,
    );
    let entry = Ct4Entry {
        nat_address: addr_be(*FRONTEND.ip()),
        nat_port: FRONTEND.port().to_be(),
        flags: CT_FLAG_SEEN_REPLY,
        ..Ct4Entry::default()
    };
    maps.conntrack.insert(key, entry, 0).unwrap();
}

/// The ICMP message of `frame` and the packet it quotes (IP header and L4).
fn icmp_and_quote(frame: &[u8]) -> (&[u8], &[u8]) {
    let ip = &frame[ETH_HLEN..];
    let icmp = &ip[Frame(frame).ihl()..Frame(frame).tot_len()];
    (icmp, &icmp[8..])
}

/// Checks every checksum of the error `out` sent to CLIENT and returns its quoted packet's
/// source and destination.
fn assert_translated(out: &[u8], outer_src: Ipv4Addr, proto: u8) -> (SocketAddrV4, SocketAddrV4) {
    assert_translated_to(out, (outer_src, *CLIENT.ip()), proto)
}

/// Checks the outer addresses and every checksum of the error `out`; returns its quoted
/// packet's source and destination.
fn assert_translated_to(
    out: &[u8],
    (outer_src, outer_dst): (Ipv4Addr, Ipv4Addr),
    proto: u8,
) -> (SocketAddrV4, SocketAddrV4) {
    let frame = Frame(out);
    assert_eq!(frame.src_ip(), outer_src, "outer source");
    assert_eq!(frame.dst_ip(), outer_dst, "outer destination");
    assert!(ip_checksum_ok(out), "outer IP checksum");
    let (icmp, quote) = icmp_and_quote(out);
    assert_eq!(checksum(icmp), 0, "ICMP checksum");
    assert_eq!(checksum(&quote[..20]), 0, "quoted IP checksum");
    let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let (src, dst) = (addr(&quote[12..16]), addr(&quote[16..20]));
    let l4 = &quote[20..];
    assert!(
        l4_checksum_ok(src, dst, proto, l4),
        "quoted L4 checksum, for the quoted addresses"
    );
    (
        SocketAddrV4::new(src, port(&l4[0..2])),
        SocketAddrV4::new(dst, port(&l4[2..4])),
    )
}

#[test]
fn port_unreachable_from_a_backend_names_the_frontend() {
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    service_connection(&mut maps, CLIENT, IPPROTO_UDP);

    // The datagram as the backend received it: after DNAT.
    let datagram = udp(CLIENT, BACKEND, b"question");
    let error = unreachable(*BACKEND.ip(), ICMP_PORT_UNREACH, 0, &datagram);
    let out = run(datapath.program(TO_CONTAINER).unwrap(), &error);
    assert_eq!(out.verdict, TC_ACT_OK);
    let quoted = assert_translated(&out.packet, *FRONTEND.ip(), IPPROTO_UDP);
    assert_eq!(quoted, (CLIENT, FRONTEND), "the quote names the frontend");
}

#[test]
fn frag_needed_from_a_router_keeps_its_source_and_fixes_the_tcp_quote() {
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    service_connection(&mut maps, CLIENT, IPPROTO_TCP);

    let segment = tcp(CLIENT, BACKEND, TCP_ACK | TCP_PSH, &[0x42; 100]);
    let error = unreachable(ROUTER, ICMP_FRAG_NEEDED, 1400, &segment);
    let out = run(datapath.program(TO_CONTAINER).unwrap(), &error);
    assert_eq!(out.verdict, TC_ACT_OK);
    let quoted = assert_translated(&out.packet, ROUTER, IPPROTO_TCP);
    assert_eq!(quoted, (CLIENT, FRONTEND));
    let (icmp, _) = icmp_and_quote(&out.packet);
    assert_eq!(&icmp[6..8], &1400u16.to_be_bytes(), "the MTU is kept");
}

#[test]
fn errors_about_other_connections_pass_unchanged() {
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    service_connection(&mut maps, CLIENT, IPPROTO_UDP);

    // Straight to the backend from another port: no service, nothing to translate.
    let other = SocketAddrV4::new(*CLIENT.ip(), 50001);
    let error = unreachable(
        *BACKEND.ip(),
        ICMP_PORT_UNREACH,
        0,
        &udp(other, BACKEND, b"x"),
    );
    let out = run(datapath.program(TO_CONTAINER).unwrap(), &error);
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.packet, error);
}

/// A conntrack entry of `scope` for `src` -> `dst` naming `nat`.
fn ct_entry(
    maps: &mut PinnedMaps,
    (src, dst): (SocketAddrV4, SocketAddrV4),
    proto: u8,
    scope: u8,
    nat: SocketAddrV4,
    flags: u8,
) {
    let key = Ct4Key::new(
        (*src.ip(), src.port()),
        (*dst.ip(), dst.port()),
        proto,
        scope,
    );
    let entry = Ct4Entry {
        nat_address: addr_be(*nat.ip()),
        nat_port: nat.port().to_be(),
        flags: flags | CT_FLAG_SEEN_REPLY,
        // The test run's device, the loopback device.
        ifindex: 1,
        ..Ct4Entry::default()
    };
    maps.conntrack.insert(key, entry, 0).unwrap();
}

/// NODE as node_address, as the agent writes it.
fn node_address(maps: &mut PinnedMaps) {
    let config = NodeConfig::new(RoutingMode::Native, 0, 1).with_node_address(NODE);
    maps.node_config.set(0, config, 0).unwrap();
}

#[test]
fn frag_needed_from_a_local_backend_names_the_node_port() {
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    // WORLD reached BACKEND on this node through NODE_PORT: DNAT only.
    ct_entry(
        &mut maps,
        (WORLD, BACKEND),
        IPPROTO_TCP,
        CT_NODEPORT,
        NODE_PORT,
        0,
    );

    let segment = tcp(WORLD, BACKEND, TCP_ACK | TCP_PSH, &[0x42; 100]);
    let error = unreachable(*BACKEND.ip(), ICMP_FRAG_NEEDED, 1400, &segment);
    let out = run(datapath.program(FROM_CONTAINER).unwrap(), &error);
    assert_eq!(
        out.verdict, TC_ACT_REDIRECT,
        "straight out toward the client"
    );
    let quoted = assert_translated_to(&out.packet, (NODE, *WORLD.ip()), IPPROTO_TCP);
    assert_eq!(quoted, (WORLD, NODE_PORT), "the quote names the node port");
    let (icmp, _) = icmp_and_quote(&out.packet);
    assert_eq!(&icmp[6..8], &1400u16.to_be_bytes(), "the MTU is kept");
}

#[test]
fn errors_about_a_connection_snated_to_another_node_name_the_client_and_the_frontend() {
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    node_address(&mut maps);
    // WORLD reached BACKEND on another node through NODE_PORT, SNATed to NODE:SNAT_PORT.
    let snated = (SocketAddrV4::new(NODE, SNAT_PORT), BACKEND);
    for proto in [IPPROTO_UDP, IPPROTO_TCP] {
        ct_entry(&mut maps, snated, proto, CT_SNAT, WORLD, 0);
        ct_entry(&mut maps, snated, proto, CT_NODEPORT, NODE_PORT, 0);
    }

    // The backend's port unreachable: from the frontend to the client.
    let datagram = udp(snated.0, snated.1, b"question");
    let error = unreachable(*BACKEND.ip(), ICMP_PORT_UNREACH, 0, &datagram);
    let out = run(datapath.program(FROM_NETDEV).unwrap(), &error);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "out toward the client");
    let quoted = assert_translated_to(&out.packet, (NODE, *WORLD.ip()), IPPROTO_UDP);
    assert_eq!(quoted, (WORLD, NODE_PORT), "the client's own tuple");

    // A router's fragmentation needed keeps the router as source.
    let segment = tcp(snated.0, snated.1, TCP_ACK | TCP_PSH, &[0x42; 100]);
    let error = unreachable(ROUTER, ICMP_FRAG_NEEDED, 1300, &segment);
    let out = run(datapath.program(FROM_NETDEV).unwrap(), &error);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let quoted = assert_translated_to(&out.packet, (ROUTER, *WORLD.ip()), IPPROTO_TCP);
    assert_eq!(quoted, (WORLD, NODE_PORT));
}

#[test]
fn frag_needed_about_a_masqueraded_connection_goes_to_the_pod() {
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    node_address(&mut maps);
    // CLIENT, a pod, reached WORLD masqueraded as NODE:SNAT_PORT.
    let left = (SocketAddrV4::new(NODE, SNAT_PORT), WORLD);
    ct_entry(
        &mut maps,
        left,
        IPPROTO_TCP,
        CT_SNAT,
        CLIENT,
        CT_FLAG_MASQUERADE,
    );

    let segment = tcp(left.0, left.1, TCP_ACK | TCP_PSH, &[0x42; 100]);
    let error = unreachable(ROUTER, ICMP_FRAG_NEEDED, 1300, &segment);
    let out = run(datapath.program(FROM_NETDEV).unwrap(), &error);
    assert_eq!(
        out.verdict, TC_ACT_OK,
        "to the node's stack, which routes it to the pod"
    );
    let quoted = assert_translated(&out.packet, ROUTER, IPPROTO_TCP);
    assert_eq!(quoted, (CLIENT, WORLD), "the pod's own tuple");
    let (icmp, _) = icmp_and_quote(&out.packet);
    assert_eq!(&icmp[6..8], &1300u16.to_be_bytes(), "the MTU is kept");

    // An error about a tuple SNAT never gave out passes as it came.
    let other = tcp(
        SocketAddrV4::new(NODE, SNAT_PORT + 1),
        WORLD,
        TCP_ACK,
        &[0x42; 100],
    );
    let error = unreachable(ROUTER, ICMP_FRAG_NEEDED, 1300, &other);
    let out = run(datapath.program(FROM_NETDEV).unwrap(), &error);
    assert_eq!((out.verdict, out.packet), (TC_ACT_OK, error));
}

#[test]
fn an_error_quoting_a_masqueraded_ping_names_the_pods_identifier() {
    const ICMP_TIME_EXCEEDED: u8 = 11;
    const POD_ID: u16 = 4242;
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    node_address(&mut maps);
    // CLIENT's ping (identifier POD_ID) left masqueraded as NODE with SNAT_PORT: an echo's
    // identifier is both its ports.
    let left = (
        SocketAddrV4::new(NODE, SNAT_PORT),
        SocketAddrV4::new(*WORLD.ip(), SNAT_PORT),
    );
    let pod = SocketAddrV4::new(*CLIENT.ip(), POD_ID);
    ct_entry(
        &mut maps,
        left,
        IPPROTO_ICMP,
        CT_SNAT,
        pod,
        CT_FLAG_MASQUERADE,
    );

    let echo = icmp_echo(NODE, *WORLD.ip(), ICMP_ECHO, SNAT_PORT, b"sluice ping");
    let error = icmp_error(ROUTER, ICMP_TIME_EXCEEDED, 0, 0, &echo);
    let out = run(datapath.program(FROM_NETDEV).unwrap(), &error);
    assert_eq!(out.verdict, TC_ACT_OK);
    let frame = Frame(&out.packet);
    assert_eq!((frame.src_ip(), frame.dst_ip()), (ROUTER, *CLIENT.ip()));
    assert!(ip_checksum_ok(&out.packet), "outer IP checksum");
    let (icmp, quote) = icmp_and_quote(&out.packet);
    assert_eq!(checksum(icmp), 0, "ICMP checksum");
    assert_eq!(checksum(&quote[..20]), 0, "quoted IP checksum");
    assert_eq!(
        &quote[12..16],
        &CLIENT.ip().octets(),
        "the quote names the pod"
    );
    let quoted_echo = &quote[20..];
    assert_eq!(
        &quoted_echo[4..6],
        &POD_ID.to_be_bytes(),
        "and its identifier"
    );
    assert_eq!(checksum(quoted_echo), 0, "the quoted echo's checksum");
}
