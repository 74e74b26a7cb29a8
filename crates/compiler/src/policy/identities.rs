//! The identities of pods and policy CIDRs, and the table of those in use.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    rc::Rc,
};

use ipnet::Ipv4Net;
use sluice_common::{IDENTITY_ANY, IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD};
use sluice_store::selector::Labels;

use super::workloads::Workload;
use crate::{
    Identity, Problem,
    identity::{self, LABEL_HOST, LABEL_REMOTE_NODE, LABEL_WORLD, Scope},
    problem::Problems,
};

/// Identity -> labels, starting with the reserved identities.
pub(super) fn reserved() -> BTreeMap<u32, Vec<String>> {
    [
        (IDENTITY_HOST, vec![LABEL_HOST.to_string()]),
        (IDENTITY_WORLD, vec![LABEL_WORLD.to_string()]),
        (IDENTITY_REMOTE_NODE, vec![LABEL_REMOTE_NODE.to_string()]),
    ]
    .into()
}

/// Puts the reserved identity `id` (one of [`reserved`]'s) in the table when `in_use`, else
/// takes it out: as the full compile lists those that something refers to.
pub(super) fn keep_reserved(table: &mut BTreeMap<u32, crate::Identity>, id: u32, in_use: bool) {
    if !in_use {
        table.remove(&id);
    } else if let Some(labels) = reserved().remove(&id) {
        table.entry(id).or_insert(Identity { id, labels });
    }
}

/// Gives every workload the identity of its label set; returns the sets, in workload order.
/// Pods alike (one interned label set, one namespace, the same policy CIDRs around their
/// addresses) share one set: at 200,000 Pods a set per pod would cost some 60 MiB.
pub(super) fn pods(
    workloads: &mut [Workload<'_>],
    cidrs: &BTreeSet<Ipv4Net>,
    selected_keys: &BTreeSet<String>,
    labels_of: &mut BTreeMap<u32, Vec<String>>,
    problems: &mut Problems,
) -> Vec<Rc<Vec<String>>> {
    type Alike<'a> = (&'a str, *const Labels, Option<*const Labels>, Vec<Ipv4Net>);
    let mut alike: HashMap<Alike<'_>, Rc<Vec<String>>> = HashMap::new();
    let sets: Vec<Rc<Vec<String>>> = workloads
        .iter()
        .map(|w| {
            let around = containing(w, cidrs).collect();
            let key = (
                w.namespace,
                std::ptr::from_ref::<Labels>(&w.labels),
                w.namespace_labels.map(std::ptr::from_ref),
                around,
            );
            Rc::clone(
                alike
                    .entry(key)
                    .or_insert_with(|| Rc::new(label_set(w, cidrs, selected_keys))),
            )
        })
        .collect();
    drop(alike);
    let distinct: BTreeSet<&Vec<String>> = sets.iter().map(|s| &**s).collect();
    let distinct = distinct.into_iter().cloned().collect();
    let (numbers, left_out) = identity::allocate(&distinct, Scope::Label);
    for labels in left_out {
        problems.insert(Problem::PodIdentitiesExhausted { labels });
    }
    for (w, set) in workloads.iter_mut().zip(&sets) {
        w.identity = numbers.get(&**set).copied().unwrap_or(IDENTITY_WORLD);
        if w.identity != IDENTITY_WORLD {
            labels_of
                .entry(w.identity)
                .or_insert_with(|| Vec::clone(set));
        }
    }
    sets
}

/// The policy CIDRs that hold a workload's address.
fn containing<'a>(
    w: &Workload<'_>,
    cidrs: &'a BTreeSet<Ipv4Net>,
) -> impl Iterator<Item = Ipv4Net> + 'a {
    w.address
        .map(move |a| cidrs.iter().filter(move |c| c.contains(&a)).copied())
        .into_iter()
        .flatten()
}

/// The security labels of a workload: its own, its namespace's and the policy CIDRs that
/// hold its address.
pub(super) fn label_set(
    w: &Workload<'_>,
    cidrs: &BTreeSet<Ipv4Net>,
    selected_keys: &BTreeSet<String>,
) -> Vec<String> {
    identity::pod_labels(
        w.namespace,
        &w.labels,
        w.namespace_labels,
        containing(w, cidrs),
        selected_keys,
    )
}

/// The identity of every policy CIDR but 0.0.0.0/0, which is the world itself.
pub(super) fn cidrs(
    cidrs: &BTreeSet<Ipv4Net>,
    labels_of: &mut BTreeMap<u32, Vec<String>>,
    problems: &mut Problems,
) -> BTreeMap<Ipv4Net, u32> {
    let sets: BTreeMap<Ipv4Net, Vec<String>> = cidrs
        .iter()
        .filter(|c| c.prefix_len() > 0)
        .map(|&p| {
            let containing = cidrs.iter().filter(|c| c.contains(&p)).copied();
            (p, identity::cidr_labels(containing))
        })
        .collect();
    let (numbers, left_out) = identity::allocate(&sets.values().cloned().collect(), Scope::Cidr);
    for labels in left_out {
        problems.insert(Problem::CidrIdentitiesExhausted { labels });
    }
    sets.into_iter()
        .map(|(prefix, set)| {
            let id = numbers.get(&set).copied().unwrap_or(IDENTITY_WORLD);
            if id != IDENTITY_WORLD {
                labels_of.insert(id, set);
            }
            (prefix, id)
        })
        .collect()
}

/// The identities in `used` with their labels; identity 0 (any peer) is no identity.
pub(super) fn named(
    used: BTreeSet<u32>,
    mut labels_of: BTreeMap<u32, Vec<String>>,
) -> BTreeMap<u32, Identity> {
    used.into_iter()
        .filter(|&id| id != IDENTITY_ANY)
        .filter_map(|id| {
            Some((
                id,
                Identity {
                    id,
                    labels: labels_of.remove(&id)?,
                },
            ))
        })
        .collect()
}
