//! The compile at cluster scale: the simulated cluster of `sluice-bench --cluster` (the
//! fake API server's generator, GKE's limits times a factor) compiled whole, then one
//! change of each kind compiled incrementally. A measurement: it prints, never asserts on
//! times; it does check that each incremental result equals the full compile.
//!
//! `cargo test --release -p sluice-compiler --test cluster_scale -- --ignored --nocapture`
//! with `SLUICE_CLUSTER_SCALE` (default 0.1) for the size.

use std::time::{Duration, Instant};

use k8s_openapi::api::{
    core::v1::{Namespace, Node},
    networking::v1::NetworkPolicy,
};
use serde_json::{Value, json};
use sluice_compiler::{
    Changes, CompileCache, DesiredState, NodeContext, ObjectKey, compile, pod_key,
};
use sluice_fake_apiserver::cluster::{self, LOCAL_NODE, Shape};
use sluice_store::{LocalEndpoint, Pod, Snapshot};

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"))
}

/// A uid and resourceVersion, as the API server gives every object.
fn stamped<T: serde::de::DeserializeOwned>(mut value: Value, version: u64) -> T {
    let metadata = &mut value["metadata"];
    let uid = format!(
        "{}/{}",
        metadata["namespace"].as_str().unwrap_or_default(),
        metadata["name"].as_str().unwrap_or_default()
    );
    metadata["uid"] = json!(uid);
    metadata["resourceVersion"] = json!(version.to_string());
    from_json(value)
}

/// The generated cluster as the agent's snapshot, with the local pods as endpoints, and
/// the node context naming their interfaces.
fn snapshot(shape: &Shape) -> (Snapshot, NodeContext) {
    let mut s = Snapshot {
        cluster_cidr: cluster::CLUSTER_CIDR.parse().ok(),
        ..Snapshot::default()
    };
    s.nodes = (0..shape.nodes)
        .map(|n| stamped(cluster::node(n), 1))
        .collect();
    s.namespaces = (0..shape.namespaces)
        .map(|i| stamped(cluster::namespace(shape, i), 1))
        .collect();
    s.pods = (0..shape.pods)
        .map(|p| stamped(cluster::pod(shape, p, 0), 1))
        .collect();
    for i in 0..shape.services {
        s.services.push(stamped(cluster::service(shape, i), 1));
        for slice in cluster::endpoint_slices(shape, i, false) {
            s.endpoint_slices.push(stamped(slice, 1));
        }
    }
    s.network_policies = (0..shape.network_policies)
        .map(|i| stamped(cluster::network_policy(shape, i), 1))
        .collect();
    let mut node = NodeContext {
        node: LOCAL_NODE.into(),
        ..NodeContext::default()
    };
    for p in 0..shape.local_pods {
        let (namespace, pod) = shape.pod_key(p).split_once('/').map_or_else(
            || panic!("pod key {}", shape.pod_key(p)),
            |(n, p)| (n.to_owned(), p.to_owned()),
        );
        let interface = format!("lxcb{p}");
        node.interfaces.insert(interface.clone(), 1000 + p as u32);
        s.endpoints.push(LocalEndpoint {
            node: LOCAL_NODE.into(),
            namespace,
            pod,
            interface,
            addresses: [shape.pod_address(p, 0).into()].into(),
        });
    }
    (s, node)
}

/// CPU time this thread has run, from /proc/thread-self/schedstat: on a machine shared with
/// other builds, wall time says more about them than about the compile.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns = stat.split_whitespace().next().and_then(|n| n.parse().ok());
    Duration::from_nanos(ns.unwrap_or(0))
}

/// Wall and CPU time of `f`.
#[derive(Clone, Copy)]
struct Took {
    wall: Duration,
    cpu: Duration,
}

impl std::fmt::Display for Took {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} ms CPU ({:.1} ms wall)",
            ms(self.cpu),
            ms(self.wall)
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Took) {
    let (started, cpu_before) = (Instant::now(), cpu());
    let out = f();
    let took = Took {
        wall: started.elapsed(),
        cpu: cpu() - cpu_before,
    };
    (out, took)
}

fn check(what: &str, incremental: &DesiredState, snapshot: &Snapshot, node: &NodeContext) {
    let (full, took) = timed(|| compile(snapshot, node));
    println!("  {what}: full compile for comparison {took}");
    assert!(
        *incremental == full,
        "{what}: incremental differs from full"
    );
}

#[test]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
fn compile_cost_of_the_simulated_cluster() {
    let factor = std::env::var("SLUICE_CLUSTER_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.1);
    let shape = Shape::scaled(factor);
    let (mut snapshot, node) = snapshot(&shape);
    println!(
        "scale {factor}: {} nodes, {} pods, {} Services, {} endpoints, {} NetworkPolicies",
        shape.nodes, shape.pods, shape.services, shape.endpoints, shape.network_policies
    );
    let (state, took) = timed(|| compile(&snapshot, &node));
    println!(
        "full compile: {took} ({} identities, {} ipcache entries, {} policy maps, {} service entries)",
        state.identities.len(),
        state.ipcache.len(),
        state.policies.len(),
        state.services.len()
    );
    let mut cache = CompileCache::new();
    let (_, took) = timed(|| cache.compile(&snapshot, &node));
    println!("first incremental compile: {took}");
    let (_, took) = timed(|| cache.compile(&snapshot, &node));
    println!("no change: {took} ({:?})", cache.stats());

    let mut version = 2;
    // A remote pod replaced: new address.
    let p = shape.pods - 1;
    snapshot.pods[p] = stamped(cluster::pod(&shape, p, 1), version);
    version += 1;
    let (state, took) = timed(|| cache.compile(&snapshot, &node));
    println!("one pod replaced: {took} ({:?})", cache.stats());
    check("pod", &state, &snapshot, &node);

    // A Service's endpoints rolled.
    let s = shape.services / 2;
    let slices = cluster::endpoint_slices(&shape, s, true);
    let at = snapshot
        .endpoint_slices
        .iter()
        .position(|e| e.metadata.name.as_deref() == Some(&format!("svc-{s}-0")))
        .unwrap_or_else(|| panic!("no slice of svc-{s}"));
    snapshot.endpoint_slices[at] = stamped(slices[0].clone(), version);
    version += 1;
    let (state, took) = timed(|| cache.compile(&snapshot, &node));
    println!("one EndpointSlice changed: {took} ({:?})", cache.stats());
    check("endpoint slice", &state, &snapshot, &node);

    // A NetworkPolicy changed: its peer app moves on.
    let mut policy = cluster::network_policy(&shape, 0);
    policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app"] = json!("app-3");
    snapshot.network_policies[0] = stamped(policy, version);
    let (state, took) = timed(|| cache.compile(&snapshot, &node));
    println!("one NetworkPolicy changed: {took} ({:?})", cache.stats());
    check("network policy", &state, &snapshot, &node);
}

/// A ClusterIP Service beyond the generated ones, `bulk/bulk-{i}`, with `ports` ports
/// and its slice of `backends` ready endpoints.
fn bulk_service(i: usize, ports: usize, version: u64) -> k8s_openapi::api::core::v1::Service {
    let vip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 97, 0, 0)) + i as u32);
    let ports: Vec<Value> = (0..ports)
        .map(|p| json!({"name": format!("p{p}"), "port": 80 + p, "protocol": "TCP"}))
        .collect();
    stamped(
        json!({
            "metadata": {"name": format!("bulk-{i}"), "namespace": "bulk"},
            "spec": {"clusterIP": vip.to_string(), "ports": ports},
        }),
        version,
    )
}

fn bulk_slice(
    i: usize,
    backends: usize,
    version: u64,
) -> std::sync::Arc<k8s_openapi::api::discovery::v1::EndpointSlice> {
    let endpoints: Vec<Value> = (0..backends)
        .map(|b| {
            let address = std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::new(10, 200, 0, 0)) + (i * 4 + b) as u32,
            );
            json!({"addresses": [address.to_string()], "conditions": {"ready": true}})
        })
        .collect();
    stamped(
        json!({
            "metadata": {"name": format!("bulk-{i}-x"), "namespace": "bulk",
                         "labels": {"kubernetes.io/service-name": format!("bulk-{i}")}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "p0", "port": 8080, "protocol": "TCP"},
                      {"name": "p1", "port": 8081, "protocol": "TCP"}],
        }),
        version,
    )
}

fn key(
    object: &impl k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
) -> ObjectKey {
    let meta = object.metadata();
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// One change of each kind at 100,000 Services (GKE's limits for the rest: 7,500 Nodes,
/// 200,000 Pods, 1,000 NetworkPolicies), compiled in place from a change set
/// (`CompileCache::update`), with the entries each changes; each result is checked
/// against a full compile. `SLUICE_CLUSTER_SCALE` scales the rest (default 1).
#[test]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
fn one_change_of_each_kind_at_100k_services() {
    const SERVICES: usize = 100_000;
    let factor = std::env::var("SLUICE_CLUSTER_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let shape = Shape::scaled(factor);
    let (mut snapshot, node) = snapshot(&shape);
    for i in 0..SERVICES - shape.services {
        snapshot.services.push(bulk_service(i, 1, 1));
        snapshot.endpoint_slices.push(bulk_slice(i, 2, 1));
    }
    println!(
        "{} Services, {} EndpointSlices, {} Pods, {} Nodes, {} NetworkPolicies",
        snapshot.services.len(),
        snapshot.endpoint_slices.len(),
        snapshot.pods.len(),
        snapshot.nodes.len(),
        snapshot.network_policies.len()
    );
    let mut cache = CompileCache::new();
    let (_, took) = timed(|| cache.refresh(&snapshot, &node).services.len());
    println!("first compile: {took}");
    cache.take_delta();
    let mut version = 2;
    let step = |what: &str, snapshot: &Snapshot, changes: Changes, cache: &mut CompileCache| {
        let (_, took) = timed(|| cache.update(snapshot, changes, &node).services.len());
        let delta = cache.take_delta();
        println!(
            "one {what} change: {took}, {} entries touched ({:?})",
            delta.len(),
            cache.stats()
        );
        check(what, cache.state(), snapshot, &node);
    };

    let service = bulk_service(500, 2, version);
    version += 1;
    let at = shape.services + 500;
    snapshot.services[at] = service.clone();
    let mut changes = Changes::default();
    changes.services.insert(key(&service), Some(service));
    step("Service", &snapshot, changes, &mut cache);

    let slice = bulk_slice(700, 3, version);
    version += 1;
    let at = snapshot
        .endpoint_slices
        .iter()
        .position(|s| s.metadata.name.as_deref() == Some("bulk-700-x"))
        .unwrap_or_else(|| panic!("no slice bulk-700-x"));
    snapshot.endpoint_slices[at] = slice.clone();
    let mut changes = Changes::default();
    changes.endpoint_slices.insert(key(&*slice), Some(slice));
    step("EndpointSlice", &snapshot, changes, &mut cache);

    // A remote pod replaced by one with the same labels and a new address: the churn of
    // a rolling update.
    let p = shape.pods - 1;
    let pod: Pod = stamped(cluster::pod(&shape, p, 1), version);
    version += 1;
    snapshot.pods[p] = pod.clone();
    let mut changes = Changes::default();
    changes.pods.insert(pod_key(&pod).unwrap(), Some(pod));
    step("Pod", &snapshot, changes, &mut cache);

    // A pod with a label set no other pod has: a new identity.
    let p = shape.pods - 2;
    let mut object = cluster::pod(&shape, p, 1);
    object["metadata"]["labels"]["app"] = json!("app-new");
    let pod: Pod = stamped(object, version);
    version += 1;
    snapshot.pods[p] = pod.clone();
    let mut changes = Changes::default();
    changes.pods.insert(pod_key(&pod).unwrap(), Some(pod));
    step("Pod (new identity)", &snapshot, changes, &mut cache);

    let n = shape.nodes - 1;
    let mut object = cluster::node(n);
    object["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("europe-west1-x");
    let node_object: Node = stamped(object, version);
    version += 1;
    snapshot.nodes[n] = node_object.clone();
    let mut changes = Changes::default();
    changes.nodes.insert(key(&node_object).1, Some(node_object));
    step("Node", &snapshot, changes, &mut cache);

    let mut object = cluster::namespace(&shape, 1);
    object["metadata"]["labels"]["team"] = json!("team-x");
    let namespace: Namespace = stamped(object, version);
    version += 1;
    snapshot.namespaces[1] = namespace.clone();
    let mut changes = Changes::default();
    changes
        .namespaces
        .insert(key(&namespace).1, Some(namespace));
    step("Namespace", &snapshot, changes, &mut cache);

    let mut object = cluster::network_policy(&shape, 0);
    object["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app"] = json!("app-3");
    let policy: NetworkPolicy = stamped(object, version);
    version += 1;
    snapshot.network_policies[0] = policy.clone();
    let mut changes = Changes::default();
    changes.network_policies.insert(key(&policy), Some(policy));
    step("NetworkPolicy", &snapshot, changes, &mut cache);

    // Many changes of one kind in a row, for a mean: one change takes less than the
    // scheduler's tick, by which the CPU time is counted.
    let mut changes_of =
        |what: &str,
         snapshot: &mut Snapshot,
         cache: &mut CompileCache,
         n: usize,
         make: &mut dyn FnMut(usize, u64, &mut Snapshot) -> Changes| {
            let (mut took, mut touched, mut whole) = (Duration::ZERO, 0, 0);
            let mut cpu_took = Duration::ZERO;
            for i in 0..n {
                let changes = make(i, version, snapshot);
                version += 1;
                let (_, t) = timed(|| cache.update(snapshot, changes, &node).services.len());
                took += t.wall;
                cpu_took += t.cpu;
                touched += cache.take_delta().len();
                whole += usize::from(cache.stats().workloads_compiled);
            }
            println!(
                "{n} {what} changes: mean {:.3} ms CPU ({:.3} ms wall), {touched} entries \
                 touched, {whole} compiled whole",
                ms(cpu_took) / n as f64,
                ms(took) / n as f64,
            );
            check(what, cache.state(), snapshot, &node);
        };
    changes_of(
        "Pod (same labels, new address)",
        &mut snapshot,
        &mut cache,
        200,
        &mut |i, version, snapshot| {
            let p = shape.pods - 3 - i;
            let pod: Pod = stamped(cluster::pod(&shape, p, 1), version);
            snapshot.pods[p] = pod.clone();
            let mut changes = Changes::default();
            changes.pods.insert(pod_key(&pod).unwrap(), Some(pod));
            changes
        },
    );
    changes_of(
        "Pod (new identity)",
        &mut snapshot,
        &mut cache,
        50,
        &mut |i, version, snapshot| {
            let p = shape.pods - 300 - i;
            let mut object = cluster::pod(&shape, p, 1);
            object["metadata"]["labels"]["app"] = json!(format!("app-new-{i}"));
            let pod: Pod = stamped(object, version);
            snapshot.pods[p] = pod.clone();
            let mut changes = Changes::default();
            changes.pods.insert(pod_key(&pod).unwrap(), Some(pod));
            changes
        },
    );
    changes_of(
        "Node (another node's labels)",
        &mut snapshot,
        &mut cache,
        200,
        &mut |i, version, snapshot| {
            let n = shape.nodes - 2 - i;
            let mut object = cluster::node(n);
            object["metadata"]["labels"]["heartbeat"] = json!(i.to_string());
            let node: Node = stamped(object, version);
            snapshot.nodes[n] = node.clone();
            let mut changes = Changes::default();
            changes.nodes.insert(key(&node).1, Some(node));
            changes
        },
    );
    changes_of(
        "Node (another node readdressed: an ExternalIP more)",
        &mut snapshot,
        &mut cache,
        20,
        &mut |i, version, snapshot| {
            let n = shape.nodes - 300 - i;
            let mut object = cluster::node(n);
            object["status"]["addresses"]
                .as_array_mut()
                .unwrap_or_else(|| panic!("node {n} without addresses"))
                .push(json!({"type": "ExternalIP", "address": format!("203.0.113.{}", i + 1)}));
            let node: Node = stamped(object, version);
            snapshot.nodes[n] = node.clone();
            let mut changes = Changes::default();
            changes.nodes.insert(key(&node).1, Some(node));
            changes
        },
    );
    // A node leaving (its pods still listed) and joining again, in turns.
    changes_of(
        "Node (another node removed, then added back)",
        &mut snapshot,
        &mut cache,
        20,
        &mut |i, version, snapshot| {
            let n = shape.nodes - 400;
            let name = key(&stamped::<Node>(cluster::node(n), version)).1;
            let mut changes = Changes::default();
            if i % 2 == 0 {
                snapshot.nodes.remove(n);
                changes.nodes.insert(name, None);
            } else {
                let node: Node = stamped(cluster::node(n), version);
                snapshot.nodes.insert(n, node.clone());
                changes.nodes.insert(name, Some(node));
            }
            changes
        },
    );
    changes_of(
        "Namespace (relabelled, pods in it)",
        &mut snapshot,
        &mut cache,
        20,
        &mut |i, version, snapshot| {
            let at = 2 + i % (shape.namespaces - 2);
            let mut object = cluster::namespace(&shape, at);
            object["metadata"]["labels"]["team"] = json!(format!("team-r{i}"));
            let namespace: Namespace = stamped(object, version);
            snapshot.namespaces[at] = namespace.clone();
            let mut changes = Changes::default();
            changes
                .namespaces
                .insert(key(&namespace).1, Some(namespace));
            changes
        },
    );
    changes_of(
        "NetworkPolicy",
        &mut snapshot,
        &mut cache,
        50,
        &mut |i, version, snapshot| {
            let at = (i * 37) % shape.network_policies;
            let mut object = cluster::network_policy(&shape, at);
            object["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app"] =
                json!(format!("app-{}", i + 5));
            let policy: NetworkPolicy = stamped(object, version);
            snapshot.network_policies[at] = policy.clone();
            let mut changes = Changes::default();
            changes.network_policies.insert(key(&policy), Some(policy));
            changes
        },
    );

    // The same Service change found by comparing a whole snapshot with the index, once
    // the index has recorded the workloads (a change set saying they changed drops that
    // record).
    cache.refresh(&snapshot, &node);
    cache.take_delta();
    snapshot.services[shape.services + 900] = bulk_service(900, 2, version);
    let (_, took) = timed(|| cache.refresh(&snapshot, &node).services.len());
    println!(
        "one Service change found in a whole snapshot: {took}, {} entries touched",
        cache.take_delta().len()
    );
}
