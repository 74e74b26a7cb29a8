//! What another node's change moves of the pods: the addresses nodes take from pods,
//! and the tunnel endpoint of the pods on it or inside its pod CIDR.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use sluice_common::{IpcacheEntry, IpcacheKey};

use super::{NotInPlace, PodIndex};
use crate::{changes::touched, ipcache::Ipcache, nodes::Nodes};

/// Node names, each kept once however many pods name it.
#[derive(Default)]
pub(super) struct NodeNames {
    names: Vec<String>,
    numbers: HashMap<String, u32>,
}

impl NodeNames {
    pub(super) fn intern(&mut self, name: &str) -> u32 {
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
    /// contested.
    pub(crate) fn retunnel(
        &self,
        names: &BTreeSet<String>,
        cidrs: &[Ipv4Net],
        nodes: &Nodes,
        ipcache: &mut Ipcache,
        delta: &mut BTreeMap<IpcacheKey, Option<IpcacheEntry>>,
    ) -> Result<(), NotInPlace> {
        let on: HashSet<u32> = names
            .iter()
            .filter_map(|n| self.node_names.numbers.get(n).copied())
            .collect();
        for pod in self.pods.values() {
            let node = pod.node.filter(|n| on.contains(n));
            if node.is_none() && !cidrs.iter().any(|c| c.contains(&pod.address)) {
                continue;
            }
            let name = pod.node.and_then(|n| self.node_names.name(n));
            let tunnel = nodes.pod_tunnel(&self.this, name, pod.address);
            let key = IpcacheKey::new(pod.address, 32);
            let Some(entry) = ipcache.get_mut(&key) else {
                continue;
            };
            if entry.tunnel_endpoint == tunnel {
                continue;
            }
            let holds = self.claims.get(&pod.address) == Some(&1)
                && !self.reserved.contains(&pod.address)
                && entry.identity == pod.identity;
            if !holds {
                return Err(NotInPlace);
            }
            touched(delta, key, Some(*entry));
            entry.tunnel_endpoint = tunnel;
        }
        Ok(())
    }
}
