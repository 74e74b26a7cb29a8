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
    identity::{self, Scope},
    ipcache::Ipcache,
};

/// Identities a Namespace relabel renamed: old number -> new number and label set.
pub(crate) type Renamed = BTreeMap<u32, (u32, Vec<String>)>;

/// A local endpoint's pod, its identity (None: its Pod is defined twice) and address.
pub(crate) type LocalIdentity = (ObjectKey, Option<u32>, Option<Ipv4Addr>);

impl PodIndex {
    /// Takes the labels of the Namespace `name` (None: gone), renaming the identities of
    /// its pods (and of others whose numbers that moves) and their ipcache entries,
    /// recorded in `delta`; `local` holds every local endpoint. [`NotInPlace`] when the
    /// namespace is defined twice or a pod label there reads like a namespace's.
    pub(crate) fn put_namespace(
        &mut self,
        name: &str,
        labels: Option<&Labels>,
        local: Vec<LocalIdentity>,
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
        let mut olds: BTreeSet<u32> = local
            .iter()
            .filter(|(key, _, _)| key.0 == name)
            .filter_map(|(_, identity, _)| *identity)
            .collect();
        olds.extend(self.namespace_pods(name).map(|(_, pod)| pod.identity));
        let renamed = self.renumber(&olds, old.as_ref(), labels)?;
        // Taken out first: a new number may be one an old identity frees.
        let uses: Vec<_> = renamed
            .iter()
            .filter_map(|(old, (new, _))| Some((*new, self.identities.remove(old)?)))
            .collect();
        self.identities.extend(uses);
        // Each address once: a renamed entry's new number may be another's old one.
        let mut addresses = BTreeSet::new();
        let others_moved = renamed.keys().any(|id| !olds.contains(id));
        let from = (name.to_string(), String::new());
        let pods: Box<dyn Iterator<Item = (&ObjectKey, &mut PodEntry)>> = if others_moved {
            Box::new(self.pods.iter_mut())
        } else {
            Box::new(
                self.pods
                    .range_mut(from..)
                    .take_while(|(key, _)| key.0 == name),
            )
        };
        for (_, pod) in pods {
            if let Some(&(new, _)) = renamed.get(&pod.identity) {
                pod.identity = new;
                addresses.insert(pod.address);
            }
        }
        for (key, identity, address) in &local {
            if identity.is_some_and(|id| renamed.contains_key(&id)) {
                addresses.extend(*address);
                let view = self
                    .local
                    .get(key)
                    .and_then(|(_, (_, claimed, _))| *claimed);
                addresses.extend(view);
            }
        }
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

    /// Numbers every label set once the namespace's labels went from `old` to `new` (the
    /// sets of `olds` relabelled), as the full compile numbers them: a new set may take
    /// a number another set held by probing, which moves that one too. Returns every
    /// identity whose number or labels change.
    fn renumber(
        &mut self,
        olds: &BTreeSet<u32>,
        old: Option<&Labels>,
        new: Option<&Labels>,
    ) -> Result<Renamed, NotInPlace> {
        let mut relabelled = BTreeMap::new();
        for id in olds {
            let set = self.sets.get(id).ok_or(NotInPlace)?;
            relabelled.insert(identity::relabel_namespace(set, old, new), *id);
        }
        let renamed = match self.renumber_locally(olds, &relabelled) {
            Some(renamed) => renamed,
            None => self.renumber_all(olds, relabelled)?,
        };
        for was in renamed.keys() {
            if let Some(set) = self.sets.remove(was) {
                self.numbers.remove(&set);
            }
            self.displaced.remove(was);
        }
        for (number, set) in renamed.values() {
            let home = identity::home(set);
            if home != *number {
                self.displaced.insert(*number, home);
            }
            self.sets.insert(*number, set.clone());
            self.numbers.insert(set.clone(), *number);
        }
        Ok(renamed)
    }

    /// The numbers of every label set once `olds` are `relabelled` (new set -> old
    /// number), found by numbering again only the runs of taken numbers the change
    /// reaches. With linear probing in sorted order, a run of consecutive taken numbers
    /// holds exactly the sets whose hash names a number in it, in an order that depends on
    /// those sets alone; so the runs holding a freed number or a new set's home are
    /// numbered again, and a set that would probe into another run takes that run in
    /// too. Every identity whose number or labels change; None when the runs grow past
    /// a quarter of the range (the caller numbers everything again).
    fn renumber_locally(
        &self,
        olds: &BTreeSet<u32>,
        relabelled: &BTreeMap<Vec<String>, u32>,
    ) -> Option<Renamed> {
        let fresh = relabelled
            .keys()
            .all(|set| self.numbers.get(set).is_none_or(|id| olds.contains(id)));
        if relabelled.len() != olds.len() || !fresh {
            return None;
        }
        let mut region = BTreeSet::new();
        for &n in olds {
            self.add_run(&mut region, n);
        }
        for set in relabelled.keys() {
            self.add_run(&mut region, identity::home(set));
        }
        let limit = identity::label_span() as usize / 4;
        while region.len() <= limit {
            match self.number_region(&region, olds, relabelled) {
                Ok(renamed) => return Some(renamed),
                Err(held) => self.add_run(&mut region, held),
            }
        }
        None
    }

    /// Adds the run of taken numbers holding `n` (or `n` alone, when free) to `region`.
    fn add_run(&self, region: &mut BTreeSet<u32>, n: u32) {
        region.insert(n);
        let span = identity::label_span();
        let mut m = n;
        for _ in 0..span {
            let before = identity::previous_label_number(m);
            if !self.sets.contains_key(&before) || !region.insert(before) {
                break;
            }
            m = before;
        }
        let mut m = n;
        for _ in 0..span {
            if !self.sets.contains_key(&m) {
                break;
            }
            m = identity::next_label_number(m);
            if !self.sets.contains_key(&m) || !region.insert(m) {
                break;
            }
        }
    }

    /// Numbers the sets of `region` (the kept ones held there, and the relabelled ones
    /// whose hash names a number there) in sorted order, as the full compile does; `Err`
    /// with a number held outside the region that one would probe past.
    fn number_region(
        &self,
        region: &BTreeSet<u32>,
        olds: &BTreeSet<u32>,
        relabelled: &BTreeMap<Vec<String>, u32>,
    ) -> Result<Renamed, u32> {
        let mut sets: Vec<(&Vec<String>, u32, bool)> = region
            .iter()
            .filter(|n| !olds.contains(n))
            .filter_map(|n| Some((self.sets.get(n)?, *n, false)))
            .chain(relabelled.iter().map(|(set, &was)| (set, was, true)))
            .collect();
        sets.sort();
        let mut taken = BTreeSet::new();
        let mut renamed = Renamed::new();
        for (set, was, relabelled) in sets {
            let mut number = identity::home(set);
            loop {
                let held_outside = !region.contains(&number) && self.sets.contains_key(&number);
                if held_outside {
                    return Err(number);
                }
                if taken.insert(number) {
                    break;
                }
                number = identity::next_label_number(number);
            }
            if relabelled || number != was {
                renamed.insert(was, (number, set.clone()));
            }
        }
        Ok(renamed)
    }

    /// The numbers of every label set once `olds` are `relabelled`, numbered again as the
    /// full compile numbers them; every identity whose number or labels change.
    fn renumber_all(
        &self,
        olds: &BTreeSet<u32>,
        relabelled: BTreeMap<Vec<String>, u32>,
    ) -> Result<Renamed, NotInPlace> {
        let kept = self.numbers.iter().filter(|(_, id)| !olds.contains(id));
        let all: BTreeSet<Vec<String>> = kept
            .map(|(set, _)| set.clone())
            .chain(relabelled.keys().cloned())
            .collect();
        let (numbers, left_out) = identity::allocate(&all, Scope::Label);
        if !left_out.is_empty() {
            return Err(NotInPlace);
        }
        let mut renamed = Renamed::new();
        for (set, &number) in &numbers {
            let was = match relabelled.get(set) {
                Some(&was) => was,
                None => *self.numbers.get(set).ok_or(NotInPlace)?,
            };
            if was != number || relabelled.contains_key(set) {
                renamed.insert(was, (number, set.clone()));
            }
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
