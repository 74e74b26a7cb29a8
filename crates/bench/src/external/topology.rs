//! The namespaces of the external variants and sluice's datapath on both nodes (see the
//! module docs for the picture).

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use k8s_openapi::{
    api::core::v1::{Namespace, Node, NodeAddress, NodeSpec, NodeStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use sluice_common::{NodeConfig, RoutingMode, programs};
use sluice_compiler::NodeContext;
use sluice_datapath::{AttachRole, Datapath, DatapathConfig, PinDir, PinnedMaps};
use sluice_netns::{Ipv4Net, Route};
use sluice_store::{LocalEndpoint, Snapshot};

use crate::{
    BenchError,
    kproxy::ServiceSpec,
    netns::NetNs,
    sluice::{add_services, pod_on, program},
};

use super::{NODE_A, NODE_B, POD, WORLD};

const UNDERLAY: &str = "underlay0";
const UNDERLAY_MTU: u32 = 1500;
const VXLAN: &str = "vxlan0";
const VXLAN_PORT: u16 = 8472;
/// VXLAN over IPv4 adds 50 bytes; the agent gives pods this MTU in tunnel mode.
const TUNNEL_MTU: u32 = UNDERLAY_MTU - 50;
const BRIDGE: &str = "br0";
const POD_IF: &str = "lxc-s";
const NAMESPACE: &str = "bench";
/// (Node name, underlay address, pod CIDR).
const NODES: [(&str, Ipv4Addr, Ipv4Addr); 2] = [
    ("node-a", NODE_A, Ipv4Addr::new(10, 1, 1, 0)),
    ("node-b", NODE_B, Ipv4Addr::new(10, 1, 2, 0)),
];

fn net(address: Ipv4Addr, prefix: u8) -> Result<Ipv4Net, BenchError> {
    Ipv4Net::new(address, prefix).map_err(|e| BenchError::Failed(e.to_string()))
}

/// The world host, the two nodes, node-b's pod and the underlay bridge, deleted on drop.
pub(super) struct Topology {
    pub world: NetNs,
    pub pod: NetNs,
    pub nodes: [NetNs; 2],
    underlay: NetNs,
}

impl Topology {
    /// The same namespaces and routes for every variant: the world host routes pod-b's
    /// subnet and `load_balancer_ip` via node-a, node-a routes pod-b's subnet via node-b,
    /// node-b the world host via node-a (so the bare path crosses node-a both ways, as
    /// the translated ones do). `tunnel`: each node gets a collect-metadata VXLAN device
    /// and the pod the tunnel's MTU, as the agent sets them up in tunnel mode.
    pub fn new(load_balancer_ip: Ipv4Addr, tunnel: bool) -> Result<Self, BenchError> {
        let topo = Self {
            world: NetNs::new("eworld")?,
            pod: NetNs::new("epod")?,
            nodes: [NetNs::new("enode-a")?, NetNs::new("enode-b")?],
            underlay: NetNs::new("eunderlay")?,
        };
        let bridge = topo.underlay.netlink()?;
        bridge.add_bridge(BRIDGE)?;
        bridge.set_up(BRIDGE)?;
        let pod_subnet = net(NODES[1].2, 24)?;
        for (i, (node, (_, address, _))) in topo.nodes.iter().zip(NODES).enumerate() {
            node.sysctl(&[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                // node-a forwards from the underlay back into it: no ICMP redirect may
                // teach the world host a shortcut to node-b.
                ("net.ipv4.conf.all.send_redirects", "0"),
                ("net.ipv4.conf.default.send_redirects", "0"),
            ])?;
            let port = format!("ul-{i}");
            topo.attach(node, &port, address)?;
        }
        let [a, b] = &topo.nodes;
        b.wire_pod(&topo.pod, POD_IF, POD)?;
        if tunnel {
            for node in [a, b] {
                let links = node.netlink()?;
                links.add_vxlan_external(VXLAN, VXLAN_PORT)?;
                links.set_mtu(VXLAN, TUNNEL_MTU)?;
                links.set_arp(VXLAN, false)?;
                links.set_up(VXLAN)?;
            }
            topo.pod.netlink()?.set_mtu("eth0", TUNNEL_MTU)?;
        }
        topo.attach(&topo.world, "ul-w", WORLD)?;
        let world = topo.world.netlink()?;
        world.add_route(&Route::via(pod_subnet, NODE_A))?;
        world.add_route(&Route::via(net(load_balancer_ip, 32)?, NODE_A))?;
        a.netlink()?.add_route(&Route::via(pod_subnet, NODE_B))?;
        b.netlink()?
            .add_route(&Route::via(net(WORLD, 32)?, NODE_A))?;
        // New connections/s for seconds on end need more ports than the default range
        // and TIME_WAIT reuse, as netperf users set up.
        topo.world.sysctl(&[
            ("net.ipv4.ip_local_port_range", "1024 65535"),
            ("net.ipv4.tcp_tw_reuse", "1"),
        ])?;
        Ok(topo)
    }

    /// `underlay0` in `ns` at `address`/24, its peer `port` on the bridge.
    fn attach(&self, ns: &NetNs, port: &str, address: Ipv4Addr) -> Result<(), BenchError> {
        let links = ns.netlink()?;
        links.add_veth(UNDERLAY, port, Some(self.underlay.ns()))?;
        links.add_address(UNDERLAY, net(address, 24)?.into())?;
        links.set_up(UNDERLAY)?;
        let bridge = self.underlay.netlink()?;
        bridge.set_controller(port, BRIDGE)?;
        bridge.set_up(port)?;
        Ok(())
    }
}

fn node_object(name: &str, address: Ipv4Addr, pod_cidr: Ipv4Addr) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(format!("{pod_cidr}/24")),
            ..NodeSpec::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: address.to_string(),
            }]),
            ..NodeStatus::default()
        }),
    }
}

/// The cluster both agents would read: the two nodes, pod-b and `services`.
fn snapshot(services: &[ServiceSpec]) -> Snapshot {
    let mut snap = Snapshot {
        revision: 1,
        nodes: NODES
            .iter()
            .map(|(name, address, cidr)| node_object(name, *address, *cidr))
            .collect(),
        namespaces: vec![Namespace {
            metadata: ObjectMeta {
                name: Some(NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }],
        pods: vec![pod_on(NODES[1].0, "server", "server", POD)],
        endpoints: vec![LocalEndpoint {
            node: NODES[1].0.into(),
            namespace: NAMESPACE.into(),
            pod: "server".into(),
            interface: POD_IF.into(),
            addresses: [POD.into()].into(),
        }],
        ..Snapshot::default()
    };
    add_services(&mut snap, services);
    snap
}

/// The programs whose run time is measured, on either node.
pub(super) const PROGRAMS: [&str; 6] = [
    programs::FROM_NETDEV,
    programs::TO_NETDEV,
    programs::FROM_TUNNEL,
    programs::TO_TUNNEL,
    programs::FROM_CONTAINER,
    programs::TO_CONTAINER,
];

/// Cumulative (run time, run count) of [`PROGRAMS`] on one node.
pub(super) type RunStats = [(Duration, u64); PROGRAMS.len()];

/// One node's datapath. Dropped before its pins: closing the programs, then unpinning the
/// links detaches them.
struct SluiceNode {
    datapath: Datapath,
    pins: PinDir,
}

/// sluice on both nodes, as two agents would program them.
pub(super) struct SluiceNodes {
    nodes: Vec<SluiceNode>,
}

impl SluiceNodes {
    /// Loads and attaches the datapath on each node (`from_netdev`/`to_netdev` on the
    /// underlay device, node-b's pod veth, in tunnel mode the tunnel programs on the VXLAN
    /// device the topology made), writes `node_config` as the agent does in `mode` and
    /// programs `services` with the compiler and the realizer. Returns the time node-a's
    /// programming took.
    pub fn start(
        topo: &Topology,
        services: &[ServiceSpec],
        mode: RoutingMode,
    ) -> Result<(Self, Duration), BenchError> {
        let tunnel = (mode == RoutingMode::Tunnel).then_some(VXLAN);
        let snap = snapshot(services);
        let mut nodes = Vec::new();
        let mut node_a_programming = Duration::ZERO;
        for (ns, (name, address, _)) in topo.nodes.iter().zip(NODES) {
            let pod_if = (name == NODES[1].0).then_some(POD_IF);
            let pins = PinDir::unique("sluice-bench-e-");
            let pin_dir = pins.path().to_owned();
            let (datapath, underlay_ifindex, tunnel_ifindex, interfaces) = ns.run(move || {
                let mut datapath = Datapath::load(&pin_dir, &DatapathConfig::default())
                    .map_err(|e| BenchError::Failed(format!("loading the datapath: {e}")))?;
                let mut interfaces = BTreeMap::new();
                for (role, device) in [
                    (AttachRole::Netdev, Some(UNDERLAY)),
                    (AttachRole::TunnelDevice, tunnel),
                    (AttachRole::PodVeth, pod_if),
                ] {
                    let Some(device) = device else { continue };
                    datapath
                        .attach(role, device)
                        .map_err(|e| BenchError::Failed(format!("attach {device}: {e}")))?;
                }
                let index = |device: &str| {
                    nix::net::if_::if_nametoindex(device).map_err(|errno| BenchError::Io {
                        call: "if_nametoindex",
                        what: device.into(),
                        source: errno.into(),
                    })
                };
                if let Some(device) = pod_if {
                    interfaces.insert(device.to_owned(), index(device)?);
                }
                let tunnel_ifindex = tunnel.map(index).transpose()?.unwrap_or(0);
                Ok((datapath, index(UNDERLAY)?, tunnel_ifindex, interfaces))
            })?;
            let mut maps = PinnedMaps::open(pins.path())
                .map_err(|e| BenchError::Failed(format!("open pinned maps: {e}")))?;
            let mut config =
                NodeConfig::new(mode, tunnel_ifindex, underlay_ifindex).with_node_address(address);
            if mode == RoutingMode::Tunnel {
                config = config.with_tunnel_port(VXLAN_PORT);
            }
            maps.node_config
                .set(0, config, 0)
                .map_err(|e| BenchError::Failed(format!("node_config: {e}")))?;
            let context = NodeContext {
                node: name.into(),
                interfaces,
                ..NodeContext::default()
            };
            let programming = program(pins.path(), &snap, &context)?;
            if name == NODES[0].0 {
                node_a_programming = programming.total();
            }
            nodes.push(SluiceNode { datapath, pins });
        }
        Ok((Self { nodes }, node_a_programming))
    }

    /// [`RunStats`] of each node, node-a first.
    pub fn run_stats(&mut self) -> Result<Vec<RunStats>, BenchError> {
        self.nodes
            .iter_mut()
            .map(|node| {
                let mut out = [(Duration::ZERO, 0); PROGRAMS.len()];
                for (slot, name) in out.iter_mut().zip(PROGRAMS) {
                    let info = node
                        .datapath
                        .program(name)
                        .map_err(|e| BenchError::Failed(format!("program {name}: {e}")))?
                        .info()
                        .map_err(|e| {
                            BenchError::Failed(format!("bpf_prog_get_info {name}: {e}"))
                        })?;
                    *slot = (info.run_time(), info.run_count());
                }
                Ok(out)
            })
            .collect()
    }

    /// The entries of node-a's conntrack table, and the TCP segments of live connections
    /// to a frontend its datapath found without their service entry so far (`ct_stats`:
    /// an entry evicted or removed while its connection lived).
    pub fn conntrack(&self) -> Result<(u64, u64), BenchError> {
        let node_a = self
            .nodes
            .first()
            .ok_or_else(|| BenchError::Failed("sluice runs on no node".into()))?;
        let maps = PinnedMaps::open(node_a.pins.path())
            .map_err(|e| BenchError::Failed(format!("open pinned maps: {e}")))?;
        let entries = maps
            .inventory
            .entries(sluice_common::MapId::Conntrack)
            .map_err(|e| BenchError::Failed(format!("counting ct4: {e}")))?;
        let stats = maps
            .ct_stats()
            .map_err(|e| BenchError::Failed(format!("reading ct_stats: {e}")))?;
        Ok((entries, stats.service_lost))
    }

    /// Conntrack entries node-a's datapath created (its per-CPU counter): read before and
    /// after a phase, the connections it forwarded to the frontend. Not the entries held:
    /// a connection that closed cleanly leaves none.
    pub fn created_on_node_a(&self) -> Result<u64, BenchError> {
        let node_a = self
            .nodes
            .first()
            .ok_or_else(|| BenchError::Failed("sluice runs on no node".into()))?;
        crate::sluice::conntrack_created(node_a.pins.path())
    }
}
