//! Every map of the datapath, declared once: its name (the C name and the pin name), kind,
//! key and value types, capacity, whether and when the realizer writes it, and how `status`
//! and the metrics count it.
//!
//! Pinning and the pinned-map check (`sluice-datapath`), the realizer's write order,
//! `status`, `verify` and the metrics all walk [`MAPS`]; a test in `sluice-datapath` compares
//! it with the map definitions of the compiled object, so adding a map is one declaration in
//! `bpf/lib/maps.h` and one here.

use aya::maps::MapType;

use crate::{
    Ct4Entry, Ct4Key, CtConfig, CtStats, EndpointInfo, EventConfig, EventCounter, Flow4Slot,
    Flow4Stats, Frag4Key, Frag4Ports, HostRoute4, IpcacheEntry, IpcacheKey, Lb4Affinity,
    Lb4AffinityKey, Lb4Backend, Lb4BackendKey, Lb4Key, Lb4RevnatSk, Lb4RevnatSkKey, Lb4Service,
    Lb4SourceRangeKey, MetricsValue, NodeConfig,
};

/// A map of the datapath, by its place in [`MAPS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapId {
    Services,
    Backends,
    Conntrack,
    Endpoints,
    Metrics,
    Ipcache,
    Policy,
    Fragments,
    Events,
    EventConfig,
    EventBucket,
    EventCounters,
    NodeConfig,
    RevNatSockets,
    SourceRanges,
    CtConfig,
    Affinity,
    Maglev,
    NonMasqCidrs,
    CtStats,
    FlowCache,
    FlowGeneration,
    FlowStats,
    FlowNotes,
    HostRoutes,
}

/// An agent setting that sizes maps when they are created (a reused pin keeps its size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CapacitySetting {
    /// `--ct-max-entries`: the conntrack table.
    Conntrack,
    /// `--lb-map-max`: the service and backend maps.
    LoadBalancer,
}

impl CapacitySetting {
    /// The agent's command-line flag.
    pub const fn flag(self) -> &'static str {
        match self {
            CapacitySetting::Conntrack => "--ct-max-entries",
            CapacitySetting::LoadBalancer => "--lb-map-max",
        }
    }
}

/// How `status` and the metrics report a map's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Count {
    /// Entries, counted by iterating the keys.
    Entries,
    /// A map of maps: one key per endpoint with an inner map, counted by iterating the keys.
    Endpoints,
    /// Not reported: a ring buffer has no entries, and an array always holds max_entries.
    Uncounted,
}

impl Count {
    pub const fn is_counted(self) -> bool {
        !matches!(self, Count::Uncounted)
    }
}

/// One map as the C object declares it and as user space handles it.
#[derive(Clone, Copy, Debug)]
pub struct MapDef {
    pub id: MapId,
    /// The name in `bpf/lib/maps.h`, which is also the pin name.
    pub name: &'static str,
    pub kind: MapType,
    /// The Rust mirror of the key and of the value (`u32` for an ifindex, an index or, as
    /// the value of a map of maps, the inner map's id).
    pub key_type: &'static str,
    pub value_type: &'static str,
    pub key_size: usize,
    pub value_size: usize,
    /// max_entries as compiled (for the ring buffer: its size in bytes).
    pub max_entries: u32,
    /// The setting that overrides max_entries at creation, if any.
    pub capacity: Option<CapacitySetting>,
    /// When the realizer writes it: lower first for upserts, the reverse for removals.
    /// None for runtime state (conntrack, fragments, counters, events), never realized.
    pub realize_order: Option<u8>,
    pub count: Count,
}

impl MapId {
    pub const fn def(self) -> &'static MapDef {
        &MAPS[self as usize]
    }

    pub const fn name(self) -> &'static str {
        self.def().name
    }
}

/// `struct event_bucket` in bpf/lib/maps.h: tokens and the last refill time. Only the
/// datapath reads it, so it has no Rust mirror.
pub const EVENT_BUCKET_SIZE: usize = 2 * size_of::<u64>();

/// `struct flow_note` in bpf/lib/maps.h: one packet's tuple and what the slow path learnt
/// about it (the `Flow4Key`, four flag bytes, an ifindex, two MACs, a next hop and a
/// tunnel). Only the datapath reads it, so it has no Rust mirror.
pub const FLOW_NOTE_SIZE: usize =
    size_of::<crate::Flow4Key>() + 4 + size_of::<u32>() + 12 + 2 * size_of::<u32>();

macro_rules! map {
    ($id:ident, $name:literal, $kind:ident, $key:ty => $value:ty, $max:expr,
     capacity: $capacity:expr, realize: $realize:expr, count: $count:ident) => {
        map!(@def $id, $name, $kind, stringify!($key), size_of::<$key>(),
             stringify!($value), size_of::<$value>(), $max, $capacity, $realize, $count)
    };
    (@def $id:ident, $name:literal, $kind:ident, $key_type:expr, $key_size:expr,
     $value_type:expr, $value_size:expr, $max:expr, $capacity:expr, $realize:expr,
     $count:ident) => {
        MapDef {
            id: MapId::$id,
            name: $name,
            kind: MapType::$kind,
            key_type: $key_type,
            value_type: $value_type,
            key_size: $key_size,
            value_size: $value_size,
            max_entries: $max,
            capacity: $capacity,
            realize_order: $realize,
            count: Count::$count,
        }
    };
}

/// Capacity of the endpoint and policy maps: endpoints per node.
const ENDPOINTS_MAX: u32 = 4096;

/// Every map, in [`MapId`] order. The realize order puts identities in the ipcache before
/// the policy rows that name them, a policy map before the endpoint flags that enforce it,
/// backends before the service slots that name them, source ranges before the frontend
/// flag that restricts to them, and Maglev tables before the frontends that use them.
pub const MAPS: [MapDef; 25] = [
    map!(Services, "lb4_services", Hash, Lb4Key => Lb4Service, 1 << 20,
         capacity: Some(CapacitySetting::LoadBalancer), realize: Some(6), count: Entries),
    map!(Backends, "lb4_backends", Hash, Lb4BackendKey => Lb4Backend, 1 << 20,
         capacity: Some(CapacitySetting::LoadBalancer), realize: Some(3), count: Entries),
    map!(Conntrack, "ct4", LruHash, Ct4Key => Ct4Entry, 65536,
         capacity: Some(CapacitySetting::Conntrack), realize: None, count: Entries),
    map!(Endpoints, "endpoints", Hash, u32 => EndpointInfo, ENDPOINTS_MAX,
         capacity: None, realize: Some(2), count: Entries),
    map!(Metrics, "metrics", PerCpuArray, u32 => MetricsValue, crate::METRICS_MAX,
         capacity: None, realize: None, count: Uncounted),
    map!(Ipcache, "ipcache", LpmTrie, IpcacheKey => IpcacheEntry, 1 << 19,
         capacity: None, realize: Some(0), count: Entries),
    // Each endpoint's inner map is created by user space with `--policy-map-max` rows.
    map!(Policy, "policy", HashOfMaps, u32 => u32, ENDPOINTS_MAX,
         capacity: None, realize: Some(1), count: Endpoints),
    map!(Fragments, "frag4", LruHash, Frag4Key => Frag4Ports, 8192,
         capacity: None, realize: None, count: Entries),
    // A ring buffer has neither keys nor values; max_entries is its size in bytes.
    map!(@def Events, "events", RingBuf, "", 0, "", 0, 1 << 20, None, None, Uncounted),
    map!(EventConfig, "event_config", Array, u32 => EventConfig, 1,
         capacity: None, realize: None, count: Uncounted),
    map!(@def EventBucket, "event_bucket", PerCpuArray, "u32", size_of::<u32>(),
         "struct event_bucket", EVENT_BUCKET_SIZE, 1, None, None, Uncounted),
    map!(EventCounters, "event_counters", PerCpuArray, u32 => EventCounter,
         crate::EVENT_COUNTERS_MAX, capacity: None, realize: None, count: Uncounted),
    // Written once by the agent at start, from its routing flags.
    map!(NodeConfig, "node_config", Array, u32 => NodeConfig, 1,
         capacity: None, realize: None, count: Uncounted),
    // Runtime state of the socket programs (bpf/sock.c), written by them only.
    map!(RevNatSockets, "lb4_reverse_nat_sk", LruHash, Lb4RevnatSkKey => Lb4RevnatSk, 65536,
         capacity: None, realize: None, count: Entries),
    map!(SourceRanges, "lb4_source_ranges", LpmTrie, Lb4SourceRangeKey => u32, 65536,
         capacity: None, realize: Some(4), count: Entries),
    // Written by the datapath's loader from the agent's conntrack timeout flags.
    map!(CtConfig, "ct_config", Array, u32 => CtConfig, 1,
         capacity: None, realize: None, count: Uncounted),
    // sessionAffinity ClientIP: runtime state, written by the datapath.
    map!(Affinity, "lb4_affinity", LruHash, Lb4AffinityKey => Lb4Affinity, 65536,
         capacity: None, realize: None, count: Entries),
    // Frontend -> its Maglev table, an array user space creates with M / 4 elements.
    // Written after the backends and before the frontends that use them.
    map!(Maglev, "lb4_maglev", HashOfMaps, Lb4Key => u32, 8192,
         capacity: None, realize: Some(5), count: Entries),
    // nonMasqueradeCIDRs: written by the agent at start from its masquerade flags.
    map!(NonMasqCidrs, "non_masq_cidrs", LpmTrie, IpcacheKey => u32, 1024,
         capacity: None, realize: None, count: Uncounted),
    // Conntrack counters the datapath keeps per CPU (lost service entries).
    map!(CtStats, "ct_stats", PerCpuArray, u32 => CtStats, 1,
         capacity: None, realize: None, count: Uncounted),
    // The flow cache (bpf/lib/flow_cache.h): established flows' decisions, datapath
    // state. A cache, not reported: its hits are in flow4_stats.
    map!(FlowCache, "flow4", Array, u32 => Flow4Slot, 65536,
         capacity: None, realize: None, count: Uncounted),
    // Bumped by the realizer after every pass that changed a map (index 0).
    map!(FlowGeneration, "flow4_generation", Array, u32 => u32, 1,
         capacity: None, realize: None, count: Uncounted),
    // What the flow cache did, per CPU (index 0).
    map!(FlowStats, "flow4_stats", PerCpuArray, u32 => Flow4Stats, 1,
         capacity: None, realize: None, count: Uncounted),
    // The packet from_container is deciding, per CPU: datapath scratch.
    map!(@def FlowNotes, "flow4_notes", PerCpuArray, "u32", size_of::<u32>(),
         "struct flow_note", FLOW_NOTE_SIZE, 1, None, None, Uncounted),
    // Host routing's routes to local pods (bpf/lib/host_routing.h): datapath state, a
    // cache like flow4.
    map!(HostRoutes, "host_route4", Array, u32 => HostRoute4, 4096,
         capacity: None, realize: None, count: Uncounted),
];

const _: () = {
    let mut i = 0;
    while i < MAPS.len() {
        assert!(MAPS[i].id as usize == i, "MAPS is in MapId order");
        i += 1;
    }
};

/// The maps the realizer writes, in upsert order (removals go the other way round).
pub fn realized() -> impl DoubleEndedIterator<Item = &'static MapDef> {
    let mut defs: Vec<&MapDef> = MAPS.iter().filter(|d| d.realize_order.is_some()).collect();
    defs.sort_by_key(|d| d.realize_order);
    defs.into_iter()
}

/// The maps `status` and the metrics report, in [`MapId`] order.
pub fn counted() -> impl Iterator<Item = &'static MapDef> {
    MAPS.iter().filter(|d| d.count.is_counted())
}

/// Names of the maps as declared in the C object; also the names they are pinned under.
pub mod names {
    use super::MapId;

    pub const SERVICES: &str = MapId::Services.name();
    pub const BACKENDS: &str = MapId::Backends.name();
    pub const CONNTRACK: &str = MapId::Conntrack.name();
    pub const ENDPOINTS: &str = MapId::Endpoints.name();
    pub const METRICS: &str = MapId::Metrics.name();
    pub const IPCACHE: &str = MapId::Ipcache.name();
    /// The hash of maps from endpoint ifindex to that endpoint's policy LPM trie.
    pub const POLICY: &str = MapId::Policy.name();
    pub const FRAGMENTS: &str = MapId::Fragments.name();
    /// The ring buffer of flow events.
    pub const EVENTS: &str = MapId::Events.name();
    pub const EVENT_CONFIG: &str = MapId::EventConfig.name();
    pub const EVENT_BUCKET: &str = MapId::EventBucket.name();
    pub const EVENT_COUNTERS: &str = MapId::EventCounters.name();
    /// How this node reaches the others.
    pub const NODE_CONFIG: &str = MapId::NodeConfig.name();
    /// The frontend each of the node's sockets asked for (socket load balancing).
    pub const REVNAT_SOCKETS: &str = MapId::RevNatSockets.name();
    /// The sources each load balancer frontend with loadBalancerSourceRanges admits.
    pub const SOURCE_RANGES: &str = MapId::SourceRanges.name();
    /// Conntrack lifetimes by connection state.
    pub const CT_CONFIG: &str = MapId::CtConfig.name();
    /// sessionAffinity ClientIP: the backend of each client of a frontend.
    pub const AFFINITY: &str = MapId::Affinity.name();
    /// The hash of maps from frontend to its Maglev table.
    pub const MAGLEV: &str = MapId::Maglev.name();
    /// The prefixes pod traffic keeps its address to (nonMasqueradeCIDRs).
    pub const NON_MASQ_CIDRS: &str = MapId::NonMasqCidrs.name();
    /// Conntrack counters of the datapath.
    pub const CT_STATS: &str = MapId::CtStats.name();
    /// Established flows' decisions (the flow cache).
    pub const FLOW_CACHE: &str = MapId::FlowCache.name();
    /// The realizer's generation the flow cache's decisions are stamped with.
    pub const FLOW_GENERATION: &str = MapId::FlowGeneration.name();
    /// What the flow cache did, per CPU.
    pub const FLOW_STATS: &str = MapId::FlowStats.name();
    /// The packet from_container is deciding (datapath scratch).
    pub const FLOW_NOTES: &str = MapId::FlowNotes.name();
    /// Host routing's routes to local pods (datapath state).
    pub const HOST_ROUTES: &str = MapId::HostRoutes.name();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realize_order_is_todays() {
        let order: Vec<_> = realized().map(|d| d.id).collect();
        assert_eq!(
            order,
            [
                MapId::Ipcache,
                MapId::Policy,
                MapId::Endpoints,
                MapId::Backends,
                MapId::SourceRanges,
                MapId::Maglev,
                MapId::Services
            ]
        );
    }

    #[test]
    fn names_are_unique_and_status_counts_the_tables() {
        let mut names: Vec<_> = MAPS.iter().map(|d| d.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), MAPS.len());
        let counted: Vec<_> = counted().map(|d| d.name).collect();
        assert_eq!(
            counted,
            [
                names::SERVICES,
                names::BACKENDS,
                names::CONNTRACK,
                names::ENDPOINTS,
                names::IPCACHE,
                names::POLICY,
                names::FRAGMENTS,
                names::REVNAT_SOCKETS,
                names::SOURCE_RANGES,
                names::AFFINITY,
                names::MAGLEV,
            ]
        );
    }
}
