//! Fuzzing from_container and to_container through BPF_PROG_TEST_RUN (needs root; never
//! skipped): seeded random and mutated frames (truncated, bad IHL, IP options, every
//! fragment shape, overlapping and tiny first fragments), each compared with a model of
//! the verdict (fuzz/model.rs); every translated frame's checksums must follow its
//! change, and nothing policy denies may pass but replies of admitted connections.
//!
//! from_netdev the same way, against its own model (fuzz/netdev.rs): NodePorts with a
//! local backend and without any, forged VXLAN from senders that are no node, and the
//! rest, which it must leave untouched.
//!
//! `fuzz_smoke` and `fuzz_netdev_smoke` run 20,000 frames each in CI;
//! `SLUICE_FUZZ_PACKETS=1000000 cargo test -p sluice-datapath --test fuzz_packets --
//! --ignored --nocapture` is the long run (`SLUICE_FUZZ_SEED` picks another seed).
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fuzz;
mod support;

use std::net::SocketAddrV4;

use fuzz::{
    Fixture,
    model::{Dir, Expect, Rewrite},
    new_model,
};
use sluice_common::DropReason;
use support::{NetNs, TC_ACT_OK, TC_ACT_SHOT, TCP_ACK, TCP_SYN, tcp, udp, world};

const SEED: u64 = 0x5eed_f022;

fn seed() -> u64 {
    std::env::var("SLUICE_FUZZ_SEED")
        .ok()
        .map(|s| {
            let s = s.trim_start_matches("0x");
            u64::from_str_radix(s, 16).unwrap_or_else(|e| panic!("SLUICE_FUZZ_SEED {s:?}: {e}"))
        })
        .unwrap_or(SEED)
}

/// Runs a campaign in a namespace of its own, prints its figures and fails on any
/// mismatch with the model.
fn fuzz(frames: u64) {
    run_campaign(frames, fuzz::campaign);
}

fn run_campaign(frames: u64, campaign: fn(u64, u64) -> fuzz::Report) {
    let seed = seed();
    let netns = NetNs::new();
    let report = netns.run(|| campaign(seed, frames));
    report.print(seed);
    assert!(
        report.failures.is_empty(),
        "{} frames differ from the model (seed {seed:#x}); first: {}",
        report.failures.len(),
        report.failures[0]
    );
}

#[test]
fn fuzz_smoke() {
    fuzz(20_000);
}

fn long_frames() -> u64 {
    std::env::var("SLUICE_FUZZ_PACKETS")
        .ok()
        .map(|n| {
            n.parse()
                .unwrap_or_else(|e| panic!("SLUICE_FUZZ_PACKETS {n:?}: {e}"))
        })
        .unwrap_or(1_000_000)
}

#[test]
#[ignore = "the long run: SLUICE_FUZZ_PACKETS frames (default 1,000,000)"]
fn fuzz_long() {
    fuzz(long_frames());
}

#[test]
fn fuzz_netdev_smoke() {
    run_campaign(20_000, fuzz::netdev::campaign);
}

#[test]
#[ignore = "the long run of from_netdev: SLUICE_FUZZ_PACKETS frames (default 1,000,000)"]
fn fuzz_netdev_long() {
    run_campaign(long_frames(), fuzz::netdev::campaign);
}

/// The from_netdev model on hand-made cases.
#[test]
fn the_netdev_model_reads_the_basic_cases() {
    use fuzz::netdev::{Expect as Netdev, NODE, NODE_PORT_LOCAL, NODE_PORT_NONE, NetdevModel};
    let mut model = NetdevModel::new();
    let client = SocketAddrV4::new(fuzz::WORLD_HOST, 40000);
    let node = |port| SocketAddrV4::new(NODE, port);
    assert_eq!(
        model.judge(&tcp(client, node(NODE_PORT_LOCAL), TCP_SYN, b"")),
        Netdev::Dnat(world::pod(8080))
    );
    assert_eq!(
        model.judge(&udp(client, node(NODE_PORT_NONE), b"x")),
        Netdev::Refused
    );
    assert_eq!(
        model.judge(&tcp(client, node(NODE_PORT_NONE), support::TCP_RST, b"")),
        Netdev::Drop(DropReason::NoService)
    );
    assert_eq!(model.judge(&udp(client, node(53), b"x")), Netdev::Pass);
    let forged = fuzz::netdev::forged_vxlan(world::PEER, world::POD_IDENTITY, 50000);
    assert_eq!(model.judge(&forged), Netdev::Pass);
}

/// The model itself on hand-made cases, so a fuzz failure is the datapath's.
#[test]
fn the_model_reads_the_basic_cases() {
    let mut model = new_model();
    let pod = |port| world::pod(port);
    let peer = |port| world::peer(port);
    let vip = SocketAddrV4::new(world::VIP, 80);
    // Egress to the service is translated to its backend, whose reply is translated back.
    assert_eq!(
        model.judge(Dir::Egress, &tcp(pod(40000), vip, TCP_SYN, b"")),
        Expect::Pass(Rewrite::Nat {
            src: pod(40000),
            dst: peer(8080)
        })
    );
    assert_eq!(
        model.judge(
            Dir::Ingress,
            &tcp(peer(8080), pod(40000), TCP_SYN | TCP_ACK, b"")
        ),
        Expect::Pass(Rewrite::Nat {
            src: vip,
            dst: pod(40000)
        })
    );
    // A peer's port the rows do not name is denied; a spoofed source is dropped.
    assert_eq!(
        model.judge(Dir::Ingress, &tcp(peer(40001), pod(81), TCP_SYN, b"")),
        Expect::Drop(DropReason::Policy)
    );
    assert_eq!(
        model.judge(Dir::Egress, &udp(peer(1), peer(1500), b"x")),
        Expect::Drop(DropReason::InvalidSource)
    );
}

/// The pod's UDP query to a frontend whose backend egress policy denies is dropped,
/// and a datagram that then claims to come from the frontend to the pod's port is
/// judged by ingress policy like any other: the pod never had a connection to answer.
#[test]
fn a_denied_service_connection_admits_no_reply_from_its_frontend() {
    let netns = NetNs::new();
    netns.run(|| {
        let mut fx = Fixture::new();
        let frontend = SocketAddrV4::new(world::VIP, 53);
        let query = udp(world::pod(40000), frontend, b"query");
        assert_eq!(fx.run(Dir::Egress, &query).verdict, TC_ACT_SHOT);
        let forged = udp(frontend, world::pod(40000), b"forged answer");
        assert_eq!(fx.run(Dir::Ingress, &forged).verdict, TC_ACT_SHOT);
        let policy = DropReason::Policy.code();
        for dir in [
            sluice_common::METRIC_DIR_EGRESS,
            sluice_common::METRIC_DIR_INGRESS,
        ] {
            assert_eq!(fx.maps.counted(policy, dir).unwrap().packets, 1);
        }
        // An admitted service connection's replies come from the backend.
        let syn = tcp(
            world::pod(40001),
            SocketAddrV4::new(world::VIP, 80),
            TCP_SYN,
            b"",
        );
        assert_eq!(fx.run(Dir::Egress, &syn).verdict, TC_ACT_OK);
    });
}
