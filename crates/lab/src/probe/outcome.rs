//! Why a probe came out as it did. The socket says what the source saw (an echo, a refusal,
//! an unreachable network, silence); for silence, the datapath's own drop events on every
//! node say whether policy dropped it, and where.

use std::net::Ipv4Addr;

use serde::Serialize;
use sluice_api::{
    Client,
    flow::{Flow, FlowFilter, Layer4, ObserveRequest, Timestamp, TrafficDirection, Verdict},
};

use sluice_common::DropReason;

use super::{Probe, Protocol};

/// A probe's outcome, as the matrix marks it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Outcome {
    Allowed,
    /// The datapath dropped it by policy: the direction, and the endpoint whose policy
    /// dropped it (`namespace/pod`) where the event names one.
    DeniedByPolicy {
        direction: &'static str,
        endpoint: Option<String>,
    },
    /// Nothing listens: a TCP RST or ICMP port unreachable came back, the datapath
    /// forwarded the probe.
    Refused,
    /// No route, or a frontend without a backend.
    Unreachable,
    /// Dropped by the datapath for another reason (its Hubble name).
    Dropped {
        reason: String,
    },
    /// No answer, and no node saw a drop.
    TimedOut,
    /// The probe cannot run here.
    NotRunnable {
        why: String,
    },
    /// A world host to a ClusterIP: kube-proxy routes no ClusterIP from outside the
    /// cluster, so there is nothing to probe.
    NotRouted,
}

impl Outcome {
    /// The matrix's mark.
    pub fn mark(&self) -> char {
        match self {
            Outcome::Allowed => '.',
            Outcome::DeniedByPolicy { .. } => 'X',
            Outcome::Refused => 'R',
            Outcome::Unreachable => 'U',
            Outcome::Dropped { .. } => 'D',
            Outcome::TimedOut => 'T',
            Outcome::NotRunnable { .. } => '-',
            Outcome::NotRouted => 'N',
        }
    }

    /// In words, for a single probe and the legend.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Allowed => "allowed".into(),
            Outcome::DeniedByPolicy {
                direction,
                endpoint,
            } => match endpoint {
                Some(endpoint) => format!("denied by policy ({direction} of {endpoint})"),
                None => format!("denied by policy ({direction})"),
            },
            Outcome::Refused => "refused (nothing listens; the datapath forwarded it)".into(),
            Outcome::Unreachable => "unreachable (no route or no backend)".into(),
            Outcome::Dropped { reason } => format!("dropped by the datapath ({reason})"),
            Outcome::TimedOut => "timed out, no drop seen".into(),
            Outcome::NotRunnable { why } => format!("not runnable: {why}"),
            Outcome::NotRouted => "not routed (a ClusterIP from outside the cluster)".into(),
        }
    }
}

/// The matrix's legend line.
pub const LEGEND: &str = ". allowed   X denied by policy   R refused   U unreachable   \
D dropped (other reason)   T timed out   - not runnable   N not routed";

/// What the socket saw, before any event is consulted.
pub(super) fn from_socket(allowed: bool, detail: &str) -> Outcome {
    if allowed {
        return Outcome::Allowed;
    }
    match detail {
        "refused" | "reset" | "connected, then reset" => Outcome::Refused,
        "unreachable" => Outcome::Unreachable,
        _ => Outcome::TimedOut,
    }
}

/// One probe as its drop events would name it: who sent it (None for a node's own traffic,
/// whose source address is the node's choice) and the addresses it may carry after
/// translation (the dialled one, and the pod behind a ClusterIP).
pub(super) struct Traced {
    pub source: Option<Ipv4Addr>,
    pub destinations: Vec<Ipv4Addr>,
}

/// Names the silent probes (TimedOut) from the drop events every agent recorded since
/// `since`: a policy drop, a missing backend, or another drop.
pub(super) fn explain(
    probes: &mut [Probe],
    traced: &[Traced],
    agents: &[Client],
    since: Timestamp,
) {
    if !probes.iter().any(|p| p.outcome == Outcome::TimedOut) {
        return;
    }
    let request = ObserveRequest {
        last: None,
        follow: false,
        filter: FlowFilter {
            verdict: vec![Verdict::Dropped],
            since: Some(since),
            ..FlowFilter::default()
        },
    };
    // An agent that cannot answer leaves its drops unnamed: those probes stay timed out.
    let drops: Vec<Flow> = agents
        .iter()
        .filter_map(|agent| agent.observe(&request).ok())
        .flat_map(|stream| stream.filter_map(Result::ok))
        .collect();
    for (probe, traced) in probes.iter_mut().zip(traced) {
        if probe.outcome != Outcome::TimedOut {
            continue;
        }
        if let Some(flow) = drops.iter().find(|f| matches(f, probe, traced)) {
            probe.outcome = classify(flow);
        }
    }
}

fn matches(flow: &Flow, probe: &Probe, traced: &Traced) -> bool {
    let (proto, port) = match &flow.l4 {
        Some(Layer4::Tcp(t)) => (Protocol::Tcp, t.destination_port),
        Some(Layer4::Udp(p)) => (Protocol::Udp, p.destination_port),
        Some(Layer4::Sctp(p)) => (Protocol::Sctp, p.destination_port),
        _ => return false,
    };
    proto == probe.protocol
        && traced.source.is_none_or(|s| s == flow.ip.source)
        && traced.destinations.contains(&flow.ip.destination)
        // Behind a ClusterIP the port may be the target port: the addresses decide then.
        && (port == probe.port || flow.ip.destination != probe.address)
}

fn classify(flow: &Flow) -> Outcome {
    let named = |reason: DropReason| flow.drop_reason_desc.as_deref() == Some(reason.hubble_name());
    if named(DropReason::Policy) {
        let (direction, side) = match flow.traffic_direction {
            TrafficDirection::Ingress => ("ingress", &flow.destination),
            TrafficDirection::Egress => ("egress", &flow.source),
        };
        return Outcome::DeniedByPolicy {
            direction,
            endpoint: (!side.pod_name.is_empty())
                .then(|| format!("{}/{}", side.namespace, side.pod_name)),
        };
    }
    if named(DropReason::NoService) {
        return Outcome::Unreachable;
    }
    Outcome::Dropped {
        reason: flow
            .drop_reason_desc
            .clone()
            .unwrap_or_else(|| format!("drop reason {}", flow.drop_reason)),
    }
}

/// Now, as the agents stamp their events, less a second for the clocks' and the ring
/// buffer's slack (a probe's own drops come after it starts).
pub(super) fn now() -> Timestamp {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    Timestamp(ns - 1_000_000_000)
}
