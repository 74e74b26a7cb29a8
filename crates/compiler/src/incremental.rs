//! The incremental compile: [`CompileCache`] keeps the compiled state and changes it in
//! place for exactly the objects that changed, with the full [`crate::compile`]'s output.
//!
//! Two ways in:
//! - [`CompileCache::update`]: the source says which objects changed (with the new
//!   objects) and whether anything no object names did; the cost is that of the Services
//!   touched (see `index`) and, for the part compiled from Pods, Namespaces, Nodes and
//!   NetworkPolicies, that of what moves (`crate::policy::PodIndex`, `PolicyIndex`,
//!   `nodes`): a Pod's ipcache entries, an identity that appears or vanishes followed
//!   through every rule's peers, a policy's peers and the rows of the endpoints it
//!   selects, the identities of a relabelled Namespace renamed, another Node's address,
//!   router, pod CIDR and tunnel entries, a local endpoint's entries and rows. What moves
//!   more (this node, a local endpoint's Pod, a policy that changes the CIDRs policies
//!   name or a high-cardinality or namespace-like label key their selectors name, a
//!   contested address, a number two identities collide on) compiles that part whole.
//! - [`CompileCache::refresh`]: a whole snapshot, compared with what the cache holds by
//!   uid and resourceVersion (whole objects for those without), to find the changes.
//!   A snapshot that names two Services or two slices alike, or a Service without a name,
//!   has no such index: it is compiled whole.
//!
//! Either way [`CompileCache::take_delta`] then says which map entries changed, with their
//! values before, so the realizer writes only those.

mod index;
mod nodes;

use std::collections::BTreeSet;

use ipnet::Ipv4Net;
use k8s_openapi::{
    Metadata,
    api::core::v1::{Namespace, Node},
    api::networking::v1::NetworkPolicy,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use sluice_store::{LocalEndpoint, Pod, Snapshot};

pub use self::index::CacheStats;
use self::{
    index::{Index, ServiceInputs},
    nodes::NodeIndex,
};
use crate::{
    Changes, Delta, DesiredState, NodeContext, changes::differences, compile_workloads,
    namespace_of,
};

/// The compiled state and what it was compiled from, kept across compiles.
#[derive(Default)]
pub struct CompileCache {
    /// None before the first compile, and after a snapshot without an index.
    index: Option<Index>,
    /// The state compiled whole from a snapshot without an index.
    whole: Option<DesiredState>,
    /// What the workloads part was last compiled from, for [`Self::refresh`].
    workload_inputs: Option<WorkloadInputs>,
    /// A change set named workloads since `workload_inputs` was recorded: it no longer
    /// says what the part was compiled from. Freed at the next whole compile of the
    /// part, not at the change: freeing a record of every Pod costs more than the change.
    inputs_stale: bool,
    /// Numbers the snapshot passes, to find the objects gone since the last.
    pass: u64,
    /// The entries changed since the last [`Self::take_delta`].
    delta: Delta,
    stats: CacheStats,
}

impl CompileCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// What the last compile recomputed.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// The state as last compiled.
    pub fn state(&self) -> &DesiredState {
        static EMPTY: std::sync::OnceLock<DesiredState> = std::sync::OnceLock::new();
        match (&self.index, &self.whole) {
            (Some(index), _) => &index.state,
            (None, Some(whole)) => whole,
            (None, None) => EMPTY.get_or_init(DesiredState::default),
        }
    }

    /// The map entries changed since the last call, with their values before.
    pub fn take_delta(&mut self) -> Delta {
        std::mem::take(&mut self.delta)
    }

    /// The desired state of `node` from `snapshot`: equal to `crate::compile(snapshot,
    /// node)`, problems included.
    pub fn compile(&mut self, snapshot: &Snapshot, node: &NodeContext) -> DesiredState {
        self.refresh(snapshot, node).clone()
    }

    /// Brings the state to `snapshot`'s, finding what changed since the last compile.
    pub fn refresh(&mut self, snapshot: &Snapshot, node: &NodeContext) -> &DesiredState {
        self.pass += 1;
        let mut changes = match self.changes_from(snapshot) {
            Some(changes) => changes,
            None => {
                self.compile_whole(snapshot, node);
                return self.state();
            }
        };
        let workloads_held = !self.inputs_stale
            && self
                .workload_inputs
                .as_ref()
                .is_some_and(|w| w.matches(snapshot, node));
        if !workloads_held {
            changes.workloads = true;
        }
        self.update(snapshot, changes, node);
        if !workloads_held {
            self.workload_inputs = Some(WorkloadInputs::of(snapshot, node));
            self.inputs_stale = false;
        }
        self.state()
    }

    /// Applies `changes` (on the first call: every Service and EndpointSlice). The rest of
    /// `snapshot` (Pods, Namespaces, Nodes, NetworkPolicies, local endpoints, the cluster
    /// CIDR) is changed in place for the Pods, Namespaces, Nodes and NetworkPolicies
    /// `changes` names when they move little (see the module's note), else compiled again
    /// from `snapshot`, as it is when `changes.workloads` says so or the node context
    /// changed. Its Services and slices are not read; `snapshot` must hold `changes`.
    pub fn update(
        &mut self,
        snapshot: &Snapshot,
        changes: Changes,
        node: &NodeContext,
    ) -> &DesiredState {
        let mut stats = CacheStats::default();
        let mut delta = Delta::default();
        let fresh = self.index.is_none();
        let said = changes.touches_workloads();
        // The CNI plugin's endpoints and the interfaces they name are local endpoints,
        // compiled in place with the snapshot's.
        let (same_node, endpoints_moved) = match &self.index {
            Some(i) => (
                i.node.node == node.node
                    && i.node.policy_map_max == node.policy_map_max
                    && i.node.balancing == node.balancing,
                i.node.interfaces != node.interfaces || i.node.endpoints != node.endpoints,
            ),
            None => (false, false),
        };
        let endpoints = changes.endpoints || endpoints_moved;
        let mut workloads = said || endpoints || !same_node;
        if said {
            // Said by the caller, not found by `refresh`: its record is stale.
            self.inputs_stale = true;
        }
        let index = match &mut self.index {
            Some(index) => index,
            empty => empty.insert(Index::new(node, ServiceInputs::of(snapshot, node))),
        };
        if workloads && same_node {
            // What failed half way is compiled whole below; `delta` keeps the first values.
            if let Ok(renamed) = index.put_in_place(snapshot, &changes, endpoints, node, &mut delta)
            {
                stats.identities_renamed = renamed;
                stats.endpoints_in_place = endpoints;
                index.node = node.clone();
                stats.pods_in_place = changes.pods.len();
                stats.policies_in_place = changes.network_policies.len();
                stats.namespaces_in_place = changes.namespaces.len();
                stats.nodes_in_place = changes.nodes.len();
                workloads = false;
            }
        }
        let inputs = if workloads {
            ServiceInputs::of(snapshot, node)
        } else {
            index.inputs()
        };
        let mut touched = BTreeSet::new();
        for (key, slice) in changes.endpoint_slices {
            touched.extend(index.put_slice(key, slice, self.pass));
        }
        index.settle(touched, changes.services, inputs, &mut stats, &mut delta);
        if workloads {
            if self.inputs_stale {
                self.workload_inputs = None;
            }
            stats.workloads_compiled = true;
            index.node = node.clone();
            let nodes = NodeIndex::new(snapshot, &node.node);
            index.put_workloads(compile_workloads(snapshot, node, true), nodes, &mut delta);
        }
        index.gather_problems();
        if fresh {
            // Whatever was there before (nothing, or a state compiled whole) is the base.
            let before = self.whole.take().unwrap_or_default();
            delta = whole_difference(&before, &index.state);
        }
        self.delta.merge(delta);
        self.stats = stats;
        self.state()
    }

    /// The Services and slices of `snapshot` that differ from the index, those gone from
    /// it, and every one when there is no index yet; None when the snapshot has none (a
    /// name given twice, a Service without a name).
    fn changes_from(&mut self, snapshot: &Snapshot) -> Option<Changes> {
        let pass = self.pass;
        let mut changes = Changes::default();
        let mut index = self.index.as_mut();
        // One key reused for every lookup: no allocation for an object the index holds.
        let mut key = (String::new(), String::new());
        for service in &snapshot.services {
            set_key(&mut key, service.metadata())?;
            let held = match index.as_deref_mut().and_then(|i| i.services.get_mut(&key)) {
                Some(entry) if entry.seen == pass => return None,
                Some(entry) => {
                    entry.seen = pass;
                    same(&*entry.service, service)
                }
                None => false,
            };
            if !held
                && changes
                    .services
                    .insert(key.clone(), Some(service.clone()))
                    .is_some()
            {
                return None;
            }
        }
        for slice in &snapshot.endpoint_slices {
            set_key(&mut key, slice.metadata())?;
            let held = match index.as_deref_mut().and_then(|i| i.slices.get_mut(&key)) {
                Some(entry) if entry.seen == pass => return None,
                Some(entry) => {
                    entry.seen = pass;
                    same(&*entry.slice, &**slice)
                }
                None => false,
            };
            if !held
                && changes
                    .endpoint_slices
                    .insert(key.clone(), Some(slice.clone()))
                    .is_some()
            {
                return None;
            }
        }
        if let Some(index) = index {
            for (key, entry) in &index.services {
                if entry.seen != pass {
                    changes.services.entry(key.clone()).or_insert(None);
                }
            }
            for (key, entry) in &index.slices {
                if entry.seen != pass {
                    changes.endpoint_slices.entry(key.clone()).or_insert(None);
                }
            }
        }
        Some(changes)
    }

    /// Compiles `snapshot` whole, dropping the index: the next snapshot that has one
    /// builds it again.
    fn compile_whole(&mut self, snapshot: &Snapshot, node: &NodeContext) {
        let state = crate::compile(snapshot, node);
        let delta = whole_difference(self.state(), &state);
        self.delta.merge(delta);
        self.index = None;
        self.workload_inputs = None;
        self.whole = Some(state);
        self.stats = CacheStats {
            services_compiled: snapshot.services.len(),
            workloads_compiled: true,
            ..CacheStats::default()
        };
    }
}

/// Every realized entry that differs between two states.
fn whole_difference(before: &DesiredState, after: &DesiredState) -> Delta {
    let mut delta = Delta::default();
    differences(&mut delta.services, &before.services, &after.services);
    differences(&mut delta.backends, &before.backends, &after.backends);
    differences(&mut delta.maglev, &before.maglev, &after.maglev);
    differences(
        &mut delta.source_ranges,
        &before.source_ranges,
        &after.source_ranges,
    );
    differences(&mut delta.endpoints, &before.endpoints, &after.endpoints);
    differences(&mut delta.ipcache, &before.ipcache, &after.ipcache);
    differences(&mut delta.policies, &before.policies, &after.policies);
    delta
}

/// Sets `key` to an object's namespace and name; None without a name.
fn set_key(key: &mut (String, String), meta: &ObjectMeta) -> Option<()> {
    let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
    key.0.clear();
    key.0.push_str(namespace_of(meta.namespace.as_ref()));
    key.1.clear();
    key.1.push_str(name);
    Some(())
}

/// The inputs of [`compile_workloads`], as last compiled.
struct WorkloadInputs {
    nodes: Vec<Version<Node>>,
    cluster_cidr: Option<Ipv4Net>,
    namespaces: Vec<Version<Namespace>>,
    /// Pods are shared, not copied: holding them costs a pointer each, and comparing
    /// them a pointer unless they were replaced.
    pods: Vec<Pod>,
    network_policies: Vec<Version<NetworkPolicy>>,
    endpoints: Vec<LocalEndpoint>,
    node: NodeContext,
}

impl WorkloadInputs {
    fn of(snapshot: &Snapshot, node: &NodeContext) -> Self {
        Self {
            nodes: versions(&snapshot.nodes),
            cluster_cidr: snapshot.cluster_cidr,
            namespaces: versions(&snapshot.namespaces),
            pods: snapshot.pods.clone(),
            network_policies: versions(&snapshot.network_policies),
            endpoints: snapshot.endpoints.clone(),
            node: node.clone(),
        }
    }

    fn matches(&self, snapshot: &Snapshot, node: &NodeContext) -> bool {
        self.node == *node
            && self.cluster_cidr == snapshot.cluster_cidr
            && holds(&self.nodes, &snapshot.nodes)
            && holds(&self.namespaces, &snapshot.namespaces)
            && self.endpoints == snapshot.endpoints
            && holds(&self.network_policies, &snapshot.network_policies)
            && self.pods == snapshot.pods
    }
}

/// One object as last compiled: its uid and resourceVersion when it has both (one content,
/// see [`same`]), else the whole object. Keeping two strings rather than a copy of every
/// Pod spares the cache a clone and a deep comparison of each per pass.
enum Version<T> {
    Stamp { uid: String, version: String },
    Whole(T),
}

fn versions<T: Metadata<Ty = ObjectMeta> + Clone>(objects: &[T]) -> Vec<Version<T>> {
    objects
        .iter()
        .map(|o| {
            let meta = o.metadata();
            match (&meta.uid, &meta.resource_version) {
                (Some(uid), Some(version)) => Version::Stamp {
                    uid: uid.clone(),
                    version: version.clone(),
                },
                _ => Version::Whole(o.clone()),
            }
        })
        .collect()
}

/// Whether `kept` records exactly `objects`, in order, as [`same`] judges them.
fn holds<T: Metadata<Ty = ObjectMeta> + PartialEq>(kept: &[Version<T>], objects: &[T]) -> bool {
    kept.len() == objects.len()
        && kept.iter().zip(objects).all(|(k, o)| {
            let meta = o.metadata();
            match (k, &meta.uid, &meta.resource_version) {
                (Version::Stamp { uid, version }, Some(u), Some(v)) => uid == u && version == v,
                (Version::Whole(kept), _, _) => kept == o,
                // One has a version and the other not: not one content.
                _ => false,
            }
        })
}

/// Whether `a` and `b` are the same version of one object. The API server changes an
/// object's resourceVersion on every write, so one uid at one resourceVersion is one
/// content, and comparing two strings spares a deep comparison; objects without them (the
/// lab's) are compared whole.
fn same<T: Metadata<Ty = ObjectMeta> + PartialEq>(a: &T, b: &T) -> bool {
    let (ma, mb) = (a.metadata(), b.metadata());
    match (&ma.uid, &ma.resource_version, &mb.uid, &mb.resource_version) {
        (Some(ua), Some(va), Some(ub), Some(vb)) => ua == ub && va == vb,
        _ => a == b,
    }
}
