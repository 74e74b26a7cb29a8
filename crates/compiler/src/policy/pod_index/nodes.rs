//! What another node's change moves of the pods: the addresses nodes take from pods,
//! and the tunnel endpoint of the pods on it or inside its pod CIDR.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use sluice_common::{IpcacheEntry, IpcacheKey};

use super::{NotInPlace, PodIndex};
use crate::{changes::touched, ipcache::Ipcache, nodes::Nodes};

/// Where the addressed pods of the index run: node names, each kept once however many
/// pods name it, the pods of each node and the node of each address, so that a node's
/// change reaches its pods without a walk over every pod.
#[derive(Default)]
pub(super) struct Places {
    names: Vec<String>,
    numbers: HashMap<String, u32>,
    /// Node number -> the addresses its pods claim.
    on: HashMap<u32, Vec<Ipv4Addr>>,
    /// Address -> the node of a pod claiming it (of one of them, when contested).
    at: HashMap<Ipv4Addr, Option<u32>>,
}

impl Places {
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&n) = self.numbers.get(name) {
            return n;
        }
        // Fewer names than pods, which fit in memory: u32 holds them.
        let n = self.names.len() as u32;
        self.names.push(name.to_string());
        self.numbers.insert(name.to_string(), n);
        n
    }

    fn name(&self, n: u32) -> Option<&str> {
        self.names.get(n as usize).map(String::as_str)
    }

    /// Records a pod claiming `address` on `node`; returns the node's number.
    pub(super) fn add(&mut self, address: Ipv4Addr, node: Option<&str>) -> Option<u32> {
        let number = node.map(|n| self.intern(n));
        if let Some(n) = number {
            self.on.entry(n).or_default().push(address);
        }
        self.at.insert(address, number);
        number
    }

    /// Forgets a pod claiming `address` alone on the node numbered `node`.
    pub(super) fn remove(&mut self, address: Ipv4Addr, node: Option<u32>) {
        if let Some(n) = node
            && let Some(addresses) = self.on.get_mut(&n)
        {
            if let Some(i) = addresses.iter().position(|a| *a == address) {
                addresses.swap_remove(i);
            }
            if addresses.is_empty() {
                self.on.remove(&n);
            }
        }
        self.at.remove(&address);
    }

    /// The addresses of the pods on the node `name`.
    fn on(&self, name: &str) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let number = self.numbers.get(name);
        number
            .and_then(|n| self.on.get(n))
            .into_iter()
            .flatten()
            .copied()
    }

    /// The pod addresses inside `cidr`: each address of a small CIDR looked up, a large
    /// one's found by a walk over every address.
    fn inside(&self, cidr: Ipv4Net) -> Vec<Ipv4Addr> {
        if cidr.prefix_len() >= 16 {
            let (first, last) = (u32::from(cidr.network()), u32::from(cidr.broadcast()));
            (first..=last)
                .map(Ipv4Addr::from)
                .filter(|a| self.at.contains_key(a))
                .collect()
        } else {
            self.at
                .keys()
                .filter(|a| cidr.contains(*a))
                .copied()
                .collect()
        }
    }
}

impl PodIndex {
    /// The policy CIDRs, which give their identity to the pod CIDRs inside them.
    pub(crate) fn cidrs(&self) -> &BTreeSet<Ipv4Net> {
        &self.cidrs
    }

    /// Whether a pod claims `address`.
    pub(crate) fn claims(&self, address: Ipv4Addr) -> bool {
        self.claims.contains_key(&address)
    }

    /// Node addresses (routers included) `gone` and `taken` since the last compile: in
    /// place unless a pod claims one (the node takes it from the pod, or gives it back)
    /// or a policy CIDR of that one address would hold a gone one again.
    pub(crate) fn put_node_addresses(
        &mut self,
        gone: &[Ipv4Addr],
        taken: &[Ipv4Addr],
    ) -> Result<(), NotInPlace> {
        let claimed = gone
            .iter()
            .chain(taken)
            .any(|a| self.claims.contains_key(a));
        if claimed || gone.iter().any(|&a| self.cidrs.contains(&Ipv4Net::from(a))) {
            return Err(NotInPlace);
        }
        for a in gone {
            self.reserved.remove(a);
        }
        self.reserved.extend(taken);
        Ok(())
    }

    /// Gives the pods on the nodes `names`, and those inside one of `cidrs` (a pod whose
    /// node is unknown is sent to the node whose pod CIDR holds it), the tunnel endpoint
    /// `nodes` gives them, recorded in `delta`. [`NotInPlace`] for one whose address is
    /// contested or reserved and whose entry would move: which claim holds the entry is
    /// the full compile's to say.
    pub(crate) fn retunnel(
        &self,
        names: &BTreeSet<String>,
        cidrs: &[Ipv4Net],
        nodes: &Nodes,
        ipcache: &mut Ipcache,
        delta: &mut BTreeMap<IpcacheKey, Option<IpcacheEntry>>,
    ) -> Result<(), NotInPlace> {
        let mut addresses: BTreeSet<Ipv4Addr> =
            names.iter().flat_map(|n| self.places.on(n)).collect();
        for cidr in cidrs {
            addresses.extend(self.places.inside(*cidr));
        }
        for address in addresses {
            let Some(&node) = self.places.at.get(&address) else {
                continue;
            };
            let name = node.and_then(|n| self.places.name(n));
            let tunnel = nodes.pod_tunnel(&self.this, name, address);
            let key = IpcacheKey::new(address, 32);
            let Some(entry) = ipcache.get_mut(&key) else {
                continue;
            };
            if entry.tunnel_endpoint == tunnel {
                continue;
            }
            let alone = self.claims.get(&address) == Some(&1) && !self.reserved.contains(&address);
            if !alone {
                return Err(NotInPlace);
            }
            touched(delta, key, Some(*entry));
            entry.tunnel_endpoint = tunnel;
        }
        Ok(())
    }
}
