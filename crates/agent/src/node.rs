//! One node's datapath and the state of its reconcile loop.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use aya::{
    maps::{HashMap, IterableMap, MapData},
    programs::{SchedClassifier, TcAttachType},
};
use sluice_api::{
    AgentStatus, BackendEntry, CtEntry, Drift, EndpointEntry, EndpointPolicyView, FailsClosed,
    IdentityEntry, MapStatus, PolicyRow, ServiceEntry, VerifyReport,
};
use sluice_common::{
    Ct4Entry, Ct4Key, Frag4Key, Frag4Ports, IDENTITY_ANY, Lb4BackendKey, Lb4Key,
    kinds::{
        BackendState, CtFlag, CtScope, Direction, DriftKind, EndpointStatus, Protocol, RowState,
        ServiceKind,
    },
    names, programs,
};
use sluice_compiler::{DesiredState, NodeContext};
use sluice_datapath::{Datapath, PinnedMaps};
use sluice_realizer::{Desired, KernelTables, PolicyTable};
use sluice_store::Snapshot;
use tracing::{debug, info, warn};

use crate::{AgentConfig, AgentError};

pub struct Node {
    name: String,
    datapath: Datapath,
    tables: KernelTables,
    conntrack: HashMap<MapData, Ct4Key, Ct4Entry>,
    fragments: HashMap<MapData, Frag4Key, Frag4Ports>,
    /// Rows each endpoint's policy map holds.
    policy_map_max: u32,
    /// max_entries of the outer policy map (aya exposes no map info for hashes of maps).
    policy_endpoints_max: u32,
    snapshot: Arc<Snapshot>,
    desired: DesiredState,
    /// Changes whenever `desired` does, so the observer renames flows only then.
    desired_version: u64,
    realized_generation: u64,
    reconciles: u64,
    last_error: Option<String>,
}

impl Node {
    /// Loads (or, after a restart, re-opens) the pinned datapath.
    pub fn start(config: &AgentConfig) -> Result<Self, AgentError> {
        let datapath = Datapath::load(&config.pin_dir, &config.datapath)?;
        let maps = PinnedMaps::open(&config.pin_dir)?;
        let policy_endpoints_max = maps
            .capacities()
            .iter()
            .find(|(name, _)| *name == names::POLICY)
            .map_or(0, |(_, max)| *max);
        Ok(Self {
            name: config.node.clone(),
            datapath,
            tables: KernelTables::open(&config.pin_dir)?,
            conntrack: maps.conntrack,
            fragments: maps.fragments,
            policy_map_max: config.policy_map_max,
            policy_endpoints_max,
            snapshot: Arc::new(Snapshot::default()),
            desired: DesiredState::default(),
            desired_version: 0,
            realized_generation: 0,
            reconciles: 0,
            last_error: None,
        })
    }

    pub fn set_snapshot(&mut self, snapshot: Arc<Snapshot>) {
        self.snapshot = snapshot;
    }

    /// Hands the observer the names of the current desired state, if it changed.
    pub(crate) fn name_flows(&self, names: &crate::observe::Names) {
        names.update(self.desired_version, &self.desired, &self.snapshot);
    }

    /// One full pass: compile, realize the maps, then attach and detach programs. Errors are
    /// kept for `status` and retried on the next pass; returns whether the pass succeeded.
    pub fn reconcile(&mut self) -> bool {
        let started = Instant::now();
        self.reconciles += 1;
        match self.try_reconcile() {
            Ok(changed) => {
                if changed || self.realized_generation != self.snapshot.generation {
                    info!(generation = self.snapshot.generation, elapsed = ?started.elapsed(), "realized");
                }
                self.realized_generation = self.snapshot.generation;
                self.last_error = None;
                true
            }
            Err(e) => {
                warn!(error = %e, "reconcile failed; retrying on the next pass");
                self.last_error = Some(e.to_string());
                false
            }
        }
    }

    fn try_reconcile(&mut self) -> Result<bool, AgentError> {
        let desired = self.compile();
        for problem in &desired.problems {
            debug!(%problem, "compiler");
        }
        let stats = self
            .tables
            .realize(Desired::of(&desired, self.policy_map_max))?;
        // Programs go on after the maps they read are complete, and come off interfaces
        // whose endpoint is gone.
        let mut attached = false;
        for ifname in &desired.interfaces {
            attached |= self.ensure_attached(ifname)?;
        }
        for ifname in self.datapath.attached()?.difference(&desired.interfaces) {
            info!(%ifname, "detaching from removed endpoint");
            self.datapath.detach(ifname)?;
            attached = true;
        }
        if desired != self.desired {
            self.desired_version += 1;
        }
        self.desired = desired;
        Ok(stats.changed() || attached)
    }

    fn compile(&self) -> DesiredState {
        let interfaces = self
            .snapshot
            .endpoints_on(&self.name)
            .filter_map(|e| {
                let index = nix::net::if_::if_nametoindex(e.interface.as_str()).ok()?;
                Some((e.interface.clone(), index))
            })
            .collect::<BTreeMap<_, _>>();
        sluice_compiler::compile(
            &self.snapshot,
            &NodeContext {
                node: self.name.clone(),
                interfaces,
                policy_map_max: self.policy_map_max,
            },
        )
    }

    /// Attaches the datapath to `ifname` unless the kernel already runs it there.
    fn ensure_attached(&mut self, ifname: &str) -> Result<bool, AgentError> {
        if runs_datapath(ifname) {
            return Ok(false);
        }
        info!(%ifname, "attaching datapath");
        // Datapath::attach replaces links left pinned for an interface that was re-created.
        self.datapath.attach(ifname)?;
        Ok(true)
    }

    pub fn status(&self) -> Result<AgentStatus, AgentError> {
        let mut maps = Vec::new();
        for (name, entries, max_entries) in [
            (
                names::SERVICES,
                self.tables.services.map.keys().count(),
                max_entries(self.tables.services.map.map()),
            ),
            (
                names::BACKENDS,
                self.tables.backends.map.keys().count(),
                max_entries(self.tables.backends.map.map()),
            ),
            (
                names::CONNTRACK,
                self.conntrack.keys().count(),
                max_entries(self.conntrack.map()),
            ),
            (
                names::ENDPOINTS,
                self.tables.endpoints.map.keys().count(),
                max_entries(self.tables.endpoints.map.map()),
            ),
            (
                names::IPCACHE,
                self.tables.ipcache.map.keys().count(),
                max_entries(self.tables.ipcache.map.map()),
            ),
            (
                names::POLICY,
                self.tables.policy.endpoint_count(),
                self.policy_endpoints_max,
            ),
            (
                names::FRAGMENTS,
                self.fragments.keys().count(),
                max_entries(self.fragments.map()),
            ),
        ] {
            maps.push(MapStatus {
                name: name.to_string(),
                entries: entries as u64,
                max_entries,
            });
        }
        Ok(AgentStatus {
            node: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            healthy: self.last_error.is_none(),
            desired_generation: self.snapshot.generation,
            realized_generation: self.realized_generation,
            last_error: self.last_error.clone(),
            reconciles: self.reconciles,
            endpoints: self.desired.endpoints.len(),
            maps,
            fails_closed: self.fails_closed(),
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
            .map
            .iter()
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(map_err(names::SERVICES))?;
        let backends = self
            .tables
            .backends
            .map
            .iter()
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(map_err(names::BACKENDS))?;
        let mut out = Vec::new();
        for (key, frontend) in services.iter().filter(|(k, _)| k.slot == 0 && k.proto != 0) {
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
                address: key.vip(),
                port: key.port(),
                protocol: Protocol::from_number(key.proto),
                backends,
            });
        }
        Ok(out)
    }

    pub fn conntrack(&self) -> Result<Vec<CtEntry>, AgentError> {
        let now = monotonic_ns();
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

    /// Recompiles from the current snapshot and compares with the kernel; optionally repairs.
    pub fn verify(&mut self, repair: bool) -> Result<VerifyReport, AgentError> {
        let desired = self.compile();
        let plan = self
            .tables
            .plan(Desired::of(&desired, self.policy_map_max))?;
        let mut drift: Vec<Drift> = plan
            .drift()
            .into_iter()
            .map(|d| Drift {
                map: d.map.to_string(),
                kind: d.kind,
                key: d.key,
                desired: d.desired,
                actual: d.actual,
            })
            .collect();
        let detached: BTreeSet<_> = desired
            .interfaces
            .iter()
            .filter(|i| !runs_datapath(i))
            .cloned()
            .collect();
        drift.extend(detached.iter().map(|i| Drift {
            map: "tcx".into(),
            kind: DriftKind::Missing,
            key: i.clone(),
            desired: Some(format!(
                "{} ingress, {} egress",
                programs::FROM_CONTAINER,
                programs::TO_CONTAINER
            )),
            actual: None,
        }));
        let repaired = repair && !drift.is_empty();
        if repaired {
            self.tables.apply(&plan)?;
            for ifname in &detached {
                self.ensure_attached(ifname)?;
            }
        }
        Ok(VerifyReport {
            generation: self.snapshot.generation,
            drift,
            repaired,
            fails_closed: fails_closed(&desired, self.policy_map_max),
        })
    }
}

fn fails_closed(desired: &DesiredState, map_max: u32) -> Vec<FailsClosed> {
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

/// Whether the kernel runs our two programs on `ifname` (the truth, not our memory of it).
fn runs_datapath(ifname: &str) -> bool {
    let has = |attach, name: &str| {
        SchedClassifier::query_tcx(ifname, attach)
            .map(|(_, progs)| progs.iter().any(|p| p.name_as_str() == Some(name)))
            .unwrap_or(false)
    };
    has(TcAttachType::Ingress, programs::FROM_CONTAINER)
        && has(TcAttachType::Egress, programs::TO_CONTAINER)
}

fn max_entries(map: &MapData) -> u32 {
    map.info().map(|i| i.max_entries()).unwrap_or(0)
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

impl Node {
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
