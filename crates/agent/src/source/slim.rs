//! What the Kubernetes source keeps of each object: the fields the compiler, the CNI
//! plugin's IPAM and the source's own checks read, nothing else. At GKE's limits the
//! stores hold 200,000 Pods; kept whole (container specs, conditions, owner references,
//! container statuses) they would not fit the agent's memory budget, slimmed they cost a
//! few hundred bytes each. Applied to every object before it enters a store. A Pod is
//! kept as [`sluice_store::Pod`], which holds only those fields and shares its copies.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, NodeSpec, NodeStatus, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use sluice_compiler::SERVICE_ANNOTATIONS;
use sluice_store::nodes::ZONE_LABEL;

/// Drops what nothing in the agent reads.
pub(super) trait Slim {
    fn slim(&mut self);
}

/// What a store keeps of an object as the API serves it.
pub(super) trait Keep {
    type Kept;
    fn keep(self) -> Self::Kept;
}

macro_rules! kept_slimmed {
    ($($kind:ty),*) => {$(
        impl Keep for $kind {
            type Kept = $kind;
            fn keep(mut self) -> $kind {
                self.slim();
                self
            }
        }
    )*};
}

kept_slimmed!(Node, Namespace, Service, NetworkPolicy);

/// Shared between the snapshots and the compile cache.
impl Keep for EndpointSlice {
    type Kept = Arc<EndpointSlice>;
    fn keep(mut self) -> Arc<EndpointSlice> {
        self.slim();
        Arc::new(self)
    }
}

/// Labels feed identities; host network, node, named container ports, phase and
/// address feed policy and the ipcache.
impl Keep for Pod {
    type Kept = sluice_store::Pod;
    fn keep(self) -> sluice_store::Pod {
        self.into()
    }
}

/// `snapshot`'s objects as the Kubernetes source stores them: what a test compares the
/// source's store with, when the same objects came whole from elsewhere (the lab). Its
/// Pods are kept as the source keeps them already.
pub fn slimmed(mut snapshot: sluice_store::Snapshot) -> sluice_store::Snapshot {
    fn each<T: Slim>(objects: &mut [T]) {
        objects.iter_mut().for_each(Slim::slim);
    }
    each(&mut snapshot.nodes);
    each(&mut snapshot.namespaces);
    each(&mut snapshot.services);
    snapshot
        .endpoint_slices
        .iter_mut()
        .for_each(|s| Arc::make_mut(s).slim());
    each(&mut snapshot.network_policies);
    snapshot
}

/// Name, namespace, the uid and resourceVersion the incremental compile keys on, and the
/// labels and annotations `keep` admits.
fn meta(meta: &mut ObjectMeta, labels: impl Fn(&str) -> bool, annotations: impl Fn(&str) -> bool) {
    let keep = |map: Option<BTreeMap<String, String>>, admit: &dyn Fn(&str) -> bool| {
        map.map(|m| {
            m.into_iter()
                .filter(|(k, _)| admit(k))
                .collect::<BTreeMap<_, _>>()
        })
        .filter(|m| !m.is_empty())
    };
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        labels: keep(meta.labels.take(), &labels),
        annotations: keep(meta.annotations.take(), &annotations),
        ..ObjectMeta::default()
    };
}

fn all(_: &str) -> bool {
    true
}

fn none(_: &str) -> bool {
    false
}

/// Its zone label, pod CIDR and addresses.
impl Slim for Node {
    fn slim(&mut self) {
        meta(&mut self.metadata, |k| k == ZONE_LABEL, none);
        self.spec = self.spec.take().map(|spec| NodeSpec {
            pod_cidr: spec.pod_cidr,
            ..NodeSpec::default()
        });
        self.status = self.status.take().map(|status| NodeStatus {
            addresses: status.addresses,
            ..NodeStatus::default()
        });
    }
}

/// Its labels, which policies' namespace selectors match.
impl Slim for Namespace {
    fn slim(&mut self) {
        meta(&mut self.metadata, all, none);
        self.spec = None;
        self.status = None;
    }
}

/// The spec and status the compiler reads nearly whole (the selector aside: backends
/// come from EndpointSlices), and the annotations it reads.
impl Slim for Service {
    fn slim(&mut self) {
        meta(&mut self.metadata, none, |k| {
            SERVICE_ANNOTATIONS.contains(&k)
        });
        if let Some(spec) = self.spec.as_mut() {
            spec.selector = None;
        }
    }
}

/// Labels name the Service; endpoints keep addresses, conditions, node, zone and hints.
impl Slim for EndpointSlice {
    fn slim(&mut self) {
        meta(&mut self.metadata, all, none);
        for endpoint in &mut self.endpoints {
            endpoint.target_ref = None;
            endpoint.hostname = None;
            endpoint.deprecated_topology = None;
        }
    }
}

impl Slim for NetworkPolicy {
    fn slim(&mut self) {
        meta(&mut self.metadata, none, none);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test")]

    use std::collections::BTreeSet;

    use serde::de::DeserializeOwned;
    use sluice_compiler::{NodeContext, compile};
    use sluice_fake_apiserver::cluster::{self, LOCAL_NODE, Shape};
    use sluice_store::{LocalEndpoint, Snapshot};

    use super::*;

    fn objects<K: DeserializeOwned + Slim>(values: Vec<serde_json::Value>, slim: bool) -> Vec<K> {
        values
            .into_iter()
            .map(|v| {
                let mut o: K = serde_json::from_value(v).unwrap();
                if slim {
                    o.slim();
                }
                o
            })
            .collect()
    }

    /// A generated cluster (realistic objects: container specs, conditions, owner
    /// references) and its local endpoints, whole or slimmed.
    fn snapshot(shape: &Shape, slim: bool) -> Snapshot {
        let services = 0..shape.services;
        Snapshot {
            nodes: objects((0..shape.nodes).map(cluster::node).collect(), slim),
            namespaces: objects(
                (0..shape.namespaces)
                    .map(|i| cluster::namespace(shape, i))
                    .collect(),
                slim,
            ),
            pods: (0..shape.pods)
                .map(|p| serde_json::from_value(cluster::pod(shape, p, 0)).unwrap())
                .collect(),
            services: objects(
                services
                    .clone()
                    .map(|s| cluster::service(shape, s))
                    .collect(),
                slim,
            ),
            endpoint_slices: objects::<EndpointSlice>(
                services
                    .flat_map(|s| cluster::endpoint_slices(shape, s, false))
                    .collect(),
                slim,
            )
            .into_iter()
            .map(Arc::new)
            .collect(),
            network_policies: objects(
                (0..shape.network_policies)
                    .map(|i| cluster::network_policy(shape, i))
                    .collect(),
                slim,
            ),
            endpoints: (0..shape.local_pods)
                .map(|p| {
                    let (namespace, pod) = shape
                        .pod_key(p)
                        .split_once('/')
                        .map(|(n, p)| (n.to_owned(), p.to_owned()))
                        .unwrap();
                    LocalEndpoint {
                        node: LOCAL_NODE.into(),
                        namespace,
                        pod,
                        interface: format!("lxc{p}"),
                        addresses: BTreeSet::from([shape.pod_address(p, 0).into()]),
                    }
                })
                .collect(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn slimmed_objects_compile_to_the_same_maps_as_whole_ones() {
        let shape = Shape::tiny();
        let node = NodeContext {
            node: LOCAL_NODE.into(),
            interfaces: (0..shape.local_pods)
                .map(|p| (format!("lxc{p}"), 100 + p as u32))
                .collect(),
            ..NodeContext::default()
        };
        let whole = snapshot(&shape, false);
        let slim = snapshot(&shape, true);
        let compiled = compile(&slim, &node);
        assert!(!compiled.policies.is_empty() && !compiled.services.is_empty());
        assert_eq!(compile(&whole, &node), compiled);

        // Whole: the objects as generated (the snapshot's Pods are kept compact already).
        let size = |s: &Snapshot| serde_json::to_vec(s).unwrap().len();
        let pods = |s: &Snapshot| serde_json::to_vec(&s.pods).unwrap().len();
        let generated: Vec<_> = (0..shape.pods)
            .map(|p| cluster::pod(&shape, p, 0))
            .collect();
        let before = size(&whole) - pods(&whole) + serde_json::to_vec(&generated).unwrap().len();
        let after = size(&slim);
        eprintln!("the tiny cluster as JSON: {before} bytes whole, {after} slimmed");
        assert!(after * 2 < before, "{after} of {before}");
    }
}
