//! Security identities: label sets and the numbers they are given.
//!
//! Numbers come from a hash of the sorted labels, so they survive restarts and do not
//! depend on which other identities exist, except when two label sets collide: then the
//! later one in sorted order takes the next free number.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use sluice_common::{IDENTITY_FIRST_ALLOCATED, IDENTITY_SCOPE_CIDR};

use sluice_store::selector::Labels;

/// Pod labels that differ between otherwise identical pods (Cilium's default exclusions).
/// Giving each value its own identity would make one identity per pod; they stay relevant
/// only when a policy selects on them, so enforcement remains exact.
pub(crate) const HIGH_CARDINALITY_KEYS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "job-name",
    "batch.kubernetes.io/job-name",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
];

pub(crate) const LABEL_HOST: &str = "reserved:host";
pub(crate) const LABEL_WORLD: &str = "reserved:world";
pub(crate) const LABEL_REMOTE_NODE: &str = "reserved:remote-node";

/// The last number a label identity may take (Cilium's cluster-local range).
const LABEL_IDENTITY_MAX: u32 = 65535;
/// CIDR identities keep the scope bits and vary in the low 24.
const CIDR_IDENTITY_SPAN: u32 = 1 << 24;

/// The security-relevant labels of a pod, sorted.
pub(crate) fn pod_labels(
    namespace: &str,
    labels: &Labels,
    namespace_labels: Option<&Labels>,
    cidrs: impl Iterator<Item = Ipv4Net>,
    selected_keys: &BTreeSet<String>,
) -> Vec<String> {
    let mut out: Vec<String> = labels
        .iter()
        .filter(|(k, _)| {
            !HIGH_CARDINALITY_KEYS.contains(&k.as_str()) || selected_keys.contains(k.as_str())
        })
        .map(|(k, v)| format!("k8s:{k}={v}"))
        .collect();
    out.push(format!("k8s:{POD_NAMESPACE_KEY}={namespace}"));
    out.extend(namespace_label_set(namespace_labels));
    out.extend(cidrs.map(|c| format!("cidr:{c}")));
    out.sort();
    out.dedup();
    out
}

/// The label key of a pod's namespace in its label set.
const POD_NAMESPACE_KEY: &str = "io.kubernetes.pod.namespace";
/// What a namespace label's key is prefixed with in a pod's label set.
const NAMESPACE_LABEL_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// A namespace's labels as they stand in the label set of each of its pods.
fn namespace_label_set(labels: Option<&Labels>) -> impl Iterator<Item = String> + '_ {
    labels
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("k8s:{NAMESPACE_LABEL_PREFIX}{k}={v}"))
}

/// Whether a pod label under `key` reads, in the label set, like one its namespace puts
/// there: then the set alone no longer tells the pod's labels from its namespace's.
pub(crate) fn mimics_namespace(key: &str) -> bool {
    key == POD_NAMESPACE_KEY || key.starts_with(NAMESPACE_LABEL_PREFIX)
}

/// The label set `set` of a pod (that has no label [`mimics_namespace`]) once its
/// namespace's labels went from `old` to `new`.
pub(crate) fn relabel_namespace(
    set: &[String],
    old: Option<&Labels>,
    new: Option<&Labels>,
) -> Vec<String> {
    let old: BTreeSet<String> = namespace_label_set(old).collect();
    let mut out: Vec<String> = set.iter().filter(|l| !old.contains(*l)).cloned().collect();
    out.extend(namespace_label_set(new));
    out.sort();
    out.dedup();
    out
}

/// The labels of the identity of a policy CIDR: the world, narrowed by every policy CIDR
/// that contains it.
pub(crate) fn cidr_labels(cidrs: impl Iterator<Item = Ipv4Net>) -> Vec<String> {
    let mut out = vec![LABEL_WORLD.to_string()];
    out.extend(cidrs.map(|c| format!("cidr:{c}")));
    out.sort();
    out
}

/// FNV-1a (64 bit) of the labels joined by '\n': stable across builds and platforms.
fn hash(labels: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, label) in labels.iter().enumerate() {
        if i > 0 {
            h ^= u64::from(b'\n');
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for b in label.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Which numbering range an identity belongs to.
#[derive(Clone, Copy)]
pub(crate) enum Scope {
    /// Pods: 256..=65535.
    Label,
    /// Policy CIDRs: `IDENTITY_SCOPE_CIDR | n`, n < 2^24.
    Cidr,
}

/// Numbers for `sets`, taken in sorted order; a set that finds its number taken probes
/// linearly. Sets beyond the size of the range get none and are returned apart.
pub(crate) fn allocate(
    sets: &BTreeSet<Vec<String>>,
    scope: Scope,
) -> (BTreeMap<Vec<String>, u32>, Vec<Vec<String>>) {
    let (base, span) = match scope {
        Scope::Label => label_range(),
        Scope::Cidr => (IDENTITY_SCOPE_CIDR, CIDR_IDENTITY_SPAN),
    };
    allocate_in(sets, base, span)
}

/// The number a label identity takes when no other set holds it: the one its hash names.
pub(crate) fn home(set: &[String]) -> u32 {
    let (base, span) = label_range();
    // `span` fits in u32, so the remainder does too.
    base + (hash(set) % u64::from(span)) as u32
}

/// The number a label set probes after `number`, wrapping at the range's end.
pub(crate) fn next_label_number(number: u32) -> u32 {
    let (base, span) = label_range();
    base + (number - base + 1) % span
}

/// The number a label set probes before `number`, wrapping at the range's start.
pub(crate) fn previous_label_number(number: u32) -> u32 {
    let (base, span) = label_range();
    base + (number - base + span - 1) % span
}

/// How many label identities there can be.
pub(crate) fn label_span() -> u32 {
    label_range().1
}

fn label_range() -> (u32, u32) {
    (
        IDENTITY_FIRST_ALLOCATED,
        LABEL_IDENTITY_MAX - IDENTITY_FIRST_ALLOCATED + 1,
    )
}

/// [`allocate`] over the numbers `base..base + span`.
fn allocate_in(
    sets: &BTreeSet<Vec<String>>,
    base: u32,
    span: u32,
) -> (BTreeMap<Vec<String>, u32>, Vec<Vec<String>>) {
    let mut taken = BTreeSet::new();
    let mut numbers = BTreeMap::new();
    let mut left_out = Vec::new();
    for set in sets {
        if taken.len() as u64 >= u64::from(span) {
            left_out.push(set.clone());
            continue;
        }
        // `span` fits in u32, so the remainder does too.
        let mut offset = (hash(set) % u64::from(span)) as u32;
        while taken.contains(&offset) {
            offset = (offset + 1) % span;
        }
        taken.insert(offset);
        numbers.insert(set.clone(), base + offset);
    }
    (numbers, left_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_vectors() {
        assert_eq!(hash(&[]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash(&["a".into()]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash(&["foobar".into()]), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn collisions_probe_to_the_next_free_number() {
        let sets: BTreeSet<Vec<String>> = (0..120).map(|i| vec![format!("k8s:i={i}")]).collect();
        let (numbers, left_out) = allocate_in(&sets, 256, 100);
        assert_eq!(numbers.len(), 100);
        assert_eq!(left_out.len(), 20);
        let distinct: BTreeSet<u32> = numbers.values().copied().collect();
        assert_eq!(distinct.len(), numbers.len());
        assert!(distinct.iter().all(|n| (256..356).contains(n)));
        // The first set in sorted order always gets its hash's number.
        let first = sets.iter().next().cloned().unwrap_or_default();
        assert_eq!(numbers[&first], 256 + (hash(&first) % 100) as u32);
    }
}
