//! A change set from the compiler to real pinned maps (needs root and bpffs; never
//! skipped): after a full pass, Services and EndpointSlices change one at a time, the
//! compiler updates its state in place ([`CompileCache::update`]) and records the entries
//! it changed, and the realizer writes only those ([`KernelTables::plan_changes`]); a full
//! read of the kernel must then find nothing to do, and the state must equal a full
//! compile. `one_change_at_100k_services` prints, never asserts on, the time from the
//! change set to realized maps at 10,000 and 100,000 Services (`--release -- --ignored
//! --nocapture`).
// Test helpers outside #[test] functions: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;
use sluice_compiler::{Changes, CompileCache, NodeContext, compile};
use sluice_datapath::{Datapath, DatapathConfig, PinDir};
use sluice_realizer::{Desired, KernelTables};
use sluice_store::Snapshot;

const POLICY_ROWS: u32 = 16;

fn load() -> (PinDir, Datapath, KernelTables) {
    let pins = PinDir::unique("sluice-test-change-");
    let datapath = Datapath::load(pins.path(), &DatapathConfig::default())
        .unwrap_or_else(|err| panic!("loading the datapath into {}: {err}", pins.path().display()));
    let tables = KernelTables::open(pins.path()).expect("open the realized maps");
    (pins, datapath, tables)
}

fn key(name: String) -> (String, String) {
    ("default".to_string(), name)
}

/// Service `i`: a ClusterIP on port 80, at `version`, with `ports` ports.
fn service(i: usize, version: usize) -> Service {
    let vip = format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256);
    let ports: Vec<_> = (0..1 + version % 2)
        .map(|p| json!({"name": format!("p{p}"), "port": 80 + p, "protocol": "TCP"}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc{i}"), "namespace": "default",
                     "uid": format!("svc{i}"), "resourceVersion": version.to_string()},
        "spec": {"clusterIP": vip, "ports": ports},
    }))
    .unwrap()
}

/// Service `i`'s slice with `backends` endpoints.
fn slice(i: usize, backends: usize) -> std::sync::Arc<EndpointSlice> {
    let endpoints: Vec<_> = (0..backends)
        .map(|b| {
            json!({
                "addresses": [format!("10.{}.{}.{}", 128 + b, (i / 256) % 256, i % 256)],
                "conditions": {"ready": true},
            })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("svc{i}-x"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": format!("svc{i}")},
            "uid": format!("svc{i}-x"), "resourceVersion": backends.to_string(),
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "p0", "port": 8080, "protocol": "TCP"},
                  {"name": "p1", "port": 8081, "protocol": "TCP"}],
    }))
    .unwrap()
}

/// The change of round `round` at `count` Services: a slice gains or loses a backend, a
/// Service gains or loses a port, or is deleted and comes back.
fn change(round: usize, count: usize) -> Changes {
    let i = round * 7919 % count;
    let mut changes = Changes::default();
    match round % 4 {
        0 => {
            changes.endpoint_slices.insert(
                key(format!("svc{i}-x")),
                Some(slice(i, 3 + (round / 4) % 2)),
            );
        }
        1 => {
            changes
                .services
                .insert(key(format!("svc{i}")), Some(service(i, round)));
        }
        2 => {
            changes.services.insert(key(format!("svc{i}")), None);
        }
        _ => {
            let i = (round - 1) * 7919 % count;
            changes
                .services
                .insert(key(format!("svc{i}")), Some(service(i, 0)));
        }
    }
    changes
}

/// The Services and slices as an API server holds them.
#[derive(Default)]
struct Objects {
    services: BTreeMap<(String, String), Service>,
    slices: BTreeMap<(String, String), std::sync::Arc<EndpointSlice>>,
}

impl Objects {
    fn apply(&mut self, changes: Changes) {
        for (key, service) in changes.services {
            match service {
                Some(s) => self.services.insert(key, s),
                None => self.services.remove(&key),
            };
        }
        for (key, slice) in changes.endpoint_slices {
            match slice {
                Some(s) => self.slices.insert(key, s),
                None => self.slices.remove(&key),
            };
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: self.services.values().cloned().collect(),
            endpoint_slices: self.slices.values().cloned().collect(),
            ..Snapshot::default()
        }
    }
}

/// What one run measured: means per change.
struct Times {
    compile: Duration,
    realize: Duration,
    written: usize,
}

/// A full pass of `count` Services, then `rounds` change sets, each compiled in place and
/// realized by its delta; with `check`, after each a full read finds nothing to do and
/// the state equals a full compile.
fn run(count: usize, rounds: usize, check: bool) -> Times {
    let (_pins, _datapath, mut tables) = load();
    let node = NodeContext {
        node: "node-a".into(),
        ..NodeContext::default()
    };
    let mut changes = Changes::default();
    for i in 0..count {
        changes
            .services
            .insert(key(format!("svc{i}")), Some(service(i, 0)));
        changes
            .endpoint_slices
            .insert(key(format!("svc{i}-x")), Some(slice(i, 2)));
    }
    let mut objects = Objects::default();
    objects.apply(changes.clone());
    let empty = Snapshot::default();
    let mut cache = CompileCache::new();
    cache.update(&empty, changes, &node);
    cache.take_delta();
    tables
        .realize(Desired::of(cache.state(), POLICY_ROWS))
        .unwrap();
    let (mut compile_time, mut realize_time, mut written) = (Duration::ZERO, Duration::ZERO, 0);
    for round in 0..rounds {
        let changes = change(round, count);
        let started = Instant::now();
        cache.update(&empty, changes.clone(), &node);
        let delta = cache.take_delta();
        compile_time += started.elapsed();
        let started = Instant::now();
        let plan = tables
            .plan_changes(&delta, Desired::of(cache.state(), POLICY_ROWS))
            .unwrap();
        let stats = tables.apply(&plan).unwrap();
        realize_time += started.elapsed();
        written += stats.upserted + stats.removed;
        assert!(stats.changed(), "round {round}: nothing written");
        if check {
            let left = tables
                .plan(Desired::of(cache.state(), POLICY_ROWS))
                .unwrap();
            assert!(left.is_empty(), "round {round}: {:?}", left.drift());
            objects.apply(changes);
            assert!(
                *cache.state() == compile(&objects.snapshot(), &node),
                "round {round}: the state differs from the full compile"
            );
        }
    }
    let rounds = rounds as u32;
    Times {
        compile: compile_time / rounds,
        realize: realize_time / rounds,
        written: written / rounds as usize,
    }
}

#[test]
fn change_sets_realized_by_their_delta_leave_the_maps_as_a_full_pass_would() {
    run(300, 40, true);
}

#[test]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
fn one_change_at_100k_services() {
    for count in [10_000, 100_000] {
        let t = run(count, 40, false);
        println!(
            "{count} Services: one Service or EndpointSlice change compiled in place in {:?}, \
             realized in {:?} ({} entries written), {:?} in all (mean of 40)",
            t.compile,
            t.realize,
            t.written,
            t.compile + t.realize
        );
    }
}
