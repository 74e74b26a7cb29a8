//! The delta pass against real pinned maps (needs root and bpffs; never skipped): after a
//! full pass, one Service changed, then a delta pass ([`KernelTables::plan_delta`]); a full
//! read of the kernel must then find nothing to do. `one_service_change_at_100k_services`
//! prints, never asserts on, the time of one change at 100,000 Services, full pass against
//! delta (`--release -- --ignored --nocapture`).
// Test helpers outside #[test] functions: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use sluice_common::*;
use sluice_compiler::DesiredState;
use sluice_datapath::{Datapath, DatapathConfig, PinDir};
use sluice_realizer::{Desired, KernelTables};

fn load() -> (PinDir, Datapath, KernelTables) {
    let pins = PinDir::unique("sluice-test-delta-");
    let datapath = Datapath::load(pins.path(), &DatapathConfig::default())
        .unwrap_or_else(|err| panic!("loading the datapath into {}: {err}", pins.path().display()));
    let tables = KernelTables::open(pins.path()).expect("open the realized maps");
    (pins, datapath, tables)
}

fn offset(base: Ipv4Addr, by: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + by)
}

/// Service `i`'s ClusterIP frontend on port 80 with `backends` slots, and its backends.
fn service(state: &mut DesiredState, i: u32, backends: u16) {
    let vip = offset(Ipv4Addr::new(10, 96, 0, 0), i);
    state.services.insert(
        Lb4Key::new(vip, 80, IPPROTO_TCP, 0),
        Lb4Service::frontend(backends, SVC_FLAG_CLUSTER_IP),
    );
    for slot in 1..=backends {
        let backend = offset(Ipv4Addr::new(10, 128, 0, 0), i * 4 + u32::from(slot));
        state.services.insert(
            Lb4Key::new(vip, 80, IPPROTO_TCP, slot),
            Lb4Service::slot(backend, 8080),
        );
        state.backends.insert(
            Lb4BackendKey::new(backend, 8080, IPPROTO_TCP),
            Lb4Backend::default(),
        );
        state
            .ipcache
            .insert(IpcacheKey::new(backend, 32), IpcacheEntry::local(256));
    }
}

/// `count` Services with 2 or 3 backends each (2.5 on average).
fn services(count: u32) -> DesiredState {
    let mut state = DesiredState::default();
    state.ipcache.insert(
        IpcacheKey::new(Ipv4Addr::UNSPECIFIED, 0),
        IpcacheEntry::local(IDENTITY_WORLD),
    );
    for i in 0..count {
        service(&mut state, i, 2 + u16::from(i % 2 == 0));
    }
    state
}

/// One change: Service `i` gains a backend or loses one.
fn changed(state: &DesiredState, i: u32) -> DesiredState {
    let mut next = state.clone();
    let vip = offset(Ipv4Addr::new(10, 96, 0, 0), i);
    let count = next.services[&Lb4Key::new(vip, 80, IPPROTO_TCP, 0)].count;
    for slot in 0..=count {
        next.services
            .remove(&Lb4Key::new(vip, 80, IPPROTO_TCP, slot));
    }
    service(&mut next, i, if count == 3 { 2 } else { 3 });
    next
}

/// Full pass, then `rounds` changes by delta; after each a full read finds nothing to do.
/// Returns the mean time of a full pass and of a delta pass for one change.
fn run(count: u32, rounds: u32) -> (Duration, Duration) {
    let (_pins, _datapath, mut tables) = load();
    let mut state = services(count);
    tables.realize(Desired::of(&state, 16)).unwrap();
    let (mut full, mut delta) = (Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        let next = changed(&state, round * 7 % count);
        let started = Instant::now();
        let plan = tables
            .plan_delta(Desired::of(&state, 16), Desired::of(&next, 16))
            .unwrap();
        let stats = tables.apply(&plan).unwrap();
        delta += started.elapsed();
        assert!(stats.changed());
        let started = Instant::now();
        let left = tables.plan(Desired::of(&next, 16)).unwrap();
        full += started.elapsed();
        assert!(left.is_empty(), "round {round}: {:?}", left.drift());
        state = next;
    }
    (full / rounds, delta / rounds)
}

#[test]
fn a_delta_pass_leaves_the_maps_as_a_full_pass_would() {
    run(200, 20);
}

#[test]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
fn one_service_change_at_100k_services() {
    for count in [10_000, 100_000] {
        let (full, delta) = run(count, 10);
        println!(
            "{count} Services: one Service change realized by a delta pass in {delta:?}; \
             a full pass (read and diff every map) takes {full:?} (mean of 10)"
        );
    }
}
