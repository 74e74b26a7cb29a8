//! The rolling drift check over in-memory maps: what it reads per tick, and that a forged,
//! a missing and an extra entry are each found within two sweeps and repaired.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use sluice_common::*;
use sluice_compiler::{DesiredState, EndpointPolicy};

use super::*;

const TICKS: usize = 4;

fn tables() -> Tables<Memory> {
    Tables::in_memory()
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0000 + i)
}

fn backend(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0af4_0000 + i)
}

/// `n` ClusterIP services of one backend each (two service entries, one backend entry),
/// one enforced endpoint and one Maglev table.
fn state(n: u32) -> DesiredState {
    let mut state = DesiredState::default();
    for i in 0..n {
        state.services.insert(
            Lb4Key::new(vip(i), 80, IPPROTO_TCP, 0),
            Lb4Service::frontend(1, SVC_FLAG_CLUSTER_IP),
        );
        state.services.insert(
            Lb4Key::new(vip(i), 80, IPPROTO_TCP, 1),
            Lb4Service::slot(backend(i), 80),
        );
        state.backends.insert(
            Lb4BackendKey::new(backend(i), 80, IPPROTO_TCP),
            Lb4Backend::default(),
        );
    }
    let row = PolicyKey::ports(7, POLICY_EGRESS, IPPROTO_TCP, 80, 16);
    let mut rows = BTreeMap::new();
    rows.insert(row, BTreeSet::new());
    state.policies.insert(3, EndpointPolicy { rows });
    state.maglev.insert(
        Lb4Key::new(vip(0), 80, IPPROTO_TCP, 0),
        Arc::from(vec![1u16; 13]),
    );
    state
}

/// A change made behind the realizer's back.
type Drift = dyn Fn(&mut Tables<Memory>);

/// Ticks until a check finds drift and repairs it, failing after `limit` ticks.
fn ticks_to_repair(
    t: &mut Tables<Memory>,
    scan: &mut Scan,
    state: &DesiredState,
    limit: usize,
) -> (usize, ScanTick) {
    for n in 1..=limit {
        let tick = t.check(scan, Desired::of(state, 16), 1).unwrap();
        if !tick.drifted.is_empty() {
            return (n, tick);
        }
    }
    panic!("no drift found in {limit} ticks");
}

#[test]
fn a_clean_small_state_is_read_whole_every_tick_and_never_repaired() {
    let state = state(100);
    let mut t = tables();
    t.realize(Desired::of(&state, 16)).unwrap();
    let mut scan = Scan::new(TICKS);
    for _ in 0..3 {
        let tick = t.check(&mut scan, Desired::of(&state, 16), 1).unwrap();
        assert_eq!(tick.swept.len(), 7, "every map swept in one tick: {tick:?}");
        assert!(tick.drifted.is_empty(), "{tick:?}");
        assert_eq!(tick.stats, ApplyStats::default());
    }
}

#[test]
fn a_large_map_is_read_in_slices_and_a_sweep_ends_at_its_end() {
    // 60,000 service entries: more than MIN_SLICE, in ceil(60,000 / 16,384) = 4 slices.
    let state = state(30_000);
    let mut t = tables();
    t.realize(Desired::of(&state, 16)).unwrap();
    let mut scan = Scan::new(TICKS);
    let mut ticks = 0;
    loop {
        ticks += 1;
        let tick = t.check(&mut scan, Desired::of(&state, 16), 1).unwrap();
        assert!(tick.drifted.is_empty(), "{tick:?}");
        assert!(tick.entries_read <= 2 * MIN_SLICE + 20, "{tick:?}");
        if tick.swept.contains(&MapId::Services) {
            break;
        }
    }
    assert_eq!(ticks, 4);
}

#[test]
fn a_forged_a_missing_and_an_extra_entry_in_a_large_map_are_each_found_and_repaired() {
    let state = state(10_000);
    let forged = Lb4Key::new(vip(4_321), 80, IPPROTO_TCP, 1);
    let missing = Lb4Key::new(vip(9_999), 80, IPPROTO_TCP, 0);
    let extra = Lb4Key::new(Ipv4Addr::new(10, 97, 0, 1), 80, IPPROTO_TCP, 0);
    let drifts: [(&str, Box<Drift>); 3] = [
        (
            "forged",
            Box::new(move |t| {
                t.services
                    .upsert(&forged, &Lb4Service::slot(backend(1), 81))
                    .unwrap()
            }),
        ),
        (
            "missing",
            Box::new(move |t| t.services.remove(&missing).unwrap()),
        ),
        (
            "extra",
            Box::new(move |t| {
                t.services
                    .upsert(&extra, &Lb4Service::frontend(1, SVC_FLAG_CLUSTER_IP))
                    .unwrap()
            }),
        ),
    ];
    for (what, drift) in drifts {
        let mut t = tables();
        t.realize(Desired::of(&state, 16)).unwrap();
        let mut scan = Scan::new(TICKS);
        // Half way through a sweep, so the drift may sit behind the cursor.
        t.check(&mut scan, Desired::of(&state, 16), 1).unwrap();
        drift(&mut t);
        let (ticks, tick) = ticks_to_repair(&mut t, &mut scan, &state, 2 * TICKS);
        eprintln!("{what}: found after {ticks} ticks ({tick:?})");
        assert_eq!(tick.drifted, vec![MapId::Services], "{what}");
        assert_eq!(tick.repaired.len(), 1, "{what}: {:?}", tick.repaired);
        assert_eq!(t.services.entries, state.services, "{what}: repaired");
        let clean = t.check(&mut scan, Desired::of(&state, 16), 1).unwrap();
        assert!(clean.drifted.is_empty(), "{what}: {clean:?}");
    }
}

#[test]
fn a_forged_policy_row_and_a_changed_maglev_table_are_found_and_repaired() {
    let state = state(10);
    let mut t = tables();
    t.realize(Desired::of(&state, 16)).unwrap();
    let mut scan = Scan::new(TICKS);
    t.check(&mut scan, Desired::of(&state, 16), 1).unwrap();

    let row = PolicyKey::ports(7, POLICY_EGRESS, IPPROTO_TCP, 443, 16);
    t.policy
        .maps
        .get_mut(&3)
        .unwrap()
        .rows
        .insert(row, PolicyEntry::default());
    let (_, tick) = ticks_to_repair(&mut t, &mut scan, &state, 2);
    assert_eq!(tick.drifted, vec![MapId::Policy]);
    assert!(!t.policy.maps[&3].rows.contains_key(&row), "row removed");

    let frontend = Lb4Key::new(vip(0), 80, IPPROTO_TCP, 0);
    t.maglev.tables.get_mut(&frontend).unwrap()[0][0] = 2;
    let (_, tick) = ticks_to_repair(&mut t, &mut scan, &state, 2);
    assert_eq!(tick.drifted, vec![MapId::Maglev]);
    assert_eq!(t.maglev.tables[&frontend][0][0], 1, "table restored");
}

#[test]
fn new_desired_content_is_digested_again() {
    let mut t = tables();
    let old = state(10);
    t.realize(Desired::of(&old, 16)).unwrap();
    let mut scan = Scan::new(TICKS);
    assert!(
        t.check(&mut scan, Desired::of(&old, 16), 1)
            .unwrap()
            .drifted
            .is_empty()
    );
    let new = state(11);
    t.realize(Desired::of(&new, 16)).unwrap();
    scan.restart();
    let tick = t.check(&mut scan, Desired::of(&new, 16), 2).unwrap();
    assert!(tick.drifted.is_empty(), "{tick:?}");
}
