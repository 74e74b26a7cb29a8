//! Benchmarks of sluice side by side with kube-proxy's iptables and nftables modes and the
//! bare routed path (issue 5). Every measurement builds fresh namespaces:
//!
//! ```text
//! client   netns eth0 10.1.0.2/24 ─veth─ lxc-c  10.1.0.1 ┐
//! server-0 netns eth0 10.2.0.2/24 ─veth─ lxc-s0 10.2.0.1 ├ node netns (forwarding)
//! server-1 netns eth0 10.2.1.2/24 ─veth─ lxc-s1 10.2.1.1 │
//! server-2 netns eth0 10.2.2.2/24 ─veth─ lxc-s2 10.2.2.1 ┘
//! ```
//!
//! The three servers are the measured service's backends. The variants differ only in
//! what the node does with traffic to the ClusterIP 10.100.0.10:80: bare connects to
//! 10.2.0.2:8080 directly; sluice runs its programs on every pod's veth;
//! iptables and nftables load kube-proxy's rules into the node netns. N services are
//! programmed, N-1 decoys with 2 backends each first and the measured service last.
//!
//! The cross-node variants (bare routing, sluice tunnel, sluice native between two node
//! namespaces over an underlay veth) have their own topology: see [`crossnode`].
//! So do the NodePort and LoadBalancer variants (a world host reaching a pod on node-b
//! through node-a's frontends, against kube-proxy's NodePort rules and bare routing): see
//! [`external`].

pub mod agent;
pub mod churn;
pub mod cluster;
pub mod crossnode;
pub mod external;
pub mod idle;
pub mod kproxy;
pub mod load;
pub mod netns;
pub mod pod_client;
pub mod report;
mod same_node;
pub mod sluice;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use kproxy::ServiceSpec;
use load::Rate;
use netns::NetNs;
pub use same_node::measure;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{call} {what}: {source}")]
    Io {
        call: &'static str,
        what: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Netns(#[from] sluice_netns::NetNsError),
}

/// The binary `name`: `$var`, else next to this executable (or one directory up, where
/// test binaries live in `deps/`); `package` is what to build when it is missing.
pub fn sibling_binary(var: &str, name: &str, package: &str) -> Result<PathBuf, BenchError> {
    if let Some(path) = std::env::var_os(var) {
        return Ok(path.into());
    }
    let exe = std::env::current_exe().map_err(|source| BenchError::Io {
        call: "current_exe",
        what: name.into(),
        source,
    })?;
    let dir = exe.parent();
    [dir, dir.and_then(Path::parent)]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            BenchError::Failed(format!(
                "{name} not found: build it (cargo build -p {package}) or set {var}"
            ))
        })
}

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
pub const CLIENT_IF: &str = "lxc-c";
pub const SERVER_IFS: [&str; 3] = ["lxc-s0", "lxc-s1", "lxc-s2"];
pub const SERVER_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 2, 0, 2),
    Ipv4Addr::new(10, 2, 1, 2),
    Ipv4Addr::new(10, 2, 2, 2),
];
pub const MEASURED_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 10);

/// Client, servers and the node between them, deleted on drop.
pub struct Topology {
    pub client: NetNs,
    pub servers: Vec<NetNs>,
    pub node: NetNs,
}

impl Topology {
    pub fn new() -> Result<Self, BenchError> {
        let topo = Self {
            client: NetNs::new("client")?,
            servers: (0..SERVER_IPS.len())
                .map(|i| NetNs::new(&format!("server{i}")))
                .collect::<Result<_, _>>()?,
            node: NetNs::new("node")?,
        };
        topo.node.sysctl(&[
            ("net.ipv4.ip_forward", "1"),
            // Reverse-NATed replies come from the ClusterIP, which has no route back.
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ])?;
        let pods = std::iter::once((&topo.client, CLIENT_IF, CLIENT_IP)).chain(
            topo.servers
                .iter()
                .zip(SERVER_IFS)
                .zip(SERVER_IPS)
                .map(|((ns, lxc), ip)| (ns, lxc, ip)),
        );
        for (pod, lxc, address) in pods {
            topo.node.wire_pod(pod, lxc, address)?;
        }
        // New connections/s for seconds on end need more ports than the default range
        // and TIME_WAIT reuse, as netperf users set up.
        topo.client.sysctl(&[
            ("net.ipv4.ip_local_port_range", "1024 65535"),
            ("net.ipv4.tcp_tw_reuse", "1"),
        ])?;
        Ok(topo)
    }
}

pub(crate) fn decoy(i: usize) -> ServiceSpec {
    let i = i as u32;
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + 2 * i;
    ServiceSpec {
        namespace: "bench".into(),
        name: format!("decoy-{i}"),
        vip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i),
        port: 80,
        target_port: load::SERVER_PORT,
        backends: vec![Ipv4Addr::from(base), Ipv4Addr::from(base + 1)],
        external: None,
    }
}

/// `n` services: `n - 1` decoys with two backends each, then the measured one with three.
pub fn services(n: usize) -> Vec<ServiceSpec> {
    let mut out: Vec<ServiceSpec> = (0..n.saturating_sub(1)).map(decoy).collect();
    out.push(ServiceSpec {
        namespace: "bench".into(),
        name: "measured".into(),
        vip: MEASURED_VIP,
        port: 80,
        target_port: load::SERVER_PORT,
        backends: SERVER_IPS.to_vec(),
        external: None,
    });
    out
}

pub fn vip_addr(s: &ServiceSpec) -> SocketAddrV4 {
    SocketAddrV4::new(s.vip, s.port)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Variant {
    Bare,
    Sluice,
    Iptables,
    Nftables,
}

impl Variant {
    pub const ALL: [Variant; 4] = [
        Variant::Bare,
        Variant::Sluice,
        Variant::Iptables,
        Variant::Nftables,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Bare => "bare",
            Variant::Sluice => "sluice",
            Variant::Iptables => "iptables",
            Variant::Nftables => "nftables",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Durations {
    pub rr: Duration,
    pub crr: Duration,
    pub stream: Duration,
}

#[derive(Clone, Debug)]
pub struct AgentLoad {
    pub services: usize,
    pub rate: f64,
    pub duration: Duration,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub services: Vec<usize>,
    pub variants: Vec<Variant>,
    pub reps: usize,
    pub durations: Durations,
    /// `iptables-restore` binary: kube-proxy uses whichever mode the node uses.
    pub iptables_restore: String,
    /// Above these many services iptables and nftables are not loaded (their load time
    /// alone would exceed the run's budget); their rows say so.
    pub iptables_max_services: usize,
    pub nftables_max_services: usize,
    /// Points above this many services run in the first repetition only: loading
    /// kube-proxy's rules for them takes about a minute each.
    pub single_rep_above: usize,
    pub convergence_endpoints: Option<usize>,
    pub agent: Option<AgentLoad>,
    /// Run the cross-node variants (bare, tunnel, native between two node namespaces).
    pub cross_node: bool,
    /// Service counts of the NodePort and LoadBalancer variants (world host -> node ->
    /// pod on another node, [`external`]); empty: not run.
    pub external_services: Vec<usize>,
    /// Measure sluice's external variants in tunnel mode too, besides native.
    pub external_tunnel: bool,
    /// The same-node client is a pod's process (`sluice-bench-client` in a cgroup of its
    /// own, [`pod_client`]) for every variant, and sluice attaches the pods' socket
    /// programs to that cgroup, as deployed; sluice's per-packet ClusterIP path is then
    /// measured as its own row from the benchmark's threads, which no socket program
    /// sees. Off: every client is the benchmark's threads.
    pub pod_client: bool,
}

impl Config {
    pub fn standard() -> Self {
        Self {
            services: vec![1, 1_000, 10_000, 100_000],
            variants: Variant::ALL.to_vec(),
            reps: 3,
            durations: Durations {
                rr: Duration::from_secs(3),
                crr: Duration::from_secs(3),
                stream: Duration::from_secs(2),
            },
            iptables_restore: "iptables-legacy-restore".into(),
            iptables_max_services: 100_000,
            // nft 1.0.6 took 27 s for 10k services here; 100k would take minutes per load.
            nftables_max_services: 10_000,
            single_rep_above: 10_000,
            convergence_endpoints: Some(1_000),
            agent: Some(AgentLoad {
                services: 1_000,
                rate: 10_000.0,
                duration: Duration::from_secs(5),
            }),
            cross_node: true,
            external_services: vec![1, 1_000, 10_000],
            external_tunnel: true,
            pod_client: true,
        }
    }

    pub fn quick() -> Self {
        Self {
            services: vec![1, 1_000],
            reps: 1,
            durations: Durations {
                rr: Duration::from_millis(700),
                crr: Duration::from_millis(700),
                stream: Duration::from_millis(400),
            },
            agent: Some(AgentLoad {
                services: 1_000,
                rate: 10_000.0,
                duration: Duration::from_secs(2),
            }),
            external_services: vec![1, 1_000],
            ..Self::standard()
        }
    }
}

/// Mean ns per run of from_container and to_container over one traffic phase, and what
/// both cost per packet: every packet leaves a pod through from_container once, while
/// to_container runs only where host routing falls back to the node's stack, so its mean
/// per run alone no longer says what a packet costs.
#[derive(Clone, Copy, Debug, Default)]
pub struct BpfCost {
    pub from_container_ns: f64,
    pub to_container_ns: f64,
    pub per_packet_ns: f64,
    pub runs: u64,
}

/// What proves the traffic went through the variant under test.
#[derive(Clone, Debug, Default)]
pub struct Proof {
    pub what: &'static str,
    pub count: u64,
}

/// One measurement of one variant at one N.
#[derive(Clone, Debug)]
pub struct Sample {
    pub variant: Variant,
    pub services: usize,
    pub rep: usize,
    /// Programming N services from empty.
    pub program: Option<Duration>,
    /// Programming one more service on top.
    pub incremental: Option<Duration>,
    pub rr: Rate,
    pub crr: Rate,
    pub stream_gbps: f64,
    pub bpf_rr: Option<BpfCost>,
    pub bpf_crr: Option<BpfCost>,
    pub proof: Proof,
    /// sluice: conntrack entries created per connection of the CRR phase.
    pub ct_per_connection: Option<f64>,
    /// sluice with a pod client: the per-packet ClusterIP path, from clients no socket
    /// program sees.
    pub per_packet: Option<PerPacket>,
}

/// sluice's per-packet ClusterIP path (NAT and a service conntrack entry per connection)
/// measured beside the socket-LB one, on the same namespaces.
#[derive(Clone, Copy, Debug)]
pub struct PerPacket {
    pub rr: Rate,
    pub crr: Rate,
    pub bpf_crr: BpfCost,
    /// Conntrack entries created per connection of the CRR phase: an egress, an ingress
    /// and a service entry here, where the socket-LB path needs no service entry.
    pub ct_per_connection: f64,
}

/// A (variant, N) that could not be measured, and why.
#[derive(Clone, Debug)]
pub struct Skipped {
    pub variant: Variant,
    pub services: usize,
    pub why: String,
}

#[derive(Debug, Default)]
pub struct Results {
    pub samples: Vec<Sample>,
    pub skipped: Vec<Skipped>,
    pub convergence: Option<sluice::Convergence>,
    pub agent: Option<agent::AgentCost>,
    pub cross_node: Vec<crossnode::CrossSample>,
    pub external: Vec<external::ExternalSample>,
    pub elapsed: Duration,
}

/// `iptables-legacy-restore` -> `iptables-legacy`.
pub fn iptables_binary(restore: &str) -> &str {
    restore.strip_suffix("-restore").unwrap_or("iptables")
}

/// Entries of the service map as the datapath creates it.
fn lb_max_entries() -> usize {
    sluice_datapath::DatapathConfig::default().lb_max_entries as usize
}

/// Why `variant` cannot run at `n` services, if it cannot.
fn not_measurable(config: &Config, variant: Variant, n: usize) -> Option<String> {
    match variant {
        Variant::Iptables if n > config.iptables_max_services => Some(format!(
            "not loaded above {} services: the load alone exceeds the run's time budget",
            config.iptables_max_services
        )),
        Variant::Nftables if n > config.nftables_max_services => Some(format!(
            "not loaded above {} services: `nft -f` of the kube-proxy shape alone exceeds the \
             run's time budget (see its programming time at the largest N measured)",
            config.nftables_max_services
        )),
        // Each service takes a wildcard, a frontend and one slot per backend in
        // lb4_services, which the datapath sizes at load.
        Variant::Sluice if n * 4 + 4 > lb_max_entries() => Some(format!(
            "{} entries needed in lb4_services, which holds {}",
            n * 4 + 4,
            lb_max_entries()
        )),
        _ => None,
    }
}

/// Runs the matrix: for each repetition, each N, every variant in an order rotated per
/// repetition, so drift of the machine hits all variants alike.
pub fn run(config: &Config, progress: &mut dyn FnMut(&str)) -> Result<Results, BenchError> {
    let start = Instant::now();
    // A count the external variants cannot take fails now, not after the other variants ran.
    for &n in &config.external_services {
        external::check_services(n)?;
    }
    // Run-time statistics of every BPF program stay on while this fd is held.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| BenchError::Failed(format!("BPF_ENABLE_STATS: {e}")))?;
    let mut results = Results::default();
    for &n in &config.services {
        for &variant in &config.variants {
            if let Some(mut why) = not_measurable(config, variant, n) {
                if variant == Variant::Sluice {
                    // What can be measured without the map: the compiler's share.
                    let took = sluice::compile_time(&services(n));
                    why.push_str(&format!(
                        "; compiling the {n} services alone took {:.0} ms",
                        took.as_secs_f64() * 1e3
                    ));
                }
                results.skipped.push(Skipped {
                    variant,
                    services: n,
                    why,
                });
            }
        }
    }
    for rep in 0..config.reps {
        for &n in &config.services {
            let k = config.variants.len().max(1);
            for i in 0..k {
                let variant = config.variants[(i + rep) % k];
                if not_measurable(config, variant, n).is_some()
                    || (rep > 0 && n > config.single_rep_above)
                {
                    continue;
                }
                progress(&format!("rep {} N={n} {}", rep + 1, variant.name()));
                let sample = measure(config, variant, n, rep)
                    .map_err(|e| BenchError::Failed(format!("{} at N={n}: {e}", variant.name())))?;
                progress(&format!(
                    "  rr {:.0}/s crr {:.0}/s stream {:.1} Gbit/s program {:?}",
                    sample.rr.per_sec, sample.crr.per_sec, sample.stream_gbps, sample.program
                ));
                results.samples.push(sample);
            }
        }
    }
    if config.cross_node {
        results.cross_node = crossnode::run(config, progress)?;
    }
    if !config.external_services.is_empty() {
        results.external = external::run(config, progress)?;
    }
    if let Some(endpoints) = config.convergence_endpoints {
        progress(&format!("policy convergence, {endpoints} endpoints"));
        results.convergence = Some(sluice::policy_convergence(endpoints)?);
    }
    if let Some(load) = &config.agent {
        progress(&format!(
            "agent cost at {} conn/s, {} services",
            load.rate, load.services
        ));
        results.agent = Some(agent::measure(
            &services(load.services),
            load.rate,
            load.duration,
        )?);
    }
    results.elapsed = start.elapsed();
    Ok(results)
}
