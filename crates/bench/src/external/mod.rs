//! NodePort and LoadBalancer variants (issue 11): a world host outside the cluster reaches a
//! pod on node-b through node-a, all three on an underlay bridge:
//!
//! ```text
//!            world 10.200.0.100 (routes the load balancer IP and pod-b's subnet via node-a)
//!                 │
//!        underlay namespace: bridge br0
//!         ┌───────┴───────────────────┐
//!  underlay0 10.200.0.1         underlay0 10.200.0.2
//!  node-a                       node-b ─ lxc-s ─ pod-b 10.1.2.2:8080
//! ```
//!
//! N LoadBalancer services with externalTrafficPolicy Cluster: N−1 decoys (two backends
//! each, nodePort 20000 + i, load balancer IP 198.18.0.0 + i), then the measured one, whose
//! single backend is pod-b, on nodePort [`NODE_PORT`] and [`LOAD_BALANCER_IP`]:80 (the
//! cloud's load balancer is played by the world host's route to node-a). So node-a always
//! forwards to another node: it DNATs, SNATs to its own address and sends the packet on;
//! the replies come back through it.
//! - **bare**: the world host connects to pod-b itself, routed through node-a both ways; no
//!   translation, no rules. The limit.
//! - **sluice**: the datapath on both nodes, maps from the compiler and the realizer as each
//!   node's agent writes them: `from_netdev` on node-a's underlay device translates and
//!   sends the packet to node-b, natively (`bpf_redirect_neigh`) or, with
//!   [`Config::external_tunnel`], through the VXLAN tunnel; it translates the replies back.
//! - **iptables** / **nftables**: kube-proxy's rules for the N services in node-a
//!   (`KUBE-NODEPORTS` and `KUBE-EXT-*` with the masquerade mark; the nftables
//!   `service-nodeports` map and `external-*` chains), plain routing to node-b.
//!
//! Every variant builds the same namespaces and routes; only what node-a does differs.
//! Each measurement loads the rules once and measures both frontends on them.

pub mod report;
mod topology;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use sluice_common::RoutingMode;

/// How sluice's node-a sends the translated packet to node-b (the others route plainly).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Forwarding {
    Native,
    Tunnel,
}

impl Forwarding {
    pub const ALL: [Forwarding; 2] = [Forwarding::Native, Forwarding::Tunnel];

    pub fn name(self) -> &'static str {
        match self {
            Forwarding::Native => "native",
            Forwarding::Tunnel => "tunnel",
        }
    }

    fn routing_mode(self) -> RoutingMode {
        match self {
            Forwarding::Native => RoutingMode::Native,
            Forwarding::Tunnel => RoutingMode::Tunnel,
        }
    }
}

use crate::{
    BenchError, Config, Variant, decoy, iptables_binary,
    kproxy::{self, External, ServiceSpec},
    load::{self, Rate},
};
use topology::{PROGRAMS, RunStats, SluiceNodes, Topology};

pub const WORLD: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 100);
pub const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// The backend, on node-b.
pub const POD: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 2);
/// The measured service's frontends besides its ClusterIP.
pub const NODE_PORT: u16 = 32_000;
pub const LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const SERVICE_PORT: u16 = 80;
const DECOY_NODE_PORT: u16 = 20_000;
const DECOY_LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// The decoys' node ports run from 20000 up to the measured one's.
pub const MAX_SERVICES: usize = (NODE_PORT - DECOY_NODE_PORT) as usize + 1;
const NODE_NAMES: [&str; 2] = ["node-a", "node-b"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Frontend {
    NodePort,
    LoadBalancer,
}

impl Frontend {
    pub const ALL: [Frontend; 2] = [Frontend::NodePort, Frontend::LoadBalancer];

    pub fn name(self) -> &'static str {
        match self {
            Frontend::NodePort => "NodePort",
            Frontend::LoadBalancer => "LoadBalancer",
        }
    }

    /// Where the world host connects.
    pub fn address(self) -> SocketAddrV4 {
        match self {
            Frontend::NodePort => SocketAddrV4::new(NODE_A, NODE_PORT),
            Frontend::LoadBalancer => SocketAddrV4::new(LOAD_BALANCER_IP, SERVICE_PORT),
        }
    }
}

/// Refuses a service count the node ports cannot hold.
pub fn check_services(n: usize) -> Result<(), BenchError> {
    if n == 0 || n > MAX_SERVICES {
        return Err(BenchError::Failed(format!(
            "external variants: N = {n} services, but their node ports hold 1 to {MAX_SERVICES}"
        )));
    }
    Ok(())
}

/// `n` LoadBalancer services: `n - 1` decoys, then the measured one (see the module docs).
pub fn services(n: usize) -> Result<Vec<ServiceSpec>, BenchError> {
    check_services(n)?;
    let mut out: Vec<ServiceSpec> = (0..n - 1)
        .map(|i| {
            let mut s = decoy(i);
            s.external = Some(External {
                node_port: DECOY_NODE_PORT + i as u16,
                load_balancer_ip: Ipv4Addr::from(u32::from(DECOY_LOAD_BALANCER_IP) + i as u32),
            });
            s
        })
        .collect();
    out.push(ServiceSpec {
        namespace: "bench".into(),
        name: "measured".into(),
        vip: crate::MEASURED_VIP,
        port: SERVICE_PORT,
        target_port: load::SERVER_PORT,
        backends: vec![POD],
        external: Some(External {
            node_port: NODE_PORT,
            load_balancer_ip: LOAD_BALANCER_IP,
        }),
    });
    Ok(out)
}

/// Mean run time of one program on one node over a traffic phase.
#[derive(Clone, Debug)]
pub struct ProgramCost {
    pub node: &'static str,
    pub program: &'static str,
    pub mean_ns: f64,
    pub runs: u64,
}

/// sluice's eBPF time over a traffic phase, both nodes.
#[derive(Clone, Debug, Default)]
pub struct PathCost {
    /// Programs that ran, node-a's first.
    pub programs: Vec<ProgramCost>,
    /// All programs' run time divided by the phase's transactions (RR) or connections
    /// (CRR): what one of them costs in eBPF on the whole path, both directions.
    pub per_operation_ns: f64,
}

/// One measurement of one variant through one frontend (bare: straight to the pod).
#[derive(Clone, Debug)]
pub struct ExternalSample {
    pub variant: Variant,
    /// How sluice's node-a reaches node-b; None for the others (plain routing).
    pub forwarding: Option<Forwarding>,
    /// None for bare.
    pub frontend: Option<Frontend>,
    pub services: usize,
    pub rep: usize,
    /// Programming the N services into node-a from empty (sluice: compile + realize).
    pub program: Option<Duration>,
    pub rr: Rate,
    pub crr: Rate,
    pub stream_gbps: f64,
    pub cost_rr: Option<PathCost>,
    pub cost_crr: Option<PathCost>,
    /// The world host's retransmissions over the CRR phase: each SYN sent again cost its
    /// connection a second (see `load::STALL`).
    pub crr_retransmissions: load::Retransmissions,
    /// sluice: the entries of node-a's conntrack table when the CRR phase started (what
    /// the phases before it left; a full table costs every new connection evictions).
    pub conntrack_before_crr: Option<u64>,
    /// sluice: node-a's segments of live connections that found their service entry
    /// gone during the CRR phase (evicted by the full table).
    pub service_lost_crr: Option<u64>,
    /// Connections counted by the variant's own frontend (see `proof_what`).
    pub proof: u64,
    pub proof_what: &'static str,
}

/// What node-a runs.
enum Dataplane {
    Bare,
    Sluice(SluiceNodes),
    Kproxy,
}

fn path_cost(before: &[RunStats], after: &[RunStats], operations: f64) -> PathCost {
    let mut programs = Vec::new();
    let mut total_ns = 0.0;
    for ((b, a), node) in before.iter().zip(after).zip(NODE_NAMES) {
        for ((b, a), program) in b.iter().zip(a).zip(PROGRAMS) {
            let runs = a.1.saturating_sub(b.1);
            let ns = a.0.saturating_sub(b.0).as_nanos() as f64;
            total_ns += ns;
            if runs > 0 {
                programs.push(ProgramCost {
                    node,
                    program,
                    mean_ns: ns / runs as f64,
                    runs,
                });
            }
        }
    }
    PathCost {
        programs,
        per_operation_ns: if operations > 0.0 {
            total_ns / operations
        } else {
            0.0
        },
    }
}

fn timed(f: impl FnOnce() -> Result<String, BenchError>) -> Result<Duration, BenchError> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

/// The connections `frontend` has seen so far, as the variant counts them, and what that
/// count is (bare has no frontend: its proof is the connections the client made).
fn counted(
    config: &Config,
    dataplane: &Dataplane,
    variant: Variant,
    topo: &Topology,
    measured: &ServiceSpec,
    frontend: Option<Frontend>,
) -> Result<(u64, &'static str), BenchError> {
    let node_a = &topo.nodes[0];
    let Some(frontend) = frontend else {
        return Ok((0, "connections made straight to the pod"));
    };
    Ok(match dataplane {
        Dataplane::Bare => (0, "connections made straight to the pod"),
        Dataplane::Sluice(s) => (
            s.created_on_node_a()?,
            "conntrack entries node-a created for the frontend's connections",
        ),
        Dataplane::Kproxy if variant == Variant::Iptables => {
            let chain = match frontend {
                Frontend::NodePort => "KUBE-NODEPORTS",
                Frontend::LoadBalancer => "KUBE-SERVICES",
            };
            let listing = node_a.exec(
                iptables_binary(&config.iptables_restore),
                &["-t", "nat", "-L", chain, "-v", "-x", "-n"],
            )?;
            (
                kproxy::parse_iptables_jump_packets(&listing, "KUBE-EXT-"),
                "packets of new connections through the frontend's KUBE-EXT jump",
            )
        }
        Dataplane::Kproxy => {
            let listing = kproxy::list_nft_counted_chain(node_a, measured)?;
            (
                kproxy::parse_nft_counter(&listing).unwrap_or(0),
                "packets of new connections counted in the measured service chain",
            )
        }
    })
}

/// Programs `services` into node-a (sluice: both nodes) as `variant` does; how long that
/// took, except for bare.
fn start(
    config: &Config,
    variant: Variant,
    forwarding: Option<Forwarding>,
    topo: &Topology,
    services: &[ServiceSpec],
) -> Result<(Dataplane, Option<Duration>), BenchError> {
    let node_a = &topo.nodes[0];
    Ok(match variant {
        Variant::Bare => (Dataplane::Bare, None),
        Variant::Sluice => {
            let mode = forwarding.unwrap_or(Forwarding::Native).routing_mode();
            let (nodes, took) = SluiceNodes::start(topo, services, mode)?;
            (Dataplane::Sluice(nodes), Some(took))
        }
        Variant::Iptables => {
            let rules = kproxy::iptables_full(services);
            let took =
                timed(|| node_a.exec_stdin(&config.iptables_restore, &[], rules.as_bytes()))?;
            (Dataplane::Kproxy, Some(took))
        }
        Variant::Nftables => {
            let rules = kproxy::nftables_full(services, &[NODE_A]);
            let took = timed(|| node_a.exec_stdin("nft", &["-f", "-"], rules.as_bytes()))?;
            (Dataplane::Kproxy, Some(took))
        }
    })
}

/// One variant at `n` services on fresh namespaces: both frontends (bare: the pod).
/// `forwarding` is sluice's, ignored by the others.
pub fn measure(
    config: &Config,
    variant: Variant,
    forwarding: Forwarding,
    n: usize,
    rep: usize,
) -> Result<Vec<ExternalSample>, BenchError> {
    let forwarding = (variant == Variant::Sluice).then_some(forwarding);
    let svcs = services(n)?;
    let measured = svcs
        .last()
        .cloned()
        .ok_or_else(|| BenchError::Failed("no services".into()))?;
    let topo = Topology::new(LOAD_BALANCER_IP, forwarding == Some(Forwarding::Tunnel))?;
    let _server = load::Server::start(&topo.pod)?;
    let (mut dataplane, program) = start(config, variant, forwarding, &topo, &svcs)?;
    let targets: Vec<(Option<Frontend>, SocketAddrV4)> = match variant {
        Variant::Bare => vec![(None, SocketAddrV4::new(POD, load::SERVER_PORT))],
        _ => Frontend::ALL
            .iter()
            .map(|f| (Some(*f), f.address()))
            .collect(),
    };
    let mut samples = Vec::new();
    for (frontend, target) in targets {
        let count = |dp: &Dataplane| counted(config, dp, variant, &topo, &measured, frontend);
        let stats = |dp: &mut Dataplane| match dp {
            Dataplane::Sluice(s) => s.run_stats(),
            _ => Ok(Vec::new()),
        };
        let (before_count, _) = count(&dataplane)?;
        let before = stats(&mut dataplane)?;
        let rr = load::request_response(&topo.world, target, config.durations.rr)?;
        let mid = stats(&mut dataplane)?;
        let conntrack = |dp: &Dataplane| match dp {
            Dataplane::Sluice(s) => s.conntrack().map(Some),
            _ => Ok(None),
        };
        let conntrack_before = conntrack(&dataplane)?;
        let retransmitted = load::Retransmissions::read(&topo.world)?;
        let crr = load::connect_request_close(&topo.world, target, config.durations.crr, None)?;
        let crr_retransmissions = load::Retransmissions::read(&topo.world)?.since(retransmitted);
        let conntrack_after = conntrack(&dataplane)?;
        let conntrack_before_crr = conntrack_before.map(|(entries, _)| entries);
        let service_lost_crr = conntrack_before
            .zip(conntrack_after)
            .map(|((_, before), (_, after))| after.saturating_sub(before));
        let after = stats(&mut dataplane)?;
        let stream_gbps = load::stream(&topo.world, target, config.durations.stream)?;
        let (after_count, proof_what) = count(&dataplane)?;
        let proof = match dataplane {
            Dataplane::Bare => (crr.per_sec * config.durations.crr.as_secs_f64()) as u64,
            _ => after_count.saturating_sub(before_count),
        };
        let sluice = matches!(dataplane, Dataplane::Sluice(_));
        let transactions = rr.per_sec * config.durations.rr.as_secs_f64();
        let connections = crr.per_sec * config.durations.crr.as_secs_f64();
        samples.push(ExternalSample {
            variant,
            forwarding,
            frontend,
            services: n,
            rep,
            program,
            rr,
            crr,
            stream_gbps,
            cost_rr: sluice.then(|| path_cost(&before, &mid, transactions)),
            cost_crr: sluice.then(|| path_cost(&mid, &after, connections)),
            crr_retransmissions,
            conntrack_before_crr,
            service_lost_crr,
            proof,
            proof_what,
        });
    }
    // The datapaths go before the namespaces their links sit in.
    drop(dataplane);
    Ok(samples)
}

/// sluice's ways to node-b to measure; one (ignored) for the other variants.
fn forwardings(config: &Config, variant: Variant) -> &'static [Forwarding] {
    if variant == Variant::Sluice && config.external_tunnel {
        &Forwarding::ALL
    } else {
        &[Forwarding::Native]
    }
}

/// How the report and the progress lines name a variant.
pub fn label(
    variant: Variant,
    forwarding: Option<Forwarding>,
    frontend: Option<Frontend>,
) -> String {
    let mut out = variant.name().to_owned();
    if let Some(f) = forwarding {
        out.push(' ');
        out.push_str(f.name());
    }
    match frontend {
        Some(f) => {
            out.push(' ');
            out.push_str(f.name());
        }
        None if variant == Variant::Bare => out.push_str(" (to the pod)"),
        None => {}
    }
    out
}

/// Why `variant` is not loaded at `n` services, if it is not.
fn not_measured(config: &Config, variant: Variant, n: usize) -> Option<String> {
    match variant {
        Variant::Iptables if n > config.iptables_max_services => Some(format!(
            "not loaded above {} services",
            config.iptables_max_services
        )),
        Variant::Nftables if n > config.nftables_max_services => Some(format!(
            "not loaded above {} services",
            config.nftables_max_services
        )),
        _ => None,
    }
}

/// Every repetition of every N of `config.external_services`, the variants' order rotated
/// per repetition; points above `single_rep_above` in the first repetition only.
pub fn run(
    config: &Config,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<ExternalSample>, BenchError> {
    let mut samples = Vec::new();
    let k = config.variants.len().max(1);
    for rep in 0..config.reps {
        for &n in &config.external_services {
            if rep > 0 && n > config.single_rep_above {
                continue;
            }
            for i in 0..k {
                let variant = config.variants[(i + rep) % k];
                if let Some(why) = not_measured(config, variant, n) {
                    if rep == 0 {
                        progress(&format!("external {} at N={n}: {why}", variant.name()));
                    }
                    continue;
                }
                for &forwarding in forwardings(config, variant) {
                    let name = label(
                        variant,
                        Some(forwarding).filter(|_| variant == Variant::Sluice),
                        None,
                    );
                    progress(&format!("rep {} N={n} external {name}", rep + 1));
                    let measured = measure(config, variant, forwarding, n, rep).map_err(|e| {
                        BenchError::Failed(format!("external {name} at N={n}: {e}"))
                    })?;
                    for s in &measured {
                        progress(&format!(
                            "  {} rr {:.0}/s crr {:.0}/s ({} stalled, {} SYN retransmissions, \
                             conntrack {:?} at the start, {:?} service entries lost) \
                             stream {:.1} Gbit/s program {:?}",
                            s.frontend.map_or("pod", Frontend::name),
                            s.rr.per_sec,
                            s.crr.per_sec,
                            s.crr.stalled,
                            s.crr_retransmissions.syn,
                            s.conntrack_before_crr,
                            s.service_lost_crr,
                            s.stream_gbps,
                            s.program
                        ));
                    }
                    samples.extend(measured);
                }
            }
        }
    }
    Ok(samples)
}
