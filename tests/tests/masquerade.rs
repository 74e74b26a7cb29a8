//! Egress masquerading (issue 11 item 8, GKE's ip-masq-agent) in a native-mode lab with
//! the real agents: a pod's connections to a world host on the internet leave with its
//! node's underlay address, to a world host in a nonMasqueradeCIDR with its own, and
//! `status` shows masquerading on with the CIDRs.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    thread::JoinHandle,
    time::Duration,
};

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

    // The flag and the exemptions the agents wrote are what they report as desired.
    lab.verify_every_node("masquerade");
    let status = lab.cli(&["status"]);
    assert!(
        status.contains("masquerade on") && status.contains("198.51.100.0/24"),
        "{status}"
    );
}
