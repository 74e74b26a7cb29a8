//! Maglev tables: the `lb4_maglev` hash of maps points each Maglev frontend at an array of
//! its table's positions, four u16 backend slots per element.
//!
//! Like a policy map, a table is never edited in place: when a frontend's table differs
//! from the desired one (its backends or M changed), a new array is created, filled
//! completely and swapped in with one update, so the datapath sees the old table or the
//! new one, never a mix. Tables are written after the backends and before the frontends
//! (registry realize order): a frontend that comes with Maglev finds its table in place,
//! and one whose table names a slot not written yet falls back to a random slot.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Arc,
};

use std::os::fd::{AsFd, OwnedFd};

use aya::maps::{HashOfMaps, IterableMap, MapData};
use sluice_common::{LB4_MAGLEV_SLOTS_PER_ENTRY, Lb4Key, MaglevLanes, names};
use sluice_datapath::{
    MaglevTable, create_maglev_table,
    digest::{Digest, DigestPrograms},
    sys,
};

use crate::{
    DriftEntry, DriftKind, RealizerError,
    maps::{digest_of, is_not_found, open_map_of_maps},
    write_stamp,
};

/// A table as its map holds it: positions packed four to an element, the last element
/// padded with 0 (no backend).
pub type Lanes = Vec<MaglevLanes>;

/// `table` (M slot numbers) packed as the datapath reads it.
pub fn pack(table: &[u16]) -> Lanes {
    table
        .chunks(LB4_MAGLEV_SLOTS_PER_ENTRY)
        .map(|chunk| {
            let mut lanes = MaglevLanes::default();
            lanes[..chunk.len()].copy_from_slice(chunk);
            lanes
        })
        .collect()
}

fn sys_err(err: aya::sys::SyscallError) -> RealizerError {
    RealizerError::Sys {
        call: err.call,
        map: names::MAGLEV,
        source: err.io_error,
    }
}

fn map_err(op: &'static str) -> impl Fn(aya::maps::MapError) -> RealizerError {
    move |source| RealizerError::Map {
        op,
        map: names::MAGLEV,
        source,
    }
}

/// The digest of a table as its map holds it: element index to its lanes.
pub fn table_digest(seed: u64, lanes: &[MaglevLanes]) -> Digest {
    let indexes: Vec<u32> = (0..lanes.len())
        .filter_map(|i| u32::try_from(i).ok())
        .collect();
    digest_of(seed, indexes.iter().zip(lanes))
}

/// The outer `lb4_maglev` map and the tables it points at.
pub trait MaglevTables {
    /// Every frontend with a table installed.
    fn frontends(&self) -> Result<BTreeSet<Lb4Key>, RealizerError>;
    /// The table installed for `frontend`, read from the kernel, or None.
    fn read(&self, frontend: &Lb4Key) -> Result<Option<Lanes>, RealizerError>;
    /// For each install, creates a table holding exactly its lanes, then points its
    /// frontend at it with one update of the outer map.
    fn install(&mut self, installs: &[(Lb4Key, Lanes)]) -> Result<(), RealizerError>;
    /// Removes these frontends' tables; a frontend without one is not an error.
    fn remove(&mut self, frontends: &[Lb4Key]) -> Result<(), RealizerError>;

    /// The digest from `seed` of the table installed for `frontend`, or None. This one
    /// reads the table and hashes it here.
    fn digest(&self, frontend: &Lb4Key, seed: u64) -> Result<Option<Digest>, RealizerError> {
        Ok(self.read(frontend)?.map(|lanes| table_digest(seed, &lanes)))
    }

    /// Every frontend with its table.
    fn read_all(&self) -> Result<BTreeMap<Lb4Key, Lanes>, RealizerError> {
        let mut out = BTreeMap::new();
        for frontend in self.frontends()? {
            // A table removed between listing and reading is simply not there.
            if let Some(lanes) = self.read(&frontend)? {
                out.insert(frontend, lanes);
            }
        }
        Ok(out)
    }
}

/// What differs between the desired and the installed tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MaglevPlan {
    /// Frontend, its desired table and what the kernel holds now, if anything.
    pub installs: Vec<(Lb4Key, Lanes, Option<Lanes>)>,
    /// Frontends whose table must go, with the table.
    pub removes: Vec<(Lb4Key, Lanes)>,
}

/// `table of M positions` for drift reports (a table is too long to print).
fn describe(lanes: &Lanes) -> String {
    let positions = lanes.iter().flatten().filter(|&&slot| slot != 0).count();
    format!("table of {positions} positions")
}

impl MaglevPlan {
    pub fn is_empty(&self) -> bool {
        self.installs.is_empty() && self.removes.is_empty()
    }

    /// One entry per drifted table.
    pub fn drift(&self) -> Vec<DriftEntry> {
        let installs = self
            .installs
            .iter()
            .map(|(key, desired, actual)| DriftEntry {
                map: names::MAGLEV,
                kind: if actual.is_some() {
                    DriftKind::Differs
                } else {
                    DriftKind::Missing
                },
                key: key.to_string(),
                desired: Some(describe(desired)),
                actual: actual.as_ref().map(describe),
            });
        let removes = self.removes.iter().map(|(key, actual)| DriftEntry {
            map: names::MAGLEV,
            kind: DriftKind::Unexpected,
            key: key.to_string(),
            desired: None,
            actual: Some(describe(actual)),
        });
        installs.chain(removes).collect()
    }
}

/// Compares the desired tables (M slot numbers per frontend) with `installed`.
pub fn diff_tables(
    desired: &BTreeMap<Lb4Key, Arc<[u16]>>,
    mut installed: BTreeMap<Lb4Key, Lanes>,
) -> MaglevPlan {
    let mut plan = MaglevPlan::default();
    for (key, table) in desired {
        let lanes = pack(table);
        let current = installed.remove(key);
        if current.as_ref() != Some(&lanes) {
            plan.installs.push((*key, lanes, current));
        }
    }
    plan.removes = installed.into_iter().collect();
    plan
}

/// The kernel's `lb4_maglev` hash of maps.
pub struct KernelMaglev {
    map: HashOfMaps<MapData, Lb4Key, MaglevTable>,
    /// The same map, for the batch updates aya does not offer.
    fd: OwnedFd,
    /// Digests a table in the kernel.
    digest: Arc<DigestPrograms>,
}

impl KernelMaglev {
    /// Opens the `lb4_maglev` map pinned in `pin_dir`; `digest` digests its tables.
    pub fn open(pin_dir: &Path, digest: Arc<DigestPrograms>) -> Result<Self, RealizerError> {
        let (map, fd) = open_map_of_maps(pin_dir, names::MAGLEV)?;
        Ok(Self { map, fd, digest })
    }
}

impl MaglevTables for KernelMaglev {
    fn frontends(&self) -> Result<BTreeSet<Lb4Key>, RealizerError> {
        self.map
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err("iterate"))
    }

    fn read(&self, frontend: &Lb4Key) -> Result<Option<Lanes>, RealizerError> {
        // Each lookup opens a new fd on the table; it is closed when `table` drops.
        let table = match self.map.get(frontend, 0) {
            Ok(table) => table,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(map_err("lookup")(e)),
        };
        sys::array_lookup_all(table.map().fd().as_fd(), table.len())
            .map(Some)
            .map_err(sys_err)
    }

    /// Folded in the kernel: the program looks the table up and walks it.
    fn digest(&self, frontend: &Lb4Key, _seed: u64) -> Result<Option<Digest>, RealizerError> {
        self.digest
            .maglev(frontend)
            .map_err(|e| RealizerError::Datapath(Box::new(e)))
    }

    fn install(&mut self, installs: &[(Lb4Key, Lanes)]) -> Result<(), RealizerError> {
        if installs.is_empty() {
            return Ok(());
        }
        let mut fresh = Vec::with_capacity(installs.len());
        for (_, lanes) in installs {
            let positions = lanes.len() * LB4_MAGLEV_SLOTS_PER_ENTRY;
            let table =
                create_maglev_table(positions).map_err(|e| RealizerError::Datapath(Box::new(e)))?;
            sys::array_update_all(table.map().fd().as_fd(), lanes).map_err(sys_err)?;
            fresh.push(table);
        }
        // The swaps, in one batch as for policy maps.
        let keys: Vec<Lb4Key> = installs.iter().map(|(key, _)| *key).collect();
        let inners: Vec<_> = fresh.iter().map(|t| t.map().fd().as_fd()).collect();
        sys::swap_inner_maps(self.fd.as_fd(), &keys, &inners).map_err(sys_err)
    }

    fn remove(&mut self, frontends: &[Lb4Key]) -> Result<(), RealizerError> {
        if frontends.is_empty() {
            return Ok(());
        }
        sys::map_delete_batch(self.fd.as_fd(), frontends).map_err(sys_err)
    }
}

/// One write to a [`MemoryMaglev`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaglevWrite {
    Install { frontend: Lb4Key, lanes: Lanes },
    Remove { frontend: Lb4Key },
}

/// In-memory tables that record every write, for tests.
#[derive(Debug, Default)]
pub struct MemoryMaglev {
    pub tables: BTreeMap<Lb4Key, Lanes>,
    pub log: Vec<MaglevWrite>,
    /// The [`write_stamp`] of each write in `log`.
    pub stamps: Vec<u64>,
}

impl MaglevTables for MemoryMaglev {
    fn frontends(&self) -> Result<BTreeSet<Lb4Key>, RealizerError> {
        Ok(self.tables.keys().copied().collect())
    }

    fn read(&self, frontend: &Lb4Key) -> Result<Option<Lanes>, RealizerError> {
        Ok(self.tables.get(frontend).cloned())
    }

    fn install(&mut self, installs: &[(Lb4Key, Lanes)]) -> Result<(), RealizerError> {
        for (frontend, lanes) in installs {
            self.tables.insert(*frontend, lanes.clone());
            self.log.push(MaglevWrite::Install {
                frontend: *frontend,
                lanes: lanes.clone(),
            });
            self.stamps.push(write_stamp());
        }
        Ok(())
    }

    fn remove(&mut self, frontends: &[Lb4Key]) -> Result<(), RealizerError> {
        for frontend in frontends {
            self.tables.remove(frontend);
            self.log.push(MaglevWrite::Remove {
                frontend: *frontend,
            });
            self.stamps.push(write_stamp());
        }
        Ok(())
    }
}
