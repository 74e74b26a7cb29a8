//! Where the agent's memory goes at N ClusterIP Services (2 backends each, as in the growth
//! curve): the snapshot the source hands over, the compile cache (its index of every
//! Service and slice, and the compiled state in it) and one more copy of the compiled
//! state (what publishing it would copy). Measured as the bytes malloc holds (glibc's
//! `mallinfo2`) before and after each is built; printed, never asserted.
//! `SLUICE_MEMORY_SERVICES` sets N (default 10,000; the report quotes 100,000 too).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test: a failed step must fail the test loudly"
)]

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use sluice_compiler::{CompileCache, NodeContext};
use sluice_store::Snapshot;

/// Bytes malloc has handed out and not had back.
fn in_use() -> usize {
    // SAFETY: mallinfo2 reads glibc's allocator statistics; it takes no pointers.
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}

fn service(i: usize) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
        "spec": {"type": "ClusterIP",
                 "clusterIP": format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256),
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }))
    .unwrap()
}

fn slice(i: usize) -> EndpointSlice {
    let endpoints: Vec<_> = (0..2)
        .map(|b| {
            serde_json::json!({
                "addresses": [format!("10.{}.{}.{}", 200 + b, (i / 256) % 256, i % 256)],
                "conditions": {"ready": true},
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("svc-{i}-abc"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }))
    .unwrap()
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[test]
fn where_the_memory_goes() {
    let n: usize = std::env::var("SLUICE_MEMORY_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let start = in_use();
    let snapshot = Snapshot {
        services: (0..n).map(service).collect(),
        endpoint_slices: (0..n).map(slice).collect(),
        ..Snapshot::default()
    };
    let after_snapshot = in_use();
    let node = NodeContext {
        node: "node-1".into(),
        ..NodeContext::default()
    };
    let mut cache = CompileCache::new();
    let entries = cache.refresh(&snapshot, &node).services.len();
    let after_cache = in_use();
    drop(cache.take_delta());
    let after_delta = in_use();
    let copy = cache.state().clone();
    let after_copy = in_use();
    let frontends = copy.frontends.clone();
    let after_frontends = in_use();
    eprintln!(
        "{n} Services ({entries} service entries): snapshot {:.1} MiB, compile cache (index and \
         state) {:.1} MiB, one copy of the compiled state {:.1} MiB (its frontends {:.1} MiB), \
         the first compile's delta {:.1} MiB (freed)",
        mib(after_snapshot - start),
        mib(after_delta - after_snapshot),
        mib(after_copy - after_delta),
        mib(after_frontends - after_copy),
        mib(after_cache.saturating_sub(after_delta)),
    );
    assert_eq!(copy.frontends.len(), frontends.len());
    assert!(entries >= 2 * n, "a frontend and a slot per Service");
}
