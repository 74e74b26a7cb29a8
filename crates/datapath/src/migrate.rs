//! Upgrading maps pinned with an earlier layout (`sluice_common::MIGRATIONS`).
//!
//! At load, every pinned map is compared with the registry before anything changes. A map
//! of an earlier layout with a migration gets a new map of today's layout, created by the
//! loader under `<pin_dir>/migrating/` and filled with every entry converted; the programs
//! are loaded against the new maps and swapped into every pinned link (tcx and cgroup link
//! updates, each atomic); the entries the earlier programs added between the copy and the
//! swap are converted too; then the new map's pin replaces the old one (a rename on bpffs).
//! So no packet sees an empty map: the new programs see the filled one from their first
//! packet. A map of a layout without a migration, or an entry that does not convert, is
//! refused before the swap, with the running programs and every pin as they were.

use std::{
    collections::HashSet,
    fs, io,
    os::fd::AsFd,
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
    raw_map::{BPF_ANY, BPF_NOEXIST, RawMap},
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
    /// Entries converted before the programs were swapped.
    pub entries: usize,
    /// Entries the earlier programs added between that copy and the swap, converted after.
    pub late_entries: usize,
    /// Late entries that did not convert (only the agent writes the maps whose conversion
    /// can fail, and no earlier agent runs during the upgrade, so none is expected).
    pub late_unconvertible: usize,
}

/// A map to migrate: its registry entry, the migration and the old map's capacity.
struct Step {
    def: &'static MapDef,
    migration: &'static Migration,
    max_entries: u32,
}

/// The maps of today's layout being made beside the pinned ones, removed on drop unless
/// they replaced them.
pub(crate) struct Staging {
    pin_dir: PathBuf,
    steps: Vec<Step>,
    /// Entries converted by [`Self::fill`], per step.
    filled: Vec<usize>,
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
        self.step(def).map(|s| s.max_entries)
    }

    /// Converts every entry of each old map into its new one, which the loaded programs
    /// name but no attached program runs yet. An entry that does not convert refuses the
    /// whole upgrade.
    pub(crate) fn fill(&mut self) -> Result<(), DatapathError> {
        self.filled = self
            .steps
            .iter()
            .map(|step| {
                let copied = copy(&self.pin_dir, step, BPF_ANY)?;
                match copied.unconvertible.first() {
                    Some((key, reason)) => Err(DatapathError::Unconvertible {
                        migration: step.migration,
                        key: hex(key),
                        reason: *reason,
                        count: copied.unconvertible.len(),
                    }),
                    None => Ok(copied.written),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// After the swap: converts the entries the earlier programs added since [`Self::fill`]
    /// (those the new programs have not made themselves), then pins each new map in place
    /// of the old one and removes the staging directory.
    pub(crate) fn commit(mut self) -> Result<Vec<MigratedMap>, DatapathError> {
        let mut migrated = Vec::new();
        for (step, &entries) in self.steps.iter().zip(&self.filled) {
            let late = copy(&self.pin_dir, step, BPF_NOEXIST)?;
            let from = self.dir().join(step.def.name);
            let to = self.pin_dir.join(step.def.name);
            fs::rename(&from, &to).map_err(|source| DatapathError::Io {
                call: "rename",
                path: from,
                source,
            })?;
            migrated.push(MigratedMap {
                map: step.def.name,
                from: step.migration.from_layout(),
                to: step.migration.to_layout(),
                entries,
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

/// What one copy from an old map to its new one did.
struct Copied {
    written: usize,
    unconvertible: Vec<(Vec<u8>, sluice_common::Unconvertible)>,
}

/// Converts the entries of `step`'s old map (pinned in the pin directory) into its new
/// one (in the staging directory): all of them (`BPF_ANY`), or only those whose key the
/// new map lacks (`BPF_NOEXIST`).
fn copy(pin_dir: &Path, step: &Step, flags: u64) -> Result<Copied, DatapathError> {
    let def = step.def;
    let old_path = pin_dir.join(def.name);
    let new_path = pin_dir.join(STAGING_DIR).join(def.name);
    let (old, old_info) = open(def, &old_path)?;
    let (new, new_info) = open(def, &new_path)?;
    let sys_err = |source| DatapathError::Sys {
        map: def.name,
        source,
    };
    let old = RawMap::new(&old, sizes(&old_info));
    let new = RawMap::new(&new, sizes(&new_info));
    let skip: HashSet<Vec<u8>> = if flags == BPF_NOEXIST {
        new.hash_entries()
            .map_err(sys_err)?
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    } else {
        HashSet::new()
    };
    let mut copied = Copied {
        written: 0,
        unconvertible: Vec::new(),
    };
    for (key, value) in old.hash_entries().map_err(sys_err)? {
        if skip.contains(&key) {
            continue;
        }
        let value = match (step.migration.convert)(&value) {
            Ok(value) => value,
            Err(reason) => {
                copied.unconvertible.push((key, reason));
                continue;
            }
        };
        match new.update(&key, &value, flags) {
            Ok(()) => copied.written += 1,
            // Made by the new programs meanwhile: theirs is the newer.
            Err(err) if flags == BPF_NOEXIST && is_errno(&err, libc::EEXIST) => {}
            Err(err) => return Err(sys_err(err)),
        }
    }
    Ok(copied)
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
    let migration = migrations::migration(def.id, value_size)
        .filter(|_| map_type == def.kind && key_size == def.key_size);
    match migration {
        Some(migration) => Ok(Some(Step {
            def,
            migration,
            max_entries: info.max_entries(),
        })),
        None => Err(DatapathError::IncompatibleMap {
            map: def.name,
            path,
            found: format!("{map_type:?} key {key_size} value {value_size}"),
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

impl Datapath {
    /// Puts this load's programs into every pinned link, each in one atomic update. If one
    /// fails, the links already updated get their earlier program back, so the datapath
    /// runs as before the call. A defunct link (its interface or cgroup is gone) is left
    /// to [`Datapath::attach`]. Returns how many links now run this load's programs.
    pub(crate) fn swap_pinned_links(&mut self) -> Result<usize, DatapathError> {
        let mut swapped: Vec<(std::os::fd::OwnedFd, ProgramFd)> = Vec::new();
        for link in pinned_links(&self.pin_dir)? {
            match self.swap_link(&link) {
                Ok(Some(done)) => swapped.push(done),
                Ok(None) => {}
                Err(err) => {
                    for (fd, earlier) in &swapped {
                        // Best effort: the error returned is the one that stopped the swap.
                        if let Err(undo) = sys::link_update(fd.as_fd(), earlier.as_fd()) {
                            eprintln!("putting the earlier program back into a link: {undo}");
                        }
                    }
                    return Err(err);
                }
            }
        }
        Ok(swapped.len())
    }

    /// Swaps this load's program into one pinned link; returns the link and the program it
    /// ran, or None for a defunct link.
    fn swap_link(
        &mut self,
        link: &PinnedProgramLink,
    ) -> Result<Option<(std::os::fd::OwnedFd, ProgramFd)>, DatapathError> {
        let path = &link.path;
        let sys_err = |err: SyscallError| DatapathError::Io {
            call: err.call,
            path: path.clone(),
            source: err.io_error,
        };
        let fd = sys::obj_get(path).map_err(sys_err)?;
        let info = sys::obj_info(fd.as_fd(), true).map_err(sys_err)?;
        if !info.attached {
            return Ok(None);
        }
        let earlier = earlier_program(info.program)
            .ok_or_else(|| DatapathError::MissingProgram(format!("program id {}", info.program)))?;
        let program = self
            .ebpf(link.program.object)
            .program(link.program.name)
            .ok_or_else(|| DatapathError::MissingProgram(link.program.name.to_owned()))?
            .fd()
            .map_err(|source| DatapathError::ProgramType {
                program: link.program.name.to_owned(),
                source,
            })?;
        match sys::link_update(fd.as_fd(), program.as_fd()) {
            Ok(()) => Ok(Some((fd, earlier))),
            Err(err) if is_errno(&err, libc::ENOLINK) => Ok(None),
            Err(err) => Err(sys_err(err)),
        }
    }
}

/// The program a link runs now, held open so it can be put back.
fn earlier_program(id: u32) -> Option<ProgramFd> {
    loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .and_then(|p| p.fd().ok())
}
