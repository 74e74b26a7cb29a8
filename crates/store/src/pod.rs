//! A Pod as the agent keeps it: the fields the compiler, the CNI plugin's IPAM and the
//! sources read, nothing else. At GKE's limits the stores hold 200,000 Pods; a
//! k8s-openapi `Pod` is kilobytes even with every optional field empty (its spec, status
//! and metadata are large inline structs), so a cluster's worth of them would not fit the
//! agent's memory budget. This one is a pointer: clones (the source's store, each
//! snapshot, change sets, the compile cache's inputs) share one allocation, and the parts
//! many pods have alike (label sets, namespaces, nodes, container ports) are interned.
//!
//! Its JSON form is the Kubernetes Pod's (it converts at the edge), so cluster files and
//! tests written as Kubernetes objects stay valid.

use std::{
    borrow::Borrow,
    collections::HashSet,
    hash::Hash,
    net::IpAddr,
    sync::{Arc, LazyLock, Mutex, PoisonError},
};

use k8s_openapi::{
    api::core::v1 as k8s,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde::{Deserialize, Serialize};

use crate::selector::Labels;

/// One Pod; cloning it shares it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "k8s::Pod", into = "k8s::Pod")]
pub struct Pod(Arc<Fields>);

#[derive(Debug, PartialEq, Eq)]
struct Fields {
    name: Option<Box<str>>,
    namespace: Option<Arc<str>>,
    /// With `resource_version`, what the incremental compile keys on.
    uid: Option<Box<str>>,
    resource_version: Option<Box<str>>,
    /// Set once the pod is terminating: the lab's snapshots show pods leaving by it.
    deletion_timestamp: Option<Time>,
    labels: Option<Arc<Labels>>,
    node_name: Option<Arc<str>>,
    host_network: Option<bool>,
    /// Containers with a named port, and only those ports: named ports are what
    /// policies name.
    containers: Arc<[Container]>,
    phase: Option<Arc<str>>,
    /// `status.podIP`; an address that does not parse is none.
    pod_ip: Option<IpAddr>,
}

/// A container's named ports.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Container {
    pub name: Box<str>,
    pub ports: Box<[NamedPort]>,
}

/// A containerPort with a name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NamedPort {
    pub name: Box<str>,
    pub protocol: Option<String>,
    pub container_port: i32,
}

impl Pod {
    pub fn name(&self) -> Option<&str> {
        self.0.name.as_deref()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.0.namespace.as_deref()
    }

    pub fn uid(&self) -> Option<&str> {
        self.0.uid.as_deref()
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.0.resource_version.as_deref()
    }

    /// `metadata.deletionTimestamp`: set while the pod terminates.
    pub fn deletion_timestamp(&self) -> Option<&Time> {
        self.0.deletion_timestamp.as_ref()
    }

    pub fn labels(&self) -> Option<&Labels> {
        self.0.labels.as_deref()
    }

    /// `spec.nodeName`.
    pub fn node_name(&self) -> Option<&str> {
        self.0.node_name.as_deref()
    }

    /// `spec.hostNetwork`.
    pub fn host_network(&self) -> Option<bool> {
        self.0.host_network
    }

    pub fn containers(&self) -> &[Container] {
        &self.0.containers
    }

    /// `status.phase`.
    pub fn phase(&self) -> Option<&str> {
        self.0.phase.as_deref()
    }

    /// `status.podIP`.
    pub fn pod_ip(&self) -> Option<IpAddr> {
        self.0.pod_ip
    }
}

impl From<k8s::Pod> for Pod {
    fn from(pod: k8s::Pod) -> Self {
        let meta = pod.metadata;
        let (node_name, host_network, containers) = match pod.spec {
            Some(spec) => {
                let containers: Vec<Container> = spec
                    .containers
                    .into_iter()
                    .filter_map(|c| {
                        let ports: Box<[NamedPort]> = c
                            .ports
                            .into_iter()
                            .flatten()
                            .filter_map(|p| {
                                Some(NamedPort {
                                    name: p.name?.into(),
                                    protocol: p.protocol,
                                    container_port: p.container_port,
                                })
                            })
                            .collect();
                        (!ports.is_empty()).then(|| Container {
                            name: c.name.into(),
                            ports,
                        })
                    })
                    .collect();
                (spec.node_name, spec.host_network, containers)
            }
            None => (None, None, Vec::new()),
        };
        let (phase, pod_ip) = match pod.status {
            Some(status) => (status.phase, status.pod_ip),
            None => (None, None),
        };
        Self(Arc::new(Fields {
            name: meta.name.map(Into::into),
            namespace: meta.namespace.as_deref().map(|n| intern_str(&NAMES, n)),
            uid: meta.uid.map(Into::into),
            resource_version: meta.resource_version.map(Into::into),
            deletion_timestamp: meta.deletion_timestamp,
            labels: meta
                .labels
                .map(|l| intern(&LABEL_SETS, &l, || Arc::new(l.clone()))),
            node_name: node_name.as_deref().map(|n| intern_str(&NAMES, n)),
            host_network,
            containers: intern(&CONTAINERS, containers.as_slice(), || {
                Arc::from(containers.as_slice())
            }),
            phase: phase.as_deref().map(|p| intern_str(&NAMES, p)),
            pod_ip: pod_ip.and_then(|ip| ip.parse().ok()),
        }))
    }
}

impl From<Pod> for k8s::Pod {
    fn from(pod: Pod) -> Self {
        let f = &pod.0;
        let containers: Vec<k8s::Container> = f
            .containers
            .iter()
            .map(|c| k8s::Container {
                name: c.name.to_string(),
                ports: Some(
                    c.ports
                        .iter()
                        .map(|p| k8s::ContainerPort {
                            name: Some(p.name.to_string()),
                            protocol: p.protocol.clone(),
                            container_port: p.container_port,
                            ..k8s::ContainerPort::default()
                        })
                        .collect(),
                ),
                ..k8s::Container::default()
            })
            .collect();
        let spec = (f.node_name.is_some() || f.host_network.is_some() || !containers.is_empty())
            .then(|| k8s::PodSpec {
                node_name: f.node_name.as_deref().map(str::to_owned),
                host_network: f.host_network,
                containers,
                ..k8s::PodSpec::default()
            });
        let status = (f.phase.is_some() || f.pod_ip.is_some()).then(|| k8s::PodStatus {
            phase: f.phase.as_deref().map(str::to_owned),
            pod_ip: f.pod_ip.map(|ip| ip.to_string()),
            ..k8s::PodStatus::default()
        });
        k8s::Pod {
            metadata: ObjectMeta {
                name: f.name.as_deref().map(str::to_owned),
                namespace: f.namespace.as_deref().map(str::to_owned),
                uid: f.uid.as_deref().map(str::to_owned),
                resource_version: f.resource_version.as_deref().map(str::to_owned),
                deletion_timestamp: f.deletion_timestamp.clone(),
                labels: f.labels.as_deref().cloned(),
                ..ObjectMeta::default()
            },
            spec,
            status,
        }
    }
}

/// Values many pods share, each kept once while some pod holds it. The table is global
/// so that every holder of pods (each source, the lab, tests) shares one copy; entries
/// nobody else holds are dropped whenever the table has doubled since the last sweep, so
/// it stays proportional to what is live.
struct Interned<T: ?Sized> {
    values: HashSet<Arc<T>>,
    sweep_at: usize,
}

type Table<T> = LazyLock<Mutex<Interned<T>>>;

const FIRST_SWEEP: usize = 1024;

static LABEL_SETS: Table<Labels> = LazyLock::new(Interned::table);
static NAMES: Table<str> = LazyLock::new(Interned::table);
static CONTAINERS: Table<[Container]> = LazyLock::new(Interned::table);

impl<T: ?Sized + Hash + Eq> Interned<T> {
    fn table() -> Mutex<Self> {
        Mutex::new(Self {
            values: HashSet::new(),
            sweep_at: FIRST_SWEEP,
        })
    }
}

/// The shared copy of `value`, made by `make` if there is none.
fn intern<T, Q>(table: &Table<T>, value: &Q, make: impl FnOnce() -> Arc<T>) -> Arc<T>
where
    T: ?Sized + Hash + Eq,
    Q: ?Sized + Hash + Eq,
    Arc<T>: Borrow<Q>,
{
    // A panic while the lock was held left the set whole (inserts and sweeps do not
    // unwind midway through a value), so a poisoned lock is still usable.
    let mut table = table.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(shared) = table.values.get(value) {
        return Arc::clone(shared);
    }
    if table.values.len() >= table.sweep_at {
        table.values.retain(|v| Arc::strong_count(v) > 1);
        table.sweep_at = (table.values.len() * 2).max(FIRST_SWEEP);
    }
    let shared = make();
    table.values.insert(Arc::clone(&shared));
    shared
}

fn intern_str(table: &Table<str>, value: &str) -> Arc<str> {
    intern(table, value, || Arc::from(value))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test")]

    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_pod_keeps_what_the_agent_reads_and_shares_what_pods_have_alike() {
        let a = pod(serde_json::json!({
            "metadata": {"name": "a", "namespace": "web", "uid": "u1", "resourceVersion": "7",
                         "labels": {"app": "web"}, "annotations": {"x": "y"}},
            "spec": {"nodeName": "node-1", "containers": [
                {"name": "app", "image": "nginx", "ports": [
                    {"name": "http", "containerPort": 80, "protocol": "TCP"},
                    {"containerPort": 9090}]},
                {"name": "sidecar", "image": "envoy"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "hostIP": "172.16.0.1"},
        }));
        let b = pod(serde_json::json!({
            "metadata": {"name": "b", "namespace": "web", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-1", "containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}]}]},
            "status": {"podIP": "not an address"},
        }));
        assert_eq!(
            (a.name(), a.namespace(), a.uid(), a.resource_version()),
            (Some("a"), Some("web"), Some("u1"), Some("7"))
        );
        assert_eq!(a.pod_ip(), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(b.pod_ip(), None);
        assert_eq!(
            (a.phase(), a.node_name()),
            (Some("Running"), Some("node-1"))
        );
        assert_eq!(a.containers().len(), 1, "only containers with named ports");
        assert_eq!(a.containers()[0].ports.len(), 1, "only named ports");
        assert!(Arc::ptr_eq(
            a.0.labels.as_ref().unwrap(),
            b.0.labels.as_ref().unwrap()
        ));
        assert!(Arc::ptr_eq(&a.0.containers, &b.0.containers));

        // As JSON it is a Kubernetes Pod, and reads back the same.
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["spec"]["containers"][0]["ports"][0]["name"], "http");
        assert_eq!(json["metadata"].get("annotations"), None);
        assert_eq!(pod(json), a);
        eprintln!(
            "a Pod: {} bytes, {} behind its pointer",
            std::mem::size_of::<Pod>(),
            std::mem::size_of::<Fields>()
        );
    }
}
