//! What the CNI plugin asks the agent: an address for a new pod interface (the agent owns
//! IPAM: it knows the node's `spec.podCIDR`), that the wired interface be policed, whether
//! a recorded one still is, its removal, and whether the agent can take pods at all.

use std::{net::Ipv4Addr, time::Duration};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Names one attachment, as the runtime does: `CNI_CONTAINERID` and `CNI_IFNAME`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CniAttachment {
    pub container_id: String,
    pub ifname: String,
}

/// `ADD`, first step: record the attachment and give it an address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAddRequest {
    #[serde(flatten)]
    pub attachment: CniAttachment,
    /// `CNI_NETNS`: the pod's network namespace.
    pub netns: String,
    /// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` of `CNI_ARGS`: the Pod object whose labels
    /// give the endpoint its identity.
    pub namespace: String,
    pub pod: String,
    /// The host-side veth the plugin will make, in the node's namespace.
    pub interface: String,
}

/// An attachment the agent recorded (and persisted under its `--state-dir`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniEndpoint {
    #[serde(flatten)]
    pub attachment: CniAttachment,
    pub netns: String,
    pub namespace: String,
    pub pod: String,
    pub interface: String,
    /// From the node's pod CIDR.
    pub address: Ipv4Addr,
}

/// The answer to the first step of `ADD`: the endpoint and how to wire it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAllocation {
    pub endpoint: CniEndpoint,
    /// The node's pod CIDR the address comes from.
    pub pod_cidr: Ipv4Net,
    /// The node's router address (the pod CIDR's first): the pod's gateway.
    pub router: Ipv4Addr,
    /// The pod's MTU; None keeps the veth default.
    pub mtu: Option<u32>,
    /// How long the agent will wait for the endpoint to be realized once it is wired
    /// (`--cni-add-timeout`): the plugin waits a little longer for the answer.
    pub attach_timeout: Duration,
}

/// The answer to `ADD`'s second step and to `CHECK`: the endpoint and whether its policy
/// is in the kernel with the datapath attached to its interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniEndpointState {
    pub endpoint: CniEndpoint,
    /// The agent's generation that realized it; None when it is not realized (any more).
    pub realized_generation: Option<u64>,
}

/// The answer to `DEL`: the endpoint removed, None if the agent had none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniRemoved {
    pub endpoint: Option<CniEndpoint>,
}

/// Whether the agent can take new pods (`STATUS`), and if not, why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniStatus {
    pub ready: bool,
    /// Why it cannot: no pass realized yet, no pod CIDR on its Node, no free address.
    pub reason: Option<String>,
    pub pod_cidr: Option<Ipv4Net>,
    /// Addresses of the pod CIDR in use by recorded endpoints.
    pub allocated: usize,
    /// Addresses the pod CIDR has for pods in all.
    pub capacity: usize,
}
