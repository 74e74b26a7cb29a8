//! Upgrading maps pinned with an earlier layout (`sluice_common::MIGRATIONS`).
//!
//! At load, every pinned map is compared with the registry before anything changes. A map
//! of an earlier layout with a migration gets a new map of today's layout, created by the
//! loader under `<pin_dir>/migrating/`, which the programs are loaded against. Then every
//! entry is converted into it (and again what the earlier programs changed meanwhile), the
//! programs are swapped into every pinned link (tcx and cgroup link updates, each atomic),
//! the entries the earlier programs added or changed since the last pass are converted
//! once more, and the new map's pin replaces the old one (a rename on bpffs). So no packet
//! sees an empty map: the new programs see the filled one from their first packet. A map
//! of a layout without a migration, or an entry that does not convert, is refused before
//! the swap, with the running programs and every pin as they were; but a map whose entries
//! may be dropped (`migrations::DROPPED_AT_UPGRADE`, the flow cache) is replaced by an
//! empty one of today's layout the same way.

use std::{
    collections::HashMap,
    fs, io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapData, MapInfo},
    programs::{ProgramFd, loaded_programs},
    sys::SyscallError,
};
use sluice_common::{MAPS, MapDef, Migration, migrations};

use crate::{
    AttachRole, Datapath, DatapathError, ProgramDef, create_dir, links_dir, pin_names,
    programs::{link_pin_name, link_target},
    raw_map::{BPF_ANY, RawMap},
    sys,
};

/// Where the new maps wait, filled, until the programs use them (bpffs refuses dots).
const STAGING_DIR: &str = "migrating";

/// A map converted from an earlier layout at load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigratedMap {
    pub map: &'static str,
    /// The pinned layout and today's, worded as the pinned-map check words them.
    pub from: String,
    pub to: String,
    /// Entries converted before the programs were swapped (one changed during the copy
    /// counts once per pass that wrote it).
    pub entries: usize,
    /// Entries the earlier programs added or changed between the last copy and the swap,
    /// converted after it.
    pub late_entries: usize,
    /// Late entries that did not convert (only the agent writes the maps whose conversion
    /// can fail, and no earlier agent runs during the upgrade, so none is expected).
    pub late_unconvertible: usize,
}

/// A map to migrate: its registry entry, the migration (none for a map that starts
/// empty), the pinned layout in words and the capacity the new map keeps (the old map's,
/// or the registry's for one that starts empty).
struct Step {
    def: &'static MapDef,
    migration: Option<&'static Migration>,
    found: String,
    max_entries: Option<u32>,
}

/// The maps of today's layout being made beside the pinned ones, removed on drop unless
/// they replaced them.
pub(crate) struct Staging {
    pin_dir: PathBuf,
    steps: Vec<Step>,
    /// What [`Self::fill`] copied, per step.
    filled: Vec<Copied>,
    committed: bool,
}

impl Staging {
    /// Compares every pinned map with the registry. Refuses a map of another layout with
    /// no migration; plans the others. Creates the staging directory when there is
    /// something to migrate, after removing one an interrupted load left.
    pub(crate) fn plan(pin_dir: &Path) -> Result<Self, DatapathError> {
        let mut steps = Vec::new();
        for def in &MAPS {
            if let Some(step) = check_pinned_map(pin_dir, def)? {
                steps.push(step);
            }
        }
        let staging = Self {
            pin_dir: pin_dir.into(),
            steps,
            filled: Vec::new(),
            committed: false,
        };
        staging.remove_dir()?;
        if !staging.steps.is_empty() {
            create_dir(&staging.dir())?;
        }
        Ok(staging)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    fn dir(&self) -> PathBuf {
        self.pin_dir.join(STAGING_DIR)
    }

    fn step(&self, def: &MapDef) -> Option<&Step> {
        self.steps.iter().find(|s| s.def.id == def.id)
    }

    /// Where the loader pins (or finds) `def`: the staging directory for a map to migrate.
    pub(crate) fn pin_path(&self, def: &MapDef) -> PathBuf {
        match self.step(def) {
            Some(_) => self.dir().join(def.name),
            None => self.pin_dir.join(def.name),
        }
    }

    /// The capacity a new map keeps: the old map's, as a reused pin keeps its own.
    pub(crate) fn max_entries(&self, def: &MapDef) -> Option<u32> {
        self.step(def).and_then(|s| s.max_entries)
    }

    /// Converts every entry of each old map into its new one, which the loaded programs
    /// name but no attached program runs yet. An entry that does not convert refuses the
    /// whole upgrade.
    pub(crate) fn fill(&mut self) -> Result<(), DatapathError> {
        self.filled = self
            .steps
            .iter()
            .map(|step| {
                let mut copied = copy(&self.pin_dir, step, None)?;
                // Copies again what the earlier programs changed during the copy: the
                // last pass is short, and so is the moment before the swap in which they
                // make entries the new programs miss (see commit()).
                for _ in 0..RECOPIES {
                    let again = copy(&self.pin_dir, step, Some(&copied))?;
                    copied.absorb(again);
                }
                match (copied.unconvertible.first(), step.migration) {
                    (Some((key, reason)), Some(migration)) => Err(DatapathError::Unconvertible {
                        migration,
                        key: hex(key),
                        reason: *reason,
                        count: copied.unconvertible.len(),
                    }),
                    _ => Ok(copied),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// After the swap: converts the entries the earlier programs added or changed since
    /// [`Self::fill`], then pins each new map in place of the old one and removes the
    /// staging directory.
    pub(crate) fn commit(mut self) -> Result<Vec<MigratedMap>, DatapathError> {
        let mut migrated = Vec::new();
        for (step, filled) in self.steps.iter().zip(&self.filled) {
            let late = copy(&self.pin_dir, step, Some(filled))?;
            let from = self.dir().join(step.def.name);
            let to = self.pin_dir.join(step.def.name);
            fs::rename(&from, &to).map_err(|source| DatapathError::Io {
                call: "rename",
                path: from,
                source,
            })?;
            migrated.push(MigratedMap {
                map: step.def.name,
                from: step.found.clone(),
                to: migrations::layout(step.def),
                entries: filled.written,
                late_entries: late.written,
                late_unconvertible: late.unconvertible.len(),
            });
        }
        self.committed = true;
        self.remove_dir()?;
        Ok(migrated)
    }

    fn remove_dir(&self) -> Result<(), DatapathError> {
        let dir = self.dir();
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DatapathError::Io {
                call: "rm -r",
                path: dir,
                source,
            }),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.committed || self.steps.is_empty() {
            return;
        }
        // A refused upgrade leaves the pins as they were; Drop has no caller to tell.
        if let Err(err) = self.remove_dir() {
            eprintln!("removing the maps of a refused upgrade: {err}");
        }
    }
}

/// Passes of [`Staging::fill`] after the first, each over the entries the previous ones
/// did not see as they are now.
const RECOPIES: usize = 2;

/// What one copy from an old map to its new one did.
#[derive(Default)]
struct Copied {
    written: usize,
    unconvertible: Vec<(Vec<u8>, sluice_common::Unconvertible)>,
    /// The entries it read, key and a digest of the value: what a later copy skips.
    seen: HashMap<Vec<u8>, u64>,
}

impl Copied {
    /// Adds a later pass over the same maps.
    fn absorb(&mut self, later: Copied) {
        self.written += later.written;
        self.unconvertible.extend(later.unconvertible);
        self.seen.extend(later.seen);
    }
}

/// Converts the entries of `step`'s old map (pinned in the pin directory) into its new
/// one (in the staging directory): all of them, or, after the swap, those added or changed
/// since the entries `copied` (the earlier programs wrote them between the copy and the
/// swap: their history of the connection is the one to keep, over what the new programs
/// made of its packets in the moment before this call).
fn copy(pin_dir: &Path, step: &Step, copied: Option<&Copied>) -> Result<Copied, DatapathError> {
    let def = step.def;
    // A map that starts empty takes nothing over.
    let Some(migration) = step.migration else {
        return Ok(Copied::default());
    };
    let (old, old_info) = open(def, &pin_dir.join(def.name))?;
    let (new, new_info) = open(def, &pin_dir.join(STAGING_DIR).join(def.name))?;
    let sys_err = |source| DatapathError::Sys {
        map: def.name,
        source,
    };
    let old = RawMap::new(&old, sizes(&old_info));
    let new = RawMap::new(&new, sizes(&new_info));
    let mut done = Copied::default();
    for (key, value) in old.hash_entries().map_err(sys_err)? {
        let digest = digest(&value);
        if copied.is_some_and(|c| c.seen.get(&key) == Some(&digest)) {
            continue;
        }
        done.seen.insert(key.clone(), digest);
        let value = match (migration.convert)(&value) {
            Ok(value) => value,
            Err(reason) => {
                done.unconvertible.push((key, reason));
                continue;
            }
        };
        new.update(&key, &value, BPF_ANY).map_err(sys_err)?;
        done.written += 1;
    }
    Ok(done)
}

fn digest(value: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

fn open(def: &MapDef, path: &Path) -> Result<(MapData, MapInfo), DatapathError> {
    let map_err = |source| DatapathError::Map {
        map: def.name,
        path: path.into(),
        source,
    };
    let data = MapData::from_pin(path).map_err(map_err)?;
    let info = data.info().map_err(map_err)?;
    Ok((data, info))
}

fn sizes(info: &MapInfo) -> (usize, usize) {
    (info.key_size() as usize, info.value_size() as usize)
}

fn is_errno(err: &SyscallError, errno: i32) -> bool {
    err.io_error.raw_os_error() == Some(errno)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares the map pinned for `def` (if any) with the registry: None if it matches (or
/// there is none), the step that migrates it, or a refusal naming both layouts.
fn check_pinned_map(pin_dir: &Path, def: &'static MapDef) -> Result<Option<Step>, DatapathError> {
    let path = pin_dir.join(def.name);
    if !path.exists() {
        return Ok(None);
    }
    let map_err = |source| DatapathError::Map {
        map: def.name,
        path: path.clone(),
        source,
    };
    let info = MapInfo::from_pin(&path).map_err(map_err)?;
    let map_type = info.map_type().map_err(map_err)?;
    let (key_size, value_size) = sizes(&info);
    if (map_type, key_size, value_size) == (def.kind, def.key_size, def.value_size) {
        return Ok(None);
    }
    let found = format!("{map_type:?} key {key_size} value {value_size}");
    let migration = migrations::migration(def.id, value_size)
        .filter(|_| map_type == def.kind && key_size == def.key_size);
    match migration {
        Some(migration) => Ok(Some(Step {
            def,
            migration: Some(migration),
            found: migration.from_layout(),
            max_entries: Some(info.max_entries()),
        })),
        None if migrations::DROPPED_AT_UPGRADE.contains(&def.id) => Ok(Some(Step {
            def,
            migration: None,
            found,
            max_entries: None,
        })),
        None => Err(DatapathError::IncompatibleMap {
            map: def.name,
            path,
            found,
            expected: migrations::layout(def),
        }),
    }
}

/// A link pinned by an earlier load, with the program of this load that belongs in it.
struct PinnedProgramLink {
    path: PathBuf,
    program: &'static ProgramDef,
}

/// Every link pinned under `pin_dir`, of every role.
fn pinned_links(pin_dir: &Path) -> Result<Vec<PinnedProgramLink>, DatapathError> {
    let mut links = Vec::new();
    for role in AttachRole::ALL {
        let dir = links_dir(pin_dir, role);
        for name in pin_names(&dir)? {
            let Some(target) = link_target(role, &name) else {
                continue;
            };
            // The cgroup roles share a directory, each with its one target.
            if role.cgroup_target().is_some_and(|own| own != target) {
                continue;
            }
            if let Some(program) = role.programs().find(|p| link_pin_name(target, p) == name) {
                links.push(PinnedProgramLink {
                    path: dir.join(&name),
                    program,
                });
            }
        }
    }
    Ok(links)
}

/// One pinned link, opened, with the program it runs and this load's program for it.
pub(crate) struct LinkSwap {
    path: PathBuf,
    link: OwnedFd,
    earlier: ProgramFd,
    program: OwnedFd,
}

impl Datapath {
    /// Opens every pinned link still attached, with the program it runs and the one of
    /// this load that replaces it: all but the swap itself, so the swap follows the copy
    /// of the maps at once.
    pub(crate) fn prepare_swap(&mut self) -> Result<Vec<LinkSwap>, DatapathError> {
        let mut swaps = Vec::new();
        for pinned in pinned_links(&self.pin_dir)? {
            let path = pinned.path;
            let sys_err = |err: SyscallError| DatapathError::Io {
                call: err.call,
                path: path.clone(),
                source: err.io_error,
            };
            let link = sys::obj_get(&path).map_err(sys_err)?;
            let info = sys::obj_info(link.as_fd(), true).map_err(sys_err)?;
            // A defunct link (its interface or cgroup is gone) is left to attach().
            if !info.attached {
                continue;
            }
            let name = pinned.program.name;
            let earlier = earlier_program(info.program)
                .ok_or_else(|| DatapathError::MissingProgram(format!("id {}", info.program)))?;
            let program = self
                .ebpf(pinned.program.object)
                .program(name)
                .ok_or_else(|| DatapathError::MissingProgram(name.to_owned()))?
                .fd()
                .map_err(|source| DatapathError::ProgramType {
                    program: name.to_owned(),
                    source,
                })?
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| DatapathError::Io {
                    call: "dup",
                    path: path.clone(),
                    source,
                })?;
            swaps.push(LinkSwap {
                path,
                link,
                earlier,
                program,
            });
        }
        Ok(swaps)
    }
}

/// Puts this load's program into every link of `swaps`, each in one atomic update. If one
/// fails, the links already updated get their earlier program back, so the datapath runs
/// as before the call. A link that went defunct meanwhile is skipped.
pub(crate) fn swap_links(swaps: &[LinkSwap]) -> Result<(), DatapathError> {
    for (done, swap) in swaps.iter().enumerate() {
        match sys::link_update(swap.link.as_fd(), swap.program.as_fd()) {
            Ok(()) => {}
            Err(err) if is_errno(&err, libc::ENOLINK) => {}
            Err(err) => {
                for undo in &swaps[..done] {
                    // Best effort: the error returned is the one that stopped the swap.
                    if let Err(e) = sys::link_update(undo.link.as_fd(), undo.earlier.as_fd()) {
                        eprintln!("putting the earlier program back into a link: {e}");
                    }
                }
                return Err(DatapathError::Io {
                    call: err.call,
                    path: swap.path.clone(),
                    source: err.io_error,
                });
            }
        }
    }
    Ok(())
}

/// The program a link runs now, held open so it can be put back.
fn earlier_program(id: u32) -> Option<ProgramFd> {
    loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .and_then(|p| p.fd().ok())
}
