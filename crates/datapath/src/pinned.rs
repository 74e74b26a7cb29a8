//! The pinned maps, opened from bpffs without loading any program.

use std::{
    fs, io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::maps::{
    Array, HashMap, HashOfMaps, LpmTrie, Map, MapData, MapError, MapType, PerCpuArray, RingBuf,
};
use sluice_common::{
    Ct4Entry, Ct4Key, CtConfig, CtStats, EndpointInfo, EventConfig, EventCounter, Flow4Stats,
    Frag4Key, Frag4Ports, IpcacheEntry, LB4_MAGLEV_SLOTS_PER_ENTRY, Lb4Affinity, Lb4AffinityKey,
    Lb4Backend, Lb4BackendKey, Lb4Key, Lb4RevnatSk, Lb4RevnatSkKey, Lb4Service, Lb4SourceRange,
    MAPS, MaglevLanes, MapDef, MapId, MetricsValue, NodeConfig, PolicyEntry, PolicyMatch,
    metrics_index, names,
};

/// The datapath's conntrack counters in `map` (the pinned `ct_stats`), summed over CPUs.
pub fn read_ct_stats(map: &PerCpuArray<MapData, CtStats>) -> Result<CtStats, DatapathError> {
    let per_cpu = map.get(&0, 0).map_err(|source| DatapathError::MapRead {
        map: MapId::CtStats.name(),
        source,
    })?;
    Ok(per_cpu.iter().fold(CtStats::default(), |sum, v| CtStats {
        created: sum.created + v.created,
        service_lost: sum.service_lost + v.service_lost,
    }))
}

/// The flow cache's counters in `map` (the pinned `flow4_stats`), summed over CPUs.
pub fn read_flow_stats(
    map: &PerCpuArray<MapData, Flow4Stats>,
) -> Result<Flow4Stats, DatapathError> {
    let per_cpu = map.get(&0, 0).map_err(|source| DatapathError::MapRead {
        map: MapId::FlowStats.name(),
        source,
    })?;
    Ok(per_cpu
        .iter()
        .fold(Flow4Stats::default(), |sum, v| Flow4Stats {
            hits: sum.hits + v.hits,
            decided: sum.decided + v.decided,
        }))
}

/// Moves the flow cache to a new generation (`map` is the pinned `flow4_generation`), so
/// every established flow is decided again by the slow path against the maps as they are
/// now. Returns the new generation. Whoever changes what the slow path decides from
/// (services, backends, endpoints, the ipcache) calls it after the change.
pub fn bump_flow_generation(map: &mut Array<MapData, u32>) -> Result<u32, DatapathError> {
    let name = MapId::FlowGeneration.name();
    let current = map
        .get(&0, 0)
        .map_err(|source| DatapathError::MapRead { map: name, source })?;
    let next = current.wrapping_add(1);
    map.set(0, next, 0)
        .map_err(|source| DatapathError::MapWrite { map: name, source })?;
    Ok(next)
}

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

/// One frontend's Maglev table: element i holds positions 4i..4i+3 (backend slots).
pub type MaglevTable = Array<MapData, MaglevLanes>;

/// `BPF_F_INNER_MAP`: the table's max_entries may differ from the template's.
const BPF_F_INNER_MAP: u32 = 1 << 12;

/// Creates an unpinned Maglev table holding `positions` (M) slots, all 0 (no backend: the
/// datapath falls back to the flow's slot hash). It is filled and then swapped into [`PinnedMaps::maglev`] in
/// one update, so a frontend never sees a partial table.
pub fn create_maglev_table(positions: usize) -> Result<MaglevTable, DatapathError> {
    let entries = positions.div_ceil(LB4_MAGLEV_SLOTS_PER_ENTRY).max(1);
    let entries = u32::try_from(entries).unwrap_or(u32::MAX);
    MaglevTable::create(entries, BPF_F_INNER_MAP).map_err(|source| DatapathError::MapCreate {
        map: names::MAGLEV,
        source,
    })
}

use crate::{DatapathError, sys};

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
    /// How this node reaches the others (index 0).
    pub node_config: Array<MapData, NodeConfig>,
    /// The frontend each socket of the node asked for, by socket cookie and backend.
    pub revnat_sockets: HashMap<MapData, Lb4RevnatSkKey, Lb4RevnatSk>,
    /// Load balancer frontend and source prefix -> admitted (loadBalancerSourceRanges).
    pub source_ranges: LpmTrie<MapData, Lb4SourceRange, u32>,
    /// Conntrack lifetimes by connection state (index 0).
    pub ct_config: Array<MapData, CtConfig>,
    /// sessionAffinity ClientIP: each client's backend per frontend.
    pub affinity: HashMap<MapData, Lb4AffinityKey, Lb4Affinity>,
    /// Frontend -> its [`MaglevTable`].
    pub maglev: HashOfMaps<MapData, Lb4Key, MaglevTable>,
    /// nonMasqueradeCIDRs: prefix (aya's LPM key around the network-order address) ->
    /// exempt from masquerading.
    pub non_masq_cidrs: LpmTrie<MapData, u32, u32>,
    /// Conntrack counters per CPU (index 0).
    pub ct_stats: PerCpuArray<MapData, CtStats>,
    /// The generation of the flow cache's decisions (index 0).
    pub flow_generation: Array<MapData, u32>,
    /// The flow cache's counters per CPU (index 0).
    pub flow_stats: PerCpuArray<MapData, Flow4Stats>,
    /// Every map of the registry, for capacities and entry counts.
    pub inventory: MapInventory,
}

impl std::fmt::Debug for PinnedMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedMaps").finish_non_exhaustive()
    }
}

impl PinnedMaps {
    /// What the `metrics` map counted for `reason` (a `DROP_*` code, or 0 for forwarded) in
    /// `direction`, summed over CPUs.
    pub fn counted(&self, reason: u8, direction: u32) -> Result<MetricsValue, DatapathError> {
        let per_cpu = self
            .metrics
            .get(&metrics_index(reason, direction), 0)
            .map_err(|source| DatapathError::MapRead {
                map: MapId::Metrics.name(),
                source,
            })?;
        Ok(per_cpu
            .iter()
            .fold(MetricsValue::default(), |sum, v| MetricsValue {
                packets: sum.packets + v.packets,
                bytes: sum.bytes + v.bytes,
            }))
    }

    /// The datapath's conntrack counters, summed over CPUs.
    pub fn ct_stats(&self) -> Result<CtStats, DatapathError> {
        read_ct_stats(&self.ct_stats)
    }

    /// The flow cache's counters, summed over CPUs.
    pub fn flow_stats(&self) -> Result<Flow4Stats, DatapathError> {
        read_flow_stats(&self.flow_stats)
    }

    /// See [`bump_flow_generation`].
    pub fn bump_flow_generation(&mut self) -> Result<u32, DatapathError> {
        bump_flow_generation(&mut self.flow_generation)
    }

    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self {
            services: open_typed(pin_dir, MapId::Services, HashMap::try_from)?,
            backends: open_typed(pin_dir, MapId::Backends, HashMap::try_from)?,
            conntrack: open_typed(pin_dir, MapId::Conntrack, HashMap::try_from)?,
            endpoints: open_typed(pin_dir, MapId::Endpoints, HashMap::try_from)?,
            metrics: open_typed(pin_dir, MapId::Metrics, PerCpuArray::try_from)?,
            ipcache: open_typed(pin_dir, MapId::Ipcache, LpmTrie::try_from)?,
            policy: open_typed(pin_dir, MapId::Policy, HashOfMaps::try_from)?,
            fragments: open_typed(pin_dir, MapId::Fragments, HashMap::try_from)?,
            event_config: open_typed(pin_dir, MapId::EventConfig, Array::try_from)?,
            event_counters: open_typed(pin_dir, MapId::EventCounters, PerCpuArray::try_from)?,
            node_config: open_typed(pin_dir, MapId::NodeConfig, Array::try_from)?,
            revnat_sockets: open_typed(pin_dir, MapId::RevNatSockets, HashMap::try_from)?,
            source_ranges: open_typed(pin_dir, MapId::SourceRanges, LpmTrie::try_from)?,
            ct_config: open_typed(pin_dir, MapId::CtConfig, Array::try_from)?,
            affinity: open_typed(pin_dir, MapId::Affinity, HashMap::try_from)?,
            maglev: open_typed(pin_dir, MapId::Maglev, HashOfMaps::try_from)?,
            non_masq_cidrs: open_typed(pin_dir, MapId::NonMasqCidrs, LpmTrie::try_from)?,
            ct_stats: open_typed(pin_dir, MapId::CtStats, PerCpuArray::try_from)?,
            flow_generation: open_typed(pin_dir, MapId::FlowGeneration, Array::try_from)?,
            flow_stats: open_typed(pin_dir, MapId::FlowStats, PerCpuArray::try_from)?,
            inventory: MapInventory::open(pin_dir)?,
        })
    }

    /// `(name, max_entries)` of each map in registry order, read from the kernel at open.
    pub fn capacities(&self) -> Vec<(&'static str, u32)> {
        self.inventory.capacities()
    }
}

/// Every pinned map of the registry with its capacity, read from the kernel's map info at
/// open, and a handle to count its entries whatever its key type.
pub struct MapInventory {
    maps: Vec<InventoryEntry>,
}

struct InventoryEntry {
    def: &'static MapDef,
    max_entries: u32,
    data: MapData,
}

impl std::fmt::Debug for MapInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.maps.iter().map(|m| (m.def.name, m.max_entries)))
            .finish()
    }
}

impl MapInventory {
    /// Opens every map of the registry pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let mut maps = Vec::with_capacity(MAPS.len());
        for def in &MAPS {
            let data = open_pinned(pin_dir, def)?;
            let max_entries = data
                .info()
                .map_err(|source| DatapathError::MapInfo {
                    map: def.name,
                    source,
                })?
                .max_entries();
            maps.push(InventoryEntry {
                def,
                max_entries,
                data,
            });
        }
        Ok(Self { maps })
    }

    fn entry(&self, id: MapId) -> Option<&InventoryEntry> {
        self.maps.get(id as usize)
    }

    /// max_entries of the map (for the ring buffer: its size in bytes).
    pub fn capacity(&self, id: MapId) -> u32 {
        self.entry(id).map_or(0, |m| m.max_entries)
    }

    /// How many entries the map holds now, counted as the registry says (see
    /// `sluice_common::Count`); 0 for a map the registry does not count.
    pub fn entries(&self, id: MapId) -> Result<u64, DatapathError> {
        let Some(map) = self.entry(id).filter(|m| m.def.count.is_counted()) else {
            return Ok(0);
        };
        let fd = map.data.fd().as_fd();
        let def = map.def;
        match def.kind {
            // Batched: status stays quick with a million service entries.
            MapType::Hash | MapType::LruHash | MapType::HashOfMaps => {
                sys::hash_count_entries(fd, def.key_size, def.value_size)
            }
            _ => sys::map_count_keys(fd, def.key_size),
        }
        .map_err(|err| DatapathError::Sys {
            map: def.name,
            source: err,
        })
    }

    /// `(name, max_entries)` of each map in registry order.
    pub fn capacities(&self) -> Vec<(&'static str, u32)> {
        self.maps
            .iter()
            .map(|m| (m.def.name, m.max_entries))
            .collect()
    }
}

/// Opens the ring buffer of flow events for reading (one reader at a time: reading
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

/// Opens the map pinned for `def`.
fn open_pinned(pin_dir: &Path, def: &MapDef) -> Result<MapData, DatapathError> {
    let path = pin_dir.join(def.name);
    MapData::from_pin(&path).map_err(|source| DatapathError::Map {
        map: def.name,
        path,
        source,
    })
}

/// Opens the map pinned for `id` as its typed handle.
fn open_typed<T>(
    pin_dir: &Path,
    id: MapId,
    convert: impl FnOnce(Map) -> Result<T, MapError>,
) -> Result<T, DatapathError> {
    let data = open_pinned(pin_dir, id.def())?;
    Map::from_map_data(data)
        .and_then(convert)
        .map_err(|source| DatapathError::Map {
            map: id.name(),
            path: pin_dir.join(id.name()),
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
    /// ([`crate::Datapath::load`] creates it). First removes the pin directories of
    /// `prefix` that killed runs left ([`sluice_netns::orphans`]).
    pub fn unique(prefix: &str) -> Self {
        let bpffs = Path::new("/sys/fs/bpf");
        for orphan in sluice_netns::orphans(bpffs, prefix) {
            if let Err(err) = remove_pins(&bpffs.join(&orphan)) {
                eprintln!("cleanup of a killed run's {orphan}: {err}");
            }
        }
        Self(bpffs.join(sluice_netns::unique_name(prefix)))
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
