//! A Namespace relabelled while pods live in it: its labels are part of the label set of
//! each of its pods, so every identity of the namespace is renamed, the same pods keeping
//! it. Nothing else a pod shows others moves (its own labels, address, named ports and
//! ipBlock verdicts), so the rename is the whole change: numbers, the ipcache entries of
//! the namespace's pods, and, for the policies, the identities they name.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use sluice_common::{IDENTITY_WORLD, IpcacheEntry, IpcacheKey};
use sluice_store::selector::Labels;

use super::{NotInPlace, PodEntry, PodIndex};
use crate::{
    changes::{ObjectKey, touched},
    identity,
    ipcache::Ipcache,
};

/// Identities a Namespace relabel renamed: old number -> new number and label set.
pub(crate) type Renamed = BTreeMap<u32, (u32, Vec<String>)>;

impl PodIndex {
    /// Takes the labels of the Namespace `name` (None: gone), renaming the identities of
    /// its pods and their ipcache entries, recorded in `delta`; `local` holds the
    /// identities and addresses of its local endpoints. [`NotInPlace`] when the namespace
    /// is defined twice, a pod label there reads like a namespace's, or a new number
    /// would move another identity.
    pub(crate) fn put_namespace(
        &mut self,
        name: &str,
        labels: Option<&Labels>,
        local: (BTreeSet<u32>, BTreeSet<Ipv4Addr>),
        ipcache: &mut Ipcache,
        delta: &mut BTreeMap<IpcacheKey, Option<IpcacheEntry>>,
    ) -> Result<Renamed, NotInPlace> {
        if self.namespaces_twice.contains(name) {
            return Err(NotInPlace);
        }
        let old = self.namespaces.get(name).cloned();
        if old.as_ref() == labels {
            return Ok(Renamed::new());
        }
        match labels {
            Some(labels) => self.namespaces.insert(name.to_string(), labels.clone()),
            None => self.namespaces.remove(name),
        };
        if !self.populated.contains(name) {
            return Ok(Renamed::new());
        }
        if self.mimicked.contains(name) || self.identities.contains_key(&IDENTITY_WORLD) {
            return Err(NotInPlace);
        }
        let (mut olds, mut addresses) = local;
        for (_, pod) in self.namespace_pods(name) {
            olds.insert(pod.identity);
            addresses.insert(pod.address);
        }
        addresses.extend(
            self.local
                .iter()
                .filter(|(key, _)| key.0 == name)
                .filter_map(|(_, (_, (_, claimed, _)))| *claimed),
        );
        let renamed = self.renumber(&olds, old.as_ref(), labels)?;
        // Taken out first: a new number may be one an old identity frees.
        let uses: Vec<_> = olds
            .iter()
            .filter_map(|old| Some((renamed.get(old)?.0, self.identities.remove(old)?)))
            .collect();
        self.identities.extend(uses);
        let from = (name.to_string(), String::new());
        let pods = self
            .pods
            .range_mut(from..)
            .take_while(|(key, _)| key.0 == name);
        for (_, pod) in pods {
            if let Some(&(new, _)) = renamed.get(&pod.identity) {
                pod.identity = new;
            }
        }
        // Each address once: a renamed entry's new number may be another's old one.
        for address in addresses {
            rename_entry(address, &renamed, ipcache, delta);
        }
        Ok(renamed)
    }

    /// The pods of namespace `name` that are no local endpoint, by name.
    fn namespace_pods<'s>(
        &'s self,
        name: &'s str,
    ) -> impl Iterator<Item = (&'s ObjectKey, &'s PodEntry)> + 's {
        let from = (name.to_string(), String::new());
        self.pods
            .range(from..)
            .take_while(move |(key, _)| key.0 == name)
    }

    /// Numbers the label sets of `olds` take once the namespace's labels went from `old`
    /// to `new`, as the full compile numbers them: the old ones free theirs first (none
    /// may have been probed past by another), then the new ones are numbered in order.
    fn renumber(
        &mut self,
        olds: &BTreeSet<u32>,
        old: Option<&Labels>,
        new: Option<&Labels>,
    ) -> Result<Renamed, NotInPlace> {
        for id in olds {
            self.displaced.remove(id);
        }
        if olds.iter().any(|&id| self.frees_a_probe(id)) {
            return Err(NotInPlace);
        }
        let mut sets = BTreeMap::new();
        for id in olds {
            let set = self.sets.remove(id).ok_or(NotInPlace)?;
            self.numbers.remove(&set);
            sets.insert(identity::relabel_namespace(&set, old, new), *id);
        }
        let mut renamed = Renamed::new();
        for (set, old) in sets {
            if self.numbers.contains_key(&set) {
                return Err(NotInPlace);
            }
            let number = self.new_number(&set)?;
            let home = identity::home(&set);
            if home != number {
                self.displaced.insert(number, home);
            }
            self.sets.insert(number, set.clone());
            self.numbers.insert(set.clone(), number);
            renamed.insert(old, (number, set));
        }
        Ok(renamed)
    }
}

/// Renames the identity of the ipcache entry of `address`, if it is one of `renamed`: the
/// pod holding the address may be another pod of the namespace, or none (a node's).
pub(crate) fn rename_entry(
    address: Ipv4Addr,
    renamed: &Renamed,
    ipcache: &mut Ipcache,
    delta: &mut BTreeMap<IpcacheKey, Option<IpcacheEntry>>,
) {
    let key = IpcacheKey::new(address, 32);
    if let Some(entry) = ipcache.get_mut(&key)
        && let Some(&(new, _)) = renamed.get(&entry.identity)
    {
        touched(delta, key, Some(*entry));
        entry.identity = new;
    }
}
