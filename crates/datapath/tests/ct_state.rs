//! Conntrack states on crafted packets (BPF_PROG_TEST_RUN; needs root, never skipped):
//! every entry of a service connection leaves SYN when the backend answers, enters
//! closing with a FIN from either side, since their lifetimes follow those states, and is
//! removed by the last ACK once a FIN went each way; the lifetimes are the ones the loader
//! wrote into `ct_config`.
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddrV4};

use sluice_common::{
    CT_EGRESS, CT_FLAG_CLOSING, CT_FLAG_FIN_ORIGINAL, CT_FLAG_FIN_REPLY, CT_FLAG_SEEN_REPLY,
    CT_SERVICE, Ct4Key, CtConfig, IPPROTO_TCP,
    programs::{FROM_CONTAINER, TO_CONTAINER},
};
use sluice_datapath::{Datapath, DatapathConfig, PinDir, PinnedMaps};
use support::{TC_ACT_OK, TCP_ACK, TCP_FIN, TCP_SYN, run, tcp};

const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 2), 41000);
const FRONTEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 30), 80);
const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 8080);

fn flags(maps: &PinnedMaps, dst: SocketAddrV4, scope: u8) -> u8 {
    let key = Ct4Key::new(
        (*CLIENT.ip(), CLIENT.port()),
        (*dst.ip(), dst.port()),
        IPPROTO_TCP,
        scope,
    );
    maps.conntrack.get(&key, 0).unwrap().flags
}

#[test]
fn service_entries_follow_the_connection_through_its_states() {
    let (pins, mut datapath) = support::load();
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    support::add_service(&mut maps, FRONTEND, IPPROTO_TCP, &[BACKEND]);
    let mut step = |program: &str, packet: Vec<u8>| {
        let out = run(datapath.program(program).unwrap(), &packet);
        assert_eq!(out.verdict, TC_ACT_OK);
    };
    let both = |maps: &PinnedMaps| {
        [
            flags(maps, FRONTEND, CT_SERVICE),
            flags(maps, BACKEND, CT_EGRESS),
        ]
    };

    step(FROM_CONTAINER, tcp(CLIENT, FRONTEND, TCP_SYN, b""));
    assert_eq!(both(&maps), [0, 0], "SYN: no reply yet");

    step(TO_CONTAINER, tcp(BACKEND, CLIENT, TCP_SYN | TCP_ACK, b""));
    assert_eq!(
        both(&maps),
        [CT_FLAG_SEEN_REPLY, CT_FLAG_SEEN_REPLY],
        "established once the backend answered"
    );

    // The backend closes first: the client's choice of backend is closing too, its FIN
    // seen in the reply direction.
    step(TO_CONTAINER, tcp(BACKEND, CLIENT, TCP_FIN | TCP_ACK, b""));
    let closing = CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING | CT_FLAG_FIN_REPLY;
    assert_eq!(both(&maps), [closing, closing]);

    // The client's FIN: a FIN went each way.
    step(
        FROM_CONTAINER,
        tcp(CLIENT, FRONTEND, TCP_FIN | TCP_ACK, b""),
    );
    let closed = closing | CT_FLAG_FIN_ORIGINAL;
    assert_eq!(both(&maps), [closed, closed]);

    // The backend's last ACK ends the connection: both entries go at once.
    step(TO_CONTAINER, tcp(BACKEND, CLIENT, TCP_ACK, b""));
    for (dst, scope) in [(FRONTEND, CT_SERVICE), (BACKEND, CT_EGRESS)] {
        let key = Ct4Key::new(
            (*CLIENT.ip(), CLIENT.port()),
            (*dst.ip(), dst.port()),
            IPPROTO_TCP,
            scope,
        );
        assert!(
            maps.conntrack.get(&key, 0).is_err(),
            "scope {scope} left after the last ACK"
        );
    }
}

#[test]
fn the_loader_writes_the_configured_lifetimes() {
    let pins = PinDir::unique("sluice-test-");
    let ct_timeouts = CtConfig {
        tcp_syn_s: 7,
        tcp_established_s: 700,
        tcp_closing_s: 3,
        non_tcp_s: 70,
    };
    let config = DatapathConfig {
        ct_timeouts,
        ..DatapathConfig::default()
    };
    let _datapath = Datapath::load(pins.path(), &config).unwrap();
    let maps = PinnedMaps::open(pins.path()).unwrap();
    assert_eq!(maps.ct_config.get(&0, 0).unwrap(), ct_timeouts);

    // A restart with other flags: the new lifetimes apply to the connections kept.
    let _again = Datapath::load(pins.path(), &DatapathConfig::default()).unwrap();
    assert_eq!(maps.ct_config.get(&0, 0).unwrap(), CtConfig::default());
}
