//! The realizer: makes the maps in the kernel equal to the compiler's desired content.
//!
//! A full pass reads the kernel first and diffs against what it finds, never against a
//! memory of what it wrote, so a restarted agent converges from whatever the pins hold.
//! Between changes, a rolling check ([`Scan`]) reads every map a slice per tick against a
//! digest of the desired content, and an entry changed or removed behind its back (drift)
//! sends it back to a full pass, which repairs it.
//!
//! Writes are ordered so the datapath never sees a dangling reference: backends before the
//! service slots that name them, slots before the frontend whose count covers them; removals
//! go the other way round. Each single entry update is atomic in the kernel. Identities
//! reach the ipcache before the policy rows that name them, and a policy map is in place
//! before the endpoint's flags enforce it; removals go the other way round. The order of
//! maps is the registry's realize order (`sluice_common::registry`); the order of keys
//! within a map (slots before their frontend) is the map's own, here.

mod delta;
pub mod maglev;
mod maps;
mod policy;
mod scan;
mod tables;

use std::{collections::BTreeMap, fmt::Display};

pub use delta::{diff_sorted, diff_touched};
pub use maps::{
    Cursor, Ipcache, KernelMap, Lpm, LpmKey, MemoryMap, Named, Walk, digest_of, write_stamp,
};
pub use policy::{
    InstalledPolicy, KernelPolicy, MemoryPolicy, PolicyInstall, PolicyLookup, PolicyPlan,
    PolicyTable, PolicyWrite, diff_policies,
};
pub use scan::{Counted, MIN_SLICE, Scan, ScanTick};
pub use tables::{
    Backing, Desired, FlowGeneration, Kernel, KernelTables, Memory, MemoryGeneration, Plan, Tables,
};

#[derive(Debug, thiserror::Error)]
pub enum RealizerError {
    #[error("{op} on map {map}: {source}")]
    Map {
        op: &'static str,
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("{op} on the policy map of endpoint ifindex {ifindex}: {source}")]
    Policy {
        op: &'static str,
        ifindex: u32,
        source: aya::maps::MapError,
    },
    #[error("{call} on map {map}: {source}")]
    Sys {
        call: &'static str,
        map: &'static str,
        source: std::io::Error,
    },
    #[error("map {map} has a realize order but the realizer has no table for it")]
    NotRealized { map: &'static str },
    // Boxed: the datapath's error is large and every realizer result would carry its size.
    #[error(transparent)]
    Datapath(Box<sluice_datapath::DatapathError>),
}

impl RealizerError {
    /// The map a write failed on because it could not take another entry, if that is why:
    /// a hash map says E2BIG, an LPM trie and a batch update ENOSPC.
    pub fn full_map(&self) -> Option<&'static str> {
        let (map, errno) = match self {
            RealizerError::Map {
                map,
                source: aya::maps::MapError::SyscallError(e),
                ..
            } => (*map, e.io_error.raw_os_error()),
            RealizerError::Policy {
                source: aya::maps::MapError::SyscallError(e),
                ..
            } => (sluice_common::names::POLICY, e.io_error.raw_os_error()),
            RealizerError::Sys { map, source, .. } => (*map, source.raw_os_error()),
            _ => return None,
        };
        matches!(errno, Some(libc::E2BIG | libc::ENOSPC)).then_some(map)
    }
}

/// What differs between desired and actual content of one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDiff<K, V> {
    /// Entries to write: key, desired value, and the value in the kernel if there is one.
    pub upserts: Vec<(K, V, Option<V>)>,
    /// Entries to delete: key and the value in the kernel.
    pub removes: Vec<(K, V)>,
}

impl<K, V> MapDiff<K, V> {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removes.is_empty()
    }
}

/// Computes the difference between `desired` and `actual`.
pub fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    desired: &BTreeMap<K, V>,
    actual: &BTreeMap<K, V>,
) -> MapDiff<K, V> {
    let upserts = desired
        .iter()
        .filter_map(|(k, v)| match actual.get(k) {
            Some(cur) if cur == v => None,
            cur => Some((k.clone(), v.clone(), cur.cloned())),
        })
        .collect();
    let removes = actual
        .iter()
        .filter(|(k, _)| !desired.contains_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    MapDiff { upserts, removes }
}

/// One drifted entry, in the shared textual form of `sluice-common`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriftEntry {
    pub map: &'static str,
    pub kind: DriftKind,
    pub key: String,
    pub desired: Option<String>,
    pub actual: Option<String>,
}

pub use sluice_common::kinds::DriftKind;

impl<K: Display, V: Display> MapDiff<K, V> {
    /// Describes the diff entry by entry.
    pub fn drift(&self, map: &'static str) -> Vec<DriftEntry> {
        let ups = self.upserts.iter().map(|(k, v, cur)| DriftEntry {
            map,
            kind: if cur.is_some() {
                DriftKind::Differs
            } else {
                DriftKind::Missing
            },
            key: k.to_string(),
            desired: Some(v.to_string()),
            actual: cur.as_ref().map(ToString::to_string),
        });
        let rms = self.removes.iter().map(|(k, v)| DriftEntry {
            map,
            kind: DriftKind::Unexpected,
            key: k.to_string(),
            desired: None,
            actual: Some(v.to_string()),
        });
        ups.chain(rms).collect()
    }
}

/// Counts of what one pass wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub upserted: usize,
    pub removed: usize,
}

impl ApplyStats {
    pub fn changed(&self) -> bool {
        self.upserted + self.removed > 0
    }
}

impl std::ops::AddAssign for ApplyStats {
    fn add_assign(&mut self, rhs: Self) {
        self.upserted += rhs.upserted;
        self.removed += rhs.removed;
    }
}

/// Writes the upserts of `diff` in the order given by `rank` (lower first).
pub fn apply_upserts<K: Clone, V, M: KernelMap<K, V>>(
    map: &mut M,
    diff: &MapDiff<K, V>,
    rank: impl Fn(&K) -> u8,
) -> Result<usize, RealizerError> {
    let mut order: Vec<_> = diff.upserts.iter().collect();
    order.sort_by_key(|(k, _, _)| rank(k));
    for (k, v, _) in &order {
        map.upsert(k, v)?;
    }
    Ok(order.len())
}

/// Deletes the removals of `diff` in the order given by `rank` (lower first). An entry
/// already gone (the LRU or someone else removed it) is not an error.
pub fn apply_removes<K: Clone, V, M: KernelMap<K, V>>(
    map: &mut M,
    diff: &MapDiff<K, V>,
    rank: impl Fn(&K) -> u8,
) -> Result<usize, RealizerError> {
    let mut order: Vec<_> = diff.removes.iter().collect();
    order.sort_by_key(|(k, _)| rank(k));
    for (k, _) in &order {
        map.remove(k)?;
    }
    Ok(order.len())
}

/// Brings one map with no ordering constraints to the desired content.
pub fn converge<K: Ord + Clone, V: PartialEq + Clone, M: KernelMap<K, V>>(
    map: &mut M,
    desired: &BTreeMap<K, V>,
) -> Result<ApplyStats, RealizerError> {
    let d = diff(desired, &map.read_all()?);
    Ok(ApplyStats {
        upserted: apply_upserts(map, &d, |_| 0)?,
        removed: apply_removes(map, &d, |_| 0)?,
    })
}

#[cfg(test)]
mod delta_tests;
#[cfg(test)]
mod scan_tests;
#[cfg(test)]
mod tests;
