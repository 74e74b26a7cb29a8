use std::{collections::BTreeMap, net::Ipv4Addr};

use sluice_common::*;

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

type MemTables = Tables<
    MemoryMap<Lb4Key, Lb4Service>,
    MemoryMap<Lb4BackendKey, Lb4Backend>,
    MemoryMap<u32, EndpointInfo>,
>;

fn tables() -> MemTables {
    Tables {
        services: MemoryMap::new(names::SERVICES),
        backends: MemoryMap::new(names::BACKENDS),
        endpoints: MemoryMap::new(names::ENDPOINTS),
    }
}

fn realize(t: &mut MemTables, ids: &[u8]) -> ApplyStats {
    let (s, b, e) = (frontend(ids), backends(ids), BTreeMap::new());
    t.realize(Desired {
        services: &s,
        backends: &b,
        endpoints: &e,
    })
    .unwrap()
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

    let (s, b, e) = (frontend(&[2, 3]), backends(&[2, 3]), BTreeMap::new());
    let desired = Desired {
        services: &s,
        backends: &b,
        endpoints: &e,
    };
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
