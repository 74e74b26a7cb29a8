//! The other nodes of the cluster as this agent needs them: their pod CIDR and their
//! address, read from the snapshot's Node objects (`spec.podCIDR`, the InternalIP of
//! `status.addresses`), never from a side channel.
//!
//! [`complete_ipcache`] puts the other nodes into the ipcache as the compiler's
//! several-node ipcache (issue #10, interface 5) will: until that lands in the compiler,
//! the agent adds what is missing. It only fills in, so it is a no-op on an ipcache that
//! already holds the tunnel endpoints, and goes once the compiler provides them.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnet::Ipv4Net;
use sluice_common::{
    IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD, IpcacheEntry, IpcacheKey, addr_be,
};
use sluice_compiler::DesiredState;
use sluice_store::Snapshot;

/// A node as the routing of pod traffic sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    pub pod_cidr: Ipv4Net,
    /// Its InternalIP: where pod traffic for it is sent.
    pub address: Ipv4Addr,
}

impl ClusterNode {
    /// The node's pod-network address: the first host of its pod CIDR, as the lab and a
    /// CNI plugin configure it on the node.
    pub fn router_address(&self) -> Ipv4Addr {
        router_address(self.pod_cidr)
    }
}

pub fn router_address(pod_cidr: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(pod_cidr.network()).saturating_add(1))
}

/// Every node of the snapshot with an IPv4 pod CIDR and an InternalIP, by name. A node
/// without either cannot take pod traffic; the sources refuse such nodes before they get
/// here.
pub fn cluster_nodes(snapshot: &Snapshot) -> BTreeMap<String, ClusterNode> {
    snapshot
        .nodes
        .iter()
        .filter_map(|node| {
            let name = node.metadata.name.clone()?;
            let pod_cidr = node
                .spec
                .as_ref()?
                .pod_cidr
                .as_deref()?
                .parse::<Ipv4Net>()
                .ok()?
                .trunc();
            let address = node
                .status
                .as_ref()?
                .addresses
                .iter()
                .flatten()
                .filter(|a| a.type_ == "InternalIP")
                .find_map(|a| a.address.parse::<Ipv4Addr>().ok())?;
            Some((
                name.clone(),
                ClusterNode {
                    name,
                    pod_cidr,
                    address,
                },
            ))
        })
        .collect()
}

/// The pod CIDR of `this_node`, if the snapshot gives it one.
pub fn own_pod_cidr(snapshot: &Snapshot, this_node: &str) -> Option<Ipv4Net> {
    snapshot
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(this_node))?
        .spec
        .as_ref()?
        .pod_cidr
        .as_deref()?
        .parse::<Ipv4Net>()
        .ok()
        .map(|c| c.trunc())
}

/// Adds to the ipcache this node's router address as host (what the node sends into the
/// tunnel from it must carry the host identity), and where every other node's pods live:
/// a pod's /32 gets its node as tunnel endpoint, the node's router address is remote-node
/// behind that node, and the rest of its pod CIDR is world behind it (so a pod not yet
/// known still routes). Entries already there keep their identity; only a missing tunnel
/// endpoint is filled in.
pub fn complete_ipcache(desired: &mut DesiredState, snapshot: &Snapshot, this_node: &str) {
    if let Some(cidr) = own_pod_cidr(snapshot, this_node) {
        desired
            .ipcache
            .entry(IpcacheKey::new(router_address(cidr), 32))
            .or_insert(IpcacheEntry::local(IDENTITY_HOST));
    }
    let nodes = cluster_nodes(snapshot);
    let others = || nodes.values().filter(|n| n.name != this_node);
    let behind = |entry: &mut IpcacheEntry, node: &ClusterNode| {
        if entry.tunnel_endpoint == 0 {
            entry.tunnel_endpoint = addr_be(node.address);
        }
    };
    for pod in &snapshot.pods {
        let Some(node) = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .filter(|n| *n != this_node)
            .and_then(|n| nodes.get(n))
        else {
            continue;
        };
        let address = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|a| a.parse::<Ipv4Addr>().ok());
        // Only pods the compiler placed: a node's own address stays the node's.
        if let Some(entry) = address.and_then(|a| {
            desired
                .ipcache
                .get_mut(&IpcacheKey::new(a, 32))
                .filter(|e| e.identity != IDENTITY_REMOTE_NODE)
        }) {
            behind(entry, node);
        }
    }
    for node in others() {
        let at = |identity| IpcacheEntry {
            identity,
            tunnel_endpoint: addr_be(node.address),
        };
        let router = IpcacheKey::new(node.router_address(), 32);
        behind(
            desired
                .ipcache
                .entry(router)
                .or_insert(at(IDENTITY_REMOTE_NODE)),
            node,
        );
        let cidr = IpcacheKey::new(node.pod_cidr.network(), node.pod_cidr.prefix_len());
        behind(
            desired.ipcache.entry(cidr).or_insert(at(IDENTITY_WORLD)),
            node,
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test")]

    use super::*;

    fn snapshot() -> Snapshot {
        serde_json::from_value(serde_json::json!({
            "nodes": [
                {"metadata": {"name": "a"}, "spec": {"podCIDR": "10.244.1.0/24"},
                 "status": {"addresses": [{"type": "InternalIP", "address": "172.30.0.11"}]}},
                {"metadata": {"name": "b"}, "spec": {"podCIDR": "10.244.2.0/24"},
                 "status": {"addresses": [{"type": "Hostname", "address": "b"},
                                          {"type": "InternalIP", "address": "172.30.0.12"}]}},
                {"metadata": {"name": "no-address"}, "spec": {"podCIDR": "10.244.3.0/24"}},
            ],
            "pods": [
                {"metadata": {"name": "p", "namespace": "default"}, "spec": {"nodeName": "b", "containers": []},
                 "status": {"podIP": "10.244.2.5"}},
                {"metadata": {"name": "q", "namespace": "default"}, "spec": {"nodeName": "a", "containers": []},
                 "status": {"podIP": "10.244.1.5"}},
            ],
        }))
        .unwrap()
    }

    #[test]
    fn nodes_come_from_pod_cidr_and_internal_ip() {
        let nodes = cluster_nodes(&snapshot());
        assert_eq!(nodes.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(nodes["b"].address, Ipv4Addr::new(172, 30, 0, 12));
        assert_eq!(nodes["b"].router_address(), Ipv4Addr::new(10, 244, 2, 1));
        assert_eq!(
            own_pod_cidr(&snapshot(), "a"),
            Some("10.244.1.0/24".parse().unwrap())
        );
    }

    #[test]
    fn other_nodes_pods_go_behind_their_node() {
        let snapshot = snapshot();
        let mut desired = DesiredState::default();
        for pod in ["10.244.2.5", "10.244.1.5"] {
            desired.ipcache.insert(
                IpcacheKey::new(pod.parse().unwrap(), 32),
                IpcacheEntry::local(300),
            );
        }
        complete_ipcache(&mut desired, &snapshot, "a");
        let b = addr_be(Ipv4Addr::new(172, 30, 0, 12));
        let get = |a: &str, len| desired.ipcache[&IpcacheKey::new(a.parse().unwrap(), len)];
        assert_eq!(get("10.244.2.5", 32).tunnel_endpoint, b);
        assert_eq!(get("10.244.2.5", 32).identity, 300);
        assert_eq!(get("10.244.1.5", 32).tunnel_endpoint, 0, "a local pod");
        assert_eq!(
            get("10.244.1.1", 32),
            IpcacheEntry::local(IDENTITY_HOST),
            "this node's router address"
        );
        assert_eq!(
            get("10.244.2.1", 32),
            IpcacheEntry {
                identity: IDENTITY_REMOTE_NODE,
                tunnel_endpoint: b
            }
        );
        assert_eq!(
            get("10.244.2.0", 24),
            IpcacheEntry {
                identity: IDENTITY_WORLD,
                tunnel_endpoint: b
            }
        );
        assert!(
            !desired
                .ipcache
                .contains_key(&IpcacheKey::new(Ipv4Addr::new(10, 244, 1, 0), 24)),
            "not this node's own pod CIDR"
        );
        let again = desired.clone();
        complete_ipcache(&mut desired, &snapshot, "a");
        assert_eq!(desired, again, "filling in twice changes nothing");
    }
}
