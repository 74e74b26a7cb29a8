//! What the compiler reports: input it skipped or programmed only in part, and Service fields
//! the datapath does not implement yet. Each report names its object and renders as one line.

use std::{fmt, net::Ipv4Addr};

use sluice_common::{kinds::FrontendKind, proto_name};
use sluice_store::nodes::NodeFaultAt;

/// The kinds of object a report can be about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    NetworkPolicy,
    /// A local endpoint as the node reports it, named by its pod.
    Endpoint,
}

impl ObjectKind {
    /// The Kubernetes kind (`Service`); a local endpoint is `Endpoint`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Namespace => "Namespace",
            Self::Pod => "Pod",
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::NetworkPolicy => "NetworkPolicy",
            Self::Endpoint => "Endpoint",
        }
    }
}

/// One object: its kind, namespace (empty for a Namespace) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: ObjectKind, namespace: &str, name: &str) -> Self {
        Self {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

/// `service default/web`, as reports name objects.
impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let noun = self.kind.as_str().to_ascii_lowercase();
        if self.namespace.is_empty() {
            write!(f, "{noun} {}", self.name)
        } else {
            write!(f, "{noun} {}/{}", self.namespace, self.name)
        }
    }
}

/// A Service field the datapath does not implement yet. The Service is programmed without
/// it; [`ServiceField::programmed`] says what that leaves.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Unsupported {
    pub object: ObjectRef,
    pub field: ServiceField,
    /// The value as written; list values joined by ','.
    pub value: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} {:?} is not implemented: {}",
            self.object,
            self.field.path(),
            self.value,
            self.field.programmed()
        )
    }
}

/// Service fields with behaviour the datapath lacks, when set to other than their default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceField {
    LoadBalancerIp,
    /// A value other than PreferClose, PreferSameZone and PreferSameNode.
    TrafficDistribution,
    /// Any family but IPv4.
    IpFamilies,
    /// RequireDualStack.
    IpFamilyPolicy,
    /// The `service.kubernetes.io/topology-mode` annotation (topology aware routing),
    /// other than Auto and Disabled.
    TopologyMode,
}

impl ServiceField {
    /// The field's path in the Service, as the API server names it in errors.
    pub fn path(self) -> &'static str {
        match self {
            Self::LoadBalancerIp => "spec.loadBalancerIP",
            Self::TrafficDistribution => "spec.trafficDistribution",
            Self::IpFamilies => "spec.ipFamilies",
            Self::IpFamilyPolicy => "spec.ipFamilyPolicy",
            Self::TopologyMode => "metadata.annotations[service.kubernetes.io/topology-mode]",
        }
    }

    /// What the datapath does for the Service without the field.
    pub fn programmed(self) -> &'static str {
        match self {
            Self::LoadBalancerIp => {
                "the address is not programmed (status.loadBalancer.ingress is)"
            }
            Self::TrafficDistribution | Self::TopologyMode => {
                "backends are chosen without regard to topology"
            }
            Self::IpFamilies | Self::IpFamilyPolicy => "only the IPv4 ClusterIP is programmed",
        }
    }
}

/// Which port of a Service: `port "http"` or, for an unnamed one, `port 80`. Not its list
/// index, which would make reports depend on list order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortRef {
    pub name: String,
    pub port: i32,
}

impl fmt::Display for ServicePortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            write!(f, "port {}", self.port)
        } else {
            write!(f, "port {:?}", self.name)
        }
    }
}

/// What is wrong with one port of a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortProblem {
    /// Skipped.
    Protocol(String),
    /// Skipped.
    OutOfRange,
    /// Another port of the Service has the same number and protocol: skipped.
    ListedTwice { vip: Ipv4Addr, port: u16, proto: u8 },
    /// More backends than slots can number: the first are used.
    TooManyBackends { count: usize, used: u16 },
    /// A NodePort Service port without a nodePort: no node port frontend.
    NoNodePort,
    /// A nodePort that is not a port number: no node port frontend.
    NodePortOutOfRange(i32),
    /// The frontend (a node port, external IP or load balancer address) already belongs
    /// to `holder` (`namespace/name`, maybe this Service): skipped.
    FrontendTaken {
        frontend: FrontendKind,
        address: Ipv4Addr,
        port: u16,
        proto: u8,
        holder: String,
    },
}

/// A Service field holding addresses the compiler parses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ValueField {
    ExternalIp,
    LoadBalancerIngress,
    SourceRange,
}

impl ValueField {
    /// The field's path in the Service.
    pub fn path(self) -> &'static str {
        match self {
            Self::ExternalIp => "spec.externalIPs",
            Self::LoadBalancerIngress => "status.loadBalancer.ingress[].ip",
            Self::SourceRange => "spec.loadBalancerSourceRanges",
        }
    }

    /// What a value must be.
    pub fn expected(self) -> &'static str {
        match self {
            Self::ExternalIp | Self::LoadBalancerIngress => "an IPv4 address",
            Self::SourceRange => "an IPv4 CIDR",
        }
    }
}

/// Input the compiler skipped or programmed in part, or a field it does not implement.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Problem {
    Unsupported(Unsupported),
    /// A Node routing cannot use: left out of routing whole.
    Node(NodeFaultAt),
    /// A Service, NetworkPolicy or Pod defined more than once: every copy is skipped.
    Duplicate {
        object: ObjectRef,
        copies: usize,
    },
    /// A Namespace defined more than once: its labels are ignored.
    NamespaceDuplicate {
        name: String,
    },
    /// A Service or NetworkPolicy without a spec: skipped.
    NoSpec {
        object: ObjectRef,
    },
    /// A Service without a name: skipped.
    UnnamedService {
        namespace: String,
    },
    ServiceType {
        service: ObjectRef,
        value: String,
    },
    /// A load-balancing setting the API would refuse (`field` is its path): the Service is
    /// programmed as `fallback` says.
    BalancingSetting {
        service: ObjectRef,
        field: &'static str,
        value: String,
        fallback: &'static str,
    },
    NoClusterIp {
        service: ObjectRef,
    },
    ClusterIpNotIpv4 {
        service: ObjectRef,
        value: String,
    },
    /// `holder` is the `namespace/name` of the Service that keeps the address.
    ClusterIpTaken {
        service: ObjectRef,
        vip: Ipv4Addr,
        holder: String,
    },
    ServicePort {
        service: ObjectRef,
        port: ServicePortRef,
        problem: PortProblem,
    },
    /// The healthCheckNodePort already answers for `holder` (`namespace/name`): not served.
    HealthCheckPortTaken {
        service: ObjectRef,
        port: u16,
        holder: String,
    },
    /// An address or range of the Service that is not IPv4: left out.
    ServiceValue {
        service: ObjectRef,
        field: ValueField,
        value: String,
    },
    SlicePortNumber {
        slice: ObjectRef,
        port_name: String,
        number: Option<i32>,
    },
    SliceEndpointWithoutAddress {
        slice: ObjectRef,
    },
    SliceAddressNotIpv4 {
        slice: ObjectRef,
        address: String,
    },
    /// A local endpoint with no IPv4 address, which the datapath cannot serve yet.
    EndpointWithoutIpv4 {
        endpoint: ObjectRef,
    },
    InterfaceNotFound {
        endpoint: ObjectRef,
        interface: String,
        node: String,
    },
    /// `holder` is the `namespace/pod` of the endpoint that keeps the interface.
    InterfaceTaken {
        endpoint: ObjectRef,
        interface: String,
        ifindex: u32,
        holder: String,
    },
    /// A local endpoint without a Pod object: a pod without labels.
    EndpointWithoutPod {
        endpoint: ObjectRef,
    },
    /// The endpoint's policy does not fit its map: it fails closed.
    PolicyOverflow {
        endpoint: ObjectRef,
        rows: usize,
        capacity: u32,
    },
    PodAddressOfNode {
        pod: ObjectRef,
        address: Ipv4Addr,
    },
    /// `holder` is the `namespace/name` of the pod that keeps the address.
    PodAddressTaken {
        pod: ObjectRef,
        address: Ipv4Addr,
        holder: String,
    },
    /// No identity number is left for these pod labels: the pods are the world.
    PodIdentitiesExhausted {
        labels: Vec<String>,
    },
    /// No identity number is left for this CIDR's labels: it is the world.
    CidrIdentitiesExhausted {
        labels: Vec<String>,
    },
    /// The peer matches nothing.
    PolicyCidr {
        policy: ObjectRef,
        cidr: String,
    },
    /// The port matches nothing.
    PolicyPortProtocol {
        policy: ObjectRef,
        protocol: String,
    },
    /// The port matches nothing.
    PolicyPortRange {
        policy: ObjectRef,
        first: i32,
        last: i32,
    },
}

impl Problem {
    /// The Service field report, if this is one.
    pub fn unsupported(&self) -> Option<&Unsupported> {
        match self {
            Self::Unsupported(u) => Some(u),
            _ => None,
        }
    }
}

impl fmt::Display for PortProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Protocol(p) => write!(f, "unsupported protocol {p:?}: skipped"),
            Self::OutOfRange => write!(f, "out of range: skipped"),
            Self::ListedTwice { vip, port, proto } => {
                write!(
                    f,
                    "{vip}:{port}/{} is listed twice: skipped",
                    proto_name(*proto)
                )
            }
            Self::TooManyBackends { count, used } => {
                write!(f, "{count} backends, only the first {used} are used")
            }
            Self::NoNodePort => write!(f, "no nodePort allocated: no node port frontend"),
            Self::NodePortOutOfRange(port) => {
                write!(f, "nodePort {port} is out of range: no node port frontend")
            }
            Self::FrontendTaken {
                frontend,
                address,
                port,
                proto,
                holder,
            } => write!(
                f,
                "{frontend} frontend {address}:{port}/{} already belongs to {holder}: skipped",
                proto_name(*proto)
            ),
        }
    }
}

/// One line per problem, naming the object first so that sorted reports group by object.
impl fmt::Display for Problem {
    // Long, but one arm per variant: the wording of every report, in one place.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsupported(u) => u.fmt(f),
            Self::Node(at) if at.node.is_empty() => {
                write!(f, "node without a name: {}: skipped", at.fault)
            }
            Self::Node(at) => write!(
                f,
                "node {}: {}: {}: left out of routing",
                at.node,
                at.fault.field().path(),
                at.fault
            ),
            Self::Duplicate { object, copies } => {
                write!(f, "{object}: defined {copies} times: skipped")
            }
            Self::NamespaceDuplicate { name } => write!(
                f,
                "namespace {name}: defined more than once: its labels are ignored"
            ),
            Self::NoSpec { object } => write!(f, "{object}: no spec: skipped"),
            Self::UnnamedService { namespace } => {
                write!(
                    f,
                    "service without a name in namespace {namespace}: skipped"
                )
            }
            Self::ServiceType { service, value } => {
                write!(f, "{service}: unsupported type {value:?}: skipped")
            }
            Self::BalancingSetting {
                service,
                field,
                value,
                fallback,
            } => write!(f, "{service}: {field} {value:?} is {fallback}"),
            Self::NoClusterIp { service } => {
                write!(f, "{service}: no clusterIP allocated: skipped")
            }
            Self::ClusterIpNotIpv4 { service, value } => write!(
                f,
                "{service}: clusterIP {value:?} is not an IPv4 address: skipped"
            ),
            Self::ClusterIpTaken {
                service,
                vip,
                holder,
            } => write!(
                f,
                "{service}: clusterIP {vip} already belongs to {holder}: skipped"
            ),
            Self::ServicePort {
                service,
                port,
                problem,
            } => write!(f, "{service} {port}: {problem}"),
            Self::HealthCheckPortTaken {
                service,
                port,
                holder,
            } => write!(
                f,
                "{service}: healthCheckNodePort {port} already answers for {holder}: not served"
            ),
            Self::ServiceValue {
                service,
                field,
                value,
            } => write!(
                f,
                "{service}: {} {value:?} is not {}: left out",
                field.path(),
                field.expected()
            ),
            Self::SlicePortNumber {
                slice,
                port_name,
                number,
            } => write!(
                f,
                "{slice} port {port_name:?}: no usable port number ({number:?}): skipped"
            ),
            Self::SliceEndpointWithoutAddress { slice } => {
                write!(f, "{slice}: endpoint without an address: skipped")
            }
            Self::SliceAddressNotIpv4 { slice, address } => {
                write!(f, "{slice}: address {address:?} is not IPv4: skipped")
            }
            Self::EndpointWithoutIpv4 { endpoint } => write!(
                f,
                "{endpoint}: no IPv4 address (IPv6 is not supported yet): skipped"
            ),
            Self::InterfaceNotFound {
                endpoint,
                interface,
                node,
            } => write!(
                f,
                "{endpoint}: interface {interface} not found on node {node}: skipped"
            ),
            Self::InterfaceTaken {
                endpoint,
                interface,
                ifindex,
                holder,
            } => write!(
                f,
                "{endpoint}: interface {interface} (ifindex {ifindex}) already belongs to \
                 endpoint {holder}: skipped"
            ),
            Self::EndpointWithoutPod { endpoint } => write!(
                f,
                "{endpoint}: no Pod object: treated as a pod without labels"
            ),
            Self::PolicyOverflow {
                endpoint,
                rows,
                capacity,
            } => write!(
                f,
                "{endpoint}: policy needs {rows} rows, the map holds {capacity}: fails closed"
            ),
            Self::PodAddressOfNode { pod, address } => write!(
                f,
                "{pod}: address {address} belongs to a node: not in the ipcache"
            ),
            Self::PodAddressTaken {
                pod,
                address,
                holder,
            } => write!(
                f,
                "{pod}: address {address} already belongs to pod {holder}: not in the ipcache"
            ),
            Self::PodIdentitiesExhausted { labels } => write!(
                f,
                "identity space exhausted: pods labelled {} are the world",
                labels.join(",")
            ),
            Self::CidrIdentitiesExhausted { labels } => write!(
                f,
                "identity space exhausted: {} is the world",
                labels.join(",")
            ),
            Self::PolicyCidr { policy, cidr } => write!(
                f,
                "{policy}: ipBlock {cidr:?} is not a CIDR: the peer matches nothing"
            ),
            Self::PolicyPortProtocol { policy, protocol } => write!(
                f,
                "{policy}: unsupported protocol {protocol:?}: the port matches nothing"
            ),
            Self::PolicyPortRange {
                policy,
                first,
                last,
            } => write!(
                f,
                "{policy}: port range {first}..{last} is empty or out of range: the port matches nothing"
            ),
        }
    }
}

/// Problems as the compiler collects them: deduplicated, and sorted by their line so that
/// output does not depend on the order in which input was visited.
#[derive(Clone, Default)]
pub(crate) struct Problems(std::collections::BTreeMap<String, Problem>);

impl Problems {
    pub(crate) fn insert(&mut self, problem: Problem) {
        self.0.entry(problem.to_string()).or_insert(problem);
    }

    /// Adds every problem of `other`.
    pub(crate) fn extend(&mut self, other: &Problems) {
        for (line, problem) in &other.0 {
            self.0
                .entry(line.clone())
                .or_insert_with(|| problem.clone());
        }
    }

    /// Keeps the problems `keep` says to.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Problem) -> bool) {
        self.0.retain(|_, problem| keep(problem));
    }

    /// Each problem with its line, by line.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &Problem)> {
        self.0.iter()
    }

    pub(crate) fn into_sorted(self) -> Vec<Problem> {
        self.0.into_values().collect()
    }
}
