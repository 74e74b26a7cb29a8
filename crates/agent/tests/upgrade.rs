//! A new agent started on the pins an agent of the previous map layout left (the datapath
//! built with layout 1, `ObjectBuild::LayoutV1`): it migrates conntrack and the services,
//! says so in its log, keeps the connections' entries and realizes to a clean `verify`.
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::Ipv4Addr;

use aya::maps::{HashMap, Map, MapData, MapInfo};
use nix::time::{ClockId, clock_gettime};
use sluice_api::{Client, VerifyRequest};
use sluice_common::{
    CT_EGRESS, CT_FLAG_SEEN_REPLY, Ct4EntryV1, Ct4Key, IPPROTO_TCP, Lb4Key, Lb4ServiceV1,
    SVC_FLAG_CLUSTER_IP, names,
};
use sluice_datapath::{Datapath, DatapathConfig, ObjectBuild, PinDir, PinnedMaps};
use support::Agent;

fn open_hash<K: aya::Pod, V: aya::Pod>(pins: &PinDir, name: &str) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(pins.path().join(name)).unwrap();
    HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap()
}

#[test]
fn an_agent_on_layout_1_pins_migrates_them_and_verify_is_clean() {
    let pins = PinDir::unique("sluice-test-upgrade-");
    // The earlier agent's datapath: its maps, a frontend it realized and a connection its
    // programs tracked. Its loader exits; the pins stay.
    Datapath::load_build(
        pins.path(),
        &DatapathConfig::default(),
        ObjectBuild::LayoutV1,
    )
    .expect("loading the layout 1 datapath");
    let mut services: HashMap<MapData, Lb4Key, Lb4ServiceV1> = open_hash(&pins, names::SERVICES);
    let frontend = Lb4ServiceV1 {
        count: 2,
        flags: SVC_FLAG_CLUSTER_IP,
        ..Lb4ServiceV1::default()
    };
    let frontend_key = Lb4Key::new(support::vip(0), 80, IPPROTO_TCP, 0);
    services.insert(frontend_key, frontend, 0).unwrap();
    let mut conntrack: HashMap<MapData, Ct4Key, Ct4EntryV1> = open_hash(&pins, names::CONNTRACK);
    let connection = Ct4Key::new(
        (Ipv4Addr::new(10, 244, 0, 9), 40000),
        (Ipv4Addr::new(10, 244, 0, 1), 8080),
        IPPROTO_TCP,
        CT_EGRESS,
    );
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).unwrap();
    let now_ns = u64::try_from(now.tv_sec()).unwrap() * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap();
    let tracked = Ct4EntryV1 {
        created_ns: now_ns,
        last_seen_ns: now_ns,
        packets: 4_000_000_000,
        bytes: 123_456,
        flags: CT_FLAG_SEEN_REPLY,
        ifindex: 7,
        ..Ct4EntryV1::default()
    };
    conntrack.insert(connection, tracked, 0).unwrap();
    drop((services, conntrack));

    let snapshot = support::snapshot(1, 2);
    let mut agent =
        Agent::start_on_pins("upgrade", &snapshot, pins, &["--reconcile-interval", "0.5"]);
    agent.wait_realized(1);

    let log = agent.log_text();
    let migrated: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("pinned map migrated from an earlier layout"))
        .collect();
    println!("{}", migrated.join("\n"));
    assert_eq!(migrated.len(), 2, "{log}");
    assert!(migrated.iter().any(|l| l.contains("\"ct4\"")), "{log}");
    assert!(
        migrated.iter().any(|l| l.contains("\"lb4_services\"")),
        "{log}"
    );

    for (map, size) in [(names::CONNTRACK, 48), (names::SERVICES, 16)] {
        let info = MapInfo::from_pin(agent.pins.path().join(map)).unwrap();
        assert_eq!(info.value_size(), size, "{map}");
    }
    let maps = PinnedMaps::open(agent.pins.path()).expect("today's typed handles open");
    let entry = maps.conntrack.get(&connection, 0).expect("the connection");
    assert_eq!(entry.packets, 4_000_000_000);
    assert_eq!(entry.bytes, 123_456);
    assert_eq!(entry.flags, CT_FLAG_SEEN_REPLY);
    assert_eq!(entry.ifindex, 7);

    let report = Client::new(&agent.socket)
        .verify(VerifyRequest { repair: false })
        .expect("verify");
    assert!(report.drift.is_empty(), "{:?}", report.drift);

    // A restart on the migrated pins (its log starts anew) migrates nothing.
    agent.restart(&["--reconcile-interval", "0.5"]);
    agent.wait_realized(1);
    let log = agent.log_text();
    assert!(!log.contains("migrated from an earlier layout"), "{log}");
}
