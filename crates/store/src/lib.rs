//! The store: every desired object an agent works from, in one immutable [`Snapshot`].
//!
//! Sources (the lab's cluster file today, kube-rs watchers later) produce snapshots; the
//! compiler reads them. Objects are the Kubernetes API types (Pods a compact [`Pod`] of
//! sluice's own, written as Kubernetes Pods), so a snapshot is what an API server would
//! serve, plus [`LocalEndpoint`]s, which on a real node come from the CNI
//! plugin rather than the API.

use std::{
    collections::BTreeSet,
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::Arc,
};

use ipnet::Ipv4Net;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use serde::{Deserialize, Serialize};

pub mod nodes;
pub mod pod;
pub mod selector;

pub use pod::Pod;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{call} {path}: {source}")]
    Io {
        call: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("encoding snapshot: {0}")]
    Encode(serde_json::Error),
}

/// A pod network interface that the CNI plugin (in the lab: the lab itself) attached on a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalEndpoint {
    pub node: String,
    pub namespace: String,
    pub pod: String,
    /// Host-side veth in the node's network namespace.
    pub interface: String,
    /// The pod's addresses on that interface: one IPv4 today, IPv6 beside it later.
    pub addresses: BTreeSet<IpAddr>,
}

impl LocalEndpoint {
    /// The endpoint's IPv4 address, the one the datapath enforces; the lowest if several.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.addresses.iter().find_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }
}

/// Everything the agent should make true.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// The source's own revision of these objects (the lab's generation), opaque to the
    /// agent: it reports the revision it last realized so the writer can wait for it. The
    /// agent numbers the snapshots it accepts with generations of its own.
    #[serde(default)]
    pub revision: u64,
    /// Nodes with their addresses (status.addresses) and pod CIDRs (spec.podCIDR): the
    /// compiler maps this node's addresses to the host identity and the others' to
    /// remote-node, and routes every other node's pods to its InternalIP.
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// The cluster's pod network (kubeadm's `networking.podSubnet`, the lab file's
    /// `clusterCIDR`): every node's pod CIDR must lie inside. None: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_cidr: Option<Ipv4Net>,
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub pods: Vec<Pod>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// Shared, not copied, between snapshots and the compile cache: at GKE's limits
    /// their 260,000 endpoints are the largest part after the Pods.
    #[serde(default)]
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    #[serde(default)]
    pub network_policies: Vec<NetworkPolicy>,
    #[serde(default)]
    pub endpoints: Vec<LocalEndpoint>,
}

impl Snapshot {
    pub fn read_file(path: &Path) -> Result<Self, StoreError> {
        let data = fs::read(path).map_err(|source| StoreError::Io {
            call: "read",
            path: path.into(),
            source,
        })?;
        serde_json::from_slice(&data).map_err(|source| StoreError::Parse {
            path: path.into(),
            source,
        })
    }

    /// Writes through a temporary file and a rename, so a reader never sees half a snapshot.
    pub fn write_file(&self, path: &Path) -> Result<(), StoreError> {
        let data = serde_json::to_vec_pretty(self).map_err(StoreError::Encode)?;
        let tmp = path.with_extension("tmp");
        let io = |call: &'static str| {
            let tmp = tmp.clone();
            move |source| StoreError::Io {
                call,
                path: tmp,
                source,
            }
        };
        let mut f = fs::File::create(&tmp).map_err(io("create"))?;
        f.write_all(&data).map_err(io("write"))?;
        f.sync_all().map_err(io("fsync"))?;
        fs::rename(&tmp, path).map_err(|source| StoreError::Io {
            call: "rename",
            path: path.into(),
            source,
        })
    }

    /// Endpoints attached on `node`.
    pub fn endpoints_on<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a LocalEndpoint> + 'a {
        self.endpoints.iter().filter(move |e| e.node == node)
    }
}

/// `namespace/name` of any object, for messages and lookups.
pub fn object_ref(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}
