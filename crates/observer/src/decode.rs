//! From a datapath [`FlowEvent`] to a [`Flow`]: names for addresses, identities, services
//! and the policies that admitted a connection, from the agent's current desired state.

use std::{net::Ipv4Addr, sync::Arc};

use sluice_api::flow::{
    EVENT_TYPE_CLOSE, EVENT_TYPE_DROP, EVENT_TYPE_POLICY_VERDICT, EVENT_TYPE_TRACE, Endpoint,
    EventType, Flow, Icmp, Interface, Ip, Layer4, POLICY_MATCH_ALL, POLICY_MATCH_L3_L4,
    POLICY_MATCH_L3_ONLY, POLICY_MATCH_L4_ONLY, POLICY_MATCH_NONE, Policy, Ports, Service,
    TRACE_FROM_ENDPOINT, TRACE_TO_ENDPOINT, Tcp, TcpFlags, Timestamp, TraceObservationPoint,
    TrafficDirection, Verdict,
};
use sluice_common::{
    DropReason, EVENT_CLOSE, EVENT_DROP, EVENT_F_DENIED, EVENT_F_REPLY, EVENT_F_SERVICE,
    EVENT_POLICY_VERDICT, EVENT_TRACE, FlowEvent, IDENTITY_ANY, IPPROTO_SCTP, IPPROTO_TCP,
    IPPROTO_UDP, POLICY_EGRESS, POLICY_INGRESS, POLICY_PREFIX_ANY_PROTO, addr_from_be,
};
use sluice_compiler::DesiredState;

use crate::PodNames;

const IPPROTO_ICMP: u8 = 1;
/// `FlowEvent::direction` of a packet entering the pod (to_container).
const DIRECTION_INGRESS: u8 = 1;

/// Hubble's `DropReason` enum name for a datapath reason; sluice's own reasons (210-212)
/// have no Hubble name and keep theirs.
pub fn drop_reason_desc(code: u8) -> String {
    DropReason::from_code(code)
        .map_or("DROP_REASON_UNKNOWN", DropReason::hubble_name)
        .into()
}

/// Everything needed to name the parties of an event: the agent's current desired state,
/// shared rather than copied (a new one is swapped in with each new state), and the pod
/// names the agent keeps up to date in place.
#[derive(Debug, Default)]
pub struct Resolver {
    node_name: String,
    /// Wall clock minus CLOCK_MONOTONIC, in ns: turns event times into wall times.
    boot_offset_ns: i64,
    /// Identities, frontends, local endpoints and their policy rows.
    desired: Arc<DesiredState>,
    /// Pod address -> (namespace, name), for every pod of the cluster.
    pods: Arc<PodNames>,
}

impl Resolver {
    /// Names no party yet, but stamps flows with the node and the wall time: what the agent
    /// uses until its first desired state, when a restarted agent's pinned programs may
    /// already send events.
    pub fn for_node(node_name: &str, boot_offset_ns: i64) -> Self {
        Self {
            node_name: node_name.to_string(),
            boot_offset_ns,
            ..Self::default()
        }
    }

    pub fn new(
        node_name: &str,
        boot_offset_ns: i64,
        desired: Arc<DesiredState>,
        pods: Arc<PodNames>,
    ) -> Self {
        Self {
            node_name: node_name.to_string(),
            boot_offset_ns,
            desired,
            pods,
        }
    }

    /// The Service of the frontend at `address`:`port`/`protocol`, `namespace/name`.
    fn frontend(&self, address: Ipv4Addr, port: u16, protocol: u8) -> Option<&str> {
        // Sorted by (address, port, protocol); of several, the last names it.
        let frontends = &self.desired.frontends;
        let at = (address, port, protocol);
        let end = frontends.partition_point(|f| (f.address, f.port, f.protocol) <= at);
        let f = frontends.get(end.checked_sub(1)?)?;
        ((f.address, f.port, f.protocol) == at).then_some(f.service.as_str())
    }

    /// The flow an event describes.
    pub fn flow(&self, event: &FlowEvent) -> Flow {
        let saddr = addr_from_be(event.saddr);
        let daddr = addr_from_be(event.daddr);
        let (sport, dport) = (u16::from_be(event.sport), u16::from_be(event.dport));
        let ingress = event.direction == DIRECTION_INGRESS;
        let denied = event.flags & EVENT_F_DENIED != 0;
        let is_reply = event.flags & EVENT_F_REPLY != 0;
        let (verdict, reason) = match event.type_ {
            EVENT_DROP => (Verdict::Dropped, Some(event.reason)),
            EVENT_POLICY_VERDICT if denied => (Verdict::Dropped, Some(event.reason)),
            _ => (Verdict::Forwarded, None),
        };
        let (event_type, sub_type) = match event.type_ {
            EVENT_DROP => (EVENT_TYPE_DROP, i32::from(event.reason)),
            EVENT_TRACE if ingress => (EVENT_TYPE_TRACE, TRACE_TO_ENDPOINT),
            EVENT_TRACE => (EVENT_TYPE_TRACE, TRACE_FROM_ENDPOINT),
            EVENT_POLICY_VERDICT => (EVENT_TYPE_POLICY_VERDICT, 0),
            EVENT_CLOSE => (EVENT_TYPE_CLOSE, 0),
            other => (i32::from(other), 0),
        };
        let l4 = layer4(event.proto, sport, dport, event.tcp_flags, is_reply);
        let mut flow = Flow {
            time: Timestamp(
                i64::try_from(event.time_ns)
                    .unwrap_or(i64::MAX)
                    .saturating_add(self.boot_offset_ns),
            ),
            verdict,
            drop_reason: reason.map_or(0, u32::from),
            drop_reason_desc: reason.map(drop_reason_desc),
            ip: Ip {
                source: saddr,
                destination: daddr,
                ip_version: "IPv4".into(),
            },
            summary: summary(l4.as_ref(), event.proto),
            l4,
            source: self.endpoint(event.src_identity, saddr),
            destination: self.endpoint(event.dst_identity, daddr),
            flow_type: "L3_L4".into(),
            node_name: self.node_name.clone(),
            event_type: EventType {
                event_type,
                sub_type,
            },
            traffic_direction: if ingress {
                TrafficDirection::Ingress
            } else {
                TrafficDirection::Egress
            },
            policy_match_type: POLICY_MATCH_NONE,
            trace_observation_point: (event.type_ == EVENT_TRACE).then_some(if ingress {
                TraceObservationPoint::ToEndpoint
            } else {
                TraceObservationPoint::FromEndpoint
            }),
            is_reply,
            interface: Some(Interface {
                index: event.ifindex,
                name: self
                    .desired
                    .endpoint_details
                    .get(&event.ifindex)
                    .map(|d| d.interface.clone())
                    .unwrap_or_default(),
            }),
            destination_service: None,
            ingress_allowed_by: Vec::new(),
            egress_allowed_by: Vec::new(),
        };
        if event.flags & EVENT_F_SERVICE != 0 {
            let frontend = self.frontend(
                addr_from_be(event.orig_daddr),
                u16::from_be(event.orig_dport),
                event.proto,
            );
            flow.destination_service = frontend.map(|name| {
                let (namespace, name) = name.split_once('/').unwrap_or(("", name));
                Service {
                    name: name.into(),
                    namespace: namespace.into(),
                }
            });
        }
        if event.type_ == EVENT_POLICY_VERDICT && !denied {
            self.allowed_by(event, &mut flow);
        }
        flow
    }

    fn endpoint(&self, identity: u32, addr: Ipv4Addr) -> Endpoint {
        let (namespace, pod_name) = self.pods.name(addr).unwrap_or_default();
        Endpoint {
            identity,
            namespace,
            labels: self
                .desired
                .identities
                .get(&identity)
                .map(|i| i.labels.clone())
                .unwrap_or_default(),
            pod_name,
        }
    }

    /// Fills the match type and the policies of the row the datapath admitted an allowed
    /// verdict with, as the current desired state has it.
    fn allowed_by(&self, event: &FlowEvent, flow: &mut Flow) {
        let ingress = event.direction == DIRECTION_INGRESS;
        let (peer, direction) = if ingress {
            (event.src_identity, POLICY_INGRESS)
        } else {
            (event.dst_identity, POLICY_EGRESS)
        };
        // ICMP has no port: the datapath judges it with port 0, as here.
        let port = if event.proto == IPPROTO_ICMP {
            0
        } else {
            u16::from_be(event.dport)
        };
        let Some(policy) = self.desired.policies.get(&event.ifindex) else {
            // Allowed with no policy map: the direction is not enforced.
            flow.policy_match_type = POLICY_MATCH_ALL;
            return;
        };
        let Some((key, origins)) = policy.admitting(peer, direction, event.proto, port) else {
            return;
        };
        let any_peer = key.rule.identity == IDENTITY_ANY;
        let any_proto = key.prefixlen <= POLICY_PREFIX_ANY_PROTO;
        flow.policy_match_type = match (any_peer, any_proto) {
            (false, true) => POLICY_MATCH_L3_ONLY,
            (false, false) => POLICY_MATCH_L3_L4,
            (true, false) => POLICY_MATCH_L4_ONLY,
            (true, true) => POLICY_MATCH_ALL,
        };
        // Only NetworkPolicies: the node's own row is no policy object.
        let policies = origins
            .iter()
            .filter_map(|origin| origin.policy()?.split_once('/'))
            .map(|(namespace, name)| Policy {
                name: name.into(),
                namespace: namespace.into(),
                kind: "NetworkPolicy".into(),
            })
            .collect();
        if ingress {
            flow.ingress_allowed_by = policies;
        } else {
            flow.egress_allowed_by = policies;
        }
    }
}

fn layer4(proto: u8, sport: u16, dport: u16, tcp_flags: u8, is_reply: bool) -> Option<Layer4> {
    let ports = Ports {
        source_port: sport,
        destination_port: dport,
    };
    match proto {
        IPPROTO_TCP => Some(Layer4::Tcp(Tcp {
            source_port: sport,
            destination_port: dport,
            flags: (tcp_flags != 0).then(|| TcpFlags::from_bits(tcp_flags)),
        })),
        IPPROTO_UDP => Some(Layer4::Udp(ports)),
        IPPROTO_SCTP => Some(Layer4::Sctp(ports)),
        // The event carries no ICMP type; the datapath tracks echo only (its identifier as
        // both ports), so a tracked ICMP event is an echo request or, as a reply, an echo
        // reply.
        IPPROTO_ICMP => Some(Layer4::Icmpv4(Icmp {
            icmp_type: if is_reply { 0 } else { 8 },
            code: 0,
        })),
        _ => None,
    }
}

/// Hubble's summary: `TCP Flags: SYN`, `UDP`, `ICMPv4 EchoRequest`.
fn summary(l4: Option<&Layer4>, proto: u8) -> String {
    match l4 {
        Some(Layer4::Tcp(tcp)) => {
            let flags = tcp.flags.map(|f| f.names().join(", ")).unwrap_or_default();
            format!("TCP Flags: {flags}")
        }
        Some(Layer4::Udp(_)) => "UDP".into(),
        Some(Layer4::Sctp(_)) => "SCTP".into(),
        Some(Layer4::Icmpv4(icmp)) if icmp.icmp_type == 0 => "ICMPv4 EchoReply".into(),
        Some(Layer4::Icmpv4(_)) => "ICMPv4 EchoRequest".into(),
        None => format!("IP protocol {proto}"),
    }
}
