//! The change-set path of the incremental compile against the full one: random sequences
//! of change sets over every kind, as a source reports them (`CompileCache::update`).

use serde_json::{Value, json};
use sluice_compiler::{
    Changes, CompileCache, Delta, DesiredState, NodeContext, ObjectKey, compile,
};
use sluice_store::Snapshot;

mod generate;

use generate::*;

/// The objects of a cluster as an API server holds them: one per kind, namespace and name.
#[derive(Default)]
struct Objects {
    services: std::collections::BTreeMap<ObjectKey, Value>,
    slices: std::collections::BTreeMap<ObjectKey, Value>,
}

fn to_json(object: &impl serde::Serialize) -> Value {
    serde_json::to_value(object).unwrap_or_default()
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
    let what = match rng.u8(..11) {
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
        6 | 7 => {
            // Pod p{i} replaced (maybe in another namespace: then the old one is deleted)
            // or deleted; sometimes also said as "workloads", as a source that cannot tell.
            let i = rng.usize(..PODS);
            let name = format!("p{i}");
            for gone in snapshot
                .pods
                .iter()
                .filter(|p| p.name() == Some(name.as_str()))
            {
                changes.pods.insert(key_of(&to_json(gone)), None);
            }
            snapshot.pods.retain(|p| p.name() != Some(name.as_str()));
            if rng.u8(..4) != 0 {
                let object = pod(rng, i);
                changes
                    .pods
                    .insert(key_of(&object), Some(from_json(object.clone())));
                snapshot.pods.push(from_json(object));
            }
            changes.workloads = rng.u8(..8) == 0;
            "pod"
        }
        8 => {
            let i = rng.usize(..3);
            let name = format!("np{i}");
            for gone in snapshot
                .network_policies
                .iter()
                .filter(|p| p.metadata.name.as_deref() == Some(name.as_str()))
            {
                changes
                    .network_policies
                    .insert(key_of(&to_json(gone)), None);
            }
            snapshot
                .network_policies
                .retain(|p| p.metadata.name.as_deref() != Some(name.as_str()));
            if rng.bool() {
                let object = policy(rng, i);
                changes
                    .network_policies
                    .insert(key_of(&object), Some(from_json(object.clone())));
                snapshot.network_policies.push(from_json(object));
            }
            "network policy"
        }
        9 => {
            // Another node relabelled, readdressed, given another pod CIDR (sometimes one
            // overlapping node-b's), added or removed; or this node changed.
            let (name, addresses, cidrs): (&str, &[&str], &[&str]) = match rng.u8(..4) {
                0 => (NODE, &["172.16.0.1"], &["10.0.1.0/24"]),
                1 => ("node-b", &["172.16.0.2"], &["10.0.2.0/24"]),
                2 => (
                    "node-b",
                    &["172.16.0.2", "172.16.0.5"],
                    &["10.0.2.0/24", "10.0.2.0/25"],
                ),
                _ => (
                    "node-c",
                    &["172.16.0.3", "172.16.0.4"],
                    &["10.0.3.0/24", "10.0.3.0/25", "10.0.2.0/24"],
                ),
            };
            snapshot
                .nodes
                .retain(|n| n.metadata.name.as_deref() != Some(name));
            let node = (name == NODE || rng.u8(..4) != 0).then(|| {
                let (address, cidr) = (*pick(rng, addresses), *pick(rng, cidrs));
                from_json::<k8s_openapi::api::core::v1::Node>(node_object(rng, name, address, cidr))
            });
            snapshot.nodes.extend(node.clone());
            changes.nodes.insert(name.to_string(), node);
            "node"
        }
        _ => match rng.u8(..3) {
            0 => {
                // "c" has no pods: its labels move no identity.
                let name = *pick(rng, &[NAMESPACES[0], NAMESPACES[1], "c"]);
                snapshot
                    .namespaces
                    .retain(|n| n.metadata.name.as_deref() != Some(name));
                let namespace = (name != "c" || rng.bool()).then(|| {
                    from_json::<k8s_openapi::api::core::v1::Namespace>(json!({"metadata": {
                        "name": name,
                        "labels": {"team": pick(rng, &["x", "y"])},
                    }}))
                });
                snapshot.namespaces.extend(namespace.clone());
                changes.namespaces.insert(name.to_string(), namespace);
                "namespace"
            }
            1 => {
                // The snapshot's own endpoints (a cluster file's, said by the change set)
                // or the CNI plugin's (in the node's context, found by comparing it).
                if rng.bool() {
                    churn(rng, &mut snapshot.endpoints, |rng| endpoint(rng.usize(..5)));
                    changes.endpoints = true;
                } else {
                    let mut cni = node.endpoints.to_vec();
                    churn(rng, &mut cni, |rng| endpoint(rng.usize(..5)));
                    node.endpoints = std::sync::Arc::new(cni);
                }
                if rng.bool() {
                    // As the agent does: the interfaces of the endpoints there are (lxc4
                    // never is).
                    node.interfaces = snapshot
                        .endpoints
                        .iter()
                        .chain(node.endpoints.iter())
                        .filter_map(|e| {
                            let i: u32 = e.interface.strip_prefix("lxc")?.parse().ok()?;
                            (i < 4).then(|| (e.interface.clone(), 100 + i))
                        })
                        .collect();
                }
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
    let (mut in_place, mut policies, mut namespaces, mut nodes) = (0, 0, 0, 0);
    // Namespace changes that renamed identities in place, and those compiled whole.
    let (mut relabelled, mut renamed, mut namespaces_whole) = (0, 0, 0);
    let (mut node_changes, mut nodes_whole) = (0, 0);
    let (mut endpoint_changes, mut endpoints_in_place) = (0, 0);
    let (mut policy_changes, mut policies_whole) = (0, 0);
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
            in_place += cache.stats().pods_in_place;
            policies += cache.stats().policies_in_place;
            namespaces += cache.stats().namespaces_in_place;
            nodes += cache.stats().nodes_in_place;
            renamed += cache.stats().identities_renamed;
            if what.ends_with("(local endpoint)") {
                endpoint_changes += 1;
                endpoints_in_place += usize::from(cache.stats().endpoints_in_place);
            }
            if what.ends_with("(network policy)") {
                policy_changes += 1;
                policies_whole += usize::from(cache.stats().workloads_compiled);
            }
            if what.ends_with("(node)") {
                node_changes += 1;
                nodes_whole += usize::from(cache.stats().workloads_compiled);
            }
            if what.ends_with("(namespace)") {
                relabelled += usize::from(cache.stats().identities_renamed > 0);
                namespaces_whole += usize::from(cache.stats().workloads_compiled);
            }
            before = full;
        }
    }
    println!(
        "300 cases x 30 steps: {touched} entries touched, {contested} Services contested, \
         compiled in place: {in_place} Pods, {policies} NetworkPolicies, {namespaces} \
         Namespaces ({relabelled} relabelled with pods, {renamed} identities renamed; \
         {namespaces_whole} compiled whole), {nodes} Nodes ({nodes_whole} of {node_changes} \
         Node changes compiled whole), local endpoints {endpoints_in_place} of \
         {endpoint_changes} times, {policies_whole} of {policy_changes} NetworkPolicy \
         changes compiled whole"
    );
    assert!(contested > 0 && touched > 0);
    assert!(in_place > 0 && policies > 0 && namespaces > 0 && nodes > 0);
    // Only a namespace where a pod's label reads like a namespace's (one pod in twenty
    // has one), or a renumbering that would move another identity, is compiled whole.
    assert!(relabelled > 0 && namespaces_whole * 4 < relabelled);
    // This node, a node address a pod claims and a contested pod address are compiled
    // whole; other nodes' changes in place.
    assert!(nodes_whole * 2 < node_changes);
    // An endpoint without its own Pod address, interface or Pod object is compiled whole;
    // the generator makes many.
    assert!(endpoints_in_place > 0);
}

/// The number a label set's hash names: FNV-1a (64 bit) of the sorted labels joined by
/// '\n', in the label range 256..=65535.
fn home(labels: &[String]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in labels.join("\n").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    256 + (h % 65280) as u32
}

/// A pod in namespace "a" with the label app=`app` at `address`.
fn app_pod(name: &str, app: &str, address: &str) -> sluice_store::Pod {
    app_pod_in("a", name, app, address)
}

fn app_pod_in(namespace: &str, name: &str, app: &str, address: &str) -> sluice_store::Pod {
    from_json(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {"nodeName": "node-b", "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "podIP": address},
    }))
}

/// Two label sets whose hashes name one number: the later in sorted order takes the next.
/// Pods of either coming and going, one at a time, compile in place or whole exactly as
/// the full compile numbers them, also when the number freed is one the other probed
/// past, and a policy that selects both follows every move.
#[test]
fn identities_that_collide_compile_as_the_full_compile() {
    let set = |app: &str| {
        let mut labels = vec![
            format!("k8s:app={app}"),
            "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=a".to_string(),
            "k8s:io.kubernetes.pod.namespace=a".to_string(),
        ];
        labels.sort();
        labels
    };
    let mut seen = std::collections::HashMap::new();
    let (first, second) = (0..20_000)
        .find_map(|i| {
            let app = format!("x{i}");
            let number = home(&set(&app));
            seen.insert(number, app.clone()).map(|other| (other, app))
        })
        .unwrap_or_else(|| panic!("no two label sets collide"));
    let (mut snapshot, node) = cluster(&mut fastrand::Rng::with_seed(1));
    snapshot.pods.clear();
    snapshot.endpoints.clear();
    snapshot.network_policies = vec![from_json(json!({
        "metadata": {"name": "np", "namespace": "a"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]},
    }))];
    snapshot.endpoints.push(endpoint(0));
    snapshot.pods.push(app_pod("p0", "local", "10.0.1.10"));
    let mut cache = CompileCache::new();
    cache.update(&snapshot, Changes::default(), &node);
    let steps = [
        ("q1", Some((first.as_str(), "10.0.2.21"))),
        ("q2", Some((second.as_str(), "10.0.2.22"))),
        ("q3", Some((second.as_str(), "10.0.2.23"))),
        // The set that holds the hash's number goes: the other moves down to it.
        ("q1", None),
        ("q1", Some((first.as_str(), "10.0.2.21"))),
        ("q2", None),
        ("q3", None),
        ("q2", Some((second.as_str(), "10.0.2.22"))),
        ("q1", None),
    ];
    let mut in_place = 0;
    for (step, (name, pod)) in steps.into_iter().enumerate() {
        snapshot.pods.retain(|p| p.name() != Some(name));
        let pod = pod.map(|(app, address)| app_pod(name, app, address));
        snapshot.pods.extend(pod.clone());
        let mut changes = Changes::default();
        changes.pods.insert(("a".into(), name.into()), pod);
        let incremental = cache.update(&snapshot, changes, &node).clone();
        in_place += cache.stats().pods_in_place;
        let full = compile(&snapshot, &node);
        assert!(
            incremental == full,
            "step {step} ({name}): incremental differs from full in {:?}",
            differing(&incremental, &full)
        );
    }
    println!(
        "{first} and {second} collide at {}; {in_place} of 9 steps in place",
        home(&set(&first))
    );
    assert!(in_place > 0);
}

/// A Namespace relabel whose new label set takes the number another namespace's identity
/// held: the full compile numbers sets in order, so that one moves to the next number.
/// Compiled in place, renaming both, with the full compile's output.
#[test]
fn a_relabel_that_displaces_another_identity_equals_the_full_compile() {
    let set = |app: &str, namespace: &str, team: Option<&str>| {
        let mut labels = vec![
            format!("k8s:app={app}"),
            format!("k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name={namespace}"),
            format!("k8s:io.kubernetes.pod.namespace={namespace}"),
        ];
        labels.extend(team.map(|t| format!("k8s:io.cilium.k8s.namespace.labels.team={t}")));
        labels.sort();
        labels
    };
    let held: std::collections::HashMap<u32, String> = (0..20_000)
        .map(|i| format!("y{i}"))
        .map(|app| (home(&set(&app, "a", None)), app))
        .collect();
    // "k8s:app=x.." sorts before "k8s:app=y..": numbered first, it takes the number.
    let (x, y) = (0..20_000)
        .find_map(|i| {
            let app = format!("x{i}");
            let y = held.get(&home(&set(&app, "b", Some("x"))))?;
            Some((app, y.clone()))
        })
        .unwrap_or_else(|| panic!("no relabelled set meets a held number"));
    let (mut snapshot, node) = cluster(&mut fastrand::Rng::with_seed(3));
    // Services come in change sets; this one names none.
    snapshot.services.clear();
    snapshot.endpoint_slices.clear();
    snapshot.endpoints.clear();
    snapshot.network_policies = vec![from_json(json!({
        "metadata": {"name": "np", "namespace": "a"},
        "spec": {"podSelector": {}, "ingress": [{"from": [
            {"podSelector": {}, "namespaceSelector": {"matchLabels": {"team": "x"}}},
            {"podSelector": {}},
        ]}]},
    }))];
    snapshot.pods = vec![
        app_pod("p0", "local", "10.0.1.10"),
        app_pod("q1", &y, "10.0.2.21"),
        app_pod_in("b", "q2", &x, "10.0.2.22"),
    ];
    snapshot.endpoints.push(endpoint(0));
    let mut cache = CompileCache::new();
    cache.update(&snapshot, Changes::default(), &node);
    cache.take_delta();
    let before = compile(&snapshot, &node);
    let namespace: k8s_openapi::api::core::v1::Namespace =
        from_json(json!({"metadata": {"name": "b", "labels": {"team": "x"}}}));
    snapshot
        .namespaces
        .retain(|n| n.metadata.name.as_deref() != Some("b"));
    snapshot.namespaces.push(namespace.clone());
    let mut changes = Changes::default();
    changes.namespaces.insert("b".into(), Some(namespace));
    let incremental = cache.update(&snapshot, changes, &node).clone();
    let full = compile(&snapshot, &node);
    assert!(
        incremental == full,
        "incremental differs from full in {:?}: {:?} vs {:?}",
        differing(&incremental, &full),
        incremental.problems,
        full.problems
    );
    assert_delta(&cache.take_delta(), &before, &full, "relabel");
    let stats = cache.stats();
    println!("{x} (b, team=x) takes {y}'s number: {stats:?}");
    assert!(!stats.workloads_compiled && stats.identities_renamed >= 2);
}
