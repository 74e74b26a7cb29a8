//! The sluice variant: the datapath loaded and attached on the node's pod-facing veths, its
//! maps programmed by the compiler and the realizer exactly as the agent does it, and the
//! policy-convergence measurement on 1,000 synthetic endpoints.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::{
            LoadBalancerIngress, LoadBalancerStatus, Namespace, Pod, PodIP, PodSpec, PodStatus,
            Service, ServicePort, ServiceSpec as K8sServiceSpec, ServiceStatus,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
        networking::v1::{
            NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
            NetworkPolicySpec,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::LabelSelector, apis::meta::v1::ObjectMeta, util::intstr::IntOrString,
    },
};
use sluice_common::programs;
use sluice_compiler::{DEFAULT_POLICY_MAP_MAX, NodeContext, compile};
use sluice_datapath::{AttachRole, Datapath, DatapathConfig, PinDir, PinnedMaps};
use sluice_realizer::{Desired, KernelTables};
use sluice_store::{LocalEndpoint, Snapshot};

use crate::{BenchError, kproxy::ServiceSpec, netns::NetNs};

pub const NODE: &str = "bench";
const NAMESPACE: &str = "bench";

pub(crate) fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NAMESPACE.into()),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        }),
        ..ObjectMeta::default()
    }
}

fn pod(name: &str, app: &str, ip: Ipv4Addr) -> sluice_store::Pod {
    pod_on(NODE, name, app, ip)
}

/// A running pod on `node`.
pub(crate) fn pod_on(node: &str, name: &str, app: &str, ip: Ipv4Addr) -> sluice_store::Pod {
    Pod {
        metadata: meta(name, &[("app", app)]),
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.to_string()),
            pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
            ..PodStatus::default()
        }),
    }
    .into()
}

pub(crate) fn service_objects(s: &ServiceSpec) -> (Service, EndpointSlice) {
    let service = Service {
        metadata: meta(&s.name, &[]),
        spec: Some(K8sServiceSpec {
            cluster_ip: Some(s.vip.to_string()),
            type_: Some(
                if s.external.is_some() {
                    "LoadBalancer"
                } else {
                    "ClusterIP"
                }
                .into(),
            ),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: i32::from(s.port),
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::Int(i32::from(s.target_port))),
                node_port: s.external.map(|e| i32::from(e.node_port)),
                ..ServicePort::default()
            }]),
            external_traffic_policy: s.external.map(|_| "Cluster".into()),
            ..K8sServiceSpec::default()
        }),
        status: s.external.map(|e| ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some(e.load_balancer_ip.to_string()),
                    ip_mode: Some("VIP".into()),
                    ..LoadBalancerIngress::default()
                }]),
            }),
            ..ServiceStatus::default()
        }),
    };
    let slice = EndpointSlice {
        metadata: meta(
            &format!("{}-1", s.name),
            &[("kubernetes.io/service-name", &s.name)],
        ),
        address_type: "IPv4".into(),
        endpoints: s
            .backends
            .iter()
            .map(|b| Endpoint {
                addresses: vec![b.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    ..EndpointConditions::default()
                }),
                ..Endpoint::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(i32::from(s.target_port)),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    };
    (service, slice)
}

/// The pods of the topology: (name, app label, address, host-side interface).
fn topology_pods() -> Vec<(String, &'static str, Ipv4Addr, &'static str)> {
    let mut pods = vec![(
        "client".to_owned(),
        "client",
        crate::CLIENT_IP,
        crate::CLIENT_IF,
    )];
    for (i, (ip, lxc)) in crate::SERVER_IPS.iter().zip(crate::SERVER_IFS).enumerate() {
        pods.push((format!("server-{i}"), "server", *ip, lxc));
    }
    pods
}

/// A snapshot with `services` and the topology's pods as this node's endpoints.
pub fn snapshot(services: &[ServiceSpec]) -> Snapshot {
    let pods = topology_pods();
    let mut snap = Snapshot {
        revision: 1,
        namespaces: vec![Namespace {
            metadata: ObjectMeta {
                name: Some(NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }],
        pods: pods
            .iter()
            .map(|(name, app, ip, _)| pod(name, app, *ip))
            .collect(),
        endpoints: pods
            .iter()
            .map(|(name, _, ip, lxc)| LocalEndpoint {
                node: NODE.into(),
                namespace: NAMESPACE.into(),
                pod: name.clone(),
                interface: (*lxc).into(),
                addresses: [(*ip).into()].into(),
            })
            .collect(),
        ..Snapshot::default()
    };
    add_services(&mut snap, services);
    snap
}

pub fn add_services(snap: &mut Snapshot, services: &[ServiceSpec]) {
    for s in services {
        let (service, slice) = service_objects(s);
        snap.services.push(service);
        snap.endpoint_slices.push(slice.into());
    }
}

/// How long one programming step took, split into compile and realize.
#[derive(Clone, Copy, Debug, Default)]
pub struct Programming {
    pub compile: Duration,
    pub realize: Duration,
}

impl Programming {
    pub fn total(&self) -> Duration {
        self.compile + self.realize
    }
}

fn realizer_err(e: sluice_realizer::RealizerError) -> BenchError {
    BenchError::Failed(format!("realize: {e}"))
}

pub(crate) fn program(
    pin_dir: &Path,
    snap: &Snapshot,
    node: &NodeContext,
) -> Result<Programming, BenchError> {
    let t = Instant::now();
    let state = compile(snap, node);
    let compiled = t.elapsed();
    if let Some(problem) = state.problems.first() {
        return Err(BenchError::Failed(format!("compiler: {problem}")));
    }
    let t = Instant::now();
    let mut tables = KernelTables::open(pin_dir).map_err(realizer_err)?;
    tables
        .realize(Desired::of(&state, node.policy_map_max))
        .map_err(realizer_err)?;
    Ok(Programming {
        compile: compiled,
        realize: t.elapsed(),
    })
}

/// How long compiling a snapshot with `services` takes (the topology's endpoints, no
/// kernel involved).
pub fn compile_time(services: &[ServiceSpec]) -> Duration {
    let snap = snapshot(services);
    let node = NodeContext {
        node: NODE.into(),
        interfaces: topology_pods()
            .into_iter()
            .zip(1..)
            .map(|((_, _, _, lxc), ifindex)| (lxc.to_owned(), ifindex))
            .collect(),
        policy_map_max: DEFAULT_POLICY_MAP_MAX,
        ..NodeContext::default()
    };
    let t = Instant::now();
    let state = compile(&snap, &node);
    let took = t.elapsed();
    drop(state);
    took
}

/// The datapath attached to the node's veths and programmed with a snapshot.
pub struct Sluice {
    // Dropped before the pins: closing the programs, then unpinning the links detaches them.
    datapath: Datapath,
    pins: PinDir,
    node: NodeContext,
    snap: Snapshot,
}

impl Sluice {
    /// Loads the datapath, attaches it to every pod's veth in `node_ns` and programs
    /// `services`; returns the time programming took.
    pub fn start(
        node_ns: &NetNs,
        services: &[ServiceSpec],
    ) -> Result<(Self, Programming), BenchError> {
        let interfaces: Vec<&'static str> = topology_pods()
            .into_iter()
            .map(|(_, _, _, lxc)| lxc)
            .collect();
        let pins = PinDir::unique("sluice-bench-");
        let pin_dir = pins.path().to_owned();
        let (datapath, ifindexes) = node_ns.run(move || {
            let mut datapath = Datapath::load(&pin_dir, &DatapathConfig::default())
                .map_err(|e| BenchError::Failed(format!("loading the datapath: {e}")))?;
            let mut ifindexes = BTreeMap::new();
            for ifname in interfaces {
                datapath
                    .attach(AttachRole::PodVeth, ifname)
                    .map_err(|e| BenchError::Failed(format!("attach {ifname}: {e}")))?;
                let ifindex =
                    nix::net::if_::if_nametoindex(ifname).map_err(|errno| BenchError::Io {
                        call: "if_nametoindex",
                        what: ifname.into(),
                        source: errno.into(),
                    })?;
                ifindexes.insert(ifname.to_owned(), ifindex);
            }
            Ok((datapath, ifindexes))
        })?;
        let node = NodeContext {
            node: NODE.into(),
            interfaces: ifindexes,
            policy_map_max: DEFAULT_POLICY_MAP_MAX,
            ..NodeContext::default()
        };
        let snap = snapshot(services);
        let programming = program(pins.path(), &snap, &node)?;
        Ok((
            Self {
                datapath,
                pins,
                node,
                snap,
            },
            programming,
        ))
    }

    /// Adds one service and programs it: a full compile and a realizer pass, as the agent
    /// handles every change.
    pub fn add_service(&mut self, service: &ServiceSpec) -> Result<Programming, BenchError> {
        add_services(&mut self.snap, std::slice::from_ref(service));
        self.snap.revision += 1;
        program(self.pins.path(), &self.snap, &self.node)
    }

    /// Attaches the pods' socket programs to `cgroup`, as the agent does on
    /// `--pod-cgroup`: the links are pinned with the maps and go with them.
    pub fn attach_pods(&mut self, cgroup: &Path) -> Result<(), BenchError> {
        self.datapath
            .attach_cgroup(AttachRole::PodCgroup, cgroup)
            .map_err(|e| BenchError::Failed(format!("attach to {}: {e}", cgroup.display())))
    }

    /// Cumulative (run time, run count) of from_container and to_container.
    pub fn run_stats(&mut self) -> Result<[(Duration, u64); 2], BenchError> {
        let mut out = [(Duration::ZERO, 0); 2];
        for (slot, name) in out
            .iter_mut()
            .zip([programs::FROM_CONTAINER, programs::TO_CONTAINER])
        {
            let info = self
                .datapath
                .program(name)
                .map_err(|e| BenchError::Failed(format!("program {name}: {e}")))?
                .info()
                .map_err(|e| BenchError::Failed(format!("bpf_prog_get_info {name}: {e}")))?;
            *slot = (info.run_time(), info.run_count());
        }
        Ok(out)
    }

    /// Conntrack entries the datapath created: proof that connections went through it.
    pub fn conntrack_created(&self) -> Result<u64, BenchError> {
        conntrack_created(self.pins.path())
    }
}

/// Conntrack entries the datapath pinned at `pin_dir` created (its per-CPU counter): not
/// the entries held, as a connection that closed cleanly leaves none.
pub fn conntrack_created(pin_dir: &std::path::Path) -> Result<u64, BenchError> {
    let maps = PinnedMaps::open(pin_dir)
        .map_err(|e| BenchError::Failed(format!("open pinned maps: {e}")))?;
    sluice_datapath::read_ct_stats(&maps.ct_stats)
        .map(|stats| stats.created)
        .map_err(|e| BenchError::Failed(format!("read ct_stats: {e}")))
}

/// One NetworkPolicy change that reaches 1,000 endpoints.
#[derive(Clone, Copy, Debug, Default)]
pub struct Convergence {
    pub endpoints: usize,
    pub initial: Programming,
    pub change: Programming,
}

fn web_policy(ports: &[i32]) -> NetworkPolicy {
    NetworkPolicy {
        metadata: meta("web", &[]),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some([("app".to_owned(), "web".to_owned())].into()),
                ..LabelSelector::default()
            }),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(LabelSelector {
                        match_labels: Some([("app".to_owned(), "client".to_owned())].into()),
                        ..LabelSelector::default()
                    }),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(
                    ports
                        .iter()
                        .map(|p| NetworkPolicyPort {
                            port: Some(IntOrString::Int(*p)),
                            protocol: Some("TCP".into()),
                            ..NetworkPolicyPort::default()
                        })
                        .collect(),
                ),
            }]),
            policy_types: Some(vec!["Ingress".into()]),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// `endpoints` local pods selected by one policy, on synthetic interfaces (the realizer
/// keys endpoints and policy maps by ifindex; no packet flows here). The change adds a
/// port to the policy, so every endpoint's policy map is rebuilt and swapped.
pub fn policy_convergence(endpoints: usize) -> Result<Convergence, BenchError> {
    let pins = PinDir::unique("sluice-bench-");
    // The maps are created by loading the object; nothing is attached.
    let _datapath = Datapath::load(pins.path(), &DatapathConfig::default())
        .map_err(|e| BenchError::Failed(format!("loading the datapath: {e}")))?;
    let mut snap = snapshot(&[]);
    snap.endpoints.clear();
    let mut interfaces = BTreeMap::new();
    for i in 0..endpoints {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 50, 0, 1)) + i as u32);
        let name = format!("web-{i}");
        snap.pods.push(pod(&name, "web", ip));
        let interface = format!("lxc{i}");
        interfaces.insert(interface.clone(), 100_000 + i as u32);
        snap.endpoints.push(LocalEndpoint {
            node: NODE.into(),
            namespace: NAMESPACE.into(),
            pod: name,
            interface,
            addresses: [ip.into()].into(),
        });
    }
    let node = NodeContext {
        node: NODE.into(),
        interfaces,
        policy_map_max: DEFAULT_POLICY_MAP_MAX,
        ..NodeContext::default()
    };
    snap.network_policies = vec![web_policy(&[8080])];
    let initial = program(pins.path(), &snap, &node)?;
    snap.network_policies = vec![web_policy(&[8080, 9090])];
    snap.revision += 1;
    let change = program(pins.path(), &snap, &node)?;
    // Realized means a fresh read of every map finds nothing left to do.
    let state = compile(&snap, &node);
    let tables = KernelTables::open(pins.path()).map_err(realizer_err)?;
    let plan = tables
        .plan(Desired::of(&state, node.policy_map_max))
        .map_err(realizer_err)?;
    if !plan.is_empty() {
        return Err(BenchError::Failed(
            "policy change not fully realized after one pass".into(),
        ));
    }
    if state.policies.len() != endpoints {
        return Err(BenchError::Failed(format!(
            "{} of {endpoints} endpoints have a policy map",
            state.policies.len()
        )));
    }
    Ok(Convergence {
        endpoints,
        initial,
        change,
    })
}
