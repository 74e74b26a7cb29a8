//! The incremental compile against the full one: random clusters and random sequences of
//! changes (Services, EndpointSlices, Pods, NetworkPolicies, Nodes, local endpoints), and
//! after each change the cache's output (every map's content and the problems) must equal
//! a fresh `compile` of the same snapshot. The pools of addresses and ports are small, so
//! Services often claim one ClusterIP, node port, external address or health check port,
//! and names are often duplicated: the conflicts settled across Services are exercised.
//! `SLUICE_INCREMENTAL_SEED=<n>` replays one case.
//!
//! `one_service_change_at_10k_services` (and `_at_100k_`) prints the cost of one Service
//! change at 10,000 (100,000) Services, full against incremental (`--release -- --ignored
//! --nocapture`).

use std::time::Instant;

use serde_json::{Value, json};
use sluice_compiler::{CompileCache, NodeContext, compile};
use sluice_store::Snapshot;

mod generate;

use generate::*;

/// One random change to the snapshot (or the node context); returns what it was.
fn change(
    rng: &mut fastrand::Rng,
    snapshot: &mut Snapshot,
    node: &mut NodeContext,
) -> &'static str {
    let serial = rng.usize(..100);
    match rng.u8(..8) {
        0 | 1 => {
            churn(rng, &mut snapshot.services, |rng| from_json(service(rng)));
            "service"
        }
        2 | 3 => {
            churn(rng, &mut snapshot.endpoint_slices, |rng| {
                from_json(slice(rng, serial))
            });
            "endpoint slice"
        }
        4 => {
            churn(rng, &mut snapshot.pods, |rng| {
                from_json(pod(rng, serial % 4))
            });
            "pod"
        }
        5 => {
            churn(rng, &mut snapshot.network_policies, |rng| {
                from_json(policy(rng, serial % 3))
            });
            "network policy"
        }
        6 => {
            let at = rng.usize(..snapshot.nodes.len());
            let (name, address, cidr) = [
                (NODE, "172.16.0.1", "10.0.1.0/24"),
                ("node-b", "172.16.0.2", "10.0.2.0/24"),
            ][at];
            snapshot.nodes[at] = from_json(node_object(rng, name, address, cidr));
            "node"
        }
        _ => {
            if rng.bool() {
                churn(rng, &mut snapshot.endpoints, |_| endpoint(serial % 5));
                "local endpoint"
            } else {
                node.balancing.algorithm = *pick(rng, &sluice_compiler::LbAlgorithm::ALL);
                "node balancing"
            }
        }
    }
}

fn run_case(seed: u64) -> (usize, usize) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut snapshot, mut node) = cluster(&mut rng);
    let mut cache = CompileCache::new();
    let (mut reused, mut contested) = (0, 0);
    for step in 0..25 {
        let what = if step == 0 {
            "first compile"
        } else {
            change(&mut rng, &mut snapshot, &mut node)
        };
        let incremental = cache.compile(&snapshot, &node);
        let full = compile(&snapshot, &node);
        assert!(
            incremental == full,
            "seed {seed}, step {step} ({what}): incremental differs from full in {:?}\n\
             incremental problems: {:#?}\nfull problems: {:#?}",
            differing(&incremental, &full),
            incremental
                .problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            full.problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        );
        reused += cache.stats().services_reused;
        contested += cache.stats().services_contested;
    }
    (reused, contested)
}

#[test]
fn incremental_compile_equals_the_full_compile() {
    if let Some(seed) = std::env::var("SLUICE_INCREMENTAL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_case(seed);
        return;
    }
    let (mut reused, mut contested) = (0, 0);
    for seed in 0..300 {
        let (r, c) = run_case(seed);
        reused += r;
        contested += c;
    }
    println!("300 cases x 25 steps: {reused} Service fragments reused, {contested} contested");
    // The comparison would hold trivially if nothing were ever reused or settled.
    assert!(reused > 0 && contested > 0);
}

/// A snapshot of `count` ClusterIP Services with `backends` backends each, in one slice
/// each.
fn large(count: usize, backends: usize) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for i in 0..count {
        let vip = format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256);
        snapshot.services.push(from_json(json!({
            "metadata": {"name": format!("svc{i}"), "namespace": "default",
                         "uid": format!("svc{i}"), "resourceVersion": "1"},
            "spec": {"clusterIP": vip, "ports": [{"port": 80, "protocol": "TCP"}]},
        })));
        snapshot.endpoint_slices.push(service_slice(i, backends));
    }
    snapshot
}

/// Service `i`'s slice with `backends` endpoints, at resourceVersion `backends`.
fn service_slice(
    i: usize,
    backends: usize,
) -> std::sync::Arc<k8s_openapi::api::discovery::v1::EndpointSlice> {
    let endpoints: Vec<Value> = (0..backends)
        .map(|b| {
            json!({
                "addresses": [format!("10.{}.{}.{}", 1 + b, (i / 256) % 256, i % 256)],
                "conditions": {"ready": true},
            })
        })
        .collect();
    from_json(json!({
        "metadata": {
            "name": format!("svc{i}-x"),
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": format!("svc{i}")},
            "uid": format!("svc{i}-x"),
            "resourceVersion": backends.to_string(),
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }))
}

#[test]
fn one_service_change_recompiles_one_service() {
    let mut snapshot = large(50, 2);
    let node = NodeContext {
        node: NODE.into(),
        ..NodeContext::default()
    };
    let mut cache = CompileCache::new();
    cache.compile(&snapshot, &node);
    assert_eq!(cache.stats().services_compiled, 50);
    snapshot.endpoint_slices[7] = service_slice(7, 3);
    let state = cache.compile(&snapshot, &node);
    let stats = cache.stats();
    assert_eq!(
        (
            stats.services_compiled,
            stats.services_reused,
            stats.workloads_compiled
        ),
        (1, 49, false)
    );
    assert!(state == compile(&snapshot, &node));
}

/// Prints, never asserts on, the time of one Service change at 10,000 Services, with 2
/// backends each and with 26 (260,000 backends, GKE's published limit).
#[test]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
fn one_service_change_at_10k_services() {
    for backends in [2, 26] {
        measure(10_000, backends);
    }
}

/// The same at 100,000 Services with 2 backends each (issue 19's one-change target).
#[test]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
fn one_service_change_at_100k_services() {
    measure(100_000, 2);
}

fn measure(count: usize, backends: usize) {
    const ROUNDS: usize = 10;
    let mut snapshot = large(count, backends);
    let node = NodeContext {
        node: NODE.into(),
        ..NodeContext::default()
    };
    let mut cache = CompileCache::new();
    let started = Instant::now();
    cache.compile(&snapshot, &node);
    let first = started.elapsed();
    let mut full_total = std::time::Duration::ZERO;
    let mut incremental_total = std::time::Duration::ZERO;
    let mut clone_total = std::time::Duration::ZERO;
    for round in 0..ROUNDS {
        snapshot.endpoint_slices[round * 97] = service_slice(round * 97, backends + 1);
        let started = Instant::now();
        let full = compile(&snapshot, &node);
        full_total += started.elapsed();
        let started = Instant::now();
        cache.refresh(&snapshot, &node);
        incremental_total += started.elapsed();
        let started = Instant::now();
        let incremental = cache.state().clone();
        clone_total += started.elapsed();
        assert!(incremental == full);
    }
    println!(
        "{count} Services with {backends} backends each: first incremental compile {first:?}; \
         one Service change: full compile {:?}, incremental from the whole snapshot {:?}, \
         a copy of the state {:?} (mean of {ROUNDS})",
        full_total / ROUNDS as u32,
        incremental_total / ROUNDS as u32,
        clone_total / ROUNDS as u32,
    );
}
