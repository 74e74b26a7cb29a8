//! The periodic drift check, at a cost that does not grow with the cluster: every realized
//! map's content is folded into an order-free digest (`sluice_datapath::digest`) and
//! compared with the digest of the desired content. A mismatch is drift, and a full pass
//! (read everything, diff, apply in the registry's order) finds and repairs it exactly.
//!
//! How a map is digested depends on what the kernel offers for it:
//! - the hash maps (services, backends, endpoints) are folded in the kernel, whole, by a
//!   program that walks them (`bpf/digest.c`): no entry crosses into user space. A fold
//!   is taken at the first tick of a sweep and the sweep then rests for as many ticks as
//!   reading the map in slices would take, so a million entries cost one fold per sweep;
//! - the LPM tries (ipcache, source ranges) have no in-kernel walk: each tick reads a
//!   slice (one `BPF_MAP_LOOKUP_BATCH`) and folds it here, and the digest is compared
//!   when the sweep reaches the map's end;
//! - the outer maps of maps (policy, Maglev) are compared key by key on every tick (one
//!   key per local endpoint or Maglev frontend); the policy maps' rows (LPM tries) are read
//!   a slice of rows at a time, the Maglev tables (arrays) folded in the kernel a slice of
//!   tables at a time.
//!
//! Bound: an entry changed behind the realizer's back after the sweep passed it (or after
//! its fold) is seen by the next sweep, so drift is found within two sweeps. A map of up to
//! [`MIN_SLICE`] entries is checked whole on every tick; a larger one once per
//! `ticks_per_sweep` ticks. A small map's check at every tick costs what it holds, not
//! what it could hold: once a digest found it right, a lookup of each desired key while
//! its footprint (the kernel memory it reports, which moves with its entry count) has not
//! moved (`Sweep::step`).
//!
//! The scan also keeps each realized map's entry count as last established (by a sweep
//! that found the desired content, or by the pass that wrote it), so `status` reports the
//! kernel's content without walking a million entries per call.

use std::{collections::BTreeMap, time::Instant};

use aya::Pod;
use sluice_common::{
    IpcacheKey, Lb4BackendKey, Lb4Key, Lb4SourceRangeKey, MapId, kinds::CountedBy,
};
use sluice_compiler::Delta;
use sluice_datapath::digest::{Digest, pod_entry_hash};

use crate::{
    ApplyStats, Backing, Desired, DriftEntry, KernelMap, PolicyTable, RealizerError, Tables,
    maglev::{MaglevTables, pack, table_digest},
    maps::{Walk, digest_of},
};

/// Entries of a map read per tick at least: below this a map is checked whole every tick.
pub const MIN_SLICE: usize = 16_384;

/// Rows of policy maps (or elements of Maglev tables) read per tick at least: they are
/// read row by row, so the floor is lower than for batched maps.
const MIN_ROWS: usize = 1_024;

/// A digest moved along by a change: each entry the change touched leaves with its value
/// before and comes back with its value in `now`.
trait Follow {
    fn follow<K: Pod + Ord, V: Pod>(
        &mut self,
        seed: u64,
        before: &BTreeMap<K, Option<V>>,
        now: &BTreeMap<K, V>,
    );
}

impl Follow for Digest {
    fn follow<K: Pod + Ord, V: Pod>(
        &mut self,
        seed: u64,
        before: &BTreeMap<K, Option<V>>,
        now: &BTreeMap<K, V>,
    ) {
        for (k, old) in before {
            if let Some(old) = old {
                self.remove(pod_entry_hash(seed, k, old));
            }
            if let Some(new) = now.get(k) {
                self.add(pod_entry_hash(seed, k, new));
            }
        }
    }
}

/// How many of `total` to read per tick for a sweep of `ticks` ticks.
fn slice(total: u64, ticks: usize, floor: usize) -> usize {
    usize::try_from(total)
        .unwrap_or(usize::MAX)
        .div_ceil(ticks.max(1))
        .max(floor)
}

/// One sweep over one key-value map.
struct Sweep<K> {
    walk: Option<Walk<K>>,
    want: Digest,
    /// The map's footprint (`KernelMap::footprint`) when a digest last found it to hold
    /// the desired content: while it has not moved, the map holds as many entries as
    /// desired, and a lookup of each desired key is an exact check.
    held_at: Option<u64>,
}

impl<K> Default for Sweep<K> {
    fn default() -> Self {
        Self {
            walk: None,
            want: Digest::default(),
            held_at: None,
        }
    }
}

/// What one step of a sweep read, and at a map's end whether it held the desired content
/// and how many entries it held.
type Step = (usize, Option<(bool, u64)>);

impl<K: Pod + Ord + std::hash::Hash> Sweep<K> {
    /// The realizer wrote a change (`before`: each entry touched, with its value before):
    /// the desired digest and a fold of some slices both follow it, so the sweep goes on.
    fn follow<V: Pod>(&mut self, seed: u64, before: &BTreeMap<K, Option<V>>, now: &BTreeMap<K, V>) {
        self.want.follow(seed, before, now);
        if let Some(walk) = &mut self.walk {
            walk.follow(seed, before, now);
        }
        self.held_at = None;
    }

    /// Drops a fold of some slices (after a full pass, whose writes no delta names); a
    /// whole-map fold already taken keeps its rest, so a pass does not bring the next fold
    /// forward.
    fn restart(&mut self) {
        if self.walk.as_ref().is_some_and(Walk::partial) {
            self.walk = None;
        }
        self.held_at = None;
    }

    /// One tick's step. A small map (up to [`MIN_SLICE`] entries desired) is checked
    /// whole: by a lookup of each desired key when its footprint has not moved since a
    /// digest found it right (a forged value is seen by its lookup, a removed entry by
    /// its lookup and an added one by the footprint), else by a digest, which may set
    /// the footprint to go by from the next tick on. A digest of a hash map walks every
    /// bucket of its capacity, so lookups of a few thousand keys cost far less.
    fn step<V: Pod, M: KernelMap<K, V>>(
        &mut self,
        map: &M,
        desired: &BTreeMap<K, V>,
        ticks: usize,
        seed: u64,
    ) -> Result<Step, RealizerError> {
        if desired.len() > MIN_SLICE {
            return self.digest(map, ticks, seed);
        }
        let Some(now) = map.footprint()? else {
            return self.digest(map, ticks, seed);
        };
        if self.held_at == Some(now) {
            let held = map.holds_each(desired)?;
            if !held {
                self.held_at = None;
            }
            return Ok((desired.len(), Some((held, self.want.entries))));
        }
        let step = self.digest(map, ticks, seed)?;
        // The footprint stands for the count the digest found only if no entry came or
        // went while it ran.
        self.held_at = match step {
            (_, Some((true, _))) if map.footprint()? == Some(now) => Some(now),
            _ => None,
        };
        Ok(step)
    }

    /// Digests the next slice of the map (the whole map when small or folded in the kernel).
    fn digest<V: Pod, M: KernelMap<K, V>>(
        &mut self,
        map: &M,
        ticks: usize,
        seed: u64,
    ) -> Result<Step, RealizerError> {
        let max = slice(self.want.entries, ticks, MIN_SLICE);
        match map.digest_from(&mut self.walk, max, seed) {
            Ok((seen, None)) => Ok((seen, None)),
            Ok((seen, Some(read))) => Ok((seen, Some((read == self.want, read.entries)))),
            Err(e) => {
                self.walk = None;
                Err(e)
            }
        }
    }
}

/// The rolling check of every realized map, kept between ticks.
pub struct Scan {
    /// The seed of the tables the digests describe (`Tables::seed`).
    seed: Option<u64>,
    ticks_per_sweep: usize,
    /// The caller's number for the desired content the digests describe.
    version: Option<u64>,
    services: Sweep<Lb4Key>,
    backends: Sweep<Lb4BackendKey>,
    endpoints: Sweep<u32>,
    ipcache: Sweep<IpcacheKey>,
    source_ranges: Sweep<Lb4SourceRangeKey>,
    /// The next endpoint whose policy map to check; None: the first.
    policy: Option<u32>,
    policy_rows: u64,
    /// The next frontend whose Maglev table to check; None: the first.
    maglev: Option<Lb4Key>,
    maglev_elements: u64,
    /// Each realized map's entry count as last established, in `MapId` order.
    counted: BTreeMap<MapId, Counted>,
}

/// A map's entry count (for a map of maps: its keys), when and how it was established.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counted {
    pub entries: u64,
    pub at: Instant,
    pub by: CountedBy,
}

/// What one tick of the scan did.
#[derive(Debug, Default)]
pub struct ScanTick {
    /// Entries (rows, table elements) read from the kernel.
    pub entries_read: usize,
    /// Maps whose sweep reached their end on this tick.
    pub swept: Vec<MapId>,
    /// Maps found not to hold their desired content.
    pub drifted: Vec<MapId>,
    /// What the full pass after a drift found, entry by entry, and what it wrote.
    pub repaired: Vec<DriftEntry>,
    pub stats: ApplyStats,
}

impl ScanTick {
    /// Notes one map's step; a sweep that found the desired content counted the map.
    fn note(&mut self, counted: &mut BTreeMap<MapId, Counted>, id: MapId, (read, end): Step) {
        self.entries_read += read;
        if let Some((held, entries)) = end {
            self.swept.push(id);
            if held {
                let at = Instant::now();
                let by = CountedBy::Sweep;
                counted.insert(id, Counted { entries, at, by });
            } else {
                self.drifted.push(id);
            }
        }
    }
}

impl Scan {
    /// A scan whose sweep of a large map spreads over `ticks_per_sweep` ticks.
    pub fn new(ticks_per_sweep: usize) -> Self {
        Self {
            seed: None,
            ticks_per_sweep: ticks_per_sweep.max(1),
            version: None,
            services: Sweep::default(),
            backends: Sweep::default(),
            endpoints: Sweep::default(),
            ipcache: Sweep::default(),
            source_ranges: Sweep::default(),
            policy: None,
            policy_rows: 0,
            maglev: None,
            maglev_elements: 0,
            counted: BTreeMap::new(),
        }
    }

    /// Each realized map's entry count as last established, in `MapId` order.
    pub fn counted(&self) -> impl Iterator<Item = (MapId, Counted)> + '_ {
        self.counted.iter().map(|(&id, &c)| (id, c))
    }

    /// A full pass just made every realized map hold `desired`: counts them so and starts
    /// every sweep over.
    pub fn written(&mut self, desired: Desired<'_>) {
        self.count(desired);
        self.restart();
    }

    /// Every realized map holds `desired`, as a pass just wrote it.
    fn count(&mut self, desired: Desired<'_>) {
        let at = Instant::now();
        let by = CountedBy::Pass;
        let sizes = [
            (MapId::Services, desired.services.len()),
            (MapId::Backends, desired.backends.len()),
            (MapId::Endpoints, desired.endpoints.len()),
            (MapId::Ipcache, desired.ipcache.len()),
            (MapId::SourceRanges, desired.source_ranges.len()),
            (MapId::Policy, desired.policies.len()),
            (MapId::Maglev, desired.maglev.len()),
        ];
        for (id, entries) in sizes {
            let entries = entries as u64;
            self.counted.insert(id, Counted { entries, at, by });
        }
    }

    /// Starts the sweeps of slices over: a full pass just made the kernel equal to the
    /// desired content, so what they read before it says nothing any more. The policy
    /// maps' and Maglev tables' sweeps go on: each endpoint's map and each table is
    /// compared whole when the sweep reaches it.
    pub fn restart(&mut self) {
        self.services.restart();
        self.backends.restart();
        self.endpoints.restart();
        self.ipcache.restart();
        self.source_ranges.restart();
    }

    /// The desired content moved from version `from` to `to` by `delta` (the compiler's
    /// record of the entries it changed, with their values before) and is now `desired`:
    /// the digests and the folds of some slices follow in time proportional to the change
    /// when they described version `from` (else the next tick digests `desired` whole), so
    /// a sweep under a stream of changes still ends.
    pub fn changed(&mut self, delta: &Delta, desired: Desired<'_>, from: u64, to: u64) {
        self.count(desired);
        let Some(seed) = self.seed.filter(|_| self.version == Some(from)) else {
            return;
        };
        self.services
            .follow(seed, &delta.services, desired.services);
        self.backends
            .follow(seed, &delta.backends, desired.backends);
        self.endpoints
            .follow(seed, &delta.endpoints, desired.endpoints);
        self.ipcache.follow(seed, &delta.ipcache, desired.ipcache);
        self.source_ranges
            .follow(seed, &delta.source_ranges, desired.source_ranges);
        self.policy_rows = desired.policies.values().map(|p| p.rows.len() as u64).sum();
        self.maglev_elements = desired.maglev.values().map(|t| t.len() as u64).sum();
        self.version = Some(to);
    }

    /// Digests `desired` from `seed` when it is not the content (by the caller's `version`)
    /// the scan describes, and starts over.
    fn follow(&mut self, desired: Desired<'_>, version: u64, seed: u64) {
        if self.version == Some(version) && self.seed == Some(seed) {
            return;
        }
        self.services.want = digest_of(seed, desired.services);
        self.backends.want = digest_of(seed, desired.backends);
        self.endpoints.want = digest_of(seed, desired.endpoints);
        self.ipcache.want = digest_of(seed, desired.ipcache);
        self.source_ranges.want = digest_of(seed, desired.source_ranges);
        self.policy_rows = desired.policies.values().map(|p| p.rows.len() as u64).sum();
        self.maglev_elements = desired.maglev.values().map(|t| t.len() as u64).sum();
        self.version = Some(version);
        self.seed = Some(seed);
        self.restart();
    }

    /// Checks the next slice of the policy maps: the endpoints with a map, then each
    /// endpoint's capacity and rows (counters are runtime state and never differ).
    fn step_policy<P: PolicyTable>(
        &mut self,
        table: &P,
        desired: Desired<'_>,
    ) -> Result<Step, RealizerError> {
        let endpoints = table.endpoints()?;
        if !endpoints.iter().eq(desired.policies.keys()) {
            self.policy = None;
            return Ok((0, Some((false, endpoints.len() as u64))));
        }
        let entries = endpoints.len() as u64;
        let budget = slice(self.policy_rows, self.ticks_per_sweep, MIN_ROWS);
        let from = self.policy.take().unwrap_or(0);
        let mut read = 0;
        for (&ifindex, policy) in desired.policies.range(from..) {
            if read >= budget {
                self.policy = Some(ifindex);
                return Ok((read, None));
            }
            let held = table.read(ifindex)?.is_some_and(|installed| {
                read += installed.rows.len();
                installed.capacity == desired.policy_capacity
                    && installed.rows.keys().eq(policy.rows.keys())
            });
            if !held {
                return Ok((read, Some((false, entries))));
            }
        }
        Ok((read, Some((true, entries))))
    }

    /// Checks the next slice of the Maglev tables: the frontends with a table, then each
    /// table's digest.
    fn step_maglev<T: MaglevTables>(
        &mut self,
        tables: &T,
        desired: Desired<'_>,
        seed: u64,
    ) -> Result<Step, RealizerError> {
        let frontends = tables.frontends()?;
        if !frontends.iter().eq(desired.maglev.keys()) {
            self.maglev = None;
            return Ok((0, Some((false, frontends.len() as u64))));
        }
        let entries = frontends.len() as u64;
        let budget = slice(self.maglev_elements, self.ticks_per_sweep, MIN_ROWS);
        let mut read = 0;
        let range = match self.maglev.take() {
            Some(from) => desired.maglev.range(from..),
            None => desired.maglev.range(..),
        };
        for (frontend, table) in range {
            if read >= budget {
                self.maglev = Some(*frontend);
                return Ok((read, None));
            }
            read += table.len();
            if tables.digest(frontend, seed)? != Some(table_digest(seed, &pack(table))) {
                return Ok((read, Some((false, entries))));
            }
        }
        Ok((read, Some((true, entries))))
    }
}

impl<B: Backing> Tables<B> {
    /// One tick of the rolling drift check against `desired` (numbered `version` by the
    /// caller: a new number means new content). A map found drifted is repaired by a full
    /// pass over every map, which also starts every sweep over.
    pub fn check(
        &mut self,
        scan: &mut Scan,
        desired: Desired<'_>,
        version: u64,
    ) -> Result<ScanTick, RealizerError> {
        let h = self.seed;
        scan.follow(desired, version, h);
        let ticks = scan.ticks_per_sweep;
        let d = desired;
        let steps = [
            (
                MapId::Services,
                scan.services.step(&self.services, d.services, ticks, h)?,
            ),
            (
                MapId::Backends,
                scan.backends.step(&self.backends, d.backends, ticks, h)?,
            ),
            (
                MapId::Endpoints,
                scan.endpoints
                    .step(&self.endpoints, d.endpoints, ticks, h)?,
            ),
            (
                MapId::Ipcache,
                scan.ipcache.step(&self.ipcache, d.ipcache, ticks, h)?,
            ),
            (
                MapId::SourceRanges,
                scan.source_ranges
                    .step(&self.source_ranges, d.source_ranges, ticks, h)?,
            ),
            (MapId::Policy, scan.step_policy(&self.policy, desired)?),
            (MapId::Maglev, scan.step_maglev(&self.maglev, desired, h)?),
        ];
        let mut tick = ScanTick::default();
        for (id, step) in steps {
            tick.note(&mut scan.counted, id, step);
        }
        if !tick.drifted.is_empty() {
            let plan = self.plan(desired)?;
            tick.repaired = plan.drift();
            tick.stats = self.apply(&plan)?;
            scan.written(desired);
        }
        Ok(tick)
    }
}
