//! What changed between two compiles, in both directions: the objects a source says
//! changed ([`Changes`], the input of [`crate::CompileCache::update`]) and the map entries
//! that changed with them ([`Delta`], its output), so a change costs what it touches.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use sluice_common::{
    EndpointInfo, IpcacheEntry, IpcacheKey, Lb4Backend, Lb4BackendKey, Lb4Key, Lb4Service,
    Lb4SourceRangeKey,
};
use sluice_store::Pod;

use crate::EndpointPolicy;

/// An object's namespace and name, unique per kind as in the API server.
pub type ObjectKey = (String, String);

/// The objects changed since the last compile, each written (`Some`, the new object) or
/// deleted (`None`), by namespace and name (Nodes and Namespaces by name alone), and
/// whether the local endpoints or anything else no object names (the cluster CIDR)
/// changed.
#[derive(Clone, Debug, Default)]
pub struct Changes {
    pub services: BTreeMap<ObjectKey, Option<Service>>,
    pub endpoint_slices: BTreeMap<ObjectKey, Option<Arc<EndpointSlice>>>,
    pub pods: BTreeMap<ObjectKey, Option<Pod>>,
    pub namespaces: BTreeMap<String, Option<Namespace>>,
    pub nodes: BTreeMap<String, Option<Node>>,
    pub network_policies: BTreeMap<ObjectKey, Option<NetworkPolicy>>,
    /// The local endpoints changed (the snapshot holds them; the cache compares them
    /// with those it compiled).
    pub endpoints: bool,
    /// The cluster CIDR changed, or the caller cannot tell what did.
    pub workloads: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.endpoint_slices.is_empty() && !self.touches_workloads()
    }

    /// Whether the part compiled from Pods, Namespaces, Nodes, NetworkPolicies and local
    /// endpoints changed.
    pub fn touches_workloads(&self) -> bool {
        self.workloads
            || self.endpoints
            || !self.pods.is_empty()
            || !self.namespaces.is_empty()
            || !self.nodes.is_empty()
            || !self.network_policies.is_empty()
    }
}

/// The entries of every realized map that one or more updates touched, each with the
/// value it had before the first of them (None: absent). An entry touched and put back
/// as it was is listed too; a key not listed holds what it held.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    pub services: BTreeMap<Lb4Key, Option<Lb4Service>>,
    pub backends: BTreeMap<Lb4BackendKey, Option<Lb4Backend>>,
    pub maglev: BTreeMap<Lb4Key, Option<Arc<[u16]>>>,
    pub source_ranges: BTreeMap<Lb4SourceRangeKey, Option<u32>>,
    pub endpoints: BTreeMap<u32, Option<EndpointInfo>>,
    pub ipcache: BTreeMap<IpcacheKey, Option<IpcacheEntry>>,
    /// ifindex -> the endpoint's policy before.
    pub policies: BTreeMap<u32, Option<EndpointPolicy>>,
}

impl Delta {
    /// Entries touched, over every map.
    pub fn len(&self) -> usize {
        self.services.len()
            + self.backends.len()
            + self.maglev.len()
            + self.source_ranges.len()
            + self.endpoints.len()
            + self.ipcache.len()
            + self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds what `later` touched after this delta: a key both touched keeps this one's
    /// value before.
    pub fn merge(&mut self, later: Delta) {
        fn keep_first<K: Ord, V>(into: &mut BTreeMap<K, V>, from: BTreeMap<K, V>) {
            for (k, v) in from {
                into.entry(k).or_insert(v);
            }
        }
        keep_first(&mut self.services, later.services);
        keep_first(&mut self.backends, later.backends);
        keep_first(&mut self.maglev, later.maglev);
        keep_first(&mut self.source_ranges, later.source_ranges);
        keep_first(&mut self.endpoints, later.endpoints);
        keep_first(&mut self.ipcache, later.ipcache);
        keep_first(&mut self.policies, later.policies);
    }
}

/// Records in `delta` that `key` held `before` unless an earlier write recorded it.
pub(crate) fn touched<K: Ord, V>(delta: &mut BTreeMap<K, Option<V>>, key: K, before: Option<V>) {
    delta.entry(key).or_insert(before);
}

/// Records every key whose value differs between `before` and `after`.
pub(crate) fn differences<K: Ord + Clone, V: PartialEq + Clone>(
    delta: &mut BTreeMap<K, Option<V>>,
    before: &BTreeMap<K, V>,
    after: &BTreeMap<K, V>,
) {
    for (k, v) in before {
        if after.get(k) != Some(v) {
            touched(delta, k.clone(), Some(v.clone()));
        }
    }
    for k in after.keys() {
        if !before.contains_key(k) {
            touched(delta, k.clone(), None);
        }
    }
}

/// A Pod's key, as [`object_key`] gives other objects'.
pub fn pod_key(pod: &Pod) -> Option<ObjectKey> {
    pod_key_ref(pod).map(owned_key)
}

/// [`pod_key`], borrowed from the Pod: for comparisons, which must not allocate.
pub fn pod_key_ref(pod: &Pod) -> Option<(&str, &str)> {
    let name = pod.name().filter(|n| !n.is_empty())?;
    Some((crate::namespace_or_default(pod.namespace()), name))
}

/// The key [`Changes`] names `meta`'s object by, as the compiler keys it (no namespace:
/// `default`); None without a name.
pub fn object_key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<ObjectKey> {
    object_key_ref(meta).map(owned_key)
}

/// [`object_key`], borrowed from the object.
pub fn object_key_ref(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<(&str, &str)> {
    let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
    Some((crate::namespace_of(meta.namespace.as_ref()), name))
}

fn owned_key((namespace, name): (&str, &str)) -> ObjectKey {
    (namespace.to_owned(), name.to_owned())
}
