//! The compiler: a pure, deterministic function from a store [`Snapshot`] to the full
//! content of every BPF map on one node.
//!
//! It follows kube-proxy's semantics. Each port of a Service with an IPv4 cluster IP is a
//! frontend on that IP, on its nodePort at each of this node's addresses, on each external
//! IP and on each load balancer ingress IP (`services`); its backends are the ready
//! endpoints of the Service's EndpointSlices for the slice port of the same name and
//! protocol, or the serving-terminating ones when none is ready, and only this node's under
//! traffic policy Local; otherwise the ready ones narrow to this node's zone (or the node
//! itself) when the Service's traffic distribution asks for it and one is there
//! (`topology`). Input is never trusted: an object or entry the datapath cannot
//! represent is skipped and reported in [`DesiredState::problems`], never a panic or an
//! error, so one odd object cannot keep the rest of the node from converging. A Service
//! field the datapath does not implement yet (dual stack, loadBalancerIP, ...) is reported
//! there too ([`Problem::Unsupported`]), with what is programmed without it.
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
//!
//! [`CompileCache`] gives the same output recomputing only what changed since its last
//! call: the Services whose object, slices or node inputs changed, and the policy part when
//! pods, namespaces, policies, nodes or local endpoints did.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use sluice_common::{
    EndpointInfo, IDENTITY_ANY, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IpcacheEntry, IpcacheKey,
    Lb4Backend, Lb4BackendKey, Lb4Key, Lb4Service, Lb4SourceRangeKey, POLICY_PREFIX_ANY_PORT,
    POLICY_PREFIX_ANY_PROTO, PolicyKey,
    kinds::{FrontendKind, RuleOrigin, ServiceKind},
};
use sluice_store::{LocalEndpoint, Snapshot};

pub use sluice_store::nodes::{ClusterNode, NodeFault, NodeFaultAt, NodeField};

use crate::{backends::slices_by_service, problem::Problems};
pub use crate::{
    balancing::{Balancing, DEFAULT_AFFINITY_TIMEOUT, LB_ALGORITHM_ANNOTATION, LbAlgorithm},
    changes::{Changes, Delta, ObjectKey, object_key, object_key_ref, pod_key, pod_key_ref},
    incremental::{CacheStats, CompileCache},
    nodes::Nodes,
    policy::explain::{
        Allow, DirectionExplanation, Explanation, FlowEnd, FlowQuery, FlowSide, Unexplained,
    },
    problem::{
        ObjectKind, ObjectRef, PortProblem, Problem, ServiceField, ServicePortRef, Unsupported,
        ValueField,
    },
};

/// The label by which an EndpointSlice names its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Rows one endpoint's policy map holds unless configured otherwise (Cilium's default).
pub const DEFAULT_POLICY_MAP_MAX: u32 = 16384;

/// Every Service annotation the compiler reads; a source may drop the others.
pub const SERVICE_ANNOTATIONS: [&str; 2] = [
    balancing::LB_ALGORITHM_ANNOTATION,
    topology::TOPOLOGY_MODE_ANNOTATION,
];

/// The node a state is compiled for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeContext {
    pub node: String,
    /// Host-side interface name -> ifindex in the node's netns.
    pub interfaces: BTreeMap<String, u32>,
    /// Rows one endpoint's policy map holds; an endpoint whose policy needs more fails
    /// closed and is reported.
    pub policy_map_max: u32,
    /// The default load-balancing algorithm and the Maglev table size.
    pub balancing: Balancing,
    /// The CNI plugin's endpoints, besides the snapshot's own (a cluster file's): an input
    /// of their own, so adding them costs no copy of the snapshot.
    pub endpoints: Arc<Vec<LocalEndpoint>>,
}

impl Default for NodeContext {
    fn default() -> Self {
        Self {
            node: String::new(),
            interfaces: BTreeMap::new(),
            policy_map_max: DEFAULT_POLICY_MAP_MAX,
            balancing: Balancing::default(),
            endpoints: Arc::default(),
        }
    }
}

/// Everything the maps of one node should hold, and what the compiler had to leave out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredState {
    pub services: BTreeMap<Lb4Key, Lb4Service>,
    pub backends: BTreeMap<Lb4BackendKey, Lb4Backend>,
    /// Frontend (slot 0 key) -> its Maglev table, for frontends with SVC_FLAG_MAGLEV and
    /// at least one backend: M backend slot numbers (`maglev::table`). Frontends of one
    /// Service with the same backends share one table.
    pub maglev: BTreeMap<Lb4Key, Arc<[u16]>>,
    /// ifindex -> endpoint.
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    /// Interfaces the datapath must be attached to.
    pub interfaces: BTreeSet<String>,
    /// One per programmed frontend (a service port on one of its addresses), sorted by
    /// (address, port, protocol), for display.
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

/// A frontend as programmed: one service port on one of its addresses, with names the
/// maps do not hold.
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
    let mut compilation = Compilation::for_services(snapshot, node);
    let slices = slices_by_service(snapshot);
    for (namespace, name, service) in services_in_order(snapshot, &mut compilation.problems) {
        let object = ObjectRef::new(ObjectKind::Service, namespace, name);
        compilation.service(
            &object,
            service,
            slices_of(&slices, namespace, name),
            node.balancing,
        );
    }
    compilation.finish(compile_workloads(snapshot, node, false))
}

/// The slices of the Service `namespace/name`, from [`slices_by_service`].
fn slices_of<'s, 'a>(
    slices: &'s BTreeMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
    namespace: &'a str,
    name: &'a str,
) -> &'s [&'a EndpointSlice] {
    slices
        .get(&(namespace, name))
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The part of the state that does not depend on Services: endpoints, nodes, identities,
/// the ipcache and policy, from pods, namespaces, policies, nodes and local endpoints.
/// With `index`, also what each pod contributes, so that a later Pod change can be
/// compiled in place ([`policy::WorkloadIndex`]).
fn compile_workloads(snapshot: &Snapshot, node: &NodeContext, index: bool) -> Workloads {
    let (compilation, local) = Compilation::for_policy(snapshot, node);
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
    let index = policy::compile(&input, &mut state, &mut problems, index);
    Workloads {
        state,
        problems,
        index,
    }
}

/// Explains one new connection on `node`: the verdict of the source's egress and of the
/// destination's ingress, with the NetworkPolicies that isolate each side and the rules,
/// peers and ports that allow it, judged as [`compile`] programs them (no traffic, no
/// kernel). Either end is a pod or an address.
pub fn explain(
    snapshot: &Snapshot,
    node: &NodeContext,
    flow: &FlowQuery,
) -> Result<Explanation, Unexplained> {
    let (mut compilation, local) = Compilation::for_policy(snapshot, node);
    let input = policy::PolicyInput {
        snapshot,
        node,
        endpoints: &local,
    };
    policy::explain(&input, &mut compilation.state, flow)
}

/// What [`compile_workloads`] computes: its fields of a [`DesiredState`] and its problems.
struct Workloads {
    state: DesiredState,
    problems: Problems,
    /// What it was compiled from, when asked for.
    index: Option<policy::WorkloadIndex>,
}

/// `namespace/name`, as frontends and conflicts name their Service.
fn object_name(object: &ObjectRef) -> String {
    format!("{}/{}", object.namespace, object.name)
}

fn namespace_of(namespace: Option<&String>) -> &str {
    namespace_or_default(namespace.map(String::as_str))
}

fn namespace_or_default(namespace: Option<&str>) -> &str {
    namespace.unwrap_or("default")
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
    /// Its zone label, which traffic distribution prefers backends in.
    zone: Option<String>,
    /// Maglev tables computed so far, by backends and size: the frontends of one Service
    /// (ClusterIP, NodePort on each address, ...) share one.
    maglev_tables: balancing::MaglevTables,
}

impl Compilation {
    /// An empty compilation of the Services of `node`, with the node's inputs they read.
    fn for_services(snapshot: &Snapshot, node: &NodeContext) -> Self {
        let node_addresses = nodes::node_addresses(snapshot, &node.node);
        let mut compilation = Self {
            node: node.node.clone(),
            node_addresses: node_addresses.clone(),
            zone: nodes::node_zone(snapshot, &node.node),
            ..Self::default()
        };
        compilation.state.node_addresses = node_addresses;
        compilation
    }

    /// A compilation of the policy part: the local endpoints admitted (returned by
    /// ifindex) and the nodes.
    fn for_policy<'a>(
        snapshot: &'a Snapshot,
        node: &'a NodeContext,
    ) -> (Self, BTreeMap<u32, &'a LocalEndpoint>) {
        let mut compilation = Self::default();
        let local = compilation.endpoints(snapshot, node);
        compilation.state.nodes = nodes::nodes(snapshot, &node.node, &mut compilation.problems);
        (compilation, local)
    }

    /// The whole state: these Services with the `workloads` part beside them.
    fn finish(self, workloads: Workloads) -> DesiredState {
        let Self {
            mut state,
            mut problems,
            ..
        } = self;
        let Workloads {
            state: other,
            problems: other_problems,
            ..
        } = workloads;
        state.endpoints = other.endpoints;
        state.interfaces = other.interfaces;
        state.nodes = other.nodes;
        state.ipcache = other.ipcache;
        state.policies = other.policies;
        state.identities = other.identities;
        state.endpoint_details = other.endpoint_details;
        problems.extend(&other_problems);
        state
            .frontends
            .sort_by_key(|f| (f.address, f.port, f.protocol));
        state.problems = problems.into_sorted();
        state
    }

    fn problem(&mut self, problem: Problem) {
        self.problems.insert(problem);
    }

    /// Fills the endpoints map (policy adds identities and flags) and returns the
    /// endpoints that got an interface, by ifindex.
    fn endpoints<'a>(
        &mut self,
        snapshot: &'a Snapshot,
        node: &'a NodeContext,
    ) -> BTreeMap<u32, &'a LocalEndpoint> {
        let mut local = BTreeMap::new();
        let mut endpoints: Vec<&LocalEndpoint> = snapshot
            .endpoints
            .iter()
            .chain(node.endpoints.iter())
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
mod balancing;
mod changes;
mod dump;
mod identity;
mod incremental;
mod ipcache;
pub mod maglev;
mod nodes;
mod policy;
mod problem;
mod services;
mod topology;
mod unsupported;

#[cfg(test)]
mod tests;
