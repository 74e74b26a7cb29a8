//! Cross-node variants (issue 10): a client pod on node A, a server pod on node B, the two
//! node namespaces joined by an underlay veth, wired as `crates/datapath/tests/cross_node.rs`
//! wires two nodes:
//!
//! ```text
//! client eth0 10.1.1.2 ─veth─ lxc-c 10.1.1.1 ┐                          ┌ lxc-s 10.1.2.1 ─veth─ eth0 10.1.2.2 server
//!                               node-a netns ─ u-a 10.200.0.1 ─veth─ u-b 10.200.0.2 ─ node-b netns
//! ```
//!
//! - **bare**: plain kernel routing, each node routes the other's pod subnet via the other
//!   node's underlay address; no eBPF. The limit.
//! - **tunnel**: sluice's datapath on both nodes, VXLAN (collect metadata) with the
//!   sender's identity as VNI; pod MTU = underlay MTU − 50, as the agent configures it.
//! - **native**: sluice's datapath on both nodes, `bpf_redirect_neigh` out of the underlay.
//!
//! Both sluice variants attach what the agent attaches with `--underlay-device`:
//! `from_netdev` and `to_netdev` on the underlay device, so its cost is in the path.
//!
//! Neither sluice variant has a node route to the other pod subnet: the programs forward by
//! the ipcache. The maps hold what the compiler gives a node of a two-node cluster (each
//! pod, each node's addresses, `node_config`), written directly because only the datapath
//! is measured here. Traffic goes pod to pod (no Service), so the ratios isolate the path
//! between nodes.

use std::{
    collections::BTreeMap,
    fmt::Write,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use aya::maps::lpm_trie::Key;
use sluice_common::{
    EndpointInfo, IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD, IpcacheEntry, NodeConfig,
    RoutingMode, addr_be, programs,
};
use sluice_datapath::{AttachRole, Datapath, DatapathConfig, PinDir, PinnedMaps};
use sluice_netns::{Ipv4Net, Route};

use crate::{
    BenchError, Config, Variant,
    load::{self, Rate},
    netns::NetNs,
    report::{Summary, median, num, ratio, ratio_target},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 2);
const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const IDENTITY_CLIENT: u32 = 300;
const IDENTITY_SERVER: u32 = 301;
const UNDERLAY_MTU: u32 = 1500;
/// VXLAN over IPv4 adds 50 bytes.
const TUNNEL_MTU: u32 = UNDERLAY_MTU - 50;
const VXLAN_PORT: u16 = 8472;
const VXLAN_DEVICE: &str = "vxlan0";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CrossVariant {
    Bare,
    Tunnel,
    Native,
}

impl CrossVariant {
    pub const ALL: [CrossVariant; 3] = [Self::Bare, Self::Tunnel, Self::Native];

    pub fn name(self) -> &'static str {
        match self {
            Self::Bare => "cross-node bare",
            Self::Tunnel => "sluice tunnel",
            Self::Native => "sluice native",
        }
    }

    fn routing_mode(self) -> Option<RoutingMode> {
        match self {
            Self::Bare => None,
            Self::Tunnel => Some(RoutingMode::Tunnel),
            Self::Native => Some(RoutingMode::Native),
        }
    }
}

/// Mean ns per run of each program, summed over both nodes, over one traffic phase.
#[derive(Clone, Debug, Default)]
pub struct PathCost {
    /// Program name → (mean ns per run, runs).
    pub programs: BTreeMap<&'static str, (f64, u64)>,
    /// All programs' run time divided by the packets that left a pod (from_container runs):
    /// the eBPF cost one packet pays between the two pods.
    pub per_packet_ns: f64,
}

/// One measurement of one cross-node variant.
#[derive(Clone, Debug)]
pub struct CrossSample {
    pub variant: CrossVariant,
    pub rep: usize,
    pub rr: Rate,
    pub crr: Rate,
    pub stream_gbps: f64,
    pub cost_rr: Option<PathCost>,
    pub cost_crr: Option<PathCost>,
    /// Conntrack entries the client's node created (sluice), or connections made (bare).
    pub proof: u64,
}

const PROGRAMS: [&str; 6] = [
    programs::FROM_CONTAINER,
    programs::TO_CONTAINER,
    programs::FROM_TUNNEL,
    programs::TO_TUNNEL,
    programs::FROM_NETDEV,
    programs::TO_NETDEV,
];

/// One node's loaded datapath. Dropped before its pins: closing the programs, then
/// unpinning the links detaches them.
struct NodeDatapath {
    datapath: Datapath,
    pins: PinDir,
}

type RunStats = [(Duration, u64); PROGRAMS.len()];

impl NodeDatapath {
    fn run_stats(&mut self) -> Result<RunStats, BenchError> {
        let mut out = [(Duration::ZERO, 0); PROGRAMS.len()];
        for (slot, name) in out.iter_mut().zip(PROGRAMS) {
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
}

/// Two nodes, their pods and the underlay between them, deleted on drop.
struct CrossTopology {
    client: NetNs,
    server: NetNs,
    // Held for their lifetime: the namespaces go when these drop, after the datapaths.
    nodes: [NetNs; 2],
}

fn net(address: Ipv4Addr, prefix: u8) -> Result<Ipv4Net, BenchError> {
    Ipv4Net::new(address, prefix).map_err(|e| BenchError::Failed(e.to_string()))
}

impl CrossTopology {
    fn new(variant: CrossVariant) -> Result<Self, BenchError> {
        let topo = Self {
            client: NetNs::new("xclient")?,
            server: NetNs::new("xserver")?,
            nodes: [NetNs::new("xnode-a")?, NetNs::new("xnode-b")?],
        };
        let [a, b] = &topo.nodes;
        for node in [a, b] {
            node.sysctl(&[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ])?;
        }
        a.wire_pod(&topo.client, "lxc-c", CLIENT)?;
        b.wire_pod(&topo.server, "lxc-s", SERVER)?;
        topo.client.sysctl(&[
            ("net.ipv4.ip_local_port_range", "1024 65535"),
            ("net.ipv4.tcp_tw_reuse", "1"),
        ])?;
        a.netlink()?.add_veth("u-a", "u-b", Some(b.ns()))?;
        for (node, dev, address) in [(a, "u-a", NODE_A), (b, "u-b", NODE_B)] {
            let links = node.netlink()?;
            links.add_address(dev, net(address, 24)?.into())?;
            links.set_mtu(dev, UNDERLAY_MTU)?;
            links.set_up(dev)?;
        }
        match variant {
            CrossVariant::Bare => {
                for (node, subnet, via) in [
                    (a, Ipv4Addr::new(10, 1, 2, 0), NODE_B),
                    (b, Ipv4Addr::new(10, 1, 1, 0), NODE_A),
                ] {
                    node.netlink()?
                        .add_route(&Route::via(net(subnet, 24)?, via))?;
                }
            }
            CrossVariant::Tunnel => {
                for pod in [&topo.client, &topo.server] {
                    pod.netlink()?.set_mtu("eth0", TUNNEL_MTU)?;
                }
                for node in [a, b] {
                    let links = node.netlink()?;
                    links.add_vxlan_external(VXLAN_DEVICE, VXLAN_PORT)?;
                    links.set_mtu(VXLAN_DEVICE, TUNNEL_MTU)?;
                    links.set_arp(VXLAN_DEVICE, false)?;
                    links.set_up(VXLAN_DEVICE)?;
                }
            }
            CrossVariant::Native => {}
        }
        Ok(topo)
    }
}

/// What one node knows: (its pod, identity, lxc, underlay device, own address, other
/// node's pod, identity, address).
struct NodeFacts {
    pod: Ipv4Addr,
    identity: u32,
    lxc: &'static str,
    underlay: &'static str,
    address: Ipv4Addr,
    peer_pod: Ipv4Addr,
    peer_identity: u32,
    peer_address: Ipv4Addr,
}

const FACTS: [NodeFacts; 2] = [
    NodeFacts {
        pod: CLIENT,
        identity: IDENTITY_CLIENT,
        lxc: "lxc-c",
        underlay: "u-a",
        address: NODE_A,
        peer_pod: SERVER,
        peer_identity: IDENTITY_SERVER,
        peer_address: NODE_B,
    },
    NodeFacts {
        pod: SERVER,
        identity: IDENTITY_SERVER,
        lxc: "lxc-s",
        underlay: "u-b",
        address: NODE_B,
        peer_pod: CLIENT,
        peer_identity: IDENTITY_CLIENT,
        peer_address: NODE_A,
    },
];

fn gateway(pod: Ipv4Addr) -> Ipv4Addr {
    let [a, b, c, _] = pod.octets();
    Ipv4Addr::new(a, b, c, 1)
}

fn map_err(what: &'static str) -> impl Fn(aya::maps::MapError) -> BenchError {
    move |e| BenchError::Failed(format!("{what}: {e}"))
}

/// Loads and attaches the datapath in `node` and writes the maps a node of this
/// two-node cluster holds.
fn start_node(
    node: &NetNs,
    mode: RoutingMode,
    facts: &NodeFacts,
) -> Result<NodeDatapath, BenchError> {
    let pins = PinDir::unique("sluice-bench-x-");
    let pin_dir = pins.path().to_owned();
    let (lxc, underlay) = (facts.lxc, facts.underlay);
    let (datapath, lxc_ifindex, tunnel_ifindex, underlay_ifindex) = node.run(move || {
        let mut datapath = Datapath::load(&pin_dir, &DatapathConfig::default())
            .map_err(|e| BenchError::Failed(format!("loading the datapath: {e}")))?;
        let attach = |datapath: &mut Datapath, role, target: &str| {
            datapath
                .attach(role, target)
                .map_err(|e| BenchError::Failed(format!("attach {target}: {e}")))
        };
        attach(&mut datapath, AttachRole::PodVeth, lxc)?;
        if mode == RoutingMode::Tunnel {
            attach(&mut datapath, AttachRole::TunnelDevice, VXLAN_DEVICE)?;
        }
        attach(&mut datapath, AttachRole::Netdev, underlay)?;
        let index = |name: &str| nix::net::if_::if_nametoindex(name).unwrap_or(0);
        Ok((datapath, index(lxc), index(VXLAN_DEVICE), index(underlay)))
    })?;
    let mut maps = PinnedMaps::open(pins.path())
        .map_err(|e| BenchError::Failed(format!("open pinned maps: {e}")))?;
    maps.endpoints
        .insert(lxc_ifindex, EndpointInfo::new(facts.pod, facts.identity), 0)
        .map_err(map_err("endpoints"))?;
    maps.node_config
        .set(
            0,
            NodeConfig::new(mode, tunnel_ifindex, underlay_ifindex)
                .with_node_address(facts.address)
                .with_tunnel_port(if mode == RoutingMode::Tunnel {
                    VXLAN_PORT
                } else {
                    0
                }),
            0,
        )
        .map_err(map_err("node_config"))?;
    let remote = Some(facts.peer_address);
    let entries = [
        (facts.pod, 32, facts.identity, None),
        (facts.address, 32, IDENTITY_HOST, None),
        (gateway(facts.pod), 32, IDENTITY_HOST, None),
        (Ipv4Addr::UNSPECIFIED, 0, IDENTITY_WORLD, None),
        (facts.peer_pod, 32, facts.peer_identity, remote),
        (gateway(facts.peer_pod), 32, IDENTITY_REMOTE_NODE, remote),
        (facts.peer_address, 32, IDENTITY_REMOTE_NODE, None),
    ];
    for (address, prefix, identity, tunnel_endpoint) in entries {
        let entry = IpcacheEntry {
            identity,
            tunnel_endpoint: tunnel_endpoint.map_or(0, addr_be),
        };
        maps.ipcache
            .insert(&Key::new(prefix, addr_be(address)), entry, 0)
            .map_err(map_err("ipcache"))?;
    }
    Ok(NodeDatapath { datapath, pins })
}

fn stats(datapaths: &mut [NodeDatapath]) -> Result<Vec<RunStats>, BenchError> {
    datapaths.iter_mut().map(NodeDatapath::run_stats).collect()
}

fn path_cost(before: &[RunStats], after: &[RunStats]) -> PathCost {
    let mut programs = BTreeMap::new();
    let (mut total_ns, mut packets) = (0.0, 0);
    for (i, name) in PROGRAMS.iter().enumerate() {
        let (mut ns, mut runs) = (0.0, 0u64);
        for (b, a) in before.iter().zip(after) {
            ns += a[i].0.saturating_sub(b[i].0).as_nanos() as f64;
            runs += a[i].1.saturating_sub(b[i].1);
        }
        total_ns += ns;
        if *name == programs::FROM_CONTAINER {
            packets = runs;
        }
        if runs > 0 {
            programs.insert(*name, (ns / runs as f64, runs));
        }
    }
    PathCost {
        programs,
        per_packet_ns: if packets == 0 {
            0.0
        } else {
            total_ns / packets as f64
        },
    }
}

/// One measurement of `variant` on fresh namespaces.
pub fn measure(
    config: &Config,
    variant: CrossVariant,
    rep: usize,
) -> Result<CrossSample, BenchError> {
    let topo = CrossTopology::new(variant)?;
    let _server = load::Server::start(&topo.server)?;
    let mut datapaths = match variant.routing_mode() {
        Some(mode) => topo
            .nodes
            .iter()
            .zip(&FACTS)
            .map(|(node, facts)| start_node(node, mode, facts))
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let target = SocketAddrV4::new(SERVER, load::SERVER_PORT);
    let before = stats(&mut datapaths)?;
    let rr = load::request_response(&topo.client, target, config.durations.rr)?;
    let mid = stats(&mut datapaths)?;
    let crr = load::connect_request_close(&topo.client, target, config.durations.crr, None)?;
    let after = stats(&mut datapaths)?;
    let stream_gbps = load::stream(&topo.client, target, config.durations.stream)?;
    let sluice = !datapaths.is_empty();
    let proof = match datapaths.first() {
        Some(client_node) => crate::sluice::conntrack_created(client_node.pins.path())?,
        None => (crr.per_sec * config.durations.crr.as_secs_f64()) as u64,
    };
    // The datapaths go before the namespaces their links sit in.
    drop(datapaths);
    Ok(CrossSample {
        variant,
        rep,
        rr,
        crr,
        stream_gbps,
        cost_rr: sluice.then(|| path_cost(&before, &mid)),
        cost_crr: sluice.then(|| path_cost(&mid, &after)),
        proof,
    })
}

/// Every repetition of the three variants, the order rotated per repetition.
pub fn run(
    config: &Config,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<CrossSample>, BenchError> {
    let mut samples = Vec::new();
    let k = CrossVariant::ALL.len();
    for rep in 0..config.reps {
        for i in 0..k {
            let variant = CrossVariant::ALL[(i + rep) % k];
            progress(&format!("rep {} {}", rep + 1, variant.name()));
            let sample = measure(config, variant, rep)
                .map_err(|e| BenchError::Failed(format!("{}: {e}", variant.name())))?;
            progress(&format!(
                "  rr {:.0}/s crr {:.0}/s stream {:.1} Gbit/s",
                sample.rr.per_sec, sample.crr.per_sec, sample.stream_gbps
            ));
            samples.push(sample);
        }
    }
    Ok(samples)
}

/// Medians of one cross-node variant.
struct CrossSummary {
    reps: usize,
    tps: f64,
    cps: f64,
    gbps: f64,
    rr_p50: f64,
    per_packet_rr: Option<f64>,
    per_packet_crr: Option<f64>,
    programs_rr: BTreeMap<&'static str, f64>,
}

fn summarize(samples: &[CrossSample], variant: CrossVariant) -> Option<CrossSummary> {
    let group: Vec<&CrossSample> = samples.iter().filter(|s| s.variant == variant).collect();
    if group.is_empty() {
        return None;
    }
    let m = |f: &dyn Fn(&CrossSample) -> f64| median(group.iter().map(|s| f(s)).collect());
    let opt = |f: &dyn Fn(&CrossSample) -> Option<f64>| {
        let v: Vec<f64> = group.iter().filter_map(|s| f(s)).collect();
        (!v.is_empty()).then(|| median(v))
    };
    let programs_rr = PROGRAMS
        .iter()
        .filter_map(|name| {
            let ns = opt(&|s| Some(s.cost_rr.as_ref()?.programs.get(name)?.0))?;
            Some((*name, ns))
        })
        .collect();
    Some(CrossSummary {
        reps: group.len(),
        tps: m(&|s| s.rr.per_sec),
        cps: m(&|s| s.crr.per_sec),
        gbps: m(&|s| s.stream_gbps),
        rr_p50: m(&|s| s.rr.p50_us),
        per_packet_rr: opt(&|s| Some(s.cost_rr.as_ref()?.per_packet_ns)),
        per_packet_crr: opt(&|s| Some(s.cost_crr.as_ref()?.per_packet_ns)),
        programs_rr,
    })
}

/// The report's "Across nodes" section: ratios to cross-node bare, same-node next to it,
/// the targets and the eBPF cost of the path.
pub fn report(md: &mut String, samples: &[CrossSample], same_node: &BTreeMap<Variant, Summary>) {
    let sums: BTreeMap<CrossVariant, CrossSummary> = CrossVariant::ALL
        .into_iter()
        .filter_map(|v| Some((v, summarize(samples, v)?)))
        .collect();
    let Some(bare) = sums.get(&CrossVariant::Bare) else {
        return;
    };
    let _ = writeln!(
        md,
        "\n## Across nodes\n\nClient pod on node A, server pod on node B, pod to pod (no Service), the nodes joined by an underlay veth (MTU {UNDERLAY_MTU}); see `crates/bench/src/crossnode.rs`. Tunnel pods have MTU {TUNNEL_MTU}. Same-node rows are the N = 1 bare and sluice points above (client to a ClusterIP on the same node), for scale.\n"
    );
    let _ = writeln!(
        md,
        "| variant | reps | RR tps | RR p50 µs | conn/s | stream Gbit/s | tps / cross bare | conn/s / cross bare | stream / cross bare |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (v, s) in &sums {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {} | {:.2} | {} | {} | {} |",
            v.name(),
            s.reps,
            num(s.tps),
            s.rr_p50,
            num(s.cps),
            s.gbps,
            ratio(s.tps, bare.tps),
            ratio(s.cps, bare.cps),
            ratio(s.gbps, bare.gbps)
        );
    }
    for (v, name) in [
        (Variant::Bare, "same-node bare"),
        (Variant::Sluice, "same-node sluice"),
    ] {
        if let Some(s) = same_node.get(&v) {
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {:.1} | {} | {:.2} | {} | {} | {} |",
                s.reps,
                num(s.tps),
                s.rr_p50,
                num(s.cps),
                s.gbps,
                ratio(s.tps, bare.tps),
                ratio(s.cps, bare.cps),
                ratio(s.gbps, bare.gbps)
            );
        }
    }
    let _ = writeln!(
        md,
        "\n| target | wanted | measured | verdict |\n|---|---|---|---|"
    );
    // Issue 18: cross-node RR at least as fast as the bare path, encapsulated or not.
    for v in [CrossVariant::Native, CrossVariant::Tunnel] {
        ratio_target(
            md,
            &format!("{} transactions/s (to cross-node bare)", v.name()),
            1.00,
            sums.get(&v).map(|s| s.tps / bare.tps),
        );
    }
    let _ = writeln!(
        md,
        "\n### eBPF cost of the path (medians, ns)\n\nPer packet = the run time of every program on both nodes divided by the packets that left a pod (from_container runs). Per program = mean ns per run in the RR phase.\n\n| variant | per packet, RR | per packet, CRR | from_container | to_container | from_tunnel | to_tunnel | from_netdev | to_netdev |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for v in [CrossVariant::Native, CrossVariant::Tunnel] {
        let Some(s) = sums.get(&v) else { continue };
        let prog = |name| {
            s.programs_rr
                .get(name)
                .map_or("–".into(), |ns| format!("{ns:.0}"))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            v.name(),
            s.per_packet_rr.map_or("–".into(), |ns| format!("{ns:.0}")),
            s.per_packet_crr.map_or("–".into(), |ns| format!("{ns:.0}")),
            prog(programs::FROM_CONTAINER),
            prog(programs::TO_CONTAINER),
            prog(programs::FROM_TUNNEL),
            prog(programs::TO_TUNNEL),
            prog(programs::FROM_NETDEV),
            prog(programs::TO_NETDEV),
        );
    }
    if let (Some(t), Some(n)) = (
        sums.get(&CrossVariant::Tunnel)
            .and_then(|s| s.per_packet_rr),
        sums.get(&CrossVariant::Native)
            .and_then(|s| s.per_packet_rr),
    ) {
        let _ = writeln!(
            md,
            "\nEncapsulation's extra eBPF cost per packet (tunnel − native, RR phase): {:.0} ns. The programs write and strip the VXLAN headers themselves (from_container, from_netdev), so that is all of it: the kernel's VXLAN device (its transmit, UDP socket and receive queue) is left only what they do not take, which from_tunnel's runs count.",
            t - n
        );
    }
}
