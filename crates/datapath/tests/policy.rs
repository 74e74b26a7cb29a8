//! The policy verdict, anti-spoofing, ICMP echo and fragment tracking on crafted packets
//! through BPF_PROG_TEST_RUN (needs root; never skipped). Every test loads its own
//! datapath into its own pin dir.
//!
//! The test run's device is `lo` (ifindex 1), so the endpoint under test is the one keyed
//! by ifindex 1: the pod POD, whose from_container sees what it sends and whose
//! to_container sees what it receives.
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddrV4};

use sluice_common::{
    CT_INGRESS, Ct4Key, DropReason, ENDPOINT_F_EGRESS_ENFORCED, ENDPOINT_F_INGRESS_ENFORCED,
    ENDPOINT_F_POLICY_OVERFLOW, IDENTITY_ANY, IDENTITY_WORLD, IPPROTO_SCTP, IPPROTO_TCP,
    IPPROTO_UDP, LOOPBACK_IPV4, METRIC_DIR_EGRESS, METRIC_DIR_INGRESS, POLICY_EGRESS,
    POLICY_INGRESS, PolicyEntry, PolicyKey,
    programs::{FROM_CONTAINER, TO_CONTAINER},
};
use sluice_datapath::{Datapath, PinnedMaps, PolicyMap, create_policy_map};
use support::{
    ETH_HLEN, Frame, ICMP_ECHO, ICMP_ECHOREPLY, IPPROTO_ICMP, PinDir, RunResult, TC_ACT_OK,
    TC_ACT_REDIRECT, TC_ACT_SHOT, TCP_ACK, TCP_FIN, TCP_SYN, icmp_echo, policy_row, run, sctp, tcp,
    udp,
    world::{self, IFINDEX, PEER, PEER_IDENTITY, POD, STRANGER, STRANGER_IDENTITY, VIP, peer, pod},
};

const BOTH: u32 = ENDPOINT_F_INGRESS_ENFORCED | ENDPOINT_F_EGRESS_ENFORCED;

/// An exact-port row.
fn port_row(identity: u32, direction: u8, proto: u8, port: u16) -> PolicyKey {
    PolicyKey::ports(identity, direction, proto, port, 16)
}

struct Fixture {
    datapath: Datapath,
    maps: PinnedMaps,
    _pins: PinDir,
}

impl Fixture {
    /// A datapath with POD as the endpoint on IFINDEX (with `flags`) and the ipcache
    /// naming POD, PEER and STRANGER; everything else is world.
    fn new(flags: u32) -> Self {
        let (pins, datapath) = support::load();
        let maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
        let mut fx = Self {
            datapath,
            maps,
            _pins: pins,
        };
        world::install(&mut fx.maps, flags);
        fx
    }

    fn set_endpoint(&mut self, flags: u32) {
        world::set_endpoint(&mut self.maps, flags);
    }

    /// Installs a fresh policy map holding `rows` for the endpoint.
    fn policy(&mut self, rows: &[PolicyKey]) -> PolicyMap {
        support::install_policy(&mut self.maps, IFINDEX, rows)
    }

    /// The counters of an installed row.
    fn row(&self, key: PolicyKey) -> PolicyEntry {
        let map = self.maps.policy.get(&IFINDEX, 0).expect("installed policy");
        map.get(&policy_row(key), 0).expect("row")
    }

    fn run_from_container(&mut self, packet: &[u8]) -> RunResult {
        run(self.datapath.program(FROM_CONTAINER).unwrap(), packet)
    }

    fn run_to_container(&mut self, packet: &[u8]) -> RunResult {
        run(self.datapath.program(TO_CONTAINER).unwrap(), packet)
    }

    fn egress_verdict(&mut self, packet: &[u8]) -> u32 {
        self.run_from_container(packet).verdict
    }

    fn ingress_verdict(&mut self, packet: &[u8]) -> u32 {
        self.run_to_container(packet).verdict
    }

    /// Packets counted for `reason` in `dir`, summed over CPUs.
    fn metric(&self, reason: DropReason, dir: u32) -> u64 {
        self.metric_code(reason.code(), dir)
    }

    fn metric_code(&self, code: u8, dir: u32) -> u64 {
        self.maps.counted(code, dir).unwrap().packets
    }
}

#[test]
fn exact_port_row_allows_that_port_only() {
    let mut fx = Fixture::new(BOTH);
    let ingress = port_row(PEER_IDENTITY, POLICY_INGRESS, IPPROTO_TCP, 80);
    let egress = port_row(PEER_IDENTITY, POLICY_EGRESS, IPPROTO_UDP, 53);
    fx.policy(&[ingress, egress]);

    assert_eq!(
        fx.ingress_verdict(&tcp(peer(40000), pod(80), TCP_SYN, b"")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.ingress_verdict(&tcp(peer(40001), pod(81), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
    // Same port, other protocol; same port, other peer; same port, other direction.
    assert_eq!(
        fx.ingress_verdict(&udp(peer(40002), pod(80), b"x")),
        TC_ACT_SHOT
    );
    let stranger = SocketAddrV4::new(STRANGER, 40003);
    assert_eq!(
        fx.ingress_verdict(&tcp(stranger, pod(80), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
    assert_eq!(
        fx.egress_verdict(&tcp(pod(40004), peer(80), TCP_SYN, b"")),
        TC_ACT_SHOT
    );

    assert_eq!(
        fx.egress_verdict(&udp(pod(40005), peer(53), b"q")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.egress_verdict(&udp(pod(40006), peer(54), b"q")),
        TC_ACT_SHOT
    );
    // The world (no ipcache entry of its own) is not the peer.
    let world = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 53);
    assert_eq!(
        fx.egress_verdict(&udp(pod(40007), world, b"q")),
        TC_ACT_SHOT
    );

    assert_eq!(fx.metric(DropReason::Policy, METRIC_DIR_INGRESS), 3);
    assert_eq!(fx.metric(DropReason::Policy, METRIC_DIR_EGRESS), 3);
    assert_eq!(fx.metric_code(0, METRIC_DIR_INGRESS), 1);
    assert_eq!(fx.metric_code(0, METRIC_DIR_EGRESS), 1);
    // A denied connection leaves no conntrack entry behind.
    let key = Ct4Key::new((PEER, 40001), (POD, 81), IPPROTO_TCP, CT_INGRESS);
    assert!(fx.maps.conntrack.get(&key, 0).is_err());
}

#[test]
fn any_identity_row_matches_every_peer() {
    let mut fx = Fixture::new(ENDPOINT_F_INGRESS_ENFORCED);
    fx.policy(&[port_row(IDENTITY_ANY, POLICY_INGRESS, IPPROTO_TCP, 443)]);

    let world = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 40000);
    let stranger = SocketAddrV4::new(STRANGER, 40000);
    for from in [peer(40000), stranger, world] {
        assert_eq!(
            fx.ingress_verdict(&tcp(from, pod(443), TCP_SYN, b"")),
            TC_ACT_OK,
            "{from}"
        );
        assert_eq!(
            fx.ingress_verdict(&tcp(from, pod(444), TCP_SYN, b"")),
            TC_ACT_SHOT,
            "{from}"
        );
    }
}

#[test]
fn port_range_row_covers_its_prefix() {
    let mut fx = Fixture::new(ENDPOINT_F_INGRESS_ENFORCED);
    // endPort 8080..=8087 is one prefix: the top 13 bits of 8080.
    let range = PolicyKey::ports(PEER_IDENTITY, POLICY_INGRESS, IPPROTO_TCP, 8080, 13);
    assert_eq!(range.port_range(), Some((8080, 8087)));
    fx.policy(&[range]);

    for (port, verdict) in [
        (8079, TC_ACT_SHOT),
        (8080, TC_ACT_OK),
        (8083, TC_ACT_OK),
        (8087, TC_ACT_OK),
        (8088, TC_ACT_SHOT),
    ] {
        let syn = tcp(peer(41000 + port % 100), pod(port), TCP_SYN, b"");
        assert_eq!(fx.ingress_verdict(&syn), verdict, "port {port}");
    }
    assert_eq!(fx.row(range).packets, 3);
}

#[test]
fn any_protocol_and_any_port_rows() {
    let mut fx = Fixture::new(ENDPOINT_F_INGRESS_ENFORCED);
    fx.policy(&[
        PolicyKey::any(PEER_IDENTITY, POLICY_INGRESS),
        PolicyKey::any_port(STRANGER_IDENTITY, POLICY_INGRESS, IPPROTO_UDP),
    ]);
    assert_eq!(
        fx.ingress_verdict(&tcp(peer(1), pod(2), TCP_SYN, b"")),
        TC_ACT_OK
    );
    assert_eq!(fx.ingress_verdict(&udp(peer(3), pod(4), b"x")), TC_ACT_OK);
    let stranger = |port| SocketAddrV4::new(STRANGER, port);
    assert_eq!(
        fx.ingress_verdict(&udp(stranger(5), pod(6), b"x")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.ingress_verdict(&tcp(stranger(7), pod(8), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
}

#[test]
fn denied_connections_are_counted_as_policy_drops() {
    let mut fx = Fixture::new(BOTH);
    fx.policy(&[]);
    let syn = tcp(peer(40000), pod(80), TCP_SYN, b"");
    for _ in 0..3 {
        assert_eq!(fx.ingress_verdict(&syn), TC_ACT_SHOT);
    }
    // Not established by being tried: later segments of it are judged, and dropped, too.
    assert_eq!(
        fx.ingress_verdict(&tcp(peer(40000), pod(80), TCP_ACK, b"data")),
        TC_ACT_SHOT
    );
    assert_eq!(
        fx.egress_verdict(&tcp(pod(40001), peer(80), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
    assert_eq!(fx.metric(DropReason::Policy, METRIC_DIR_INGRESS), 4);
    assert_eq!(fx.metric(DropReason::Policy, METRIC_DIR_EGRESS), 1);
    assert_eq!(fx.metric_code(0, METRIC_DIR_INGRESS), 0);
}

#[test]
fn unenforced_direction_passes_without_a_policy_map() {
    let mut fx = Fixture::new(ENDPOINT_F_INGRESS_ENFORCED);
    // No policy map at all: egress is not enforced, so it does not need one...
    assert_eq!(
        fx.egress_verdict(&tcp(pod(40000), peer(80), TCP_SYN, b"")),
        TC_ACT_OK
    );
    // ...and the enforced ingress fails closed.
    assert_eq!(
        fx.ingress_verdict(&tcp(peer(40001), pod(80), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
    assert_eq!(
        fx.metric(DropReason::PolicyUnavailable, METRIC_DIR_INGRESS),
        1
    );

    // No endpoint entry at all (an interface sluice does not manage): nothing enforced.
    let mut fx = Fixture::new(0);
    fx.maps.endpoints.remove(&IFINDEX).unwrap();
    assert_eq!(
        fx.ingress_verdict(&tcp(peer(40002), pod(80), TCP_SYN, b"")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.egress_verdict(&tcp(pod(40003), peer(80), TCP_SYN, b"")),
        TC_ACT_OK
    );
}

#[test]
fn overflow_fails_closed_in_enforced_directions() {
    let mut fx = Fixture::new(ENDPOINT_F_INGRESS_ENFORCED | ENDPOINT_F_POLICY_OVERFLOW);
    // Even a map that would allow everything is not used once the flag is set.
    fx.policy(&[
        PolicyKey::any(IDENTITY_ANY, POLICY_INGRESS),
        PolicyKey::any(IDENTITY_ANY, POLICY_EGRESS),
    ]);
    assert_eq!(
        fx.ingress_verdict(&tcp(peer(40000), pod(80), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
    assert_eq!(
        fx.metric(DropReason::PolicyUnavailable, METRIC_DIR_INGRESS),
        1
    );
    // Egress is not enforced.
    assert_eq!(
        fx.egress_verdict(&tcp(pod(40001), peer(80), TCP_SYN, b"")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.metric(DropReason::PolicyUnavailable, METRIC_DIR_EGRESS),
        0
    );
}

#[test]
fn enforced_without_a_policy_map_fails_closed() {
    let mut fx = Fixture::new(ENDPOINT_F_EGRESS_ENFORCED);
    assert_eq!(
        fx.egress_verdict(&udp(pod(40000), peer(53), b"q")),
        TC_ACT_SHOT
    );
    assert_eq!(
        fx.metric(DropReason::PolicyUnavailable, METRIC_DIR_EGRESS),
        1
    );

    // Installed, it decides; removed again, the endpoint fails closed again.
    fx.policy(&[port_row(PEER_IDENTITY, POLICY_EGRESS, IPPROTO_UDP, 53)]);
    assert_eq!(
        fx.egress_verdict(&udp(pod(40001), peer(53), b"q")),
        TC_ACT_OK
    );
    fx.maps.policy.remove(&IFINDEX).unwrap();
    assert_eq!(
        fx.egress_verdict(&udp(pod(40002), peer(53), b"q")),
        TC_ACT_SHOT
    );
    assert_eq!(
        fx.metric(DropReason::PolicyUnavailable, METRIC_DIR_EGRESS),
        2
    );
}

#[test]
fn row_counters_count_admitted_connections() {
    let mut fx = Fixture::new(ENDPOINT_F_INGRESS_ENFORCED);
    let row = port_row(PEER_IDENTITY, POLICY_INGRESS, IPPROTO_TCP, 80);
    let any = PolicyKey::any(IDENTITY_ANY, POLICY_INGRESS);
    fx.policy(&[row]);
    assert_eq!(fx.row(row), PolicyEntry::default());

    let mut bytes = 0;
    for port in 40000..40005 {
        let syn = tcp(peer(port), pod(80), TCP_SYN, b"");
        bytes += syn.len() as u64;
        assert_eq!(fx.ingress_verdict(&syn), TC_ACT_OK);
        // The rest of the connection is established: not judged, not counted.
        assert_eq!(
            fx.ingress_verdict(&tcp(peer(port), pod(80), TCP_ACK, b"more")),
            TC_ACT_OK
        );
    }
    assert_eq!(fx.row(row), PolicyEntry { packets: 5, bytes });

    // The identity's own row is preferred to the row for any peer.
    fx.policy(&[row, any]);
    assert_eq!(
        fx.ingress_verdict(&tcp(peer(41000), pod(80), TCP_SYN, b"")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.ingress_verdict(&tcp(peer(41001), pod(81), TCP_SYN, b"")),
        TC_ACT_OK
    );
    assert_eq!(fx.row(row).packets, 1);
    assert_eq!(fx.row(any).packets, 1);
}

#[test]
fn replies_pass_when_the_reverse_direction_has_no_rows() {
    let mut fx = Fixture::new(BOTH);
    fx.policy(&[
        port_row(PEER_IDENTITY, POLICY_EGRESS, IPPROTO_TCP, 80),
        port_row(PEER_IDENTITY, POLICY_INGRESS, IPPROTO_UDP, 5353),
    ]);

    // Out and back: ingress has no TCP row, the reply passes.
    assert_eq!(
        fx.egress_verdict(&tcp(pod(40000), peer(80), TCP_SYN, b"")),
        TC_ACT_OK
    );
    let synack = tcp(peer(80), pod(40000), TCP_SYN | TCP_ACK, b"");
    assert_eq!(fx.ingress_verdict(&synack), TC_ACT_OK);
    assert_eq!(
        fx.ingress_verdict(&tcp(peer(80), pod(40000), TCP_ACK, b"data")),
        TC_ACT_OK
    );
    // In and back: egress has no UDP row, the answer passes.
    assert_eq!(
        fx.ingress_verdict(&udp(peer(40001), pod(5353), b"q")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.egress_verdict(&udp(pod(5353), peer(40001), b"answer")),
        TC_ACT_OK
    );

    // The same packets without the connection before them are new, and denied.
    assert_eq!(
        fx.ingress_verdict(&tcp(peer(80), pod(40002), TCP_ACK, b"data")),
        TC_ACT_SHOT
    );
    assert_eq!(
        fx.egress_verdict(&udp(pod(5353), peer(40003), b"answer")),
        TC_ACT_SHOT
    );
}

#[test]
fn established_connections_survive_a_row_removal() {
    let mut fx = Fixture::new(ENDPOINT_F_INGRESS_ENFORCED);
    let row = port_row(PEER_IDENTITY, POLICY_INGRESS, IPPROTO_TCP, 80);
    fx.policy(&[row]);
    assert_eq!(
        fx.ingress_verdict(&tcp(peer(40000), pod(80), TCP_SYN, b"")),
        TC_ACT_OK
    );

    fx.policy(&[]);
    assert_eq!(
        fx.ingress_verdict(&tcp(peer(40000), pod(80), TCP_ACK, b"data")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.ingress_verdict(&tcp(peer(40000), pod(80), TCP_FIN | TCP_ACK, b"")),
        TC_ACT_OK
    );
    // A new connection on the same tuple (a pure SYN after the close) is judged again.
    assert_eq!(
        fx.ingress_verdict(&tcp(peer(40000), pod(80), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
}

#[test]
fn service_connections_are_judged_against_the_backend() {
    let mut fx = Fixture::new(ENDPOINT_F_EGRESS_ENFORCED);
    let backend = peer(8080);
    support::add_service(
        &mut fx.maps,
        SocketAddrV4::new(VIP, 80),
        IPPROTO_TCP,
        &[backend],
    );
    let to_vip = |port| tcp(pod(port), SocketAddrV4::new(VIP, 80), TCP_SYN, b"");

    // Rows for the service's own address or port do not allow it.
    fx.policy(&[
        port_row(PEER_IDENTITY, POLICY_EGRESS, IPPROTO_TCP, 80),
        port_row(IDENTITY_WORLD, POLICY_EGRESS, IPPROTO_TCP, 80),
    ]);
    assert_eq!(fx.egress_verdict(&to_vip(40000)), TC_ACT_SHOT);
    assert_eq!(fx.metric(DropReason::Policy, METRIC_DIR_EGRESS), 1);

    // The backend's row does.
    let row = port_row(PEER_IDENTITY, POLICY_EGRESS, IPPROTO_TCP, 8080);
    fx.policy(&[row]);
    let out = fx.run_from_container(&to_vip(40001));
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(Frame(&out.packet).dst(), backend);
    assert_eq!(fx.row(row).packets, 1);
    // Established through the service: the next segment is not judged again.
    let ack = tcp(pod(40001), SocketAddrV4::new(VIP, 80), TCP_ACK, b"data");
    assert_eq!(fx.egress_verdict(&ack), TC_ACT_OK);
    assert_eq!(fx.row(row).packets, 1);
    // And the reply is rev-NATed, with ingress enforced and no ingress rows.
    fx.set_endpoint(BOTH);
    let out = fx.run_to_container(&tcp(backend, pod(40001), TCP_SYN | TCP_ACK, b""));
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(Frame(&out.packet).src(), SocketAddrV4::new(VIP, 80));
}

#[test]
fn hairpin_is_never_judged() {
    let mut fx = Fixture::new(BOTH);
    fx.policy(&[]);
    let own = pod(9090);
    let frontend = SocketAddrV4::new(VIP, 82);
    support::add_service(&mut fx.maps, frontend, IPPROTO_TCP, &[own]);

    let out = fx.run_from_container(&tcp(pod(40000), frontend, TCP_SYN, b""));
    assert_eq!(out.verdict, TC_ACT_OK);
    let looped = out.packet;
    assert_eq!(
        Frame(&looped).src(),
        SocketAddrV4::new(LOOPBACK_IPV4, 40000)
    );
    assert_eq!(fx.ingress_verdict(&looped), TC_ACT_OK);
    let reply = tcp(
        own,
        SocketAddrV4::new(LOOPBACK_IPV4, 40000),
        TCP_SYN | TCP_ACK,
        b"",
    );
    assert_eq!(fx.egress_verdict(&reply), TC_ACT_REDIRECT);

    // A forged loopback source with no hairpin connection behind it is judged.
    let forged = tcp(SocketAddrV4::new(LOOPBACK_IPV4, 40001), own, TCP_SYN, b"");
    assert_eq!(fx.ingress_verdict(&forged), TC_ACT_SHOT);
    assert_eq!(fx.metric(DropReason::Policy, METRIC_DIR_INGRESS), 1);
}

#[test]
fn spoofed_sources_are_dropped() {
    let mut fx = Fixture::new(0);
    let spoofed = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 99), 40000);
    assert_eq!(
        fx.egress_verdict(&tcp(spoofed, peer(80), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
    assert_eq!(
        fx.egress_verdict(&udp(spoofed, peer(53), b"q")),
        TC_ACT_SHOT
    );
    let ping = icmp_echo(*spoofed.ip(), PEER, ICMP_ECHO, 7, b"");
    assert_eq!(fx.egress_verdict(&ping), TC_ACT_SHOT);
    // IPv4 of any other protocol too (47, GRE).
    let mut gre = support::ipv4_header(*spoofed.ip(), PEER, 47, 4);
    gre.extend_from_slice(&[0; 4]);
    let gre = support::ethernet(support::POD_MAC, support::NODE_MAC, &gre);
    assert_eq!(fx.egress_verdict(&gre), TC_ACT_SHOT);
    assert_eq!(fx.metric(DropReason::InvalidSource, METRIC_DIR_EGRESS), 4);

    // Its own address passes; packets entering the pod are not checked.
    assert_eq!(
        fx.egress_verdict(&tcp(pod(40000), peer(80), TCP_SYN, b"")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.ingress_verdict(&tcp(spoofed, pod(80), TCP_SYN, b"")),
        TC_ACT_OK
    );
    // An interface that is no endpoint is not checked.
    fx.maps.endpoints.remove(&IFINDEX).unwrap();
    assert_eq!(
        fx.egress_verdict(&tcp(spoofed, peer(80), TCP_SYN, b"")),
        TC_ACT_OK
    );
}

#[test]
fn icmp_echo_is_tracked_and_judged_without_ports() {
    let mut fx = Fixture::new(BOTH);
    // Rows for ports do not match ICMP...
    fx.policy(&[
        port_row(PEER_IDENTITY, POLICY_INGRESS, IPPROTO_TCP, 0),
        PolicyKey::any_port(PEER_IDENTITY, POLICY_INGRESS, IPPROTO_UDP),
    ]);
    let request = icmp_echo(PEER, POD, ICMP_ECHO, 0x78, b"ping");
    assert_eq!(fx.ingress_verdict(&request), TC_ACT_SHOT);
    assert_eq!(fx.metric(DropReason::Policy, METRIC_DIR_INGRESS), 1);

    // ...a row for any protocol does.
    let row = PolicyKey::any(PEER_IDENTITY, POLICY_INGRESS);
    fx.policy(&[row]);
    assert_eq!(fx.ingress_verdict(&request), TC_ACT_OK);
    assert_eq!(fx.row(row).packets, 1);
    // The reply leaves with egress enforced and no egress rows: it is the same "connection"
    // (the echo identifier is both ports).
    let reply = icmp_echo(POD, PEER, ICMP_ECHOREPLY, 0x78, b"ping");
    assert_eq!(fx.egress_verdict(&reply), TC_ACT_OK);
    // Another identifier is another connection: a request out is judged, and denied.
    let out = icmp_echo(POD, PEER, ICMP_ECHO, 0x79, b"ping");
    assert_eq!(fx.egress_verdict(&out), TC_ACT_SHOT);
    // The next request of the allowed echo is established.
    assert_eq!(fx.ingress_verdict(&request), TC_ACT_OK);
    assert_eq!(fx.row(row).packets, 1);
    let key = Ct4Key::new((PEER, 0x78), (POD, 0x78), IPPROTO_ICMP, CT_INGRESS);
    assert_eq!(fx.maps.conntrack.get(&key, 0).unwrap().packets, 3);

    // ICMP errors are not connections of their own: they pass.
    let mut error = support::ipv4_header(PEER, POD, IPPROTO_ICMP, 8);
    error.extend_from_slice(&[3, 1, 0xfc, 0xfe, 0, 0, 0, 0]);
    let error = support::ethernet(support::POD_MAC, support::NODE_MAC, &error);
    assert_eq!(fx.ingress_verdict(&error), TC_ACT_OK);
}

/// A GRE packet (protocol 47, no ports) between two addresses.
fn gre(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut ip = support::ipv4_header(src, dst, IPPROTO_GRE, 4);
    ip.extend_from_slice(&[0, 0, 0x08, 0x00]);
    support::ethernet(support::POD_MAC, support::NODE_MAC, &ip)
}

const IPPROTO_GRE: u8 = 47;

#[test]
fn protocols_without_ports_are_tracked_by_address() {
    let mut fx = Fixture::new(BOTH);
    fx.policy(&[port_row(PEER_IDENTITY, POLICY_INGRESS, IPPROTO_TCP, 80)]);
    assert_eq!(fx.ingress_verdict(&gre(PEER, POD)), TC_ACT_SHOT);
    assert_eq!(fx.metric(DropReason::Policy, METRIC_DIR_INGRESS), 1);

    // Rows for the protocol, or for any protocol, admit it; its answers follow.
    fx.policy(&[PolicyKey::any_port(
        PEER_IDENTITY,
        POLICY_INGRESS,
        IPPROTO_GRE,
    )]);
    assert_eq!(fx.ingress_verdict(&gre(PEER, POD)), TC_ACT_OK);
    assert_eq!(fx.egress_verdict(&gre(POD, PEER)), TC_ACT_OK);
    let key = Ct4Key::new((PEER, 0), (POD, 0), IPPROTO_GRE, CT_INGRESS);
    assert_eq!(fx.maps.conntrack.get(&key, 0).unwrap().packets, 2);
    // Another peer is another connection.
    assert_eq!(fx.egress_verdict(&gre(POD, STRANGER)), TC_ACT_SHOT);

    // To a service address it is not balanced, nor refused as an unknown port.
    support::add_service(
        &mut fx.maps,
        SocketAddrV4::new(VIP, 80),
        IPPROTO_TCP,
        &[peer(80)],
    );
    fx.set_endpoint(0);
    let out = fx.run_from_container(&gre(POD, VIP));
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.packet, gre(POD, VIP));
}

#[test]
fn later_fragment_without_its_first_is_dropped() {
    let mut fx = Fixture::new(0);
    let datagram = udp(peer(40000), pod(53), &[0x42; 64]);
    let [_, later] = support::fragment(&datagram, 32);
    assert_eq!(fx.ingress_verdict(&later), TC_ACT_SHOT);
    assert_eq!(fx.egress_verdict(&later), TC_ACT_SHOT);
    assert_eq!(fx.metric(DropReason::FragNotFound, METRIC_DIR_INGRESS), 1);
    assert_eq!(fx.metric(DropReason::FragNotFound, METRIC_DIR_EGRESS), 1);
}

#[test]
fn fragments_follow_their_first_fragment() {
    let mut fx = Fixture::new(ENDPOINT_F_INGRESS_ENFORCED);
    let row = port_row(PEER_IDENTITY, POLICY_INGRESS, IPPROTO_UDP, 5353);
    fx.policy(&[row]);

    let allowed = udp(peer(40000), pod(5353), &[0x42; 100]);
    let [first, later] = support::fragment(&allowed, 48);
    for fragment in [&first, &later] {
        let out = fx.run_to_container(fragment);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(&out.packet, fragment, "passes untouched");
    }
    assert_eq!(fx.row(row).packets, 1, "judged once, on the first fragment");
    let key = Ct4Key::new((PEER, 40000), (POD, 5353), IPPROTO_UDP, CT_INGRESS);
    let entry = fx.maps.conntrack.get(&key, 0).unwrap();
    assert_eq!(entry.packets, 2);
    assert_eq!(entry.bytes, (first.len() + later.len()) as u64);

    // A denied datagram: both fragments are dropped.
    let mut denied = udp(peer(40001), pod(5354), &[0x42; 100]);
    denied[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&0x4321u16.to_be_bytes());
    let [first, later] = support::fragment(&denied, 48);
    assert_eq!(fx.ingress_verdict(&first), TC_ACT_SHOT);
    assert_eq!(fx.ingress_verdict(&later), TC_ACT_SHOT);
    assert_eq!(fx.metric(DropReason::Policy, METRIC_DIR_INGRESS), 2);

    // ICMP echo fragments (a large ping) follow the echo identifier.
    fx.policy(&[PolicyKey::any(PEER_IDENTITY, POLICY_INGRESS)]);
    let ping = icmp_echo(PEER, POD, ICMP_ECHO, 0x99, &[0x33; 200]);
    let [first, later] = support::fragment(&ping, 104);
    assert_eq!(fx.ingress_verdict(&first), TC_ACT_OK);
    assert_eq!(fx.ingress_verdict(&later), TC_ACT_OK);
    let key = Ct4Key::new((PEER, 0x99), (POD, 0x99), IPPROTO_ICMP, CT_INGRESS);
    assert_eq!(fx.maps.conntrack.get(&key, 0).unwrap().packets, 2);
}

#[test]
fn service_fragments_are_translated_as_their_datagram() {
    let mut fx = Fixture::new(ENDPOINT_F_EGRESS_ENFORCED);
    let backend = peer(5353);
    let frontend = SocketAddrV4::new(VIP, 53);
    support::add_service(&mut fx.maps, frontend, IPPROTO_UDP, &[backend]);
    fx.policy(&[port_row(PEER_IDENTITY, POLICY_EGRESS, IPPROTO_UDP, 5353)]);

    let payload: Vec<u8> = (0..200u8).collect();
    let datagram = udp(pod(40000), frontend, &payload);
    let [first, later] = support::fragment(&datagram, 64);
    let first_out = fx.run_from_container(&first);
    let later_out = fx.run_from_container(&later);
    assert_eq!(first_out.verdict, TC_ACT_OK);
    assert_eq!(later_out.verdict, TC_ACT_OK);
    for out in [&first_out.packet, &later_out.packet] {
        assert_eq!(Frame(out).dst_ip(), PEER);
        assert!(support::ip_checksum_ok(out));
    }
    // The later fragment's payload is left alone; reassembled, the datagram is the
    // translated one with a right checksum.
    assert_eq!(&later_out.packet[ETH_HLEN + 20..], &later[ETH_HLEN + 20..]);
    let mut l4 = first_out.packet[ETH_HLEN + 20..].to_vec();
    l4.extend_from_slice(&later_out.packet[ETH_HLEN + 20..]);
    assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), 5353);
    assert!(support::l4_checksum_ok(POD, PEER, IPPROTO_UDP, &l4));
}

#[test]
fn sctp_is_judged_by_port_and_left_unrewritten() {
    let mut fx = Fixture::new(BOTH);
    fx.policy(&[port_row(PEER_IDENTITY, POLICY_INGRESS, IPPROTO_SCTP, 9000)]);

    let init = sctp(peer(40000), pod(9000), &[1, 0, 0, 4]);
    let out = fx.run_to_container(&init);
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.packet, init, "no checksum rewrite");
    let answer = sctp(pod(9000), peer(40000), &[2, 0, 0, 4]);
    let out = fx.run_from_container(&answer);
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.packet, answer);

    assert_eq!(
        fx.ingress_verdict(&sctp(peer(40001), pod(9001), &[1, 0, 0, 4])),
        TC_ACT_SHOT
    );
    assert_eq!(
        fx.egress_verdict(&sctp(pod(40002), peer(9000), &[1, 0, 0, 4])),
        TC_ACT_SHOT
    );
    // A truncated common header is malformed.
    let short = sctp(peer(40003), pod(9000), b"")[..ETH_HLEN + 20 + 8].to_vec();
    let mut short = short;
    short[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&28u16.to_be_bytes());
    assert_eq!(fx.ingress_verdict(&short), TC_ACT_SHOT);
    assert_eq!(fx.metric(DropReason::Invalid, METRIC_DIR_INGRESS), 1);
}

#[test]
fn policy_maps_of_any_capacity_fit_the_outer_map() {
    let mut fx = Fixture::new(ENDPOINT_F_INGRESS_ENFORCED);
    for capacity in [8, 65536] {
        let mut rows = create_policy_map(capacity).unwrap();
        for port in 0..8 {
            let key = port_row(PEER_IDENTITY, POLICY_INGRESS, IPPROTO_TCP, 80 + port);
            rows.insert(&policy_row(key), PolicyEntry::default(), 0)
                .unwrap();
        }
        if capacity == 8 {
            let ninth = port_row(PEER_IDENTITY, POLICY_INGRESS, IPPROTO_TCP, 88);
            assert!(
                rows.insert(&policy_row(ninth), PolicyEntry::default(), 0)
                    .is_err()
            );
        }
        fx.maps.policy.insert(IFINDEX, &rows, 0).unwrap();
        let syn = tcp(peer(40000), pod(87), TCP_SYN, b"");
        assert_eq!(fx.ingress_verdict(&syn), TC_ACT_OK, "capacity {capacity}");
        let syn = tcp(peer(40001), pod(88), TCP_SYN, b"");
        assert_eq!(fx.ingress_verdict(&syn), TC_ACT_SHOT, "capacity {capacity}");
    }
}
