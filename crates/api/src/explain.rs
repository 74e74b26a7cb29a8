//! `policy explain`: why one flow is allowed or denied, from the compiled desired state,
//! and whether the kernel's maps agree.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{Direction, Protocol};

/// A new connection to explain: each end `namespace/pod` or an IPv4 address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainRequest {
    pub from: String,
    pub to: String,
    /// The destination port (a Service's target port, as policy sees it after translation).
    pub port: u16,
    pub protocol: Protocol,
}

/// The answer: both directions' verdicts and reasons.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyExplanation {
    /// The agent that answered; it checks the kernel for its own pods only.
    pub node: String,
    /// The agent's generation of the snapshot explained, and the one its maps hold: while
    /// they differ a kernel check may still show the previous policy.
    pub generation: u64,
    pub realized_generation: u64,
    pub from: ExplainedEnd,
    pub to: ExplainedEnd,
    pub port: u16,
    pub protocol: Protocol,
    /// The desired state allows the flow in both directions.
    pub allowed: bool,
    /// The source's egress.
    pub egress: ExplainedDirection,
    /// The destination's ingress.
    pub ingress: ExplainedDirection,
}

impl PolicyExplanation {
    /// Every kernel check that was made agrees with the desired verdict.
    pub fn kernel_agrees(&self) -> bool {
        [&self.egress, &self.ingress]
            .iter()
            .all(|d| !matches!(d.kernel, KernelCheck::Checked { agrees: false, .. }))
    }
}

/// One end of the flow as policy sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainedEnd {
    /// `namespace/pod`; None for an address no pod holds.
    pub pod: Option<String>,
    pub address: Option<Ipv4Addr>,
    pub identity: u32,
    pub labels: Vec<String>,
    /// The node the pod runs on.
    pub node: Option<String>,
}

/// One direction's verdict, its reasons and the kernel's view of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExplainedDirection {
    pub direction: Direction,
    pub verdict: ExplainVerdict,
    /// NetworkPolicies (`namespace/name`) that select the pod and isolate it in this
    /// direction.
    pub isolated_by: Vec<String>,
    /// What allows the flow, in policy then rule order.
    pub allowed_by: Vec<AllowedBy>,
    pub kernel: KernelCheck,
}

/// The desired verdict of one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExplainVerdict {
    /// This end is no pod: no NetworkPolicy governs it.
    NotAPod,
    /// No NetworkPolicy isolates the pod in this direction: allowed by default.
    NotIsolated,
    /// A rule of a policy isolating the pod allows it.
    Allowed,
    /// The pod is isolated in this direction and no rule matches.
    Denied,
    /// The pod is isolated but its rows do not fit its policy map: it drops every new
    /// connection in this direction.
    FailsClosed,
}

impl ExplainVerdict {
    pub fn allowed(self) -> bool {
        matches!(self, Self::NotAPod | Self::NotIsolated | Self::Allowed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAPod => "not-a-pod",
            Self::NotIsolated => "not-isolated",
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::FailsClosed => "fails-closed",
        }
    }
}

/// What allows a flow in one direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AllowedBy {
    /// A rule: index `rule` of the policy's `spec.ingress` or `spec.egress`, its peer `peer`
    /// of `from`/`to` (None: the rule names none, so every peer) and its port `port` of
    /// `ports` (None: every port).
    Rule {
        policy: String,
        rule: usize,
        peer: Option<usize>,
        port: Option<usize>,
        /// The matching peer as written in the policy (JSON), when it names one.
        peer_spec: Option<String>,
    },
    /// The pod's own node, always allowed (the `reserved:host` row).
    Host,
}

/// The kernel's verdict for this direction, looked up as the datapath does: the peer's
/// identity in the ipcache, the endpoint's flags, then its policy map (the peer's own row,
/// else the row for any peer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum KernelCheck {
    /// This end is no pod: nothing to look up.
    NotAPod,
    /// The pod has no endpoint on the answering node: its own node's agent judges it.
    NotOnThisNode { node: Option<String> },
    Checked {
        /// The identity this node's ipcache gives the peer's address.
        remote_identity: u32,
        found: KernelFound,
        allowed: bool,
        /// The kernel's verdict equals the desired one.
        agrees: bool,
    },
}

/// What the kernel lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum KernelFound {
    /// The endpoint's flags do not enforce this direction (or it has no entry).
    NotEnforced,
    /// The endpoint is flagged as failing closed.
    FailsClosed,
    /// Enforced but no policy map is installed: dropped.
    NoPolicyMap,
    /// The row admitting it: for that identity (0: any peer), with its counters.
    Row {
        identity: u32,
        packets: u64,
        bytes: u64,
    },
    /// No row admits it: dropped.
    NoRow,
}
