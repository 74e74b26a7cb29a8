//! Another node added, removed or readdressed, compiled in place. What reads another
//! node's addresses and pod CIDR: the ipcache entries of its addresses, its router and
//! its pod CIDR; the tunnel endpoint of the pods on it or inside its pod CIDR, and of the
//! policy CIDRs inside that; the identity prefixes ipBlocks are judged by (remote-node,
//! and the identity a pod CIDR carries), hence the peers of the rules with an ipBlock;
//! and the node faults. Each is changed for the entries that move; a node address a pod
//! claims, this node, or a contested pod address is compiled whole.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use sluice_common::{IDENTITY_REMOTE_NODE, IDENTITY_WORLD, IpcacheEntry, IpcacheKey};
use sluice_store::Snapshot;

use super::{NotInPlace, WorkloadIndex};
use crate::{
    ClusterNode, Delta, DesiredState,
    changes::touched,
    ipcache::Ipcache,
    nodes::{self, NodeAddresses},
    problem::Problems,
};

/// A prefix of the ipcache whose identity, as ipBlocks judge it, went from the first to
/// the second (None: not judged).
pub(super) type PrefixMove = (Ipv4Net, Option<u32>, Option<u32>);

fn key(prefix: Ipv4Net) -> IpcacheKey {
    IpcacheKey::new(prefix.network(), prefix.prefix_len())
}

impl WorkloadIndex {
    /// Follows the Nodes `moved` (other nodes whose addresses or pod CIDR changed, or
    /// that came or went) into `state`, from `snapshot`'s Nodes, recording what changed
    /// in `delta`.
    pub(crate) fn put_nodes(
        &mut self,
        snapshot: &Snapshot,
        this: &str,
        moved: &BTreeSet<String>,
        state: &mut DesiredState,
        delta: &mut Delta,
    ) -> Result<(), NotInPlace> {
        self.policies.can_follow().then_some(()).ok_or(NotInPlace)?;
        let mut faults = Problems::default();
        let nodes = nodes::nodes(snapshot, this, &mut faults);
        if nodes.local != state.nodes.local {
            return Err(NotInPlace);
        }
        let addresses = nodes.addresses(snapshot, this);
        let touched_addresses = address_changes(&self.node_addresses, &addresses);
        let (gone, taken): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) = {
            let gone = touched_addresses
                .iter()
                .filter(|a| !addresses.entries.contains_key(a));
            let taken = touched_addresses
                .iter()
                .filter(|a| addresses.entries.contains_key(a));
            (gone.copied().collect(), taken.copied().collect())
        };
        self.pods.put_node_addresses(&gone, &taken)?;

        let old_cidrs: BTreeMap<Ipv4Net, u32> = state.nodes.remote_pod_cidrs().collect();
        let new_cidrs: BTreeMap<Ipv4Net, u32> = nodes.remote_pod_cidrs().collect();
        let changed_cidrs: Vec<Ipv4Net> = old_cidrs
            .keys()
            .chain(new_cidrs.keys())
            .filter(|c| old_cidrs.get(c) != new_cidrs.get(c))
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let policy_cidrs = self.pods.cidrs();
        let ipcache = &mut state.ipcache;
        let mut moves: Vec<PrefixMove> = Vec::new();
        // Pod CIDRs: a policy CIDR equal to one keeps the key, retunnelled below.
        for &cidr in changed_cidrs.iter().filter(|c| !policy_cidrs.contains(c)) {
            let after = new_cidrs.get(&cidr).map(|&tunnel_endpoint| IpcacheEntry {
                identity: cidr_identity(ipcache, policy_cidrs, cidr),
                tunnel_endpoint,
            });
            let before = write(ipcache, &mut delta.ipcache, key(cidr), after);
            moves.push((cidr, before.map(|e| e.identity), after.map(|e| e.identity)));
        }
        for &cidr in policy_cidrs.iter().filter(|c| c.prefix_len() > 0) {
            let single = cidr.prefix_len() == 32;
            if single
                && (addresses.entries.contains_key(&cidr.addr()) || self.pods.claims(cidr.addr()))
            {
                continue;
            }
            let tunnel = nodes.prefix_tunnel(cidr);
            if let Some(entry) = ipcache.get_mut(&key(cidr))
                && entry.tunnel_endpoint != tunnel
            {
                touched(&mut delta.ipcache, key(cidr), Some(*entry));
                entry.tunnel_endpoint = tunnel;
            }
        }
        let judged = |a: &Ipv4Addr, by: &NodeAddresses| !by.router_only.contains(a);
        for address in &touched_addresses {
            let after = addresses.entries.get(address).copied();
            let before = write(
                ipcache,
                &mut delta.ipcache,
                IpcacheKey::new(*address, 32),
                after,
            );
            let from = before.filter(|_| judged(address, &self.node_addresses));
            let to = after.filter(|_| judged(address, &addresses));
            moves.push((
                Ipv4Net::from(*address),
                from.map(|e| e.identity),
                to.map(|e| e.identity),
            ));
        }
        let mut on = moved.clone();
        on.extend(differing(&state.nodes.remote, &nodes.remote));
        self.pods
            .retunnel(&on, &changed_cidrs, &nodes, ipcache, &mut delta.ipcache)?;
        let remote_node = addresses
            .entries
            .values()
            .any(|e| e.identity == IDENTITY_REMOTE_NODE);
        state.nodes = nodes;
        self.node_addresses = addresses;
        self.policies
            .put_nodes(moves, remote_node, faults, state, delta);
        Ok(())
    }
}

/// The names of the nodes that differ between two lists sorted by name (a check on one
/// node, such as an overlap, can leave another out or let it in), found in one walk over
/// both: a node change must not cost a map of every node.
fn differing(old: &[ClusterNode], new: &[ClusterNode]) -> BTreeSet<String> {
    let (mut old, mut new) = (old.iter().peekable(), new.iter().peekable());
    let mut out = BTreeSet::new();
    loop {
        let differs = match (old.peek(), new.peek()) {
            (Some(a), Some(b)) if a.name == b.name => {
                let differs = (a != b).then(|| a.name.clone());
                old.next();
                new.next();
                differs
            }
            (Some(a), Some(b)) if a.name < b.name => old.next().map(|a| a.name.clone()),
            (Some(_), Some(_)) | (None, Some(_)) => new.next().map(|b| b.name.clone()),
            (Some(_), None) => old.next().map(|a| a.name.clone()),
            (None, None) => break,
        };
        out.extend(differs);
    }
    out
}

/// The addresses whose entry, or whether ipBlocks judge it, differs between `old` and
/// `new`.
fn address_changes(old: &NodeAddresses, new: &NodeAddresses) -> BTreeSet<Ipv4Addr> {
    let entries = old
        .entries
        .keys()
        .chain(new.entries.keys())
        .filter(|a| old.entries.get(a) != new.entries.get(a));
    let routers = old.router_only.symmetric_difference(&new.router_only);
    entries.chain(routers).copied().collect()
}

/// The identity a pod CIDR carries: that of the longest policy CIDR holding it, else
/// the world's. A pod CIDR is no /32, so that CIDR's own entry holds its identity.
fn cidr_identity(ipcache: &Ipcache, policy_cidrs: &BTreeSet<Ipv4Net>, cidr: Ipv4Net) -> u32 {
    policy_cidrs
        .iter()
        .filter(|p| p.contains(&cidr))
        .max_by_key(|p| p.prefix_len())
        .and_then(|p| ipcache.get(&key(*p)))
        .map_or(IDENTITY_WORLD, |e| e.identity)
}

/// Sets (`Some`) or removes the entry `key`, recording it if it changed; returns the
/// entry before.
fn write(
    ipcache: &mut Ipcache,
    delta: &mut BTreeMap<IpcacheKey, Option<IpcacheEntry>>,
    key: IpcacheKey,
    after: Option<IpcacheEntry>,
) -> Option<IpcacheEntry> {
    let before = ipcache.get(&key).copied();
    if before != after {
        touched(delta, key, before);
        match after {
            Some(entry) => ipcache.insert(key, entry),
            None => ipcache.remove(&key),
        };
    }
    before
}
