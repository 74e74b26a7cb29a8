use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use sluice_common::{kinds::RuleOrigin, *};

use sluice_compiler::{DesiredState, EndpointPolicy};

use super::*;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn backend(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, i)
}

/// The services map content of a frontend on VIP:80/TCP with `backends`.
fn frontend(backends: &[u8]) -> BTreeMap<Lb4Key, Lb4Service> {
    let n = u16::try_from(backends.len()).unwrap();
    let mut m = BTreeMap::new();
    m.insert(
        Lb4Key::new(VIP, 80, IPPROTO_TCP, 0),
        Lb4Service::frontend(n, SVC_FLAG_CLUSTER_IP),
    );
    for (slot, b) in (1..).zip(backends) {
        m.insert(
            Lb4Key::new(VIP, 80, IPPROTO_TCP, slot),
            Lb4Service::slot(backend(*b), 80),
        );
    }
    m
}

fn backends(ids: &[u8]) -> BTreeMap<Lb4BackendKey, Lb4Backend> {
    ids.iter()
        .map(|b| {
            (
                Lb4BackendKey::new(backend(*b), 80, IPPROTO_TCP),
                Lb4Backend::default(),
            )
        })
        .collect()
}

type MemTables = Tables<Memory>;

fn tables() -> MemTables {
    Tables::in_memory()
}

fn services_only(ids: &[u8]) -> DesiredState {
    DesiredState {
        services: frontend(ids),
        backends: backends(ids),
        ..DesiredState::default()
    }
}

fn realize(t: &mut MemTables, ids: &[u8]) -> ApplyStats {
    t.realize(Desired::of(&services_only(ids), 16)).unwrap()
}

/// Every prefix of the write log must leave the frontend's count covered by slots that exist
/// and name backends that exist: that is what the datapath may observe mid-update.
fn assert_consistent_at_every_step(t: &MemTables, start_services: &BTreeMap<Lb4Key, Lb4Service>) {
    let mut services = start_services.clone();
    let all_backends: BTreeMap<_, _> = t.backends.entries.clone();
    for (k, v) in &t.services.log {
        match v {
            Some(v) => services.insert(*k, *v),
            None => services.remove(k),
        };
        for (fk, fv) in services.iter().filter(|(k, _)| k.slot == 0 && k.proto != 0) {
            for slot in 1..=fv.count {
                let sk = Lb4Key { slot, ..*fk };
                let sv = services
                    .get(&sk)
                    .unwrap_or_else(|| panic!("slot {slot} missing while count={}", fv.count));
                let bk = Lb4BackendKey::new(sv.backend(), sv.port(), fk.proto);
                assert!(
                    all_backends.contains_key(&bk) || t.backends.log.iter().any(|(k, _)| *k == bk)
                );
            }
        }
    }
}

#[test]
fn scale_up_writes_slots_before_the_frontend_count() {
    let mut t = tables();
    realize(&mut t, &[2, 3]);
    let before = t.services.entries.clone();
    t.services.log.clear();
    let stats = realize(&mut t, &[2, 3, 4]);
    assert_eq!(
        stats,
        ApplyStats {
            upserted: 3,
            removed: 0
        }
    );
    assert_eq!(
        t.services.log.last().unwrap().0.slot,
        0,
        "frontend written last"
    );
    assert_consistent_at_every_step(&t, &before);
}

#[test]
fn scale_down_shrinks_the_count_before_removing_slots_and_backends() {
    let mut t = tables();
    realize(&mut t, &[2, 3, 4]);
    let before = t.services.entries.clone();
    t.services.log.clear();
    t.backends.log.clear();
    realize(&mut t, &[4]);
    let first_removal = t
        .services
        .log
        .iter()
        .position(|(_, v)| v.is_none())
        .unwrap();
    let frontend_write = t
        .services
        .log
        .iter()
        .position(|(k, v)| k.slot == 0 && v.is_some())
        .unwrap();
    assert!(frontend_write < first_removal);
    assert_eq!(t.services.entries, frontend(&[4]));
    assert_eq!(t.backends.entries, backends(&[4]));
    assert_consistent_at_every_step(&t, &before);
}

#[test]
fn an_unchanged_state_writes_nothing() {
    let mut t = tables();
    realize(&mut t, &[2, 3]);
    assert!(!realize(&mut t, &[2, 3]).changed());
}

/// The datapath's flow cache decides every flow again after a pass that wrote something
/// (a removed backend must not be served from it), and keeps its decisions otherwise.
#[test]
fn a_pass_that_writes_moves_the_flow_generation_on() {
    let mut t = tables();
    realize(&mut t, &[2, 3]);
    assert_eq!(t.flow_generation.0, 1);
    realize(&mut t, &[2, 3]);
    assert_eq!(
        t.flow_generation.0, 1,
        "an unchanged state keeps the generation"
    );
    realize(&mut t, &[2]);
    assert_eq!(t.flow_generation.0, 2, "a removed backend moves it on");
}

#[test]
fn drift_behind_the_realizers_back_is_reported_and_repaired() {
    let mut t = tables();
    realize(&mut t, &[2, 3]);
    // Someone edits the kernel directly: a slot now points elsewhere, a backend vanished,
    // and a stray frontend appeared.
    let slot1 = Lb4Key::new(VIP, 80, IPPROTO_TCP, 1);
    t.services
        .entries
        .insert(slot1, Lb4Service::slot(backend(9), 80));
    t.backends
        .entries
        .remove(&Lb4BackendKey::new(backend(3), 80, IPPROTO_TCP));
    let stray = Lb4Key::new(Ipv4Addr::new(10, 96, 0, 99), 53, IPPROTO_UDP, 0);
    t.services.entries.insert(stray, Lb4Service::frontend(0, 0));

    let state = services_only(&[2, 3]);
    let desired = Desired::of(&state, 16);
    let plan = t.plan(desired).unwrap();
    let kinds: Vec<_> = plan
        .drift()
        .iter()
        .map(|d| (d.map, d.kind, d.key.clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (
                names::SERVICES,
                DriftKind::Differs,
                "10.96.0.10:80/TCP slot 1".to_string()
            ),
            (
                names::SERVICES,
                DriftKind::Unexpected,
                "10.96.0.99:53/UDP slot 0".to_string()
            ),
            (
                names::BACKENDS,
                DriftKind::Missing,
                "10.244.1.3:80/TCP".to_string()
            ),
        ]
    );
    t.apply(&plan).unwrap();
    assert!(t.plan(desired).unwrap().is_empty());
}

// ---- ipcache and policy ----

const WEB: u32 = 256;
const DB: u32 = 257;
const EP: u32 = 5;
const OTHER_EP: u32 = 6;

fn pod(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, i)
}

fn policy(rows: &[PolicyKey]) -> EndpointPolicy {
    EndpointPolicy {
        rows: rows
            .iter()
            .map(|k| {
                (
                    *k,
                    BTreeSet::from([RuleOrigin::Policy("default/allow".into())]),
                )
            })
            .collect(),
    }
}

fn host_row() -> PolicyKey {
    PolicyKey::any(IDENTITY_HOST, POLICY_INGRESS)
}

fn web_80() -> PolicyKey {
    PolicyKey::ports(WEB, POLICY_INGRESS, IPPROTO_TCP, 80, 16)
}

/// Endpoint `EP` (pod 10) enforcing ingress with `rows`, plus `OTHER_EP` (pod 11) with just
/// the host row, and the ipcache naming both pods.
fn enforced(rows: &[PolicyKey]) -> DesiredState {
    let mut state = DesiredState::default();
    for (ifindex, ip, identity) in [(EP, pod(10), DB), (OTHER_EP, pod(11), WEB)] {
        let mut info = EndpointInfo::new(ip, identity);
        info.flags = ENDPOINT_F_INGRESS_ENFORCED;
        state.endpoints.insert(ifindex, info);
        state
            .ipcache
            .insert(IpcacheKey::new(ip, 32), IpcacheEntry::local(identity));
    }
    state.ipcache.insert(
        IpcacheKey::new(Ipv4Addr::UNSPECIFIED, 0),
        IpcacheEntry::local(IDENTITY_WORLD),
    );
    state.policies.insert(EP, policy(rows));
    state.policies.insert(OTHER_EP, policy(&[host_row()]));
    state
}

#[test]
fn policy_maps_go_in_after_the_ipcache_and_before_the_flags_that_enforce_them() {
    let mut t = tables();
    t.realize(Desired::of(&enforced(&[host_row(), web_80()]), 16))
        .unwrap();
    let first_flag = t.endpoints.stamps.iter().min().unwrap();
    let last_ipcache = t.ipcache.stamps.iter().max().unwrap();
    assert!(
        t.policy
            .stamps
            .iter()
            .all(|s| s > last_ipcache && s < first_flag)
    );
    assert_eq!(t.policy.maps.len(), 2);

    // Un-enforcing: flags are cleared before the maps go, and ipcache entries go last.
    t.endpoints.stamps.clear();
    t.policy.stamps.clear();
    t.ipcache.stamps.clear();
    t.realize(Desired::of(&DesiredState::default(), 16))
        .unwrap();
    let last_endpoint = t.endpoints.stamps.iter().max().unwrap();
    let first_ipcache = t.ipcache.stamps.iter().min().unwrap();
    assert!(
        t.policy
            .stamps
            .iter()
            .all(|s| s > last_endpoint && s < first_ipcache)
    );
    assert!(t.policy.maps.is_empty());
    assert!(t.ipcache.entries.is_empty());
}

#[test]
fn a_changed_policy_is_swapped_in_whole_and_only_for_that_endpoint() {
    let mut t = tables();
    t.realize(Desired::of(&enforced(&[host_row(), web_80()]), 16))
        .unwrap();
    t.policy.log.clear();
    let db_any = PolicyKey::any_port(DB, POLICY_INGRESS, IPPROTO_UDP);
    let state = enforced(&[host_row(), web_80(), db_any]);
    t.realize(Desired::of(&state, 16)).unwrap();
    // One write: the complete new map for EP. No removal first (that would open a window
    // with no policy), no rows added to the live map, and OTHER_EP untouched.
    let [PolicyWrite::Install { ifindex, policy }] = t.policy.log.as_slice() else {
        panic!("expected one install, got {:?}", t.policy.log);
    };
    assert_eq!(*ifindex, EP);
    assert_eq!(
        policy.rows.keys().copied().collect::<Vec<_>>(),
        state.policies[&EP].rows.keys().copied().collect::<Vec<_>>()
    );
    assert!(
        t.realize(Desired::of(&state, 16))
            .map(|s| !s.changed())
            .unwrap()
    );
}

#[test]
fn counters_carry_over_a_swap_and_never_count_as_drift() {
    let mut t = tables();
    t.realize(Desired::of(&enforced(&[host_row(), web_80()]), 16))
        .unwrap();
    let counted = PolicyEntry {
        packets: 3,
        bytes: 180,
    };
    t.policy
        .maps
        .get_mut(&EP)
        .unwrap()
        .rows
        .insert(web_80(), counted);
    let same = enforced(&[host_row(), web_80()]);
    assert!(t.plan(Desired::of(&same, 16)).unwrap().is_empty());

    let more = enforced(&[host_row(), web_80(), PolicyKey::any(DB, POLICY_INGRESS)]);
    t.realize(Desired::of(&more, 16)).unwrap();
    assert_eq!(t.policy.maps[&EP].rows[&web_80()], counted);
    assert_eq!(t.policy.maps[&EP].rows.len(), 3);
}

#[test]
fn a_capacity_change_swaps_every_map() {
    let mut t = tables();
    let state = enforced(&[host_row(), web_80()]);
    t.realize(Desired::of(&state, 16)).unwrap();
    t.policy.log.clear();
    let plan = t.plan(Desired::of(&state, 32)).unwrap();
    let drift: Vec<_> = plan.drift().into_iter().map(|d| d.key).collect();
    assert_eq!(drift, ["ifindex 5 capacity", "ifindex 6 capacity"]);
    t.apply(&plan).unwrap();
    assert_eq!(t.policy.log.len(), 2);
    assert!(t.policy.maps.values().all(|m| m.capacity == 32));
}

#[test]
fn policy_drift_names_each_row_and_map_and_is_repaired() {
    let mut t = tables();
    let state = enforced(&[host_row(), web_80()]);
    t.realize(Desired::of(&state, 16)).unwrap();
    // Behind the realizer's back: a row allowing UDP/53 from the world appears in EP's map,
    // the host row vanishes, OTHER_EP's map is gone, and a stray endpoint has one.
    let ep = t.policy.maps.get_mut(&EP).unwrap();
    let stray_row = PolicyKey::ports(IDENTITY_WORLD, POLICY_INGRESS, IPPROTO_UDP, 53, 16);
    ep.rows.insert(stray_row, PolicyEntry::default());
    ep.rows.remove(&host_row());
    t.policy.maps.remove(&OTHER_EP);
    t.policy.maps.insert(99, InstalledPolicy::default());

    let plan = t.plan(Desired::of(&state, 16)).unwrap();
    let drift: Vec<_> = plan
        .drift()
        .into_iter()
        .map(|d| (d.map, d.kind, d.key))
        .collect();
    assert_eq!(
        drift,
        [
            (
                names::POLICY,
                DriftKind::Missing,
                "ifindex 5 ingress identity=1 ANY prefix 40".to_string()
            ),
            (
                names::POLICY,
                DriftKind::Unexpected,
                "ifindex 5 ingress identity=2 53/UDP prefix 64".to_string()
            ),
            (names::POLICY, DriftKind::Missing, "ifindex 6".to_string()),
            (
                names::POLICY,
                DriftKind::Unexpected,
                "ifindex 99".to_string()
            ),
        ]
    );
    t.apply(&plan).unwrap();
    assert!(t.plan(Desired::of(&state, 16)).unwrap().is_empty());
    assert!(!t.policy.maps.contains_key(&99));
}

#[test]
fn ipcache_drift_is_reported_and_repaired() {
    let mut t = tables();
    let state = enforced(&[host_row()]);
    t.realize(Desired::of(&state, 16)).unwrap();
    t.ipcache.entries.insert(
        IpcacheKey::new(pod(10), 32),
        IpcacheEntry::local(IDENTITY_WORLD),
    );
    let plan = t.plan(Desired::of(&state, 16)).unwrap();
    let drift = plan.drift();
    assert_eq!(drift.len(), 1);
    assert_eq!(
        (drift[0].map, drift[0].kind, drift[0].key.as_str()),
        (names::IPCACHE, DriftKind::Differs, "10.244.1.10/32")
    );
    t.apply(&plan).unwrap();
    assert!(t.plan(Desired::of(&state, 16)).unwrap().is_empty());
}

#[test]
fn the_plan_covers_exactly_the_maps_the_registry_realizes() {
    let state = DesiredState::default();
    let plan = tables().plan(Desired::of(&state, 16)).unwrap();
    let mut parts: Vec<MapId> = plan.parts().iter().map(|(id, _)| *id).collect();
    parts.sort();
    let mut realized: Vec<MapId> = sluice_common::registry::realized().map(|d| d.id).collect();
    realized.sort();
    assert_eq!(parts, realized);
    // And apply finds a table for each of them.
    assert!(!tables().apply(&plan).unwrap().changed());
}

/// `services_only(ids)` with the frontend on Maglev and a table of 7 positions.
fn maglev_state(ids: &[u8]) -> DesiredState {
    let mut state = services_only(ids);
    let key = Lb4Key::new(VIP, 80, IPPROTO_TCP, 0);
    let n = u16::try_from(ids.len()).unwrap();
    state
        .maglev
        .insert(key, (0..7).map(|i| i % n + 1).collect());
    state
}

#[test]
fn maglev_tables_go_in_after_backends_and_out_after_frontends() {
    let mut t = tables();
    let key = Lb4Key::new(VIP, 80, IPPROTO_TCP, 0);
    t.realize(Desired::of(&maglev_state(&[2, 3]), 16)).unwrap();
    let lanes = &t.maglev.tables[&key];
    assert_eq!(
        lanes.as_slice(),
        [[1, 2, 1, 2], [1, 2, 1, 0]],
        "packed, padded with 0"
    );
    let table_written = t.maglev.stamps[0];
    assert!(t.backends.stamps.iter().all(|&s| s < table_written));
    assert!(t.services.stamps.iter().all(|&s| s > table_written));

    // Unchanged: nothing is swapped.
    let stats = t.realize(Desired::of(&maglev_state(&[2, 3]), 16)).unwrap();
    assert!(!stats.changed());
    assert_eq!(t.maglev.log.len(), 1);

    // A third backend: a whole new table.
    t.realize(Desired::of(&maglev_state(&[2, 3, 4]), 16))
        .unwrap();
    assert_eq!(t.maglev.tables[&key], [[1, 2, 3, 1], [2, 3, 1, 0]]);

    // The Service goes: the frontend is removed before its table.
    t.services.stamps.clear();
    t.realize(Desired::of(&DesiredState::default(), 16))
        .unwrap();
    assert!(t.maglev.tables.is_empty());
    let removed = *t.maglev.stamps.last().unwrap();
    assert!(t.services.stamps.iter().all(|&s| s < removed));

    // A table nobody asked for is drift, reported and removed.
    t.maglev.tables.insert(key, vec![[1, 1, 1, 1]]);
    let empty = DesiredState::default();
    let plan = t.plan(Desired::of(&empty, 16)).unwrap();
    let drift = plan.drift();
    assert_eq!(drift.len(), 1);
    assert_eq!(drift[0].map, names::MAGLEV);
    assert_eq!(drift[0].kind, DriftKind::Unexpected);
    assert_eq!(drift[0].actual.as_deref(), Some("table of 4 positions"));
}
