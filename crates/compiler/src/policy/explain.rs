//! Why one flow is allowed or denied: for the source's egress and the destination's
//! ingress, the NetworkPolicies that isolate that side and the rules, peers and ports that
//! allow the flow, judged with the peers and ports the rows are made from (`peers`,
//! `ports`), so it explains what the datapath enforces.

use std::{fmt, net::Ipv4Addr};

use k8s_openapi::{
    api::networking::v1::NetworkPolicyPort, apimachinery::pkg::util::intstr::IntOrString,
};
use sluice_common::{IDENTITY_HOST, IDENTITY_WORLD, POLICY_EGRESS, POLICY_INGRESS};

use super::{
    Policy, peers::World, ports::named, rows::CompiledEndpoint, rules, selects, workloads::Workload,
};
use crate::{NodeContext, ObjectKind, ObjectRef, problem::Problems, protocol_number};

/// One end of a flow to explain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowEnd {
    Pod {
        namespace: String,
        name: String,
    },
    /// An address; the pod holding it if any, else what the ipcache says it is.
    Address(Ipv4Addr),
}

/// A new connection from `from` to `to` on `port` (after service translation) over
/// `protocol` (an IP protocol number).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowQuery {
    pub from: FlowEnd,
    pub to: FlowEnd,
    pub port: u16,
    pub protocol: u8,
}

/// Why a flow cannot be explained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unexplained {
    /// No pod of that name has an address or a local endpoint (or it is defined twice).
    UnknownPod(ObjectRef),
}

impl fmt::Display for Unexplained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownPod(pod) => write!(
                f,
                "{pod} is not known to policy: no such pod, or it has no address and no \
                 endpoint on this node"
            ),
        }
    }
}

/// One end of the flow as policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowSide {
    /// The pod, None for an address no pod holds.
    pub pod: Option<ObjectRef>,
    pub address: Option<Ipv4Addr>,
    pub identity: u32,
    /// The node it runs on, when known.
    pub node: Option<String>,
}

/// The verdict of one direction with its reasons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectionExplanation {
    /// `POLICY_EGRESS` (the source's) or `POLICY_INGRESS` (the destination's).
    pub direction: u8,
    /// The side this direction belongs to is a pod: only a pod is governed by policy.
    pub pod: bool,
    /// NetworkPolicies selecting the pod that isolate it in this direction.
    pub isolating: Vec<ObjectRef>,
    /// What allows the flow, in policy then rule order.
    pub allowed_by: Vec<Allow>,
    /// The pod's rows do not fit its policy map: it drops every new connection of an
    /// isolated direction.
    pub fails_closed: bool,
}

impl DirectionExplanation {
    pub fn allowed(&self) -> bool {
        self.isolating.is_empty() || (!self.fails_closed && !self.allowed_by.is_empty())
    }
}

/// What allows a flow in one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allow {
    /// Rule `rule` of the policy's `ingress` or `egress` list: its peer `peer` of
    /// `from`/`to` (None: the rule names no peers, so every peer) and its port `port` of
    /// `ports` (None: the rule names no ports, so every port).
    Rule {
        policy: ObjectRef,
        rule: usize,
        peer: Option<usize>,
        port: Option<usize>,
    },
    /// The pod's own node, always allowed (the `reserved:host` row).
    Host,
}

/// The flow with both directions explained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub from: FlowSide,
    pub to: FlowSide,
    /// The source's egress.
    pub egress: DirectionExplanation,
    /// The destination's ingress.
    pub ingress: DirectionExplanation,
}

impl Explanation {
    pub fn allowed(&self) -> bool {
        self.egress.allowed() && self.ingress.allowed()
    }
}

/// Explains `flow` against `policies`; `compiled` are the local endpoints, for which one
/// fails closed.
pub(super) fn explain(
    world: &World<'_>,
    policies: &[Policy<'_>],
    compiled: &[(u32, CompiledEndpoint)],
    node: &NodeContext,
    flow: &FlowQuery,
) -> Result<Explanation, Unexplained> {
    let from = world.end(&flow.from)?;
    let to = world.end(&flow.to)?;
    let judge = Judge {
        world,
        flow,
        compiled,
        node,
    };
    Ok(Explanation {
        egress: judge.direction(policies, POLICY_EGRESS, &from, &to),
        ingress: judge.direction(policies, POLICY_INGRESS, &to, &from),
        from: from.side(),
        to: to.side(),
    })
}

/// A resolved end: the pod policy sees, or an address with its identity.
enum End<'w, 'a> {
    Pod(&'w Workload<'a>),
    Address { address: Ipv4Addr, identity: u32 },
}

impl End<'_, '_> {
    fn identity(&self) -> u32 {
        match self {
            End::Pod(w) => w.identity,
            End::Address { identity, .. } => *identity,
        }
    }

    fn side(&self) -> FlowSide {
        match self {
            End::Pod(w) => FlowSide {
                pod: Some(ObjectRef::new(ObjectKind::Pod, w.namespace, w.name)),
                address: w.address,
                identity: w.identity,
                node: w.node.map(String::from),
            },
            End::Address { address, identity } => FlowSide {
                pod: None,
                address: Some(*address),
                identity: *identity,
                node: None,
            },
        }
    }
}

impl<'a> World<'a> {
    fn end<'w>(&'w self, end: &FlowEnd) -> Result<End<'w, 'a>, Unexplained> {
        match end {
            FlowEnd::Pod { namespace, name } => self
                .workloads
                .iter()
                .find(|w| w.namespace == namespace && w.name == name)
                .map(End::Pod)
                .ok_or_else(|| {
                    Unexplained::UnknownPod(ObjectRef::new(ObjectKind::Pod, namespace, name))
                }),
            FlowEnd::Address(address) => {
                if let Some(w) = self.workloads.iter().find(|w| w.address == Some(*address)) {
                    return Ok(End::Pod(w));
                }
                Ok(End::Address {
                    address: *address,
                    identity: self.identity_of(*address),
                })
            }
        }
    }

    /// The identity the ipcache gives `address`: its longest prefix holding it.
    fn identity_of(&self, address: Ipv4Addr) -> u32 {
        crate::ipcache::prefixes(self.ipcache)
            .filter(|(prefix, _)| prefix.contains(&address))
            .max_by_key(|(prefix, _)| prefix.prefix_len())
            .map_or(IDENTITY_WORLD, |(_, identity)| identity)
    }
}

/// What one direction is judged with.
struct Judge<'j, 'a> {
    world: &'j World<'a>,
    flow: &'j FlowQuery,
    compiled: &'j [(u32, CompiledEndpoint)],
    node: &'j NodeContext,
}

impl Judge<'_, '_> {
    /// The verdict of `direction` on `this` side, with `peer` the other end.
    fn direction(
        &self,
        policies: &[Policy<'_>],
        direction: u8,
        this: &End<'_, '_>,
        peer: &End<'_, '_>,
    ) -> DirectionExplanation {
        let End::Pod(w) = this else {
            return DirectionExplanation {
                direction,
                pod: false,
                isolating: Vec::new(),
                allowed_by: Vec::new(),
                fails_closed: false,
            };
        };
        let isolating: Vec<&Policy<'_>> = policies
            .iter()
            .filter(|p| selects(p, w) && isolates(p, direction))
            .collect();
        let mut allowed_by = Vec::new();
        if !isolating.is_empty() && peer.identity() == IDENTITY_HOST {
            allowed_by.push(Allow::Host);
        }
        for p in &isolating {
            self.policy_allows(p, direction, this, peer, &mut allowed_by);
        }
        DirectionExplanation {
            direction,
            pod: true,
            isolating: isolating.iter().map(|p| p.object.clone()).collect(),
            allowed_by,
            fails_closed: self.fails_closed(w),
        }
    }

    /// Whether `w` is a local endpoint whose policy does not fit its map.
    fn fails_closed(&self, w: &Workload<'_>) -> bool {
        w.node == Some(self.node.node.as_str())
            && self.compiled.iter().any(|(_, c)| {
                c.details.overflow && c.details.namespace == w.namespace && c.details.pod == w.name
            })
    }

    /// Adds the rules of `policy` in `direction` that allow the flow with `peer`.
    fn policy_allows(
        &self,
        policy: &Policy<'_>,
        direction: u8,
        this: &End<'_, '_>,
        peer: &End<'_, '_>,
        out: &mut Vec<Allow>,
    ) {
        // The destination of the flow names the ports a named port resolves to.
        let destination = if direction == POLICY_INGRESS {
            this
        } else {
            peer
        };
        // `rules` lists ingress then egress rules: indices count within the direction.
        let in_direction = rules(policy.policy).filter(|(d, _, _)| *d == direction);
        for (rule, (_, peers, ports)) in in_direction.enumerate() {
            let port = match ports.map(Vec::as_slice).unwrap_or_default() {
                [] => Some(None),
                ports => ports
                    .iter()
                    .position(|p| self.port_matches(p, direction, destination))
                    .map(Some),
            };
            let Some(port) = port else { continue };
            let peer_index = match peers.map(Vec::as_slice).unwrap_or_default() {
                [] => Some(None),
                list => list
                    .iter()
                    .position(|candidate| {
                        let mut ignored = Problems::default();
                        self.world
                            .peer_identities(
                                &policy.object,
                                policy.namespace,
                                candidate,
                                &mut ignored,
                            )
                            .contains(&peer.identity())
                    })
                    .map(Some),
            };
            if let Some(peer) = peer_index {
                out.push(Allow::Rule {
                    policy: policy.object.clone(),
                    rule,
                    peer,
                    port,
                });
            }
        }
    }

    /// Whether `port` of a rule covers the flow's protocol and port, as its rows would.
    fn port_matches(
        &self,
        port: &NetworkPolicyPort,
        direction: u8,
        destination: &End<'_, '_>,
    ) -> bool {
        let flow = self.flow;
        if protocol_number(port.protocol.as_ref()) != Some(flow.protocol) {
            return false;
        }
        match &port.port {
            None => true,
            Some(IntOrString::Int(first)) => {
                // As `rows::port_rows`: a range that is no u16 range makes no rows.
                let last = port.end_port.unwrap_or(*first);
                let range = u16::try_from(*first).ok().zip(u16::try_from(last).ok());
                range.is_some_and(|(first, last)| (first..=last).contains(&flow.port))
            }
            Some(IntOrString::String(name)) => match destination {
                End::Pod(d) if direction == POLICY_INGRESS => {
                    named(d, name, flow.protocol).contains(&flow.port)
                }
                // Egress rows are made per destination identity, from every pod that
                // carries it (`rows::port_rows`), so any of them may name the port.
                End::Pod(d) => self.world.workloads.iter().any(|o| {
                    o.address.is_some()
                        && o.identity == d.identity
                        && named(o, name, flow.protocol).contains(&flow.port)
                }),
                End::Address { .. } => false,
            },
        }
    }
}

fn isolates(policy: &Policy<'_>, direction: u8) -> bool {
    if direction == POLICY_INGRESS {
        policy.ingress
    } else {
        policy.egress
    }
}
