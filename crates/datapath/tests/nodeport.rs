//! External frontends (NodePort, LoadBalancer VIP) reached from a world host outside the
//! cluster, through from_netdev on each node's underlay device, in both routing modes
//! (needs root; never skipped). Each test builds its own topology:
//!
//! ```text
//!                         world 10.200.0.100 (+ .101), route to the VIP via node-a
//!                                   │
//!                          ul namespace: bridge br0
//!                   ┌───────────────┴───────────────┐
//!        underlay0 10.200.0.1                 underlay0 10.200.0.2
//!   node-a (from_netdev, frontends)        node-b (from_netdev, no frontends)
//!   lxc-a ─ pod-a 10.1.1.2                 lxc-b ─ pod-b 10.1.2.2
//! ```
//!
//! node-a holds the frontends; pod-a is its local backend, pod-b a backend on another
//! node, reached SNATed to node-a's address. Sockets are opened inside a namespace and
//! used from the test's thread (a socket keeps the namespace it was made in).
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    io::{self, ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use aya::maps::lpm_trie::Key;
use sluice_common::{
    DropReason, EVENT_CONFIG_F_ENABLED, EVENT_DROP, EVENT_F_SERVICE, EVENT_TRACE, EndpointInfo,
    EventConfig, FlowEvent, IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD, IPPROTO_TCP,
    IPPROTO_UDP, IpcacheEntry, Lb4Key, Lb4Service, METRIC_DIR_INGRESS, NodeConfig, RoutingMode,
    SVC_FLAG_LOAD_BALANCER, SVC_FLAG_LOCAL, SVC_FLAG_NODE_PORT, addr_be, programs::FROM_NETDEV,
};
use sluice_datapath::{AttachRole, Datapath, DatapathConfig, PinnedMaps, open_events};
use sluice_netns::{Ipv4Net, Route};
use support::{Frame, NetNs, PinDir};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 2);
const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const WORLD: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 100);
const WORLD_2: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 101);
const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const IDENTITY_A: u32 = 300;
const IDENTITY_B: u32 = 301;
const PORT: u16 = 8080;
/// NodePort to pod-a (this node), NodePort to pod-b (another node), and one with
/// externalTrafficPolicy Local and no local backend.
const NODE_PORT_LOCAL: u16 = 30080;
const NODE_PORT_REMOTE: u16 = 30081;
const NODE_PORT_NONE: u16 = 30082;
/// The LoadBalancer VIP's port, to pod-b.
const VIP_PORT: u16 = 80;
const UNDERLAY: &str = "underlay0";
const VXLAN: &str = "vxlan0";
const VXLAN_PORT: u16 = 8472;
const UNDERLAY_MTU: u32 = 1500;
const TUNNEL_MTU: u32 = UNDERLAY_MTU - 50;
const TIMEOUT: Duration = Duration::from_secs(3);

/// One node: its namespace, its pod and its datapath's maps.
struct Node {
    ns: NetNs,
    pod: NetNs,
    maps: PinnedMaps,
    pins: PinDir,
}

impl Node {
    fn ipcache(&mut self, address: Ipv4Addr, identity: u32, tunnel_endpoint: Option<Ipv4Addr>) {
        let prefixlen = if address.is_unspecified() { 0 } else { 32 };
        let entry = IpcacheEntry {
            identity,
            tunnel_endpoint: tunnel_endpoint.map_or(0, addr_be),
        };
        self.maps
            .ipcache
            .insert(&Key::new(prefixlen, addr_be(address)), entry, 0)
            .unwrap();
    }

    /// Frontend `address:port/proto` with `flags` and `backends` (pods on PORT) in its
    /// slots, as the realizer writes it.
    fn frontend(
        &mut self,
        address: Ipv4Addr,
        port: u16,
        proto: u8,
        flags: u16,
        backends: &[Ipv4Addr],
    ) {
        for (slot, backend) in (1..).zip(backends) {
            self.maps
                .services
                .insert(
                    Lb4Key::new(address, port, proto, slot),
                    Lb4Service::slot(*backend, PORT),
                    0,
                )
                .unwrap();
            support::add_backend(&mut self.maps, SocketAddrV4::new(*backend, PORT), proto);
        }
        let count = u16::try_from(backends.len()).unwrap();
        self.maps
            .services
            .insert(
                Lb4Key::new(address, port, proto, 0),
                Lb4Service::frontend(count, flags),
                0,
            )
            .unwrap();
    }

    fn metric(&self, reason: DropReason) -> u64 {
        self.maps
            .counted(reason.code(), METRIC_DIR_INGRESS)
            .unwrap()
            .packets
    }
}

/// The underlay bridge, the world host and the two nodes.
struct Cluster {
    world: NetNs,
    a: Node,
    b: Node,
    _underlay: NetNs,
}

/// Node `suffix` with its pod on 10.1.`subnet`.0/24, joined to the bridge in `underlay`
/// at `address`, with the datapath loaded and attached to the pod's veth, the underlay
/// device and (tunnel mode) its VXLAN device.
fn node(mode: RoutingMode, underlay: &NetNs, suffix: char, subnet: u8, address: Ipv4Addr) -> Node {
    let ns = NetNs::new();
    let pod = NetNs::new();
    ns.ns()
        .set_sysctls(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ])
        .unwrap();
    let on_node = ns.netlink();
    let in_pod = pod.netlink();
    let lxc = format!("lxc-{suffix}");
    let gateway = Ipv4Addr::new(10, 1, subnet, 1);
    on_node.add_veth(&lxc, "eth0", Some(pod.ns())).unwrap();
    on_node
        .add_address(&lxc, Ipv4Net::new(gateway, 24).unwrap().into())
        .unwrap();
    on_node.set_up(&lxc).unwrap();
    let pod_address = Ipv4Addr::new(10, 1, subnet, 2);
    in_pod.set_mtu("eth0", TUNNEL_MTU).unwrap();
    in_pod
        .add_address("eth0", Ipv4Net::new(pod_address, 24).unwrap().into())
        .unwrap();
    in_pod.set_up("eth0").unwrap();
    in_pod.add_route(&Route::default_via(gateway)).unwrap();

    let port = format!("ul-{suffix}");
    on_node
        .add_veth(UNDERLAY, &port, Some(underlay.ns()))
        .unwrap();
    on_node
        .add_address(UNDERLAY, Ipv4Net::new(address, 24).unwrap().into())
        .unwrap();
    on_node.set_up(UNDERLAY).unwrap();
    underlay.netlink().set_controller(&port, "br0").unwrap();
    underlay.netlink().set_up(&port).unwrap();
    if mode == RoutingMode::Tunnel {
        on_node.add_vxlan_external(VXLAN, VXLAN_PORT).unwrap();
        on_node.set_mtu(VXLAN, TUNNEL_MTU).unwrap();
        on_node.set_arp(VXLAN, false).unwrap();
        on_node.set_up(VXLAN).unwrap();
    }

    let pins = PinDir::unique("sluice-test-");
    let pin_dir = pins.path().to_owned();
    let lxc_name = lxc.clone();
    let (lxc_ifindex, tunnel_ifindex, underlay_ifindex) = ns.run(move || {
        let mut datapath = Datapath::load(&pin_dir, &DatapathConfig::default()).expect("load");
        datapath
            .attach(AttachRole::PodVeth, &lxc_name)
            .expect("attach lxc");
        datapath
            .attach(AttachRole::Netdev, UNDERLAY)
            .expect("attach underlay");
        if mode == RoutingMode::Tunnel {
            datapath
                .attach(AttachRole::TunnelDevice, VXLAN)
                .expect("attach vxlan");
        }
        let index = |name: &str| nix::net::if_::if_nametoindex(name).unwrap_or(0);
        (index(&lxc_name), index(VXLAN), index(UNDERLAY))
    });
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    let identity = if suffix == 'a' {
        IDENTITY_A
    } else {
        IDENTITY_B
    };
    maps.endpoints
        .insert(lxc_ifindex, EndpointInfo::new(pod_address, identity), 0)
        .unwrap();
    maps.node_config
        .set(
            0,
            NodeConfig::new(mode, tunnel_ifindex, underlay_ifindex).with_node_address(address),
            0,
        )
        .unwrap();
    let mut node = Node {
        ns,
        pod,
        maps,
        pins,
    };
    node.ipcache(pod_address, identity, None);
    node.ipcache(address, IDENTITY_HOST, None);
    node.ipcache(gateway, IDENTITY_HOST, None);
    node.ipcache(Ipv4Addr::UNSPECIFIED, IDENTITY_WORLD, None);
    node
}

impl Cluster {
    fn new(mode: RoutingMode) -> Self {
        let underlay = NetNs::new();
        let bridge = underlay.netlink();
        bridge.add_bridge("br0").unwrap();
        bridge.set_up("br0").unwrap();
        let mut a = node(mode, &underlay, 'a', 1, NODE_A);
        let mut b = node(mode, &underlay, 'b', 2, NODE_B);
        for (node, pod, identity, other) in [
            (&mut a, POD_B, IDENTITY_B, NODE_B),
            (&mut b, POD_A, IDENTITY_A, NODE_A),
        ] {
            node.ipcache(pod, identity, Some(other));
            node.ipcache(other, IDENTITY_REMOTE_NODE, None);
        }

        let world = NetNs::new();
        let links = world.netlink();
        links
            .add_veth(UNDERLAY, "ul-w", Some(underlay.ns()))
            .unwrap();
        for address in [WORLD, WORLD_2] {
            links
                .add_address(UNDERLAY, Ipv4Net::new(address, 24).unwrap().into())
                .unwrap();
        }
        links.set_up(UNDERLAY).unwrap();
        bridge.set_controller("ul-w", "br0").unwrap();
        bridge.set_up("ul-w").unwrap();
        // The cloud's load balancer, played by a route: the VIP lives on node-a.
        links
            .add_route(&Route::via(Ipv4Net::new(VIP, 32).unwrap(), NODE_A))
            .unwrap();

        a.frontend(
            NODE_A,
            NODE_PORT_LOCAL,
            IPPROTO_TCP,
            SVC_FLAG_NODE_PORT,
            &[POD_A],
        );
        a.frontend(
            NODE_A,
            NODE_PORT_LOCAL,
            IPPROTO_UDP,
            SVC_FLAG_NODE_PORT,
            &[POD_A],
        );
        a.frontend(
            NODE_A,
            NODE_PORT_REMOTE,
            IPPROTO_TCP,
            SVC_FLAG_NODE_PORT,
            &[POD_B],
        );
        a.frontend(
            NODE_A,
            NODE_PORT_REMOTE,
            IPPROTO_UDP,
            SVC_FLAG_NODE_PORT,
            &[POD_B],
        );
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let local = SVC_FLAG_NODE_PORT | SVC_FLAG_LOCAL;
            a.frontend(NODE_A, NODE_PORT_NONE, proto, local, &[]);
            a.frontend(VIP, VIP_PORT, proto, SVC_FLAG_LOAD_BALANCER, &[POD_B]);
        }
        Self {
            world,
            a,
            b,
            _underlay: underlay,
        }
    }
}

fn listen(pod: &NetNs) -> TcpListener {
    pod.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).unwrap())
}

fn connect(world: &NetNs, to: Ipv4Addr, port: u16) -> io::Result<TcpStream> {
    let to = SocketAddrV4::new(to, port);
    world.run(move || TcpStream::connect_timeout(&to.into(), TIMEOUT))
}

/// One request and answer over a new TCP connection from the world host to `to:port`:
/// the backend answers with the client address it saw, the client checks that the
/// answer came from the frontend. Returns the address the backend saw.
fn exchange(
    world: &NetNs,
    listener: &TcpListener,
    to: Ipv4Addr,
    port: u16,
) -> io::Result<SocketAddr> {
    let mut stream = connect(world, to, port)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    assert_eq!(stream.peer_addr()?, SocketAddr::from((to, port)));
    let (mut accepted, peer) = listener.accept()?;
    accepted.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(b"ping")?;
    let mut request = [0u8; 4];
    accepted.read_exact(&mut request)?;
    accepted.write_all(b"pong")?;
    drop(accepted);
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    assert_eq!(answer, "pong");
    Ok(peer)
}

/// One datagram from `client` to `to:port` on a connected socket and its answer (the
/// socket accepts it only from the frontend). Returns the address the backend saw.
fn udp_exchange(client: &UdpSocket, server: &UdpSocket, to: Ipv4Addr, port: u16) -> SocketAddr {
    client.connect((to, port)).unwrap();
    client.send(b"question").unwrap();
    let mut buf = [0u8; 64];
    let (_, peer) = server.recv_from(&mut buf).expect("datagram at the backend");
    server.send_to(b"answer", peer).unwrap();
    let n = client.recv(&mut buf).expect("answer from the frontend");
    assert_eq!(&buf[..n], b"answer");
    peer
}

fn udp_socket(netns: &NetNs, at: SocketAddrV4) -> UdpSocket {
    let socket = netns.run(move || UdpSocket::bind(at).unwrap());
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    socket
}

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
    assert_eq!(trace.src_identity, IDENTITY_WORLD);
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
