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

/// Held by each test while it measures: malloc's figures are the whole process's.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

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

fn slice(i: usize) -> std::sync::Arc<EndpointSlice> {
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
    let _measuring = MEASURING.lock().unwrap();
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

/// A uid and resourceVersion, as the API server gives every object.
fn stamped<T: serde::de::DeserializeOwned>(mut value: serde_json::Value) -> T {
    let metadata = &mut value["metadata"];
    let uid = format!(
        "{}/{}",
        metadata["namespace"].as_str().unwrap_or_default(),
        metadata["name"].as_str().unwrap_or_default()
    );
    metadata["uid"] = serde_json::json!(uid);
    metadata["resourceVersion"] = serde_json::json!("1");
    serde_json::from_value(value).unwrap()
}

/// Builds one kind's objects and says what they hold.
fn kind<T>(what: &str, objects: impl Iterator<Item = T>, report: &mut Vec<String>) -> Vec<T> {
    let start = in_use();
    let objects: Vec<T> = objects.collect();
    let bytes = in_use() - start;
    report.push(format!(
        "  {what}: {} objects, {:.1} MiB ({} bytes each, {} of them inline)",
        objects.len(),
        mib(bytes),
        bytes / objects.len().max(1),
        std::mem::size_of::<T>(),
    ));
    objects
}

/// The simulated cluster of `sluice-bench --cluster` (the fake API server's generator,
/// realistic objects, each with a uid and resourceVersion) at GKE's limits times
/// `SLUICE_MEMORY_SCALE` (default 0.02; 1 is the limits), kept as the Kubernetes source
/// keeps it: every copy the agent makes of it, and the compile cache after the first
/// refresh. Figures are also projected to the full limits, linearly.
#[test]
fn where_the_memory_goes_at_gke_limits() {
    use sluice_fake_apiserver::cluster::{self, LOCAL_NODE, Shape};
    let scale: f64 = std::env::var("SLUICE_MEMORY_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.02);
    let shape = Shape::scaled(scale);
    let _measuring = MEASURING.lock().unwrap();
    let mut report = vec![format!("{shape:?} (scale {scale})")];
    let start = in_use();
    // What the source keeps of each object (`slimmed`), kind by kind.
    let slim = |s: Snapshot| sluice_agent::source::slimmed(s);
    let nodes = kind(
        "Nodes",
        (0..shape.nodes).map(|n| stamped(cluster::node(n))),
        &mut report,
    );
    let nodes = slim(Snapshot {
        nodes,
        ..Snapshot::default()
    })
    .nodes;
    let namespaces = (0..shape.namespaces)
        .map(|i| stamped(cluster::namespace(&shape, i)))
        .collect();
    let pods = kind(
        "Pods",
        (0..shape.pods).map(|p| stamped(cluster::pod(&shape, p, 0))),
        &mut report,
    );
    let pods = slim(Snapshot {
        pods,
        ..Snapshot::default()
    })
    .pods;
    let services = kind(
        "Services",
        (0..shape.services).map(|s| stamped(cluster::service(&shape, s))),
        &mut report,
    );
    let endpoint_slices = kind(
        "EndpointSlices",
        (0..shape.services)
            .flat_map(|s| cluster::endpoint_slices(&shape, s, false))
            .map(stamped),
        &mut report,
    );
    let network_policies = (0..shape.network_policies)
        .map(|i| stamped(cluster::network_policy(&shape, i)))
        .collect();
    let before_slim = in_use() - start;
    let snapshot = slim(Snapshot {
        cluster_cidr: cluster::CLUSTER_CIDR.parse().ok(),
        nodes,
        namespaces,
        pods,
        services,
        endpoint_slices,
        network_policies,
        ..Snapshot::default()
    });
    let stored = in_use() - start;
    report.push(format!(
        "the source's snapshot: {:.1} MiB (as parsed, before the slimming of Services and \
         slices: {:.1} MiB)",
        mib(stored),
        mib(before_slim)
    ));
    for (what, bytes) in [
        ("Pods", measure(|| snapshot.pods.clone())),
        ("Nodes", measure(|| snapshot.nodes.clone())),
        ("Services", measure(|| snapshot.services.clone())),
        (
            "EndpointSlices",
            measure(|| snapshot.endpoint_slices.clone()),
        ),
    ] {
        report.push(format!("  a copy of its {what}: {:.1} MiB", mib(bytes)));
    }

    // The copies: the spare snapshot the source keeps, and the change set of the initial
    // lists (every object named).
    let copy = measure(|| Snapshot::clone(&snapshot));
    let listed =
        measure(|| sluice_agent::source::changes::between(&Snapshot::default(), &snapshot));

    let mut node = NodeContext {
        node: LOCAL_NODE.into(),
        ..NodeContext::default()
    };
    let mut with_endpoints = snapshot;
    for p in 0..shape.local_pods {
        let key = shape.pod_key(p);
        let (namespace, pod) = key.split_once('/').unwrap();
        let interface = format!("lxc{p}");
        node.interfaces.insert(interface.clone(), 1000 + p as u32);
        with_endpoints.endpoints.push(sluice_store::LocalEndpoint {
            node: LOCAL_NODE.into(),
            namespace: namespace.into(),
            pod: pod.into(),
            interface,
            addresses: [shape.pod_address(p, 0).into()].into(),
        });
    }
    let before_cache = in_use();
    let mut cache = CompileCache::new();
    let entries = cache.refresh(&with_endpoints, &node).services.len();
    drop(cache.take_delta());
    let cache_bytes = in_use() - before_cache;
    let state = measure(|| cache.state().clone());

    report.push(format!(
        "one more copy of the snapshot: {:.1} MiB",
        mib(copy)
    ));
    report.push(format!(
        "the change set of the initial lists: {:.1} MiB",
        mib(listed)
    ));
    report.push(format!(
        "the compile cache after the first refresh: {:.1} MiB (its compiled state alone \
         {:.1} MiB, {entries} service entries)",
        mib(cache_bytes),
        mib(state)
    ));
    // Steady: the source's snapshot and its spare, the cache, and the two states the
    // agent publishes (`desired.rs`: the newest and the spare it catches up).
    let steady = stored + copy + cache_bytes + 2 * state;
    report.push(format!(
        "steady (snapshot, its spare, cache, two published states): {:.1} MiB; at the \
         limits about {:.0} MiB",
        mib(steady),
        mib(steady) / scale
    ));
    report.push(format!(
        "size_of: k8s Pod {}, Node {}, Service {}, EndpointSlice {}, Endpoint {}; \
         sluice_store::Pod {} (a pointer)",
        std::mem::size_of::<k8s_openapi::api::core::v1::Pod>(),
        std::mem::size_of::<k8s_openapi::api::core::v1::Node>(),
        std::mem::size_of::<Service>(),
        std::mem::size_of::<EndpointSlice>(),
        std::mem::size_of::<k8s_openapi::api::discovery::v1::Endpoint>(),
        std::mem::size_of::<sluice_store::Pod>(),
    ));
    eprintln!("{}", report.join("\n"));
    assert!(entries > 0);
}

/// Bytes `make`'s result holds.
fn measure<T>(make: impl FnOnce() -> T) -> usize {
    let start = in_use();
    let made = make();
    let bytes = in_use().saturating_sub(start);
    drop(made);
    bytes
}
