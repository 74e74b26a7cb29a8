//! The topology of the external-frontend tests (nodeport.rs, nodeport_refusal.rs): a world
//! host and two nodes on an underlay bridge, every namespace the test's own:
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
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use aya::maps::lpm_trie::Key;
use sluice_common::{
    DropReason, EndpointInfo, IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD, IPPROTO_TCP,
    IPPROTO_UDP, IpcacheEntry, Lb4Key, Lb4Service, METRIC_DIR_INGRESS, NodeConfig, RoutingMode,
    SVC_FLAG_LOAD_BALANCER, SVC_FLAG_LOCAL, SVC_FLAG_NODE_PORT, addr_be,
};
use sluice_datapath::{AttachRole, Datapath, DatapathConfig, PinnedMaps};
use sluice_netns::{Ipv4Net, Route};

use crate::support::{self, NetNs, PinDir};

pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 2);
pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 2);
pub const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
pub const WORLD: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 100);
pub const WORLD_2: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 101);
pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const IDENTITY_A: u32 = 300;
pub const IDENTITY_B: u32 = 301;
pub const PORT: u16 = 8080;
/// NodePort to pod-a (this node), NodePort to pod-b (another node), and one with
/// externalTrafficPolicy Local and no local backend.
pub const NODE_PORT_LOCAL: u16 = 30080;
pub const NODE_PORT_REMOTE: u16 = 30081;
pub const NODE_PORT_NONE: u16 = 30082;
/// The LoadBalancer VIP's port, to pod-b.
pub const VIP_PORT: u16 = 80;
pub const UNDERLAY: &str = "underlay0";
pub const VXLAN: &str = "vxlan0";
pub const VXLAN_PORT: u16 = 8472;
pub const UNDERLAY_MTU: u32 = 1500;
pub const TUNNEL_MTU: u32 = UNDERLAY_MTU - 50;
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// One node: its namespace, its pod and its datapath's maps.
pub struct Node {
    pub ns: NetNs,
    pub pod: NetNs,
    pub maps: PinnedMaps,
    pub pins: PinDir,
}

impl Node {
    pub fn ipcache(&mut self, address: Ipv4Addr, identity: u32, tunnel_endpoint: Option<Ipv4Addr>) {
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
    pub fn frontend(
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

    pub fn metric(&self, reason: DropReason) -> u64 {
        self.maps
            .counted(reason.code(), METRIC_DIR_INGRESS)
            .unwrap()
            .packets
    }
}

/// The underlay bridge, the world host and the two nodes.
pub struct Cluster {
    pub world: NetNs,
    pub a: Node,
    pub b: Node,
    _underlay: NetNs,
}

/// Node `suffix` with its pod on 10.1.`subnet`.0/24, joined to the bridge in `underlay`
/// at `address`, with the datapath loaded and attached to the pod's veth, the underlay
/// device and (tunnel mode) its VXLAN device.
pub fn node(
    mode: RoutingMode,
    underlay: &NetNs,
    suffix: char,
    subnet: u8,
    address: Ipv4Addr,
) -> Node {
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
    // Tunnel mode as the agent runs it: the datapath's own VXLAN encapsulation.
    let mut config =
        NodeConfig::new(mode, tunnel_ifindex, underlay_ifindex).with_node_address(address);
    if mode == RoutingMode::Tunnel {
        config = config.with_tunnel_port(VXLAN_PORT);
    }
    maps.node_config.set(0, config, 0).unwrap();
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
    pub fn new(mode: RoutingMode) -> Self {
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

pub fn listen(pod: &NetNs) -> TcpListener {
    pod.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).unwrap())
}

pub fn connect(world: &NetNs, to: Ipv4Addr, port: u16) -> io::Result<TcpStream> {
    let to = SocketAddrV4::new(to, port);
    world.run(move || TcpStream::connect_timeout(&to.into(), TIMEOUT))
}

/// One request and answer over a new TCP connection from the world host to `to:port`:
/// the backend answers with the client address it saw, the client checks that the
/// answer came from the frontend. Returns the address the backend saw.
pub fn exchange(
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
pub fn udp_exchange(client: &UdpSocket, server: &UdpSocket, to: Ipv4Addr, port: u16) -> SocketAddr {
    client.connect((to, port)).unwrap();
    client.send(b"question").unwrap();
    let mut buf = [0u8; 64];
    let (_, peer) = server.recv_from(&mut buf).expect("datagram at the backend");
    server.send_to(b"answer", peer).unwrap();
    let n = client.recv(&mut buf).expect("answer from the frontend");
    assert_eq!(&buf[..n], b"answer");
    peer
}

pub fn udp_socket(netns: &NetNs, at: SocketAddrV4) -> UdpSocket {
    let socket = netns.run(move || UdpSocket::bind(at).unwrap());
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    socket
}
