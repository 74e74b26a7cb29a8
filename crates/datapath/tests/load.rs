//! Loading, pinning and reusing the maps (needs root and bpffs; never skipped).

mod support;

use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData};
use sluice_common::{CT_EGRESS, Ct4Entry, Ct4Key, IPPROTO_TCP, MapId, names, programs};
use sluice_datapath::{Datapath, DatapathConfig, DatapathError, PinnedMaps};
use support::PinDir;

#[test]
fn load_pins_every_map_and_reports_program_sizes() {
    let pins = PinDir::unique("sluice-test-");
    let config = DatapathConfig {
        ct_max_entries: 4096,
        lb_max_entries: 300_000,
        ..DatapathConfig::default()
    };
    let mut datapath = Datapath::load(pins.path(), &config).expect("load");

    let maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
    assert_eq!(
        maps.capacities(),
        [
            (names::SERVICES, 300_000),
            (names::BACKENDS, 300_000),
            (names::CONNTRACK, 4096),
            (names::ENDPOINTS, 4096),
            (names::METRICS, 512),
            (names::IPCACHE, 1 << 19),
            (names::POLICY, 4096),
            (names::FRAGMENTS, 8192),
            (names::EVENTS, 1 << 20),
            (names::EVENT_CONFIG, 1),
            (names::EVENT_BUCKET, 1),
            (names::EVENT_COUNTERS, 16),
            (names::NODE_CONFIG, 1),
            (names::REVNAT_SOCKETS, 65536),
            (names::SOURCE_RANGES, 65536),
            (names::CT_CONFIG, 1),
            (names::AFFINITY, 65536),
            (names::MAGLEV, 8192),
            (names::NON_MASQ_CIDRS, 1024),
            (names::CT_STATS, 1),
            (names::FLOW_CACHE, 65536),
            (names::FLOW_GENERATION, 1),
            (names::FLOW_STATS, 1),
            (names::FLOW_NOTES, 1),
            (names::HOST_ROUTES, 4096),
        ]
    );

    for name in [
        programs::FROM_CONTAINER,
        programs::TO_CONTAINER,
        programs::FROM_TUNNEL,
        programs::TO_TUNNEL,
        programs::SOCK4_CONNECT,
        programs::SOCK4_SENDMSG,
        programs::SOCK4_RECVMSG,
        programs::SOCK4_GETPEERNAME,
        programs::POD4_CONNECT,
        programs::POD4_SENDMSG,
        programs::POD4_RECVMSG,
        programs::POD4_GETPEERNAME,
        programs::FROM_NETDEV,
        programs::TO_NETDEV,
    ] {
        let info = datapath.program_info(name).unwrap();
        let xlated = info.size_translated().unwrap_or(0) / 8;
        println!(
            "{name}: {xlated} xlated instructions, {} verified",
            info.verified_instruction_count().unwrap_or(0)
        );
        assert!(xlated > 0);
    }
    assert!(datapath.program("no_such_program").is_err());
}

#[test]
fn reload_reuses_pinned_maps() {
    let pins = PinDir::unique("sluice-test-");
    let key = Ct4Key::new(
        (Ipv4Addr::new(10, 0, 1, 2), 40000),
        (Ipv4Addr::new(10, 0, 2, 2), 80),
        IPPROTO_TCP,
        CT_EGRESS,
    );
    let entry = Ct4Entry {
        packets: 7,
        ..Ct4Entry::default()
    };
    {
        let _first = Datapath::load(pins.path(), &DatapathConfig::default()).expect("first load");
        let mut maps = PinnedMaps::open(pins.path()).expect("open");
        maps.conntrack.insert(key, entry, 0).expect("insert");
    }
    // A restarted agent: the new maps are the pinned ones, the override does not apply.
    let _second = Datapath::load(
        pins.path(),
        &DatapathConfig {
            ct_max_entries: 1024,
            ..DatapathConfig::default()
        },
    )
    .expect("second load");
    let maps = PinnedMaps::open(pins.path()).expect("open");
    assert_eq!(maps.conntrack.get(&key, 0).expect("entry survives"), entry);
    let ct = maps.capacities();
    assert!(ct.contains(&(names::CONNTRACK, 65536)), "{ct:?}");
}

#[test]
fn incompatible_pinned_map_is_refused() {
    let pins = PinDir::unique("sluice-test-");
    std::fs::create_dir_all(pins.path()).unwrap();
    let wrong: HashMap<MapData, u32, u32> = HashMap::create(16, 0).expect("create map");
    wrong
        .pin(pins.path().join(names::CONNTRACK))
        .expect("pin map");

    let err = Datapath::load(pins.path(), &DatapathConfig::default()).unwrap_err();
    assert!(
        matches!(err, DatapathError::IncompatibleMap { map, .. } if map == names::CONNTRACK),
        "{err}"
    );
}

#[test]
fn inventory_counts_entries_as_the_registry_says() {
    let pins = PinDir::unique("sluice-test-");
    let _datapath = Datapath::load(pins.path(), &DatapathConfig::default()).expect("load");
    let mut maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
    for port in [40000, 40001, 40002] {
        let key = Ct4Key::new(
            (Ipv4Addr::new(10, 0, 1, 2), port),
            (Ipv4Addr::new(10, 0, 2, 2), 80),
            IPPROTO_TCP,
            CT_EGRESS,
        );
        maps.conntrack
            .insert(key, Ct4Entry::default(), 0)
            .expect("insert");
    }
    let inventory = &maps.inventory;
    assert_eq!(inventory.entries(MapId::Conntrack).expect("count"), 3);
    assert_eq!(inventory.entries(MapId::Services).expect("count"), 0);
    // Arrays and the ring are not counted.
    assert_eq!(inventory.entries(MapId::Metrics).expect("count"), 0);
    assert_eq!(inventory.capacity(MapId::Conntrack), 65536);
    assert_eq!(inventory.capacity(MapId::Policy), 4096);
}
