//! The delta pass against the full pass: random sequences of desired states (every realized
//! map: frontends and slots, backends, endpoints, ipcache, source ranges, policy maps with
//! counters, Maglev tables). One set of in-memory tables follows them with full passes
//! (read, diff, apply), another with [`Tables::plan_delta`] from the state before; after
//! every step both hold exactly the desired content and saw the same writes in the same
//! order, with the same counters carried over.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use sluice_common::{kinds::RuleOrigin, *};
use sluice_compiler::{DesiredState, EndpointPolicy};

use super::*;
use crate::maglev::pack;

fn tables() -> Tables<Memory> {
    Tables::in_memory()
}

fn address(rng: &mut fastrand::Rng) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, rng.u8(..12))
}

fn state(rng: &mut fastrand::Rng) -> DesiredState {
    let mut s = DesiredState::default();
    for _ in 0..rng.usize(..6) {
        let (vip, port) = (address(rng), *[80, 443].get(rng.usize(..2)).unwrap_or(&80));
        let count = rng.u16(..4);
        let key = Lb4Key::new(vip, port, IPPROTO_TCP, 0);
        s.services
            .insert(key, Lb4Service::frontend(count, SVC_FLAG_CLUSTER_IP));
        for slot in 1..=count {
            let backend = address(rng);
            s.services.insert(
                Lb4Key::new(vip, port, IPPROTO_TCP, slot),
                Lb4Service::slot(backend, 8080),
            );
            s.backends.insert(
                Lb4BackendKey::new(backend, 8080, IPPROTO_TCP),
                Lb4Backend::default(),
            );
        }
        if rng.bool() && count > 0 {
            let table: Vec<u16> = (0..7).map(|_| rng.u16(1..=count)).collect();
            s.maglev.insert(key, Arc::from(table));
        }
        if rng.u8(..3) == 0 {
            let range = Lb4SourceRangeKey::new(vip, port, IPPROTO_TCP, address(rng), 24);
            s.source_ranges.insert(range, 1);
        }
    }
    for _ in 0..rng.usize(..8) {
        let entry = IpcacheEntry {
            identity: rng.u32(256..260),
            tunnel_endpoint: [0, 1][rng.usize(..2)],
        };
        s.ipcache.insert(
            IpcacheKey::new(address(rng), [24, 32][rng.usize(..2)]),
            entry,
        );
    }
    for ifindex in 1..rng.u32(1..5) {
        s.endpoints
            .insert(ifindex, EndpointInfo::new(address(rng), rng.u32(256..260)));
        if rng.bool() {
            let rows = (0..rng.usize(1..4))
                .map(|_| {
                    let key =
                        PolicyKey::ports(rng.u32(256..260), POLICY_INGRESS, IPPROTO_TCP, 80, 16);
                    (key, [RuleOrigin::Host].into())
                })
                .collect();
            s.policies.insert(ifindex, EndpointPolicy { rows });
        }
    }
    s
}

/// Traffic: every row of every installed policy map counts a packet.
fn count_packets(t: &mut Tables<Memory>) {
    for policy in t.policy.maps.values_mut() {
        for entry in policy.rows.values_mut() {
            entry.packets += 1;
            entry.bytes += 100;
        }
    }
}

/// The writes of every table, without their stamps, then cleared.
type Writes = (
    Vec<(Lb4Key, Option<Lb4Service>)>,
    Vec<(Lb4BackendKey, Option<Lb4Backend>)>,
    Vec<(u32, Option<EndpointInfo>)>,
    Vec<(IpcacheKey, Option<IpcacheEntry>)>,
    Vec<(Lb4SourceRangeKey, Option<u32>)>,
    Vec<PolicyWrite>,
    Vec<maglev::MaglevWrite>,
);

fn take_writes(t: &mut Tables<Memory>) -> Writes {
    (
        std::mem::take(&mut t.services.log),
        std::mem::take(&mut t.backends.log),
        std::mem::take(&mut t.endpoints.log),
        std::mem::take(&mut t.ipcache.log),
        std::mem::take(&mut t.source_ranges.log),
        std::mem::take(&mut t.policy.log),
        std::mem::take(&mut t.maglev.log),
    )
}

fn assert_holds(t: &Tables<Memory>, s: &DesiredState, capacity: u32, what: &str) {
    assert_eq!(t.services.entries, s.services, "{what}: services");
    assert_eq!(t.backends.entries, s.backends, "{what}: backends");
    assert_eq!(t.endpoints.entries, s.endpoints, "{what}: endpoints");
    assert_eq!(t.ipcache.entries, s.ipcache, "{what}: ipcache");
    assert_eq!(
        t.source_ranges.entries, s.source_ranges,
        "{what}: source ranges"
    );
    let tables: BTreeMap<_, _> = s.maglev.iter().map(|(k, v)| (*k, pack(v))).collect();
    assert_eq!(t.maglev.tables, tables, "{what}: maglev");
    let rows: BTreeMap<_, Vec<_>> = t
        .policy
        .maps
        .iter()
        .map(|(i, p)| {
            assert_eq!(p.capacity, capacity, "{what}: policy capacity");
            (*i, p.rows.keys().copied().collect())
        })
        .collect();
    let want: BTreeMap<_, Vec<_>> = s
        .policies
        .iter()
        .map(|(i, p)| (*i, p.rows.keys().copied().collect()))
        .collect();
    assert_eq!(rows, want, "{what}: policy rows");
}

/// The writes of `t`, kept for the next comparison.
fn delta_writes(t: &mut Tables<Memory>) -> Writes {
    let writes = take_writes(t);
    t.services.log.clone_from(&writes.0);
    t.backends.log.clone_from(&writes.1);
    t.endpoints.log.clone_from(&writes.2);
    t.ipcache.log.clone_from(&writes.3);
    t.source_ranges.log.clone_from(&writes.4);
    t.policy.log.clone_from(&writes.5);
    t.maglev.log.clone_from(&writes.6);
    writes
}

/// A delta naming every key of `before` and `after`, with its value in `before`.
fn touched(before: &DesiredState, after: &DesiredState) -> sluice_compiler::Delta {
    fn all<K: Ord + Clone, V: Clone>(
        before: &BTreeMap<K, V>,
        after: &BTreeMap<K, V>,
    ) -> BTreeMap<K, Option<V>> {
        before
            .keys()
            .chain(after.keys())
            .map(|k| (k.clone(), before.get(k).cloned()))
            .collect()
    }
    sluice_compiler::Delta {
        services: all(&before.services, &after.services),
        backends: all(&before.backends, &after.backends),
        maglev: all(&before.maglev, &after.maglev),
        source_ranges: all(&before.source_ranges, &after.source_ranges),
        endpoints: all(&before.endpoints, &after.endpoints),
        ipcache: all(&before.ipcache, &after.ipcache),
        policies: all(&before.policies, &after.policies),
    }
}

#[test]
fn any_sequence_of_delta_passes_equals_the_full_passes() {
    let mut changed = 0;
    for seed in 0..300 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (mut full, mut delta, mut changes) = (tables(), tables(), tables());
        let mut capacity = 16;
        let mut before = state(&mut rng);
        full.realize(Desired::of(&before, capacity)).unwrap();
        delta.realize(Desired::of(&before, capacity)).unwrap();
        changes.realize(Desired::of(&before, capacity)).unwrap();
        take_writes(&mut full);
        take_writes(&mut delta);
        take_writes(&mut changes);
        for step in 0..20 {
            let what = format!("seed {seed}, step {step}");
            // Often a small change of the state before, sometimes a new one.
            let mut next = if rng.u8(..4) == 0 {
                state(&mut rng)
            } else {
                let mut next = before.clone();
                let other = state(&mut rng);
                match rng.u8(..5) {
                    0 => next.services = other.services,
                    1 => next.ipcache = other.ipcache,
                    2 => next.policies = other.policies,
                    3 => next.maglev = other.maglev,
                    _ => next.backends = other.backends,
                }
                next
            };
            if rng.u8(..10) == 0 {
                capacity = [16, 32][rng.usize(..2)];
            }
            let previous_capacity = full
                .policy
                .maps
                .values()
                .next()
                .map_or(capacity, |p| p.capacity);
            count_packets(&mut full);
            count_packets(&mut delta);
            count_packets(&mut changes);
            full.realize(Desired::of(&next, capacity)).unwrap();
            let plan = delta
                .plan_delta(
                    Desired::of(&before, previous_capacity),
                    Desired::of(&next, capacity),
                )
                .unwrap();
            delta.apply(&plan).unwrap();
            assert_holds(&delta, &next, capacity, &what);
            let writes = take_writes(&mut full);
            assert_eq!(delta_writes(&mut delta), writes, "{what}: writes");
            assert_eq!(delta.policy.maps, full.policy.maps, "{what}: counters");
            // The compiler's record of what it touched: every key of either state, so
            // entries touched and unchanged are among them.
            if capacity == previous_capacity {
                let plan = changes
                    .plan_changes(&touched(&before, &next), Desired::of(&next, capacity))
                    .unwrap();
                changes.apply(&plan).unwrap();
                assert_eq!(
                    take_writes(&mut changes),
                    take_writes(&mut delta),
                    "{what}: writes of the change set"
                );
            } else {
                changes.realize(Desired::of(&next, capacity)).unwrap();
                take_writes(&mut changes);
                take_writes(&mut delta);
            }
            assert_eq!(changes.policy.maps, full.policy.maps, "{what}: counters");
            changed += usize::from(!plan.is_empty());
            std::mem::swap(&mut before, &mut next);
        }
    }
    // Most steps must change something for the comparison to mean anything.
    assert!(changed > 3000, "{changed} steps changed the maps");
}
