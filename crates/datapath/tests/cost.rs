//! What the programs cost: translated instruction counts and the average time per packet
//! through BPF_PROG_TEST_RUN, with flow events off and on, printed for the README's
//! figures (run with `--nocapture`).
//! Needs root; never skipped.
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::{
    maps::{MapData, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use sluice_common::{
    ENDPOINT_F_EGRESS_ENFORCED, ENDPOINT_F_INGRESS_ENFORCED, EVENT_CONFIG_F_ENABLED,
    EVENT_POLICY_VERDICT, EVENT_TRACE, EndpointInfo, EventConfig, IDENTITY_ANY, IPPROTO_TCP,
    METRIC_DIR_EGRESS, METRIC_DIR_INGRESS, NodeConfig, POLICY_EGRESS, POLICY_INGRESS, PolicyKey,
    RoutingMode, event_counter_index,
    programs::{FROM_CONTAINER, FROM_NETDEV, TO_CONTAINER, TO_NETDEV},
};
use sluice_datapath::{Datapath, PinnedMaps, open_events};
use support::{TC_ACT_OK, TCP_ACK, TCP_SYN, tcp, udp};

const POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 2), 40000);
const PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 8080);
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
/// The test run's device: the loopback device, ifindex 1.
const IFINDEX: u32 = 1;
const REPEAT: u32 = 100_000;
/// New connections measured, each from its own source port. With events on, each writes
/// up to two events (verdict and trace); this many fit the 1 MiB ring (16,384 records),
/// so every event measured is really written rather than lost.
const REPEAT_NEW: u32 = 5_000;

/// Average nanoseconds per run of `program` on `packet` over `repeat` runs (the kernel
/// runs the same skb again, so the packet must reach a steady state after one run).
fn ns_per_run(program: &SchedClassifier, packet: &[u8], repeat: u32) -> f64 {
    let mut out = vec![0u8; packet.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(result.return_value, TC_ACT_OK);
    // The kernel reports the average per run.
    result.duration.as_nanos() as f64
}

/// Average nanoseconds per run over `count` packets that each start a new connection (a
/// repeated SYN on one tuple would be a retransmission of the same connection), each its
/// own test run. A single run also pays the test run's own overhead, `single_run_overhead`,
/// which is measured on an established packet and taken off.
fn ns_per_new_connection(
    program: &SchedClassifier,
    packet: impl Fn(u16) -> Vec<u8>,
    first_port: u16,
    count: u32,
    single_run_overhead: f64,
) -> f64 {
    let total: f64 = (0..count)
        .map(|i| ns_per_run(program, &packet(first_port + i as u16), 1))
        .sum();
    total / f64::from(count) - single_run_overhead
}

/// What a run of `packet` costs more when it is its own test run than when repeated.
fn single_run_overhead(program: &SchedClassifier, packet: &[u8], count: u32) -> f64 {
    let single: f64 = (0..count).map(|_| ns_per_run(program, packet, 1)).sum();
    single / f64::from(count) - ns_per_run(program, packet, REPEAT)
}

fn translated_insns(program: &SchedClassifier) -> u32 {
    let info = program.info().expect("program info");
    info.size_translated().expect("xlated size") / 8
}

/// What one pass measures, in ns per packet.
struct Costs {
    egress: f64,
    egress_new: f64,
    reply: f64,
    ingress: f64,
    ingress_new: f64,
}

/// One pass over the five kinds of packet; `ring` is drained before every measurement so
/// the events of new connections always find room.
/// New connections use source ports from `first_port` on, unused by earlier passes.
fn measure(datapath: &mut Datapath, ring: &mut RingBuf<MapData>, first_port: u16) -> Costs {
    let drain = |ring: &mut RingBuf<MapData>| while ring.next().is_some() {};
    let from = datapath.program(FROM_CONTAINER).unwrap();
    drain(ring);
    // Established connection to a pod (the first run creates it).
    let established = tcp(POD, PEER, TCP_ACK, b"data");
    let egress = ns_per_run(from, &established, REPEAT);
    let overhead = single_run_overhead(from, &established, REPEAT_NEW);
    drain(ring);
    // A new connection every time: a SYN from a new port is judged and creates its entry.
    let egress_new = ns_per_new_connection(
        from,
        |port| {
            tcp(
                SocketAddrV4::new(*POD.ip(), port),
                SocketAddrV4::new(*PEER.ip(), 9),
                TCP_SYN,
                b"",
            )
        },
        first_port,
        REPEAT_NEW,
        overhead,
    );
    let to = datapath.program(TO_CONTAINER).unwrap();
    drain(ring);
    // The reply of that connection.
    let reply = ns_per_run(to, &tcp(PEER, POD, TCP_ACK, b"data"), REPEAT);
    // Inbound connection, established.
    let inbound = SocketAddrV4::new(*PEER.ip(), 33000);
    drain(ring);
    let ingress = ns_per_run(
        to,
        &tcp(inbound, SocketAddrV4::new(*POD.ip(), 80), TCP_ACK, b"data"),
        REPEAT,
    );
    drain(ring);
    let ingress_new = ns_per_new_connection(
        to,
        |port| {
            tcp(
                SocketAddrV4::new(*inbound.ip(), port),
                SocketAddrV4::new(*POD.ip(), 81),
                TCP_SYN,
                b"",
            )
        },
        first_port,
        REPEAT_NEW,
        overhead,
    );
    drain(ring);
    Costs {
        egress,
        egress_new,
        reply,
        ingress,
        ingress_new,
    }
}

#[test]
fn cost_of_the_programs() {
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
    let mut ring = open_events(pins.path()).expect("open the events ring");
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

    let from_insns = translated_insns(datapath.program(FROM_CONTAINER).unwrap());
    let to_insns = translated_insns(datapath.program(TO_CONTAINER).unwrap());
    let mut set_events = |flags| {
        let config = EventConfig {
            flags,
            ..EventConfig::default()
        };
        maps.event_config.set(0, config, 0).unwrap();
    };
    set_events(0);
    let off = measure(&mut datapath, &mut ring, 10_000);
    // Unlimited: every new connection writes its events.
    set_events(EVENT_CONFIG_F_ENABLED);
    let on = measure(&mut datapath, &mut ring, 20_000);
    let emitted: u64 = [EVENT_TRACE, EVENT_POLICY_VERDICT]
        .into_iter()
        .flat_map(|type_| [(type_, METRIC_DIR_EGRESS), (type_, METRIC_DIR_INGRESS)])
        .map(|(type_, dir)| {
            let values = maps
                .event_counters
                .get(&event_counter_index(type_, dir), 0)
                .unwrap();
            values.iter().map(|c| c.emitted).sum::<u64>()
        })
        .sum();

    println!("from_container: {from_insns} translated instructions");
    println!("to_container: {to_insns} translated instructions");
    println!("ns/packet (BPF_PROG_TEST_RUN)   events off   events on");
    for (what, off, on) in [
        ("established egress", off.egress, on.egress),
        ("new egress (SYN)", off.egress_new, on.egress_new),
        ("reply (to_container)", off.reply, on.reply),
        ("established ingress", off.ingress, on.ingress),
        ("new ingress (SYN)", off.ingress_new, on.ingress_new),
    ] {
        println!("  {what:<28} {off:>10.0} {on:>11.0}");
    }
    println!("  ({emitted} events written with events on)");
    // Far below the verifier's limits; a jump here means something went wrong. (from_container
    // grew past 4,096 with the rev-DNAT of external frontends' replies, affinity and Maglev
    // selection, and SCTP's CRC32c subprograms, about 180 instructions; past 6,144 with eBPF
    // host routing, which runs to_container's endpoint_ingress before it delivers a packet
    // to a pod of the node, about 1,900; past 8,192 with the tuple from_container hands to
    // that endpoint_ingress instead of a second parse, about 150; past 8,704 with the flow
    // cache's array slots, about 110, its decisions for other nodes' pods, about 240, and
    // the removal of a closed connection's entries at its last ACK wherever an entry is
    // accounted, with the flow cache's decision dropped at a FIN, about 250.)
    assert!(from_insns < 9216 && to_insns < 6144);
    // Events on: every new connection wrote its verdict and trace (at least one run
    // of each measurement, whatever the CPU), established packets none.
    assert!(emitted >= u64::from(2 * REPEAT_NEW), "{emitted} events");
}

/// What from_netdev costs the underlay's other traffic, which it passes unchanged: a
/// pod's packet between nodes (native mode) and a VXLAN datagram to the node itself.
#[test]
fn cost_of_from_netdev_on_passing_traffic() {
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
    // A frontend in the map, so the lookup is not of an empty map.
    support::add_service(&mut maps, VIP, IPPROTO_TCP, &[PEER]);
    let program = datapath.program(FROM_NETDEV).unwrap();
    let node = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 1), 8472);
    let other_node = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 2), 40000);
    println!(
        "from_netdev: {} translated instructions",
        translated_insns(program)
    );
    for (what, packet) in [
        ("pod packet (native mode)", tcp(POD, PEER, TCP_ACK, b"data")),
        (
            "VXLAN datagram to the node",
            udp(other_node, node, b"vxlan"),
        ),
    ] {
        println!(
            "  {what:<28} {:>6.0} ns/packet",
            ns_per_run(program, &packet, REPEAT)
        );
    }
}

/// What to_netdev costs the node's traffic it passes (a VXLAN datagram to another node),
/// with masquerading off (only ICMP is parsed) and on (every packet is parsed and judged).
#[test]
fn cost_of_to_netdev_on_passing_traffic() {
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
    let node = Ipv4Addr::new(10, 200, 0, 1);
    let datagram = udp(
        SocketAddrV4::new(node, 40000),
        SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 2), 8472),
        b"vxlan",
    );
    let program = datapath.program(TO_NETDEV).unwrap();
    println!(
        "to_netdev: {} translated instructions",
        translated_insns(program)
    );
    for masquerade in [false, true] {
        let config = NodeConfig::new(RoutingMode::Native, 0, IFINDEX)
            .with_node_address(node)
            .with_masquerade(masquerade);
        maps.node_config.set(0, config, 0).unwrap();
        println!(
            "  VXLAN datagram, masquerade {:<5} {:>6.0} ns/packet",
            masquerade,
            ns_per_run(program, &datagram, REPEAT)
        );
    }
}
