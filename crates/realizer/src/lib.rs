//! The realizer: makes the maps in the kernel equal to the compiler's desired content.
//!
//! It always reads the kernel first and diffs against what it finds, never against a memory
//! of what it wrote, so an entry changed or removed behind its back (drift) is repaired on
//! the next pass, and a restarted agent converges from whatever the pins hold.
//!
//! Writes are ordered so the datapath never sees a dangling reference: backends before the
//! service slots that name them, slots before the frontend whose count covers them; removals
//! go the other way round. Each single entry update is atomic in the kernel. Identities
//! reach the ipcache before the policy rows that name them, and a policy map is in place
//! before the endpoint's flags enforce it; removals go the other way round.

mod batch;
mod policy;
mod table;

use std::{collections::BTreeMap, fmt::Display, path::Path};

use aya::maps::MapData;

pub use policy::{
    InstalledPolicy, KernelPolicy, MemoryPolicy, PolicyInstall, PolicyPlan, PolicyTable,
    PolicyWrite, diff_policies,
};
use sluice_common::{
    EndpointInfo, IpcacheEntry, IpcacheKey, Lb4Backend, Lb4BackendKey, Lb4Key, Lb4Service, names,
};
use sluice_compiler::{DesiredState, EndpointPolicy};
use sluice_datapath::PinnedMaps;
pub use table::{Ipcache, KernelMap, MemoryMap, Named, write_stamp};

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
    // Boxed: the datapath's error is large and every realizer result would carry its size.
    #[error(transparent)]
    Datapath(Box<sluice_datapath::DatapathError>),
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

/// The datapath's maps that hold desired state, behind [`KernelMap`] so the same code
/// drives the kernel and the in-memory tests. Conntrack, metrics and fragments are
/// runtime state and are never realized.
pub struct Tables<S, B, E, I, P> {
    pub services: S,
    pub backends: B,
    pub endpoints: E,
    pub ipcache: I,
    pub policy: P,
}

/// The realized maps as they are pinned in the kernel.
pub type KernelTables = Tables<
    Named<MapData, Lb4Key, Lb4Service>,
    Named<MapData, Lb4BackendKey, Lb4Backend>,
    Named<MapData, u32, EndpointInfo>,
    Ipcache,
    KernelPolicy,
>;

impl KernelTables {
    /// Opens the realized maps pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, RealizerError> {
        let maps = PinnedMaps::open(pin_dir).map_err(|e| RealizerError::Datapath(Box::new(e)))?;
        Ok(Tables {
            services: Named {
                name: names::SERVICES,
                map: maps.services,
            },
            backends: Named {
                name: names::BACKENDS,
                map: maps.backends,
            },
            endpoints: Named {
                name: names::ENDPOINTS,
                map: maps.endpoints,
            },
            ipcache: Ipcache { map: maps.ipcache },
            policy: KernelPolicy::open(pin_dir)?,
        })
    }
}

/// The desired content of every realized map.
#[derive(Clone, Copy)]
pub struct Desired<'a> {
    pub services: &'a BTreeMap<Lb4Key, Lb4Service>,
    pub backends: &'a BTreeMap<Lb4BackendKey, Lb4Backend>,
    pub endpoints: &'a BTreeMap<u32, EndpointInfo>,
    pub ipcache: &'a BTreeMap<IpcacheKey, IpcacheEntry>,
    /// ifindex -> allow rows, for each endpoint that gets a policy map.
    pub policies: &'a BTreeMap<u32, EndpointPolicy>,
    /// max_entries of every policy map.
    pub policy_capacity: u32,
}

impl<'a> Desired<'a> {
    /// The realized part of a compiled state, with policy maps of `policy_capacity` rows.
    pub fn of(state: &'a DesiredState, policy_capacity: u32) -> Self {
        Self {
            services: &state.services,
            backends: &state.backends,
            endpoints: &state.endpoints,
            ipcache: &state.ipcache,
            policies: &state.policies,
            policy_capacity,
        }
    }
}

/// The differences found in one read of the kernel.
pub struct Plan {
    pub services: MapDiff<Lb4Key, Lb4Service>,
    pub backends: MapDiff<Lb4BackendKey, Lb4Backend>,
    pub endpoints: MapDiff<u32, EndpointInfo>,
    pub ipcache: MapDiff<IpcacheKey, IpcacheEntry>,
    pub policy: PolicyPlan,
}

/// Frontends (slot 0) are written after their slots and removed before them.
fn slots_first(k: &Lb4Key) -> u8 {
    u8::from(k.slot == 0)
}

fn frontends_first(k: &Lb4Key) -> u8 {
    u8::from(k.slot != 0)
}

impl<S, B, E, I, P> Tables<S, B, E, I, P>
where
    S: KernelMap<Lb4Key, Lb4Service>,
    B: KernelMap<Lb4BackendKey, Lb4Backend>,
    E: KernelMap<u32, EndpointInfo>,
    I: KernelMap<IpcacheKey, IpcacheEntry>,
    P: PolicyTable,
{
    /// Reads every realized map from the kernel and diffs it against `desired`.
    pub fn plan(&self, desired: Desired<'_>) -> Result<Plan, RealizerError> {
        Ok(Plan {
            services: diff(desired.services, &self.services.read_all()?),
            backends: diff(desired.backends, &self.backends.read_all()?),
            endpoints: diff(desired.endpoints, &self.endpoints.read_all()?),
            ipcache: diff(desired.ipcache, &self.ipcache.read_all()?),
            policy: diff_policies(
                desired.policies,
                desired.policy_capacity,
                self.policy.read_all()?,
            ),
        })
    }

    /// Applies `plan` in dependency order.
    pub fn apply(&mut self, plan: &Plan) -> Result<ApplyStats, RealizerError> {
        let mut stats = ApplyStats::default();
        stats.upserted += apply_upserts(&mut self.ipcache, &plan.ipcache, |_| 0)?;
        self.policy.install(&plan.policy.installs)?;
        stats.upserted += plan.policy.installs.len();
        stats.upserted += apply_upserts(&mut self.endpoints, &plan.endpoints, |_| 0)?;
        stats.upserted += apply_upserts(&mut self.backends, &plan.backends, |_| 0)?;
        stats.upserted += apply_upserts(&mut self.services, &plan.services, slots_first)?;
        stats.removed += apply_removes(&mut self.services, &plan.services, frontends_first)?;
        stats.removed += apply_removes(&mut self.backends, &plan.backends, |_| 0)?;
        stats.removed += apply_removes(&mut self.endpoints, &plan.endpoints, |_| 0)?;
        let gone: Vec<u32> = plan.policy.removes.iter().map(|(i, _)| *i).collect();
        self.policy.remove(&gone)?;
        stats.removed += gone.len();
        stats.removed += apply_removes(&mut self.ipcache, &plan.ipcache, |_| 0)?;
        Ok(stats)
    }

    /// Reads, diffs and applies: one reconcile pass.
    pub fn realize(&mut self, desired: Desired<'_>) -> Result<ApplyStats, RealizerError> {
        let plan = self.plan(desired)?;
        self.apply(&plan)
    }
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.backends.is_empty()
            && self.endpoints.is_empty()
            && self.ipcache.is_empty()
            && self.policy.is_empty()
    }

    /// Every drifted entry of every map.
    pub fn drift(&self) -> Vec<DriftEntry> {
        let mut out = self.services.drift(names::SERVICES);
        out.extend(self.backends.drift(names::BACKENDS));
        out.extend(self.endpoints.drift(names::ENDPOINTS));
        out.extend(self.ipcache.drift(names::IPCACHE));
        out.extend(self.policy.drift());
        out
    }
}

#[cfg(test)]
mod tests;
