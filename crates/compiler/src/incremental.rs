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
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
    },
};
use sluice_common::Lb4Key;
use sluice_store::{LocalEndpoint, Snapshot};

use crate::{
    Balancing, Compilation, DesiredState, NodeContext, ObjectKind, ObjectRef, Workloads,
    backends::slices_by_service, compile_workloads, services_in_order,
    slices_of,
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
    services: HashMap<(String, String), ServiceEntry>,
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

/// One Service as last compiled alone.
struct ServiceEntry {
    service: Service,
    slices: Vec<EndpointSlice>,
    fragment: Fragment,
}

/// What one Service compiled alone contributes, and what it claims.
struct Fragment {
    compilation: Compilation,
    claims: Vec<Claim>,
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
    nodes: Vec<Node>,
    cluster_cidr: Option<Ipv4Net>,
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    network_policies: Vec<NetworkPolicy>,
    endpoints: Vec<LocalEndpoint>,
    node: NodeContext,
}

impl WorkloadInputs {
    fn of(snapshot: &Snapshot, node: &NodeContext) -> Self {
        Self {
            nodes: snapshot.nodes.clone(),
            cluster_cidr: snapshot.cluster_cidr,
            namespaces: snapshot.namespaces.clone(),
            pods: snapshot.pods.clone(),
            network_policies: snapshot.network_policies.clone(),
            endpoints: snapshot.endpoints.clone(),
            node: node.clone(),
        }
    }

    fn matches(&self, snapshot: &Snapshot, node: &NodeContext) -> bool {
        self.node == *node
            && self.cluster_cidr == snapshot.cluster_cidr
            && self.nodes == snapshot.nodes
            && self.namespaces == snapshot.namespaces
            && self.endpoints == snapshot.endpoints
            && self.network_policies == snapshot.network_policies
            && self.pods == snapshot.pods
    }
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
            self.inputs = Some(inputs.clone());
        }
        let slices = slices_by_service(snapshot);
        let ordered = services_in_order(snapshot, &mut assembly.problems);
        let mut cached = std::mem::take(&mut self.services);
        for &(namespace, name, service) in &ordered {
            let key = (namespace.to_string(), name.to_string());
            let service_slices = slices_of(&slices, namespace, name);
            let entry = match cached.remove(&key) {
                Some(entry) if entry.holds(service, service_slices) => {
                    stats.services_reused += 1;
                    entry
                }
                _ => {
                    stats.services_compiled += 1;
                    ServiceEntry::compile(&inputs, service, service_slices)
                }
            };
            self.services.insert(key, entry);
        }
        // Dropped with `cached`: the Services gone from the snapshot.
        drop(cached);

        let mut claimed: HashMap<Claim, u32> = HashMap::new();
        for entry in self.services.values() {
            for claim in &entry.fragment.claims {
                *claimed.entry(*claim).or_default() += 1;
            }
        }
        for (namespace, name, service) in ordered {
            let key = (namespace.to_string(), name.to_string());
            let Some(entry) = self.services.get(&key) else {
                continue;
            };
            let contested = entry.fragment.claims.iter().any(|c| claimed[c] > 1);
            if contested {
                stats.services_contested += 1;
                let object = ObjectRef::new(ObjectKind::Service, namespace, name);
                let service_slices = slices_of(&slices, namespace, name);
                assembly.service(&object, service, service_slices, node.balancing);
            } else {
                assembly.take(&entry.fragment.compilation);
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
            .chain(compilation.frontend_owners.keys().map(|&k| Claim::Frontend(k)))
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
            fragment: Fragment {
                compilation,
                claims,
            },
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

