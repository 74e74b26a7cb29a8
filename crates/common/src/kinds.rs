//! Named kinds that the maps hold as numbers and the API shows as words: protocols,
//! directions, conntrack scopes and flags, service types, drift, endpoint and row states,
//! and where an allow row comes from.
//!
//! Each serializes as the word `sluice ... -o json` has always printed, so the JSON output
//! does not change; the numbers stay in the map layouts of [`crate::maps`].

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::maps::{
    BACKEND_STATE_ACTIVE, CT_EGRESS, CT_FLAG_CLOSING, CT_FLAG_FIN_ORIGINAL, CT_FLAG_FIN_REPLY,
    CT_FLAG_LOOPBACK, CT_FLAG_MASQUERADE, CT_FLAG_NODEPORT, CT_FLAG_SEEN_REPLY, CT_INGRESS,
    CT_NODEPORT, CT_SERVICE, CT_SNAT, CT_SNAT_PORT, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    POLICY_EGRESS, POLICY_INGRESS, SVC_FLAG_MAGLEV,
};

/// An IP protocol as a map key carries it; 0 means any protocol (policy rows, wildcards).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Sctp,
    /// A number the datapath does not name (it tracks no other protocol).
    Other,
}

impl Protocol {
    pub fn from_number(proto: u8) -> Self {
        match proto {
            0 => Protocol::Any,
            IPPROTO_TCP => Protocol::Tcp,
            IPPROTO_UDP => Protocol::Udp,
            IPPROTO_SCTP => Protocol::Sctp,
            _ => Protocol::Other,
        }
    }

    /// As Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Any => "ANY",
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Other => "OTHER",
        }
    }
}

/// Direction of a policy row, seen from the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
    /// A row read from the kernel with a direction the datapath does not define: only a
    /// write behind the agent's back makes one, and `verify` reports it.
    Unknown,
}

impl Direction {
    pub fn from_policy(direction: u8) -> Self {
        match direction {
            POLICY_INGRESS => Direction::Ingress,
            POLICY_EGRESS => Direction::Egress,
            _ => Direction::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
            Direction::Unknown => "unknown",
        }
    }
}

/// Which lookup a conntrack entry serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CtScope {
    Egress,
    Ingress,
    Service,
    /// From outside the node to an external frontend, as the backend sees it.
    Nodeport,
    /// SNATed to a backend on another node, as the backend sees it.
    Snat,
    /// SNATed to a backend on another node, as the client sent it.
    #[serde(rename = "snat-port")]
    SnatPort,
    /// A scope the datapath does not define (written behind the agent's back).
    Unknown,
}

impl CtScope {
    pub fn from_number(scope: u8) -> Self {
        match scope {
            CT_EGRESS => CtScope::Egress,
            CT_INGRESS => CtScope::Ingress,
            CT_SERVICE => CtScope::Service,
            CT_NODEPORT => CtScope::Nodeport,
            CT_SNAT => CtScope::Snat,
            CT_SNAT_PORT => CtScope::SnatPort,
            _ => CtScope::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CtScope::Egress => "egress",
            CtScope::Ingress => "ingress",
            CtScope::Service => "service",
            CtScope::Nodeport => "nodeport",
            CtScope::Snat => "snat",
            CtScope::SnatPort => "snat-port",
            CtScope::Unknown => "unknown",
        }
    }
}

/// A flag bit of a conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CtFlag {
    /// A pod reached itself through a service (hairpin).
    Loopback,
    SeenReply,
    Closing,
    /// A pod's connection masqueraded out of the cluster (its CT_SNAT entry).
    Masquerade,
    /// A connection that reached its pod through an external frontend (its CT_INGRESS entry).
    NodePort,
    /// A FIN seen in the direction of the entry's tuple.
    FinOriginal,
    /// A FIN seen in the reply direction.
    FinReply,
}

impl CtFlag {
    const BITS: [(u8, CtFlag); 7] = [
        (CT_FLAG_LOOPBACK, CtFlag::Loopback),
        (CT_FLAG_SEEN_REPLY, CtFlag::SeenReply),
        (CT_FLAG_CLOSING, CtFlag::Closing),
        (CT_FLAG_MASQUERADE, CtFlag::Masquerade),
        (CT_FLAG_NODEPORT, CtFlag::NodePort),
        (CT_FLAG_FIN_ORIGINAL, CtFlag::FinOriginal),
        (CT_FLAG_FIN_REPLY, CtFlag::FinReply),
    ];

    /// The flags set in an entry's `flags` byte, in bit order.
    pub fn from_bits(flags: u8) -> Vec<CtFlag> {
        Self::BITS
            .into_iter()
            .filter(|(bit, _)| flags & bit != 0)
            .map(|(_, flag)| flag)
            .collect()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CtFlag::Loopback => "loopback",
            CtFlag::SeenReply => "seen-reply",
            CtFlag::Closing => "closing",
            CtFlag::Masquerade => "masquerade",
            CtFlag::NodePort => "nodeport",
            CtFlag::FinOriginal => "fin-original",
            CtFlag::FinReply => "fin-reply",
        }
    }
}

/// A Kubernetes Service's `spec.type`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum ServiceKind {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

impl ServiceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::ClusterIP => "ClusterIP",
            ServiceKind::NodePort => "NodePort",
            ServiceKind::LoadBalancer => "LoadBalancer",
            ServiceKind::ExternalName => "ExternalName",
        }
    }
}

/// A `spec.type` Kubernetes does not define.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownServiceKind(pub String);

impl fmt::Display for UnknownServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown service type {:?}", self.0)
    }
}

impl std::error::Error for UnknownServiceKind {}

impl FromStr for ServiceKind {
    type Err = UnknownServiceKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ClusterIP" => Ok(ServiceKind::ClusterIP),
            "NodePort" => Ok(ServiceKind::NodePort),
            "LoadBalancer" => Ok(ServiceKind::LoadBalancer),
            "ExternalName" => Ok(ServiceKind::ExternalName),
            other => Err(UnknownServiceKind(other.to_string())),
        }
    }
}

/// Which address of a Service a frontend is: its ClusterIP, a node's address at its
/// nodePort, one of `spec.externalIPs`, or a `status.loadBalancer.ingress` IP. One Service
/// can have several (Cilium's `service list` prints the same words).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum FrontendKind {
    #[default]
    ClusterIP,
    NodePort,
    ExternalIP,
    LoadBalancer,
}

impl FrontendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIP => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIP => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        }
    }

    /// The `SVC_FLAG_*` bit that marks a frontend of this kind.
    pub fn flag(self) -> u16 {
        match self {
            FrontendKind::ClusterIP => crate::SVC_FLAG_CLUSTER_IP,
            FrontendKind::NodePort => crate::SVC_FLAG_NODE_PORT,
            FrontendKind::ExternalIP => crate::SVC_FLAG_EXTERNAL_IP,
            FrontendKind::LoadBalancer => crate::SVC_FLAG_LOAD_BALANCER,
        }
    }

    /// The kind a frontend's `SVC_FLAG_*` bits mark, as read back from the kernel.
    pub fn from_flags(flags: u16) -> Self {
        [
            FrontendKind::NodePort,
            FrontendKind::ExternalIP,
            FrontendKind::LoadBalancer,
        ]
        .into_iter()
        .find(|kind| flags & kind.flag() != 0)
        .unwrap_or(FrontendKind::ClusterIP)
    }

    /// Whether `externalTrafficPolicy` (rather than `internalTrafficPolicy`) applies.
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIP
    }
}

/// How a frontend picks the backend of a new connection (`SVC_FLAG_MAGLEV` in the map).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LbAlgorithm {
    /// The backend slot a hash of the flow gives: spread as a draw across flows, the same
    /// slot for one flow, so a connection whose conntrack entry was lost keeps its backend.
    #[default]
    Random,
    /// The backend the frontend's Maglev table gives the flow's hash: the same on every
    /// node, and few flows move when a backend comes or goes.
    Maglev,
}

impl LbAlgorithm {
    pub const ALL: [LbAlgorithm; 2] = [LbAlgorithm::Random, LbAlgorithm::Maglev];

    /// The algorithm of a frontend with `flags` (`SVC_FLAG_*`).
    pub fn of_frontend(flags: u16) -> Self {
        if flags & SVC_FLAG_MAGLEV != 0 {
            LbAlgorithm::Maglev
        } else {
            LbAlgorithm::Random
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LbAlgorithm::Random => "random",
            LbAlgorithm::Maglev => "maglev",
        }
    }
}

impl FromStr for LbAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown load-balancing algorithm {s:?} (random or maglev)"))
    }
}

/// How a map entry in the kernel differs from the desired one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftKind {
    /// Desired but absent from the kernel.
    Missing,
    /// In the kernel but not desired.
    Unexpected,
    /// Present with a different value.
    Differs,
}

impl DriftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::Missing => "missing",
            DriftKind::Unexpected => "unexpected",
            DriftKind::Differs => "differs",
        }
    }
}

/// How `status` knows how many entries a map holds: counting a map of a million entries
/// takes longer than an API answer may, so the realized maps report the count the agent
/// last established rather than a walk per call.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum CountedBy {
    /// Counted for this answer (maps bounded by their capacity, not by the cluster).
    #[default]
    Now,
    /// Read by the drift check's last sweep of the map, which found the desired content.
    Sweep,
    /// Written by the last pass that made the map hold the desired content.
    Pass,
}

impl CountedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            CountedBy::Now => "now",
            CountedBy::Sweep => "sweep",
            CountedBy::Pass => "pass",
        }
    }
}

/// Whether a local endpoint's policy is in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointStatus {
    Ready,
    /// Its policy needs more rows than its map holds: new connections are dropped.
    FailsClosed,
}

impl EndpointStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointStatus::Ready => "ready",
            EndpointStatus::FailsClosed => "fails-closed",
        }
    }
}

/// A policy row in the kernel joined with the desired rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowState {
    /// In the kernel and desired.
    Realized,
    /// In the kernel only.
    Unexpected,
    /// Desired, not in the kernel.
    Missing,
}

impl RowState {
    pub fn of(in_kernel: bool, desired: bool) -> Self {
        match (in_kernel, desired) {
            (true, true) => RowState::Realized,
            (true, false) => RowState::Unexpected,
            _ => RowState::Missing,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RowState::Realized => "realized",
            RowState::Unexpected => "unexpected",
            RowState::Missing => "missing",
        }
    }
}

/// A backend slot's backend as the kernel holds it; shown as `active`, `missing` or
/// `state=N` for a state the datapath does not define.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum BackendState {
    Active,
    /// A slot names a backend that the backends map does not hold.
    Missing,
    Other(u8),
}

impl BackendState {
    pub fn from_number(state: u8) -> Self {
        match state {
            BACKEND_STATE_ACTIVE => BackendState::Active,
            other => BackendState::Other(other),
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendState::Active => f.write_str("active"),
            BackendState::Missing => f.write_str("missing"),
            BackendState::Other(n) => write!(f, "state={n}"),
        }
    }
}

impl From<BackendState> for String {
    fn from(state: BackendState) -> Self {
        state.to_string()
    }
}

impl TryFrom<String> for BackendState {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        match s.as_str() {
            "active" => Ok(BackendState::Active),
            "missing" => Ok(BackendState::Missing),
            other => other
                .strip_prefix("state=")
                .and_then(|n| n.parse().ok())
                .map(BackendState::Other)
                .ok_or_else(|| format!("unknown backend state {other:?}")),
        }
    }
}

/// What allows a policy row: a NetworkPolicy, or the node's own standing row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum RuleOrigin {
    /// Traffic between a pod and its own node is always allowed (`reserved:host`).
    Host,
    /// A NetworkPolicy, `namespace/name`.
    Policy(String),
}

impl RuleOrigin {
    /// How the host origin is spelled: the label of the host identity.
    pub const HOST: &'static str = "reserved:host";

    /// The NetworkPolicy, if a policy object allows the row.
    pub fn policy(&self) -> Option<&str> {
        match self {
            RuleOrigin::Host => None,
            RuleOrigin::Policy(name) => Some(name),
        }
    }
}

impl fmt::Display for RuleOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleOrigin::Host => f.write_str(Self::HOST),
            RuleOrigin::Policy(name) => f.write_str(name),
        }
    }
}

impl From<RuleOrigin> for String {
    fn from(origin: RuleOrigin) -> Self {
        origin.to_string()
    }
}

impl From<String> for RuleOrigin {
    fn from(s: String) -> Self {
        // A policy is `namespace/name`, which never equals the host's label.
        if s == RuleOrigin::HOST {
            RuleOrigin::Host
        } else {
            RuleOrigin::Policy(s)
        }
    }
}

/// Display as the wire spelling, for tables.
macro_rules! display_as_str {
    ($($kind:ty),*) => {$(
        impl fmt::Display for $kind {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        /// Callers and tests compare with the wire spelling.
        impl PartialEq<&str> for $kind {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    )*};
}

display_as_str!(
    Protocol,
    Direction,
    CtScope,
    CtFlag,
    ServiceKind,
    FrontendKind,
    LbAlgorithm,
    DriftKind,
    EndpointStatus,
    RowState
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kind serializes as the word `as_str` gives, so JSON and tables agree.
    #[test]
    fn serialized_as_their_words() {
        fn word<T: Serialize>(value: T) -> String {
            match serde_json::to_value(value) {
                Ok(serde_json::Value::String(s)) => s,
                other => panic!("not a string: {other:?}"),
            }
        }
        for p in [0, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, 1] {
            let p = Protocol::from_number(p);
            assert_eq!(word(p), p.as_str());
        }
        assert_eq!(word(Protocol::from_number(1)), "OTHER");
        for d in [POLICY_INGRESS, POLICY_EGRESS, 9] {
            let d = Direction::from_policy(d);
            assert_eq!(word(d), d.as_str());
        }
        for a in LbAlgorithm::ALL {
            assert_eq!(word(a), a.as_str());
            assert_eq!(a.as_str().parse::<LbAlgorithm>(), Ok(a));
        }
        assert_eq!(
            LbAlgorithm::of_frontend(SVC_FLAG_MAGLEV | 1),
            LbAlgorithm::Maglev
        );
        for s in [
            CT_EGRESS,
            CT_INGRESS,
            CT_SERVICE,
            CT_NODEPORT,
            CT_SNAT,
            CT_SNAT_PORT,
            9,
        ] {
            let s = CtScope::from_number(s);
            assert_eq!(word(s), s.as_str());
        }
        assert_eq!(
            CtFlag::from_bits(CT_FLAG_SEEN_REPLY | CT_FLAG_LOOPBACK),
            [CtFlag::Loopback, CtFlag::SeenReply]
        );
        assert_eq!(word(CtFlag::SeenReply), "seen-reply");
        for k in ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] {
            let kind: ServiceKind = k.parse().expect("a service type");
            assert_eq!(word(kind), k);
        }
        assert!("Headless".parse::<ServiceKind>().is_err());
        assert_eq!(word(FrontendKind::ExternalIP), "ExternalIP");
        for kind in [
            FrontendKind::ClusterIP,
            FrontendKind::NodePort,
            FrontendKind::ExternalIP,
            FrontendKind::LoadBalancer,
        ] {
            let flags = kind.flag() | crate::SVC_FLAG_LOCAL;
            assert_eq!(FrontendKind::from_flags(flags), kind);
        }
        assert_eq!(word(DriftKind::Differs), "differs");
        assert_eq!(word(EndpointStatus::FailsClosed), "fails-closed");
        assert_eq!(word(RowState::of(true, false)), "unexpected");
        assert_eq!(word(BackendState::from_number(7)), "state=7");
        assert_eq!(word(BackendState::Missing), "missing");
        assert_eq!(word(RuleOrigin::Host), "reserved:host");
    }

    #[test]
    fn string_kinds_round_trip() {
        for state in [
            BackendState::Active,
            BackendState::Missing,
            BackendState::Other(3),
        ] {
            let json = serde_json::to_string(&state).expect("serializes");
            assert_eq!(
                serde_json::from_str::<BackendState>(&json).expect("parses"),
                state
            );
        }
        for origin in [RuleOrigin::Host, RuleOrigin::Policy("app/db".into())] {
            let json = serde_json::to_string(&origin).expect("serializes");
            assert_eq!(
                serde_json::from_str::<RuleOrigin>(&json).expect("parses"),
                origin
            );
        }
        assert!(serde_json::from_str::<BackendState>("\"gone\"").is_err());
    }
}
