//! Egress masquerading (issue 11 item 8, GKE's ip-masq-agent) in a native-mode lab with
//! the real agents: a pod's connections to a world host on the internet leave with its
//! node's underlay address, to a world host in a nonMasqueradeCIDR with its own, its pings
//! to the internet come back (the echo identifier masqueraded and restored), and `status`
//! shows masquerading on with the CIDRs.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread::JoinHandle,
    time::Duration,
};

use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};

use sluice_integration::{
    TestLab, in_netns,
    multinode::{pod_on, underlay_address},
};

const INTERNET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const PARTNER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
const PORT: u16 = 8080;
const POD: &str = "default/client";

const LAB: &str = "apiVersion: sluice.dev/v1alpha1
kind: Lab
serviceCIDR: 10.96.0.0/16
clusterCIDR: 10.244.0.0/16
routingMode: native
txChecksumOffload: false
underlay: {cidr: 172.30.0.0/24, mtu: 1500}
masquerade:
  nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24]
nodes:
  - {name: node-1, podCIDR: 10.244.1.0/24}
  - {name: node-2, podCIDR: 10.244.2.0/24}
world:
  - {name: internet, address: 203.0.113.10, attach: underlay}
  - {name: partner, address: 198.51.100.9, attach: underlay}
";

/// A TCP server on world host `host` answering each of `connections` connections with
/// the peer address it saw.
fn serve_peers(lab: &TestLab, host: &str, connections: usize) -> JoinHandle<()> {
    let netns = lab.lab.netns_of(&format!("world/{host}")).unwrap();
    let listener = in_netns(&netns, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).unwrap()
    });
    std::thread::spawn(move || {
        for _ in 0..connections {
            let (mut stream, peer) = listener.accept().unwrap();
            stream.write_all(peer.ip().to_string().as_bytes()).unwrap();
        }
    })
}

/// The echo identifier of the pod's pings, below the SNAT range: node-1 gives them another.
const ECHO_ID: u16 = 4242;

/// The Internet checksum of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A raw ICMP socket in the calling thread's namespace, as a std socket: send_to, recv and
/// timeouts work on it as on UDP. It sees every ICMP message the namespace receives.
fn raw_icmp() -> UdpSocket {
    let raw = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::empty(),
        SockProtocol::Icmp,
    )
    .unwrap();
    let raw = UdpSocket::from(raw);
    raw.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    raw
}

/// Sends `count` echo requests with ECHO_ID to `to` and counts the replies to them from
/// `to` (identifier and sequence as sent).
fn ping(to: Ipv4Addr, count: u16) -> usize {
    let raw = raw_icmp();
    let mut replies = 0;
    for seq in 1..=count {
        let mut request = vec![8, 0, 0, 0];
        request.extend_from_slice(&ECHO_ID.to_be_bytes());
        request.extend_from_slice(&seq.to_be_bytes());
        request.extend_from_slice(b"sluice lab ping");
        let sum = checksum(&request);
        request[2..4].copy_from_slice(&sum.to_be_bytes());
        raw.send_to(&request, (to, 0)).unwrap();
        let mut packet = [0u8; 256];
        // The raw socket sees every ICMP message: wait for this request's reply.
        while let Ok(n) = raw.recv(&mut packet) {
            let (ip, icmp) = packet[..n].split_at(20);
            let from = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            if from == to && icmp[0] == 0 && icmp[4..8] == request[4..8] {
                replies += 1;
                break;
            }
        }
    }
    replies
}

/// The address `to` saw the pod's connection come from.
fn seen_from_pod(lab: &TestLab, to: Ipv4Addr) -> std::io::Result<String> {
    lab.in_pod(POD, move || {
        let addr = SocketAddr::from((to, PORT));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut seen = String::new();
        stream.read_to_string(&mut seen)?;
        Ok(seen)
    })
}

#[test]
fn pods_reach_the_internet_as_their_node_and_partners_as_themselves() {
    const CONNECTIONS: usize = 50;
    let mut lab = TestLab::up("masq", LAB);
    lab.apply_yaml(
        "client.yaml",
        &pod_on("default", "client", "node-1", "app: client"),
    );
    let node_1 = underlay_address(0).to_string();
    let pod = lab.pod_ip(POD).to_string();

    let internet = serve_peers(&lab, "internet", CONNECTIONS);
    for i in 0..CONNECTIONS {
        let seen = seen_from_pod(&lab, INTERNET)
            .unwrap_or_else(|e| panic!("connection {i} to the internet: {e}"));
        assert_eq!(seen, node_1, "the internet sees node-1's address");
    }
    internet.join().unwrap();

    let partner = serve_peers(&lab, "partner", 1);
    let seen = seen_from_pod(&lab, PARTNER).unwrap();
    assert_eq!(seen, pod, "a nonMasqueradeCIDR sees the pod's own address");
    partner.join().unwrap();

    // The internet sees node-1's address and another identifier, and answers node-1,
    // which gives the pod its identifier back.
    let internet_ns = lab.lab.netns_of("world/internet").unwrap();
    let watcher = in_netns(&internet_ns, raw_icmp);
    let replies = lab.in_pod(POD, || ping(INTERNET, 3));
    assert_eq!(replies, 3, "every ping to the internet answered");
    let mut packet = [0u8; 256];
    let n = watcher
        .recv(&mut packet)
        .expect("an echo request at the internet");
    let (ip, icmp) = packet[..n].split_at(20);
    assert_eq!(icmp[0], 8, "an echo request");
    assert_eq!(
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]).to_string(),
        node_1
    );
    let id = u16::from_be_bytes([icmp[4], icmp[5]]);
    assert!(id >= 32768, "an identifier from the SNAT range: {id}");

    // The flag and the exemptions the agents wrote are what they report as desired.
    lab.verify_every_node("masquerade");
    let status = lab.cli(&["status"]);
    assert!(
        status.contains("masquerade on") && status.contains("198.51.100.0/24"),
        "{status}"
    );
}
