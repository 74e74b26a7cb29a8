//! What the programs cost: translated instruction counts and the average time per packet
//! through BPF_PROG_TEST_RUN, printed for the README's figures (run with `--nocapture`).
//! Needs root; never skipped.
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use sluice_common::{
    ENDPOINT_F_EGRESS_ENFORCED, ENDPOINT_F_INGRESS_ENFORCED, EndpointInfo, IDENTITY_ANY,
    IPPROTO_TCP, POLICY_EGRESS, POLICY_INGRESS, PolicyKey,
    programs::{FROM_CONTAINER, TO_CONTAINER},
};
use sluice_datapath::PinnedMaps;
use support::{TC_ACT_OK, TCP_ACK, TCP_SYN, tcp};

const POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 2), 40000);
const PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 8080);
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
/// The test run's device: the loopback device, ifindex 1.
const IFINDEX: u32 = 1;
const REPEAT: u32 = 100_000;

/// Average nanoseconds per run of `program` on `packet` over `REPEAT` runs (the kernel
/// runs the same skb again, so the packet must reach a steady state after one run).
fn ns_per_run(program: &SchedClassifier, packet: &[u8]) -> f64 {
    let mut out = vec![0u8; packet.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat: REPEAT,
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(result.return_value, TC_ACT_OK);
    // The kernel reports the average per run.
    result.duration.as_nanos() as f64
}

fn translated_insns(program: &SchedClassifier) -> u32 {
    let info = program.info().expect("program info");
    info.size_translated().expect("xlated size") / 8
}

#[test]
fn cost_of_the_programs() {
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
    support::add_service(&mut maps, VIP, IPPROTO_TCP, &[PEER]);
    // An endpoint with both directions enforced and a row for each, the common case
    // once policy is in use.
    let mut endpoint = EndpointInfo::new(*POD.ip(), 300);
    endpoint.flags = ENDPOINT_F_INGRESS_ENFORCED | ENDPOINT_F_EGRESS_ENFORCED;
    maps.endpoints.insert(IFINDEX, endpoint, 0).unwrap();
    support::install_policy(
        &mut maps,
        IFINDEX,
        &[
            PolicyKey::any(IDENTITY_ANY, POLICY_INGRESS),
            PolicyKey::any(IDENTITY_ANY, POLICY_EGRESS),
        ],
    );

    let from = datapath.program(FROM_CONTAINER).unwrap();
    let from_insns = translated_insns(from);
    // Established connection to a pod (the first run creates it).
    let egress = ns_per_run(from, &tcp(POD, PEER, TCP_ACK, b"data"));
    // A new connection every time: a pure SYN is judged and creates its entry again.
    let egress_new = ns_per_run(
        from,
        &tcp(POD, SocketAddrV4::new(*PEER.ip(), 9), TCP_SYN, b""),
    );
    let to = datapath.program(TO_CONTAINER).unwrap();
    let to_insns = translated_insns(to);
    // The reply of that connection.
    let reply = ns_per_run(to, &tcp(PEER, POD, TCP_ACK, b"data"));
    // Inbound connection, established.
    let inbound = SocketAddrV4::new(*PEER.ip(), 33000);
    let ingress = ns_per_run(
        to,
        &tcp(inbound, SocketAddrV4::new(*POD.ip(), 80), TCP_ACK, b"data"),
    );
    let ingress_new = ns_per_run(
        to,
        &tcp(inbound, SocketAddrV4::new(*POD.ip(), 81), TCP_SYN, b""),
    );

    println!("from_container: {from_insns} translated instructions");
    println!("  established egress {egress:.0} ns/run, new egress (SYN) {egress_new:.0} ns/run");
    println!("to_container: {to_insns} translated instructions");
    println!(
        "  reply {reply:.0} ns/run, established ingress {ingress:.0} ns/run, new ingress (SYN) {ingress_new:.0} ns/run"
    );
    // Far below the verifier's limits; a jump here means something went wrong.
    assert!(from_insns < 4096 && to_insns < 4096);
}
