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
    AgentStatus, BackendEntry, CtEntry, Drift, MapStatus, ServiceEntry, VerifyReport,
};
use sluice_common::{
    CT_EGRESS, CT_FLAG_CLOSING, CT_FLAG_LOOPBACK, CT_FLAG_SEEN_REPLY, CT_INGRESS, CT_SERVICE,
    Ct4Entry, Ct4Key, EndpointInfo, Lb4Backend, Lb4BackendKey, Lb4Key, Lb4Service, names, programs,
    proto_name,
};
use sluice_compiler::{DesiredState, NodeContext};
use sluice_datapath::{Datapath, PinnedMaps};
use sluice_realizer::{Desired, Named, Tables};
use sluice_store::Snapshot;
use tracing::{debug, info, warn};

use crate::{AgentConfig, AgentError};

type KernelTables = Tables<
    Named<MapData, Lb4Key, Lb4Service>,
    Named<MapData, Lb4BackendKey, Lb4Backend>,
    Named<MapData, u32, EndpointInfo>,
>;

pub struct Node {
    name: String,
    datapath: Datapath,
    tables: KernelTables,
    conntrack: HashMap<MapData, Ct4Key, Ct4Entry>,
    snapshot: Arc<Snapshot>,
    desired: DesiredState,
    realized_generation: u64,
    reconciles: u64,
    last_error: Option<String>,
}

impl Node {
    /// Loads (or, after a restart, re-opens) the pinned datapath.
    pub fn start(config: &AgentConfig) -> Result<Self, AgentError> {
        let datapath = Datapath::load(&config.pin_dir, &config.datapath)?;
        let maps = PinnedMaps::open(&config.pin_dir)?;
        Ok(Self {
            name: config.node.clone(),
            datapath,
            tables: Tables {
                services: Named {
                    name: names::SERVICES,
                    map: maps.services,
                },
                backends: Named {
                    name: names::BACKENDS,
                    map: maps.backends,
                },
                endpoints: Named {
                    name: names::ENDPOINTS,
                    map: maps.endpoints,
                },
            },
            conntrack: maps.conntrack,
            snapshot: Arc::new(Snapshot::default()),
            desired: DesiredState::default(),
            realized_generation: 0,
            reconciles: 0,
            last_error: None,
        })
    }

    pub fn set_snapshot(&mut self, snapshot: Arc<Snapshot>) {
        self.snapshot = snapshot;
    }

    /// One full pass: compile, realize the maps, then attach and detach programs. Errors are
    /// kept for `status` and retried on the next pass.
    pub fn reconcile(&mut self) {
        let started = Instant::now();
        self.reconciles += 1;
        match self.try_reconcile() {
            Ok(changed) => {
                if changed || self.realized_generation != self.snapshot.generation {
                    info!(generation = self.snapshot.generation, elapsed = ?started.elapsed(), "realized");
                }
                self.realized_generation = self.snapshot.generation;
                self.last_error = None;
            }
            Err(e) => {
                warn!(error = %e, "reconcile failed; retrying on the next pass");
                self.last_error = Some(e.to_string());
            }
        }
    }

    fn try_reconcile(&mut self) -> Result<bool, AgentError> {
        let desired = self.compile();
        for problem in &desired.problems {
            debug!(%problem, "compiler");
        }
        let stats = self.tables.realize(desired_maps(&desired))?;
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
                ..NodeContext::default()
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
        })
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
                    let state = backends
                        .get(&bk)
                        .map_or_else(|| "missing".to_string(), ToString::to_string);
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
                kind: known.map_or_else(|| "ClusterIP".to_string(), |f| f.kind.clone()),
                address: key.vip(),
                port: key.port(),
                protocol: proto_name(key.proto).to_string(),
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
            let flags = [
                (CT_FLAG_LOOPBACK, "loopback"),
                (CT_FLAG_SEEN_REPLY, "seen-reply"),
                (CT_FLAG_CLOSING, "closing"),
            ]
            .into_iter()
            .filter(|(bit, _)| v.flags & bit != 0)
            .map(|(_, name)| name.to_string())
            .collect();
            out.push(CtEntry {
                protocol: proto_name(k.proto).to_string(),
                scope: match k.scope {
                    CT_EGRESS => "egress",
                    CT_INGRESS => "ingress",
                    CT_SERVICE => "service",
                    _ => "unknown",
                }
                .to_string(),
                source: addr(k.src()),
                destination: addr(k.dst()),
                nat: v.nat().map(addr),
                packets: v.packets,
                bytes: v.bytes,
                age_seconds: now.saturating_sub(v.created_ns) / 1_000_000_000,
                idle_seconds: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
                flags,
            });
        }
        out.sort_by(|a, b| {
            (&a.source, &a.destination, &a.scope).cmp(&(&b.source, &b.destination, &b.scope))
        });
        Ok(out)
    }

    /// Recompiles from the current snapshot and compares with the kernel; optionally repairs.
    pub fn verify(&mut self, repair: bool) -> Result<VerifyReport, AgentError> {
        let desired = self.compile();
        let plan = self.tables.plan(desired_maps(&desired))?;
        let mut drift: Vec<Drift> = plan
            .drift()
            .into_iter()
            .map(|d| Drift {
                map: d.map.to_string(),
                kind: d.kind.as_str().into(),
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
            kind: "missing".into(),
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
        })
    }
}

fn desired_maps(d: &DesiredState) -> Desired<'_> {
    Desired {
        services: &d.services,
        backends: &d.backends,
        endpoints: &d.endpoints,
    }
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
