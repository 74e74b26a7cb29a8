//! The incremental compile: [`CompileCache::compile`] returns exactly what [`crate::compile`]
//! returns for the same input, recomputing only what changed since the last call.
//!
//! - Each Service is compiled on its own (a *fragment*), keyed by the Service, its
//!   EndpointSlices and the node inputs every Service reads (name, addresses, zone,
//!   balancing). A fragment records what it claims: its ClusterIP, its frontends and its
//!   healthCheckNodePort.
//! - The cross-Service step is settled on every call, in the full compile's order (by
//!   namespace and name): a Service none of whose claims another Service makes is what it
//!   is alone, so its fragment is taken as is; the Services that share a claim are
//!   compiled again in that order, so which one keeps the address and what is reported is
//!   the full compile's.
//! - The part that does not read Services (endpoints, nodes, identities, ipcache, policy)
//!   is kept whole, keyed by pods, namespaces, policies, nodes, the cluster CIDR, local
//!   endpoints and the node context.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use k8s_openapi::{
    Metadata,
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use sluice_common::Lb4Key;
use sluice_store::{LocalEndpoint, Snapshot};

use crate::{
    Balancing, Compilation, DesiredState, NodeContext, ObjectKind, ObjectRef, Workloads,
    backends::slices_by_service, compile_workloads, services_in_order, slices_of,
};

/// What the last [`CompileCache::compile`] recomputed, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Services compiled because they, their slices or the node inputs changed.
    pub services_compiled: usize,
    /// Services whose fragment was reused.
    pub services_reused: usize,
    /// Services compiled again in order because another Service claims one of their
    /// addresses or ports.
    pub services_contested: usize,
    /// Whether the part that does not read Services was recomputed.
    pub workloads_compiled: bool,
}

/// The per-Service and the workload results of the previous compiles.
#[derive(Default)]
pub struct CompileCache {
    /// The node inputs the cached fragments were compiled with.
    inputs: Option<ServiceInputs>,
    /// Namespace -> name -> the Service's entry.
    services: HashMap<String, HashMap<String, Box<ServiceEntry>>>,
    /// How many Services claim each address: one claimed twice is settled in order.
    claimed: HashMap<Claim, u32>,
    /// Numbers the calls, to find the entries of Services gone since the last.
    pass: u64,
    workloads: Option<(WorkloadInputs, Workloads)>,
    stats: CacheStats,
}

/// What every Service's compile reads of the node.
#[derive(Clone, PartialEq, Eq)]
struct ServiceInputs {
    node: String,
    node_addresses: Vec<Ipv4Addr>,
    zone: Option<String>,
    balancing: Balancing,
}

/// One Service as last compiled alone (its fragment), and what it claims.
struct ServiceEntry {
    service: Service,
    slices: Vec<EndpointSlice>,
    fragment: Compilation,
    claims: Vec<Claim>,
    /// The last pass whose snapshot held the Service.
    seen: u64,
}

/// What two Services cannot both hold: the first in order keeps it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Claim {
    ClusterIp(Ipv4Addr),
    Frontend(Lb4Key),
    HealthCheck(u16),
}

/// The inputs of [`compile_workloads`], as last compiled.
struct WorkloadInputs {
    nodes: Vec<Version<Node>>,
    cluster_cidr: Option<Ipv4Net>,
    namespaces: Vec<Version<Namespace>>,
    pods: Vec<Version<Pod>>,
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
            pods: versions(&snapshot.pods),
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
            && holds(&self.pods, &snapshot.pods)
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

impl CompileCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// What the last [`Self::compile`] recomputed.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// The desired state of `node` from `snapshot`: equal to `crate::compile(snapshot,
    /// node)`, problems included.
    pub fn compile(&mut self, snapshot: &Snapshot, node: &NodeContext) -> DesiredState {
        let mut stats = CacheStats::default();
        let mut assembly = Compilation::for_services(snapshot, node);
        let inputs = ServiceInputs {
            node: node.node.clone(),
            node_addresses: assembly.node_addresses.clone(),
            zone: assembly.zone.clone(),
            balancing: node.balancing,
        };
        if self.inputs.as_ref() != Some(&inputs) {
            self.services.clear();
            self.claimed.clear();
            self.inputs = Some(inputs.clone());
        }
        let slices = slices_by_service(snapshot);
        let ordered = services_in_order(snapshot, &mut assembly.problems);
        self.pass += 1;
        for &(namespace, name, service) in &ordered {
            let service_slices = slices_of(&slices, namespace, name);
            if self.refresh(&inputs, namespace, name, service, service_slices) {
                stats.services_compiled += 1;
            } else {
                stats.services_reused += 1;
            }
        }
        self.forget_unseen();
        // In the full compile's order: the first Service to claim an address keeps it.
        for (namespace, name, service) in ordered {
            let Some(entry) = self.services.get(namespace).and_then(|n| n.get(name)) else {
                continue;
            };
            if entry.claims.iter().any(|c| self.claimed.get(c) > Some(&1)) {
                stats.services_contested += 1;
                let object = ObjectRef::new(ObjectKind::Service, namespace, name);
                let service_slices = slices_of(&slices, namespace, name);
                assembly.service(&object, service, service_slices, node.balancing);
            } else {
                assembly.take(&entry.fragment);
            }
        }

        let workloads = match self.workloads.take() {
            Some((inputs, workloads)) if inputs.matches(snapshot, node) => (inputs, workloads),
            _ => {
                stats.workloads_compiled = true;
                (
                    WorkloadInputs::of(snapshot, node),
                    compile_workloads(snapshot, node),
                )
            }
        };
        let state = assembly.finish(workloads.1.clone());
        self.workloads = Some(workloads);
        self.stats = stats;
        state
    }

    /// Marks the Service seen in this pass, compiling it again unless its entry holds it
    /// with `slices`; returns whether it compiled.
    fn refresh(
        &mut self,
        inputs: &ServiceInputs,
        namespace: &str,
        name: &str,
        service: &Service,
        slices: &[&EndpointSlice],
    ) -> bool {
        if !self.services.contains_key(namespace) {
            self.services.insert(namespace.to_string(), HashMap::new());
        }
        let Some(names) = self.services.get_mut(namespace) else {
            return false;
        };
        if let Some(entry) = names.get_mut(name)
            && entry.holds(service, slices)
        {
            entry.seen = self.pass;
            return false;
        }
        let mut entry = Box::new(ServiceEntry::compile(inputs, service, slices));
        entry.seen = self.pass;
        count(&mut self.claimed, &entry.claims, true);
        if let Some(old) = names.insert(name.to_string(), entry) {
            count(&mut self.claimed, &old.claims, false);
        }
        true
    }

    /// Drops the entries of Services not in this pass's snapshot, with their claims.
    fn forget_unseen(&mut self) {
        let (pass, claimed) = (self.pass, &mut self.claimed);
        for names in self.services.values_mut() {
            names.retain(|_, entry| {
                if entry.seen != pass {
                    count(claimed, &entry.claims, false);
                }
                entry.seen == pass
            });
        }
        self.services.retain(|_, names| !names.is_empty());
    }
}

/// Counts `claims` in (`add`) or out of `claimed`.
fn count(claimed: &mut HashMap<Claim, u32>, claims: &[Claim], add: bool) {
    for claim in claims {
        if add {
            *claimed.entry(*claim).or_default() += 1;
        } else if let Some(n) = claimed.get_mut(claim) {
            *n -= 1;
            if *n == 0 {
                claimed.remove(claim);
            }
        }
    }
}

impl ServiceEntry {
    fn compile(inputs: &ServiceInputs, service: &Service, slices: &[&EndpointSlice]) -> Self {
        let mut compilation = Compilation {
            node: inputs.node.clone(),
            node_addresses: inputs.node_addresses.clone(),
            zone: inputs.zone.clone(),
            ..Compilation::default()
        };
        let namespace = crate::namespace_of(service.metadata.namespace.as_ref());
        let name = service.metadata.name.as_deref().unwrap_or_default();
        let object = ObjectRef::new(ObjectKind::Service, namespace, name);
        compilation.service(&object, service, slices, inputs.balancing);
        let claims = compilation
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
        Self {
            service: service.clone(),
            slices: slices.iter().map(|s| (*s).clone()).collect(),
            fragment: compilation,
            claims,
            seen: 0,
        }
    }

    /// Whether this entry was compiled from `service` with `slices`.
    fn holds(&self, service: &Service, slices: &[&EndpointSlice]) -> bool {
        same(&self.service, service)
            && self.slices.len() == slices.len()
            && self.slices.iter().zip(slices).all(|(a, b)| same(a, b))
    }
}

impl Compilation {
    /// Adds what `fragment`, one Service compiled alone that claims nothing another
    /// Service claims, contributes.
    fn take(&mut self, fragment: &Compilation) {
        let state = &fragment.state;
        extend(&mut self.state.services, &state.services);
        extend(&mut self.state.backends, &state.backends);
        extend(&mut self.state.maglev, &state.maglev);
        extend(&mut self.state.source_ranges, &state.source_ranges);
        extend(&mut self.state.health_checks, &state.health_checks);
        self.state.frontends.extend(state.frontends.iter().cloned());
        self.problems.extend(&fragment.problems);
    }
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

fn extend<K: Ord + Clone, V: Clone>(into: &mut BTreeMap<K, V>, from: &BTreeMap<K, V>) {
    into.extend(from.iter().map(|(k, v)| (k.clone(), v.clone())));
}
