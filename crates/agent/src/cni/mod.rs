//! The agent's side of `sluice-cni`: IPAM from this node's `spec.podCIDR`, the endpoint
//! registry the reconcile loop compiles beside every snapshot, and the wait that makes `ADD`
//! return only once the new endpoint's policy is in the kernel.
//!
//! A pod's identity comes from its Pod object. If the source has not delivered it yet
//! (a watch a little behind the kubelet), `ADD` waits for it, up to `--cni-add-timeout`,
//! and then refuses: an endpoint admitted without its Pod would get an identity without
//! labels, and a policy selecting it by label would miss its first packets.

mod registry;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use arc_swap::ArcSwap;
use ipnet::Ipv4Net;
pub use registry::{LocalEndpoints, Registry, STATE_FILE};
use sluice_api::cni::{
    CniAddRequest, CniAllocation, CniAttachment, CniEndpoint, CniEndpointState, CniRemoved,
    CniStatus,
};
use sluice_store::{Snapshot, nodes::check_nodes};
use tokio::sync::watch;
use tracing::info;

use crate::{AgentError, routing::RoutingConfig, views::Published};

/// `--state-dir` and `--cni-add-timeout`.
#[derive(Clone, Debug)]
pub struct CniConfig {
    /// Where the registry (and so every IPAM allocation) is kept across restarts.
    pub state_dir: PathBuf,
    /// How long `ADD` waits for the endpoint's policy to be realized (and for its Pod
    /// object, if the source lacks it).
    pub add_timeout: Duration,
}

impl Default for CniConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/sluice"),
            add_timeout: Duration::from_secs(20),
        }
    }
}

/// What the API's CNI routes work with.
pub struct Cni {
    registry: Arc<Mutex<Registry>>,
    published: Arc<ArcSwap<Published>>,
    /// Changes whenever the loop publishes.
    changes: watch::Receiver<()>,
    routing: RoutingConfig,
    add_timeout: Duration,
}

impl Cni {
    pub fn new(
        registry: Registry,
        published: Arc<ArcSwap<Published>>,
        changes: watch::Receiver<()>,
        routing: RoutingConfig,
        add_timeout: Duration,
    ) -> Self {
        Self {
            registry: Arc::new(Mutex::new(registry)),
            published,
            changes,
            routing,
            add_timeout,
        }
    }

    /// Records the attachment with an address from the node's pod CIDR.
    pub async fn add(&self, request: CniAddRequest) -> Result<CniAllocation, AgentError> {
        check_request(&request)?;
        let state = self.published.load_full();
        let (pod_cidr, router) = pod_network(&state)?;
        let taken = taken_addresses(&state, pod_cidr);
        let (registry, routing) = (Arc::clone(&self.registry), self.routing.clone());
        let attach_timeout = self.add_timeout;
        tokio::task::spawn_blocking(move || {
            let mtu = routing.pod_mtu()?;
            let endpoint = lock(&registry).add(&request, pod_cidr, &taken)?;
            info!(container = %endpoint.attachment.container_id, pod = %format!("{}/{}", endpoint.namespace, endpoint.pod),
                  interface = %endpoint.interface, address = %endpoint.address, "CNI endpoint added");
            Ok(CniAllocation {
                endpoint,
                pod_cidr,
                router,
                mtu,
                attach_timeout,
            })
        })
        .await?
    }

    /// The plugin has wired the endpoint's veth: compiles again and answers once a
    /// generation with the endpoint, its Pod object and its interface is realized.
    pub async fn attached(
        &self,
        attachment: CniAttachment,
    ) -> Result<CniEndpointState, AgentError> {
        let recorded = attachment.clone();
        let endpoint = self
            .registry(move |registry| {
                let endpoint = registry.get(&recorded).cloned();
                registry.republish();
                endpoint
            })
            .await?
            .ok_or_else(|| unknown(&attachment))?;
        let mut changes = self.changes.clone();
        let mut including = None;
        let waited = tokio::time::timeout(self.add_timeout, async {
            loop {
                changes.borrow_and_update();
                let state = self.published.load_full();
                if including.is_none() && includes(&state, &endpoint) {
                    including = Some(state.desired_generation);
                }
                if let Some(generation) = including
                    && state.realized_generation >= generation
                    && policed(&state, &endpoint)
                {
                    return Ok::<_, AgentError>(state.realized_generation);
                }
                changes.changed().await.map_err(|_| AgentError::Stopped)?;
            }
        })
        .await;
        match waited {
            Ok(generation) => Ok(CniEndpointState {
                endpoint,
                realized_generation: Some(generation?),
            }),
            Err(_) => Err(AgentError::CniTimeout {
                after: self.add_timeout,
                waiting: self.missing(&endpoint),
            }),
        }
    }

    /// What an `ADD` that timed out still waited for.
    fn missing(&self, endpoint: &CniEndpoint) -> String {
        let state = self.published.load_full();
        if !has_pod(&state.snapshot, endpoint) {
            return format!(
                "Pod {}/{}: the agent's source does not know it, so the endpoint would have no identity",
                endpoint.namespace, endpoint.pod
            );
        }
        let last_error = state
            .last_error
            .as_deref()
            .map(|e| format!(" (last reconcile error: {e})"))
            .unwrap_or_default();
        format!(
            "the policy of interface {} to be realized{last_error}",
            endpoint.interface
        )
    }

    /// The recorded endpoint, and whether its policy is realized now.
    pub async fn check(&self, attachment: CniAttachment) -> Result<CniEndpointState, AgentError> {
        let recorded = attachment.clone();
        let endpoint = self
            .registry(move |registry| registry.get(&recorded).cloned())
            .await?
            .ok_or_else(|| unknown(&attachment))?;
        let state = self.published.load_full();
        let realized = includes(&state, &endpoint) && policed(&state, &endpoint);
        Ok(CniEndpointState {
            endpoint,
            realized_generation: realized.then_some(state.realized_generation),
        })
    }

    /// Removes the attachment, if recorded, and frees its address.
    pub async fn del(&self, attachment: CniAttachment) -> Result<CniRemoved, AgentError> {
        let removed = self
            .registry(move |registry| registry.remove(&attachment))
            .await??;
        if let Some(endpoint) = &removed {
            info!(container = %endpoint.attachment.container_id, interface = %endpoint.interface,
                  address = %endpoint.address, "CNI endpoint deleted");
        }
        Ok(CniRemoved { endpoint: removed })
    }

    /// Every recorded attachment.
    pub async fn endpoints(&self) -> Result<Vec<CniEndpoint>, AgentError> {
        self.registry(|registry| registry.endpoints().cloned().collect())
            .await
    }

    /// Writes the registry's file again if it was removed behind the agent's back; returns
    /// its path then.
    pub async fn restore_state(&self) -> Result<Option<std::path::PathBuf>, AgentError> {
        self.registry(|registry| registry.restore()).await?
    }

    /// Whether the agent can take a new pod: a pass realized, a pod CIDR, a free address.
    pub async fn status(&self) -> Result<CniStatus, AgentError> {
        let state = self.published.load_full();
        let allocated = self.registry(|registry| registry.allocated()).await?;
        let network = pod_network(&state);
        let pod_cidr = network.as_ref().ok().map(|(cidr, _)| *cidr);
        let capacity = pod_cidr.map_or(0, registry::capacity);
        let reason = if state.realized_generation == 0 {
            Some("no snapshot realized yet".to_string())
        } else if let Err(e) = &network {
            Some(e.to_string())
        } else if allocated >= capacity {
            pod_cidr.map(|pod_cidr| AgentError::CniPoolExhausted { pod_cidr }.to_string())
        } else {
            None
        };
        Ok(CniStatus {
            ready: reason.is_none(),
            reason,
            pod_cidr,
            allocated,
            capacity,
        })
    }

    /// Runs `f` on the registry on the blocking pool: a change writes and fsyncs its file
    /// under the lock, which no runtime thread may wait for.
    async fn registry<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Registry) -> T + Send + 'static,
    ) -> Result<T, AgentError> {
        let registry = Arc::clone(&self.registry);
        Ok(tokio::task::spawn_blocking(move || f(&mut lock(&registry))).await?)
    }
}

fn lock(registry: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    // A panic while it was held left the last committed state: it is consistent.
    registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unknown(attachment: &CniAttachment) -> AgentError {
    AgentError::CniUnknown {
        container_id: attachment.container_id.clone(),
        ifname: attachment.ifname.clone(),
    }
}

/// A request the registry can record: every name given, the host interface one the
/// kernel takes.
fn check_request(request: &CniAddRequest) -> Result<(), AgentError> {
    let fields = [
        ("container_id", &request.attachment.container_id),
        ("ifname", &request.attachment.ifname),
        ("netns", &request.netns),
        ("namespace", &request.namespace),
        ("pod", &request.pod),
    ];
    if let Some((field, _)) = fields.iter().find(|(_, value)| value.is_empty()) {
        return Err(AgentError::CniRefused(format!("{field} is empty")));
    }
    check_interface(&request.interface)
}

/// An interface name the kernel takes: 1 to 15 bytes, no slash, space or colon.
fn check_interface(name: &str) -> Result<(), AgentError> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name.contains(['/', ' ', ':', '\0']);
    if bad {
        return Err(AgentError::CniRefused(format!(
            "interface: {name:?} is no interface name (1 to 15 bytes, no '/', ' ' or ':')"
        )));
    }
    Ok(())
}

/// This node's pod CIDR and router address, from its Node object as routing judges it.
fn pod_network(state: &Published) -> Result<(Ipv4Net, Ipv4Addr), AgentError> {
    let checked = check_nodes(&state.snapshot.nodes, state.snapshot.cluster_cidr);
    if let Some(fault) = checked.faults.iter().find(|f| f.node == state.name) {
        return Err(AgentError::CniNotReady(format!(
            "Node {}: {fault}",
            state.name
        )));
    }
    let node = checked
        .nodes
        .into_iter()
        .find(|n| n.name == state.name)
        .ok_or_else(|| {
            AgentError::CniNotReady(format!("no Node {} in the source yet", state.name))
        })?;
    match (node.pod_cidr, node.router()) {
        (Some(cidr), Some(router)) => Ok((cidr, router)),
        _ => Err(AgentError::CniNotReady(format!(
            "Node {}: spec.podCIDR is not set",
            state.name
        ))),
    }
}

/// Addresses of `pod_cidr` the snapshot and the registry's endpoints as last published
/// give to pods or endpoints: IPAM skips them (the registry checks its own).
fn taken_addresses(state: &Published, pod_cidr: Ipv4Net) -> BTreeSet<Ipv4Addr> {
    let snapshot = &state.snapshot;
    let pods = snapshot.pods.iter().filter_map(|p| match p.pod_ip()? {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    });
    let endpoints = snapshot
        .endpoints
        .iter()
        .chain(state.endpoints.iter())
        .filter_map(|e| e.ipv4());
    pods.chain(endpoints)
        .filter(|a| pod_cidr.contains(a))
        .collect()
}

fn has_pod(snapshot: &Snapshot, endpoint: &CniEndpoint) -> bool {
    snapshot.pods.iter().any(|p| {
        p.namespace().unwrap_or("default") == endpoint.namespace
            && p.name() == Some(endpoint.pod.as_str())
    })
}

/// Whether a published state holds the endpoint (from the registry) and its Pod object.
fn includes(state: &Published, endpoint: &CniEndpoint) -> bool {
    has_pod(&state.snapshot, endpoint)
        && state
            .snapshot
            .endpoints_on(&state.name)
            .chain(state.endpoints.iter().filter(|e| e.node == state.name))
            .any(|e| {
                e.interface == endpoint.interface
                    && e.addresses.contains(&IpAddr::V4(endpoint.address))
            })
}

/// Whether the last realized state holds the endpoint on its interface's current ifindex:
/// its policy map and flags are in the kernel and the datapath is attached there.
fn policed(state: &Published, endpoint: &CniEndpoint) -> bool {
    let Ok(ifindex) = nix::net::if_::if_nametoindex(endpoint.interface.as_str()) else {
        return false;
    };
    state.desired.interfaces.contains(&endpoint.interface)
        && state
            .desired
            .endpoints
            .get(&ifindex)
            .is_some_and(|info| info.ip() == endpoint.address)
}
