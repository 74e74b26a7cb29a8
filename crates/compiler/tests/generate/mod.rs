//! Random clusters and objects for the incremental compile's property tests: small pools
//! of names, addresses and ports, so Services often claim one ClusterIP, node port,
//! external address or health check port.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};
use sluice_compiler::{DesiredState, NodeContext};
use sluice_store::{LocalEndpoint, Snapshot};

pub const NODE: &str = "node-a";
pub const NAMESPACES: [&str; 2] = ["a", "b"];
pub const SERVICE_NAMES: [&str; 6] = ["s0", "s1", "s2", "s3", "s4", "s5"];
pub const CLUSTER_IPS: [&str; 6] = [
    "10.96.0.1",
    "10.96.0.2",
    "10.96.0.3",
    "10.96.0.4",
    "None",
    "bogus",
];
/// The third is node-a's own address: an external IP there meets its node ports.
pub const EXTERNAL_IPS: [&str; 3] = ["192.0.2.1", "192.0.2.2", "172.16.0.1"];
pub const NODE_PORTS: [i32; 3] = [30000, 30001, 70000];
pub const HEALTH_PORTS: [i32; 2] = [31000, 31001];
/// Pods p0.. of a generated cluster; p0..p3 may be local endpoints.
pub const PODS: usize = 8;
pub const BACKENDS: [&str; 5] = ["10.0.1.10", "10.0.1.11", "10.0.2.10", "10.0.2.11", "bad"];

/// A uid and a resourceVersion as the API server gives them (a new version on every
/// write), on half the objects (Services, EndpointSlices, Pods, NetworkPolicies); the
/// others, like the lab's, have neither.
pub fn versioned(rng: &mut fastrand::Rng, metadata: &mut Value, uid: String) {
    static VERSION: AtomicU64 = AtomicU64::new(1);
    if rng.bool() {
        metadata["uid"] = json!(uid);
        metadata["resourceVersion"] = json!(VERSION.fetch_add(1, Ordering::Relaxed).to_string());
    }
}

pub fn pick<'a, T>(rng: &mut fastrand::Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

pub fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"))
}

pub fn service(rng: &mut fastrand::Rng) -> Value {
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

pub fn slice(rng: &mut fastrand::Rng, name: usize) -> Value {
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

/// Pod `p{i}`: two apps in two namespaces, so pods often share a label set (one
/// identity); its address mostly its own, sometimes one another pod may claim, inside or
/// outside the policies' ipBlock; sometimes pending without one or on the host network;
/// sometimes with a named port.
pub fn pod(rng: &mut fastrand::Rng, i: usize) -> Value {
    let mut metadata = json!({
        "name": format!("p{i}"),
        "namespace": pick(rng, &NAMESPACES),
        "labels": {"app": pick(rng, &["web", "db"]), "pod-template-hash": pick(rng, &["h1", "h2"])},
    });
    // A label only some policies select on: their coming and going changes the keys the
    // selectors name.
    metadata["labels"]["tier"] = json!(["a", "b"][i % 2]);
    if rng.u8(..20) == 0 {
        // A pod label that reads like its namespace's in the label set.
        metadata["labels"]["io.cilium.k8s.namespace.labels.team"] = json!("x");
    }
    versioned(rng, &mut metadata, format!("pod-{i}"));
    let address = if rng.u8(..3) == 0 {
        format!("10.0.{}.{}", pick(rng, &[1, 2]), 10 + rng.usize(..12))
    } else {
        format!("10.0.1.{}", 10 + i)
    };
    let mut spec = json!({"nodeName": pick(rng, &[NODE, "node-b"]), "containers": [{"name": "c", "image": "i"}]});
    if rng.u8(..3) == 0 {
        spec["containers"][0]["ports"] =
            json!([{"name": "http", "containerPort": pick(rng, &[8080, 8081])}]);
    }
    let status = match rng.u8(..10) {
        0 => json!({"phase": "Pending"}),
        1 => {
            spec["hostNetwork"] = json!(true);
            json!({"phase": "Running", "podIP": "172.16.0.2"})
        }
        _ => json!({"phase": "Running", "podIP": address}),
    };
    json!({"metadata": metadata, "spec": spec, "status": status})
}

/// NetworkPolicy `np{i}`: one app admits another on a port, sometimes also an ipBlock
/// over some pod addresses; sometimes with an egress rule to a named port.
pub fn policy(rng: &mut fastrand::Rng, i: usize) -> Value {
    let mut metadata = json!({"name": format!("np{i}"), "namespace": pick(rng, &NAMESPACES)});
    versioned(rng, &mut metadata, format!("np-{i}"));
    let mut from =
        vec![json!({"podSelector": {"matchLabels": {"app": pick(rng, &["web", "db"])}}})];
    if rng.bool() {
        // Namespace labels select: a relabel moves the peers.
        from.push(json!({
            "namespaceSelector": {"matchLabels": {"team": pick(rng, &["x", "y"])}},
            "podSelector": {"matchLabels": {"app": pick(rng, &["web", "db"])}},
        }));
    }
    if rng.u8(..3) == 0 {
        // A key no other policy may name: in place, or whole for a high-cardinality one
        // (it moves label sets).
        let key = pick(rng, &["tier", "tier", "pod-template-hash"]);
        from.push(json!({"podSelector": {"matchLabels": {*key: "a"}}}));
    }
    if rng.bool() {
        from.push(json!({"ipBlock": {
            "cidr": pick(rng, &["10.0.1.0/28", "10.0.0.0/16"]),
            "except": [pick(rng, &["10.0.1.12/32", "10.0.2.16/30"])],
        }}));
    }
    let mut spec = json!({
        "podSelector": {"matchLabels": {"app": pick(rng, &["web", "db"])}},
        "ingress": [{"from": from, "ports": [{"port": pick(rng, &[80, 8080])}]}],
    });
    if rng.bool() {
        spec["egress"] = json!([{"to": [{"podSelector": {}}], "ports": [{"port": "http"}]}]);
    }
    json!({"metadata": metadata, "spec": spec})
}

pub fn node_object(rng: &mut fastrand::Rng, name: &str, address: &str, cidr: &str) -> Value {
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

pub fn endpoint(i: usize) -> LocalEndpoint {
    LocalEndpoint {
        node: NODE.into(),
        namespace: NAMESPACES[i % 2].into(),
        pod: format!("p{i}"),
        interface: format!("lxc{i}"),
        addresses: [std::net::Ipv4Addr::new(10, 0, 1, 10 + i as u8).into()].into(),
    }
}

/// Replaces the item at a random index of `items`, adds one, or removes one.
pub fn churn<T>(
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

pub fn cluster(rng: &mut fastrand::Rng) -> (Snapshot, NodeContext) {
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
    for i in 0..rng.usize(0..PODS) {
        snapshot.pods.push(from_json(pod(rng, i)));
        if i < 4 {
            snapshot.endpoints.push(endpoint(i));
        }
    }
    for i in 0..rng.usize(0..3) {
        snapshot.network_policies.push(from_json(policy(rng, i)));
    }
    (snapshot, node_context)
}

/// The fields in which two states differ, for the failure message.
pub fn differing(a: &DesiredState, b: &DesiredState) -> Vec<&'static str> {
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
