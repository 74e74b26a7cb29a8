//! `lab.json`: everything a later CLI call needs to continue the lab, and the cluster state
//! (`cluster.json`) derived from it.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{
            Namespace, Node, NodeAddress, NodeSpec as KubeNodeSpec, NodeStatus, Pod, PodCondition,
            PodIP, PodStatus, Service,
        },
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_store::{LocalEndpoint, Snapshot, nodes::ZONE_LABEL};

use crate::{
    LabError,
    error::io_err,
    slices,
    spec::{LabSpec, NodeSpec},
};

/// Namespaces every lab has from `lab up` on.
pub const BUILTIN_NAMESPACES: &[&str] = &["default", "kube-system"];

/// The current time as Kubernetes timestamps it (jiff is built without `std` here, so no
/// `Timestamp::now`).
pub fn now() -> Time {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX);
    Time(Timestamp::new(seconds, 0).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// `namespace/name`, the key of every namespaced object.
pub fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// An object as the lab keeps it, with what the user last applied (kubectl's
/// last-applied-configuration), which decides "unchanged" against "configured".
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stored<T> {
    /// `None` for objects the lab made itself (the built-in namespaces).
    pub applied: Option<Value>,
    pub object: T,
}

/// A pod the lab runs: its object (metadata and spec) and where it lives.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    /// Metadata and spec; the status is derived from the fields below.
    pub pod: Pod,
    pub node: String,
    pub ip: Ipv4Addr,
    /// Host-side veth in the node's network namespace.
    pub interface: String,
    pub netns: String,
    /// Creation order, so a scale-down removes the newest pods.
    pub seq: u64,
    pub owner: Option<Owner>,
    /// What the user applied, for pods that are not part of a Deployment.
    pub applied: Option<Value>,
    /// The pod server has bound every containerPort.
    pub ready: bool,
    /// Set when the pod is being removed: it is terminating until every agent has realized it.
    pub deleting: Option<Time>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    /// `namespace/name` of the Deployment.
    pub deployment: String,
    pub template_hash: String,
}

impl PodRecord {
    pub fn namespace(&self) -> &str {
        self.pod.metadata.namespace.as_deref().unwrap_or("default")
    }

    pub fn name(&self) -> &str {
        self.pod.metadata.name.as_deref().unwrap_or_default()
    }

    /// TCP and UDP containerPorts (default TCP), each once.
    pub fn ports(&self) -> (Vec<u16>, Vec<u16>) {
        let (mut tcp, mut udp) = (Vec::new(), Vec::new());
        let ports = self
            .pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.as_deref().unwrap_or_default());
        for port in ports {
            let Ok(number) = u16::try_from(port.container_port) else {
                continue;
            };
            let list = match slices::protocol(port.protocol.as_ref()) {
                "TCP" => &mut tcp,
                "UDP" => &mut udp,
                // SCTP has no server in the lab.
                _ => continue,
            };
            if !list.contains(&number) {
                list.push(number);
            }
        }
        (tcp, udp)
    }

    /// The full Pod object, with the status a kubelet would report.
    pub fn object(&self, host_ip: Ipv4Addr) -> Pod {
        let mut pod = self.pod.clone();
        pod.metadata.deletion_timestamp = self.deleting.clone();
        let ready = self.ready && self.deleting.is_none();
        let condition = |type_: &str, status: bool| PodCondition {
            type_: type_.into(),
            status: if status { "True" } else { "False" }.into(),
            last_transition_time: pod.metadata.creation_timestamp.clone(),
            ..Default::default()
        };
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(self.ip.to_string()),
            pod_ips: Some(vec![PodIP {
                ip: self.ip.to_string(),
            }]),
            host_ip: Some(host_ip.to_string()),
            start_time: pod.metadata.creation_timestamp.clone(),
            conditions: Some(vec![
                condition("PodScheduled", true),
                condition("Initialized", true),
                condition("ContainersReady", ready),
                condition("Ready", ready),
            ]),
            ..Default::default()
        });
        pod
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabState {
    pub name: String,
    pub spec: LabSpec,
    /// Whether every node runs an agent; without, changes need not wait for one.
    pub agents: bool,
    /// Generation of the last `cluster.json` written.
    pub generation: u64,
    pub next_seq: u64,
    pub namespaces: BTreeMap<String, Stored<Namespace>>,
    pub deployments: BTreeMap<String, Stored<Deployment>>,
    /// With their ClusterIP filled in.
    pub services: BTreeMap<String, Stored<Service>>,
    /// Only the ones the user applied; the others are derived.
    pub endpoint_slices: BTreeMap<String, Stored<EndpointSlice>>,
    pub network_policies: BTreeMap<String, Stored<NetworkPolicy>>,
    pub pods: BTreeMap<String, PodRecord>,
}

impl LabState {
    pub fn new(name: &str, spec: LabSpec, agents: bool) -> Self {
        let namespaces = BUILTIN_NAMESPACES
            .iter()
            .map(|ns| {
                let object = namespace_object(ns, &ObjectMeta::default());
                (
                    ns.to_string(),
                    Stored {
                        applied: None,
                        object,
                    },
                )
            })
            .collect();
        Self {
            name: name.to_string(),
            spec,
            agents,
            generation: 0,
            next_seq: 0,
            namespaces,
            deployments: BTreeMap::new(),
            services: BTreeMap::new(),
            endpoint_slices: BTreeMap::new(),
            network_policies: BTreeMap::new(),
            pods: BTreeMap::new(),
        }
    }

    pub fn read(path: &Path) -> Result<Self, LabError> {
        let data = fs::read(path).map_err(io_err("read", path))?;
        serde_json::from_slice(&data).map_err(|source| LabError::State {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes through a temporary file and a rename, so a crash never leaves half a file.
    pub fn write(&self, path: &Path) -> Result<(), LabError> {
        let data = serde_json::to_vec_pretty(self).map_err(|source| LabError::State {
            path: path.to_path_buf(),
            source,
        })?;
        let tmp = path.with_extension("json.tmp");
        let mut f = fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&data).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("rename", PathBuf::from(path)))
    }

    /// The node's InternalIP, a pod's hostIP.
    pub fn node_ip(&self, node: &str) -> Ipv4Addr {
        self.spec
            .node(node)
            .map_or(Ipv4Addr::UNSPECIFIED, |n| n.internal_ip())
    }

    pub fn pod_objects(&self) -> Vec<Pod> {
        self.pods
            .values()
            .map(|p| p.object(self.node_ip(&p.node)))
            .collect()
    }

    /// Derived slices of every Service with a selector, then the user's.
    pub fn endpoint_slices(&self, pods: &[Pod]) -> Vec<EndpointSlice> {
        let derived = self
            .services
            .values()
            .flat_map(|s| slices::derive(&s.object, pods, &self.spec.nodes));
        let user = self.endpoint_slices.values().map(|s| s.object.clone());
        derived.chain(user).collect()
    }

    /// What the agents read.
    pub fn snapshot(&self) -> Snapshot {
        let pods = self.pod_objects();
        Snapshot {
            revision: self.generation,
            nodes: self.spec.nodes.iter().map(node_object).collect(),
            namespaces: self.namespaces.values().map(|n| n.object.clone()).collect(),
            endpoint_slices: self
                .endpoint_slices(&pods)
                .into_iter()
                .map(std::sync::Arc::new)
                .collect(),
            pods: pods.into_iter().map(Into::into).collect(),
            services: self.services.values().map(|s| s.object.clone()).collect(),
            network_policies: self
                .network_policies
                .values()
                .map(|p| p.object.clone())
                .collect(),
            endpoints: self
                .pods
                .values()
                .map(|p| LocalEndpoint {
                    node: p.node.clone(),
                    namespace: p.namespace().to_string(),
                    pod: p.name().to_string(),
                    interface: p.interface.clone(),
                    addresses: [p.ip.into()].into(),
                })
                .collect(),
            cluster_cidr: Some(self.spec.cluster_cidr),
        }
    }

    /// Every network namespace the lab's state names.
    pub fn netns_names(&self) -> Vec<String> {
        let nodes = self
            .spec
            .nodes
            .iter()
            .map(|n| crate::names::node_netns(&self.name, &n.name));
        let world = self
            .spec
            .world
            .iter()
            .map(|w| crate::names::world_netns(&self.name, &w.name));
        let underlay = self
            .spec
            .underlay
            .map(|_| crate::names::underlay_netns(&self.name));
        let router = self
            .spec
            .has_router()
            .then(|| crate::names::router_netns(&self.name));
        nodes
            .chain(world)
            .chain(underlay)
            .chain(router)
            .chain(self.pods.values().map(|p| p.netns.clone()))
            .collect()
    }
}

/// A Node as a Kubernetes source provides it: its pod CIDR, its zone label, and its
/// InternalIP (the underlay address, or in a lab without an underlay the router address
/// its pods use as gateway).
pub(crate) fn node_object(node: &NodeSpec) -> Node {
    let pod_cidr = node.pod_cidr.to_string();
    Node {
        metadata: ObjectMeta {
            name: Some(node.name.clone()),
            labels: node
                .zone
                .as_ref()
                .map(|zone| [(ZONE_LABEL.to_string(), zone.clone())].into()),
            ..Default::default()
        },
        spec: Some(KubeNodeSpec {
            pod_cidr: Some(pod_cidr.clone()),
            pod_cidrs: Some(vec![pod_cidr]),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: node.internal_ip().to_string(),
            }]),
            ..Default::default()
        }),
    }
}

/// A Namespace as the API server stores it: with its `kubernetes.io/metadata.name` label,
/// which namespace selectors of NetworkPolicies rely on.
pub fn namespace_object(name: &str, meta: &ObjectMeta) -> Namespace {
    let mut metadata = meta.clone();
    metadata.name = Some(name.to_string());
    metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("kubernetes.io/metadata.name".into(), name.to_string());
    Namespace {
        metadata,
        ..Default::default()
    }
}
