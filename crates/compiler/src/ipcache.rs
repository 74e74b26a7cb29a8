//! The ipcache: which identity an address has, as an LPM trie of prefixes. Pod /32s, node
//! addresses, every policy CIDR, and 0.0.0.0/0 as the world.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnet::Ipv4Net;
use sluice_common::{IDENTITY_WORLD, IpcacheEntry, IpcacheKey};

pub(crate) type Ipcache = BTreeMap<IpcacheKey, IpcacheEntry>;

/// The ipcache of the policy CIDRs, pods and nodes with their identities. More specific
/// sources go in last so they replace less specific ones: a pod's /32 replaces a CIDR's
/// identity for its address, and a node's address replaces a pod claiming it.
pub(crate) fn build(
    cidrs: &BTreeMap<Ipv4Net, u32>,
    pods: impl Iterator<Item = (Ipv4Addr, u32)>,
    nodes: &BTreeMap<Ipv4Addr, u32>,
) -> Ipcache {
    let mut ipcache = Ipcache::new();
    ipcache.insert(
        IpcacheKey::new(Ipv4Addr::UNSPECIFIED, 0),
        IpcacheEntry::local(IDENTITY_WORLD),
    );
    for (prefix, &id) in cidrs {
        ipcache.insert(
            IpcacheKey::new(prefix.network(), prefix.prefix_len()),
            IpcacheEntry::local(id),
        );
    }
    for (address, id) in pods {
        ipcache.insert(IpcacheKey::new(address, 32), IpcacheEntry::local(id));
    }
    for (&address, &id) in nodes {
        ipcache.insert(IpcacheKey::new(address, 32), IpcacheEntry::local(id));
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
