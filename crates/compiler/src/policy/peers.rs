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
    workloads::Workload,
};
use crate::{ObjectRef, ipcache, problem::Problems};

/// The remote side of a rule.
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
    /// Router addresses that are no node's address: left out of ipBlock verdicts.
    pub routers: &'a BTreeSet<Ipv4Addr>,
    pub workloads: &'a [Workload<'a>],
    pub namespaces: &'a BTreeMap<String, Labels>,
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
        self.workloads
            .iter()
            .filter(|w| w.address.is_some())
            .filter(|w| {
                let namespace_ok = match &peer.namespace_selector {
                    None => w.namespace == namespace,
                    Some(s) => self
                        .namespaces
                        .get(w.namespace)
                        .is_some_and(|labels| selector::matches(s, labels)),
                };
                namespace_ok
                    && peer
                        .pod_selector
                        .as_ref()
                        .is_none_or(|s| selector::matches(s, &w.labels))
            })
            .map(|w| w.identity)
            .collect()
    }

    /// The identities an ipBlock selects: those whose every prefix in the ipcache lies in
    /// the block and outside each except. Policy CIDRs are all in the ipcache, so the
    /// prefixes of one identity agree on every block. Nodes are judged by their own
    /// addresses, not their router addresses.
    fn block_identities(&self, cidr: Ipv4Net, except: &[Ipv4Net]) -> BTreeSet<u32> {
        let inside = |p: &Ipv4Net| cidr.contains(p) && !except.iter().any(|e| e.contains(p));
        let mut verdicts: BTreeMap<u32, bool> = BTreeMap::new();
        let prefixes = ipcache::prefixes(self.ipcache)
            .filter(|(p, _)| p.prefix_len() < 32 || !self.routers.contains(&p.addr()));
        for (prefix, identity) in prefixes {
            let verdict = verdicts.entry(identity).or_insert(true);
            *verdict &= inside(&prefix);
        }
        verdicts
            .into_iter()
            .filter(|(_, v)| *v)
            .map(|(id, _)| id)
            .collect()
    }
}
