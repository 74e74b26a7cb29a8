//! The agent's local API: HTTP/1.1 with JSON bodies on the agent's Unix socket.
//!
//! One route per question ([`routes`]); requests with parameters carry them as typed query
//! structs ([`EndpointQuery`], [`IdentityQuery`]) or JSON bodies ([`VerifyRequest`],
//! [`flow::ObserveRequest`]); answers are the types below, and a refused request answers
//! an error status with an [`ErrorBody`]. `observe` answers a chunked stream of flows, one
//! JSON object per line. The agent serves it with axum; [`Client`] is its blocking client
//! for the CLI and the lab, on hyper.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
pub use sluice_common::kinds::{
    BackendState, CountedBy, CtFlag, CtScope, Direction, DriftKind, EndpointStatus, FrontendKind,
    LbAlgorithm, Protocol, RowState, RuleOrigin, ServiceKind,
};

mod client;
pub mod cni;
pub mod explain;
pub mod flow;

pub use client::{ApiError, Client, FlowStream, scrape};

/// The paths the agent serves, one per question.
pub mod routes {
    /// GET: [`AgentStatus`](super::AgentStatus).
    pub const STATUS: &str = "/v1/status";
    /// GET: `Vec<`[`ServiceEntry`](super::ServiceEntry)`>`.
    pub const SERVICES: &str = "/v1/services";
    /// GET: `Vec<`[`CtEntry`](super::CtEntry)`>`.
    pub const CONNTRACK: &str = "/v1/conntrack";
    /// POST [`VerifyRequest`](super::VerifyRequest): [`VerifyReport`](super::VerifyReport).
    pub const VERIFY: &str = "/v1/verify";
    /// GET: `Vec<`[`EndpointEntry`](super::EndpointEntry)`>`.
    pub const ENDPOINTS: &str = "/v1/endpoints";
    /// GET ?[`EndpointQuery`](super::EndpointQuery): [`EndpointEntry`](super::EndpointEntry).
    pub const ENDPOINT: &str = "/v1/endpoint";
    /// GET: `Vec<`[`IdentityEntry`](super::IdentityEntry)`>`.
    pub const IDENTITIES: &str = "/v1/identities";
    /// GET ?[`IdentityQuery`](super::IdentityQuery): [`IdentityEntry`](super::IdentityEntry).
    pub const IDENTITY: &str = "/v1/identity";
    /// GET ?[`EndpointQuery`](super::EndpointQuery):
    /// [`EndpointPolicyView`](super::EndpointPolicyView).
    pub const POLICY: &str = "/v1/policy";
    /// GET ?[`ExplainRequest`](super::explain::ExplainRequest):
    /// [`PolicyExplanation`](super::explain::PolicyExplanation).
    pub const POLICY_EXPLAIN: &str = "/v1/policy/explain";
    /// POST [`ObserveRequest`](super::flow::ObserveRequest): flows as JSON lines, ending when
    /// the buffered ones are sent or, with `follow`, when the client hangs up.
    pub const OBSERVE: &str = "/v1/observe";
    /// POST [`CniAddRequest`](super::cni::CniAddRequest):
    /// [`CniAllocation`](super::cni::CniAllocation).
    pub const CNI_ADD: &str = "/v1/cni/add";
    /// POST [`CniAttachment`](super::cni::CniAttachment), once its veth is wired: answers
    /// [`CniEndpointState`](super::cni::CniEndpointState) when its policy is realized.
    pub const CNI_ATTACHED: &str = "/v1/cni/attached";
    /// POST [`CniAttachment`](super::cni::CniAttachment):
    /// [`CniEndpointState`](super::cni::CniEndpointState).
    pub const CNI_CHECK: &str = "/v1/cni/check";
    /// POST [`CniAttachment`](super::cni::CniAttachment): [`CniRemoved`](super::cni::CniRemoved).
    pub const CNI_DEL: &str = "/v1/cni/del";
    /// GET: [`CniStatus`](super::cni::CniStatus).
    pub const CNI_STATUS: &str = "/v1/cni/status";
    /// GET: `Vec<`[`CniEndpoint`](super::cni::CniEndpoint)`>`, for the plugin's GC.
    pub const CNI_ENDPOINTS: &str = "/v1/cni/endpoints";
}

/// Content type of the `observe` stream: one JSON object per line.
pub const NDJSON: &str = "application/x-ndjson";

/// The body of every refused request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct VerifyRequest {
    /// Also write the desired content where it drifted.
    #[serde(default)]
    pub repair: bool,
}

/// Names a local endpoint: `namespace/pod`, a pod name unique on the node, or an ifindex.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointQuery {
    pub endpoint: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct IdentityQuery {
    pub id: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: String,
    pub version: String,
    /// False while the last reconcile failed; `last_error` says why.
    pub healthy: bool,
    /// The agent's number for the newest snapshot it accepted from its source.
    pub desired_generation: u64,
    /// Generation whose map content is in the kernel.
    pub realized_generation: u64,
    /// The source's own revision of the desired generation (the lab's generation).
    pub desired_revision: u64,
    /// The source's revision of the realized generation: what a writer waits for.
    pub realized_revision: u64,
    pub last_error: Option<String>,
    pub reconciles: u64,
    pub endpoints: usize,
    pub maps: Vec<MapStatus>,
    /// Endpoints whose policy does not fit their map: they drop new connections in every
    /// enforced direction until it does.
    #[serde(default)]
    pub fails_closed: Vec<FailsClosed>,
    /// Fields of programmed objects the datapath does not implement yet: each object is
    /// programmed without them, as `programmed` says.
    #[serde(default)]
    pub unsupported: Vec<UnsupportedField>,
    /// How this node carries pod traffic to the others.
    #[serde(default)]
    pub routing: RoutingStatus,
    /// The conntrack lifetimes the datapath and the garbage collector expire entries by.
    #[serde(default)]
    pub conntrack: Option<sluice_common::CtConfig>,
    /// How full conntrack is and what pressure cost it.
    #[serde(default)]
    pub conntrack_pressure: Option<CtPressure>,
    /// Faults found behind the agent's back and repaired (a pin removed, the API socket or
    /// the state directory removed), by fault and object, since the agent started.
    #[serde(default)]
    pub repaired: Vec<RepairedFault>,
    /// Flow events the datapath could not write because the ring buffer was full, since
    /// it was loaded: `observe`, the policy log and the flow metrics miss them.
    #[serde(default)]
    pub events_lost: u64,
}

/// A fault the agent repaired, and how often.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairedFault {
    pub fault: Fault,
    /// What it hit: a map's name, `links/<role>/<pin>`, the socket's or directory's path.
    pub object: String,
    pub count: u64,
}

/// What went missing behind the agent's back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// A pinned map or link was unlinked from bpffs: pinned again from the agent's fd.
    PinRemoved,
    /// The API socket file was removed or replaced: bound again.
    ApiSocketRemoved,
    /// The state directory or its CNI endpoint registry was removed: written again.
    StateRemoved,
}

impl Fault {
    pub const ALL: [Fault; 3] = [
        Fault::PinRemoved,
        Fault::ApiSocketRemoved,
        Fault::StateRemoved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fault::PinRemoved => "pin-removed",
            Fault::ApiSocketRemoved => "api-socket-removed",
            Fault::StateRemoved => "state-removed",
        }
    }
}

/// Conntrack under connection churn: the fill, what the garbage collector removed early to
/// keep established connections, and what the datapath found lost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CtPressure {
    pub entries: u64,
    pub max_entries: u32,
    /// The fill (entries over max_entries) from which the garbage collector removes closed
    /// and half-open TCP connections (`--ct-pressure-threshold`).
    pub threshold: f64,
    /// Closed and half-open entries the garbage collector removed under pressure since the
    /// agent started.
    pub removed_under_pressure: u64,
    /// TCP segments of live connections to a service that found their entry gone (evicted
    /// by the LRU, or removed), counted by the datapath since it was loaded; each went back
    /// to its backend by the flow hash.
    pub service_entries_lost: u64,
}

/// The routing mode of pod traffic between nodes and the devices it uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingStatus {
    pub mode: sluice_common::RoutingMode,
    /// The VXLAN device (tunnel mode).
    pub tunnel_device: Option<String>,
    /// The device toward the other nodes (tunnel and native mode).
    pub underlay_device: Option<String>,
    /// With egress masquerading on, the prefixes pod traffic keeps its address to
    /// (nonMasqueradeCIDRs); None when it is off.
    #[serde(default)]
    pub non_masquerade_cidrs: Option<Vec<ipnet::Ipv4Net>>,
}

/// A field the compiler does not implement, on one object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsupportedField {
    /// `Service`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The field's path, such as `spec.sessionAffinity`.
    pub field: String,
    pub value: String,
    /// What is programmed without the field.
    pub programmed: String,
}

/// An endpoint whose computed policy needs more rows than its map may hold.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailsClosed {
    /// `namespace/pod`.
    pub endpoint: String,
    pub ifindex: u32,
    pub rows_needed: usize,
    pub map_max: u32,
}

/// A local endpoint with its identity and policy state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointEntry {
    /// ifindex of the host-side veth: the key of the endpoints and policy maps.
    pub ifindex: u32,
    pub namespace: String,
    pub pod: String,
    pub interface: String,
    pub ipv4: Ipv4Addr,
    pub identity: u32,
    /// Labels of the identity.
    pub labels: Vec<String>,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    /// Rows its policy needs.
    pub policy_rows: usize,
    pub policy_map_max: u32,
    /// NetworkPolicies (`namespace/name`) selecting it.
    pub policies: Vec<String>,
    /// `ready`, or `fails-closed` when its policy does not fit its map.
    pub status: EndpointStatus,
}

/// A security identity and the local endpoints that carry it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdentityEntry {
    pub id: u32,
    pub labels: Vec<String>,
    /// `namespace/pod` of local endpoints with this identity.
    pub endpoints: Vec<String>,
}

/// One endpoint's policy map as the kernel holds it, joined with the desired rows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointPolicyView {
    pub endpoint: EndpointEntry,
    /// max_entries of the installed map; None when no map is installed.
    pub map_max_entries: Option<u32>,
    pub rows: Vec<PolicyRow>,
}

/// An allow row.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyRow {
    pub direction: Direction,
    /// 0 (ANY) matches every peer.
    pub identity: u32,
    pub identity_labels: Vec<String>,
    pub protocol: Protocol,
    /// First and last destination port; None for any protocol.
    pub ports: Option<(u16, u16)>,
    /// LPM prefix length of the row: 40 any protocol, 48 any port, 64 one port.
    pub prefix: u32,
    /// Counters from the kernel: packets and bytes of the connections it admitted.
    pub packets: u64,
    pub bytes: u64,
    /// What allows it: NetworkPolicies (`namespace/name`) or the node itself
    /// (`reserved:host`).
    pub allowed_by: Vec<RuleOrigin>,
    pub state: RowState,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapStatus {
    pub name: String,
    pub entries: u64,
    pub max_entries: u32,
    /// How `entries` was counted: now, or as the agent last established it.
    #[serde(default)]
    pub counted_by: CountedBy,
    /// Seconds from that count to this answer (0 when counted now).
    #[serde(default)]
    pub counted_ago_s: f64,
}

/// A frontend with its backends, as read back from the kernel.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// `namespace/name:port-name` of the Kubernetes Service, when the agent knows it.
    pub service: Option<String>,
    /// The Service's `spec.type`.
    pub kind: ServiceKind,
    /// Which of the Service's addresses this is, from the frontend's flags.
    pub frontend: FrontendKind,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub backends: Vec<BackendEntry>,
    /// How a new connection's backend is chosen.
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    /// sessionAffinity ClientIP: seconds a client keeps its backend after its last new
    /// connection; None without affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendEntry {
    pub address: Ipv4Addr,
    pub port: u16,
    pub state: BackendState,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CtEntry {
    pub protocol: Protocol,
    pub scope: CtScope,
    pub source: String,
    pub destination: String,
    /// Backend (service scope) or frontend to restore on replies (egress scope).
    pub nat: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub age_seconds: u64,
    pub idle_seconds: u64,
    /// Seconds of idleness left before the entry expires (the lifetime of its state, see
    /// `AgentStatus::conntrack`); 0 once expired, until the GC removes it.
    #[serde(default)]
    pub expires_seconds: u64,
    pub flags: Vec<CtFlag>,
}

/// What `sluice verify` found: entries whose kernel content differs from the desired one.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub generation: u64,
    pub drift: Vec<Drift>,
    pub repaired: bool,
    /// Endpoints realized as intended but failing closed: their policy does not fit.
    #[serde(default)]
    pub fails_closed: Vec<FailsClosed>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Drift {
    pub map: String,
    pub kind: DriftKind,
    pub key: String,
    pub desired: Option<String>,
    pub actual: Option<String>,
}
