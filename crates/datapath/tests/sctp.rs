//! SCTP through a service on crafted packets (BPF_PROG_TEST_RUN; this kernel has no SCTP
//! sockets): the port translation recomputes the CRC32c, checked against a reference
//! implementation here (needs root; never skipped).
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::{TestRun, TestRunOptions};
use sluice_common::{
    IPPROTO_SCTP,
    programs::{FROM_CONTAINER, TO_CONTAINER},
};
use sluice_datapath::PinnedMaps;
use support::{Frame, TC_ACT_OK, run, sctp};

const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 2), 40000);
const FRONTEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 3868);
const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 13868);

/// CRC32c (Castagnoli, reflected), bit by bit: an independent reading of RFC 4960
/// appendix B, sharing nothing with the datapath's nibble table.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Whether the SCTP packet's checksum field holds the CRC32c of the packet with that field
/// zero, least significant byte first (as Linux writes it).
fn sctp_crc_ok(l4: &[u8]) -> bool {
    let mut zeroed = l4.to_vec();
    zeroed[8..12].fill(0);
    l4[8..12] == crc32c(&zeroed).to_le_bytes()
}

/// An INIT chunk (type 1) with `extra` bytes of parameters, padded to 4 bytes.
fn init_chunk(extra: usize) -> Vec<u8> {
    let len = 20 + extra;
    let mut chunk = vec![1, 0];
    chunk.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
    chunk.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // initiate tag
    chunk.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    chunk.extend_from_slice(&[0, 10, 0, 10]); // streams
    chunk.extend_from_slice(&1u32.to_be_bytes()); // initial TSN
    chunk.extend((0..extra).map(|i| i as u8));
    chunk.resize(len.div_ceil(4) * 4, 0);
    chunk
}

#[test]
fn the_reference_crc_is_crc32c() {
    // The check value of CRC-32C (RFC 3720 uses the same polynomial).
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
}

#[test]
fn an_init_to_a_cluster_ip_leaves_with_the_backend_port_and_a_valid_crc() {
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    support::add_service(&mut maps, FRONTEND, IPPROTO_SCTP, &[BACKEND]);

    // A bare INIT, one spanning whole 64-byte chunks of the CRC loop and a tail, and one
    // near the MTU.
    for (n, extra) in [0usize, 108, 1400].into_iter().enumerate() {
        let client = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + n as u16);
        let init = sctp(client, FRONTEND, &init_chunk(extra));
        let out = run(datapath.program(FROM_CONTAINER).unwrap(), &init);
        assert_eq!(out.verdict, TC_ACT_OK);
        let frame = Frame(&out.packet);
        assert_eq!(frame.dst(), BACKEND, "DNAT to the backend's port");
        assert!(sctp_crc_ok(frame.l4()), "CRC32c after DNAT ({extra} bytes)");
        assert_eq!(
            frame.l4()[12..],
            Frame(&init).l4()[12..],
            "chunks untouched"
        );

        // The INIT ACK comes back from the backend's port as the frontend's.
        let mut ack_chunk = init_chunk(extra);
        ack_chunk[0] = 2;
        let ack = sctp(BACKEND, client, &ack_chunk);
        let out = run(datapath.program(TO_CONTAINER).unwrap(), &ack);
        assert_eq!(out.verdict, TC_ACT_OK);
        let frame = Frame(&out.packet);
        assert_eq!(frame.src(), FRONTEND, "reverse NAT to the frontend");
        assert!(
            sctp_crc_ok(frame.l4()),
            "CRC32c after reverse NAT ({extra} bytes)"
        );
    }
}

/// What the CRC costs: new SCTP and UDP connections of the same size through the same
/// service, each a single test run; the difference is mostly the CRC32c. Printed for the
/// notes (`--nocapture`), not asserted.
#[test]
fn cost_of_the_crc() {
    const RUNS: u16 = 300;
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    support::add_service(&mut maps, FRONTEND, IPPROTO_SCTP, &[BACKEND]);
    support::add_service(&mut maps, FRONTEND, sluice_common::IPPROTO_UDP, &[BACKEND]);
    let program = datapath.program(FROM_CONTAINER).unwrap();
    let chunk = init_chunk(1400);
    let time = |make: &dyn Fn(SocketAddrV4) -> Vec<u8>| {
        let packets: Vec<_> = (0..RUNS)
            .map(|i| make(SocketAddrV4::new(*CLIENT.ip(), 20000 + i)))
            .collect();
        let mut total = std::time::Duration::ZERO;
        for packet in &packets {
            let mut out = vec![0u8; packet.len() + 256];
            let result = program
                .test_run(TestRunOptions {
                    data_in: Some(packet),
                    data_out: Some(&mut out),
                    ..TestRunOptions::default()
                })
                .unwrap();
            assert_eq!(result.return_value, TC_ACT_OK);
            // The kernel's own time for the run, without the syscall around it.
            total += result.duration;
        }
        total / u32::from(RUNS)
    };
    // Once each first: the first runs pay for cold caches.
    time(&|client| sctp(client, FRONTEND, &chunk));
    let sctp_new = time(&|client| {
        sctp(
            SocketAddrV4::new(*client.ip(), client.port() + 2000),
            FRONTEND,
            &chunk,
        )
    });
    let udp_new = time(&|client| {
        support::udp(
            SocketAddrV4::new(*client.ip(), client.port() + 1000),
            FRONTEND,
            &chunk,
        )
    });
    eprintln!(
        "new connection through a service, {} bytes of L4: SCTP {sctp_new:?}, UDP {udp_new:?} \
         per test run (the difference is mostly the CRC32c)",
        chunk.len() + 12
    );
}
