//! loadBalancerSourceRanges through BPF_PROG_TEST_RUN (needs root; never skipped): a load
//! balancer frontend flagged SVC_FLAG_SOURCE_RANGES admits only the sources its
//! `lb4_source_ranges` prefixes hold and drops the rest with DROP_NOT_IN_SRC_RANGE; the
//! Service's other frontends admit everyone. from_netdev, where clients outside the
//! cluster reach the frontend, checks the same ranges.
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::lpm_trie::Key;
use sluice_common::{
    DropReason, IPPROTO_TCP, IPPROTO_UDP, Lb4Key, Lb4Service, Lb4SourceRangeKey, METRIC_DIR_EGRESS,
    METRIC_DIR_INGRESS, SOURCE_RANGE_ALLOWED, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_SOURCE_RANGES,
    programs::{FROM_CONTAINER, FROM_NETDEV},
};
use sluice_datapath::{Datapath, PinnedMaps};
use support::{Frame, PinDir, TC_ACT_OK, TC_ACT_SHOT, TCP_SYN, run, tcp, udp};

const LB_VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 8443);

struct Fixture {
    datapath: Datapath,
    maps: PinnedMaps,
    _pins: PinDir,
}

impl Fixture {
    /// The ClusterIP frontend and a load balancer frontend restricted to `ranges`, both
    /// on port 443 of `proto` with one backend.
    fn new(proto: u8, ranges: &[(Ipv4Addr, u8)]) -> Self {
        let (pins, datapath) = support::load();
        let mut maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
        support::add_service(
            &mut maps,
            SocketAddrV4::new(CLUSTER_IP, 443),
            proto,
            &[BACKEND],
        );
        let lb = |slot| Lb4Key::new(LB_VIP, 443, proto, slot);
        maps.services
            .insert(lb(1), Lb4Service::slot(*BACKEND.ip(), BACKEND.port()), 0)
            .unwrap();
        maps.services
            .insert(
                lb(0),
                Lb4Service::frontend(1, SVC_FLAG_LOAD_BALANCER | SVC_FLAG_SOURCE_RANGES),
                0,
            )
            .unwrap();
        for &(source, prefix) in ranges {
            let key = Lb4SourceRangeKey::new(LB_VIP, 443, proto, source, prefix);
            maps.source_ranges
                .insert(&Key::new(key.prefixlen, key.range), SOURCE_RANGE_ALLOWED, 0)
                .unwrap();
        }
        Self {
            datapath,
            maps,
            _pins: pins,
        }
    }

    fn run_from_container(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        let out = run(self.datapath.program(FROM_CONTAINER).unwrap(), packet);
        (out.verdict, out.packet)
    }

    fn run_from_netdev(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        let out = run(self.datapath.program(FROM_NETDEV).unwrap(), packet);
        (out.verdict, out.packet)
    }

    /// Drops for a source outside the ranges, counted in `direction` (from_container
    /// counts egress from the pod, from_netdev ingress into the node).
    fn refused_in(&self, direction: u32) -> u64 {
        let reason = DropReason::NotInSrcRange.code();
        self.maps.counted(reason, direction).unwrap().packets
    }

    fn refused(&self) -> u64 {
        self.refused_in(METRIC_DIR_EGRESS)
    }
}

fn from(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

#[test]
fn a_load_balancer_frontend_admits_only_its_source_ranges() {
    let mut fx = Fixture::new(
        IPPROTO_TCP,
        &[
            (Ipv4Addr::new(10, 0, 1, 0), 24),
            (Ipv4Addr::new(203, 0, 113, 7), 32),
        ],
    );
    let lb = SocketAddrV4::new(LB_VIP, 443);
    for client in [from([10, 0, 1, 2], 40000), from([203, 0, 113, 7], 40001)] {
        let (verdict, packet) = fx.run_from_container(&tcp(client, lb, TCP_SYN, b""));
        assert_eq!(verdict, TC_ACT_OK, "{client} is in a range");
        assert_eq!(Frame(&packet).dst(), BACKEND, "{client}");
    }
    for client in [from([10, 0, 2, 2], 40002), from([203, 0, 113, 8], 40003)] {
        let (verdict, _) = fx.run_from_container(&tcp(client, lb, TCP_SYN, b""));
        assert_eq!(verdict, TC_ACT_SHOT, "{client} is outside every range");
    }
    assert_eq!(fx.refused(), 2);

    // The Service's ClusterIP frontend is not restricted.
    let cluster_ip = SocketAddrV4::new(CLUSTER_IP, 443);
    let (verdict, packet) =
        fx.run_from_container(&tcp(from([10, 0, 2, 2], 40004), cluster_ip, TCP_SYN, b""));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(Frame(&packet).dst(), BACKEND);
    assert_eq!(fx.refused(), 2);
}

#[test]
fn udp_is_checked_alike_and_no_range_admits_nobody() {
    // A flagged frontend without any range (every range IPv6, say) admits no IPv4 source.
    let mut fx = Fixture::new(IPPROTO_UDP, &[(Ipv4Addr::new(10, 0, 1, 0), 24)]);
    let lb = SocketAddrV4::new(LB_VIP, 443);
    let (verdict, packet) = fx.run_from_container(&udp(from([10, 0, 1, 2], 5000), lb, b"query"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(Frame(&packet).dst(), BACKEND);

    let mut nobody = Fixture::new(IPPROTO_TCP, &[]);
    let (verdict, _) =
        nobody.run_from_container(&tcp(from([10, 0, 1, 2], 40000), lb, TCP_SYN, b""));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(nobody.refused(), 1);
}

#[test]
fn clients_outside_the_cluster_are_held_to_the_ranges_too() {
    let mut fx = Fixture::new(IPPROTO_TCP, &[(Ipv4Addr::new(203, 0, 113, 0), 24)]);
    let lb = SocketAddrV4::new(LB_VIP, 443);
    let (verdict, packet) =
        fx.run_from_netdev(&tcp(from([203, 0, 113, 9], 40000), lb, TCP_SYN, b""));
    assert_eq!(verdict, TC_ACT_OK, "a source in the range is balanced");
    assert_eq!(Frame(&packet).dst(), BACKEND);

    let (verdict, _) = fx.run_from_netdev(&tcp(from([192, 0, 2, 9], 40001), lb, TCP_SYN, b""));
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "a source outside every range is dropped"
    );
    assert_eq!(fx.refused_in(METRIC_DIR_INGRESS), 1);
}
