//! The cluster's nodes as this node routes to them, and the ipcache entries of their
//! addresses.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use sluice_common::{IDENTITY_HOST, IDENTITY_REMOTE_NODE, IpcacheEntry, addr_be};
use sluice_store::{
    Snapshot,
    nodes::{ClusterNode, check_nodes},
};

use sluice_store::nodes::ZONE_LABEL;

use crate::{Problem, problem::Problems};

/// The nodes routing can use, seen from the node compiled for: what the agent reads to set
/// up its routes and its tunnel. A Node that fails a check (see [`sluice_store::nodes`]) is
/// reported in [`crate::DesiredState::problems`] and left out whole: no route, no tunnel
/// endpoint, no router address; its pods keep their identities but are not sent to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Nodes {
    /// This node, when the snapshot holds it and routing can use it.
    pub local: Option<ClusterNode>,
    /// Every other node routing can use, sorted by name.
    pub remote: Vec<ClusterNode>,
}

/// The nodes of `snapshot` as `this` node sees them, reporting the ones left out.
pub(crate) fn nodes(snapshot: &Snapshot, this: &str, problems: &mut Problems) -> Nodes {
    let checked = check_nodes(&snapshot.nodes, snapshot.cluster_cidr);
    for fault in checked.faults {
        problems.insert(Problem::Node(fault));
    }
    let (local, remote): (Vec<_>, Vec<_>) = checked.nodes.into_iter().partition(|n| n.name == this);
    Nodes {
        local: local.into_iter().next(),
        remote,
    }
}

/// The IPv4 InternalIP and ExternalIP addresses of the Node named `this`, sorted: where
/// its node ports listen. Addresses that do not parse are left to `check_nodes` to report.
pub(crate) fn node_addresses(snapshot: &Snapshot, this: &str) -> Vec<Ipv4Addr> {
    let addresses: BTreeSet<Ipv4Addr> = snapshot
        .nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() == Some(this))
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    addresses.into_iter().collect()
}

/// The zone of the Node named `this`: its `topology.kubernetes.io/zone` label, if set.
pub(crate) fn node_zone(snapshot: &Snapshot, this: &str) -> Option<String> {
    snapshot
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(this))?
        .metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .filter(|zone| !zone.is_empty())
        .cloned()
}

impl Nodes {
    /// Where a pod's packets go: nowhere special on this node (0), to its node's
    /// InternalIP on another node, and for a pod whose node is unknown (or left out), to
    /// the node whose pod CIDR holds its address, if any.
    pub(crate) fn pod_tunnel(&self, this: &str, node: Option<&str>, address: Ipv4Addr) -> u32 {
        if node == Some(this) {
            return 0;
        }
        // `remote` is sorted by name.
        let known = node.and_then(|node| {
            let i = self
                .remote
                .binary_search_by(|n| n.name.as_str().cmp(node))
                .ok()?;
            Some(addr_be(self.remote[i].internal_ip))
        });
        known.unwrap_or_else(|| self.prefix_tunnel(Ipv4Net::from(address)))
    }

    /// The InternalIP of the other node whose pod CIDR holds `prefix`, else 0. An entry
    /// more specific than a pod CIDR (a policy CIDR, a pod) still routes to that node.
    pub(crate) fn prefix_tunnel(&self, prefix: Ipv4Net) -> u32 {
        self.remote
            .iter()
            .find(|n| n.pod_cidr.is_some_and(|c| c.contains(&prefix)))
            .map_or(0, |n| addr_be(n.internal_ip))
    }

    /// Every other node's pod CIDR with its InternalIP, so that a pod not known yet still
    /// routes to its node.
    pub(crate) fn remote_pod_cidrs(&self) -> impl Iterator<Item = (Ipv4Net, u32)> + '_ {
        self.remote
            .iter()
            .filter_map(|n| Some((n.pod_cidr?, addr_be(n.internal_ip))))
    }

    /// The ipcache entries of node addresses: every IPv4 address in any Node's
    /// `status.addresses` is the host on this node and remote-node on the others, with no
    /// tunnel (the underlay reaches it); each router address is the host here and
    /// remote-node, through its node, elsewhere. Of two claims on one address the host
    /// wins, then the one without a tunnel.
    pub(crate) fn addresses(&self, snapshot: &Snapshot, this: &str) -> NodeAddresses {
        let identity = |name: Option<&str>| {
            if name == Some(this) {
                IDENTITY_HOST
            } else {
                IDENTITY_REMOTE_NODE
            }
        };
        let addresses: Vec<(Ipv4Addr, IpcacheEntry)> = snapshot
            .nodes
            .iter()
            .flat_map(|node| {
                let id = identity(node.metadata.name.as_deref());
                node.status
                    .iter()
                    .flat_map(|s| s.addresses.iter().flatten())
                    .filter_map(move |a| Some((a.address.parse().ok()?, IpcacheEntry::local(id))))
            })
            .collect();
        let local_router = self
            .local
            .iter()
            .filter_map(|n| Some((n.router()?, IpcacheEntry::local(IDENTITY_HOST))));
        let remote_routers = self.remote.iter().filter_map(|n| {
            let entry = IpcacheEntry {
                identity: IDENTITY_REMOTE_NODE,
                tunnel_endpoint: addr_be(n.internal_ip),
            };
            Some((n.router()?, entry))
        });
        let routers: Vec<_> = local_router.chain(remote_routers).collect();
        let node_own: BTreeSet<Ipv4Addr> = addresses.iter().map(|(a, _)| *a).collect();
        let router_only = routers
            .iter()
            .map(|(address, _)| *address)
            .filter(|r| !node_own.contains(r))
            .collect();
        let mut entries: BTreeMap<Ipv4Addr, IpcacheEntry> = BTreeMap::new();
        for (address, entry) in addresses.into_iter().chain(routers) {
            entries
                .entry(address)
                .and_modify(|held| {
                    let rank = |e: &IpcacheEntry| (e.identity, e.tunnel_endpoint);
                    if rank(&entry) < rank(held) {
                        *held = entry;
                    }
                })
                .or_insert(entry);
        }
        NodeAddresses {
            entries,
            router_only,
        }
    }
}

/// The ipcache entries of the nodes' own addresses.
#[derive(Clone)]
pub(crate) struct NodeAddresses {
    pub entries: BTreeMap<Ipv4Addr, IpcacheEntry>,
    /// Router addresses that are no node's `status.addresses`. They carry the node's
    /// identity, but an ipBlock names nodes by their addresses: one holding every node
    /// address selects the nodes whatever their pod-network addresses are.
    pub router_only: BTreeSet<Ipv4Addr>,
}
