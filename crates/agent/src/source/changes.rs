//! The change sets sources send beside their snapshots: which objects changed since the
//! snapshot the agent last took, by the key the compiler names them by, so the agent
//! compiles only those ([`sluice_compiler::CompileCache::update`]) instead of comparing
//! every object again.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, btree_map::Entry},
    sync::Arc,
};

use k8s_openapi::{
    Metadata,
    api::{
        core::v1::{Namespace, Node, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
};
use sluice_compiler::{Changes, ObjectKey, object_key, object_key_ref, pod_key, pod_key_ref};
use sluice_store::{Pod, Snapshot};

/// A kind of object a change set names: how it is keyed and where its changes go.
pub trait Kind: Clone + PartialEq {
    type Key: Ord + Clone;

    /// None for an object without a name: the change set cannot name it.
    fn key(&self) -> Option<Self::Key>;

    /// How `Some(self.key())` sorts against `Some(key)`, without building the key: a
    /// snapshot's objects are searched and merged by it, 200,000 Pods at a time.
    fn cmp_key(&self, key: &Self::Key) -> Ordering;

    fn changes(changes: &mut Changes) -> &mut BTreeMap<Self::Key, Option<Self>>;

    /// This kind's objects in a snapshot.
    fn of(snapshot: &Snapshot) -> &[Self];

    fn of_mut(snapshot: &mut Snapshot) -> &mut Vec<Self>;
}

macro_rules! namespaced {
    ($kind:ty, $field:ident, $key:expr, $key_ref:expr) => {
        impl Kind for $kind {
            type Key = ObjectKey;
            fn key(&self) -> Option<ObjectKey> {
                $key(self)
            }
            fn cmp_key(&self, key: &ObjectKey) -> Ordering {
                $key_ref(self).cmp(&Some((key.0.as_str(), key.1.as_str())))
            }
            fn changes(changes: &mut Changes) -> &mut BTreeMap<ObjectKey, Option<Self>> {
                &mut changes.$field
            }
            fn of(snapshot: &Snapshot) -> &[Self] {
                &snapshot.$field
            }
            fn of_mut(snapshot: &mut Snapshot) -> &mut Vec<Self> {
                &mut snapshot.$field
            }
        }
    };
}

macro_rules! cluster_scoped {
    ($kind:ty, $field:ident) => {
        impl Kind for $kind {
            type Key = String;
            fn key(&self) -> Option<String> {
                self.metadata().name.clone().filter(|n| !n.is_empty())
            }
            fn cmp_key(&self, key: &String) -> Ordering {
                let name = self.metadata().name.as_deref().filter(|n| !n.is_empty());
                name.cmp(&Some(key.as_str()))
            }
            fn changes(changes: &mut Changes) -> &mut BTreeMap<String, Option<Self>> {
                &mut changes.$field
            }
            fn of(snapshot: &Snapshot) -> &[Self] {
                &snapshot.$field
            }
            fn of_mut(snapshot: &mut Snapshot) -> &mut Vec<Self> {
                &mut snapshot.$field
            }
        }
    };
}

fn by_meta<K: Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>>(
    object: &K,
) -> Option<ObjectKey> {
    object_key(object.metadata())
}

fn by_meta_ref<K: Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>>(
    object: &K,
) -> Option<(&str, &str)> {
    object_key_ref(object.metadata())
}

fn slice_key(slice: &Arc<EndpointSlice>) -> Option<ObjectKey> {
    by_meta(&**slice)
}

fn slice_key_ref(slice: &Arc<EndpointSlice>) -> Option<(&str, &str)> {
    by_meta_ref(&**slice)
}

namespaced!(Service, services, by_meta, by_meta_ref);
namespaced!(
    Arc<EndpointSlice>,
    endpoint_slices,
    slice_key,
    slice_key_ref
);
namespaced!(Pod, pods, pod_key, pod_key_ref);
namespaced!(NetworkPolicy, network_policies, by_meta, by_meta_ref);
cluster_scoped!(Namespace, namespaces);
cluster_scoped!(Node, nodes);

/// One object written (`Some`) or deleted (`None`), as a change set; None when the object
/// has no name.
pub fn one<K: Kind>(object: &K, written: bool) -> Option<Changes> {
    let key = K::key(object)?;
    let mut changes = Changes::default();
    K::changes(&mut changes).insert(key, written.then(|| object.clone()));
    Some(changes)
}

/// Adds the changes of a later snapshot to `pending`: an object changed twice keeps its
/// last version, and changes not known (None) on either side stay unknown.
pub fn merge(pending: &mut Option<Changes>, later: Option<Changes>) {
    let (Some(into), Some(later)) = (pending.as_mut(), later) else {
        *pending = None;
        return;
    };
    extend(into, later);
}

/// Adds `later` to `into`: an object changed twice keeps its last version.
pub fn extend(into: &mut Changes, later: Changes) {
    into.services.extend(later.services);
    into.endpoint_slices.extend(later.endpoint_slices);
    into.pods.extend(later.pods);
    into.namespaces.extend(later.namespaces);
    into.nodes.extend(later.nodes);
    into.network_policies.extend(later.network_policies);
    into.endpoints |= later.endpoints;
    into.workloads |= later.workloads;
}

/// What changed from `before` to `after`, found by key; None when either names an object
/// twice or one without a name (the compiler then compares or compiles them whole).
pub fn between(before: &Snapshot, after: &Snapshot) -> Option<Changes> {
    let mut changes = Changes {
        endpoints: before.endpoints != after.endpoints,
        workloads: before.cluster_cidr != after.cluster_cidr,
        ..Changes::default()
    };
    diff::<Service>(before, after, &mut changes)?;
    diff::<Arc<EndpointSlice>>(before, after, &mut changes)?;
    diff::<Pod>(before, after, &mut changes)?;
    diff::<NetworkPolicy>(before, after, &mut changes)?;
    diff::<Namespace>(before, after, &mut changes)?;
    diff::<Node>(before, after, &mut changes)?;
    Some(changes)
}

/// Records in `changes` every object of kind `K` written, added or removed.
fn diff<K: Kind>(before: &Snapshot, after: &Snapshot, changes: &mut Changes) -> Option<()> {
    let before = by_key(K::of(before))?;
    let after = by_key(K::of(after))?;
    compare(&before, after, K::changes(changes));
    Some(())
}

/// What a complete list of kind `K` changes in `current` (objects sorted by key, as
/// [`apply`] keeps them): every object of the list written or added, every other one
/// removed. Objects without a name or given twice are left out.
pub fn listed<K: Kind>(current: &[K], list: &[K]) -> BTreeMap<K::Key, Option<K>> {
    let before: BTreeMap<K::Key, &K> = current
        .iter()
        .filter_map(|o| Some((K::key(o)?, o)))
        .collect();
    let after: BTreeMap<K::Key, &K> = list.iter().filter_map(|o| Some((K::key(o)?, o))).collect();
    let mut into = BTreeMap::new();
    compare(&before, after, &mut into);
    into
}

fn compare<K: Kind>(
    before: &BTreeMap<K::Key, &K>,
    after: BTreeMap<K::Key, &K>,
    into: &mut BTreeMap<K::Key, Option<K>>,
) {
    for (key, old) in before {
        match after.get(key) {
            Some(new) if new == old => {}
            Some(new) => {
                into.insert(key.clone(), Some(K::clone(new)));
            }
            None => {
                into.insert(key.clone(), None);
            }
        }
    }
    for (key, new) in after {
        if let Entry::Vacant(slot) = into.entry(key.clone())
            && !before.contains_key(&key)
        {
            slot.insert(Some(K::clone(new)));
        }
    }
}

/// Applies `changes` to `snapshot`, whose objects of each kind are sorted by key (the
/// order this keeps).
pub fn apply(snapshot: &mut Snapshot, changes: &Changes) {
    patch::<Service>(snapshot, &changes.services);
    patch::<Arc<EndpointSlice>>(snapshot, &changes.endpoint_slices);
    patch::<Pod>(snapshot, &changes.pods);
    patch::<NetworkPolicy>(snapshot, &changes.network_policies);
    patch::<Namespace>(snapshot, &changes.namespaces);
    patch::<Node>(snapshot, &changes.nodes);
}

/// Puts `changes` in place in one pass from the first object they touch: the objects
/// between two changes move once, as a block, and each change is found by a binary search
/// ([`Kind::cmp_key`], which allocates nothing). A burst of k events at n objects costs
/// one move of at most n pointers-worth and k log n comparisons, not k shifts of the
/// vector (64 events at 200,000 Pods: 10 ms of shifts before, debug build).
fn patch<K: Kind>(snapshot: &mut Snapshot, changes: &BTreeMap<K::Key, Option<K>>) {
    let objects = K::of_mut(snapshot);
    let Some(first) = changes.keys().next() else {
        return;
    };
    let start = objects.partition_point(|o| o.cmp_key(first).is_lt());
    let mut rest = objects.split_off(start).into_iter();
    objects.reserve(rest.len() + changes.len());
    for (key, change) in changes {
        let before = rest.as_slice().partition_point(|o| o.cmp_key(key).is_lt());
        objects.extend(rest.by_ref().take(before));
        // The object the change replaces or deletes.
        if rest
            .as_slice()
            .first()
            .is_some_and(|o| o.cmp_key(key).is_eq())
        {
            rest.next();
        }
        if let Some(new) = change {
            objects.push(new.clone());
        }
    }
    objects.extend(rest);
}

/// The objects by key; None when a key is missing or given twice.
fn by_key<K: Kind>(objects: &[K]) -> Option<BTreeMap<K::Key, &K>> {
    let mut keyed = BTreeMap::new();
    for object in objects {
        if keyed.insert(K::key(object)?, object).is_some() {
            return None;
        }
    }
    Some(keyed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test")]

    use super::*;

    fn service(namespace: Option<&str>, name: &str, ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]},
        }))
        .unwrap()
    }

    fn with(services: Vec<Service>) -> Snapshot {
        Snapshot {
            services,
            ..Snapshot::default()
        }
    }

    #[test]
    fn a_diff_names_what_was_written_added_and_removed() {
        let before = with(vec![
            service(None, "kept", "10.96.0.1"),
            service(Some("x"), "changed", "10.96.0.2"),
            service(Some("x"), "gone", "10.96.0.3"),
        ]);
        let after = with(vec![
            service(Some("x"), "changed", "10.96.0.20"),
            service(None, "kept", "10.96.0.1"),
            service(Some("x"), "new", "10.96.0.4"),
        ]);
        let changes = between(&before, &after).unwrap();
        let named: Vec<_> = changes
            .services
            .iter()
            .map(|((ns, name), s)| format!("{ns}/{name}:{}", s.is_some()))
            .collect();
        assert_eq!(named, ["x/changed:true", "x/gone:false", "x/new:true"]);
        assert!(!changes.touches_workloads());

        // `default` spelled out or left out is one key: given twice, no change set.
        let twice = with(vec![
            service(None, "kept", "10.96.0.1"),
            service(Some("default"), "kept", "10.96.0.1"),
        ]);
        assert!(between(&before, &twice).is_none());
    }

    #[test]
    fn merged_change_sets_keep_the_last_version_and_unknown_wins() {
        let first = one(&service(None, "a", "10.96.0.1"), true);
        let second = one(&service(None, "a", "10.96.0.1"), false);
        let mut pending = Some(Changes::default());
        merge(&mut pending, first);
        merge(&mut pending, second);
        let pending_set = pending.clone().unwrap();
        assert_eq!(pending_set.services.len(), 1);
        assert!(
            pending_set.services.values().all(Option::is_none),
            "deleted last"
        );
        merge(&mut pending, None);
        assert!(pending.is_none());
        merge(&mut pending, one(&service(None, "b", "10.96.0.2"), true));
        assert!(pending.is_none(), "unknown stays unknown");
    }

    /// What patching the sorted Pods costs at GKE's 200,000, printed (never asserted): a
    /// burst of pod events, a whole list, and the search alone by
    /// borrowed keys against the keys built per comparison it replaced.
    #[test]
    fn patching_200k_pods_costs() {
        use std::time::Instant;
        let pod = |i: usize| -> Pod {
            k8s_openapi::api::core::v1::Pod {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    name: Some(format!("pod-{i:06}")),
                    namespace: Some(format!("ns-{:02}", i % 100)),
                    ..Default::default()
                },
                ..Default::default()
            }
            .into()
        };
        let mut snapshot = Snapshot::default();
        let mut all = Changes::default();
        for i in (0..400_000).step_by(2) {
            let p = pod(i);
            all.pods.insert(pod_key(&p).unwrap(), Some(p));
        }
        let started = Instant::now();
        apply(&mut snapshot, &all);
        let listed = started.elapsed();
        let mut burst = Changes::default();
        for i in (1..400_000).step_by(400_000 / 32) {
            let p = pod(i);
            burst.pods.insert(pod_key(&p).unwrap(), Some(p));
            let gone = pod(i + 1);
            burst.pods.insert(pod_key(&gone).unwrap(), None);
        }
        let started = Instant::now();
        apply(&mut snapshot, &burst);
        let burst_took = started.elapsed();
        let keys: Vec<ObjectKey> = burst.pods.keys().cloned().collect();
        let started = Instant::now();
        for key in &keys {
            let _ = snapshot.pods.binary_search_by(|o| o.cmp_key(key));
        }
        let borrowed = started.elapsed();
        let started = Instant::now();
        for key in &keys {
            let _ = snapshot
                .pods
                .binary_search_by(|o| pod_key(o).as_ref().cmp(&Some(key)));
        }
        let built = started.elapsed();
        eprintln!(
            "200,000 Pods: listed in {listed:?}; a burst of 64 events \
             {burst_took:?}; 64 searches by borrowed keys {borrowed:?}, by keys built per \
             comparison {built:?}"
        );
        assert_eq!(snapshot.pods.len(), 200_000);
    }

    /// A few changes or many at once, a change set leaves the objects as a map by key would
    /// hold them, sorted.
    #[test]
    fn applied_changes_keep_the_objects_sorted_and_complete() {
        for size in [3usize, 200] {
            let mut snapshot = Snapshot::default();
            let mut reference = BTreeMap::new();
            let mut seed = 11u64;
            for _ in 0..20 {
                let mut changes = Changes::default();
                for _ in 0..size {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let i = (seed >> 33) % 300;
                    let key = ("default".to_string(), format!("s-{i:03}"));
                    let written = !(seed >> 20).is_multiple_of(3);
                    let object =
                        written.then(|| service(None, &key.1, &format!("10.96.0.{}", seed % 200)));
                    changes.services.insert(key, object);
                }
                for (key, object) in &changes.services {
                    match object {
                        Some(o) => reference.insert(key.clone(), o.clone()),
                        None => reference.remove(key),
                    };
                }
                apply(&mut snapshot, &changes);
                let expected: Vec<_> = reference.values().cloned().collect();
                assert_eq!(snapshot.services, expected, "{size} changes a step");
            }
        }
    }
}
