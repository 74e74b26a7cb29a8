//! Nothing passes the pod programs unjudged but IPv4 and ARP: an IPv6 packet would bypass
//! policy and services, so until the datapath handles IPv6 it is dropped in both directions
//! and counted under its own reason (BPF_PROG_TEST_RUN, needs root; never skipped).
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use sluice_common::{
    DropReason, METRIC_DIR_EGRESS, METRIC_DIR_INGRESS,
    programs::{FROM_CONTAINER, TO_CONTAINER},
};
use sluice_datapath::PinnedMaps;
use support::{NODE_MAC, POD_MAC, TC_ACT_OK, TC_ACT_SHOT, run};

const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;

fn frame(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&NODE_MAC);
    frame.extend_from_slice(&POD_MAC);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An IPv6 header (fd00::2 -> fd00::3) carrying a TCP SYN to port 80.
fn ipv6_tcp_syn() -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[6, 64]);
    for last in [2u8, 3] {
        let mut addr = [0u8; 16];
        addr[0] = 0xfd;
        addr[15] = last;
        ip.extend_from_slice(&addr);
    }
    ip.extend_from_slice(&tcp);
    frame(ETH_P_IPV6, &ip)
}

/// An ARP request for 10.0.1.1 from 10.0.1.2.
fn arp_request() -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&POD_MAC);
    arp.extend_from_slice(&[10, 0, 1, 2]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 0, 1, 1]);
    frame(ETH_P_ARP, &arp)
}

fn dropped(maps: &PinnedMaps, reason: DropReason, dir: u32) -> u64 {
    maps.counted(reason.code(), dir).unwrap().packets
}

#[test]
fn ipv6_is_dropped_both_ways_and_counted() {
    let (pins, mut datapath) = support::load();
    let maps = PinnedMaps::open(pins.path()).unwrap();
    let packet = ipv6_tcp_syn();

    let out = run(datapath.program(FROM_CONTAINER).unwrap(), &packet);
    assert_eq!(out.verdict, TC_ACT_SHOT, "IPv6 leaving a pod");
    let out = run(datapath.program(TO_CONTAINER).unwrap(), &packet);
    assert_eq!(out.verdict, TC_ACT_SHOT, "IPv6 entering a pod");

    assert_eq!(dropped(&maps, DropReason::UnknownL3, METRIC_DIR_EGRESS), 1);
    assert_eq!(dropped(&maps, DropReason::UnknownL3, METRIC_DIR_INGRESS), 1);
}

#[test]
fn arp_passes_both_ways() {
    let (pins, mut datapath) = support::load();
    let maps = PinnedMaps::open(pins.path()).unwrap();
    let packet = arp_request();

    let out = run(datapath.program(FROM_CONTAINER).unwrap(), &packet);
    assert_eq!(out.verdict, TC_ACT_OK, "ARP leaving a pod");
    let out = run(datapath.program(TO_CONTAINER).unwrap(), &packet);
    assert_eq!(out.verdict, TC_ACT_OK, "ARP entering a pod");
    assert_eq!(dropped(&maps, DropReason::UnknownL3, METRIC_DIR_EGRESS), 0);
}

#[test]
fn other_l3_protocols_are_dropped() {
    let (pins, mut datapath) = support::load();
    let maps = PinnedMaps::open(pins.path()).unwrap();
    // An MPLS unicast frame: neither IPv4 nor ARP.
    let packet = frame(0x8847, &[0u8; 40]);
    let out = run(datapath.program(FROM_CONTAINER).unwrap(), &packet);
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(dropped(&maps, DropReason::UnknownL3, METRIC_DIR_EGRESS), 1);
}
