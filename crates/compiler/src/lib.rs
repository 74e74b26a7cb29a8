//! The compiler: a pure, deterministic function from a store [`Snapshot`] to the full
//! content of every BPF map on one node.
//!
//! It follows kube-proxy's semantics. Each port of a Service with an IPv4 cluster IP is a
//! frontend; its backends are the ready endpoints of the Service's EndpointSlices for the
//! slice port of the same name and protocol. Input is never trusted: an object or entry the
//! datapath cannot represent is skipped and reported in [`DesiredState::problems`], never a
//! panic or an error, so one odd object cannot keep the rest of the node from converging.
//! A Service field the datapath does not implement yet (NodePort, session affinity, traffic
//! policies, ...) is reported there too ([`Problem::Unsupported`]), with what is programmed
//! without it.
//!
//! NetworkPolicy follows networking.k8s.io/v1 and Cilium's layout: every distinct set of
//! security-relevant labels is an identity, the ipcache maps addresses to identities, and
//! each local endpoint gets the allow rows of the policies that select it, by identity,
//! direction, protocol and port (see `policy`).
//!
//! Several nodes: the state is compiled for one node ([`NodeContext::node`]) from the
//! Node objects of the whole cluster. The ipcache sends what lives elsewhere to its node:
//! - every pod /32 -> its identity, with `tunnel_endpoint` = its node's InternalIP when
//!   its `spec.nodeName` is another node (0 on this node);
//! - every node address (`status.addresses`) -> host on this node, remote-node on the
//!   others, without a tunnel endpoint (the underlay reaches it);
//! - every node's router address (the first host of its `spec.podCIDR`) -> host here,
//!   remote-node with that node as tunnel endpoint elsewhere;
//! - every other node's pod CIDR -> its node as tunnel endpoint, so a pod not known yet
//!   still routes there, with the identity the address has without it (the world unless
//!   a policy CIDR holds it).
//!
//! [`DesiredState::nodes`] exports the same nodes, typed, for the agent's routes and
//! tunnel: this node ([`Nodes::local`]) and every other ([`Nodes::remote`], sorted by
//! name), each a [`ClusterNode`] with its name, InternalIP, pod CIDR and
//! [`ClusterNode::router`]. A Node routing cannot use (overlapping pod CIDRs, no
//! InternalIP, a pod CIDR that is not an IPv4 network or lies outside
//! `Snapshot::cluster_cidr`) is a [`Problem::Node`] naming the field, and is left out of
//! both whole: `sluice_sources::validate_nodes` refuses the same input at the source.
//!
//! Output depends only on the content of the snapshot, not on the order of its lists:
//! services are processed sorted by name, backends are sorted by address, and conflicts are
//! resolved by that order.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::{
    core::v1::{Service, ServicePort, ServiceSpec},
    discovery::v1::EndpointSlice,
};
use sluice_common::{
    BACKEND_STATE_ACTIVE, EndpointInfo, IDENTITY_ANY, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    IpcacheEntry, IpcacheKey, Lb4Backend, Lb4BackendKey, Lb4Key, Lb4Service, Lb4SourceRangeKey,
    POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, PolicyKey, SOURCE_RANGE_ALLOWED,
    SVC_FLAG_LOCAL, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_WILDCARD,
    kinds::{FrontendKind, RuleOrigin, ServiceKind, UnknownServiceKind},
};
use sluice_store::{LocalEndpoint, Snapshot};

pub use sluice_store::nodes::{ClusterNode, NodeFault, NodeFaultAt, NodeField};

use crate::{
    backends::{
        SliceBackend, backends_for, local_ready_endpoints, slices_by_service, slot_backends,
    },
    problem::Problems,
};
pub use crate::{
    nodes::Nodes,
    problem::{
        ObjectKind, ObjectRef, PortProblem, Problem, ServiceField, ServicePortRef, Unsupported,
        ValueField,
    },
};

/// The label by which an EndpointSlice names its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Rows one endpoint's policy map holds unless configured otherwise (Cilium's default).
pub const DEFAULT_POLICY_MAP_MAX: u32 = 16384;

/// The node a state is compiled for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeContext {
    pub node: String,
    /// Host-side interface name -> ifindex in the node's netns.
    pub interfaces: BTreeMap<String, u32>,
    /// Rows one endpoint's policy map holds; an endpoint whose policy needs more fails
    /// closed and is reported.
    pub policy_map_max: u32,
}

impl Default for NodeContext {
    fn default() -> Self {
        Self {
            node: String::new(),
            interfaces: BTreeMap::new(),
            policy_map_max: DEFAULT_POLICY_MAP_MAX,
        }
    }
}

/// Everything the maps of one node should hold, and what the compiler had to leave out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredState {
    pub services: BTreeMap<Lb4Key, Lb4Service>,
    pub backends: BTreeMap<Lb4BackendKey, Lb4Backend>,
    /// ifindex -> endpoint.
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    /// Interfaces the datapath must be attached to.
    pub interfaces: BTreeSet<String>,
    /// One per programmed service port, sorted by (address, port, protocol), for display.
    pub frontends: Vec<Frontend>,
    /// Address prefix -> identity and tunnel endpoint, for every pod, node address,
    /// router address, policy CIDR and other node's pod CIDR, plus the world.
    pub ipcache: BTreeMap<IpcacheKey, IpcacheEntry>,
    /// Load balancer frontend and admitted source prefix (loadBalancerSourceRanges) ->
    /// `SOURCE_RANGE_ALLOWED`, for each frontend flagged `SVC_FLAG_SOURCE_RANGES`.
    pub source_ranges: BTreeMap<Lb4SourceRangeKey, u32>,
    /// healthCheckNodePort -> the LoadBalancer Service with externalTrafficPolicy Local it
    /// answers for, with its endpoints on this node; the agent serves each.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// This node's own IPv4 addresses (InternalIP and ExternalIP): where node ports and
    /// health checks listen.
    pub node_addresses: Vec<Ipv4Addr>,
    /// This node and the others as routing uses them, for the agent's routes and tunnel.
    pub nodes: Nodes,
    /// ifindex -> the endpoint's policy rows, for each endpoint with an enforced direction
    /// whose policy fits its map. An enforced endpoint missing here fails closed.
    pub policies: BTreeMap<u32, EndpointPolicy>,
    /// Every identity the ipcache or a policy row names, with its labels.
    pub identities: BTreeMap<u32, Identity>,
    /// ifindex -> the endpoint as people name it, for status and the CLI.
    pub endpoint_details: BTreeMap<u32, EndpointDetails>,
    /// Objects or entries skipped because the datapath cannot represent them, and Service
    /// fields it does not implement; sorted by their line.
    pub problems: Vec<Problem>,
}

/// What a healthCheckNodePort answers on this node, as kube-proxy's does: 200 with the
/// count when the Service has local endpoints, 503 without.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// A security identity: one per distinct set of security-relevant labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub id: u32,
    /// Sorted, in Cilium's `source:key=value` form: `k8s:app=web`,
    /// `k8s:io.kubernetes.pod.namespace=x`, `reserved:world`, `cidr:10.0.0.0/24`.
    pub labels: Vec<String>,
}

/// The allow rows of one endpoint's policy map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// Row -> the NetworkPolicies that allow it, or the host for the row that lets the
    /// node reach its pods.
    pub rows: BTreeMap<PolicyKey, BTreeSet<RuleOrigin>>,
}

impl EndpointPolicy {
    /// The row that admits a new connection with the peer `identity` in `direction`
    /// (`POLICY_INGRESS`/`POLICY_EGRESS`) to `proto`/`port`, with what allows it, found as
    /// the datapath finds it: the longest prefix among the peer's own rows, else among the
    /// rows for any peer (identity 0). None: policy denies it.
    pub fn admitting(
        &self,
        identity: u32,
        direction: u8,
        proto: u8,
        port: u16,
    ) -> Option<(&PolicyKey, &BTreeSet<RuleOrigin>)> {
        let covers = |key: &PolicyKey| {
            if key.prefixlen <= POLICY_PREFIX_ANY_PROTO {
                return true;
            }
            let bits = key.prefixlen.saturating_sub(POLICY_PREFIX_ANY_PORT).min(16);
            let mask = u16::MAX.checked_shl(16 - bits).unwrap_or(0);
            key.rule.proto == proto && (port & mask) == (u16::from_be(key.rule.dport) & mask)
        };
        [identity, IDENTITY_ANY].into_iter().find_map(|peer| {
            self.rows
                .iter()
                .filter(|(key, _)| {
                    key.rule.identity == peer && key.rule.direction == direction && covers(key)
                })
                .max_by_key(|(key, _)| key.prefixlen)
        })
    }
}

/// A local endpoint with its names and policy state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointDetails {
    pub namespace: String,
    pub pod: String,
    pub interface: String,
    pub ipv4: Ipv4Addr,
    pub identity: u32,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    /// Rows the endpoint's policy needs.
    pub policy_rows: usize,
    /// The policy needs more rows than the map holds: no map, fail closed.
    pub overflow: bool,
    /// NetworkPolicies (`namespace/name`) that select the endpoint, sorted.
    pub policies: Vec<String>,
}

/// A service port as programmed, with names the maps do not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// `namespace/name` of the Service.
    pub service: String,
    /// Name of the service port; empty for a service's single unnamed port.
    pub port_name: String,
    /// The Service's `spec.type`.
    pub kind: ServiceKind,
    /// Which of the Service's addresses this frontend is.
    pub frontend: FrontendKind,
    /// Traffic policy Local: the backends are this node's only.
    pub local: bool,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: u8,
    /// In slot order.
    pub backends: Vec<(Ipv4Addr, u16)>,
}

impl DesiredState {
    /// The Service fields the datapath does not implement, from [`Self::problems`].
    pub fn unsupported(&self) -> impl Iterator<Item = &Unsupported> {
        self.problems.iter().filter_map(Problem::unsupported)
    }
}

/// Computes the desired content of every map on `node` from `snapshot`.
pub fn compile(snapshot: &Snapshot, node: &NodeContext) -> DesiredState {
    let mut compilation = Compilation {
        node: node.node.clone(),
        node_addresses: nodes::node_addresses(snapshot, &node.node),
        ..Compilation::default()
    };
    compilation.state.node_addresses = compilation.node_addresses.clone();
    let slices = slices_by_service(snapshot);
    for (namespace, name, service) in services_in_order(snapshot, &mut compilation.problems) {
        let service_slices = slices
            .get(&(namespace, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let object = ObjectRef::new(ObjectKind::Service, namespace, name);
        compilation.service(&object, service, service_slices);
    }
    let local = compilation.endpoints(snapshot, node);
    compilation.state.nodes = nodes::nodes(snapshot, &node.node, &mut compilation.problems);
    let Compilation {
        mut state,
        mut problems,
        ..
    } = compilation;
    let input = policy::PolicyInput {
        snapshot,
        node,
        endpoints: &local,
    };
    policy::compile(&input, &mut state, &mut problems);
    state
        .frontends
        .sort_by_key(|f| (f.address, f.port, f.protocol));
    state.problems = problems.into_sorted();
    state
}

/// `namespace/name`, as frontends and conflicts name their Service.
fn object_name(object: &ObjectRef) -> String {
    format!("{}/{}", object.namespace, object.name)
}

fn namespace_of(namespace: Option<&String>) -> &str {
    namespace.map_or("default", String::as_str)
}

/// Services sorted by (namespace, name). A name given to more than one Service is skipped:
/// keeping either copy would make the output depend on list order.
fn services_in_order<'a>(
    snapshot: &'a Snapshot,
    problems: &mut Problems,
) -> Vec<(&'a str, &'a str, &'a Service)> {
    let mut by_name: BTreeMap<(&str, &str), Vec<&Service>> = BTreeMap::new();
    for service in &snapshot.services {
        let namespace = namespace_of(service.metadata.namespace.as_ref());
        match service.metadata.name.as_deref() {
            Some(name) if !name.is_empty() => {
                by_name.entry((namespace, name)).or_default().push(service)
            }
            _ => {
                problems.insert(Problem::UnnamedService {
                    namespace: namespace.to_string(),
                });
            }
        }
    }
    by_name
        .into_iter()
        .filter_map(|((namespace, name), copies)| match copies.as_slice() {
            [service] => Some((namespace, name, *service)),
            _ => {
                problems.insert(Problem::Duplicate {
                    object: ObjectRef::new(ObjectKind::Service, namespace, name),
                    copies: copies.len(),
                });
                None
            }
        })
        .collect()
}

/// IP protocol number of a Kubernetes protocol name; unset means TCP.
fn protocol_number(protocol: Option<&String>) -> Option<u8> {
    match protocol.map_or("TCP", String::as_str) {
        "TCP" => Some(IPPROTO_TCP),
        "UDP" => Some(IPPROTO_UDP),
        "SCTP" => Some(IPPROTO_SCTP),
        _ => None,
    }
}

fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&p| p != 0)
}

/// The state being built, with what is needed to resolve conflicts in processing order.
#[derive(Default)]
struct Compilation {
    state: DesiredState,
    problems: Problems,
    /// Which service each VIP belongs to. The API server's allocator never gives one address
    /// to two services, so a second claim is bogus input and loses.
    vip_owners: BTreeMap<Ipv4Addr, String>,
    /// Which endpoint each ifindex belongs to, for the same reason.
    ifindex_owners: BTreeMap<u32, String>,
    /// Which service each frontend (slot 0 key) belongs to: a node port, external IP or
    /// load balancer address claimed twice is kept by the first in processing order.
    frontend_owners: BTreeMap<Lb4Key, String>,
    /// The node compiled for, whose backends traffic policy Local keeps.
    node: String,
    /// Its own IPv4 addresses (InternalIP and ExternalIP), where node ports listen.
    node_addresses: Vec<Ipv4Addr>,
}

/// The addresses of one Service besides its ClusterIP, and its traffic policies.
struct ServiceAddresses {
    kind: ServiceKind,
    vip: Ipv4Addr,
    external_ips: Vec<Ipv4Addr>,
    load_balancer_ips: Vec<Ipv4Addr>,
    /// externalTrafficPolicy Local: node port, external IP and load balancer frontends.
    external_local: bool,
    /// internalTrafficPolicy Local: the ClusterIP frontend.
    internal_local: bool,
    /// loadBalancerSourceRanges of a LoadBalancer Service, IPv4 ones parsed; None: any
    /// source. Some and empty (every range IPv6 or unparsable) admits no IPv4 source.
    source_ranges: Option<Vec<Ipv4Net>>,
}

impl ServiceAddresses {
    /// Whether the traffic policy that applies to `frontend` is Local.
    fn local(&self, frontend: FrontendKind) -> bool {
        if frontend.is_external() {
            self.external_local
        } else {
            self.internal_local
        }
    }
}

/// One frontend of a service port, before it is programmed.
struct FrontendAt {
    frontend: FrontendKind,
    address: Ipv4Addr,
    port: u16,
}

impl Compilation {
    fn problem(&mut self, problem: Problem) {
        self.problems.insert(problem);
    }

    fn service(&mut self, object: &ObjectRef, service: &Service, slices: &[&EndpointSlice]) {
        let owner = object_name(object);
        let Some(spec) = &service.spec else {
            self.problem(Problem::NoSpec {
                object: object.clone(),
            });
            return;
        };
        let kind = match spec
            .type_
            .as_deref()
            .map_or(Ok(ServiceKind::ClusterIP), str::parse)
        {
            // DNS-only: there is no address to program.
            Ok(ServiceKind::ExternalName) => return,
            Ok(kind) => kind,
            Err(UnknownServiceKind(other)) => {
                self.problem(Problem::ServiceType {
                    service: object.clone(),
                    value: other,
                });
                return;
            }
        };
        let vip = match spec.cluster_ip.as_deref().unwrap_or("") {
            // Headless: clients resolve the endpoints themselves.
            "None" => return,
            "" => {
                self.problem(Problem::NoClusterIp {
                    service: object.clone(),
                });
                return;
            }
            ip => match ip.parse::<Ipv4Addr>() {
                Ok(vip) => vip,
                Err(_) => {
                    self.problem(Problem::ClusterIpNotIpv4 {
                        service: object.clone(),
                        value: ip.to_string(),
                    });
                    return;
                }
            },
        };
        if let Some(holder) = self.vip_owners.get(&vip) {
            self.problem(Problem::ClusterIpTaken {
                service: object.clone(),
                vip,
                holder: holder.clone(),
            });
            return;
        }
        self.vip_owners.insert(vip, owner);
        // What the datapath cannot do for this Service is said, not half-done silently.
        for field in unsupported::service_fields(object, service) {
            self.problem(Problem::Unsupported(field));
        }
        self.state.services.insert(
            Lb4Key::wildcard(vip),
            Lb4Service::frontend(0, SVC_FLAG_WILDCARD),
        );
        let addresses = self.service_addresses(object, kind, vip, service, spec);
        for port in spec.ports.iter().flatten() {
            self.port(object, &addresses, port, slices);
        }
        if kind == ServiceKind::LoadBalancer && addresses.external_local {
            self.health_check(object, spec, slices);
        }
    }

    /// The Service's healthCheckNodePort, if it has one; a port another Service already
    /// answers on is kept by that one and reported.
    fn health_check(&mut self, object: &ObjectRef, spec: &ServiceSpec, slices: &[&EndpointSlice]) {
        let Some(port) = spec.health_check_node_port.and_then(port_number) else {
            return;
        };
        if let Some(holder) = self.state.health_checks.get(&port) {
            let holder = format!("{}/{}", holder.namespace, holder.name);
            self.problem(Problem::HealthCheckPortTaken {
                service: object.clone(),
                port,
                holder,
            });
            return;
        }
        self.state.health_checks.insert(
            port,
            HealthCheck {
                namespace: object.namespace.clone(),
                name: object.name.clone(),
                local_endpoints: local_ready_endpoints(slices, &self.node),
            },
        );
    }

    /// The Service's external and load balancer addresses, parsed; one that is not an
    /// IPv4 address is reported and left out.
    fn service_addresses(
        &mut self,
        object: &ObjectRef,
        kind: ServiceKind,
        vip: Ipv4Addr,
        service: &Service,
        spec: &ServiceSpec,
    ) -> ServiceAddresses {
        let external_ips = spec.external_ips.iter().flatten().map(String::as_str);
        let external_ips = self.ipv4_values(object, ValueField::ExternalIp, external_ips);
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref());
        let load_balancer_ips = if kind == ServiceKind::LoadBalancer {
            self.ipv4_values(object, ValueField::LoadBalancerIngress, ingress)
        } else {
            Vec::new()
        };
        let ranges = spec
            .load_balancer_source_ranges
            .as_ref()
            .filter(|r| kind == ServiceKind::LoadBalancer && !r.is_empty());
        let source_ranges = ranges.map(|ranges| self.source_ranges(object, ranges));
        let local = |policy: Option<&String>| policy.is_some_and(|p| p == "Local");
        ServiceAddresses {
            kind,
            vip,
            external_ips,
            load_balancer_ips,
            external_local: local(spec.external_traffic_policy.as_ref()),
            internal_local: local(spec.internal_traffic_policy.as_ref()),
            source_ranges,
        }
    }

    /// The IPv4 ranges of `ranges`, sorted; IPv6 ones cannot match an IPv4 client and are
    /// skipped, unparsable ones reported.
    fn source_ranges(&mut self, object: &ObjectRef, ranges: &[String]) -> Vec<Ipv4Net> {
        let mut parsed = BTreeSet::new();
        for range in ranges {
            match range.trim().parse::<IpNet>() {
                Ok(IpNet::V4(net)) => {
                    parsed.insert(net.trunc());
                }
                Ok(IpNet::V6(_)) => {}
                Err(_) => self.problem(Problem::ServiceValue {
                    service: object.clone(),
                    field: ValueField::SourceRange,
                    value: range.clone(),
                }),
            }
        }
        parsed.into_iter().collect()
    }

    /// `values` parsed as IPv4 addresses, sorted and deduplicated; the others reported.
    fn ipv4_values<'a>(
        &mut self,
        object: &ObjectRef,
        field: ValueField,
        values: impl Iterator<Item = &'a str>,
    ) -> Vec<Ipv4Addr> {
        let mut addresses = BTreeSet::new();
        for value in values {
            match value.parse::<Ipv4Addr>() {
                Ok(address) => {
                    addresses.insert(address);
                }
                Err(_) => self.problem(Problem::ServiceValue {
                    service: object.clone(),
                    field,
                    value: value.to_string(),
                }),
            }
        }
        addresses.into_iter().collect()
    }

    fn port(
        &mut self,
        object: &ObjectRef,
        addresses: &ServiceAddresses,
        port: &ServicePort,
        slices: &[&EndpointSlice],
    ) {
        let port_name = port.name.as_deref().unwrap_or("");
        let port_problem = |problem| Problem::ServicePort {
            service: object.clone(),
            port: ServicePortRef {
                name: port_name.to_string(),
                port: port.port,
            },
            problem,
        };
        let Some(proto) = protocol_number(port.protocol.as_ref()) else {
            let protocol = port.protocol.clone().unwrap_or_default();
            self.problem(port_problem(PortProblem::Protocol(protocol)));
            return;
        };
        let Some(number) = port_number(port.port) else {
            self.problem(port_problem(PortProblem::OutOfRange));
            return;
        };
        let mut frontends = vec![FrontendAt {
            frontend: FrontendKind::ClusterIP,
            address: addresses.vip,
            port: number,
        }];
        if matches!(
            addresses.kind,
            ServiceKind::NodePort | ServiceKind::LoadBalancer
        ) {
            match port.node_port {
                Some(node_port) => match port_number(node_port) {
                    Some(node_port) => {
                        frontends.extend(self.node_addresses.iter().map(|&address| FrontendAt {
                            frontend: FrontendKind::NodePort,
                            address,
                            port: node_port,
                        }))
                    }
                    None => self.problem(port_problem(PortProblem::NodePortOutOfRange(node_port))),
                },
                // A LoadBalancer may go without node ports (allocateLoadBalancerNodePorts).
                None if addresses.kind == ServiceKind::NodePort => {
                    self.problem(port_problem(PortProblem::NoNodePort))
                }
                None => {}
            }
        }
        let at = |frontend, ips: &[Ipv4Addr]| {
            ips.iter()
                .map(move |&address| FrontendAt {
                    frontend,
                    address,
                    port: number,
                })
                .collect::<Vec<_>>()
        };
        frontends.extend(at(FrontendKind::ExternalIP, &addresses.external_ips));
        frontends.extend(at(FrontendKind::LoadBalancer, &addresses.load_balancer_ips));

        let backends = backends_for(port_name, proto, slices, &mut self.problems);
        let mut programmed = false;
        for at in frontends {
            let key = Lb4Key::new(at.address, at.port, proto, 0);
            if let Some(holder) = self.frontend_owners.get(&key) {
                let problem =
                    if *holder == object_name(object) && at.frontend == FrontendKind::ClusterIP {
                        PortProblem::ListedTwice {
                            vip: at.address,
                            port: at.port,
                            proto,
                        }
                    } else {
                        PortProblem::FrontendTaken {
                            frontend: at.frontend,
                            address: at.address,
                            port: at.port,
                            proto,
                            holder: holder.clone(),
                        }
                    };
                self.problem(port_problem(problem));
                continue;
            }
            let local = addresses.local(at.frontend);
            let mut slots = slot_backends(&backends, local.then_some(self.node.as_str()));
            // Slots are numbered by u16; a longer list cannot be addressed.
            if slots.len() > usize::from(u16::MAX) {
                self.problem(port_problem(PortProblem::TooManyBackends {
                    count: slots.len(),
                    used: u16::MAX,
                }));
                slots.truncate(usize::from(u16::MAX));
            }
            self.frontend(object, addresses, port_name, &at, proto, slots);
            programmed = true;
        }
        if programmed {
            self.backends(proto, &backends);
        }
    }

    /// Programs one frontend with its slots (at most `u16::MAX`, in slot order), and for
    /// a load balancer frontend the source ranges it admits.
    fn frontend(
        &mut self,
        object: &ObjectRef,
        addresses: &ServiceAddresses,
        port_name: &str,
        at: &FrontendAt,
        proto: u8,
        slots: Vec<(Ipv4Addr, u16)>,
    ) {
        let count = u16::try_from(slots.len()).unwrap_or(u16::MAX);
        let local = addresses.local(at.frontend);
        let mut flags = at.frontend.flag() | if local { SVC_FLAG_LOCAL } else { 0 };
        if let (FrontendKind::LoadBalancer, Some(ranges)) = (at.frontend, &addresses.source_ranges)
        {
            flags |= SVC_FLAG_SOURCE_RANGES;
            for range in ranges {
                self.state.source_ranges.insert(
                    Lb4SourceRangeKey::new(
                        at.address,
                        at.port,
                        proto,
                        range.network(),
                        range.prefix_len(),
                    ),
                    SOURCE_RANGE_ALLOWED,
                );
            }
        }
        for (slot, &(address, backend_port)) in (1..=count).zip(&slots) {
            self.state.services.insert(
                Lb4Key::new(at.address, at.port, proto, slot),
                Lb4Service::slot(address, backend_port),
            );
        }
        let key = Lb4Key::new(at.address, at.port, proto, 0);
        self.state
            .services
            .insert(key, Lb4Service::frontend(count, flags));
        self.frontend_owners.insert(key, object_name(object));
        self.state.frontends.push(Frontend {
            service: object_name(object),
            port_name: port_name.to_string(),
            kind: addresses.kind,
            frontend: at.frontend,
            local,
            address: at.address,
            port: at.port,
            protocol: proto,
            backends: slots,
        });
    }

    /// Every backend of a programmed port that may take traffic: those in its slots, and
    /// the serving-terminating ones, whose established connections keep working.
    fn backends(&mut self, proto: u8, backends: &[SliceBackend]) {
        for backend in backends.iter().filter(|b| b.may_take_traffic()) {
            self.state.backends.insert(
                Lb4BackendKey::new(backend.address, backend.port, proto),
                Lb4Backend {
                    state: BACKEND_STATE_ACTIVE,
                    ..Lb4Backend::default()
                },
            );
        }
    }

    /// Fills the endpoints map (policy adds identities and flags) and returns the
    /// endpoints that got an interface, by ifindex.
    fn endpoints<'a>(
        &mut self,
        snapshot: &'a Snapshot,
        node: &NodeContext,
    ) -> BTreeMap<u32, &'a LocalEndpoint> {
        let mut local = BTreeMap::new();
        let mut endpoints: Vec<&LocalEndpoint> = snapshot
            .endpoints
            .iter()
            .filter(|e| e.node == node.node)
            .collect();
        // Sorted so that which of two endpoints claiming one interface wins is order-independent.
        endpoints.sort_by(|a, b| {
            (&a.interface, &a.addresses, &a.namespace, &a.pod).cmp(&(
                &b.interface,
                &b.addresses,
                &b.namespace,
                &b.pod,
            ))
        });
        for endpoint in endpoints {
            let pod = format!("{}/{}", endpoint.namespace, endpoint.pod);
            let object = ObjectRef::new(ObjectKind::Endpoint, &endpoint.namespace, &endpoint.pod);
            let Some(ipv4) = endpoint.ipv4() else {
                self.problem(Problem::EndpointWithoutIpv4 { endpoint: object });
                continue;
            };
            let Some(&ifindex) = node.interfaces.get(&endpoint.interface) else {
                self.problem(Problem::InterfaceNotFound {
                    endpoint: object,
                    interface: endpoint.interface.clone(),
                    node: node.node.clone(),
                });
                continue;
            };
            if let Some(holder) = self.ifindex_owners.get(&ifindex) {
                self.problem(Problem::InterfaceTaken {
                    endpoint: object,
                    interface: endpoint.interface.clone(),
                    ifindex,
                    holder: holder.clone(),
                });
                continue;
            }
            self.ifindex_owners.insert(ifindex, pod);
            self.state
                .endpoints
                .insert(ifindex, EndpointInfo::new(ipv4, 0));
            self.state.interfaces.insert(endpoint.interface.clone());
            local.insert(ifindex, endpoint);
        }
        local
    }
}

/// The IPv4 address of an endpoint that `Compiler::endpoints` admitted: it skips, and
/// reports, every endpoint without one.
fn admitted_ipv4(endpoint: &LocalEndpoint) -> Ipv4Addr {
    endpoint.ipv4().unwrap_or(Ipv4Addr::UNSPECIFIED)
}

mod backends;
mod dump;
mod identity;
mod ipcache;
mod nodes;
mod policy;
mod problem;
mod unsupported;

#[cfg(test)]
mod tests;
