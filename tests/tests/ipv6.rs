//! Until the datapath handles IPv6, IPv6 to or from a pod must not pass unjudged (it would
//! bypass policy): real sockets over the kernel's link-local IPv6 addresses between a pod and
//! its node are refused by the pod programs, counted under UNKNOWN_L3, while IPv4 between the
//! same two namespaces works.

// A test binary: a failed step in a helper must fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::{
    fs,
    net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use sluice_common::{DropReason, METRIC_DIR_EGRESS, METRIC_DIR_INGRESS};
use sluice_datapath::PinnedMaps;
use sluice_integration::{ONE_NODE_LAB, TestLab, examples, in_netns};

const PORT: u16 = 7431;

/// `IFA_F_TENTATIVE`: duplicate address detection has not finished, so the address cannot
/// be used yet.
const IFA_F_TENTATIVE: u32 = 0x40;

/// The usable link-local IPv6 address of `ifname` in the calling thread's netns, waiting
/// for duplicate address detection (a second or two after the link comes up).
fn link_local_address(ifname: &str) -> Ipv6Addr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let table = fs::read_to_string("/proc/thread-self/net/if_inet6").unwrap_or_default();
        // Columns: address, ifindex, prefix length, scope, flags, name.
        let found = table.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [addr, _, _, _, flags, name] = fields.as_slice() else {
                return None;
            };
            let addr = Ipv6Addr::from(u128::from_str_radix(addr, 16).ok()?);
            let flags = u32::from_str_radix(flags, 16).ok()?;
            (*name == ifname && addr.segments()[0] == 0xfe80 && flags & IFA_F_TENTATIVE == 0)
                .then_some(addr)
        });
        if let Some(addr) = found {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "no usable link-local address on {ifname}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ifindex(ifname: &str) -> u32 {
    nix::net::if_::if_nametoindex(ifname).unwrap()
}

/// Connects from the calling thread's netns, one try with a short timeout.
fn connects(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(1500)).is_ok()
}

fn dropped(lab: &TestLab, dir: u32) -> u64 {
    let maps = PinnedMaps::open(&lab.lab.pin_dir(&lab.node())).unwrap();
    maps.counted(DropReason::UnknownL3.code(), dir)
        .unwrap()
        .packets
}

#[test]
fn a_pod_cannot_use_ipv6_and_the_drops_are_counted() {
    let mut lab = TestLab::up("ipv6", ONE_NODE_LAB);
    lab.lab
        .apply(&[examples().join("client.yaml")])
        .unwrap_or_else(|e| panic!("apply client: {e}"));
    let endpoints = lab.cli_json(&["endpoint", "list"]);
    let veth = endpoints[0]["interface"].as_str().unwrap().to_string();
    let node_netns = lab.lab.node_netns(&lab.node());

    // A listener in the node's namespace on every address, IPv4 and IPv6.
    let (listener, node_link_local) = {
        let veth = veth.clone();
        in_netns(&node_netns, move || {
            let listener = TcpListener::bind(("::", PORT)).unwrap();
            (listener, link_local_address(&veth))
        })
    };
    let gateway = lab
        .lab
        .pods()
        .into_iter()
        .find(|p| p.name == "client")
        .and_then(|p| p.ip)
        .map(|ip| {
            let [a, b, c, _] = ip.octets();
            std::net::Ipv4Addr::new(a, b, c, 1)
        })
        .unwrap();

    let (ipv4_ok, ipv6_ok, pod_link_local) = lab.in_pod("default/client", move || {
        let ipv4 = connects(SocketAddr::from((gateway, PORT)));
        let own = link_local_address("eth0");
        let ipv6 = connects(SocketAddr::V6(SocketAddrV6::new(
            node_link_local,
            PORT,
            0,
            ifindex("eth0"),
        )));
        (ipv4, ipv6, own)
    });
    assert!(ipv4_ok, "IPv4 from the pod to its node must work");
    assert!(!ipv6_ok, "IPv6 from the pod must not pass");
    assert!(
        dropped(&lab, METRIC_DIR_EGRESS) > 0,
        "counted as UNKNOWN_L3"
    );

    // And the other way: the node cannot reach the pod over IPv6.
    let pod_listener = lab.in_pod("default/client", || {
        TcpListener::bind(("::", PORT)).unwrap()
    });
    let reached = in_netns(&node_netns, move || {
        connects(SocketAddr::V6(SocketAddrV6::new(
            pod_link_local,
            PORT,
            0,
            ifindex(&veth),
        )))
    });
    assert!(!reached, "IPv6 to the pod must not pass");
    assert!(
        dropped(&lab, METRIC_DIR_INGRESS) > 0,
        "counted as UNKNOWN_L3"
    );
    drop((listener, pod_listener));
}
