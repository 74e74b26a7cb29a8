//! Egress masquerading (ip-masq-agent): a pod's connections to a host outside the cluster
//! (pings too) leave SNATed to its node's address by to_netdev and their replies, and the
//! ICMP errors about them, come back to the pod through from_netdev; a nonMasqueradeCIDR
//! and pods on other nodes see the pod's own address (needs root; never skipped). Each
//! test builds its own topology (underlay/mod.rs).
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod underlay;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::Instant,
};

use aya::maps::lpm_trie::Key;
use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, SockaddrIn, socket};
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

/// A host beyond the world host, which forwards to it over a link whose MTU is
/// ROUTER_MTU on the world host's side only: the far host advertises the MSS of a
/// 1500-byte link, so only path MTU discovery finds the bottleneck.
const FAR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const FAR_2: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 3);
const FAR_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const ROUTER_MTU: u32 = 1300;

fn far_host(cluster: &Cluster) -> NetNs {
    let far = NetNs::new();
    let world = cluster.world.netlink();
    cluster
        .world
        .ns()
        .set_sysctls(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
        ])
        .unwrap();
    world.add_veth("far0", "eth0", Some(far.ns())).unwrap();
    world.set_mtu("far0", ROUTER_MTU).unwrap();
    world
        .add_address("far0", Ipv4Net::new(FAR_GATEWAY, 24).unwrap().into())
        .unwrap();
    world.set_up("far0").unwrap();
    let links = far.netlink();
    for address in [FAR, FAR_2] {
        links
            .add_address("eth0", Ipv4Net::new(address, 24).unwrap().into())
            .unwrap();
    }
    links.set_up("eth0").unwrap();
    links.add_route(&Route::default_via(FAR_GATEWAY)).unwrap();
    // node-a reaches the far network through the world host; pod-a through node-a.
    cluster
        .a
        .ns
        .netlink()
        .add_route(&Route::via(
            Ipv4Net::new(Ipv4Addr::new(10, 201, 0, 0), 24).unwrap(),
            WORLD,
        ))
        .unwrap();
    far
}

/// The ICMP errors about a pod's masqueraded connections reach it: the world host's port
/// unreachable (ECONNREFUSED on the pod's connected UDP socket) and a router's
/// fragmentation needed, from which the pod's kernel learns the path MTU: a DF datagram
/// too large fails with EMSGSIZE and then goes out in fragments, and a TCP upload
/// through the bottleneck completes (it would stall with the error lost).
#[test]
fn icmp_errors_about_masqueraded_connections_reach_the_pod() {
    let cluster = masquerading_cluster(RoutingMode::Native);
    let far = far_host(&cluster);

    let client = udp_socket(&cluster.a.pod, SocketAddrV4::new(POD_A, 0));
    client.connect((WORLD, PORT)).unwrap();
    let sent = Instant::now();
    client.send(b"anyone there?").unwrap();
    let err = client.recv(&mut [0u8; 16]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED), "{err}");
    println!(
        "the world host's port unreachable reached the pod after {:?}",
        sent.elapsed()
    );

    // 1400 bytes of IP: the pod's MTU (1450) carries them, the router's link does not.
    let server = udp_socket(&far, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT));
    let client = udp_socket(&cluster.a.pod, SocketAddrV4::new(POD_A, 0));
    client.connect((FAR, PORT)).unwrap();
    let datagram = vec![0x5a; 1372];
    client.send(&datagram).unwrap();
    let err = client.recv(&mut [0u8; 16]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE), "{err}");
    client.send(&datagram).unwrap();
    let mut buf = [0u8; 2048];
    let (n, peer) = server
        .recv_from(&mut buf)
        .expect("the datagram, in fragments");
    assert_eq!((n, peer.ip()), (datagram.len(), NODE_A.into()));

    let listener = far.run(|| TcpListener::bind((FAR_2, PORT)).unwrap());
    let payload: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let to = SocketAddrV4::new(FAR_2, PORT);
    let started = Instant::now();
    let mut stream = cluster
        .a
        .pod
        .run(move || TcpStream::connect_timeout(&to.into(), TIMEOUT))
        .unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (mut accepted, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), NODE_A);
    accepted.set_read_timeout(Some(TIMEOUT)).unwrap();
    let reader = std::thread::spawn(move || {
        let mut received = Vec::new();
        accepted.read_to_end(&mut received).unwrap();
        accepted.write_all(b"done").unwrap();
        received
    });
    stream.write_all(&payload).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "done");
    assert!(
        support::join(reader) == payload,
        "the upload arrived intact"
    );
    println!(
        "1 MiB uploaded through a {ROUTER_MTU}-byte link in {:?}",
        started.elapsed()
    );
    assert_eq!(cluster.a.metric(DropReason::WriteError), 0);
}

/// A pod's own ICMP error about its masqueraded connection leaves from node-a naming the
/// SNATed tuple: the world host's late answer, after the pod's socket closed, is refused
/// on the world host's connected socket.
#[test]
fn a_pods_port_unreachable_about_a_masqueraded_flow_reaches_the_world_host() {
    let cluster = masquerading_cluster(RoutingMode::Native);
    let server = udp_socket(
        &cluster.world,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
    );
    let client = udp_socket(&cluster.a.pod, SocketAddrV4::new(POD_A, 0));
    client.send_to(b"hello", (WORLD, PORT)).unwrap();
    let mut buf = [0u8; 16];
    let (_, seen) = server.recv_from(&mut buf).unwrap();
    assert_eq!(seen.ip(), NODE_A);
    drop(client);

    server.connect(seen).unwrap();
    let sent = Instant::now();
    server.send(b"late answer").unwrap();
    let err = server.recv(&mut buf).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED), "{err}");
    println!(
        "the pod's port unreachable reached the world host after {:?}",
        sent.elapsed()
    );
}

/// An ICMP socket of `kind` (Datagram: a ping socket; Raw) in `netns`, as a std socket:
/// send_to, recv_from and timeouts work on any datagram-like socket as on UDP.
fn icmp_socket(netns: &NetNs, kind: SockType) -> UdpSocket {
    let socket = netns
        .run(move || {
            socket(
                AddressFamily::Inet,
                kind,
                SockFlag::empty(),
                SockProtocol::Icmp,
            )
        })
        .unwrap();
    let socket = UdpSocket::from(socket);
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    socket
}

const ICMP_ECHO: u8 = 8;
const ICMP_ECHOREPLY: u8 = 0;
/// The pod's echo identifier: below the SNAT range, so the node must give it another.
const ECHO_ID: u16 = 4242;

/// A pod's ping to a world host leaves as node-a's, its identifier replaced by one from
/// the SNAT allocator, and the replies come back to the pod's ICMP socket (which the pod's
/// kernel finds by the original identifier).
#[test]
fn a_pod_pings_the_world_as_its_node() {
    const PINGS: u16 = 20;
    let cluster = masquerading_cluster(RoutingMode::Native);
    cluster
        .a
        .pod
        .ns()
        .set_sysctls(&[("net.ipv4.ping_group_range", "0 0")])
        .unwrap();
    // Sees every echo request reaching the world host (its kernel answers them).
    let watcher = icmp_socket(&cluster.world, SockType::Raw);
    let ping = icmp_socket(&cluster.a.pod, SockType::Datagram);
    // A ping socket's port is its echo identifier.
    nix::sys::socket::bind(
        ping.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(POD_A, ECHO_ID)),
    )
    .unwrap();

    let mut rtts = Vec::new();
    let mut seen_ids = std::collections::BTreeSet::new();
    for seq in 1..=PINGS {
        // Type, code, checksum and identifier are the kernel's to fill in.
        let mut request = vec![ICMP_ECHO, 0, 0, 0, 0, 0];
        request.extend_from_slice(&seq.to_be_bytes());
        request.extend_from_slice(b"sluice ping");
        let sent = Instant::now();
        ping.send_to(&request, SocketAddrV4::new(WORLD, 0)).unwrap();
        let mut reply = [0u8; 64];
        let (n, from) = ping.recv_from(&mut reply).expect("the echo reply");
        rtts.push(sent.elapsed());
        assert_eq!(from.ip(), WORLD);
        assert_eq!(reply[0], ICMP_ECHOREPLY);
        assert_eq!(
            &reply[6..8],
            &seq.to_be_bytes(),
            "the reply to this request"
        );
        assert_eq!(&reply[8..n], b"sluice ping");

        let (source, id) = echo_request_seen(&watcher, seq);
        assert_eq!(source, NODE_A, "the world host sees node-a");
        seen_ids.insert(id);
    }
    let ids: Vec<u16> = seen_ids.into_iter().collect();
    assert_eq!(ids.len(), 1, "one identifier for the flow: {ids:?}");
    assert!(ids[0] >= 32768, "from the SNAT range: {}", ids[0]);
    rtts.sort();
    println!(
        "{PINGS} masqueraded pings, identifier {ECHO_ID} seen as {}; RTT median {:?}, max {:?}",
        ids[0],
        rtts[rtts.len() / 2],
        rtts[rtts.len() - 1]
    );
    assert_eq!(cluster.a.metric(DropReason::NatNoMapping), 0);
}

/// A router's error about a pod's masqueraded ping (network unreachable: the world host
/// forwards, but has no route to the address) quotes the echo as it left node-a; from_netdev
/// names the pod's own identifier in it again, so the pod's connected ping socket reports
/// ENETUNREACH instead of waiting for a reply.
#[test]
fn a_routers_error_about_a_masqueraded_ping_reaches_the_pod() {
    let cluster = masquerading_cluster(RoutingMode::Native);
    cluster
        .a
        .pod
        .ns()
        .set_sysctls(&[("net.ipv4.ping_group_range", "0 0")])
        .unwrap();
    cluster
        .world
        .ns()
        .set_sysctls(&[("net.ipv4.ip_forward", "1")])
        .unwrap();
    let nowhere = Ipv4Addr::new(10, 202, 0, 2);
    cluster
        .a
        .ns
        .netlink()
        .add_route(&Route::via(Ipv4Net::new(nowhere, 24).unwrap(), WORLD))
        .unwrap();
    let ping = icmp_socket(&cluster.a.pod, SockType::Datagram);
    // Network unreachable is no hard error: only IP_RECVERR reports it on the socket.
    nix::sys::socket::setsockopt(&ping, nix::sys::socket::sockopt::Ipv4RecvErr, &true).unwrap();
    ping.connect(SocketAddrV4::new(nowhere, 0)).unwrap();
    let sent = Instant::now();
    ping.send(&[ICMP_ECHO, 0, 0, 0, 0, 0, 0, 1]).unwrap();
    let err = ping.recv(&mut [0u8; 64]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENETUNREACH), "{err}");
    println!(
        "the router's network unreachable about the ping reached the pod after {:?}",
        sent.elapsed()
    );
}

/// The source address and identifier of the echo request with `seq` that `watcher`, a raw
/// ICMP socket, saw arrive (the IP header first).
fn echo_request_seen(watcher: &UdpSocket, seq: u16) -> (Ipv4Addr, u16) {
    let deadline = Instant::now() + TIMEOUT;
    let mut packet = [0u8; 128];
    while Instant::now() < deadline {
        let n = watcher
            .recv(&mut packet)
            .expect("an ICMP packet at the world host");
        let icmp = &packet[20..n];
        if icmp[0] == ICMP_ECHO && icmp[6..8] == seq.to_be_bytes() {
            let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            return (source, u16::from_be_bytes([icmp[4], icmp[5]]));
        }
    }
    panic!("no echo request {seq} reached the world host");
}
