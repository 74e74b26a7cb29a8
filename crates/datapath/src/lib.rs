//! The eBPF datapath: the C programs in `bpf/` (compiled by `build.rs`) and their loader.
//!
//! Every map is pinned by name under one directory on bpffs, so user space without the
//! programs ([`PinnedMaps`]) and a restarted agent see the same state. tcx links are pinned
//! under `<pin_dir>/links/`, so traffic keeps flowing while no agent runs; a new agent
//! swaps its programs into the existing links atomically.
//!
//! bpffs reserves names containing a dot, so links are pinned as `<ifname>_ingress` and
//! `<ifname>_egress`, and interface names with a dot are refused.

mod error;
mod pinned;

use std::{
    collections::BTreeSet,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapInfo, MapType},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
    sys::SyscallError,
};
use sluice_common::{
    Ct4Entry, Ct4Key, EndpointInfo, EventConfig, EventCounter, Frag4Key, Frag4Ports, IpcacheEntry,
    IpcacheKey, Lb4Backend, Lb4BackendKey, Lb4Key, Lb4Service, MetricsValue, names, programs,
};

pub use error::DatapathError;
pub use pinned::{PinDir, PinnedMaps, PolicyMap, create_policy_map, open_events, remove_pins};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lxc.o"));

/// The embedded object, for tests that read its BTF.
pub fn object_bytes() -> &'static [u8] {
    OBJECT
}

/// Subdirectory of the pin directory holding the pinned tcx links.
const LINKS_DIR: &str = "links";
const LINK_SUFFIX_SEPARATOR: char = '_';

/// File name of the pinned link of `ifname` for one direction. The suffix holds no
/// separator, so splitting at the last one recovers the interface name.
fn link_pin_name(ifname: &str, suffix: &str) -> String {
    format!("{ifname}{LINK_SUFFIX_SEPARATOR}{suffix}")
}

/// Where each program is attached on a pod's host-side veth.
const HOOKS: [(&str, TcAttachType, &str); 2] = [
    (programs::FROM_CONTAINER, TcAttachType::Ingress, "ingress"),
    (programs::TO_CONTAINER, TcAttachType::Egress, "egress"),
];

/// What a map pinned by an earlier run must look like to be reused.
struct MapSpec {
    name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
}

/// `struct event_bucket` in bpf/lib/maps.h: tokens and the last refill time. Only the
/// datapath reads it, so it has no Rust mirror.
const EVENT_BUCKET_SIZE: usize = 2 * size_of::<u64>();

const MAPS: [MapSpec; 12] = [
    MapSpec {
        name: names::SERVICES,
        map_type: MapType::Hash,
        key_size: size_of::<Lb4Key>(),
        value_size: size_of::<Lb4Service>(),
    },
    MapSpec {
        name: names::BACKENDS,
        map_type: MapType::Hash,
        key_size: size_of::<Lb4BackendKey>(),
        value_size: size_of::<Lb4Backend>(),
    },
    MapSpec {
        name: names::CONNTRACK,
        map_type: MapType::LruHash,
        key_size: size_of::<Ct4Key>(),
        value_size: size_of::<Ct4Entry>(),
    },
    MapSpec {
        name: names::ENDPOINTS,
        map_type: MapType::Hash,
        key_size: size_of::<u32>(),
        value_size: size_of::<EndpointInfo>(),
    },
    MapSpec {
        name: names::METRICS,
        map_type: MapType::PerCpuArray,
        key_size: size_of::<u32>(),
        value_size: size_of::<MetricsValue>(),
    },
    MapSpec {
        name: names::IPCACHE,
        map_type: MapType::LpmTrie,
        key_size: size_of::<IpcacheKey>(),
        value_size: size_of::<IpcacheEntry>(),
    },
    MapSpec {
        name: names::POLICY,
        map_type: MapType::HashOfMaps,
        key_size: size_of::<u32>(),
        // The value of a map of maps is the inner map's id.
        value_size: size_of::<u32>(),
    },
    MapSpec {
        name: names::FRAGMENTS,
        map_type: MapType::LruHash,
        key_size: size_of::<Frag4Key>(),
        value_size: size_of::<Frag4Ports>(),
    },
    MapSpec {
        name: names::EVENTS,
        map_type: MapType::RingBuf,
        // A ring buffer has neither keys nor values; its size is max_entries.
        key_size: 0,
        value_size: 0,
    },
    MapSpec {
        name: names::EVENT_CONFIG,
        map_type: MapType::Array,
        key_size: size_of::<u32>(),
        value_size: size_of::<EventConfig>(),
    },
    MapSpec {
        name: names::EVENT_BUCKET,
        map_type: MapType::PerCpuArray,
        key_size: size_of::<u32>(),
        value_size: EVENT_BUCKET_SIZE,
    },
    MapSpec {
        name: names::EVENT_COUNTERS,
        map_type: MapType::PerCpuArray,
        key_size: size_of::<u32>(),
        value_size: size_of::<EventCounter>(),
    },
];

#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// Capacity of the conntrack map when it is created (a reused pin keeps its own).
    pub ct_max_entries: u32,
    /// Capacity of the service map (a frontend takes one entry per port plus one per
    /// backend slot) and of the backend map, when they are created. Both are allocated
    /// per entry, so a large cap costs only its hash buckets (16 bytes an entry).
    pub lb_max_entries: u32,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            ct_max_entries: 65536,
            // 100,000 services with three backends take 500,000 service entries; the
            // incumbent's ceiling of 260,000 backends must not be ours.
            lb_max_entries: 1 << 20,
        }
    }
}

/// The loaded programs and the directory their maps and links are pinned under.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the embedded object. Every map is pinned as `<pin_dir>/<map name>`; maps
    /// already pinned there are reused (agent restart keeps state). Creates `pin_dir`.
    pub fn load(pin_dir: &Path, config: &DatapathConfig) -> Result<Self, DatapathError> {
        fs::create_dir_all(pin_dir).map_err(|source| DatapathError::Io {
            call: "mkdir",
            path: pin_dir.into(),
            source,
        })?;
        // aya reuses a pinned map without comparing it to the object, so a layout change
        // would otherwise go unnoticed and corrupt entries.
        for spec in &MAPS {
            check_pinned_map(pin_dir, spec)?;
        }

        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::CONNTRACK, config.ct_max_entries);
        loader.map_max_entries(names::SERVICES, config.lb_max_entries);
        loader.map_max_entries(names::BACKENDS, config.lb_max_entries);
        for spec in &MAPS {
            loader.map_pin_path(spec.name, pin_dir.join(spec.name));
        }
        let mut ebpf = loader.load(OBJECT).map_err(DatapathError::Load)?;

        for (name, _, _) in HOOKS {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::ProgramLoad {
                    program: name,
                    source,
                })?;
        }
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.into(),
        })
    }

    /// Attaches from_container (tcx ingress) and to_container (tcx egress) to `ifname` in
    /// the current network namespace. Links are pinned as
    /// `<pin_dir>/links/<ifname>_{ingress,egress}` so traffic survives an agent exit; if
    /// pinned links already exist (agent restarted), this program is swapped in atomically.
    /// Calling it again for an attached interface is harmless.
    pub fn attach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        check_ifname(ifname)?;
        let links_dir = self.pin_dir.join(LINKS_DIR);
        fs::create_dir_all(&links_dir).map_err(|source| DatapathError::Io {
            call: "mkdir",
            path: links_dir.clone(),
            source,
        })?;
        for (name, attach_type, suffix) in HOOKS {
            let path = links_dir.join(link_pin_name(ifname, suffix));
            let program = classifier(&mut self.ebpf, name)?;
            attach_pinned(program, name, ifname, attach_type, &path)?;
        }
        Ok(())
    }

    /// Unpins and so detaches the links of `ifname` (fine if the interface is already gone).
    pub fn detach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        check_ifname(ifname)?;
        for (_, _, suffix) in HOOKS {
            let path = self
                .pin_dir
                .join(LINKS_DIR)
                .join(link_pin_name(ifname, suffix));
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

    /// Interfaces with pinned links.
    pub fn attached(&self) -> Result<BTreeSet<String>, DatapathError> {
        let links_dir = self.pin_dir.join(LINKS_DIR);
        let io_err = |source| DatapathError::Io {
            call: "readdir",
            path: links_dir.clone(),
            source,
        };
        let entries = match fs::read_dir(&links_dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
            Err(err) => return Err(io_err(err)),
        };
        let mut interfaces = BTreeSet::new();
        for entry in entries {
            let file_name = entry.map_err(io_err)?.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if let Some((ifname, suffix)) = file_name.rsplit_once(LINK_SUFFIX_SEPARATOR)
                && HOOKS.iter().any(|(_, _, s)| *s == suffix)
            {
                interfaces.insert(ifname.to_owned());
            }
        }
        Ok(interfaces)
    }

    /// The from_container / to_container program, for BPF_PROG_TEST_RUN.
    pub fn program(&mut self, name: &str) -> Result<&mut SchedClassifier, DatapathError> {
        classifier(&mut self.ebpf, name)
    }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
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

/// Interface names become file names under the pin directory.
fn check_ifname(ifname: &str) -> Result<(), DatapathError> {
    // IFNAMSIZ is 16 including the terminating NUL; bpffs refuses names with a dot.
    let valid = !ifname.is_empty()
        && ifname.len() < 16
        && !ifname.contains(['/', '.', '\0'])
        && !ifname.chars().any(char::is_whitespace);
    if valid {
        Ok(())
    } else {
        Err(DatapathError::InvalidInterfaceName(ifname.to_owned()))
    }
}

fn check_pinned_map(pin_dir: &Path, spec: &MapSpec) -> Result<(), DatapathError> {
    let path = pin_dir.join(spec.name);
    if !path.exists() {
        return Ok(());
    }
    let map_err = |source| DatapathError::Map {
        map: spec.name,
        path: path.clone(),
        source,
    };
    let info = MapInfo::from_pin(&path).map_err(map_err)?;
    let map_type = info.map_type().map_err(map_err)?;
    let found = (
        map_type,
        info.key_size() as usize,
        info.value_size() as usize,
    );
    if found != (spec.map_type, spec.key_size, spec.value_size) {
        return Err(DatapathError::IncompatibleMap {
            map: spec.name,
            path,
            found: format!("{:?} key {} value {}", found.0, found.1, found.2),
            expected: format!(
                "{:?} key {} value {}",
                spec.map_type, spec.key_size, spec.value_size
            ),
        });
    }
    Ok(())
}

/// Attaches `program` through the link pinned at `path`, creating and pinning the link
/// when there is none yet, or when the pinned one is defunct (its interface was deleted).
fn attach_pinned(
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
                Err(aya::programs::ProgramError::SyscallError(SyscallError {
                    io_error, ..
                })) if io_error.raw_os_error() == Some(libc::ENOLINK) => {
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
/// later, and aya 0.14 has no call for `BPF_LINK_DETACH`; so open the pin and detach
/// explicitly. A missing pin, or a link already defunct (its interface is gone), is fine.
fn detach_pinned_link(path: &Path) -> Result<(), DatapathError> {
    use std::os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let io_err = |call: &'static str| {
        let source = io::Error::last_os_error();
        DatapathError::Io {
            call,
            path: path.to_path_buf(),
            source,
        }
    };
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return Err(DatapathError::InvalidInterfaceName(
            path.display().to_string(),
        ));
    };
    // union bpf_attr, zeroed; BPF_OBJ_GET reads `pathname` from its first 8 bytes.
    let mut attr = [0u64; 16];
    attr[0] = cpath.as_ptr() as u64;
    // SAFETY: attr outlives the call and is as large as the kernel reads; cpath is NUL-terminated.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_ptr(),
            size_of_val(&attr),
        )
    };
    if fd < 0 {
        return match io::Error::last_os_error().kind() {
            io::ErrorKind::NotFound => Ok(()),
            _ => Err(io_err("bpf(BPF_OBJ_GET)")),
        };
    }
    let fd = i32::try_from(fd).map_err(|_| io_err("bpf(BPF_OBJ_GET)"))?;
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    let link = unsafe { OwnedFd::from_raw_fd(fd) };
    // BPF_LINK_DETACH reads `link_fd`, a u32 in the first 4 bytes (little endian here).
    let mut attr = [0u64; 16];
    attr[0] = u64::from(link.as_raw_fd().unsigned_abs());
    // SAFETY: as above.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            attr.as_ptr(),
            size_of_val(&attr),
        )
    };
    if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::ENOLINK) {
        return Err(io_err("bpf(BPF_LINK_DETACH)"));
    }
    Ok(())
}
