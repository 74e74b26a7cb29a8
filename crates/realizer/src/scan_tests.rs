//! The rolling drift check over in-memory maps: what it reads per tick, and that a forged,
//! a missing and an extra entry are each found within two sweeps and repaired.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use sluice_common::*;
use sluice_compiler::{Delta, DesiredState, EndpointPolicy};

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

/// Every realized map filled: `n` services, backends, endpoints, ipcache prefixes and
/// source ranges, three endpoints with policy and three Maglev tables.
fn wide(n: u32) -> DesiredState {
    let mut state = state(n);
    for i in 0..n {
        state
            .endpoints
            .insert(100 + i, EndpointInfo::new(backend(i), 1_000 + i));
        state.ipcache.insert(
            IpcacheKey::new(backend(i), 32),
            IpcacheEntry::local(1_000 + i),
        );
        let source = Ipv4Addr::new(192, 168, 0, 0);
        state.source_ranges.insert(
            Lb4SourceRangeKey::new(vip(i), 80, IPPROTO_TCP, source, 16),
            SOURCE_RANGE_ALLOWED,
        );
    }
    let policy = state.policies[&3].clone();
    for ifindex in [4, 5] {
        state.policies.insert(ifindex, policy.clone());
    }
    for i in [1, 2] {
        state.maglev.insert(
            Lb4Key::new(vip(i), 80, IPPROTO_TCP, 0),
            Arc::from(vec![1u16; 13]),
        );
    }
    state
}

/// A forged, a missing and an extra entry in one map family, each made behind the
/// realizer's back.
fn family_drifts(n: u32) -> Vec<(MapId, &'static str, Box<Drift>)> {
    let lb = |i| Lb4BackendKey::new(backend(i), 80, IPPROTO_TCP);
    let prefix = |i| IpcacheKey::new(backend(i), 32);
    let range = |i| {
        let source = Ipv4Addr::new(192, 168, 0, 0);
        Lb4SourceRangeKey::new(vip(i), 80, IPPROTO_TCP, source, 16)
    };
    let frontend = |i| Lb4Key::new(vip(i), 80, IPPROTO_TCP, 0);
    let other_row = PolicyKey::ports(8, POLICY_EGRESS, IPPROTO_TCP, 8080, 16);
    vec![
        (
            MapId::Backends,
            "forged",
            Box::new(move |t| {
                let state = Lb4Backend {
                    state: 9,
                    ..Lb4Backend::default()
                };
                t.backends.upsert(&lb(n / 3), &state).unwrap()
            }),
        ),
        (
            MapId::Backends,
            "missing",
            Box::new(move |t| t.backends.remove(&lb(n / 2)).unwrap()),
        ),
        (
            MapId::Backends,
            "extra",
            Box::new(move |t| {
                t.backends
                    .upsert(&lb(n + 5), &Lb4Backend::default())
                    .unwrap()
            }),
        ),
        (
            MapId::Endpoints,
            "forged",
            Box::new(move |t| {
                let forged = EndpointInfo::new(backend(7), 2);
                t.endpoints.upsert(&(100 + n / 3), &forged).unwrap()
            }),
        ),
        (
            MapId::Endpoints,
            "missing",
            Box::new(move |t| t.endpoints.remove(&(100 + n / 2)).unwrap()),
        ),
        (
            MapId::Endpoints,
            "extra",
            Box::new(move |t| {
                let extra = EndpointInfo::new(backend(n + 5), 2);
                t.endpoints.upsert(&(100 + n + 5), &extra).unwrap()
            }),
        ),
        (
            MapId::Ipcache,
            "forged",
            Box::new(move |t| {
                t.ipcache
                    .upsert(&prefix(n / 3), &IpcacheEntry::local(2))
                    .unwrap()
            }),
        ),
        (
            MapId::Ipcache,
            "missing",
            Box::new(move |t| t.ipcache.remove(&prefix(n / 2)).unwrap()),
        ),
        (
            MapId::Ipcache,
            "extra",
            Box::new(move |t| {
                t.ipcache
                    .upsert(&prefix(n + 5), &IpcacheEntry::local(2))
                    .unwrap()
            }),
        ),
        (
            MapId::SourceRanges,
            "forged",
            Box::new(move |t| t.source_ranges.upsert(&range(n / 3), &7).unwrap()),
        ),
        (
            MapId::SourceRanges,
            "missing",
            Box::new(move |t| t.source_ranges.remove(&range(n / 2)).unwrap()),
        ),
        (
            MapId::SourceRanges,
            "extra",
            Box::new(move |t| {
                t.source_ranges
                    .upsert(&range(n + 5), &SOURCE_RANGE_ALLOWED)
                    .unwrap()
            }),
        ),
        (
            MapId::Policy,
            "forged",
            Box::new(move |t| {
                let rows = &mut t.policy.maps.get_mut(&4).unwrap().rows;
                rows.pop_first();
                rows.insert(other_row, PolicyEntry::default());
            }),
        ),
        (
            MapId::Policy,
            "missing",
            Box::new(|t| {
                t.policy.maps.remove(&5);
            }),
        ),
        (
            MapId::Policy,
            "extra",
            Box::new(|t| {
                let installed = t.policy.maps[&3].clone();
                t.policy.maps.insert(77, installed);
            }),
        ),
        (
            MapId::Maglev,
            "forged",
            Box::new(move |t| t.maglev.tables.get_mut(&frontend(1)).unwrap()[0][3] = 2),
        ),
        (
            MapId::Maglev,
            "missing",
            Box::new(move |t| {
                t.maglev.tables.remove(&frontend(2));
            }),
        ),
        (
            MapId::Maglev,
            "extra",
            Box::new(move |t| {
                let table = t.maglev.tables[&frontend(0)].clone();
                t.maglev.tables.insert(frontend(n + 5), table);
            }),
        ),
    ]
}

#[test]
fn a_forged_a_missing_and_an_extra_entry_in_every_map_family_are_found_and_repaired() {
    const N: u32 = 10_000;
    let state = wide(N);
    for (id, what, drift) in family_drifts(N) {
        let mut t = tables();
        t.realize(Desired::of(&state, 16)).unwrap();
        let mut scan = Scan::new(TICKS);
        // Into a sweep, so the drift may sit behind the cursor.
        t.check(&mut scan, Desired::of(&state, 16), 1).unwrap();
        drift(&mut t);
        let (ticks, tick) = ticks_to_repair(&mut t, &mut scan, &state, 2 * TICKS);
        let name = id.name();
        eprintln!("{name} {what}: found after {ticks} ticks");
        assert_eq!(tick.drifted, vec![id], "{name} {what}");
        assert!(!tick.repaired.is_empty(), "{name} {what}: {tick:?}");
        let left = t.plan(Desired::of(&state, 16)).unwrap().drift();
        assert!(left.is_empty(), "{name} {what}: still drifted {left:?}");
        let clean = t.check(&mut scan, Desired::of(&state, 16), 1).unwrap();
        assert!(clean.drifted.is_empty(), "{name} {what}: {clean:?}");
    }
}

#[test]
fn map_counts_are_what_the_last_pass_wrote_then_what_a_sweep_read() {
    let state = wide(30_000);
    let mut t = tables();
    t.realize(Desired::of(&state, 16)).unwrap();
    let mut scan = Scan::new(TICKS);
    assert_eq!(scan.counted().count(), 0, "nothing counted before a pass");
    scan.written(Desired::of(&state, 16));
    let counted: BTreeMap<_, _> = scan.counted().collect();
    let sizes = [
        (MapId::Services, state.services.len()),
        (MapId::Backends, state.backends.len()),
        (MapId::Endpoints, state.endpoints.len()),
        (MapId::Ipcache, state.ipcache.len()),
        (MapId::SourceRanges, state.source_ranges.len()),
        (MapId::Policy, state.policies.len()),
        (MapId::Maglev, state.maglev.len()),
    ];
    for (id, size) in sizes {
        assert_eq!(counted[&id].entries, size as u64, "{}", id.name());
        assert_eq!(counted[&id].by, kinds::CountedBy::Pass, "{}", id.name());
    }
    // 60,000 service entries take several ticks; the count is the sweep's once it ends.
    loop {
        let tick = t.check(&mut scan, Desired::of(&state, 16), 1).unwrap();
        if tick.swept.contains(&MapId::Services) {
            break;
        }
        let services = scan.counted().find(|(id, _)| *id == MapId::Services);
        assert_eq!(services.unwrap().1.by, kinds::CountedBy::Pass, "mid-sweep");
    }
    let services = scan.counted().find(|(id, _)| *id == MapId::Services);
    let services = services.unwrap().1;
    assert_eq!(services.by, kinds::CountedBy::Sweep);
    assert_eq!(services.entries, state.services.len() as u64);

    // A sweep that finds drift does not count: the repair's pass does.
    t.services
        .remove(state.services.keys().next().unwrap())
        .unwrap();
    let (_, tick) = ticks_to_repair(&mut t, &mut scan, &state, 2 * TICKS);
    assert_eq!(tick.drifted, vec![MapId::Services]);
    let services = scan.counted().find(|(id, _)| *id == MapId::Services);
    let services = services.unwrap().1;
    assert_eq!(services.by, kinds::CountedBy::Pass);
    assert_eq!(services.entries, state.services.len() as u64);
}

/// The touched entries of `before` against `after`, as the compiler's delta names them.
fn touched<K: Ord + Clone, V: Clone + PartialEq>(
    before: &BTreeMap<K, V>,
    after: &BTreeMap<K, V>,
) -> BTreeMap<K, Option<V>> {
    let keys = before
        .keys()
        .chain(after.keys())
        .cloned()
        .collect::<BTreeSet<_>>();
    keys.into_iter()
        .filter(|k| before.get(k) != after.get(k))
        .map(|k| {
            let old = before.get(&k).cloned();
            (k, old)
        })
        .collect()
}

#[test]
fn digests_follow_a_change_by_its_delta_and_still_see_drift() {
    let before = wide(20_000);
    let mut after = before.clone();
    let first = *after.services.keys().next().unwrap();
    after.services.remove(&first);
    let forged = *after.services.keys().nth(7).unwrap();
    after
        .services
        .insert(forged, Lb4Service::slot(backend(3), 99));
    after.services.insert(
        Lb4Key::new(Ipv4Addr::new(10, 97, 0, 9), 80, IPPROTO_TCP, 0),
        Lb4Service::frontend(1, SVC_FLAG_CLUSTER_IP),
    );
    let gone = *after.backends.keys().next().unwrap();
    after.backends.remove(&gone);
    let delta = Delta {
        services: touched(&before.services, &after.services),
        backends: touched(&before.backends, &after.backends),
        ..Delta::default()
    };
    let mut t = tables();
    t.realize(Desired::of(&before, 16)).unwrap();
    let mut scan = Scan::new(TICKS);
    let tick = t.check(&mut scan, Desired::of(&before, 16), 1).unwrap();
    assert!(tick.drifted.is_empty(), "{tick:?}");

    let plan = t.plan_changes(&delta, Desired::of(&after, 16)).unwrap();
    t.apply(&plan).unwrap();
    scan.changed(&delta, Desired::of(&after, 16), 1, 2);
    for _ in 0..2 * TICKS {
        let tick = t.check(&mut scan, Desired::of(&after, 16), 2).unwrap();
        assert!(
            tick.drifted.is_empty(),
            "the followed digests match: {tick:?}"
        );
    }
    t.services.remove(&forged).unwrap();
    let (_, tick) = ticks_to_repair_at(&mut t, &mut scan, &after, 2, 2 * TICKS);
    assert_eq!(tick.drifted, vec![MapId::Services]);
}

/// Ticks at `version` until a check finds drift, failing after `limit` ticks.
fn ticks_to_repair_at(
    t: &mut Tables<Memory>,
    scan: &mut Scan,
    state: &DesiredState,
    version: u64,
    limit: usize,
) -> (usize, ScanTick) {
    for n in 1..=limit {
        let tick = t.check(scan, Desired::of(state, 16), version).unwrap();
        if !tick.drifted.is_empty() {
            return (n, tick);
        }
    }
    panic!("no drift found in {limit} ticks");
}

/// Under a change at every tick (pod churn moves ipcache entries all the time) a sweep in
/// slices still ends, with no drift reported, wherever the changed entries lie against
/// its cursor; and an entry forged meanwhile is still found.
#[test]
fn sweeps_end_under_a_change_at_every_tick_and_still_see_drift() {
    let mut state = wide(40_000);
    let mut t = tables();
    t.realize(Desired::of(&state, 16)).unwrap();
    let mut scan = Scan::new(TICKS);
    let mut version = 1;
    let tick = t
        .check(&mut scan, Desired::of(&state, 16), version)
        .unwrap();
    assert!(tick.drifted.is_empty(), "{tick:?}");
    let change = |t: &mut Tables<Memory>, scan: &mut Scan, state: &mut DesiredState, n: u64| {
        let mut after = state.clone();
        // Spread over the map: one changed, one removed, one added (a removed one back).
        let at = |k: u64| IpcacheKey::new(backend(((n * 7_919 + k) % 40_000) as u32), 32);
        after
            .ipcache
            .insert(at(0), IpcacheEntry::local(77 + n as u32));
        after.ipcache.remove(&at(13_001));
        after
            .ipcache
            .insert(at(26_003), IpcacheEntry::local(5_000 + n as u32));
        let delta = Delta {
            ipcache: touched(&state.ipcache, &after.ipcache),
            ..Delta::default()
        };
        let plan = t.plan_changes(&delta, Desired::of(&after, 16)).unwrap();
        t.apply(&plan).unwrap();
        scan.changed(&delta, Desired::of(&after, 16), n, n + 1);
        *state = after;
    };
    let mut sweeps = 0;
    for _ in 0..3 * TICKS {
        change(&mut t, &mut scan, &mut state, version);
        version += 1;
        let tick = t
            .check(&mut scan, Desired::of(&state, 16), version)
            .unwrap();
        assert!(
            tick.drifted.is_empty(),
            "a followed sweep matches: {tick:?}"
        );
        sweeps += usize::from(tick.swept.contains(&MapId::Ipcache));
    }
    assert!(
        sweeps >= 2,
        "the ipcache sweep ended {sweeps} times in {} ticks",
        3 * TICKS
    );
    let forged = IpcacheKey::new(backend(20_000), 32);
    t.ipcache.upsert(&forged, &IpcacheEntry::local(9)).unwrap();
    for n in 1..=2 * TICKS {
        change(&mut t, &mut scan, &mut state, version);
        version += 1;
        let tick = t
            .check(&mut scan, Desired::of(&state, 16), version)
            .unwrap();
        if !tick.drifted.is_empty() {
            assert_eq!(tick.drifted, vec![MapId::Ipcache], "after {n} ticks");
            return;
        }
    }
    panic!(
        "the forged ipcache entry was not found in {} ticks",
        2 * TICKS
    );
}
