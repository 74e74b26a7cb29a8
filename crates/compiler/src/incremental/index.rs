//! The compiled state kept across updates, changed in place by what each Service
//! contributes.
//!
//! - Each Service is compiled alone (its *fragment*), which also says what it claims: its
//!   ClusterIP, its frontends and its healthCheckNodePort.
//! - A Service none of whose claims another Service makes contributes its fragment as is.
//!   Services that share claims (transitively: a *group*) are compiled again together in
//!   the full compile's order (by namespace and name), so which one keeps a claim and what
//!   is reported are the full compile's; each keeps what it contributed in that run.
//! - A change takes out the contributions of the changed Services and of every Service
//!   in a group with them (before and after the change), compiles the changed ones alone
//!   again and puts the group's contributions back. Each map entry written is recorded
//!   in the [`Delta`] with the value it had before.
//! - A backend may be named by several Services: it is counted, and present while one
//!   does. Problems are counted the same way, by their line.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use sluice_common::{Lb4BackendKey, Lb4Key};
use sluice_store::Snapshot;

use super::nodes::NodeIndex;

use crate::{
    Balancing, Changes, Compilation, DesiredState, Frontend, NodeContext, ObjectKind, ObjectRef,
    Problem, Workloads,
    backends::served_service,
    changes::{Delta, ObjectKey, differences, touched},
    nodes,
    policy::{NotInPlace, WorkloadIndex},
    problem::Problems,
};

/// What every Service's compile reads of the node.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct ServiceInputs {
    node: String,
    node_addresses: Vec<Ipv4Addr>,
    zone: Option<String>,
    balancing: Balancing,
}

impl ServiceInputs {
    pub(super) fn of(snapshot: &Snapshot, node: &NodeContext) -> Self {
        Self {
            node: node.node.clone(),
            node_addresses: nodes::node_addresses(snapshot, &node.node),
            zone: nodes::node_zone(snapshot, &node.node),
            balancing: node.balancing,
        }
    }

    /// An empty compilation with these inputs.
    fn compilation(&self) -> Compilation {
        Compilation {
            node: self.node.clone(),
            node_addresses: self.node_addresses.clone(),
            zone: self.zone.clone(),
            ..Compilation::default()
        }
    }
}

/// What two Services cannot both hold: the first in order keeps it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Claim {
    ClusterIp(Ipv4Addr),
    Frontend(Lb4Key),
    HealthCheck(u16),
}

/// What one Service puts into the state: the Service fields of a [`DesiredState`] and its
/// problems.
#[derive(Default)]
struct Fragment {
    state: DesiredState,
    problems: Problems,
}

/// Boxed parts: the index's table holds 10,000 entries at GKE's limits and a power of two
/// of slots, each as large as an entry; inline, a Service and two fragments made every
/// slot some 2 KiB.
pub(super) struct ServiceEntry {
    pub(super) service: Box<Service>,
    /// The Service compiled alone.
    alone: Box<Fragment>,
    claims: Vec<Claim>,
    /// What it contributed when its group was last settled; None: `alone`.
    settled: Option<Box<Fragment>>,
    /// The last snapshot pass that held it (`CompileCache::compile`).
    pub(super) seen: u64,
}

pub(super) struct SliceEntry {
    pub(super) slice: Arc<EndpointSlice>,
    /// The Service (in the slice's namespace) it lists backends of, if the datapath reads it.
    service: Option<String>,
    pub(super) seen: u64,
}

/// What the last update recompiled, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Services compiled alone because they, their slices or the node inputs changed.
    pub services_compiled: usize,
    /// Services whose contribution was kept untouched.
    pub services_reused: usize,
    /// Services compiled again in order because another Service claims one of their
    /// addresses or ports.
    pub services_contested: usize,
    /// Whether the part that does not read Services was recomputed.
    pub workloads_compiled: bool,
    /// Whether the local endpoints changed and were compiled in place.
    pub endpoints_in_place: bool,
    /// Pods compiled in place, by their ipcache entries alone.
    pub pods_in_place: usize,
    /// NetworkPolicies compiled in place, by the rows of the endpoints they select.
    pub policies_in_place: usize,
    /// Namespaces compiled in place.
    pub namespaces_in_place: usize,
    /// Identities those renamed: a Namespace relabelled with pods in it changes their
    /// label sets.
    pub identities_renamed: usize,
    /// Nodes compiled in place: another node's labels, or its addresses, pod CIDR or
    /// being at all.
    pub nodes_in_place: usize,
}

pub(super) struct Index {
    pub(super) node: NodeContext,
    inputs: ServiceInputs,
    pub(super) services: HashMap<ObjectKey, ServiceEntry>,
    pub(super) slices: HashMap<ObjectKey, SliceEntry>,
    /// Namespace and name of a Service -> the names of the slices that list its backends.
    slices_of: HashMap<ObjectKey, BTreeSet<String>>,
    /// Which Services claim each claim, in order.
    claimed: HashMap<Claim, BTreeSet<ObjectKey>>,
    /// How many contributions name each backend.
    backend_refs: HashMap<Lb4BackendKey, u32>,
    /// The Services' problems by line, with how many contributions report each.
    problem_refs: BTreeMap<String, (Problem, u32)>,
    /// The problems of the part that does not read Services.
    workload_problems: Problems,
    /// What that part was compiled from, by Pod and NetworkPolicy; None when a change
    /// left it behind.
    workload_index: Option<WorkloadIndex>,
    /// The Nodes that part was compiled from.
    node_index: Option<NodeIndex>,
    pub(super) state: DesiredState,
}

impl Index {
    pub(super) fn new(node: &NodeContext, inputs: ServiceInputs) -> Self {
        Self {
            node: node.clone(),
            state: DesiredState {
                node_addresses: inputs.node_addresses.clone(),
                ..DesiredState::default()
            },
            inputs,
            services: HashMap::new(),
            slices: HashMap::new(),
            slices_of: HashMap::new(),
            claimed: HashMap::new(),
            backend_refs: HashMap::new(),
            problem_refs: BTreeMap::new(),
            workload_problems: Problems::default(),
            workload_index: None,
            node_index: None,
        }
    }

    /// The node inputs the Services were compiled with.
    pub(super) fn inputs(&self) -> ServiceInputs {
        self.inputs.clone()
    }

    /// Replaces (`Some`) or deletes the slice `key`; returns the Services whose backends
    /// it listed before or lists now.
    pub(super) fn put_slice(
        &mut self,
        key: ObjectKey,
        slice: Option<Arc<EndpointSlice>>,
        pass: u64,
    ) -> Vec<ObjectKey> {
        let mut touched = Vec::new();
        if let Some(old) = self.slices.remove(&key)
            && let Some(service) = old.service
        {
            let owner = (key.0.clone(), service);
            if let Some(names) = self.slices_of.get_mut(&owner) {
                names.remove(&key.1);
                if names.is_empty() {
                    self.slices_of.remove(&owner);
                }
            }
            touched.push(owner);
        }
        if let Some(slice) = slice {
            let service = served_service(&slice).map(str::to_string);
            if let Some(service) = &service {
                let owner = (key.0.clone(), service.clone());
                self.slices_of
                    .entry(owner.clone())
                    .or_default()
                    .insert(key.1.clone());
                touched.push(owner);
            }
            let entry = SliceEntry {
                slice,
                service,
                seen: pass,
            };
            self.slices.insert(key, entry);
        }
        touched
    }

    /// Settles the Services in `changed` (and their groups) whose objects are
    /// `objects` (`Some(None)`: deleted; absent: the object held, its slices changed), or
    /// every Service when the node inputs became `inputs`.
    pub(super) fn settle(
        &mut self,
        mut changed: BTreeSet<ObjectKey>,
        mut objects: BTreeMap<ObjectKey, Option<Service>>,
        inputs: ServiceInputs,
        stats: &mut CacheStats,
        delta: &mut Delta,
    ) {
        if inputs != self.inputs {
            changed.extend(self.services.keys().cloned());
            self.inputs = inputs;
            self.state.node_addresses = self.inputs.node_addresses.clone();
        }
        changed.extend(objects.keys().cloned());
        let before = self.group(changed.iter().filter(|k| self.services.contains_key(*k)));
        for key in &before {
            self.take_out(key, delta);
        }
        for key in &changed {
            let object = match objects.remove(key) {
                Some(object) => object,
                None => self.services.get(key).map(|e| Service::clone(&e.service)),
            };
            self.recompile(key, object, stats);
        }
        let after = self.group(
            before
                .iter()
                .chain(&changed)
                .filter(|k| self.services.contains_key(*k)),
        );
        // The changed ones contribute nothing now: they were taken out with `before`.
        for key in after.difference(&before) {
            if !changed.contains(key) {
                self.take_out(key, delta);
            }
        }
        let mut rest = after.clone();
        while let Some(key) = rest.pop_first() {
            let group = self.group(std::iter::once(&key));
            if group.len() > 1 {
                stats.services_contested += group.len();
                self.settle_group(&group);
            } else if let Some(entry) = self.services.get_mut(&key) {
                entry.settled = None;
            }
            for key in &group {
                rest.remove(key);
            }
        }
        for key in &after {
            self.put_in(key, delta);
        }
        stats.services_reused = self.services.len().saturating_sub(stats.services_compiled);
    }

    /// The Services that share a claim with those of `seeds`, transitively, in order.
    fn group<'a>(&self, seeds: impl Iterator<Item = &'a ObjectKey>) -> BTreeSet<ObjectKey> {
        let mut group: BTreeSet<ObjectKey> = BTreeSet::new();
        let mut queue: VecDeque<ObjectKey> = seeds.cloned().collect();
        while let Some(key) = queue.pop_front() {
            if !group.insert(key.clone()) {
                continue;
            }
            let Some(entry) = self.services.get(&key) else {
                continue;
            };
            for claim in &entry.claims {
                for other in self.claimed.get(claim).into_iter().flatten() {
                    if !group.contains(other) {
                        queue.push_back(other.clone());
                    }
                }
            }
        }
        group
    }

    /// Compiles the Service `key` alone again (`object`), or forgets it (None).
    fn recompile(&mut self, key: &ObjectKey, object: Option<Service>, stats: &mut CacheStats) {
        if let Some(old) = self.services.remove(key) {
            self.count_claims(key, &old.claims, false);
        }
        let Some(service) = object else {
            return;
        };
        stats.services_compiled += 1;
        let mut compilation = self.inputs.compilation();
        let slices = self.slices_for(key);
        let object = ObjectRef::new(ObjectKind::Service, &key.0, &key.1);
        compilation.service(&object, &service, &slices, self.inputs.balancing);
        let claims: Vec<Claim> = compilation
            .vip_owners
            .keys()
            .map(|&vip| Claim::ClusterIp(vip))
            .chain(
                compilation
                    .frontend_owners
                    .keys()
                    .map(|&k| Claim::Frontend(k)),
            )
            .chain(
                compilation
                    .state
                    .health_checks
                    .keys()
                    .map(|&p| Claim::HealthCheck(p)),
            )
            .collect();
        self.count_claims(key, &claims, true);
        let entry = ServiceEntry {
            service: Box::new(service),
            alone: Box::new(Fragment {
                state: compilation.state,
                problems: compilation.problems,
            }),
            claims,
            settled: None,
            seen: 0,
        };
        self.services.insert(key.clone(), entry);
    }

    fn count_claims(&mut self, key: &ObjectKey, claims: &[Claim], add: bool) {
        for claim in claims {
            if add {
                self.claimed.entry(*claim).or_default().insert(key.clone());
            } else if let Some(keys) = self.claimed.get_mut(claim) {
                keys.remove(key);
                if keys.is_empty() {
                    self.claimed.remove(claim);
                }
            }
        }
    }

    /// The slices of the Service `key`, by name.
    fn slices_for(&self, key: &ObjectKey) -> Vec<&EndpointSlice> {
        self.slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| self.slices.get(&(key.0.clone(), name.clone())))
            .map(|entry| &*entry.slice)
            .collect()
    }

    /// Compiles the Services of `group` together in order, keeping what each contributes.
    fn settle_group(&mut self, group: &BTreeSet<ObjectKey>) {
        let mut compilation = self.inputs.compilation();
        let mut settled = Vec::new();
        for key in group {
            let Some(entry) = self.services.get(key) else {
                continue;
            };
            let known: BTreeSet<u16> = compilation.state.health_checks.keys().copied().collect();
            let object = ObjectRef::new(ObjectKind::Service, &key.0, &key.1);
            let slices = self.slices_for(key);
            compilation.service(&object, &entry.service, &slices, self.inputs.balancing);
            let mut state = std::mem::take(&mut compilation.state);
            // The ports claimed so far stay, for the next Services' checks.
            compilation.state.health_checks = state.health_checks.clone();
            state.health_checks.retain(|port, _| !known.contains(port));
            let problems = std::mem::take(&mut compilation.problems);
            settled.push((key.clone(), Fragment { state, problems }));
        }
        for (key, fragment) in settled {
            if let Some(entry) = self.services.get_mut(&key) {
                entry.settled = Some(Box::new(fragment));
            }
        }
    }

    /// Takes what the Service `key` contributes out of the state.
    fn take_out(&mut self, key: &ObjectKey, delta: &mut Delta) {
        let Some(entry) = self.services.get(key) else {
            return;
        };
        let fragment = entry.settled.as_ref().unwrap_or(&entry.alone);
        let (state, from) = (&mut self.state, &fragment.state);
        for k in from.services.keys() {
            touched(&mut delta.services, *k, state.services.remove(k));
        }
        for k in from.maglev.keys() {
            touched(&mut delta.maglev, *k, state.maglev.remove(k));
        }
        for k in from.source_ranges.keys() {
            touched(&mut delta.source_ranges, *k, state.source_ranges.remove(k));
        }
        for port in from.health_checks.keys() {
            state.health_checks.remove(port);
        }
        for k in from.backends.keys() {
            if let Some(n) = self.backend_refs.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.backend_refs.remove(k);
                    touched(&mut delta.backends, *k, state.backends.remove(k));
                }
            }
        }
        for frontend in &from.frontends {
            let range = frontend_range(&state.frontends, frontend);
            if let Some(at) = state.frontends[range.clone()]
                .iter()
                .position(|f| f == frontend)
            {
                state.frontends.remove(range.start + at);
            }
        }
        for (line, _) in fragment.problems.iter() {
            if let Some((_, n)) = self.problem_refs.get_mut(line) {
                *n -= 1;
                if *n == 0 {
                    self.problem_refs.remove(line);
                }
            }
        }
    }

    /// Puts what the Service `key` contributes into the state.
    fn put_in(&mut self, key: &ObjectKey, delta: &mut Delta) {
        let Some(entry) = self.services.get(key) else {
            return;
        };
        let fragment = entry.settled.as_ref().unwrap_or(&entry.alone);
        let (state, from) = (&mut self.state, &fragment.state);
        for (k, v) in &from.services {
            touched(&mut delta.services, *k, state.services.insert(*k, *v));
        }
        for (k, v) in &from.maglev {
            touched(&mut delta.maglev, *k, state.maglev.insert(*k, v.clone()));
        }
        for (k, v) in &from.source_ranges {
            touched(
                &mut delta.source_ranges,
                *k,
                state.source_ranges.insert(*k, *v),
            );
        }
        for (port, check) in &from.health_checks {
            state.health_checks.insert(*port, check.clone());
        }
        for (k, v) in &from.backends {
            let n = self.backend_refs.entry(*k).or_default();
            *n += 1;
            if *n == 1 {
                touched(&mut delta.backends, *k, state.backends.insert(*k, *v));
            }
        }
        for frontend in &from.frontends {
            let range = frontend_range(&state.frontends, frontend);
            state.frontends.insert(range.end, frontend.clone());
        }
        for (line, problem) in fragment.problems.iter() {
            self.problem_refs
                .entry(line.clone())
                .or_insert_with(|| (problem.clone(), 0))
                .1 += 1;
        }
    }

    /// Replaces the part that does not read Services with `workloads`.
    pub(super) fn put_workloads(
        &mut self,
        workloads: Workloads,
        nodes: NodeIndex,
        delta: &mut Delta,
    ) {
        self.node_index = Some(nodes);
        let Workloads {
            state: new,
            problems,
            index,
        } = workloads;
        self.workload_index = index;
        let state = &mut self.state;
        differences(&mut delta.endpoints, &state.endpoints, &new.endpoints);
        differences(&mut delta.ipcache, &state.ipcache, &new.ipcache);
        differences(&mut delta.policies, &state.policies, &new.policies);
        state.endpoints = new.endpoints;
        state.interfaces = new.interfaces;
        state.nodes = new.nodes;
        state.ipcache = new.ipcache;
        state.policies = new.policies;
        state.identities = new.identities;
        state.endpoint_details = new.endpoint_details;
        self.workload_problems = problems;
    }

    /// Compiles the Namespaces, Nodes, NetworkPolicies and then the Pods of `changes` in
    /// place (see `policy::PodIndex`, `policy::PolicyIndex`, [`NodeIndex`]), and with
    /// `endpoints` the local endpoints of `snapshot` on `node`, returning
    /// how many identities a Namespace relabel renamed, or says [`NotInPlace`] when one
    /// moves more; the part must then be compiled whole (what was changed before is in
    /// `delta`).
    pub(super) fn put_in_place(
        &mut self,
        snapshot: &Snapshot,
        changes: &Changes,
        endpoints: bool,
        node: &NodeContext,
        delta: &mut Delta,
    ) -> Result<usize, NotInPlace> {
        let put = self.try_in_place(snapshot, changes, endpoints, node, delta);
        if put.is_err() {
            self.workload_index = None;
            self.node_index = None;
        }
        put
    }

    fn try_in_place(
        &mut self,
        snapshot: &Snapshot,
        changes: &Changes,
        endpoints: bool,
        node: &NodeContext,
        delta: &mut Delta,
    ) -> Result<usize, NotInPlace> {
        let index = self.workload_index.as_mut().ok_or(NotInPlace)?;
        let nodes = self.node_index.as_mut().ok_or(NotInPlace)?;
        if changes.workloads {
            return Err(NotInPlace);
        }
        let mut moved = BTreeSet::new();
        for (name, node) in &changes.nodes {
            if nodes.put(name, node.as_ref())? {
                moved.insert(name.clone());
            }
        }
        if !moved.is_empty() {
            let this = &self.node.node;
            index.put_nodes(snapshot, this, &moved, &mut self.state, delta)?;
            self.workload_problems = index.policies.problems();
        }
        let mut renamed = 0;
        for (name, namespace) in &changes.namespaces {
            renamed += index.put_namespace(name, namespace.as_ref(), &mut self.state, delta)?;
            self.workload_problems = index.policies.problems();
        }
        if !changes.network_policies.is_empty() {
            let policies = &changes.network_policies;
            index
                .policies
                .put(policies, &mut index.pods, &mut self.state, delta)?;
            self.workload_problems = index.policies.problems();
        }
        for (key, pod) in &changes.pods {
            let moved = index.pods.put(
                key,
                pod.as_ref(),
                &self.state.nodes,
                &mut self.state.ipcache,
                &mut delta.ipcache,
                index.policies.can_follow(),
            )?;
            if !moved.is_empty() {
                index.policies.follow(moved, &mut self.state, delta);
                self.workload_problems = index.policies.problems();
            }
        }
        if endpoints {
            index.put_endpoints(snapshot, node, &mut self.state, delta)?;
            self.workload_problems = index.policies.problems();
        }
        Ok(renamed)
    }

    /// Sets the state's problems: the Services' and the workloads', by line.
    pub(super) fn gather_problems(&mut self) {
        let mut lines: BTreeMap<&String, &Problem> = self
            .problem_refs
            .iter()
            .map(|(line, (problem, _))| (line, problem))
            .collect();
        lines.extend(self.workload_problems.iter());
        self.state.problems = lines.into_values().cloned().collect();
    }
}

/// Where frontends sorted as the full compile sorts them (by address, port and protocol)
/// hold those with the key of `frontend`.
fn frontend_range(frontends: &[Frontend], frontend: &Frontend) -> std::ops::Range<usize> {
    let key = |f: &Frontend| (f.address, f.port, f.protocol);
    let start = frontends.partition_point(|f| key(f) < key(frontend));
    let end = frontends.partition_point(|f| key(f) <= key(frontend));
    start..end
}
