//! The router in front of the nodes, as a cloud's network is: `sluice-<lab>-router` on the
//! underlay at its network + 1. It spreads each LoadBalancer VIP over the nodes like a
//! target pool (one ECMP route per VIP, every node's underlay address a next hop, hashed on
//! the 5-tuple so one client's connections spread too), routes each node's pod CIDR to that
//! node, and has the world hosts with `attach: router` behind it, on subnets of their own;
//! the nodes route those hosts back through it. Everything here acts in the lab's own
//! namespaces.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    path::Path,
};

use sluice_netns::{Ipv4Net, MultipathRoute, NetNs, Route};

use crate::{
    Lab, LabError, NodeSpec, WorldAttach, WorldHostSpec,
    journal::journal_netns,
    lifecycle::require_binary,
    loadbalancer::{self, is_load_balancer},
    names, net, process,
    spec::{LabSpec, router_address},
    state::LabState,
    topology::UNDERLAY_DEVICE,
};

/// `proto` of the VIP routes in the router namespace, so that a sync finds its own (the
/// agents mark theirs 201).
pub const VIP_ROUTE_PROTOCOL: u8 = 202;
/// The router's port on the underlay bridge (the nodes' are `und` and 8 hex digits).
const ROUTER_PORT: &str = "undrouter";

/// The nodes (underlay addresses) the router's health check took out of each VIP's next
/// hops; kept in `<lab>/router-health.json` by the health checker.
pub type Unhealthy = BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>>;
const HEALTH_FILE: &str = "router-health.json";

/// What the router sends a VIP's traffic to: every node's underlay address, in lab file
/// order.
pub fn next_hops(spec: &LabSpec) -> Vec<Ipv4Addr> {
    spec.nodes
        .iter()
        .filter_map(|n| n.underlay_address)
        .collect()
}

/// Every VIP of the lab's LoadBalancer Services and the nodes it is spread over: every
/// node, in lab file order, but those `unhealthy` names for it; if that is every node, all
/// of them again, as a target pool with no healthy instance sends to every one.
pub fn vip_next_hops(st: &LabState, unhealthy: &Unhealthy) -> BTreeMap<Ipv4Addr, Vec<Ipv4Addr>> {
    let nodes = next_hops(&st.spec);
    st.services
        .values()
        .filter(|s| is_load_balancer(&s.object))
        .flat_map(|s| loadbalancer::vips(&s.object))
        .map(|vip| {
            let out = unhealthy.get(&vip);
            let healthy: Vec<Ipv4Addr> = nodes
                .iter()
                .copied()
                .filter(|n| out.is_none_or(|o| !o.contains(n)))
                .collect();
            (
                vip,
                if healthy.is_empty() {
                    nodes.clone()
                } else {
                    healthy
                },
            )
        })
        .collect()
}

/// What the health checker last decided; nothing (every node healthy) before it has.
pub fn read_unhealthy(dir: &Path) -> Unhealthy {
    fs::read(dir.join(HEALTH_FILE))
        .ok()
        .and_then(|data| serde_json::from_slice(&data).ok())
        .unwrap_or_default()
}

/// Writes through a temporary file and a rename, so a reader never sees half of it.
pub fn write_unhealthy(dir: &Path, unhealthy: &Unhealthy) -> Result<(), LabError> {
    let path = dir.join(HEALTH_FILE);
    let tmp = path.with_extension("json.tmp");
    let data = serde_json::to_vec(unhealthy).map_err(|source| LabError::Encode {
        what: "router health",
        source,
    })?;
    fs::write(&tmp, data).map_err(crate::error::io_err("write", &tmp))?;
    fs::rename(&tmp, &path).map_err(crate::error::io_err("rename", &path))
}

/// Makes the VIP routes of the router namespace `netns` those of [`vip_next_hops`]: each
/// changed one replaced in one message, those of released VIPs deleted.
pub fn sync_vip_routes(netns: &str, st: &LabState, unhealthy: &Unhealthy) -> Result<(), LabError> {
    let nl = NetNs::open(netns)?.netlink()?;
    let have: BTreeMap<Ipv4Net, Vec<Ipv4Addr>> = nl
        .multipath_routes(VIP_ROUTE_PROTOCOL)?
        .into_iter()
        .map(|e| (e.destination, e.gateways))
        .collect();
    let want: BTreeMap<Ipv4Net, Vec<Ipv4Addr>> = vip_next_hops(st, unhealthy)
        .into_iter()
        .filter(|(_, hops)| !hops.is_empty())
        .map(|(vip, hops)| (Ipv4Net::from(vip), hops))
        .collect();
    for (destination, gateways) in &want {
        if have.get(destination) != Some(gateways) {
            nl.replace_multipath_route(&MultipathRoute {
                destination: *destination,
                device: UNDERLAY_DEVICE,
                gateways: gateways.clone(),
                protocol: VIP_ROUTE_PROTOCOL,
            })?;
        }
    }
    for destination in have.keys().filter(|d| !want.contains_key(d)) {
        nl.delete_route_of(*destination, VIP_ROUTE_PROTOCOL)?;
    }
    Ok(())
}

impl Lab {
    /// In a world host on the underlay: the hosts behind the router, via the router.
    pub(crate) fn routes_behind_router(&self, netns: &str) -> Result<(), LabError> {
        let spec = &self.state.spec;
        let Some(router) = router_address(spec).filter(|_| spec.has_router()) else {
            return Ok(());
        };
        for host in spec
            .world
            .iter()
            .filter(|w| w.attach == WorldAttach::Router)
        {
            net::add_route(
                netns,
                &Route::via(Ipv4Net::from(host.address), router).dev("eth0"),
            )?;
        }
        Ok(())
    }

    /// The namespace of the router in front of the nodes; it exists when the lab file
    /// has `loadBalancer:` or world hosts with `attach: router`.
    pub fn router_netns(&self) -> String {
        names::router_netns(&self.state.name)
    }

    /// The router's namespace: forwarding on, reverse-path filtering off, ECMP hashed on
    /// the 5-tuple, its link to the underlay at network + 1 and a route to each node's pod
    /// CIDR.
    pub(crate) fn build_router(&self, spec: &LabSpec) -> Result<(), LabError> {
        let (Some(underlay), Some(address)) = (spec.underlay, router_address(spec)) else {
            return Err(LabError::NoUnderlay(self.state.name.clone()));
        };
        let netns = self.router_netns();
        journal_netns(&self.dir, &netns)?;
        NetNs::create(&netns)?.set_sysctls(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            // Layer 4: a client's connections to a VIP spread over the nodes, as a cloud's
            // load balancer spreads flows, not hosts.
            ("net.ipv4.fib_multipath_hash_policy", "1"),
        ])?;
        net::join_underlay(&net::UnderlayLink {
            lab: &self.state.name,
            underlay_netns: &self.underlay_netns(),
            netns: &netns,
            port: ROUTER_PORT,
            device: UNDERLAY_DEVICE,
            address,
            cidr: underlay.cidr,
            mtu: underlay.mtu,
        })?;
        for node in &spec.nodes {
            self.router_route_to_node(node, false)?;
        }
        // World hosts behind a node, via that node (those on the underlay are on-link).
        for host in &spec.world {
            if let WorldAttach::Node(behind) = &host.attach
                && let Some(via) = spec.node(behind).and_then(|n| n.underlay_address)
            {
                net::add_route(
                    &netns,
                    &Route::via(Ipv4Net::from(host.address), via).dev(UNDERLAY_DEVICE),
                )?;
            }
        }
        Ok(())
    }

    /// In the router: `node`'s pod CIDR via its underlay address (added, or with `remove`
    /// deleted as the node leaves).
    pub(crate) fn router_route_to_node(
        &self,
        node: &NodeSpec,
        remove: bool,
    ) -> Result<(), LabError> {
        let Some(address) = node.underlay_address else {
            return Ok(());
        };
        let route = Route::via(node.pod_cidr, address).dev(UNDERLAY_DEVICE);
        if remove {
            net::delete_route(&self.router_netns(), &route)
        } else {
            net::add_route(&self.router_netns(), &route)
        }
    }

    /// A world host behind the router: wired as a node wires one (its `eth0` with a /32,
    /// default route via the router's address), on a link of the router.
    pub(crate) fn wire_behind_router(
        &self,
        host: &WorldHostSpec,
        netns: &str,
    ) -> Result<(), LabError> {
        let spec = &self.state.spec;
        let router =
            router_address(spec).ok_or_else(|| LabError::NoUnderlay(self.state.name.clone()))?;
        net::setup_world(&net::WorldLink {
            lab: &self.state.name,
            node_netns: &self.router_netns(),
            world_netns: netns,
            interface: &names::world_interface(&host.name),
            address: host.address,
            router,
            mtu: spec.underlay.map(|u| u.mtu),
        })
    }

    /// The router's VIP routes after a change of the lab: VIPs given or released, nodes
    /// come or gone, with the health checker's last word on the nodes.
    pub(crate) fn sync_router(&self) -> Result<(), LabError> {
        if !self.state.spec.has_router() {
            return Ok(());
        }
        sync_vip_routes(
            &self.router_netns(),
            &self.state,
            &read_unhealthy(&self.dir),
        )
    }

    /// Starts the router's health checker (`sluice lab router-health`) inside the router's
    /// namespace, when the lab file asks for one; `lab down` stops it with the namespace.
    pub(crate) fn start_health_checker(&self) -> Result<(), LabError> {
        let checks = self
            .state
            .spec
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.health_check);
        if checks.is_none() {
            return Ok(());
        }
        require_binary(&self.opts.binaries.sluice, "sluice", "SLUICE_BIN")?;
        let mut cmd = NetNs::named(self.router_netns()).command(&self.opts.binaries.sluice)?;
        cmd.args(["lab", "router-health", "--lab-dir"])
            .arg(&self.dir);
        process::spawn_detached(cmd, &self.dir.join("router-health.log")).map(drop)
    }
}
