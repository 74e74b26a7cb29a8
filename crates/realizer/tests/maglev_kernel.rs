//! The realizer's Maglev tables against a real loaded datapath (needs root and bpffs;
//! never skipped): a table is created whole and swapped in, an unchanged one is left alone,
//! and a table changed behind the realizer's back is reported and repaired.
// Test helpers outside #[test] functions: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;

use aya::maps::IterableMap;

use sluice_common::*;
use sluice_compiler::{
    DesiredState,
    maglev::{self, TableSize},
};
use sluice_datapath::{Datapath, DatapathConfig, PinDir, PinnedMaps};
use sluice_realizer::{Desired, DriftKind, KernelTables};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn load() -> (PinDir, Datapath, KernelTables) {
    let pins = PinDir::unique("sluice-test-maglev-");
    let datapath = Datapath::load(pins.path(), &DatapathConfig::default())
        .unwrap_or_else(|err| panic!("loading the datapath into {}: {err}", pins.path().display()));
    let tables = KernelTables::open(pins.path()).expect("open the realized maps");
    (pins, datapath, tables)
}

fn frontend_key() -> Lb4Key {
    Lb4Key::new(VIP, 80, IPPROTO_TCP, 0)
}

/// A Maglev frontend on VIP:80 with backends 10.244.1.1..=n and a table of `size`.
fn state(n: u8, size: u16) -> DesiredState {
    let size = TableSize::new(size.into()).unwrap();
    let backends: Vec<(Ipv4Addr, u16)> = (1..=n)
        .map(|i| (Ipv4Addr::new(10, 244, 1, i), 80))
        .collect();
    let mut state = DesiredState::default();
    for (slot, (address, port)) in (1..).zip(&backends) {
        state.services.insert(
            Lb4Key::new(VIP, 80, IPPROTO_TCP, slot),
            Lb4Service::slot(*address, *port),
        );
        state.backends.insert(
            Lb4BackendKey::new(*address, *port, IPPROTO_TCP),
            Lb4Backend::default(),
        );
    }
    state.services.insert(
        frontend_key(),
        Lb4Service {
            maglev_size: size.get(),
            ..Lb4Service::frontend(u16::from(n), SVC_FLAG_CLUSTER_IP | SVC_FLAG_MAGLEV)
        },
    );
    state
        .maglev
        .insert(frontend_key(), maglev::table(&backends, size).into());
    state
}

/// The installed table's positions, unpacked, and the inner map's id.
fn installed(maps: &PinnedMaps) -> (Vec<u16>, u32) {
    let table = maps.maglev.get(&frontend_key(), 0).unwrap();
    let id = table.map().info().unwrap().id();
    let positions = table.iter().flat_map(Result::unwrap).collect();
    (positions, id)
}

#[test]
fn tables_are_swapped_in_whole_and_drift_is_repaired() {
    let (pins, _datapath, mut tables) = load();
    let maps = PinnedMaps::open(pins.path()).unwrap();

    let three = state(3, 251);
    tables.realize(Desired::of(&three, 16)).unwrap();
    let (positions, id) = installed(&maps);
    // 251 positions in 63 elements of four, the last lane padding.
    assert_eq!(positions.len(), 252);
    assert_eq!(&positions[..251], &*three.maglev[&frontend_key()]);
    assert_eq!(positions[251], 0);

    assert!(!tables.realize(Desired::of(&three, 16)).unwrap().changed());
    assert_eq!(
        installed(&maps).1,
        id,
        "an unchanged table is left in place"
    );

    // A new backend or a new M: a new table.
    let four = state(4, 251);
    tables.realize(Desired::of(&four, 16)).unwrap();
    let (positions, new_id) = installed(&maps);
    assert_ne!(new_id, id);
    assert_eq!(&positions[..251], &*four.maglev[&frontend_key()]);
    let bigger = state(4, 16381);
    tables.realize(Desired::of(&bigger, 16)).unwrap();
    assert_eq!(installed(&maps).0.len(), 16384);

    // Written behind the realizer's back: one position now names slot 9.
    let mut table = maps.maglev.get(&frontend_key(), 0).unwrap();
    table.set(0, [9, 9, 9, 9], 0).unwrap();
    let drift = tables.plan(Desired::of(&bigger, 16)).unwrap().drift();
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0].map, names::MAGLEV);
    assert_eq!(drift[0].kind, DriftKind::Differs);
    tables.realize(Desired::of(&bigger, 16)).unwrap();
    assert_eq!(
        &installed(&maps).0[..16381],
        &*bigger.maglev[&frontend_key()]
    );

    // The Service goes: frontend and table both.
    tables
        .realize(Desired::of(&DesiredState::default(), 16))
        .unwrap();
    assert!(maps.maglev.keys().next().is_none());
}

#[test]
fn a_pass_reads_50_tables_of_16381_positions_promptly() {
    let (_pins, _datapath, mut tables) = load();
    let size = TableSize::default();
    let backends: Vec<(Ipv4Addr, u16)> = (1..=5)
        .map(|i| (Ipv4Addr::new(10, 244, 1, i), 80))
        .collect();
    let mut state = DesiredState::default();
    for port in 1..=50u16 {
        let key = Lb4Key::new(VIP, port, IPPROTO_TCP, 0);
        state
            .maglev
            .insert(key, maglev::table(&backends, size).into());
    }
    let started = std::time::Instant::now();
    tables.realize(Desired::of(&state, 16)).unwrap();
    let installed = started.elapsed();
    let started = std::time::Instant::now();
    let plan = tables.plan(Desired::of(&state, 16)).unwrap();
    let read = started.elapsed();
    assert!(plan.is_empty());
    println!(
        "50 Maglev tables of 16,381 positions: installed in {installed:?}, an unchanged pass \
         read and compared them in {read:?}"
    );
}
