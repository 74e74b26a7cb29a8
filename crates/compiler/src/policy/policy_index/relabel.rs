//! A Namespace relabelled with pods in it, in the policies: the identities
//! `PodIndex::put_namespace` renamed, and the peers a namespaceSelector's verdict moves.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use sluice_store::selector::{self, Labels};

use super::{Group, Identity, LocalIdentity, NotInPlace, PolicyIndex, Renamed, identity_rules};
use crate::{Delta, DesiredState, ObjectKind, ObjectRef};

impl PolicyIndex {
    /// Every local endpoint's pod, identity and address.
    pub(crate) fn local_identities(&self) -> Vec<LocalIdentity> {
        self.local
            .values()
            .map(|l| {
                let key = (l.endpoint.namespace.clone(), l.endpoint.pod.clone());
                (key, l.pod.as_ref().map(|p| p.identity), l.endpoint.ipv4())
            })
            .collect()
    }

    /// Takes the labels of the Namespace `name` (None: gone), whose pods'
    /// identities `PodIndex::put_namespace` renamed: the peer groups, the identities
    /// table, the peers of every rule (renamed, and matched again where a
    /// namespaceSelector's verdict on the namespace flips), and the rows of the endpoints
    /// of the namespace and of those selected by a policy whose peers changed.
    pub(crate) fn put_namespace(
        &mut self,
        name: &str,
        labels: Option<Labels>,
        renamed: &Renamed,
        state: &mut DesiredState,
        delta: &mut Delta,
    ) -> Result<(), NotInPlace> {
        let old = match labels {
            Some(labels) => self.matching.namespaces.insert(name.to_string(), labels),
            None => self.matching.namespaces.remove(name),
        };
        if renamed.is_empty() {
            return Ok(());
        }
        let objects = self.objects.as_ref().ok_or(NotInPlace)?;
        self.matching.groups.rename(renamed);
        self.matching.prefixes.rename(renamed);
        let mut also = BTreeSet::new();
        for (&ifindex, local) in &mut self.local {
            if local.endpoint.namespace == name {
                also.insert(ifindex);
            }
            if let Some(pod) = &mut local.pod
                && let Some(&(new, _)) = renamed.get(&pod.identity)
            {
                pod.identity = new;
                also.insert(ifindex);
            }
        }
        let named: Vec<Identity> = renamed
            .iter()
            .filter_map(|(old, (new, set))| {
                state.identities.remove(old)?;
                let labels = set.clone();
                Some(Identity { id: *new, labels })
            })
            .collect();
        state
            .identities
            .extend(named.into_iter().map(|i| (i.id, i)));
        let new = self.matching.namespaces.get(name);
        let world = self.matching.world(&state.ipcache);
        let groups: Vec<&Group> = self.matching.groups.in_namespace(name).collect();
        let verdict = |s: &LabelSelector, labels: Option<&Labels>| {
            labels.is_some_and(|l| selector::matches(s, l))
        };
        let mut changed = BTreeSet::new();
        for rule in identity_rules(objects, &mut self.peers) {
            let ids = rule.ids;
            // Whichever is smaller is walked: a rule names few identities, or many.
            let gone: Vec<u32> = if ids.len() < renamed.len() {
                ids.iter()
                    .filter(|id| renamed.contains_key(id))
                    .copied()
                    .collect()
            } else {
                renamed
                    .keys()
                    .filter(|id| ids.contains(id))
                    .copied()
                    .collect()
            };
            for id in &gone {
                ids.remove(id);
            }
            let mut moved = !gone.is_empty();
            ids.extend(gone.iter().filter_map(|id| renamed.get(id)).map(|r| r.0));
            let flips = rule.list.iter().any(|peer| {
                peer.namespace_selector
                    .as_ref()
                    .is_some_and(|s| verdict(s, old.as_ref()) != verdict(s, new))
            });
            if flips {
                let object = ObjectRef::new(ObjectKind::NetworkPolicy, &rule.key.0, &rule.key.1);
                for g in &groups {
                    let selects = rule
                        .list
                        .iter()
                        .any(|peer| world.selects_group(&object, &rule.key.0, peer, g));
                    moved |= if selects {
                        ids.insert(g.identity)
                    } else {
                        ids.remove(&g.identity)
                    };
                }
            }
            if moved {
                changed.insert(rule.key.clone());
            }
        }
        drop((world, groups));
        self.rows_again(&changed, &also, state, delta);
        Ok(())
    }
}
