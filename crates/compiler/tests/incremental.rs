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

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use serde_json::{Value, json};
use sluice_compiler::{
    Changes, CompileCache, Delta, DesiredState, NodeContext, ObjectKey, compile,
};
use sluice_store::{LocalEndpoint, Snapshot};

const NODE: &str = "node-a";
const NAMESPACES: [&str; 2] = ["a", "b"];
const SERVICE_NAMES: [&str; 6] = ["s0", "s1", "s2", "s3", "s4", "s5"];
const CLUSTER_IPS: [&str; 6] = [
    "10.96.0.1",
    "10.96.0.2",
    "10.96.0.3",
    "10.96.0.4",
    "None",
    "bogus",
];
/// The third is node-a's own address: an external IP there meets its node ports.
const EXTERNAL_IPS: [&str; 3] = ["192.0.2.1", "192.0.2.2", "172.16.0.1"];
const NODE_PORTS: [i32; 3] = [30000, 30001, 70000];
const HEALTH_PORTS: [i32; 2] = [31000, 31001];
const BACKENDS: [&str; 5] = ["10.0.1.10", "10.0.1.11", "10.0.2.10", "10.0.2.11", "bad"];

/// A uid and a resourceVersion as the API server gives them (a new version on every
/// write), on half the objects (Services, EndpointSlices, Pods, NetworkPolicies); the
/// others, like the lab's, have neither.
fn versioned(rng: &mut fastrand::Rng, metadata: &mut Value, uid: String) {
    static VERSION: AtomicU64 = AtomicU64::new(1);
    if rng.bool() {
        metadata["uid"] = json!(uid);
        metadata["resourceVersion"] = json!(VERSION.fetch_add(1, Ordering::Relaxed).to_string());
    }
}

fn pick<'a, T>(rng: &mut fastrand::Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"))
}

fn service(rng: &mut fastrand::Rng) -> Value {
    let kind = pick(
        rng,
        &[
            "ClusterIP",
            "ClusterIP",
            "NodePort",
            "LoadBalancer",
            "ExternalName",
        ],
    );
    let mut ports = Vec::new();
    for _ in 0..rng.usize(0..3) {
        let mut port = json!({
            "port": pick(rng, &[80, 443, 0]),
            "protocol": pick(rng, &["TCP", "UDP", "TCP"]),
        });
        if rng.bool() {
            port["name"] = json!(pick(rng, &["http", "dns"]));
        }
        if rng.u8(..4) != 0 {
            port["nodePort"] = json!(pick(rng, &NODE_PORTS));
        }
        ports.push(port);
    }
    let mut spec = json!({
        "type": kind,
        "clusterIP": pick(rng, &CLUSTER_IPS),
        "ports": ports,
    });
    if rng.u8(..3) == 0 {
        spec["externalIPs"] = json!([pick(rng, &EXTERNAL_IPS)]);
    }
    if rng.bool() {
        spec["externalTrafficPolicy"] = json!(pick(rng, &["Local", "Cluster"]));
        spec["healthCheckNodePort"] = json!(pick(rng, &HEALTH_PORTS));
    }
    if rng.u8(..4) == 0 {
        spec["internalTrafficPolicy"] = json!("Local");
    }
    if rng.u8(..4) == 0 {
        spec["sessionAffinity"] = json!("ClientIP");
    }
    if rng.u8(..4) == 0 {
        spec["trafficDistribution"] = json!("PreferClose");
    }
    if rng.u8(..4) == 0 {
        spec["loadBalancerSourceRanges"] = json!(["198.51.100.0/24", "nope"]);
    }
    let mut annotations = serde_json::Map::new();
    if rng.u8(..3) == 0 {
        annotations.insert(
            "service.sluice.dev/lb-algorithm".into(),
            json!(pick(rng, &["maglev", "random", "fastest"])),
        );
    }
    let (namespace, name) = (pick(rng, &NAMESPACES), pick(rng, &SERVICE_NAMES));
    let mut metadata = json!({"name": name, "namespace": namespace, "annotations": annotations});
    versioned(rng, &mut metadata, format!("svc-{namespace}-{name}"));
    json!({
        "metadata": metadata,
        "spec": spec,
        "status": {"loadBalancer": {"ingress": [{"ip": pick(rng, &["203.0.113.1", "192.0.2.1"])}]}},
    })
}

fn slice(rng: &mut fastrand::Rng, name: usize) -> Value {
    let mut endpoints = Vec::new();
    for _ in 0..rng.usize(0..4) {
        endpoints.push(json!({
            "addresses": [pick(rng, &BACKENDS)],
            "conditions": {"ready": rng.u8(..4) != 0, "serving": rng.bool(), "terminating": rng.bool()},
            "nodeName": pick(rng, &[NODE, "node-b"]),
            "zone": pick(rng, &["z1", "z2"]),
        }));
    }
    let mut metadata = json!({
        "name": format!("slice{name}"),
        "namespace": pick(rng, &NAMESPACES),
        "labels": {"kubernetes.io/service-name": pick(rng, &SERVICE_NAMES)},
    });
    versioned(rng, &mut metadata, format!("slice-{name}"));
    json!({
        "metadata": metadata,
        "addressType": pick(rng, &["IPv4", "IPv4", "IPv6"]),
        "endpoints": endpoints,
        "ports": [
            {"name": "http", "port": pick(rng, &[8080, 8081]), "protocol": "TCP"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"port": 9000, "protocol": "TCP"},
        ],
    })
}

fn pod(rng: &mut fastrand::Rng, i: usize) -> Value {
    let mut metadata = json!({
        "name": format!("p{i}"),
        "namespace": pick(rng, &NAMESPACES),
        "labels": {"app": pick(rng, &["web", "db"])},
    });
    versioned(rng, &mut metadata, format!("pod-{i}"));
    json!({
        "metadata": metadata,
        "spec": {"nodeName": pick(rng, &[NODE, "node-b"]), "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "podIP": format!("10.0.1.{}", 10 + i)},
    })
}

fn policy(rng: &mut fastrand::Rng, i: usize) -> Value {
    let mut metadata = json!({"name": format!("np{i}"), "namespace": pick(rng, &NAMESPACES)});
    versioned(rng, &mut metadata, format!("np-{i}"));
    json!({
        "metadata": metadata,
        "spec": {
            "podSelector": {"matchLabels": {"app": pick(rng, &["web", "db"])}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": pick(rng, &["web", "db"])}}}],
                         "ports": [{"port": pick(rng, &[80, 8080])}]}],
        },
    })
}

fn node_object(rng: &mut fastrand::Rng, name: &str, address: &str, cidr: &str) -> Value {
    let mut addresses = vec![json!({"type": "InternalIP", "address": address})];
    if rng.bool() {
        addresses.push(json!({"type": "ExternalIP", "address": "192.0.2.2"}));
    }
    json!({
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": pick(rng, &["z1", "z2"])}},
        "spec": {"podCIDR": cidr},
        "status": {"addresses": addresses},
    })
}

fn endpoint(i: usize) -> LocalEndpoint {
    LocalEndpoint {
        node: NODE.into(),
        namespace: NAMESPACES[i % 2].into(),
        pod: format!("p{i}"),
        interface: format!("lxc{i}"),
        addresses: [std::net::Ipv4Addr::new(10, 0, 1, 10 + i as u8).into()].into(),
    }
}

/// Replaces the item at a random index of `items`, adds one, or removes one.
fn churn<T>(
    rng: &mut fastrand::Rng,
    items: &mut Vec<T>,
    make: impl FnOnce(&mut fastrand::Rng) -> T,
) {
    match rng.u8(..3) {
        0 if !items.is_empty() => {
            items.remove(rng.usize(..items.len()));
        }
        1 if !items.is_empty() => {
            let at = rng.usize(..items.len());
            items[at] = make(rng);
        }
        _ => items.push(make(rng)),
    }
}

fn cluster(rng: &mut fastrand::Rng) -> (Snapshot, NodeContext) {
    let mut snapshot = Snapshot::default();
    for ns in NAMESPACES {
        snapshot
            .namespaces
            .push(from_json(json!({"metadata": {"name": ns}})));
    }
    let mut node_context = NodeContext {
        node: NODE.into(),
        ..NodeContext::default()
    };
    for i in 0..4 {
        node_context
            .interfaces
            .insert(format!("lxc{i}"), 100 + i as u32);
    }
    snapshot.nodes = vec![
        from_json(node_object(rng, NODE, "172.16.0.1", "10.0.1.0/24")),
        from_json(node_object(rng, "node-b", "172.16.0.2", "10.0.2.0/24")),
    ];
    for _ in 0..rng.usize(0..8) {
        snapshot.services.push(from_json(service(rng)));
    }
    for i in 0..rng.usize(0..8) {
        snapshot.endpoint_slices.push(from_json(slice(rng, i)));
    }
    for i in 0..rng.usize(0..4) {
        snapshot.pods.push(from_json(pod(rng, i)));
        snapshot.endpoints.push(endpoint(i));
    }
    for i in 0..rng.usize(0..3) {
        snapshot.network_policies.push(from_json(policy(rng, i)));
    }
    (snapshot, node_context)
}

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

/// The fields in which two states differ, for the failure message.
fn differing(a: &DesiredState, b: &DesiredState) -> Vec<&'static str> {
    let mut out = Vec::new();
    macro_rules! field {
        ($($f:ident),*) => {$(if a.$f != b.$f { out.push(stringify!($f)); })*};
    }
    field!(
        services,
        backends,
        maglev,
        endpoints,
        interfaces,
        frontends,
        ipcache,
        source_ranges,
        health_checks,
        node_addresses,
        nodes,
        policies,
        identities,
        endpoint_details,
        problems
    );
    out
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
fn service_slice(i: usize, backends: usize) -> k8s_openapi::api::discovery::v1::EndpointSlice {
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

/// The objects of a cluster as an API server holds them: one per kind, namespace and name.
#[derive(Default)]
struct Objects {
    services: std::collections::BTreeMap<ObjectKey, Value>,
    slices: std::collections::BTreeMap<ObjectKey, Value>,
}

fn key_of(object: &Value) -> ObjectKey {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or("default").to_string(),
        meta["name"].as_str().unwrap_or_default().to_string(),
    )
}

/// One random change as a source reports it: the snapshot's workload part changes in
/// place, Services and slices are written to `objects` and listed in the change set.
fn change_set(
    rng: &mut fastrand::Rng,
    objects: &mut Objects,
    snapshot: &mut Snapshot,
    node: &mut NodeContext,
) -> (&'static str, Changes) {
    let mut changes = Changes::default();
    let what = match rng.u8(..10) {
        0..=2 => {
            let (key, object) = if rng.u8(..4) == 0 && !objects.services.is_empty() {
                let at = rng.usize(..objects.services.len());
                let key = objects.services.keys().nth(at).cloned().unwrap_or_default();
                objects.services.remove(&key);
                (key, None)
            } else {
                let object = service(rng);
                let key = key_of(&object);
                objects.services.insert(key.clone(), object.clone());
                (key, Some(from_json(object)))
            };
            changes.services.insert(key, object);
            "service"
        }
        3..=5 => {
            let (key, object) = if rng.u8(..4) == 0 && !objects.slices.is_empty() {
                let at = rng.usize(..objects.slices.len());
                let key = objects.slices.keys().nth(at).cloned().unwrap_or_default();
                objects.slices.remove(&key);
                (key, None)
            } else {
                let serial = rng.usize(..8);
                let object = slice(rng, serial);
                let key = key_of(&object);
                objects.slices.insert(key.clone(), object.clone());
                (key, Some(from_json(object)))
            };
            changes.endpoint_slices.insert(key, object);
            "endpoint slice"
        }
        6 => {
            // Pods keyed by name: p0..p3, each label change may move it to another identity.
            let i = rng.usize(..4);
            let name = format!("p{i}");
            snapshot
                .pods
                .retain(|p| p.metadata.name.as_deref() != Some(name.as_str()));
            if rng.u8(..4) != 0 {
                snapshot.pods.push(from_json(pod(rng, i)));
            }
            changes.workloads = true;
            "pod"
        }
        7 => {
            let i = rng.usize(..3);
            let name = format!("np{i}");
            snapshot
                .network_policies
                .retain(|p| p.metadata.name.as_deref() != Some(name.as_str()));
            if rng.bool() {
                snapshot.network_policies.push(from_json(policy(rng, i)));
            }
            changes.workloads = true;
            "network policy"
        }
        8 => {
            let at = rng.usize(..snapshot.nodes.len());
            let (name, address, cidr) = [
                (NODE, "172.16.0.1", "10.0.1.0/24"),
                ("node-b", "172.16.0.2", "10.0.2.0/24"),
            ][at];
            snapshot.nodes[at] = from_json(node_object(rng, name, address, cidr));
            changes.workloads = true;
            "node"
        }
        _ => match rng.u8(..3) {
            0 => {
                let at = rng.usize(..NAMESPACES.len());
                snapshot.namespaces[at] = from_json(json!({"metadata": {
                    "name": NAMESPACES[at],
                    "labels": {"team": pick(rng, &["x", "y"])},
                }}));
                changes.workloads = true;
                "namespace"
            }
            1 => {
                churn(rng, &mut snapshot.endpoints, |rng| endpoint(rng.usize(..5)));
                changes.workloads = true;
                "local endpoint"
            }
            _ => {
                node.balancing.algorithm = *pick(rng, &sluice_compiler::LbAlgorithm::ALL);
                "node balancing"
            }
        },
    };
    (what, changes)
}

/// Checks that `delta` lists every entry that differs between `before` and `after`, each
/// with its value in `before`.
fn assert_delta(delta: &Delta, before: &DesiredState, after: &DesiredState, what: &str) {
    fn check<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
        map: &str,
        delta: &std::collections::BTreeMap<K, Option<V>>,
        before: &std::collections::BTreeMap<K, V>,
        after: &std::collections::BTreeMap<K, V>,
        what: &str,
    ) {
        for (k, was) in delta {
            assert_eq!(
                was.as_ref(),
                before.get(k),
                "{what}: {map} {k:?}: value before"
            );
        }
        for k in before.keys().chain(after.keys()) {
            if before.get(k) != after.get(k) {
                assert!(
                    delta.contains_key(k),
                    "{what}: {map} {k:?} changed, not in the delta"
                );
            }
        }
    }
    check(
        "services",
        &delta.services,
        &before.services,
        &after.services,
        what,
    );
    check(
        "backends",
        &delta.backends,
        &before.backends,
        &after.backends,
        what,
    );
    check("maglev", &delta.maglev, &before.maglev, &after.maglev, what);
    check(
        "source ranges",
        &delta.source_ranges,
        &before.source_ranges,
        &after.source_ranges,
        what,
    );
    check(
        "endpoints",
        &delta.endpoints,
        &before.endpoints,
        &after.endpoints,
        what,
    );
    check(
        "ipcache",
        &delta.ipcache,
        &before.ipcache,
        &after.ipcache,
        what,
    );
    check(
        "policies",
        &delta.policies,
        &before.policies,
        &after.policies,
        what,
    );
}

/// Any sequence of change sets over every kind (Services and slices added, changed and
/// deleted; Pods whose labels move them between identities; NetworkPolicies added and
/// removed; Nodes, Namespaces, local endpoints, the node's balancing) gives, after every
/// step, exactly the full compile's output, and a delta that names every entry changed.
#[test]
fn any_sequence_of_change_sets_equals_the_full_compile() {
    let (mut contested, mut touched) = (0, 0);
    for seed in 0..300 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (mut snapshot, mut node) = cluster(&mut rng);
        let mut objects = Objects::default();
        // The first change set holds every Service and slice.
        let mut changes = Changes::default();
        for service in std::mem::take(&mut snapshot.services) {
            let value = serde_json::to_value(&service).unwrap_or_default();
            objects.services.insert(key_of(&value), value);
        }
        for slice in std::mem::take(&mut snapshot.endpoint_slices) {
            let value = serde_json::to_value(&slice).unwrap_or_default();
            objects.slices.insert(key_of(&value), value);
        }
        for (key, value) in &objects.services {
            changes
                .services
                .insert(key.clone(), Some(from_json(value.clone())));
        }
        for (key, value) in &objects.slices {
            changes
                .endpoint_slices
                .insert(key.clone(), Some(from_json(value.clone())));
        }
        let mut cache = CompileCache::new();
        let mut before = DesiredState::default();
        for step in 0..30 {
            let what = if step == 0 {
                "first compile"
            } else {
                let (what, next) = change_set(&mut rng, &mut objects, &mut snapshot, &mut node);
                changes = next;
                what
            };
            let what = format!("seed {seed}, step {step} ({what})");
            let mut whole = Snapshot {
                services: objects.services.values().cloned().map(from_json).collect(),
                endpoint_slices: objects.slices.values().cloned().map(from_json).collect(),
                ..snapshot.clone()
            };
            let incremental = cache
                .update(&whole, std::mem::take(&mut changes), &node)
                .clone();
            whole.revision += 1;
            let full = compile(&whole, &node);
            assert!(
                incremental == full,
                "{what}: incremental differs from full in {:?}",
                differing(&incremental, &full)
            );
            let delta = cache.take_delta();
            assert_delta(&delta, &before, &full, &what);
            touched += delta.len();
            contested += cache.stats().services_contested;
            before = full;
        }
    }
    println!("300 cases x 30 steps: {touched} entries touched, {contested} Services contested");
    assert!(contested > 0 && touched > 0);
}
