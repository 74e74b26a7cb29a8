//! The pinned maps, opened from bpffs without loading any program.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::{Array, HashMap, HashOfMaps, LpmTrie, Map, MapData, PerCpuArray, RingBuf};
use sluice_common::{
    Ct4Entry, Ct4Key, EndpointInfo, EventConfig, EventCounter, Frag4Key, Frag4Ports, IpcacheEntry,
    Lb4Backend, Lb4BackendKey, Lb4Key, Lb4Service, MetricsValue, PolicyEntry, PolicyMatch, names,
};

/// One endpoint's policy: an LPM trie of allow rows.
pub type PolicyMap = LpmTrie<MapData, PolicyMatch, PolicyEntry>;

/// `BPF_F_NO_PREALLOC`, which the kernel requires of LPM tries.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Creates an empty, unpinned policy map for one endpoint, holding up to `capacity` rows.
/// It is filled and then swapped into [`PinnedMaps::policy`] in one update, so the
/// endpoint never sees a partial policy.
pub fn create_policy_map(capacity: u32) -> Result<PolicyMap, DatapathError> {
    PolicyMap::create(capacity, BPF_F_NO_PREALLOC).map_err(|source| DatapathError::MapCreate {
        map: names::POLICY,
        source,
    })
}

use crate::DatapathError;

/// Typed handles on the pinned maps, opened from bpffs with no programs loaded
/// (realizer, CLI, tests).
pub struct PinnedMaps {
    pub services: HashMap<MapData, Lb4Key, Lb4Service>,
    pub backends: HashMap<MapData, Lb4BackendKey, Lb4Backend>,
    pub conntrack: HashMap<MapData, Ct4Key, Ct4Entry>,
    pub endpoints: HashMap<MapData, u32, EndpointInfo>,
    pub metrics: PerCpuArray<MapData, MetricsValue>,
    /// Address prefix (aya's LPM key around the network-order address) -> identity.
    pub ipcache: LpmTrie<MapData, u32, IpcacheEntry>,
    /// ifindex -> that endpoint's [`PolicyMap`].
    pub policy: HashOfMaps<MapData, u32, PolicyMap>,
    pub fragments: HashMap<MapData, Frag4Key, Frag4Ports>,
    /// Which flow events to emit and their rate limit (index 0).
    pub event_config: Array<MapData, EventConfig>,
    /// Emitted, suppressed and lost events per CPU, at `event_counter_index(type, dir)`.
    pub event_counters: PerCpuArray<MapData, EventCounter>,
    capacities: Vec<(&'static str, u32)>,
}

impl std::fmt::Debug for PinnedMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedMaps").finish_non_exhaustive()
    }
}

impl PinnedMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let mut capacities = Vec::new();
        let mut open = |name| open_pinned(pin_dir, name, &mut capacities);
        let services = open(names::SERVICES)?;
        let backends = open(names::BACKENDS)?;
        let conntrack = open(names::CONNTRACK)?;
        let endpoints = open(names::ENDPOINTS)?;
        let metrics = open(names::METRICS)?;
        let ipcache = open(names::IPCACHE)?;
        let policy = open(names::POLICY)?;
        let fragments = open(names::FRAGMENTS)?;
        // The ring and the bucket are opened for their capacities only (the ring's
        // max_entries is its size in bytes); the observer reads the ring (open_events).
        open(names::EVENTS)?;
        let event_config = open(names::EVENT_CONFIG)?;
        open(names::EVENT_BUCKET)?;
        let event_counters = open(names::EVENT_COUNTERS)?;
        Ok(Self {
            services: typed(pin_dir, names::SERVICES, services, HashMap::try_from)?,
            backends: typed(pin_dir, names::BACKENDS, backends, HashMap::try_from)?,
            conntrack: typed(pin_dir, names::CONNTRACK, conntrack, HashMap::try_from)?,
            endpoints: typed(pin_dir, names::ENDPOINTS, endpoints, HashMap::try_from)?,
            metrics: typed(pin_dir, names::METRICS, metrics, PerCpuArray::try_from)?,
            ipcache: typed(pin_dir, names::IPCACHE, ipcache, LpmTrie::try_from)?,
            policy: typed(pin_dir, names::POLICY, policy, HashOfMaps::try_from)?,
            fragments: typed(pin_dir, names::FRAGMENTS, fragments, HashMap::try_from)?,
            event_config: typed(pin_dir, names::EVENT_CONFIG, event_config, Array::try_from)?,
            event_counters: typed(
                pin_dir,
                names::EVENT_COUNTERS,
                event_counters,
                PerCpuArray::try_from,
            )?,
            capacities,
        })
    }

    /// `(name, max_entries)` of each map, read from the kernel's map info at open.
    pub fn capacities(&self) -> &[(&'static str, u32)] {
        &self.capacities
    }
}

/// Opens the pinned ring buffer of flow events for reading (one reader at a time: reading
/// moves the consumer position every opener shares). It implements `AsRawFd`, so it can
/// be polled, e.g. with tokio's `AsyncFd`.
pub fn open_events(pin_dir: &Path) -> Result<RingBuf<MapData>, DatapathError> {
    let path = pin_dir.join(names::EVENTS);
    let map_err = |source| DatapathError::Map {
        map: names::EVENTS,
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let map = Map::from_map_data(data).map_err(map_err)?;
    RingBuf::try_from(map).map_err(map_err)
}

/// Opens the map pinned as `name` and records its capacity.
fn open_pinned(
    pin_dir: &Path,
    name: &'static str,
    capacities: &mut Vec<(&'static str, u32)>,
) -> Result<Map, DatapathError> {
    let path = pin_dir.join(name);
    let map_err = |source| DatapathError::Map {
        map: name,
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let info = data
        .info()
        .map_err(|source| DatapathError::MapInfo { map: name, source })?;
    capacities.push((name, info.max_entries()));
    Map::from_map_data(data).map_err(map_err)
}

fn typed<T>(
    pin_dir: &Path,
    name: &'static str,
    map: Map,
    convert: impl FnOnce(Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, DatapathError> {
    convert(map).map_err(|source| DatapathError::Map {
        map: name,
        path: pin_dir.join(name),
        source,
    })
}

/// A fresh pin directory on bpffs, removed with everything pinned under it (links
/// included, which detaches their programs) when dropped: for tests and benchmarks that
/// load a datapath of their own.
#[derive(Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    /// `/sys/fs/bpf/<prefix><pid>-<n>`, unique to this process and call; not created yet
    /// ([`crate::Datapath::load`] creates it).
    pub fn unique(prefix: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Self(Path::new("/sys/fs/bpf").join(format!("{prefix}{}-{n}", std::process::id())))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Drop has no caller to report to; say it where a test or benchmark log shows it.
        if let Err(err) = remove_pins(&self.0) {
            eprintln!("removing pins at {}: {err}", self.0.display());
        }
    }
}

/// Removes `<pin_dir>` and everything pinned under it. Unpinning the links detaches
/// the programs; maps go away once no program or process holds them.
pub fn remove_pins(pin_dir: &Path) -> Result<(), DatapathError> {
    match fs::remove_dir_all(pin_dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Io {
            call: "rm -r",
            path: pin_dir.into(),
            source,
        }),
    }
}
