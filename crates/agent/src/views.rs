//! What the API reads: the state the reconcile loop published after its last step, and
//! map handles of the API's own, so no request waits for a pass and no pass waits for a
//! request. Views that walk kernel maps (conntrack holds up to 65k entries) run on the
//! blocking pool; views of the compiled state are a few lookups.

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::Deref,
    path::Path,
    sync::Arc,
};

use arc_swap::ArcSwap;
use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray};
use sluice_api::{
    AgentStatus, BackendEntry, CtEntry, CtPressure, EndpointEntry, EndpointPolicyView, FailsClosed,
    IdentityEntry, MapStatus, PolicyRow, ServiceEntry, UnsupportedField, VerifyReport,
};
use sluice_common::{
    Ct4Entry, Ct4Key, CtConfig, CtStats, EndpointInfo, EventCounter, IDENTITY_ANY, IpcacheEntry,
    LB4_SCOPE_DEFAULT, Lb4Backend, Lb4BackendKey, Lb4Key, Lb4Service, MapId, SVC_FLAG_AFFINITY,
    kinds::{
        BackendState, CountedBy, CtFlag, CtScope, Direction, EndpointStatus, FrontendKind,
        LbAlgorithm, Protocol, RowState, ServiceKind,
    },
    names, registry,
};
use sluice_compiler::DesiredState;
use sluice_datapath::{MapInventory, PinnedMaps, read_ct_stats};
use sluice_realizer::{KernelPolicy, PolicyTable};
use sluice_store::Snapshot;
use tokio::sync::{mpsc, oneshot};

use crate::{
    AgentError,
    metrics::{Metrics, Removal},
    reconcile::Request,
};

mod explain;

/// The reconcile loop's state as of its last step, replaced whole (never edited) so a
/// reader holds a consistent copy for as long as it likes.
#[derive(Debug)]
pub struct Published {
    pub name: String,
    /// Rows each endpoint's policy map holds.
    pub policy_map_max: u32,
    /// The routing mode and its devices, for `status`.
    pub routing: sluice_api::RoutingStatus,
    /// The newest snapshot accepted from the source.
    pub snapshot: Arc<Snapshot>,
    /// The CNI plugin's endpoints, compiled beside `snapshot`.
    pub endpoints: crate::cni::LocalEndpoints,
    /// The last compiled state.
    pub desired: Arc<DesiredState>,
    /// The agent's number for `snapshot` and `endpoints`.
    pub desired_generation: u64,
    pub realized_generation: u64,
    /// The source's revision of the realized generation.
    pub realized_revision: u64,
    pub reconciles: u64,
    pub last_error: Option<String>,
    /// The realized maps' entry counts as the loop last established them (see `status`).
    pub counted: Vec<(MapId, sluice_realizer::Counted)>,
}

/// The API's own handles on the pinned maps.
pub struct ApiMaps {
    tables: ApiTables,
    conntrack: HashMap<MapData, Ct4Key, Ct4Entry>,
    /// The conntrack lifetimes the datapath and the GC expire entries by.
    ct_config: Array<MapData, CtConfig>,
    /// The datapath's conntrack counters.
    ct_stats: PerCpuArray<MapData, CtStats>,
    /// Every map of the registry, for the sizes `status` reports.
    inventory: MapInventory,
    /// Emitted, suppressed and lost events, for the events `status` says were lost.
    event_counters: PerCpuArray<MapData, EventCounter>,
}

impl ApiMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, AgentError> {
        let maps = PinnedMaps::open(pin_dir)?;
        Ok(Self {
            tables: ApiTables {
                services: maps.services,
                backends: maps.backends,
                endpoints: maps.endpoints,
                ipcache: maps.ipcache,
                policy: KernelPolicy::open(pin_dir)?,
            },
            conntrack: maps.conntrack,
            ct_config: maps.ct_config,
            ct_stats: maps.ct_stats,
            inventory: maps.inventory,
            event_counters: maps.event_counters,
        })
    }
}

/// The realized maps the API reads: plain handles, not the realizer's tables, whose
/// digest programs (an object loaded with a parse of the kernel's BTF) only the drift
/// check runs.
struct ApiTables {
    services: HashMap<MapData, Lb4Key, Lb4Service>,
    backends: HashMap<MapData, Lb4BackendKey, Lb4Backend>,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    ipcache: LpmTrie<MapData, u32, IpcacheEntry>,
    policy: KernelPolicy,
}

/// What `status` says of the conntrack garbage collector under pressure.
#[derive(Clone, Debug)]
pub struct GcView {
    /// The agent's counters, removals by reason among them.
    pub metrics: Metrics,
    /// `--ct-pressure-threshold`.
    pub pressure_threshold: f64,
}

/// What the API server holds: every view of the agent, and the one way to ask the
/// reconcile loop for something (verify, with or without repair).
pub struct Views {
    published: Arc<ArcSwap<Published>>,
    maps: Arc<ApiMaps>,
    gc: Arc<GcView>,
    requests: mpsc::Sender<Request>,
}

impl Views {
    pub fn new(
        published: Arc<ArcSwap<Published>>,
        maps: ApiMaps,
        gc: GcView,
        requests: mpsc::Sender<Request>,
    ) -> Self {
        Self {
            published,
            maps: Arc::new(maps),
            gc: Arc::new(gc),
            requests,
        }
    }

    pub async fn status(&self) -> Result<AgentStatus, AgentError> {
        let gc = Arc::clone(&self.gc);
        self.read_kernel(move |v| v.status(&gc)).await
    }

    pub async fn services(&self) -> Result<Vec<ServiceEntry>, AgentError> {
        self.read_kernel(|v| v.services()).await
    }

    pub async fn conntrack(&self) -> Result<Vec<CtEntry>, AgentError> {
        self.read_kernel(|v| v.conntrack()).await
    }

    pub async fn policy(&self, query: String) -> Result<EndpointPolicyView, AgentError> {
        self.read_kernel(move |v| v.policy(&query)).await
    }

    /// Explains one flow from the published snapshot; reads kernel maps for the sides
    /// that are endpoints here.
    pub async fn explain(
        &self,
        request: sluice_api::explain::ExplainRequest,
    ) -> Result<sluice_api::explain::PolicyExplanation, AgentError> {
        self.read_kernel(move |v| v.explain(&request)).await
    }

    pub fn endpoints(&self) -> Vec<EndpointEntry> {
        self.view(|v| v.endpoints())
    }

    pub fn endpoint(&self, query: &str) -> Result<EndpointEntry, AgentError> {
        self.view(|v| v.endpoint(query))
    }

    pub fn identities(&self) -> Vec<IdentityEntry> {
        self.view(|v| v.identities())
    }

    pub fn identity(&self, id: u32) -> Result<IdentityEntry, AgentError> {
        self.view(|v| v.identity(id))
    }

    /// Compares the kernel with a fresh compile, and with `repair` makes it match. The
    /// reconcile loop answers it between passes, so it never reports a pass half-applied.
    pub async fn verify(&self, repair: bool) -> Result<VerifyReport, AgentError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Verify { repair, reply })
            .await
            .map_err(|_| AgentError::Stopped)?;
        answer.await.map_err(|_| AgentError::Stopped)?
    }

    fn view<T>(&self, f: impl FnOnce(&View<'_>) -> T) -> T {
        f(&View::new(self.published.load_full(), &self.maps))
    }

    /// Runs `f` on the blocking pool: it walks kernel maps.
    async fn read_kernel<T: Send + 'static>(
        &self,
        f: impl FnOnce(&View<'_>) -> Result<T, AgentError> + Send + 'static,
    ) -> Result<T, AgentError> {
        let state = self.published.load_full();
        let maps = Arc::clone(&self.maps);
        tokio::task::spawn_blocking(move || f(&View::new(state, &maps))).await?
    }
}

/// One request's view: a published state and the API's map handles.
pub struct View<'a> {
    state: Arc<Published>,
    tables: &'a ApiTables,
    conntrack: &'a HashMap<MapData, Ct4Key, Ct4Entry>,
    ct_config: &'a Array<MapData, CtConfig>,
    ct_stats: &'a PerCpuArray<MapData, CtStats>,
    inventory: &'a MapInventory,
    event_counters: &'a PerCpuArray<MapData, EventCounter>,
}

impl Deref for View<'_> {
    type Target = Published;

    fn deref(&self) -> &Published {
        &self.state
    }
}

impl<'a> View<'a> {
    fn new(state: Arc<Published>, maps: &'a ApiMaps) -> Self {
        Self {
            state,
            tables: &maps.tables,
            conntrack: &maps.conntrack,
            ct_config: &maps.ct_config,
            ct_stats: &maps.ct_stats,
            inventory: &maps.inventory,
            event_counters: &maps.event_counters,
        }
    }

    pub fn status(&self, gc: &GcView) -> Result<AgentStatus, AgentError> {
        let maps = registry::counted()
            .map(|def| self.map_status(def.id))
            .collect::<Result<Vec<_>, AgentError>>()?;
        let ct_entries = maps
            .iter()
            .find(|m| m.name == names::CONNTRACK)
            .map_or(0, |m| m.entries);
        Ok(AgentStatus {
            node: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            healthy: self.last_error.is_none(),
            desired_generation: self.desired_generation,
            realized_generation: self.realized_generation,
            desired_revision: self.snapshot.revision,
            realized_revision: self.realized_revision,
            last_error: self.last_error.clone(),
            reconciles: self.reconciles,
            endpoints: self.desired.endpoints.len(),
            maps,
            fails_closed: self.fails_closed(),
            unsupported: self.desired.unsupported().map(unsupported_field).collect(),
            routing: self.routing.clone(),
            conntrack: Some(self.ct_config()?),
            conntrack_pressure: Some(self.ct_pressure(gc, ct_entries)?),
            repaired: gc.metrics.repairs().list(),
            events_lost: crate::metrics::events_lost(self.event_counters)?,
        })
    }

    /// One map's size. A realized map (up to a million entries at 100k Services) reports
    /// the count the loop last established, so no call walks it; the runtime maps (LRU
    /// tables bounded by their capacity, not by the cluster) are counted for the call.
    fn map_status(&self, id: MapId) -> Result<MapStatus, AgentError> {
        let (entries, counted_by, counted_ago_s) = map_entries(self.inventory, &self.counted, id)?;
        Ok(MapStatus {
            name: id.name().to_string(),
            entries,
            max_entries: self.inventory.capacity(id),
            counted_by,
            counted_ago_s,
        })
    }

    /// The conntrack fill (`entries`, as `status` counted it) and what pressure cost it.
    fn ct_pressure(&self, gc: &GcView, entries: u64) -> Result<CtPressure, AgentError> {
        Ok(CtPressure {
            entries,
            max_entries: self.inventory.capacity(MapId::Conntrack),
            threshold: gc.pressure_threshold,
            removed_under_pressure: gc.metrics.ct_removed(Removal::Pressure),
            service_entries_lost: read_ct_stats(self.ct_stats)?.service_lost,
        })
    }

    /// The conntrack lifetimes as the kernel holds them.
    fn ct_config(&self) -> Result<CtConfig, AgentError> {
        self.ct_config.get(&0, 0).map_err(|source| AgentError::Map {
            map: names::CT_CONFIG,
            source,
        })
    }

    /// Endpoints whose policy does not fit their map, from the last compiled state.
    fn fails_closed(&self) -> Vec<FailsClosed> {
        fails_closed(&self.desired, self.policy_map_max)
    }

    /// Frontends and their backends as the kernel holds them, named from the desired state.
    pub fn services(&self) -> Result<Vec<ServiceEntry>, AgentError> {
        let services = self
            .tables
            .services
            .iter()
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(map_err(names::SERVICES))?;
        let backends = self
            .tables
            .backends
            .iter()
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(map_err(names::BACKENDS))?;
        let mut out = Vec::new();
        // The internal scope's slots are a Local frontend's other face, not a frontend.
        let frontends = services
            .iter()
            .filter(|(k, _)| k.slot == 0 && k.proto != 0 && k.scope == LB4_SCOPE_DEFAULT);
        for (key, frontend) in frontends {
            let known = self.desired.frontends.iter().find(|f| {
                f.address == key.vip() && f.port == key.port() && f.protocol == key.proto
            });
            let backends = (1..=frontend.count)
                .filter_map(|slot| services.get(&Lb4Key { slot, ..*key }))
                .map(|s| {
                    let bk = Lb4BackendKey::new(s.backend(), s.port(), key.proto);
                    let state = backends.get(&bk).map_or(BackendState::Missing, |b| {
                        BackendState::from_number(b.state)
                    });
                    BackendEntry {
                        address: s.backend(),
                        port: s.port(),
                        state,
                    }
                })
                .collect();
            out.push(ServiceEntry {
                service: known.map(|f| {
                    if f.port_name.is_empty() {
                        f.service.clone()
                    } else {
                        format!("{}:{}", f.service, f.port_name)
                    }
                }),
                kind: known.map_or(ServiceKind::ClusterIP, |f| f.kind),
                frontend: FrontendKind::from_flags(frontend.flags),
                address: key.vip(),
                port: key.port(),
                protocol: Protocol::from_number(key.proto),
                backends,
                algorithm: LbAlgorithm::of_frontend(frontend.flags),
                affinity_timeout: (frontend.flags & SVC_FLAG_AFFINITY != 0)
                    .then_some(frontend.affinity_timeout),
            });
        }
        Ok(out)
    }

    pub fn conntrack(&self) -> Result<Vec<CtEntry>, AgentError> {
        let now = monotonic_ns();
        let config = self.ct_config()?;
        let mut out = Vec::new();
        for item in self.conntrack.iter() {
            let (k, v) = item.map_err(map_err(names::CONNTRACK))?;
            let addr = |(ip, port): (std::net::Ipv4Addr, u16)| format!("{ip}:{port}");
            out.push(CtEntry {
                protocol: Protocol::from_number(k.proto),
                scope: CtScope::from_number(k.scope),
                source: addr(k.src()),
                destination: addr(k.dst()),
                nat: v.nat().map(addr),
                packets: v.packets,
                bytes: v.bytes,
                age_seconds: now.saturating_sub(v.created_ns) / 1_000_000_000,
                idle_seconds: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
                expires_seconds: u64::from(config.lifetime_s(k.proto, v.flags))
                    .saturating_sub(now.saturating_sub(v.last_seen_ns) / 1_000_000_000),
                flags: CtFlag::from_bits(v.flags),
            });
        }
        // By scope's word, as the list has always been ordered.
        out.sort_by(|a, b| {
            (&a.source, &a.destination, a.scope.as_str()).cmp(&(
                &b.source,
                &b.destination,
                b.scope.as_str(),
            ))
        });
        Ok(out)
    }
}

/// How many entries map `id` holds, how that was counted and how many seconds ago: for a
/// realized map what the reconcile loop last `counted` (a pass wrote it, a sweep read it),
/// else (before the first pass, or a runtime map bounded by its capacity) counted now.
pub(crate) fn map_entries(
    inventory: &MapInventory,
    counted: &[(MapId, sluice_realizer::Counted)],
    id: MapId,
) -> Result<(u64, CountedBy, f64), AgentError> {
    Ok(match counted.iter().find(|(counted, _)| *counted == id) {
        Some((_, c)) => (c.entries, c.by, c.at.elapsed().as_secs_f64()),
        None => (inventory.entries(id)?, CountedBy::Now, 0.0),
    })
}

pub(crate) fn fails_closed(desired: &DesiredState, map_max: u32) -> Vec<FailsClosed> {
    desired
        .endpoint_details
        .iter()
        .filter(|(_, d)| d.overflow)
        .map(|(&ifindex, d)| FailsClosed {
            endpoint: format!("{}/{}", d.namespace, d.pod),
            ifindex,
            rows_needed: d.policy_rows,
            map_max,
        })
        .collect()
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> AgentError {
    move |source| AgentError::Map { map, source }
}

/// CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}

impl View<'_> {
    /// Local endpoints of the last compiled state, with identities and policy state.
    pub fn endpoints(&self) -> Vec<EndpointEntry> {
        self.desired
            .endpoints
            .keys()
            .map(|&ifindex| self.endpoint_entry(ifindex))
            .collect()
    }

    /// The endpoint named `query`: `namespace/pod`, a pod name unique on this node, or an
    /// ifindex.
    pub fn endpoint(&self, query: &str) -> Result<EndpointEntry, AgentError> {
        self.resolve(query)
            .map(|ifindex| self.endpoint_entry(ifindex))
    }

    fn resolve(&self, query: &str) -> Result<u32, AgentError> {
        if let Ok(ifindex) = query.parse::<u32>()
            && self.desired.endpoints.contains_key(&ifindex)
        {
            return Ok(ifindex);
        }
        let matches: Vec<u32> = self
            .desired
            .endpoint_details
            .iter()
            .filter(|(_, d)| match query.split_once('/') {
                Some((ns, pod)) => d.namespace == ns && d.pod == pod,
                None => d.pod == query,
            })
            .map(|(&ifindex, _)| ifindex)
            .collect();
        match matches.as_slice() {
            [ifindex] => Ok(*ifindex),
            [] => Err(AgentError::Query(format!(
                "no endpoint {query:?} on node {}",
                self.name
            ))),
            _ => Err(AgentError::Query(format!(
                "{query:?} names {} endpoints on node {}; use namespace/pod",
                matches.len(),
                self.name
            ))),
        }
    }

    fn endpoint_entry(&self, ifindex: u32) -> EndpointEntry {
        let info = self
            .desired
            .endpoints
            .get(&ifindex)
            .copied()
            .unwrap_or_default();
        let details = self.desired.endpoint_details.get(&ifindex);
        let identity = details.map_or(info.identity, |d| d.identity);
        let overflow = details.is_some_and(|d| d.overflow);
        EndpointEntry {
            ifindex,
            namespace: details.map(|d| d.namespace.clone()).unwrap_or_default(),
            pod: details.map(|d| d.pod.clone()).unwrap_or_default(),
            interface: details.map(|d| d.interface.clone()).unwrap_or_default(),
            ipv4: details.map_or(info.ip(), |d| d.ipv4),
            identity,
            labels: self.labels(identity),
            ingress_enforced: details.is_some_and(|d| d.ingress_enforced),
            egress_enforced: details.is_some_and(|d| d.egress_enforced),
            policy_rows: details.map_or(0, |d| d.policy_rows),
            policy_map_max: self.policy_map_max,
            policies: details.map(|d| d.policies.clone()).unwrap_or_default(),
            status: if overflow {
                EndpointStatus::FailsClosed
            } else {
                EndpointStatus::Ready
            },
        }
    }

    fn labels(&self, identity: u32) -> Vec<String> {
        if identity == IDENTITY_ANY {
            return vec!["ANY".to_string()];
        }
        self.desired
            .identities
            .get(&identity)
            .map(|i| i.labels.clone())
            .unwrap_or_default()
    }

    /// Every identity of the last compiled state.
    pub fn identities(&self) -> Vec<IdentityEntry> {
        self.desired
            .identities
            .keys()
            .map(|&id| self.identity_entry(id))
            .collect()
    }

    pub fn identity(&self, id: u32) -> Result<IdentityEntry, AgentError> {
        if !self.desired.identities.contains_key(&id) {
            return Err(AgentError::Query(format!("no identity {id}")));
        }
        Ok(self.identity_entry(id))
    }

    fn identity_entry(&self, id: u32) -> IdentityEntry {
        IdentityEntry {
            id,
            labels: self.labels(id),
            endpoints: self
                .desired
                .endpoint_details
                .values()
                .filter(|d| d.identity == id)
                .map(|d| format!("{}/{}", d.namespace, d.pod))
                .collect(),
        }
    }

    /// The endpoint's policy map read from the kernel, with its counters, joined with the
    /// desired rows for labels and origins.
    pub fn policy(&self, query: &str) -> Result<EndpointPolicyView, AgentError> {
        let ifindex = self.resolve(query)?;
        let installed = self.tables.policy.read(ifindex)?;
        let empty = BTreeMap::new();
        let desired = self
            .desired
            .policies
            .get(&ifindex)
            .map_or(&empty, |p| &p.rows);
        let kernel = installed.as_ref().map(|p| &p.rows);
        let keys: BTreeSet<_> = desired
            .keys()
            .chain(kernel.into_iter().flat_map(BTreeMap::keys))
            .copied()
            .collect();
        let rows = keys
            .into_iter()
            .map(|key| {
                let counters = kernel.and_then(|k| k.get(&key));
                let allowed_by = desired.get(&key);
                PolicyRow {
                    direction: Direction::from_policy(key.rule.direction),
                    identity: key.rule.identity,
                    identity_labels: self.labels(key.rule.identity),
                    protocol: Protocol::from_number(key.rule.proto),
                    ports: key.port_range(),
                    prefix: key.prefixlen,
                    packets: counters.map_or(0, |c| c.packets),
                    bytes: counters.map_or(0, |c| c.bytes),
                    allowed_by: allowed_by
                        .map(|b| b.iter().cloned().collect())
                        .unwrap_or_default(),
                    state: RowState::of(counters.is_some(), allowed_by.is_some()),
                }
            })
            .collect();
        Ok(EndpointPolicyView {
            endpoint: self.endpoint_entry(ifindex),
            map_max_entries: installed.map(|p| p.capacity),
            rows,
        })
    }
}

fn unsupported_field(u: &sluice_compiler::Unsupported) -> UnsupportedField {
    UnsupportedField {
        kind: u.object.kind.as_str().to_string(),
        namespace: u.object.namespace.clone(),
        name: u.object.name.clone(),
        field: u.field.path().to_string(),
        value: u.value.clone(),
        programmed: u.field.programmed().to_string(),
    }
}
