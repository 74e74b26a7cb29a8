//! The set of realized maps and one pass over it: read and diff every map ([`Tables::plan`]),
//! then write the difference map by map in the registry's realize order
//! ([`Tables::apply`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Display,
    path::Path,
    sync::Arc,
};

use aya::{
    Pod,
    maps::{Array, MapData},
};
use sluice_common::{
    EndpointInfo, IpcacheEntry, IpcacheKey, Lb4Backend, Lb4BackendKey, Lb4Key, Lb4Service,
    Lb4SourceRangeKey, MapId, names, registry,
};
use sluice_compiler::{DesiredState, EndpointPolicy};
use sluice_datapath::{
    PinnedMaps, bump_flow_generation,
    digest::{DigestPrograms, DigestedMap},
};

use crate::{
    ApplyStats, DriftEntry, KernelMap, KernelPolicy, Lpm, LpmKey, MapDiff, MemoryMap, MemoryPolicy,
    Named, PolicyPlan, PolicyTable, RealizerError, apply_removes, apply_upserts, diff,
    diff_policies,
    maglev::{KernelMaglev, MaglevPlan, MaglevTables, MemoryMaglev, diff_tables},
};

/// The handles a realizer writes through: the kernel's pinned maps ([`Kernel`]), or
/// in-memory maps that record every write ([`Memory`], for tests).
pub trait Backing {
    /// A hash map of keys to values.
    type Hash<K: Pod + Ord + Default, V: Pod + PartialEq + Default>: KernelMap<K, V>;
    /// An LPM trie.
    type Lpm<K: LpmKey + Pod + Default, V: Pod + PartialEq + Default>: KernelMap<K, V>;
    type Policy: PolicyTable;
    type Maglev: MaglevTables;
    type FlowGeneration: FlowGeneration;
}

/// The generation the datapath's flow cache stamps its decisions with (`flow4_generation`,
/// bpf/lib/flow_cache.h): moved on after every pass that wrote a map, so no established
/// flow keeps a decision made from what the pass changed.
pub trait FlowGeneration {
    fn bump(&mut self) -> Result<(), RealizerError>;
}

impl FlowGeneration for Array<MapData, u32> {
    fn bump(&mut self) -> Result<(), RealizerError> {
        bump_flow_generation(self)
            .map(drop)
            .map_err(|e| RealizerError::Datapath(Box::new(e)))
    }
}

/// The generation in memory: how many passes wrote something.
#[derive(Debug, Default)]
pub struct MemoryGeneration(pub u32);

impl FlowGeneration for MemoryGeneration {
    fn bump(&mut self) -> Result<(), RealizerError> {
        self.0 += 1;
        Ok(())
    }
}

/// The maps pinned in the kernel.
pub struct Kernel;

impl Backing for Kernel {
    type Hash<K: Pod + Ord + Default, V: Pod + PartialEq + Default> = Named<MapData, K, V>;
    type Lpm<K: LpmKey + Pod + Default, V: Pod + PartialEq + Default> = Lpm<K, V>;
    type Policy = KernelPolicy;
    type Maglev = KernelMaglev;
    type FlowGeneration = Array<MapData, u32>;
}

/// In-memory maps, for tests of ordering and convergence that need no kernel.
pub struct Memory;

impl Backing for Memory {
    type Hash<K: Pod + Ord + Default, V: Pod + PartialEq + Default> = MemoryMap<K, V>;
    type Lpm<K: LpmKey + Pod + Default, V: Pod + PartialEq + Default> = MemoryMap<K, V>;
    type Policy = MemoryPolicy;
    type Maglev = MemoryMaglev;
    type FlowGeneration = MemoryGeneration;
}

/// A seed for the digests of one set of tables, from the OS's randomness (through std's
/// RandomState), so no content can be crafted to match another's digest.
fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::hash::RandomState::new().hash_one(0u64)
}

impl Tables<Memory> {
    /// Empty in-memory tables, each named as its kernel map.
    pub fn in_memory() -> Self {
        Self {
            seed: random_seed(),
            services: MemoryMap::new(names::SERVICES),
            backends: MemoryMap::new(names::BACKENDS),
            endpoints: MemoryMap::new(names::ENDPOINTS),
            ipcache: MemoryMap::new(names::IPCACHE),
            source_ranges: MemoryMap::new(names::SOURCE_RANGES),
            policy: MemoryPolicy::default(),
            maglev: MemoryMaglev::default(),
            flow_generation: MemoryGeneration::default(),
        }
    }
}

/// The datapath's maps that hold desired state: those the registry gives a realize order
/// (`sluice_common::registry::realized`). Conntrack, metrics and fragments are runtime
/// state and are never realized.
pub struct Tables<B: Backing> {
    pub services: B::Hash<Lb4Key, Lb4Service>,
    pub backends: B::Hash<Lb4BackendKey, Lb4Backend>,
    pub endpoints: B::Hash<u32, EndpointInfo>,
    pub ipcache: B::Lpm<IpcacheKey, IpcacheEntry>,
    pub source_ranges: B::Lpm<Lb4SourceRangeKey, u32>,
    pub policy: B::Policy,
    pub maglev: B::Maglev,
    pub flow_generation: B::FlowGeneration,
    /// What the drift check's digests of these maps start from (the kernel's digest
    /// programs were loaded with it).
    pub seed: u64,
}

/// The realized maps as they are pinned in the kernel.
pub type KernelTables = Tables<Kernel>;

impl KernelTables {
    /// Opens the realized maps pinned under `pin_dir`.
    /// Loads the programs that digest the hash maps and Maglev tables in the kernel.
    pub fn open(pin_dir: &Path) -> Result<Self, RealizerError> {
        let datapath = |e| RealizerError::Datapath(Box::new(e));
        let maps = PinnedMaps::open(pin_dir).map_err(datapath)?;
        let seed = random_seed();
        let digests = Arc::new(DigestPrograms::load(pin_dir, seed).map_err(datapath)?);
        Ok(Tables {
            services: Named {
                name: names::SERVICES,
                map: maps.services,
                digest: (digests.clone(), DigestedMap::Services),
            },
            backends: Named {
                name: names::BACKENDS,
                map: maps.backends,
                digest: (digests.clone(), DigestedMap::Backends),
            },
            endpoints: Named {
                name: names::ENDPOINTS,
                map: maps.endpoints,
                digest: (digests.clone(), DigestedMap::Endpoints),
            },
            ipcache: Lpm {
                name: names::IPCACHE,
                map: maps.ipcache,
            },
            source_ranges: Lpm {
                name: names::SOURCE_RANGES,
                map: maps.source_ranges,
            },
            policy: KernelPolicy::open(pin_dir)?,
            maglev: KernelMaglev::open(pin_dir, digests)?,
            flow_generation: maps.flow_generation,
            seed,
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
    pub source_ranges: &'a BTreeMap<Lb4SourceRangeKey, u32>,
    /// ifindex -> allow rows, for each endpoint that gets a policy map.
    pub policies: &'a BTreeMap<u32, EndpointPolicy>,
    /// max_entries of every policy map.
    pub policy_capacity: u32,
    /// Frontend -> its Maglev table (M backend slots).
    pub maglev: &'a BTreeMap<Lb4Key, Arc<[u16]>>,
}

impl<'a> Desired<'a> {
    /// The realized part of a compiled state, with policy maps of `policy_capacity` rows.
    pub fn of(state: &'a DesiredState, policy_capacity: u32) -> Self {
        Self {
            services: &state.services,
            backends: &state.backends,
            endpoints: &state.endpoints,
            ipcache: &state.ipcache,
            source_ranges: &state.source_ranges,
            policies: &state.policies,
            policy_capacity,
            maglev: &state.maglev,
        }
    }
}

/// The differences found in one read of the kernel.
pub struct Plan {
    pub services: MapDiff<Lb4Key, Lb4Service>,
    pub backends: MapDiff<Lb4BackendKey, Lb4Backend>,
    pub endpoints: MapDiff<u32, EndpointInfo>,
    pub ipcache: MapDiff<IpcacheKey, IpcacheEntry>,
    pub source_ranges: MapDiff<Lb4SourceRangeKey, u32>,
    pub policy: PolicyPlan,
    pub maglev: MaglevPlan,
}

/// Frontends (slot 0) are written after their slots and removed before them.
fn slots_first(k: &Lb4Key) -> u8 {
    u8::from(k.slot == 0)
}

fn frontends_first(k: &Lb4Key) -> u8 {
    u8::from(k.slot != 0)
}

fn unordered<K>(_: &K) -> u8 {
    0
}

/// The removals of a diff that may go before its upserts, to make room in a full map.
type Early<K, V> = fn(&MapDiff<K, V>) -> MapDiff<K, V>;

fn removals<K: Clone, V: Clone>(diff: &MapDiff<K, V>, keep: impl Fn(&K) -> bool) -> MapDiff<K, V> {
    MapDiff {
        upserts: Vec::new(),
        removes: diff
            .removes
            .iter()
            .filter(|(k, _)| keep(k))
            .cloned()
            .collect(),
    }
}

/// None: every removal waits for the upserts that stop naming what it removes. (An
/// ipcache prefix removed early would give its address a covering prefix's identity while
/// the old policy rows still judge it.)
fn none_early<K: Clone, V: Clone>(diff: &MapDiff<K, V>) -> MapDiff<K, V> {
    removals(diff, |_| false)
}

/// The entries of frontends that go whole (their slot 0 is removed): nothing names them,
/// and the datapath finds no frontend before their slots go.
fn whole_frontends(diff: &MapDiff<Lb4Key, Lb4Service>) -> MapDiff<Lb4Key, Lb4Service> {
    let gone: BTreeSet<Lb4Key> = diff
        .removes
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| k.slot == 0)
        .collect();
    removals(diff, |k| gone.contains(&Lb4Key { slot: 0, ..*k }))
}

/// One realized map's part of a plan, written when the registry's order reaches it.
trait Step {
    fn upsert(&mut self) -> Result<usize, RealizerError>;
    fn remove(&mut self) -> Result<usize, RealizerError>;
    /// Applies the removals that are safe before the upserts, when the map is too full
    /// for them; returns how many.
    fn make_room(&mut self) -> Result<usize, RealizerError> {
        Ok(0)
    }
}

/// Maglev tables: whole tables swapped in, then frontends' tables removed.
struct Maglev<'a, T> {
    tables: &'a mut T,
    plan: &'a MaglevPlan,
}

impl<T: MaglevTables> Step for Maglev<'_, T> {
    fn upsert(&mut self) -> Result<usize, RealizerError> {
        let installs: Vec<_> = self
            .plan
            .installs
            .iter()
            .map(|(key, lanes, _)| (*key, lanes.clone()))
            .collect();
        self.tables.install(&installs)?;
        Ok(installs.len())
    }
    fn remove(&mut self) -> Result<usize, RealizerError> {
        let gone: Vec<Lb4Key> = self.plan.removes.iter().map(|(k, _)| *k).collect();
        self.tables.remove(&gone)?;
        Ok(gone.len())
    }
}

/// A key-value map's diff, with the order of its keys within each phase.
struct Entries<'a, K, V, M> {
    map: &'a mut M,
    diff: &'a MapDiff<K, V>,
    upsert_rank: fn(&K) -> u8,
    remove_rank: fn(&K) -> u8,
    early: Early<K, V>,
}

impl<K: Clone, V: Clone, M: KernelMap<K, V>> Step for Entries<'_, K, V, M> {
    fn upsert(&mut self) -> Result<usize, RealizerError> {
        apply_upserts(self.map, self.diff, self.upsert_rank)
    }
    fn remove(&mut self) -> Result<usize, RealizerError> {
        apply_removes(self.map, self.diff, self.remove_rank)
    }
    fn make_room(&mut self) -> Result<usize, RealizerError> {
        apply_removes(self.map, &(self.early)(self.diff), self.remove_rank)
    }
}

/// Policy maps: whole maps swapped in, then endpoints' maps removed.
struct Policies<'a, P> {
    table: &'a mut P,
    plan: &'a PolicyPlan,
}

impl<P: PolicyTable> Step for Policies<'_, P> {
    fn upsert(&mut self) -> Result<usize, RealizerError> {
        self.table.install(&self.plan.installs)?;
        Ok(self.plan.installs.len())
    }
    fn remove(&mut self) -> Result<usize, RealizerError> {
        let gone: Vec<u32> = self.plan.removes.iter().map(|(i, _)| *i).collect();
        self.table.remove(&gone)?;
        Ok(gone.len())
    }
}

fn entries<'a, K, V, M>(
    map: &'a mut M,
    diff: &'a MapDiff<K, V>,
    upsert_rank: fn(&K) -> u8,
    remove_rank: fn(&K) -> u8,
    early: Early<K, V>,
) -> Box<dyn Step + 'a>
where
    K: Clone + 'a,
    V: Clone + 'a,
    M: KernelMap<K, V> + 'a,
{
    Box::new(Entries {
        map,
        diff,
        upsert_rank,
        remove_rank,
        early,
    })
}

impl<B: Backing> Tables<B> {
    /// Reads every realized map from the kernel and diffs it against `desired`.
    pub fn plan(&self, desired: Desired<'_>) -> Result<Plan, RealizerError> {
        Ok(Plan {
            services: diff(desired.services, &self.services.read_all()?),
            backends: diff(desired.backends, &self.backends.read_all()?),
            endpoints: diff(desired.endpoints, &self.endpoints.read_all()?),
            ipcache: diff(desired.ipcache, &self.ipcache.read_all()?),
            source_ranges: diff(desired.source_ranges, &self.source_ranges.read_all()?),
            policy: diff_policies(
                desired.policies,
                desired.policy_capacity,
                self.policy.read_all()?,
            ),
            maglev: diff_tables(desired.maglev, self.maglev.read_all()?),
        })
    }

    /// Each realized map with its part of `plan`.
    fn steps<'a>(&'a mut self, plan: &'a Plan) -> BTreeMap<MapId, Box<dyn Step + 'a>> {
        BTreeMap::from([
            (
                MapId::Services,
                entries(
                    &mut self.services,
                    &plan.services,
                    slots_first,
                    frontends_first,
                    whole_frontends,
                ),
            ),
            (
                MapId::Backends,
                entries(
                    &mut self.backends,
                    &plan.backends,
                    unordered,
                    unordered,
                    none_early,
                ),
            ),
            (
                MapId::Endpoints,
                entries(
                    &mut self.endpoints,
                    &plan.endpoints,
                    unordered,
                    unordered,
                    none_early,
                ),
            ),
            (
                MapId::Ipcache,
                entries(
                    &mut self.ipcache,
                    &plan.ipcache,
                    unordered,
                    unordered,
                    none_early,
                ),
            ),
            (
                MapId::SourceRanges,
                entries(
                    &mut self.source_ranges,
                    &plan.source_ranges,
                    unordered,
                    unordered,
                    none_early,
                ),
            ),
            (
                MapId::Policy,
                Box::new(Policies {
                    table: &mut self.policy,
                    plan: &plan.policy,
                }) as Box<dyn Step>,
            ),
            (
                MapId::Maglev,
                Box::new(Maglev {
                    tables: &mut self.maglev,
                    plan: &plan.maglev,
                }),
            ),
        ])
    }

    /// Applies `plan`: upserts in the registry's realize order, then removals in the
    /// reverse order, then a new flow generation if it wrote anything. A map too full for
    /// its upserts first takes the removals that are safe early (the entries of frontends
    /// that go whole), so a change whose end state fits is not refused for its write order.
    pub fn apply(&mut self, plan: &Plan) -> Result<ApplyStats, RealizerError> {
        let applied = self.apply_steps(plan);
        // Last, so no decision made before a write carries the new generation; also
        // after a pass that failed half way through.
        if !plan.is_empty() {
            self.flow_generation.bump()?;
        }
        applied
    }

    /// Moves the flow cache to a new generation, so no decision recorded before is used.
    pub fn renew_flow_cache(&mut self) -> Result<(), RealizerError> {
        self.flow_generation.bump()
    }

    fn apply_steps(&mut self, plan: &Plan) -> Result<ApplyStats, RealizerError> {
        let mut steps = self.steps(plan);
        let mut ordered = Vec::new();
        for def in registry::realized() {
            let step = steps
                .remove(&def.id)
                .ok_or(RealizerError::NotRealized { map: def.name })?;
            ordered.push(step);
        }
        let mut stats = ApplyStats::default();
        for step in &mut ordered {
            stats.upserted += match step.upsert() {
                // The end state may fit where the write order does not: removals that are
                // safe early make room, once; they are counted with the other removals.
                Err(e) if e.full_map().is_some() && step.make_room()? > 0 => step.upsert()?,
                written => written?,
            };
        }
        for step in ordered.iter_mut().rev() {
            stats.removed += step.remove()?;
        }
        Ok(stats)
    }

    /// Reads, diffs and applies: one reconcile pass.
    pub fn realize(&mut self, desired: Desired<'_>) -> Result<ApplyStats, RealizerError> {
        let plan = self.plan(desired)?;
        self.apply(&plan)
    }
}

/// A realized map's part of a plan, for reports.
pub(crate) trait Part {
    fn is_empty(&self) -> bool;
    fn drift(&self, map: &'static str) -> Vec<DriftEntry>;
}

impl<K: Display, V: Display> Part for MapDiff<K, V> {
    fn is_empty(&self) -> bool {
        MapDiff::is_empty(self)
    }
    fn drift(&self, map: &'static str) -> Vec<DriftEntry> {
        MapDiff::drift(self, map)
    }
}

impl Part for PolicyPlan {
    fn is_empty(&self) -> bool {
        PolicyPlan::is_empty(self)
    }
    fn drift(&self, _map: &'static str) -> Vec<DriftEntry> {
        PolicyPlan::drift(self)
    }
}

impl Part for MaglevPlan {
    fn is_empty(&self) -> bool {
        MaglevPlan::is_empty(self)
    }
    fn drift(&self, _map: &'static str) -> Vec<DriftEntry> {
        MaglevPlan::drift(self)
    }
}

impl Plan {
    /// Every map's part, in registry order.
    pub(crate) fn parts(&self) -> [(MapId, &dyn Part); 7] {
        [
            (MapId::Services, &self.services),
            (MapId::Backends, &self.backends),
            (MapId::Endpoints, &self.endpoints),
            (MapId::Ipcache, &self.ipcache),
            (MapId::Policy, &self.policy),
            (MapId::SourceRanges, &self.source_ranges),
            (MapId::Maglev, &self.maglev),
        ]
    }

    pub fn is_empty(&self) -> bool {
        self.parts().iter().all(|(_, part)| part.is_empty())
    }

    /// Every drifted entry of every map, map by map in registry order.
    pub fn drift(&self) -> Vec<DriftEntry> {
        let mut parts = self.parts();
        parts.sort_by_key(|(id, _)| *id);
        parts
            .iter()
            .flat_map(|(id, part)| part.drift(id.name()))
            .collect()
    }
}
