//! Real packets between network namespaces through the attached datapath (needs root;
//! never skipped). Each test builds its own topology:
//!
//! ```text
//! client netns  eth0 10.0.1.2/24 ─veth─ lxc-c 10.0.1.1 ┐
//! backend netns eth0 10.0.2.2/24 ─veth─ lxc-b 10.0.2.1 ┴ node netns (forwarding, programs on lxc-*)
//! ```
//!
//! The VIP is configured nowhere: the client sends it to its default gateway, the node,
//! and from_container on lxc-c translates it.
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use aya::maps::lpm_trie::Key;
use sluice_common::{
    DropReason, ENDPOINT_F_INGRESS_ENFORCED, EndpointInfo, IDENTITY_HOST, IDENTITY_WORLD,
    IPPROTO_TCP, IPPROTO_UDP, IpcacheEntry, LOOPBACK_IPV4, METRIC_DIR_INGRESS, POLICY_INGRESS,
    PolicyEntry, PolicyKey, addr_be,
};
use sluice_datapath::{AttachRole, Datapath, DatapathConfig, PinnedMaps};
use sluice_netns::{Ipv4Net, Route};
use support::{NetNs, PinDir, Server, policy_row};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT_IDENTITY: u32 = 300;
const BACKEND_IDENTITY: u32 = 301;
const TIMEOUT: Duration = Duration::from_secs(3);

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

/// The three namespaces with the datapath attached to both lxc interfaces.
struct Topology {
    client: NetNs,
    backend: NetNs,
    maps: PinnedMaps,
    // Removing the pins detaches the programs and releases the maps.
    _pins: PinDir,
    node: NetNs,
}

impl Topology {
    fn new(lxc_tx_checksum: bool) -> Self {
        let node = NetNs::new();
        let client = NetNs::new();
        let backend = NetNs::new();
        node.ns()
            .set_sysctls(&[
                ("net.ipv4.ip_forward", "1"),
                // Rev-NATed replies come from the VIP, which has no route back; Cilium
                // turns rp_filter off for the same reason.
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ])
            .unwrap();
        let on_node = node.netlink();
        for (pod, lxc, subnet) in [(&client, "lxc-c", 1), (&backend, "lxc-b", 2)] {
            let gateway = Ipv4Addr::new(10, 0, subnet, 1);
            let in_pod = pod.netlink();
            on_node.add_veth(lxc, "eth0", Some(pod.ns())).unwrap();
            on_node
                .add_address(lxc, Ipv4Net::new(gateway, 24).unwrap().into())
                .unwrap();
            on_node.set_up(lxc).unwrap();
            let address = Ipv4Net::new(Ipv4Addr::new(10, 0, subnet, 2), 24).unwrap();
            in_pod.add_address("eth0", address.into()).unwrap();
            in_pod.set_up("eth0").unwrap();
            in_pod.add_route(&Route::default_via(gateway)).unwrap();
            if !lxc_tx_checksum {
                // Forces the kernel to finish partial checksums in software on the way
                // into the pod, which exposes incremental checksum mistakes.
                node.ns().set_tx_checksum(lxc, false).unwrap();
            }
        }

        let pins = PinDir::unique("sluice-test-");
        let pin_dir = pins.path().to_owned();
        node.run(move || {
            let mut datapath = Datapath::load(&pin_dir, &DatapathConfig::default()).expect("load");
            datapath
                .attach(AttachRole::PodVeth, "lxc-c")
                .expect("attach lxc-c");
            datapath
                .attach(AttachRole::PodVeth, "lxc-b")
                .expect("attach lxc-b");
            // The pinned links keep the programs attached once the loader is gone.
        });
        let maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
        Self {
            client,
            backend,
            maps,
            _pins: pins,
            node,
        }
    }

    /// The ifindex of `lxc` in the node namespace: its endpoint and policy key.
    fn ifindex(&self, lxc: &'static str) -> u32 {
        self.node
            .run(move || nix::net::if_::if_nametoindex(lxc))
            .unwrap_or_else(|err| panic!("if_nametoindex {lxc}: {err}"))
    }

    /// Registers both pods as endpoints (`backend_flags` on the backend) and gives the
    /// ipcache their identities, the node's addresses and the world, as the realizer does.
    fn add_endpoints(&mut self, backend_flags: u32) -> (u32, u32) {
        let client_ifindex = self.ifindex("lxc-c");
        let backend_ifindex = self.ifindex("lxc-b");
        let mut backend = EndpointInfo::new(BACKEND, BACKEND_IDENTITY);
        backend.flags = backend_flags;
        for (ifindex, endpoint) in [
            (client_ifindex, EndpointInfo::new(CLIENT, CLIENT_IDENTITY)),
            (backend_ifindex, backend),
        ] {
            self.maps.endpoints.insert(ifindex, endpoint, 0).unwrap();
        }
        for (address, prefixlen, identity) in [
            (CLIENT, 32, CLIENT_IDENTITY),
            (BACKEND, 32, BACKEND_IDENTITY),
            (Ipv4Addr::new(10, 0, 1, 1), 32, IDENTITY_HOST),
            (Ipv4Addr::new(10, 0, 2, 1), 32, IDENTITY_HOST),
            (Ipv4Addr::UNSPECIFIED, 0, IDENTITY_WORLD),
        ] {
            self.maps
                .ipcache
                .insert(
                    &Key::new(prefixlen, addr_be(address)),
                    IpcacheEntry::local(identity),
                    0,
                )
                .unwrap();
        }
        (client_ifindex, backend_ifindex)
    }
}

/// Answers every TCP connection with "<bind> saw <peer>" and closes it.
fn tcp_server(netns: &NetNs, bind: SocketAddrV4) -> Server {
    Server::tcp(netns, bind, move |mut conn, peer| {
        // The client may already have gone; that is its test's business.
        let _ = write!(conn, "{bind} saw {peer}");
    })
}

/// Answers every UDP datagram with "<bind> saw <peer>".
fn udp_server(netns: &NetNs, bind: SocketAddrV4) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready, is_ready) = mpsc::channel();
    let thread = netns.spawn({
        let stop = stop.clone();
        move || {
            let socket = UdpSocket::bind(bind).expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            ready.send(()).unwrap();
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                match socket.recv_from(&mut buf) {
                    Ok((_, peer)) => {
                        socket
                            .send_to(format!("{bind} saw {peer}").as_bytes(), peer)
                            .unwrap();
                    }
                    Err(err)
                        if matches!(
                            err.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(err) => panic!("recv_from: {err}"),
                }
            }
        }
    });
    is_ready.recv_timeout(TIMEOUT).expect("server ready");
    Server {
        stop,
        thread: Some(thread),
    }
}

/// Connects to `to`, returns what the server says and the local address used.
fn tcp_get(to: SocketAddrV4) -> io::Result<(String, std::net::SocketAddr)> {
    let mut stream = TcpStream::connect_timeout(&to.into(), TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok((reply, stream.local_addr()?))
}

/// Sends one datagram on a socket connected to `to` and returns the answer.
fn udp_ask(to: SocketAddrV4) -> io::Result<String> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(to)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send(b"question")?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn services_through_the_datapath(lxc_tx_checksum: bool) {
    let mut topo = Topology::new(lxc_tx_checksum);
    let web = SocketAddrV4::new(BACKEND, 8080);
    let dns = SocketAddrV4::new(BACKEND, 5353);
    let own = SocketAddrV4::new(CLIENT, 9090);
    support::add_service(&mut topo.maps, vip(80), IPPROTO_TCP, &[web]);
    support::add_service(&mut topo.maps, vip(53), IPPROTO_UDP, &[dns]);
    support::add_service(&mut topo.maps, vip(81), IPPROTO_TCP, &[]);
    support::add_service(&mut topo.maps, vip(54), IPPROTO_UDP, &[]);
    support::add_service(&mut topo.maps, vip(82), IPPROTO_TCP, &[own]);
    // A backend port nobody listens on: the backend's kernel answers port unreachable.
    let closed = SocketAddrV4::new(BACKEND, 5999);
    support::add_service(&mut topo.maps, vip(55), IPPROTO_UDP, &[closed]);
    let _web = tcp_server(&topo.backend, web);
    let _dns = udp_server(&topo.backend, dns);
    let _own = tcp_server(&topo.client, own);

    topo.client.run(move || {
        // TCP through the VIP, many connections: the backend sees the client's own
        // address, the client only ever talks to the VIP.
        for _ in 0..20 {
            let (reply, local) = tcp_get(vip(80)).expect("TCP through the VIP");
            assert_eq!(reply, format!("{web} saw {local}"));
        }
        // Straight to the backend, after the VIP connections (stale tuples must not
        // rev-NAT these replies).
        for _ in 0..5 {
            let (reply, local) = tcp_get(web).expect("TCP straight to the backend");
            assert_eq!(reply, format!("{web} saw {local}"));
        }

        // UDP on a connected socket only accepts the answer from the VIP.
        for _ in 0..5 {
            let reply = udp_ask(vip(53)).expect("UDP through the VIP");
            assert!(
                reply.starts_with(&format!("{dns} saw {CLIENT}:")),
                "{reply}"
            );
        }

        // A datagram over the MTU leaves in fragments: the later ones, with no UDP header,
        // follow their first fragment to the backend, which reassembles a valid datagram.
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect(vip(53)).unwrap();
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        socket.send(&[0x5a; 4000]).unwrap();
        let mut buf = [0u8; 1500];
        let n = socket
            .recv(&mut buf)
            .expect("answer to a fragmented datagram");
        let reply = String::from_utf8_lossy(&buf[..n]);
        assert!(
            reply.starts_with(&format!("{dns} saw {CLIENT}:")),
            "{reply}"
        );

        // No backends: refused at once rather than timing out.
        let started = Instant::now();
        let err = tcp_get(vip(81)).expect_err("no backends");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
        let err = udp_ask(vip(54)).expect_err("no backends");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        // The backend's own port unreachable reaches the socket only because its quoted
        // header was translated back to the frontend the socket is connected to.
        let err = udp_ask(vip(55)).expect_err("nobody listens on the backend port");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");

        // Hairpin: the pod reaches itself through its service.
        for _ in 0..5 {
            let (reply, local) = tcp_get(vip(82)).expect("hairpin");
            let local_port = local.port();
            assert_eq!(reply, format!("{own} saw {LOOPBACK_IPV4}:{local_port}"));
        }
    });
}

#[test]
fn services_work_with_default_offloads() {
    services_through_the_datapath(true);
}

#[test]
fn services_work_with_lxc_tx_checksum_off() {
    services_through_the_datapath(false);
}

/// `ping -c 2 -s <size>` from `netns` to `to`: whether replies came back.
fn ping(netns: &NetNs, to: Ipv4Addr, size: u16) -> bool {
    let status = netns
        .ns()
        .command("ping")
        .unwrap()
        .args(["-q", "-n", "-c", "2", "-i", "0.2", "-W", "1"])
        .args(["-s", &size.to_string(), &to.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running ping");
    status.success()
}

#[test]
fn ingress_policy_on_real_traffic() {
    let mut topo = Topology::new(true);
    let (_, backend_ifindex) = topo.add_endpoints(ENDPOINT_F_INGRESS_ENFORCED);
    let web = SocketAddrV4::new(BACKEND, 8080);
    let _web = tcp_server(&topo.backend, web);
    // The backend's policy: only its node may reach it, as every policy allows.
    let host = PolicyKey::any(IDENTITY_HOST, POLICY_INGRESS);
    let mut rows = support::install_policy(&mut topo.maps, backend_ifindex, &[host]);
    let mut add_row = |key: PolicyKey| {
        rows.insert(&policy_row(key), PolicyEntry::default(), 0)
            .unwrap()
    };

    // Denied, then allowed by a row written into the installed map, nothing restarted.
    topo.client.run(move || {
        let err = TcpStream::connect_timeout(&web.into(), Duration::from_millis(700))
            .expect_err("no row allows the client");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    });
    let tcp_row = PolicyKey::ports(CLIENT_IDENTITY, POLICY_INGRESS, IPPROTO_TCP, 8080, 16);
    add_row(tcp_row);
    topo.client.run(move || {
        let (reply, local) = tcp_get(web).expect("the row allows the client");
        assert_eq!(reply, format!("{web} saw {local}"));
    });

    // A ping of 3000 bytes leaves the client in three fragments (MTU 1500); a port row
    // does not admit ICMP.
    assert!(
        !ping(&topo.client, BACKEND, 3000),
        "ICMP needs a row for any protocol"
    );
    let any = PolicyKey::any(CLIENT_IDENTITY, POLICY_INGRESS);
    add_row(any);
    assert!(
        ping(&topo.client, BACKEND, 3000),
        "fragmented ping with the row"
    );
    let fragments = topo.maps.fragments.keys().count();
    assert!(fragments > 0, "the first fragments were recorded");
    let admitted = topo.maps.policy.get(&backend_ifindex, 0).unwrap();
    assert_eq!(
        admitted.get(&policy_row(any), 0).unwrap().packets,
        1,
        "one echo, judged once"
    );

    // Without the row a new ping (a new echo identifier) is dropped; TCP still passes.
    rows.remove(&policy_row(any)).unwrap();
    assert!(!ping(&topo.client, BACKEND, 3000), "the row is gone");
    topo.client
        .run(move || tcp_get(web).expect("the TCP row stays"));

    // Every loss was the policy's: no fragment went missing, no policy map was missing.
    let count = |reason: DropReason| -> u64 {
        topo.maps
            .counted(reason.code(), METRIC_DIR_INGRESS)
            .unwrap()
            .packets
    };
    assert!(count(DropReason::Policy) > 0);
    assert_eq!(count(DropReason::FragNotFound), 0);
    assert_eq!(count(DropReason::PolicyUnavailable), 0);
}

/// A pod's packets to a pod of its own node, through a service and back, are delivered
/// by the sender's from_container straight into the other pod (host routing): neither
/// pod's veth transmits them, and the replies are still rev-NATed to the VIP.
#[test]
fn a_service_between_two_pods_of_a_node_skips_the_stack_and_both_veths() {
    const ROUNDS: u64 = 200;
    let mut topo = Topology::new(true);
    topo.add_endpoints(0);
    let web = SocketAddrV4::new(BACKEND, 8080);
    support::add_service(&mut topo.maps, vip(80), IPPROTO_TCP, &[web]);
    let listener = topo.backend.run(move || TcpListener::bind(web).unwrap());
    let mut stream = topo
        .client
        .run(|| TcpStream::connect_timeout(&vip(80).into(), TIMEOUT))
        .expect("TCP through the VIP");
    let (mut accepted, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), CLIENT, "the backend sees the client");
    for socket in [&stream, &accepted] {
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        socket.set_nodelay(true).unwrap();
    }
    let mut byte = [0u8; 1];
    // The first round trip has the node resolve both pods' neighbour entries.
    stream.write_all(b"q").unwrap();
    accepted.read_exact(&mut byte).unwrap();
    accepted.write_all(b"a").unwrap();
    stream.read_exact(&mut byte).unwrap();

    let netfilter = support::NetfilterCounter::new(&topo.node, CLIENT, BACKEND);
    let before = [
        topo.backend.link_packets("eth0").0,
        topo.client.link_packets("eth0").0,
        topo.node.link_packets("lxc-b").1,
        topo.node.link_packets("lxc-c").1,
    ];
    for _ in 0..ROUNDS {
        stream.write_all(b"q").unwrap();
        accepted.read_exact(&mut byte).unwrap();
        accepted.write_all(b"a").unwrap();
        stream.read_exact(&mut byte).unwrap();
    }
    let after = [
        topo.backend.link_packets("eth0").0,
        topo.client.link_packets("eth0").0,
        topo.node.link_packets("lxc-b").1,
        topo.node.link_packets("lxc-c").1,
    ];
    let [backend_received, client_received, lxc_b_sent, lxc_c_sent] =
        [0, 1, 2, 3].map(|i| after[i] - before[i]);
    println!(
        "{ROUNDS} round trips through the VIP: backend received {backend_received} packets \
         ({lxc_b_sent} sent by lxc-b), client {client_received} ({lxc_c_sent} sent by lxc-c)"
    );
    assert!(backend_received >= ROUNDS && client_received >= ROUNDS);
    assert!(
        lxc_b_sent * 10 < backend_received && lxc_c_sent * 10 < client_received,
        "only the stack's packets cross the veths"
    );
    assert_eq!(
        netfilter.packets(),
        0,
        "the node's netfilter saw none of the pods' packets"
    );
    assert_eq!(
        stream.peer_addr().unwrap(),
        std::net::SocketAddr::V4(vip(80))
    );
}
