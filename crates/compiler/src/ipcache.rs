//! The ipcache: which identity an address has and, for an address on another node, that
//! node's InternalIP (the tunnel endpoint), as an LPM trie of prefixes. Pod /32s, node and
//! router addresses, every policy CIDR, every other node's pod CIDR, and 0.0.0.0/0 as the
//! world.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnet::Ipv4Net;
use sluice_common::{IDENTITY_WORLD, IpcacheEntry, IpcacheKey};

use crate::nodes::Nodes;

pub(crate) type Ipcache = BTreeMap<IpcacheKey, IpcacheEntry>;

/// The ipcache of the nodes' pod CIDRs, the policy CIDRs, pods and node addresses. More
/// specific sources go in last so they replace less specific ones: a policy CIDR equal to
/// a pod CIDR takes its key, a pod's /32 replaces a CIDR's identity for its address, and a
/// node's address replaces a pod claiming it.
///
/// An other node's pod CIDR is there to route, not to name: it carries the identity the
/// address would have without it (the longest policy CIDR holding it, else the world), so
/// adding it changes no verdict. An entry inside it routes to that node too.
pub(crate) fn build(
    cidrs: &BTreeMap<Ipv4Net, u32>,
    pods: impl Iterator<Item = (Ipv4Addr, IpcacheEntry)>,
    addresses: &BTreeMap<Ipv4Addr, IpcacheEntry>,
    nodes: &Nodes,
) -> Ipcache {
    let mut ipcache = Ipcache::new();
    ipcache.insert(
        IpcacheKey::new(Ipv4Addr::UNSPECIFIED, 0),
        IpcacheEntry::local(IDENTITY_WORLD),
    );
    for (pod_cidr, tunnel_endpoint) in nodes.remote_pod_cidrs() {
        let identity = cidrs
            .iter()
            .filter(|(c, _)| c.contains(&pod_cidr))
            .max_by_key(|(c, _)| c.prefix_len())
            .map_or(IDENTITY_WORLD, |(_, &id)| id);
        ipcache.insert(
            IpcacheKey::new(pod_cidr.network(), pod_cidr.prefix_len()),
            IpcacheEntry {
                identity,
                tunnel_endpoint,
            },
        );
    }
    for (&prefix, &identity) in cidrs {
        ipcache.insert(
            IpcacheKey::new(prefix.network(), prefix.prefix_len()),
            IpcacheEntry {
                identity,
                tunnel_endpoint: nodes.prefix_tunnel(prefix),
            },
        );
    }
    for (address, entry) in pods {
        ipcache.insert(IpcacheKey::new(address, 32), entry);
    }
    for (&address, &entry) in addresses {
        ipcache.insert(IpcacheKey::new(address, 32), entry);
    }
    ipcache
}

/// Every prefix of the ipcache with its identity.
pub(crate) fn prefixes(ipcache: &Ipcache) -> impl Iterator<Item = (Ipv4Net, u32)> + '_ {
    ipcache.iter().filter_map(|(key, entry)| {
        let prefix = Ipv4Net::new(key.addr(), u8::try_from(key.prefixlen).ok()?).ok()?;
        Some((prefix, entry.identity))
    })
}
