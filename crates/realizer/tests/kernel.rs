//! The realizer against a real loaded datapath: ipcache and per-endpoint policy maps
//! (needs root and bpffs; never skipped).
// Test helpers outside #[test] functions: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeSet, net::Ipv4Addr};

use aya::maps::{IterableMap, lpm_trie::Key};
use sluice_common::{kinds::RuleOrigin, *};
use sluice_compiler::{DesiredState, EndpointPolicy};
use sluice_datapath::{Datapath, DatapathConfig, PinDir, PinnedMaps, PolicyMap};
use sluice_realizer::{Desired, DriftKind, KernelTables, PolicyTable};

/// Loads the datapath and opens its maps as the agent does. Panics if BPF can't load.
fn load() -> (PinDir, Datapath, KernelTables) {
    let pins = PinDir::unique("sluice-test-realizer-");
    let datapath = Datapath::load(pins.path(), &DatapathConfig::default())
        .unwrap_or_else(|err| panic!("loading the datapath into {}: {err}", pins.path().display()));
    let tables = KernelTables::open(pins.path()).expect("open the realized maps");
    (pins, datapath, tables)
}

/// A second handle on the pinned maps, for writes behind the realizer's back.
fn behind_the_back(pins: &PinDir) -> PinnedMaps {
    PinnedMaps::open(pins.path()).expect("open pinned maps")
}

const WEB: u32 = 256;
const DB: u32 = 257;
const EP: u32 = 5;
const OTHER_EP: u32 = 6;

fn pod(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, i)
}

fn host_row() -> PolicyKey {
    PolicyKey::any(IDENTITY_HOST, POLICY_INGRESS)
}

fn web_80() -> PolicyKey {
    PolicyKey::ports(WEB, POLICY_INGRESS, IPPROTO_TCP, 80, 16)
}

/// 8000-8015/TCP from anyone: an endPort range as one power-of-two prefix.
fn any_8000_8015() -> PolicyKey {
    PolicyKey::ports(IDENTITY_ANY, POLICY_INGRESS, IPPROTO_TCP, 8000, 12)
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

/// `EP` (pod 10, DB) enforcing ingress with `rows`; `OTHER_EP` (pod 11, WEB) with the host
/// row only; the ipcache naming both pods, a policy CIDR and the world.
fn state(rows: &[PolicyKey]) -> DesiredState {
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
        IpcacheKey::new(Ipv4Addr::new(192, 0, 2, 0), 24),
        IpcacheEntry::local(IDENTITY_SCOPE_CIDR | 1),
    );
    state.ipcache.insert(
        IpcacheKey::new(Ipv4Addr::UNSPECIFIED, 0),
        IpcacheEntry::local(IDENTITY_WORLD),
    );
    state.policies.insert(EP, policy(rows));
    state.policies.insert(OTHER_EP, policy(&[host_row()]));
    state
}

fn inner(maps: &PinnedMaps, ifindex: u32) -> PolicyMap {
    maps.policy.get(&ifindex, 0).expect("policy map installed")
}

fn map_id(map: &PolicyMap) -> u32 {
    map.map().info().expect("map info").id()
}

fn lpm(key: &PolicyKey) -> Key<PolicyMatch> {
    Key::new(key.prefixlen, key.rule)
}

#[test]
fn realizes_ipcache_and_policy_then_reports_and_repairs_a_row_written_behind_its_back() {
    let (pins, _datapath, mut tables) = load();
    let desired = state(&[host_row(), web_80(), any_8000_8015()]);
    let stats = tables.realize(Desired::of(&desired, 64)).expect("realize");
    assert!(stats.changed());
    assert!(
        tables.plan(Desired::of(&desired, 64)).unwrap().is_empty(),
        "a second read finds nothing to do"
    );

    // The kernel holds what was desired: the datapath's LPM lookups find the rows.
    let maps = behind_the_back(&pins);
    let ep = inner(&maps, EP);
    let exact = Key::new(
        POLICY_PREFIX_FULL,
        PolicyMatch {
            identity: IDENTITY_ANY,
            direction: POLICY_INGRESS,
            proto: IPPROTO_TCP,
            dport: 8011u16.to_be(),
        },
    );
    assert!(ep.get(&exact, 0).is_ok(), "8011 falls in 8000-8015");
    let world = Key::new(32, u32::from_ne_bytes([198, 51, 100, 7]));
    assert_eq!(
        maps.ipcache.get(&world, 0).unwrap().identity,
        IDENTITY_WORLD
    );

    // Behind the realizer's back: a row allowing UDP/53 from the world, and the host row
    // gone.
    let stray = PolicyKey::ports(IDENTITY_WORLD, POLICY_INGRESS, IPPROTO_UDP, 53, 16);
    let mut ep = inner(&maps, EP);
    ep.insert(&lpm(&stray), PolicyEntry::default(), 0).unwrap();
    ep.remove(&lpm(&host_row())).unwrap();
    let before = map_id(&ep);

    let plan = tables.plan(Desired::of(&desired, 64)).unwrap();
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
        ]
    );
    tables.apply(&plan).unwrap();
    assert!(tables.plan(Desired::of(&desired, 64)).unwrap().is_empty());
    // Repaired by a swap, not in place: the map the datapath held is left as it was.
    let repaired = inner(&maps, EP);
    assert_ne!(map_id(&repaired), before);
    assert!(ep.get(&lpm(&stray), 0).is_ok());
    assert!(repaired.get(&lpm(&stray), 0).is_err());
}

#[test]
fn counters_carry_over_a_swap_and_untouched_endpoints_keep_their_map() {
    let (pins, _datapath, mut tables) = load();
    tables
        .realize(Desired::of(&state(&[host_row(), web_80()]), 64))
        .unwrap();
    let maps = behind_the_back(&pins);
    // The datapath counts what web_80 admitted.
    let counted = PolicyEntry {
        packets: 4,
        bytes: 240,
    };
    inner(&maps, EP)
        .insert(&lpm(&web_80()), counted, 0)
        .unwrap();
    assert!(
        tables
            .plan(Desired::of(&state(&[host_row(), web_80()]), 64))
            .unwrap()
            .is_empty(),
        "counters are not drift"
    );
    let ep_before = map_id(&inner(&maps, EP));
    let other_before = map_id(&inner(&maps, OTHER_EP));

    let more = state(&[host_row(), web_80(), PolicyKey::any(DB, POLICY_INGRESS)]);
    tables.realize(Desired::of(&more, 64)).unwrap();
    let ep = inner(&maps, EP);
    assert_ne!(map_id(&ep), ep_before, "changed rows: a new map");
    assert_eq!(ep.get(&lpm(&web_80()), 0).unwrap(), counted);
    assert_eq!(ep.keys().count(), 3);
    assert_eq!(
        map_id(&inner(&maps, OTHER_EP)),
        other_before,
        "same rows: not rewritten"
    );
}

#[test]
fn a_capacity_change_swaps_in_maps_of_the_new_size() {
    let (pins, _datapath, mut tables) = load();
    let desired = state(&[host_row(), web_80()]);
    tables.realize(Desired::of(&desired, 64)).unwrap();
    let maps = behind_the_back(&pins);
    assert_eq!(inner(&maps, EP).map().info().unwrap().max_entries(), 64);

    let plan = tables.plan(Desired::of(&desired, 128)).unwrap();
    let drift: Vec<_> = plan.drift().into_iter().map(|d| d.key).collect();
    assert_eq!(drift, ["ifindex 5 capacity", "ifindex 6 capacity"]);
    tables.apply(&plan).unwrap();
    for ifindex in [EP, OTHER_EP] {
        let map = inner(&maps, ifindex);
        assert_eq!(map.map().info().unwrap().max_entries(), 128);
        assert_eq!(map.keys().count(), desired.policies[&ifindex].rows.len());
    }
}

#[test]
fn ipcache_and_policy_removals_and_drift() {
    let (pins, _datapath, mut tables) = load();
    let desired = state(&[host_row()]);
    tables.realize(Desired::of(&desired, 64)).unwrap();
    let mut maps = behind_the_back(&pins);

    // A pod's address now maps to the world, and a stray policy map appeared.
    maps.ipcache
        .insert(
            &Key::new(32, addr_be(pod(10))),
            IpcacheEntry::local(IDENTITY_WORLD),
            0,
        )
        .unwrap();
    let stray = sluice_datapath::create_policy_map(64).unwrap();
    maps.policy.insert(99, &stray, 0).unwrap();
    let plan = tables.plan(Desired::of(&desired, 64)).unwrap();
    let drift: Vec<_> = plan
        .drift()
        .into_iter()
        .map(|d| (d.map, d.kind, d.key))
        .collect();
    assert_eq!(
        drift,
        [
            (
                names::IPCACHE,
                DriftKind::Differs,
                "10.244.1.10/32".to_string()
            ),
            (
                names::POLICY,
                DriftKind::Unexpected,
                "ifindex 99".to_string()
            ),
        ]
    );
    tables.apply(&plan).unwrap();
    assert!(tables.plan(Desired::of(&desired, 64)).unwrap().is_empty());

    // Nothing desired: every map and entry goes.
    tables
        .realize(Desired::of(&DesiredState::default(), 64))
        .unwrap();
    assert!(tables.policy.endpoints().unwrap().is_empty());
    assert_eq!(maps.ipcache.keys().count(), 0);
}

/// The realizer's share of "policy change to enforcement": 100 enforced endpoints with 20
/// rows each, then one change that affects all of them, then one that affects a single
/// endpoint.
#[test]
fn a_policy_change_over_100_endpoints_is_realized_promptly() {
    let (_pins, _datapath, mut tables) = load();
    let build = |extra_port: u16| {
        let mut state = DesiredState::default();
        for n in 0..100u32 {
            let ifindex = 1000 + n;
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + n);
            let mut info = EndpointInfo::new(ip, WEB + n);
            info.flags = ENDPOINT_F_INGRESS_ENFORCED | ENDPOINT_F_EGRESS_ENFORCED;
            state.endpoints.insert(ifindex, info);
            state
                .ipcache
                .insert(IpcacheKey::new(ip, 32), IpcacheEntry::local(WEB + n));
            let mut rows = vec![host_row(), PolicyKey::any(IDENTITY_HOST, POLICY_EGRESS)];
            rows.extend((0..18).map(|p| {
                PolicyKey::ports(WEB + p, POLICY_INGRESS, IPPROTO_TCP, 8000 + p as u16, 16)
            }));
            // The changing row: every endpoint for a port below 100, only the first above.
            if extra_port < 100 || n == 0 {
                rows.push(PolicyKey::ports(
                    IDENTITY_ANY,
                    POLICY_EGRESS,
                    IPPROTO_UDP,
                    extra_port,
                    16,
                ));
            }
            state.policies.insert(ifindex, policy(&rows));
        }
        state
    };
    let timed = |tables: &mut KernelTables, state: &DesiredState| {
        let started = std::time::Instant::now();
        tables.realize(Desired::of(state, 1024)).unwrap();
        started.elapsed()
    };
    let first = timed(&mut tables, &build(53));
    let all = timed(&mut tables, &build(54));
    let _ = timed(&mut tables, &build(5353));
    let one = timed(&mut tables, &build(5354));
    let idle = timed(&mut tables, &build(5354));
    assert!(
        tables
            .plan(Desired::of(&build(5354), 1024))
            .unwrap()
            .is_empty()
    );
    let removed = timed(&mut tables, &DesiredState::default());
    println!(
        "100 endpoints x 21 rows: install {first:?}; change on all {all:?}; \
         change on one {one:?}; no change {idle:?}; all removed {removed:?}"
    );
    assert!(all.as_secs_f64() < 1.0, "{all:?}");
    assert!(removed.as_secs_f64() < 1.0, "{removed:?}");
    assert_eq!(tables.policy.endpoint_count(), 0);
}

#[test]
fn a_batch_removal_skips_endpoints_already_gone() {
    let (_pins, _datapath, mut tables) = load();
    tables
        .realize(Desired::of(&state(&[host_row()]), 64))
        .unwrap();
    tables.policy.remove(&[12345, EP, 777, OTHER_EP]).unwrap();
    assert!(tables.policy.endpoints().unwrap().is_empty());
}
