//! `policy explain`: the compiler's explanation of one flow against the published
//! snapshot, with the kernel's verdict for each side that is an endpoint of this node,
//! looked up in its maps the way the datapath does.

use std::{net::Ipv4Addr, sync::Arc};

use aya::maps::lpm_trie::Key;
use sluice_api::{
    Direction, Protocol,
    explain::{
        AllowedBy, ExplainRequest, ExplainVerdict, ExplainedDirection, ExplainedEnd, KernelCheck,
        KernelFound, PolicyExplanation,
    },
};
use sluice_common::{
    ENDPOINT_F_EGRESS_ENFORCED, ENDPOINT_F_INGRESS_ENFORCED, ENDPOINT_F_POLICY_OVERFLOW,
    IDENTITY_WORLD, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IpcacheKey, POLICY_INGRESS,
    PolicyMatch, names,
};
use sluice_compiler::{
    Allow, DirectionExplanation, FlowEnd, FlowQuery, FlowSide, NodeContext, ObjectRef,
};
use sluice_realizer::PolicyLookup;

use super::{View, map_err};
use crate::AgentError;

impl View<'_> {
    pub fn explain(&self, request: &ExplainRequest) -> Result<PolicyExplanation, AgentError> {
        let flow = FlowQuery {
            from: flow_end("from", &request.from)?,
            to: flow_end("to", &request.to)?,
            port: request.port,
            protocol: protocol_number(request.protocol)?,
        };
        let explanation = sluice_compiler::explain(&self.snapshot, &self.node_context(), &flow)
            .map_err(|e| AgentError::Query(e.to_string()))?;
        let (from, to) = (&explanation.from, &explanation.to);
        Ok(PolicyExplanation {
            node: self.name.clone(),
            generation: self.desired_generation,
            realized_generation: self.realized_generation,
            from: self.end(from),
            to: self.end(to),
            port: request.port,
            protocol: request.protocol,
            allowed: explanation.allowed(),
            egress: self.direction(&explanation.egress, from, to, &flow)?,
            ingress: self.direction(&explanation.ingress, to, from, &flow)?,
        })
    }

    /// The node as the last compile saw it: its endpoints' interfaces by ifindex.
    fn node_context(&self) -> NodeContext {
        NodeContext {
            node: self.name.clone(),
            interfaces: self
                .desired
                .endpoint_details
                .iter()
                .map(|(&ifindex, d)| (d.interface.clone(), ifindex))
                .collect(),
            policy_map_max: self.policy_map_max,
            endpoints: Arc::clone(&self.endpoints),
            ..NodeContext::default()
        }
    }

    fn end(&self, side: &FlowSide) -> ExplainedEnd {
        ExplainedEnd {
            pod: side.pod.as_ref().map(pod_name),
            address: side.address,
            identity: side.identity,
            labels: self.labels(side.identity),
            node: side.node.clone(),
        }
    }

    /// One direction of `this` side with `peer` at the other end.
    fn direction(
        &self,
        explained: &DirectionExplanation,
        this: &FlowSide,
        peer: &FlowSide,
        flow: &FlowQuery,
    ) -> Result<ExplainedDirection, AgentError> {
        let verdict = verdict(explained);
        Ok(ExplainedDirection {
            direction: Direction::from_policy(explained.direction),
            verdict,
            isolated_by: explained
                .isolating
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect(),
            allowed_by: explained
                .allowed_by
                .iter()
                .map(|a| self.allowed_by(a, explained.direction))
                .collect(),
            kernel: self.kernel_check(explained.direction, this, peer, flow, verdict)?,
        })
    }

    fn allowed_by(&self, allow: &Allow, direction: u8) -> AllowedBy {
        match allow {
            Allow::Host => AllowedBy::Host,
            Allow::Rule {
                policy,
                rule,
                peer,
                port,
            } => AllowedBy::Rule {
                policy: format!("{}/{}", policy.namespace, policy.name),
                rule: *rule,
                peer: *peer,
                port: *port,
                peer_spec: peer.and_then(|n| self.peer_spec(policy, direction, *rule, n)),
            },
        }
    }

    /// The peer as the policy in the snapshot writes it, in JSON.
    fn peer_spec(
        &self,
        policy: &ObjectRef,
        direction: u8,
        rule: usize,
        peer: usize,
    ) -> Option<String> {
        let spec = self
            .snapshot
            .network_policies
            .iter()
            .find(|p| {
                p.metadata.namespace.as_deref().unwrap_or("default") == policy.namespace
                    && p.metadata.name.as_deref() == Some(policy.name.as_str())
            })?
            .spec
            .as_ref()?;
        let peer = if direction == POLICY_INGRESS {
            spec.ingress.as_ref()?.get(rule)?.from.as_ref()?.get(peer)?
        } else {
            spec.egress.as_ref()?.get(rule)?.to.as_ref()?.get(peer)?
        };
        serde_json::to_string(peer).ok()
    }

    /// The kernel's verdict for `this` side's direction, if it is an endpoint here.
    fn kernel_check(
        &self,
        direction: u8,
        this: &FlowSide,
        peer: &FlowSide,
        flow: &FlowQuery,
        desired: ExplainVerdict,
    ) -> Result<KernelCheck, AgentError> {
        let Some(pod) = &this.pod else {
            return Ok(KernelCheck::NotAPod);
        };
        let local = self
            .desired
            .endpoint_details
            .iter()
            .find(|(_, d)| d.namespace == pod.namespace && d.pod == pod.name);
        let Some((&ifindex, _)) = local else {
            return Ok(KernelCheck::NotOnThisNode {
                node: this.node.clone(),
            });
        };
        // The datapath names the peer by its address; one without (a pod with no
        // address) keeps the identity policy gave it.
        let remote_identity = match peer.address {
            Some(address) => self.ipcache_identity(address)?,
            None => peer.identity,
        };
        let found = self.kernel_found(ifindex, direction, remote_identity, flow)?;
        let allowed = !matches!(
            found,
            KernelFound::FailsClosed | KernelFound::NoPolicyMap | KernelFound::NoRow
        );
        Ok(KernelCheck::Checked {
            remote_identity,
            found,
            allowed,
            agrees: allowed == desired.allowed(),
        })
    }

    /// The endpoint's flags, then its policy map, as `policy_verdict` reads them.
    fn kernel_found(
        &self,
        ifindex: u32,
        direction: u8,
        remote_identity: u32,
        flow: &FlowQuery,
    ) -> Result<KernelFound, AgentError> {
        let enforced = if direction == POLICY_INGRESS {
            ENDPOINT_F_INGRESS_ENFORCED
        } else {
            ENDPOINT_F_EGRESS_ENFORCED
        };
        let flags = match self.tables.endpoints.get(&ifindex, 0) {
            Ok(info) => info.flags,
            Err(aya::maps::MapError::KeyNotFound) => 0,
            Err(e) => return Err(map_err(names::ENDPOINTS)(e)),
        };
        if flags & enforced == 0 {
            return Ok(KernelFound::NotEnforced);
        }
        if flags & ENDPOINT_F_POLICY_OVERFLOW != 0 {
            return Ok(KernelFound::FailsClosed);
        }
        let rule = PolicyMatch {
            identity: remote_identity,
            direction,
            proto: flow.protocol,
            dport: flow.port.to_be(),
        };
        Ok(match self.tables.policy.lookup(ifindex, rule)? {
            PolicyLookup::NoMap => KernelFound::NoPolicyMap,
            PolicyLookup::NoRow => KernelFound::NoRow,
            PolicyLookup::Row { identity, entry } => KernelFound::Row {
                identity,
                packets: entry.packets,
                bytes: entry.bytes,
            },
        })
    }

    /// The identity this node's ipcache gives `address` (the world when nothing holds it).
    fn ipcache_identity(&self, address: Ipv4Addr) -> Result<u32, AgentError> {
        let key = Key::new(32, IpcacheKey::new(address, 32).address);
        match self.tables.ipcache.get(&key, 0) {
            Ok(entry) => Ok(entry.identity),
            Err(aya::maps::MapError::KeyNotFound) => Ok(IDENTITY_WORLD),
            Err(e) => Err(map_err(names::IPCACHE)(e)),
        }
    }
}

fn verdict(explained: &DirectionExplanation) -> ExplainVerdict {
    if !explained.pod {
        ExplainVerdict::NotAPod
    } else if explained.isolating.is_empty() {
        ExplainVerdict::NotIsolated
    } else if explained.fails_closed {
        ExplainVerdict::FailsClosed
    } else if explained.allowed_by.is_empty() {
        ExplainVerdict::Denied
    } else {
        ExplainVerdict::Allowed
    }
}

fn pod_name(pod: &ObjectRef) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

/// `namespace/pod` or an IPv4 address.
fn flow_end(field: &str, value: &str) -> Result<FlowEnd, AgentError> {
    if let Ok(address) = value.parse::<Ipv4Addr>() {
        return Ok(FlowEnd::Address(address));
    }
    match value.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => Ok(FlowEnd::Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }),
        _ => Err(AgentError::Query(format!(
            "{field} {value:?} is neither namespace/pod nor an IPv4 address"
        ))),
    }
}

fn protocol_number(protocol: Protocol) -> Result<u8, AgentError> {
    match protocol {
        Protocol::Tcp => Ok(IPPROTO_TCP),
        Protocol::Udp => Ok(IPPROTO_UDP),
        Protocol::Sctp => Ok(IPPROTO_SCTP),
        other => Err(AgentError::Query(format!(
            "protocol {other}: policy judges TCP, UDP or SCTP"
        ))),
    }
}
