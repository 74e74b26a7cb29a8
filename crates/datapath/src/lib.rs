//! The eBPF datapath: the C programs in `bpf/` (compiled by `build.rs`) and their loader.
//!
//! Every map of the registry (`sluice_common::MAPS`) is pinned by name under one directory
//! on bpffs, so user space without the programs ([`PinnedMaps`]) and a restarted agent see
//! the same state. Every program of [`PROGRAMS`] is loaded; links are pinned per
//! [`AttachRole`] under `<pin_dir>/links/<role>/`, so traffic keeps flowing while no agent
//! runs, and a new agent swaps its programs into the existing links atomically.

pub mod digest;
mod elem_count;
mod error;
mod migrate;
mod pinned;
mod programs;
mod raw_map;
mod sock;
pub mod sys;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData},
    programs::{
        CgroupSockAddr, LinkOrder, Program, ProgramError, ProgramInfo, SchedClassifier,
        TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
    sys::SyscallError,
};
use sluice_common::{CapacitySetting, CtConfig, MAPS, MapId};

pub use elem_count::ElemCount;
pub use error::DatapathError;
pub use migrate::MigratedMap;
use migrate::Staging;
pub use pinned::{
    MaglevTable, MapInventory, PinDir, PinnedMaps, PolicyMap, bump_flow_generation,
    create_maglev_table, create_policy_map, open_events, read_ct_stats, read_flow_stats,
    remove_pins,
};
pub use programs::{
    AttachRole, HOST_CGROUP_TARGET, Hook, Object, ObjectBuild, POD_CGROUP_TARGET, PROGRAMS,
    ProgramDef,
};
use programs::{link_pin_name, link_target};

/// The pod programs' object, for tests that read its BTF (every object declares the same
/// maps and structs).
pub fn object_bytes() -> &'static [u8] {
    Object::Lxc.bytes()
}

/// Subdirectory of the pin directory holding the pinned links, one directory per role.
const LINKS_DIR: &str = "links";

#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// Capacity of the conntrack map when it is created (a reused pin keeps its own).
    pub ct_max_entries: u32,
    /// Capacity of the service map (a frontend takes one entry per port plus one per
    /// backend slot) and of the backend map, when they are created. Both are allocated
    /// per entry, so a large cap costs only its hash buckets (16 bytes an entry).
    pub lb_max_entries: u32,
    /// Conntrack lifetimes by connection state, written to `ct_config` at every load.
    pub ct_timeouts: CtConfig,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            ct_max_entries: MapId::Conntrack.def().max_entries,
            // 100,000 services with three backends take 500,000 service entries; the
            // incumbent's ceiling of 260,000 backends must not be ours.
            lb_max_entries: MapId::Services.def().max_entries,
            ct_timeouts: CtConfig::default(),
        }
    }
}

impl DatapathConfig {
    /// The capacity `setting` gives the maps it sizes.
    pub fn capacity(&self, setting: CapacitySetting) -> u32 {
        match setting {
            CapacitySetting::Conntrack => self.ct_max_entries,
            CapacitySetting::LoadBalancer => self.lb_max_entries,
        }
    }
}

/// The loaded programs and the directory their maps and links are pinned under.
pub struct Datapath {
    /// One loaded object per [`Object`], in [`Object::ALL`] order.
    objects: Vec<Ebpf>,
    /// The kernel's id of each program this load made, by name: what tells them from an
    /// earlier agent's programs of the same name still attached.
    program_ids: BTreeMap<&'static str, u32>,
    pin_dir: PathBuf,
    /// The maps this load converted from an earlier layout.
    migrated: Vec<MigratedMap>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the embedded objects. Every map is pinned as `<pin_dir>/<map name>`; maps
    /// already pinned there are reused (agent restart keeps state), and the objects share
    /// them the same way; a map pinned with an earlier layout is migrated (see
    /// [`Self::migrated`]). Creates `pin_dir`.
    pub fn load(pin_dir: &Path, config: &DatapathConfig) -> Result<Self, DatapathError> {
        Self::load_build(pin_dir, config, ObjectBuild::Current)
    }

    /// [`Self::load`] with the objects of `build`.
    pub fn load_build(
        pin_dir: &Path,
        config: &DatapathConfig,
        build: ObjectBuild,
    ) -> Result<Self, DatapathError> {
        create_dir(pin_dir)?;
        // aya reuses a pinned map without comparing it to the object, so a layout change
        // would otherwise go unnoticed and corrupt entries. Refusals come before any change.
        let mut staging = Staging::plan(pin_dir)?;
        let objects = Object::ALL
            .into_iter()
            .map(|object| load_object(build.bytes(object), object, &staging, config))
            .collect::<Result<_, _>>()?;
        adopt_unsorted_links(pin_dir)?;
        // Before any program is attached: the datapath expires entries by it.
        write_ct_config(pin_dir, config.ct_timeouts)?;
        let mut datapath = Self {
            objects,
            program_ids: BTreeMap::new(),
            pin_dir: pin_dir.into(),
            migrated: Vec::new(),
        };
        for program in &PROGRAMS {
            let id = datapath.program_info(program.name)?.id();
            datapath.program_ids.insert(program.name, id);
        }
        if !staging.is_empty() {
            // The new maps are filled before any program that uses them runs, and the
            // swap follows at once: entries the earlier programs make in between are
            // converted again by commit().
            let swaps = datapath.prepare_swap()?;
            staging.fill()?;
            migrate::swap_links(&swaps)?;
            datapath.migrated = staging.commit()?;
            // The flow cache's decisions were the earlier programs', made from the old maps.
            PinnedMaps::open(pin_dir)?.bump_flow_generation()?;
        }
        Ok(datapath)
    }

    /// The maps this load converted from the layout an earlier agent pinned them with.
    pub fn migrated(&self) -> &[MigratedMap] {
        &self.migrated
    }

    /// Whether the kernel runs this load's own programs of the device role `role` on the
    /// interface `target`. The same programs of an earlier load (the agent before a
    /// restart or an upgrade) do not count: [`Self::attach`] swaps them for these in their
    /// links.
    pub fn runs(&self, role: AttachRole, target: &str) -> bool {
        role.programs().all(|program| {
            // Socket programs run on a cgroup, never on an interface.
            let Hook::Tcx(attach) = program.hook else {
                return false;
            };
            let own = self.program_ids.get(program.name);
            SchedClassifier::query_tcx(target, attach)
                .map(|(_, progs)| progs.iter().any(|p| Some(&p.id()) == own))
                .unwrap_or(false)
        })
    }

    fn ebpf(&mut self, object: Object) -> &mut Ebpf {
        &mut self.objects[object as usize]
    }

    fn links_dir(&self, role: AttachRole) -> PathBuf {
        links_dir(&self.pin_dir, role)
    }

    /// Attaches the programs of `role` to `target` (for device roles, an interface in the
    /// current network namespace). Links are pinned as
    /// `<pin_dir>/links/<role>/<target>_<suffix>` so traffic survives an agent exit; if
    /// pinned links already exist (agent restarted), this program is swapped in atomically.
    /// Calling it again for an attached target is harmless.
    pub fn attach(&mut self, role: AttachRole, target: &str) -> Result<(), DatapathError> {
        if role.cgroup_target().is_some() {
            return Err(DatapathError::NotADeviceRole(role));
        }
        check_target(target)?;
        let links_dir = self.links_dir(role);
        create_dir(&links_dir)?;
        for program in role.programs() {
            let path = link_pin_path(&self.pin_dir, program, target);
            match program.hook {
                Hook::Tcx(attach_type) => {
                    let classifier: &mut SchedClassifier =
                        typed_program(self.ebpf(program.object), program.name)?;
                    attach_tcx(classifier, program.name, target, attach_type, &path)?;
                }
                Hook::CgroupSockAddr => unreachable_role(role)?,
            }
        }
        Ok(())
    }

    /// Detaches the programs of `role` from `target` and removes their pins (fine if the
    /// target is already gone).
    pub fn detach(&mut self, role: AttachRole, target: &str) -> Result<(), DatapathError> {
        check_target(target)?;
        for program in role.programs() {
            let path = link_pin_path(&self.pin_dir, program, target);
            detach_pinned_link(&path)?;
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(DatapathError::Io {
                        call: "unlink",
                        path,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Targets of `role` with pinned links.
    pub fn attached(&self, role: AttachRole) -> Result<BTreeSet<String>, DatapathError> {
        let links_dir = self.links_dir(role);
        let mut targets = BTreeSet::new();
        for file_name in pin_names(&links_dir)? {
            // The cgroup roles share a directory, each with its one target.
            if let Some(target) = link_target(role, &file_name)
                && role.cgroup_target().is_none_or(|own| own == target)
            {
                targets.insert(target.to_owned());
            }
        }
        Ok(targets)
    }

    /// The kernel's information on a loaded program of any type, by name.
    pub fn program_info(&mut self, name: &str) -> Result<ProgramInfo, DatapathError> {
        let def = PROGRAMS
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| DatapathError::MissingProgram(name.to_owned()))?;
        let program = self
            .ebpf(def.object)
            .program(name)
            .ok_or_else(|| DatapathError::MissingProgram(name.to_owned()))?;
        program.info().map_err(|source| DatapathError::ProgramType {
            program: name.to_owned(),
            source,
        })
    }

    /// A loaded program by name, for BPF_PROG_TEST_RUN.
    pub fn program(&mut self, name: &str) -> Result<&mut SchedClassifier, DatapathError> {
        let object = PROGRAMS
            .iter()
            .find(|p| p.name == name)
            .map_or(Object::Lxc, |p| p.object);
        typed_program(self.ebpf(object), name)
    }
}

/// Loads `object` (its ELF `bytes`) with every map of the registry pinned where `staging`
/// says (created by the first object, reused by the others) and loads its programs into
/// the kernel.
fn load_object(
    bytes: &[u8],
    object: Object,
    staging: &Staging,
    config: &DatapathConfig,
) -> Result<Ebpf, DatapathError> {
    let mut loader = EbpfLoader::new();
    for def in &MAPS {
        let migrated = staging.max_entries(def);
        if let Some(max_entries) = migrated.or(def.capacity.map(|s| config.capacity(s))) {
            loader.map_max_entries(def.name, max_entries);
        }
        loader.map_pin_path(def.name, staging.pin_path(def));
    }
    let mut ebpf = loader.load(bytes).map_err(DatapathError::Load)?;
    for program in PROGRAMS.iter().filter(|p| p.object == object) {
        let loaded = match program.hook {
            Hook::Tcx(_) => typed_program::<SchedClassifier>(&mut ebpf, program.name)?.load(),
            Hook::CgroupSockAddr => {
                typed_program::<CgroupSockAddr>(&mut ebpf, program.name)?.load()
            }
        };
        loaded.map_err(|source| DatapathError::ProgramLoad {
            program: program.name,
            source,
        })?;
    }
    Ok(ebpf)
}

/// Writes the conntrack lifetimes the datapath and the agent's GC expire entries by.
fn write_ct_config(pin_dir: &Path, config: CtConfig) -> Result<(), DatapathError> {
    // Only this map: the others may still be of the layout being migrated from.
    let path = pin_dir.join(MapId::CtConfig.name());
    let map_err = |source| DatapathError::Map {
        map: MapId::CtConfig.name(),
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let mut ct_config: Array<MapData, CtConfig> = Map::from_map_data(data)
        .and_then(Array::try_from)
        .map_err(map_err)?;
    ct_config
        .set(0, config, 0)
        .map_err(|source| DatapathError::MapWrite {
            map: MapId::CtConfig.name(),
            source,
        })
}

fn links_dir(pin_dir: &Path, role: AttachRole) -> PathBuf {
    pin_dir.join(LINKS_DIR).join(role.pin_dir_name())
}

/// Where the link of `program` on `target` is pinned, for whoever waits for an agent to
/// attach it.
pub fn link_pin_path(pin_dir: &Path, program: &ProgramDef, target: &str) -> PathBuf {
    links_dir(pin_dir, program.role).join(link_pin_name(target, program))
}

fn create_dir(path: &Path) -> Result<(), DatapathError> {
    fs::create_dir_all(path).map_err(|source| DatapathError::Io {
        call: "mkdir",
        path: path.into(),
        source,
    })
}

/// Names of the files (pins) directly in `dir`; none if it does not exist.
fn pin_names(dir: &Path) -> Result<Vec<String>, DatapathError> {
    let io_err = |source| DatapathError::Io {
        call: "readdir",
        path: dir.into(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(io_err(err)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err)?;
        if entry.file_type().map_err(io_err)?.is_dir() {
            continue;
        }
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

/// Moves the pod links an agent before per-role directories pinned straight under
/// `<pin_dir>/links/` into the pod role's directory, so this agent swaps its programs into
/// them instead of attaching a second copy beside them.
fn adopt_unsorted_links(pin_dir: &Path) -> Result<(), DatapathError> {
    let links_dir = pin_dir.join(LINKS_DIR);
    let role = AttachRole::PodVeth;
    for file_name in pin_names(&links_dir)? {
        if link_target(role, &file_name).is_none() {
            continue;
        }
        let role_dir = links_dir.join(role.pin_dir_name());
        create_dir(&role_dir)?;
        let from = links_dir.join(&file_name);
        fs::rename(&from, role_dir.join(&file_name)).map_err(|source| DatapathError::Io {
            call: "rename",
            path: from,
            source,
        })?;
    }
    Ok(())
}

/// The program `name` of `ebpf` as its type `P` (a tc classifier, a cgroup sock_addr hook).
pub(crate) fn typed_program<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| DatapathError::MissingProgram(name.to_owned()))?;
    program
        .try_into()
        .map_err(|source| DatapathError::ProgramType {
            program: name.to_owned(),
            source,
        })
}

/// The programs of `role` attach to no interface.
fn unreachable_role(role: AttachRole) -> Result<(), DatapathError> {
    Err(DatapathError::NotADeviceRole(role))
}

/// Refuses an attach target (an interface name) that the kernel or the link pins cannot
/// take: targets become file names under the pin directory.
pub fn check_target(target: &str) -> Result<(), DatapathError> {
    // IFNAMSIZ is 16 including the terminating NUL; bpffs refuses names with a dot.
    let valid = !target.is_empty()
        && target.len() < 16
        && !target.contains(['/', '.', '\0'])
        && !target.chars().any(char::is_whitespace);
    if valid {
        Ok(())
    } else {
        Err(DatapathError::InvalidInterfaceName(target.to_owned()))
    }
}

/// Attaches `program` through the tcx link pinned at `path`, creating and pinning the link
/// when there is none yet, or when the pinned one is defunct (its interface was deleted).
fn attach_tcx(
    program: &mut SchedClassifier,
    name: &'static str,
    ifname: &str,
    attach_type: TcAttachType,
    path: &Path,
) -> Result<(), DatapathError> {
    let attach_err = |source| DatapathError::Attach {
        program: name,
        interface: ifname.to_owned(),
        source,
    };
    match PinnedLink::from_pin(path) {
        Ok(pinned) => {
            let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
                DatapathError::Link {
                    path: path.into(),
                    source,
                }
            })?;
            match program.attach_to_link(link) {
                Ok(id) => {
                    // Keep the pin as the only reference, so detach() can release the link.
                    drop(program.take_link(id).map_err(attach_err)?);
                    return Ok(());
                }
                Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.raw_os_error() == Some(libc::ENOLINK) =>
                {
                    // The interface behind the link is gone; a new one may carry its name.
                    remove_file(path)?;
                }
                Err(source) => return Err(attach_err(source)),
            }
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DatapathError::Link {
                path: path.into(),
                source,
            });
        }
    }

    let id = program
        .attach_with_options(
            ifname,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(attach_err)?;
    let link = program.take_link(id).map_err(attach_err)?;
    pin_new_link(link, path)
}

/// Pins a link just made at `path`, so it outlives this process.
pub(crate) fn pin_new_link<L>(link: L, path: &Path) -> Result<(), DatapathError>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    let link = FdLink::try_from(link).map_err(|source| DatapathError::Link {
        path: path.into(),
        source,
    })?;
    // On failure the link is dropped here, which detaches the program again.
    link.pin(path).map_err(|source| DatapathError::PinLink {
        path: path.into(),
        source,
    })?;
    Ok(())
}

fn remove_file(path: &Path) -> Result<(), DatapathError> {
    fs::remove_file(path).map_err(|source| DatapathError::Io {
        call: "unlink",
        path: path.into(),
        source,
    })
}

/// Takes the program of the link pinned at `path` off its hook before returning.
///
/// Removing the pin alone would release the link only when the kernel frees it, a moment
/// later; so open the pin and detach explicitly. A missing pin, or a link already defunct
/// (its interface is gone), is fine.
fn detach_pinned_link(path: &Path) -> Result<(), DatapathError> {
    use std::os::fd::AsFd;
    let sys_err = |err: SyscallError| DatapathError::Io {
        call: err.call,
        path: path.into(),
        source: err.io_error,
    };
    let link = match sys::obj_get(path) {
        Ok(link) => link,
        Err(err) if err.io_error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(sys_err(err)),
    };
    match sys::link_detach(link.as_fd()) {
        Err(err) if err.io_error.raw_os_error() != Some(libc::ENOLINK) => Err(sys_err(err)),
        _ => Ok(()),
    }
}
