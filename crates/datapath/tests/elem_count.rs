//! The kernel's own element count of a map, read by a program calling the kfunc
//! `bpf_map_sum_elem_count` (needs root, never skipped): it equals the entries a walk of
//! the conntrack table finds after inserts, deletes and the LRU's evictions.
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::Ipv4Addr, os::fd::AsFd};

use aya::maps::IterableMap;

use sluice_common::{Ct4Entry, Ct4Key, IPPROTO_TCP, MapId, names};
use sluice_datapath::{Datapath, DatapathConfig, ElemCount, PinDir, PinnedMaps};

fn key(i: u32) -> Ct4Key {
    Ct4Key::new(
        (Ipv4Addr::from(0x0a00_0000 + i), 40000),
        (Ipv4Addr::new(10, 96, 0, 1), 80),
        IPPROTO_TCP,
        0,
    )
}

#[test]
fn the_kernel_count_equals_the_entries_after_inserts_deletes_and_evictions() {
    const CAPACITY: u32 = 4096;
    let pins = PinDir::unique("sluice-test-elem-count-");
    let config = DatapathConfig {
        ct_max_entries: CAPACITY,
        ..DatapathConfig::default()
    };
    let _datapath = Datapath::load(pins.path(), &config).unwrap();
    let mut maps = PinnedMaps::open(pins.path()).unwrap();
    let count = ElemCount::new(names::CONNTRACK, maps.conntrack.map().fd().as_fd()).unwrap();
    let walked = |maps: &PinnedMaps| maps.inventory.entries(MapId::Conntrack).unwrap();
    assert_eq!(count.get().unwrap(), 0, "a new table");

    for i in 0..1000 {
        maps.conntrack
            .insert(key(i), Ct4Entry::default(), 0)
            .unwrap();
    }
    assert_eq!(count.get().unwrap(), 1000, "after 1,000 inserts");
    // Replacing an entry adds none.
    maps.conntrack
        .insert(key(7), Ct4Entry::default(), 0)
        .unwrap();
    for i in 0..300 {
        maps.conntrack.remove(&key(i)).unwrap();
    }
    assert_eq!(count.get().unwrap(), 700, "after 300 deletes");
    assert_eq!(count.get().unwrap(), walked(&maps));

    // Three times the capacity: the LRU evicts, and the count follows.
    for i in 1000..1000 + 3 * CAPACITY {
        maps.conntrack
            .insert(key(i), Ct4Entry::default(), 0)
            .unwrap();
    }
    let full = walked(&maps);
    assert!(full <= u64::from(CAPACITY), "{full} entries");
    assert_eq!(count.get().unwrap(), full, "after the LRU evicted");
}
