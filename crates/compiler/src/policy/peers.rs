//! The peers of a rule, as the identities they select.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use sluice_common::IDENTITY_ANY;
use sluice_store::selector::{self, Labels};

use super::{
    cidr::{Block, block},
    pod_index::Renamed,
    workloads::Workload,
};
use crate::{ObjectRef, ipcache, problem::Problems};

/// The remote side of a rule.
#[derive(Clone)]
pub(super) enum Peers {
    /// No `from`/`to`: every peer (identity 0 in the row).
    Any,
    Identities(BTreeSet<u32>),
}

impl Peers {
    pub(super) fn ids(&self) -> Vec<u32> {
        match self {
            Peers::Any => vec![IDENTITY_ANY],
            Peers::Identities(ids) => ids.iter().copied().collect(),
        }
    }

    pub(super) fn contains(&self, id: u32) -> bool {
        match self {
            Peers::Any => true,
            Peers::Identities(ids) => ids.contains(&id),
        }
    }
}

/// What rules are evaluated against.
pub(super) struct World<'a> {
    pub ipcache: &'a ipcache::Ipcache,
    /// The ipcache's prefixes by identity, for ipBlock verdicts.
    pub prefixes: &'a IdentityPrefixes,
    pub workloads: &'a [Workload<'a>],
    /// The pods with an address as peers: what selectors are matched against.
    pub peers: &'a PeerGroups,
    pub namespaces: &'a BTreeMap<String, Labels>,
}

/// The pods with an address, grouped by identity, namespace and the labels under every key
/// a selector names. A selector reads nothing else of a pod (its namespace's labels follow
/// from the namespace), so every pod of a group matches the same peers and gives the same
/// identity: peers are matched once per group, and there are about as many groups as
/// identities, far fewer than pods. Owned, so that a change to one NetworkPolicy can match
/// its peers again without the pods ([`super::PolicyIndex`]).
#[derive(Clone)]
pub(super) struct PeerGroups {
    groups: Vec<Group>,
    /// Identity -> the named container ports of its pods, as (name, protocol, number).
    ports: BTreeMap<u32, BTreeSet<(String, u8, u16)>>,
}

/// One group of pods: its identity, namespace and labels under the keys selectors name.
#[derive(Clone)]
pub(super) struct Group {
    pub identity: u32,
    namespace: String,
    labels: Labels,
}

impl Group {
    /// The group of a pod: `labels` narrowed to the keys selectors name.
    pub(super) fn new(
        identity: u32,
        namespace: &str,
        labels: &Labels,
        selected_keys: &BTreeSet<String>,
    ) -> Self {
        Self {
            identity,
            namespace: namespace.to_string(),
            labels: labels
                .iter()
                .filter(|(k, _)| selected_keys.contains(k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

impl PeerGroups {
    /// Groups `workloads` once their identities are known; `selected_keys` are the pod label
    /// keys any selector names.
    pub(super) fn new(workloads: &[Workload<'_>], selected_keys: &BTreeSet<String>) -> Self {
        type Key<'k> = (u32, &'k str, Vec<(&'k str, &'k str)>);
        let mut groups: BTreeMap<Key<'_>, Group> = BTreeMap::new();
        let mut ports: BTreeMap<u32, BTreeSet<(String, u8, u16)>> = BTreeMap::new();
        for w in workloads.iter().filter(|w| w.address.is_some()) {
            let seen: Vec<(&str, &str)> = w
                .labels
                .iter()
                .filter(|(k, _)| selected_keys.contains(k.as_str()))
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            groups
                .entry((w.identity, w.namespace, seen))
                .or_insert_with(|| Group::new(w.identity, w.namespace, &w.labels, selected_keys));
            if !w.ports.is_empty() {
                ports
                    .entry(w.identity)
                    .or_default()
                    .extend(w.ports.iter().cloned());
            }
        }
        Self {
            groups: groups.into_values().collect(),
            ports,
        }
    }

    /// Adds the group of an identity new to the groups, with one pod's named ports.
    pub(super) fn add(&mut self, group: Group, ports: impl IntoIterator<Item = (String, u8, u16)>) {
        let ports: BTreeSet<_> = ports.into_iter().collect();
        if !ports.is_empty() {
            self.ports.insert(group.identity, ports);
        }
        self.groups.push(group);
    }

    /// Takes out every group of `identity`, and its named ports.
    pub(super) fn remove(&mut self, identity: u32) {
        self.groups.retain(|g| g.identity != identity);
        self.ports.remove(&identity);
    }

    /// Gives the groups and named ports of each identity of `renamed` its new number.
    pub(super) fn rename(&mut self, renamed: &Renamed) {
        for group in &mut self.groups {
            if let Some(&(new, _)) = renamed.get(&group.identity) {
                group.identity = new;
            }
        }
        rename_keys(&mut self.ports, renamed);
    }

    /// Narrows the groups' labels to other keys: those under `removed` go, and those
    /// under `added` are read from each group's identity by `value` (None: no such label).
    pub(super) fn rekey<E>(
        &mut self,
        removed: &[String],
        added: &[String],
        value: impl Fn(u32, &str) -> Result<Option<String>, E>,
    ) -> Result<(), E> {
        for group in &mut self.groups {
            for key in removed {
                group.labels.remove(key);
            }
            for key in added {
                if let Some(v) = value(group.identity, key)? {
                    group.labels.insert(key.clone(), v);
                }
            }
        }
        Ok(())
    }

    /// The groups of the pods of namespace `name`.
    pub(super) fn in_namespace<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s Group> {
        self.groups.iter().filter(move |g| g.namespace == name)
    }

    /// How many groups there are.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.groups.len()
    }

    /// The numbers of the container ports named `name` with protocol `proto` of the pods
    /// with an address, by identity, for the identities in `peers`.
    pub(super) fn named_ports<'s>(
        &'s self,
        peers: &'s Peers,
        name: &'s str,
        proto: u8,
    ) -> impl Iterator<Item = (u32, u16)> + 's {
        self.ports
            .iter()
            .filter(|(id, _)| peers.contains(**id))
            .flat_map(move |(&id, ports)| {
                ports
                    .iter()
                    .filter(move |(n, p, _)| n == name && *p == proto)
                    .map(move |(_, _, number)| (id, *number))
            })
    }
}

impl World<'_> {
    /// The peers of one rule of `policy`, which lives in `namespace`.
    pub(super) fn peers(
        &self,
        policy: &ObjectRef,
        namespace: &str,
        peers: Option<&Vec<NetworkPolicyPeer>>,
        problems: &mut Problems,
    ) -> Peers {
        match peers {
            Some(list) if !list.is_empty() => {
                let mut ids = BTreeSet::new();
                for peer in list {
                    ids.extend(self.peer_identities(policy, namespace, peer, problems));
                }
                Peers::Identities(ids)
            }
            _ => Peers::Any,
        }
    }

    /// The identities one peer selects.
    pub(super) fn peer_identities(
        &self,
        policy: &ObjectRef,
        namespace: &str,
        peer: &NetworkPolicyPeer,
        problems: &mut Problems,
    ) -> BTreeSet<u32> {
        if peer.ip_block.is_some() {
            return match block(policy, peer, problems) {
                Some(Block {
                    cidr: Some(cidr),
                    except,
                }) => self.block_identities(cidr, &except),
                _ => BTreeSet::new(),
            };
        }
        self.peers
            .groups
            .iter()
            .filter(|g| self.selects(namespace, peer, g))
            .map(|g| g.identity)
            .collect()
    }

    /// Whether `peer`, of a policy in `namespace`, selects the pods of `group`.
    fn selects(&self, namespace: &str, peer: &NetworkPolicyPeer, group: &Group) -> bool {
        let namespace_ok = match &peer.namespace_selector {
            None => group.namespace == namespace,
            Some(s) => self
                .namespaces
                .get(&group.namespace)
                .is_some_and(|labels| selector::matches(s, labels)),
        };
        namespace_ok
            && peer
                .pod_selector
                .as_ref()
                .is_none_or(|s| selector::matches(s, &group.labels))
    }

    /// Whether `peer`, of a policy in `namespace`, selects the pods of `group`, by their
    /// labels or, for an ipBlock, by their identity's prefixes.
    pub(super) fn selects_group(
        &self,
        policy: &ObjectRef,
        namespace: &str,
        peer: &NetworkPolicyPeer,
        group: &Group,
    ) -> bool {
        self.selects_by(policy, namespace, peer, group, |cidr, except| {
            self.prefixes.in_block(group.identity, cidr, except)
        })
    }

    /// Whether `peer`, of a policy in `namespace`, selects the one pod of the identity
    /// that [`PeerGroups::add`] gave `group`, at `address`.
    pub(super) fn selects_new(
        &self,
        policy: &ObjectRef,
        namespace: &str,
        peer: &NetworkPolicyPeer,
        group: &Group,
        address: Ipv4Addr,
    ) -> bool {
        self.selects_by(policy, namespace, peer, group, |cidr, except| {
            cidr.contains(&address) && !except.iter().any(|e| e.contains(&address))
        })
    }

    /// Whether `peer` selects `group`: by labels, or for an ipBlock by `in_block`'s
    /// verdict on its CIDR and excepts.
    fn selects_by(
        &self,
        policy: &ObjectRef,
        namespace: &str,
        peer: &NetworkPolicyPeer,
        group: &Group,
        in_block: impl FnOnce(Ipv4Net, &[Ipv4Net]) -> bool,
    ) -> bool {
        if peer.ip_block.is_none() {
            return self.selects(namespace, peer, group);
        }
        match block(policy, peer, &mut Problems::default()) {
            Some(Block {
                cidr: Some(cidr),
                except,
            }) => in_block(cidr, &except),
            _ => false,
        }
    }

    /// The identities an ipBlock selects: those whose every prefix in the ipcache lies in
    /// the block and outside each except. Policy CIDRs are all in the ipcache, so the
    /// prefixes of one identity agree on every block.
    fn block_identities(&self, cidr: Ipv4Net, except: &[Ipv4Net]) -> BTreeSet<u32> {
        self.prefixes
            .by_identity
            .iter()
            .filter(|(_, p)| p.in_block(cidr, except))
            .map(|(&id, _)| id)
            .collect()
    }
}

/// The ipcache's prefixes grouped by identity, so an ipBlock is judged once per identity
/// rather than once per prefix. Nodes are judged by their own addresses: router addresses
/// that are no node's address are left out.
#[derive(Clone)]
pub(super) struct IdentityPrefixes {
    by_identity: BTreeMap<u32, Prefixes>,
}

/// The prefixes of one identity.
#[derive(Clone)]
struct Prefixes {
    /// The longest prefix holding every one: a block holds them all if and only if it
    /// holds this one, since the prefixes holding a prefix form a chain.
    common: Ipv4Net,
    /// By network address, then length.
    all: BTreeSet<(Ipv4Addr, u8)>,
}

impl IdentityPrefixes {
    /// Gives a new identity the /32 of its one pod.
    pub(super) fn add(&mut self, identity: u32, address: Ipv4Addr) {
        let prefix = Ipv4Net::from(address);
        let all = [(address, 32)].into();
        self.by_identity.insert(
            identity,
            Prefixes {
                common: prefix,
                all,
            },
        );
    }

    /// Whether an ipBlock selects `identity`, by its prefixes.
    pub(super) fn in_block(&self, identity: u32, cidr: Ipv4Net, except: &[Ipv4Net]) -> bool {
        self.by_identity
            .get(&identity)
            .is_some_and(|p| p.in_block(cidr, except))
    }

    /// Gives each identity of `renamed` its new number.
    pub(super) fn rename(&mut self, renamed: &Renamed) {
        rename_keys(&mut self.by_identity, renamed);
    }

    /// Moves `prefix` from the identity `from` to `to` (None: not among the prefixes).
    pub(super) fn move_prefix(&mut self, prefix: Ipv4Net, from: Option<u32>, to: Option<u32>) {
        let prefix = prefix.trunc();
        let at = (prefix.network(), prefix.prefix_len());
        if let Some(id) = from
            && let Some(prefixes) = self.by_identity.get_mut(&id)
        {
            prefixes.all.remove(&at);
            let mut all = prefixes
                .all
                .iter()
                .filter_map(|&(a, len)| Ipv4Net::new(a, len).ok());
            match all.next() {
                Some(first) => prefixes.common = all.fold(first, common),
                None => {
                    self.by_identity.remove(&id);
                }
            }
        }
        if let Some(id) = to {
            let entry = self.by_identity.entry(id).or_insert(Prefixes {
                common: prefix,
                all: BTreeSet::new(),
            });
            entry.common = common(entry.common, prefix);
            entry.all.insert(at);
        }
    }

    /// Forgets an identity gone from the ipcache.
    pub(super) fn remove(&mut self, identity: u32) {
        self.by_identity.remove(&identity);
    }

    pub(super) fn new(ipcache: &ipcache::Ipcache, routers: &BTreeSet<Ipv4Addr>) -> Self {
        let mut by_identity: BTreeMap<u32, Prefixes> = BTreeMap::new();
        let prefixes = ipcache::prefixes(ipcache)
            .filter(|(p, _)| p.prefix_len() < 32 || !routers.contains(&p.addr()));
        for (prefix, identity) in prefixes {
            let prefix = prefix.trunc();
            let entry = by_identity.entry(identity).or_insert(Prefixes {
                common: prefix,
                all: BTreeSet::new(),
            });
            entry.common = common(entry.common, prefix);
            entry.all.insert((prefix.network(), prefix.prefix_len()));
        }
        Self { by_identity }
    }
}

impl Prefixes {
    /// Whether an ipBlock selects the identity: it holds every prefix, and no except
    /// holds one.
    fn in_block(&self, cidr: Ipv4Net, except: &[Ipv4Net]) -> bool {
        cidr.contains(&self.common) && !except.iter().any(|e| self.any_inside(*e))
    }

    /// Whether one of the prefixes lies inside `block`: one whose network address is in
    /// the block and which is at least as long.
    fn any_inside(&self, block: Ipv4Net) -> bool {
        self.all
            .range((block.network(), 0)..=(block.broadcast(), 32))
            .any(|&(_, len)| len >= block.prefix_len())
    }
}

/// Moves the values under the old numbers of `renamed` to the new ones: all taken out
/// first, since a new number may be one an old identity frees.
fn rename_keys<V>(map: &mut BTreeMap<u32, V>, renamed: &Renamed) {
    let moved: Vec<(u32, V)> = renamed
        .iter()
        .filter_map(|(old, (new, _))| Some((*new, map.remove(old)?)))
        .collect();
    map.extend(moved);
}

/// The longest prefix holding both `a` and `b`.
fn common(a: Ipv4Net, b: Ipv4Net) -> Ipv4Net {
    let differing = (u32::from(a.network()) ^ u32::from(b.network())).leading_zeros();
    // At most 32, so it fits in u8.
    let len = a.prefix_len().min(b.prefix_len()).min(differing as u8);
    Ipv4Net::new(a.network(), len).map_or(a, |n| n.trunc())
}
