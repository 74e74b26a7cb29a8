//! Pod traffic between nodes, the agent's part (Cilium's `routing-mode`). The datapath
//! forwards pod traffic from the ipcache; the agent gives it what it reads besides: the
//! tunnel device with the tunnel programs on it, `node_config` (mode, devices and the
//! node's own address), and from_netdev on the underlay device, which serves external
//! frontends (NodePort, externalIPs, LoadBalancer VIPs) to clients outside the node.
//! The node's own stack still needs a route for what it sends itself to other nodes'
//! pods; those routes carry a protocol number of ours, so every pass reads them back from
//! the kernel and removes only ours that no node explains any more.

use std::collections::BTreeSet;

use aya::maps::{Array, MapData};
use sluice_api::{Drift, RoutingStatus};
use sluice_common::{NodeConfig, RoutingMode, kinds::DriftKind};
use sluice_datapath::{AttachRole, Datapath};
use sluice_netns::{LinkKind, NetNsError, Netlink, RouteEntry};
use tracing::info;

use crate::{
    AgentError,
    masquerade::{CidrPlan, MasqueradeConfig, NonMasqueradeCidrs},
    nodes::ClusterNode,
};

/// This node's own addresses, from its Node object (`DesiredState.nodes.local`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnAddresses {
    /// Its InternalIP: what external traffic to a backend on another node is SNATed to.
    pub address: Option<std::net::Ipv4Addr>,
    /// Its router address: the source of what it sends into the tunnel.
    pub router: Option<std::net::Ipv4Addr>,
}

/// `proto` of the routes the agent installs (`ip route show proto 201`); not one of
/// iproute2's named protocols.
pub const ROUTE_PROTOCOL: u8 = 201;

/// VXLAN over IPv4 adds 50 bytes (outer IPv4 20, UDP 8, VXLAN 8, inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// How this node carries pod traffic to the others: the agent's routing flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingConfig {
    pub mode: RoutingMode,
    /// The device toward the other nodes (required for tunnel and native).
    pub underlay_device: Option<String>,
    /// The collect-metadata VXLAN device the agent creates (tunnel mode).
    pub tunnel_device: String,
    /// The tunnel device's UDP port.
    pub tunnel_port: u16,
    /// Egress masquerading of pod traffic leaving the cluster (to_netdev).
    pub masquerade: MasqueradeConfig,
}

impl RoutingConfig {
    /// The MTU a pod of this node gets: the underlay's, less the tunnel's overhead in
    /// tunnel mode; None (the veth default) in local mode.
    pub fn pod_mtu(&self) -> Result<Option<u32>, AgentError> {
        let underlay = match (self.mode, self.underlay_device.as_deref()) {
            (RoutingMode::Local, _) => return Ok(None),
            (mode, None) => return Err(AgentError::NoUnderlay { mode }),
            (_, Some(device)) => device,
        };
        let mtu = Netlink::current()?.mtu(underlay)?;
        Ok(Some(match self.mode {
            RoutingMode::Tunnel => mtu.saturating_sub(VXLAN_OVERHEAD),
            _ => mtu,
        }))
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            mode: RoutingMode::Local,
            underlay_device: None,
            tunnel_device: "sluice_vxlan".into(),
            tunnel_port: 8472,
            masquerade: MasqueradeConfig::default(),
        }
    }
}

impl RoutingConfig {
    /// The underlay device, which tunnel and native mode cannot do without, and a tunnel
    /// device name the kernel and the link pins accept.
    pub fn validate(&self) -> Result<(), AgentError> {
        if self.mode != RoutingMode::Local && self.underlay_device.is_none() {
            return Err(AgentError::NoUnderlay { mode: self.mode });
        }
        if self.masquerade.enabled && self.underlay_device.is_none() {
            return Err(AgentError::MasqueradeWithoutUnderlay);
        }
        // The tunnel programs' links are pinned under the device's name.
        sluice_datapath::check_target(&self.tunnel_device)
            .map_err(|_| AgentError::BadTunnelDevice(self.tunnel_device.clone()))
    }

    pub fn status(&self) -> RoutingStatus {
        RoutingStatus {
            mode: self.mode,
            tunnel_device: (self.mode == RoutingMode::Tunnel).then(|| self.tunnel_device.clone()),
            underlay_device: match self.mode {
                RoutingMode::Local => None,
                _ => self.underlay_device.clone(),
            },
            non_masquerade_cidrs: self.masquerade.status(),
        }
    }
}

/// The agent's routing state: its config and the pinned `node_config` and
/// `non_masq_cidrs` maps.
pub struct Routing {
    config: RoutingConfig,
    node_config: Array<MapData, NodeConfig>,
    non_masq_cidrs: NonMasqueradeCidrs,
}

/// What differs between the kernel and the routing the nodes call for.
#[derive(Debug, Default)]
struct Plan {
    node_config: Option<(NodeConfig, Option<NodeConfig>)>,
    tunnel_detached: bool,
    /// The underlay device, when one is configured and from_netdev is not on it.
    netdev_detached: Option<String>,
    routes_missing: Vec<RouteEntry>,
    routes_unexpected: Vec<RouteEntry>,
    non_masq_cidrs: CidrPlan,
}

impl Routing {
    /// Checks the flags, makes the tunnel device in tunnel mode and writes `node_config`.
    pub fn start(config: RoutingConfig, pin_dir: &std::path::Path) -> Result<Self, AgentError> {
        config.validate()?;
        let maps = sluice_datapath::PinnedMaps::open(pin_dir)?;
        let routing = Self {
            config,
            node_config: maps.node_config,
            non_masq_cidrs: NonMasqueradeCidrs::new(maps.non_masq_cidrs),
        };
        if routing.config.mode == RoutingMode::Tunnel {
            routing.ensure_tunnel_device(&Netlink::current()?, true)?;
        }
        Ok(routing)
    }

    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    /// One pass: the tunnel device and its programs, `node_config`, the underlay device's
    /// program, and the node's routes to the pod CIDRs of `others`. Returns whether
    /// anything changed.
    pub fn reconcile(
        &mut self,
        datapath: &mut Datapath,
        others: &[ClusterNode],
        own: OwnAddresses,
    ) -> Result<bool, AgentError> {
        let netlink = Netlink::current()?;
        if self.config.mode == RoutingMode::Tunnel {
            self.ensure_tunnel_device(&netlink, false)?;
        }
        let plan = self.plan(&netlink, datapath, others, own)?;
        self.apply(&netlink, datapath, &plan)
    }

    /// What `verify` reports: the same comparison as a pass, as drift.
    pub fn drift(
        &self,
        datapath: &Datapath,
        others: &[ClusterNode],
        own: OwnAddresses,
    ) -> Result<Vec<Drift>, AgentError> {
        let netlink = Netlink::current()?;
        let plan = self.plan(&netlink, datapath, others, own)?;
        let mut drift = Vec::new();
        if let Some((desired, actual)) = plan.node_config {
            drift.push(Drift {
                map: sluice_common::registry::names::NODE_CONFIG.into(),
                kind: DriftKind::Differs,
                key: "0".into(),
                desired: Some(describe(&desired)),
                actual: actual.as_ref().map(describe),
            });
        }
        if plan.node_config.is_some_and(|(desired, _)| {
            self.config.mode == RoutingMode::Tunnel && desired.tunnel_ifindex == 0
        }) {
            drift.push(Drift {
                map: "link".into(),
                kind: DriftKind::Missing,
                key: self.config.tunnel_device.clone(),
                desired: Some(format!(
                    "vxlan external dstport {}",
                    self.config.tunnel_port
                )),
                actual: None,
            });
        }
        if plan.tunnel_detached {
            drift.push(Drift {
                map: "tcx".into(),
                kind: DriftKind::Missing,
                key: self.config.tunnel_device.clone(),
                desired: Some(programs(AttachRole::TunnelDevice)),
                actual: None,
            });
        }
        if let Some(device) = &plan.netdev_detached {
            drift.push(Drift {
                map: "tcx".into(),
                kind: DriftKind::Missing,
                key: device.clone(),
                desired: Some(programs(AttachRole::Netdev)),
                actual: None,
            });
        }
        let route = |kind, r: &RouteEntry, present: bool| Drift {
            map: "routes".into(),
            kind,
            key: r.destination.to_string(),
            desired: (!present).then(|| r.to_string()),
            actual: present.then(|| r.to_string()),
        };
        drift.extend(
            plan.routes_missing
                .iter()
                .map(|r| route(DriftKind::Missing, r, false)),
        );
        drift.extend(
            plan.routes_unexpected
                .iter()
                .map(|r| route(DriftKind::Unexpected, r, true)),
        );
        drift.extend(plan.non_masq_cidrs.drift());
        Ok(drift)
    }

    fn plan(
        &self,
        netlink: &Netlink,
        datapath: &Datapath,
        others: &[ClusterNode],
        own: OwnAddresses,
    ) -> Result<Plan, AgentError> {
        let mut plan = Plan::default();
        let mut desired = self.desired_node_config(netlink)?;
        if let Some(address) = own.address {
            desired = desired.with_node_address(address);
        }
        let actual = self.node_config.get(&0, 0).ok();
        if actual != Some(desired) {
            plan.node_config = Some((desired, actual));
        }
        plan.tunnel_detached = self.config.mode == RoutingMode::Tunnel
            && !datapath.runs(AttachRole::TunnelDevice, &self.config.tunnel_device);
        plan.netdev_detached = self
            .config
            .underlay_device
            .clone()
            .filter(|device| !datapath.runs(AttachRole::Netdev, device));
        let desired: BTreeSet<RouteEntry> = others
            .iter()
            .filter_map(|node| self.route_to(node, own.router))
            .collect();
        let actual: BTreeSet<RouteEntry> = netlink.routes(ROUTE_PROTOCOL)?.into_iter().collect();
        plan.routes_missing = desired.difference(&actual).cloned().collect();
        plan.routes_unexpected = actual.difference(&desired).cloned().collect();
        plan.non_masq_cidrs = self.non_masq_cidrs.plan(&self.config.masquerade)?;
        Ok(plan)
    }

    fn apply(
        &mut self,
        netlink: &Netlink,
        datapath: &mut Datapath,
        plan: &Plan,
    ) -> Result<bool, AgentError> {
        // The exemptions are in place before node_config turns masquerading on.
        let mut changed = self.non_masq_cidrs.apply(&plan.non_masq_cidrs)?;
        // node_config names the tunnel device, so the device's programs go on after it.
        if let Some((desired, _)) = plan.node_config {
            info!(config = %describe(&desired), "writing node_config");
            self.node_config
                .set(0, desired, 0)
                .map_err(|source| AgentError::Map {
                    map: sluice_common::registry::names::NODE_CONFIG,
                    source,
                })?;
            changed = true;
        }
        if plan.tunnel_detached {
            info!(device = %self.config.tunnel_device, "attaching the tunnel programs");
            datapath.attach(AttachRole::TunnelDevice, &self.config.tunnel_device)?;
            changed = true;
        }
        // from_netdev reads node_config (written above) for the node's address.
        if let Some(device) = &plan.netdev_detached {
            info!(%device, "attaching the underlay device's program");
            datapath.attach(AttachRole::Netdev, device)?;
            changed = true;
        }
        // A device that is no longer the underlay (the agent restarted with other flags)
        // loses from_netdev, which would go on translating for this node there.
        for device in datapath.attached(AttachRole::Netdev)? {
            if self.config.underlay_device.as_deref() != Some(device.as_str()) {
                info!(%device, "detaching from a device that is no longer the underlay");
                datapath.detach(AttachRole::Netdev, &device)?;
                changed = true;
            }
        }
        // Removals first: a node whose address changed keeps its pod CIDR, and the kernel
        // refuses a second route to the same destination.
        for route in &plan.routes_unexpected {
            info!(%route, "removing route");
            netlink.delete_route(&route.route())?;
            changed = true;
        }
        for route in &plan.routes_missing {
            info!(%route, "adding route");
            netlink.add_route(&route.route())?;
            changed = true;
        }
        Ok(changed)
    }

    /// The route for this node's own packets to `node`'s pods: into the tunnel from our
    /// router address (so replies come back through the tunnel), or via the node's
    /// address over the underlay.
    fn route_to(
        &self,
        node: &ClusterNode,
        own_router: Option<std::net::Ipv4Addr>,
    ) -> Option<RouteEntry> {
        let (device, gateway, source) = match self.config.mode {
            RoutingMode::Local => return None,
            RoutingMode::Tunnel => (self.config.tunnel_device.clone(), None, own_router),
            RoutingMode::Native => (
                self.config.underlay_device.clone()?,
                Some(node.address),
                None,
            ),
        };
        Some(RouteEntry {
            destination: node.pod_cidr,
            gateway,
            device: Some(device),
            source,
            protocol: ROUTE_PROTOCOL,
        })
    }

    /// `node_config` for the devices as they are; a missing tunnel device (only `verify`
    /// sees one: a pass makes it first) has index 0.
    fn desired_node_config(&self, netlink: &Netlink) -> Result<NodeConfig, AgentError> {
        let underlay = match (&self.config.underlay_device, self.config.mode) {
            (Some(device), RoutingMode::Tunnel | RoutingMode::Native) => netlink.index(device)?,
            _ => 0,
        };
        let tunnel = match self.config.mode {
            RoutingMode::Tunnel => match netlink.index(&self.config.tunnel_device) {
                Err(NetNsError::NoInterface { .. }) => 0,
                index => index?,
            },
            _ => 0,
        };
        let config = NodeConfig::new(self.config.mode, tunnel, underlay)
            .with_masquerade(self.config.masquerade.enabled);
        Ok(match self.config.mode {
            // The datapath encapsulates and decapsulates itself; the device stays for
            // the node's own traffic and what the datapath leaves to it.
            RoutingMode::Tunnel => config.with_tunnel_port(self.config.tunnel_port),
            _ => config,
        })
    }

    /// Creates the tunnel device if it is missing (MTU the underlay's less the VXLAN
    /// overhead, no ARP, up); a device of that name that is not our kind of VXLAN device
    /// is an error. `configure` also sets an existing device's MTU, ARP and state.
    fn ensure_tunnel_device(&self, netlink: &Netlink, configure: bool) -> Result<(), AgentError> {
        let name = &self.config.tunnel_device;
        let port = self.config.tunnel_port;
        let created = match netlink.link_kind(name) {
            Ok(LinkKind::Vxlan {
                port: p,
                external: true,
            }) if p == port => false,
            Ok(found) => {
                return Err(AgentError::TunnelDevice {
                    device: name.clone(),
                    found: match found {
                        LinkKind::Vxlan { port, external } => format!(
                            "a VXLAN device with dstport {port}{}",
                            if external { "" } else { " and no external" }
                        ),
                        LinkKind::Other(kind) if kind.is_empty() => "a device".into(),
                        LinkKind::Other(kind) => format!("a {kind} device"),
                    },
                    port,
                });
            }
            Err(NetNsError::NoInterface { .. }) => {
                info!(device = %name, port, "creating the tunnel device");
                netlink.add_vxlan_external(name, port)?;
                true
            }
            Err(e) => return Err(e.into()),
        };
        if created || configure {
            let underlay =
                self.config
                    .underlay_device
                    .as_deref()
                    .ok_or(AgentError::NoUnderlay {
                        mode: self.config.mode,
                    })?;
            let mtu = netlink.mtu(underlay)?.saturating_sub(VXLAN_OVERHEAD);
            netlink.set_mtu(name, mtu)?;
            // Without neighbours on the device, the stack's own packets go out with the
            // device's own address as inner destination, which to_tunnel keys.
            netlink.set_arp(name, false)?;
            netlink.set_up(name)?;
        }
        Ok(())
    }
}

/// The programs a role attaches, as verify names them.
pub fn programs(role: AttachRole) -> String {
    role.programs()
        .map(|p| {
            let hook = match p.hook {
                sluice_datapath::Hook::Tcx(hook) => hook_word(hook),
                sluice_datapath::Hook::CgroupSockAddr => p.link_suffix,
            };
            format!("{} {hook}", p.name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn hook_word(hook: aya::programs::TcAttachType) -> &'static str {
    match hook {
        aya::programs::TcAttachType::Ingress => "ingress",
        aya::programs::TcAttachType::Egress => "egress",
        aya::programs::TcAttachType::Custom(_) => "custom",
    }
}

fn describe(config: &NodeConfig) -> String {
    let mode = RoutingMode::from_number(config.routing_mode)
        .map_or_else(|| config.routing_mode.to_string(), |m| m.to_string());
    format!(
        "mode {mode}, tunnel ifindex {}, underlay ifindex {}, node address {}, masquerade {}",
        config.tunnel_ifindex,
        config.underlay_ifindex,
        sluice_common::addr_from_be(config.node_address),
        if config.masquerade != 0 { "on" } else { "off" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_checked_before_anything_starts() {
        let tunnel = RoutingConfig {
            mode: RoutingMode::Tunnel,
            ..RoutingConfig::default()
        };
        assert_eq!(
            tunnel.validate().map_err(|e| e.to_string()),
            Err("--routing-mode tunnel needs --underlay-device".into())
        );
        let with_underlay = RoutingConfig {
            underlay_device: Some("underlay0".into()),
            ..tunnel
        };
        assert!(with_underlay.validate().is_ok());
        for bad in ["", "vxlan.0", "a-name-of-16-chr", "a b"] {
            let config = RoutingConfig {
                tunnel_device: bad.into(),
                ..with_underlay.clone()
            };
            assert!(
                matches!(config.validate(), Err(AgentError::BadTunnelDevice(n)) if n == bad),
                "{bad:?}"
            );
        }
        assert!(RoutingConfig::default().validate().is_ok(), "local mode");
    }

    #[test]
    fn status_names_the_devices_the_mode_uses() {
        let native = RoutingConfig {
            mode: RoutingMode::Native,
            underlay_device: Some("underlay0".into()),
            ..RoutingConfig::default()
        };
        assert_eq!(
            native.status(),
            RoutingStatus {
                mode: RoutingMode::Native,
                tunnel_device: None,
                underlay_device: Some("underlay0".into()),
                non_masquerade_cidrs: None,
            }
        );
        assert_eq!(RoutingConfig::default().status(), RoutingStatus::default());
        let masquerading = RoutingConfig {
            masquerade: MasqueradeConfig {
                enabled: true,
                non_masquerade_cidrs: vec!["192.0.2.0/24".parse().unwrap()],
            },
            ..native
        };
        assert_eq!(
            masquerading.status().non_masquerade_cidrs,
            Some(vec!["192.0.2.0/24".parse().unwrap()])
        );
        let without_underlay = RoutingConfig {
            underlay_device: None,
            mode: RoutingMode::Local,
            ..masquerading
        };
        assert_eq!(
            without_underlay.validate().map_err(|e| e.to_string()),
            Err("--masquerade needs --underlay-device: to_netdev masquerades on it".into())
        );
    }
}
