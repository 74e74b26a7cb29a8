//! One node's datapath as the reconcile loop drives it: compile, realize, attach, verify.
//! Everything here is kernel work and runs on the blocking pool, one step at a time; the
//! API reads what [`Node::published`] leaves behind (see `views`).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use sluice_compiler::{Balancing, Changes, CompileCache, Delta, DesiredState, NodeContext};
use sluice_datapath::{AttachRole, Datapath};
use sluice_realizer::{ApplyStats, Desired, KernelTables, Scan, ScanTick};
use sluice_store::Snapshot;
use tracing::{debug, info, warn};

use crate::{
    AgentConfig, AgentError,
    cni::LocalEndpoints,
    conntrack::{self, Conntrack},
    desired::SharedDesired,
    host_cgroup::SocketCgroups,
    nodes,
    observe::Unnamed,
    pins::PinGuard,
    routing::Routing,
    sock_purge::SocketPurge,
    views::Published,
};

mod purge;
mod verify;

/// How long the periodic check takes to read every map once, however large. Reading every
/// bucket of the million-bucket hash maps is most of its cost (perf: the kernel's batched
/// lookup), so a sweep is as long as the 60 s bound allows: drift is found within two
/// sweeps (see `sluice_realizer::Scan`), each perhaps a tick longer as slices end on whole
/// buckets, so within 52 s at the 2 s interval, and one full pass repairs it.
const SWEEP: Duration = Duration::from_secs(24);

/// Services compiled in one pass past which the memory it freed is handed back
/// (`heap::release_freed`): the first compile, a relist, a change of the node's inputs.
const LARGE_COMPILE: usize = 1000;

/// How many reconcile ticks one sweep spreads over at `interval`.
fn ticks_per_sweep(interval: Duration) -> usize {
    let ticks = SWEEP.as_secs_f64() / interval.as_secs_f64().max(f64::EPSILON);
    // Saturating: an interval of a few ms gives one tick, one of hours many.
    ticks.ceil() as usize
}

/// Why a pass runs, which sets how much of the kernel it checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// A change from the source or the CNI plugin: realizes it and checks only what it
    /// touched (the interfaces when the endpoints changed, the routes when the nodes did).
    Change,
    /// The reconcile interval's: compares everything the agent owns with the kernel
    /// (maps a slice at a time, programs on every interface and cgroup, routes, pins), so
    /// drift behind the agent's back is repaired whatever the change passes skipped.
    Periodic,
}

/// Where one pass's time went, for its debug line.
#[derive(Debug, Default)]
struct Phases {
    compile: Duration,
    maps: Duration,
    /// Programs on the pods' interfaces and the socket programs' cgroups.
    attach: Duration,
    routing: Duration,
    pins: Duration,
}

pub struct Node {
    name: String,
    datapath: Datapath,
    /// `--host-cgroup` and `--pod-cgroup`: the cgroups the socket programs run on.
    cgroups: SocketCgroups,
    routing: Routing,
    tables: KernelTables,
    /// The rolling check of the maps against `desired` between changes.
    scan: Scan,
    /// Rows each endpoint's policy map holds.
    policy_map_max: u32,
    balancing: Balancing,
    snapshot: Arc<Snapshot>,
    /// The CNI plugin's endpoints: compiled beside the snapshot, not merged into a copy.
    endpoints: LocalEndpoints,
    /// The agent's number for `snapshot` and `endpoints`: one more for every snapshot
    /// accepted and every change of the endpoints, whatever the source counts.
    generation: u64,
    /// What changed since the snapshot last compiled, as the sources named it; None when
    /// not known (before the first compile, after a relist): the compile cache then
    /// compares every object.
    changes: Option<Changes>,
    /// The state the last pass that succeeded realized.
    desired: Arc<DesiredState>,
    /// The compiler's newest output, shared with the API.
    compiled: SharedDesired,
    /// The entries the compiles since the last realizing pass changed, with their values
    /// before: what that pass writes.
    delta: Delta,
    /// What `desired` was compiled from; None before the first pass that realized it.
    compiled_from: Option<CompiledFrom>,
    /// Whether the last pass checked everything (see [`Pass`]).
    last_pass_full: bool,
    /// Whether the local endpoints changed since their interfaces were last resolved: a
    /// change pass resolves them (a syscall each) only then.
    interfaces_stale: bool,
    /// The previous compiles' per-Service and workload results: a change recompiles what
    /// it touches.
    compile_cache: CompileCache,
    /// Whether the maps hold `desired` as the last pass left them (it succeeded, or the
    /// periodic check repaired them): then a change writes its delta without reading
    /// the maps first.
    maps_hold_desired: bool,
    /// Whether this agent's programs run on every interface of a pass that succeeded and
    /// the flow cache has been moved to a new generation since: decisions the programs
    /// before a restart recorded, perhaps in another build's layout of `flow4`, are
    /// never used by this build's programs.
    flow_cache_renewed: bool,
    /// Changes whenever `desired` does, so the observer renames flows only then.
    desired_version: u64,
    /// The pods the observer's names have not caught up with.
    unnamed: Unnamed,
    realized_generation: u64,
    realized_revision: u64,
    reconciles: u64,
    last_error: Option<String>,
    /// Where the service connections of removed backends are purged.
    conntrack: Conntrack,
    /// Where the connected UDP sockets the socket programs sent to removed backends are
    /// found.
    sockets: SocketPurge,
    /// Entries purged since the loop last took the count for the metrics.
    purged: u64,
    /// Whether conntrack was checked against the backends once since the start.
    backends_checked: bool,
    /// Holds every pinned map and link, to pin them again if their pins are removed.
    pins: PinGuard,
    /// Pins pinned again since the loop last took them for status and the metrics.
    pins_restored: Vec<String>,
    /// The map the last pass could not write because it was full.
    full_map: Option<&'static str>,
}

/// The compiler's input besides the node's fixed settings: the snapshot and the CNI
/// plugin's endpoints (by the generation they were accepted under) and the ifindex of each
/// local endpoint's interface.
#[derive(Debug, PartialEq, Eq)]
struct CompiledFrom {
    generation: u64,
    interfaces: BTreeMap<String, u32>,
}

impl Node {
    /// Loads (or, after a restart, re-opens) the pinned datapath.
    pub fn start(config: &AgentConfig) -> Result<Self, AgentError> {
        let mut datapath = Datapath::load(&config.pin_dir, &config.datapath)?;
        for m in datapath.migrated() {
            info!(
                map = m.map,
                from = %m.from,
                to = %m.to,
                entries = m.entries,
                late_entries = m.late_entries,
                late_unconvertible = m.late_unconvertible,
                "pinned map migrated from an earlier layout"
            );
        }
        let cgroups = SocketCgroups::start(
            &mut datapath,
            config.host_cgroup.as_deref(),
            config.pod_cgroup.as_deref(),
        )?;
        let routing = Routing::start(config.routing.clone(), &config.pin_dir)?;
        conntrack::check_capacity(&config.pin_dir, config.datapath.ct_max_entries)?;
        Ok(Self {
            name: config.node.clone(),
            datapath,
            cgroups,
            routing,
            tables: KernelTables::open(&config.pin_dir)?,
            scan: Scan::new(ticks_per_sweep(config.reconcile_interval)),
            policy_map_max: config.policy_map_max,
            balancing: config.balancing,
            snapshot: Arc::new(Snapshot::default()),
            endpoints: LocalEndpoints::default(),
            generation: 0,
            changes: None,
            desired: Arc::default(),
            compiled: SharedDesired::default(),
            delta: Delta::default(),
            compiled_from: None,
            last_pass_full: false,
            interfaces_stale: true,
            compile_cache: CompileCache::new(),
            maps_hold_desired: false,
            flow_cache_renewed: false,
            desired_version: 0,
            unnamed: Unnamed::Every,
            realized_generation: 0,
            realized_revision: 0,
            reconciles: 0,
            last_error: None,
            conntrack: Conntrack::open(&config.pin_dir)?,
            sockets: SocketPurge::open(&config.pin_dir)?,
            purged: 0,
            backends_checked: false,
            pins: PinGuard::new(&config.pin_dir),
            pins_restored: Vec::new(),
            full_map: None,
        })
    }

    /// The maps the datapath converted from an earlier layout at start.
    pub fn migrated(&self) -> &[sluice_datapath::MigratedMap] {
        self.datapath.migrated()
    }

    /// Takes a new snapshot from the source under the next generation, with what changed
    /// since the one before (None: not known), and the CNI plugin's endpoints if they
    /// changed too.
    pub fn accept(
        &mut self,
        snapshot: Arc<Snapshot>,
        changes: Option<Changes>,
        endpoints: Option<LocalEndpoints>,
    ) {
        // The snapshot's own endpoints (the lab's) are compared here; the CNI plugin's
        // come in the node's context, where the compile cache compares them.
        let endpoints_changed = snapshot.endpoints != self.snapshot.endpoints;
        self.unnamed.add(changes.as_ref());
        crate::source::changes::merge(
            &mut self.changes,
            changes.map(|mut c| {
                c.endpoints |= endpoints_changed;
                c
            }),
        );
        self.snapshot = snapshot;
        self.interfaces_stale |= endpoints_changed || endpoints.is_some();
        if let Some(endpoints) = endpoints {
            self.endpoints = endpoints;
        }
        self.generation += 1;
    }

    /// Takes the CNI plugin's endpoints under the next generation (the CNI ADD waits for
    /// it to be realized); the compile cache finds them changed in the node's context.
    pub fn accept_endpoints(&mut self, endpoints: LocalEndpoints) {
        self.endpoints = endpoints;
        self.interfaces_stale = true;
        self.generation += 1;
    }

    /// Whether a source has delivered anything yet: before that, a pass would empty the
    /// maps a restarted agent found pinned.
    pub fn has_snapshot(&self) -> bool {
        self.generation > 0
    }

    /// The state the API reads until the next step.
    pub fn published(&self) -> Published {
        Published {
            name: self.name.clone(),
            policy_map_max: self.policy_map_max,
            routing: self.routing.config().status(),
            snapshot: Arc::clone(&self.snapshot),
            endpoints: Arc::clone(&self.endpoints),
            desired: Arc::clone(&self.desired),
            desired_generation: self.generation,
            realized_generation: self.realized_generation,
            realized_revision: self.realized_revision,
            reconciles: self.reconciles,
            last_error: self.last_error.clone(),
            counted: self.scan.counted().collect(),
        }
    }

    /// Hands the observer the current desired state, if it changed, and the pods changed
    /// since the last call.
    pub(crate) fn name_flows(&mut self, names: &crate::observe::Names) {
        let unnamed = std::mem::take(&mut self.unnamed);
        names.update(
            self.desired_version,
            &self.desired,
            &self.snapshot,
            &self.endpoints,
            unnamed,
        );
    }

    /// One pass: compile, realize the maps, then attach and detach programs. Errors are
    /// kept for `status` and retried on the next pass; returns whether the pass succeeded.
    /// When nothing changed since the last pass that succeeded, the maps are not read whole
    /// but checked a slice at a time (`Scan`), and repaired in full if they drifted. A
    /// [`Pass::Change`] after a pass that succeeded does only what its change needs.
    pub fn reconcile(&mut self, pass: Pass) -> bool {
        let started = Instant::now();
        self.reconciles += 1;
        // After a failed pass, or before the first, what the kernel holds is not known.
        let full = pass == Pass::Periodic || self.last_error.is_some() || !self.maps_hold_desired;
        self.last_pass_full = full;
        let mut phases = Phases::default();
        let realized = self.realize_and_attach(started, full, &mut phases);
        // After the pass's own attaches and detaches, so only pins removed by others count.
        // A change pass that attached nothing has no new pin to hold.
        if full || realized == Some(true) {
            let t = Instant::now();
            let checked = self.pins.check();
            phases.pins = t.elapsed();
            match checked {
                Ok(restored) => self.pins_restored.extend(restored),
                Err(e) => {
                    warn!(error = %e, "checking the pins failed; retrying on the next pass");
                    self.last_error.get_or_insert_with(|| e.to_string());
                    return false;
                }
            }
        }
        debug!(full, elapsed = ?started.elapsed(), ?phases, "pass");
        realized.is_some()
    }

    /// The pass itself: compile, realize, attach; errors are kept for `status`. Returns
    /// whether it attached or detached programs, None if it failed.
    fn realize_and_attach(
        &mut self,
        started: Instant,
        full: bool,
        phases: &mut Phases,
    ) -> Option<bool> {
        self.full_map = None;
        match self.try_reconcile(full, phases) {
            Ok((stats, attached)) => {
                if stats.changed() || attached || self.realized_generation != self.generation {
                    // The entries written say what a restart cost the maps: none when the
                    // pins already held what the objects say.
                    info!(
                        generation = self.generation,
                        revision = self.snapshot.revision,
                        upserted = stats.upserted,
                        removed = stats.removed,
                        attached,
                        full,
                        elapsed = ?started.elapsed(),
                        "realized"
                    );
                }
                self.realized_generation = self.generation;
                self.realized_revision = self.snapshot.revision;
                self.last_error = None;
                Some(attached)
            }
            Err(e) => {
                self.full_map = e.full_map();
                let error = match self.full_map {
                    Some(map) => format!("map {map} is full{}: {e}", raise_hint(map)),
                    None => e.to_string(),
                };
                warn!(%error, "reconcile failed; retrying on the next pass");
                self.last_error = Some(error);
                None
            }
        }
    }

    /// Returns the entries the pass wrote and whether it attached or detached programs.
    /// `full`: every check against the kernel, not only those the change needs.
    fn try_reconcile(
        &mut self,
        full: bool,
        phases: &mut Phases,
    ) -> Result<(ApplyStats, bool), AgentError> {
        let t = Instant::now();
        let (desired, compiled_from) = self.compile(full);
        phases.compile = t.elapsed();
        for problem in &desired.problems {
            debug!(%problem, "compiler");
        }
        // Once per field, not every pass: a field stays unsupported until its object changes.
        for u in desired
            .unsupported()
            .filter(|u| !self.desired.unsupported().any(|o| o == *u))
        {
            warn!(object = %u.object, field = u.field.path(), value = %u.value, programmed = u.field.programmed(), "not implemented");
        }
        let t = Instant::now();
        let unchanged = Arc::ptr_eq(&desired, &self.desired) && self.last_error.is_none();
        // Until this pass succeeds, what the maps hold is not known.
        let held = std::mem::replace(&mut self.maps_hold_desired, false);
        let stats = if unchanged && !full {
            // The rolling check keeps to the interval; a change that compiled to the same
            // state writes nothing.
            ApplyStats::default()
        } else if unchanged {
            self.check()?
        } else {
            let target = Desired::of(&desired, self.policy_map_max);
            // The maps hold what the last pass realized, so the change is the difference
            // of the two states; anything changed behind the agent's back since is found
            // by the periodic check and repaired by a full pass.
            // Taken on every pass that realizes, so it always starts at `self.desired`.
            let delta = std::mem::take(&mut self.delta);
            let stats = if held {
                let plan = self.tables.plan_changes(&delta, target)?;
                self.tables.apply(&plan)?
            } else {
                self.tables.realize(target)?
            };
            if held {
                // The check's digests and sweeps follow the delta, not a digest of a
                // million entries, and not a sweep started over at every change.
                let next = self.desired_version + u64::from(!Arc::ptr_eq(&desired, &self.desired));
                self.scan
                    .changed(&delta, target, self.desired_version, next);
            } else {
                self.scan.written(target);
            }
            self.purge_removed_backends(&desired, held.then_some(&delta))?;
            stats
        };
        phases.maps = t.elapsed();
        let t = Instant::now();
        // Programs go on after the maps they read are complete, and come off interfaces
        // whose endpoint is gone. A change pass looks at them only when an endpoint came,
        // went or has a new interface (a new ifindex: re-created under the same name).
        let interfaces_changed = desired.interfaces != self.desired.interfaces
            || self
                .compiled_from
                .as_ref()
                .is_none_or(|from| from.interfaces != compiled_from.interfaces);
        let mut attached = false;
        if full || interfaces_changed {
            attached = self.attach_interfaces(&desired.interfaces)?;
        }
        phases.attach = t.elapsed();
        let t = Instant::now();
        // Routes and node_config follow the nodes; the periodic pass checks them anyway.
        if full || desired.nodes != self.desired.nodes {
            let (others, own) = nodes::routed(&desired.nodes);
            attached |= self.routing.reconcile(&mut self.datapath, &others, own)?;
        }
        phases.routing = t.elapsed();
        // After the programs were swapped in: no earlier program records a decision
        // under the new generation.
        if !self.flow_cache_renewed {
            self.tables.renew_flow_cache()?;
            self.flow_cache_renewed = true;
        }
        // Last: a cgroup refused since start fails the pass once the rest is done. A process
        // moved into a cgroup, or a link replaced, is found by the periodic pass.
        let t = Instant::now();
        let sockets = if full {
            self.cgroups.reconcile(&mut self.datapath)
        } else {
            Ok(false)
        };
        phases.attach += t.elapsed();
        if !Arc::ptr_eq(&desired, &self.desired) {
            self.desired_version += 1;
        }
        self.desired = desired;
        self.compiled_from = Some(compiled_from);
        self.maps_hold_desired = true;
        attached |= sockets?;
        Ok((stats, attached))
    }

    /// Attaches the datapath to every interface of `interfaces` that does not run it, and
    /// detaches it from those the agent attached that are no longer among them. Returns
    /// whether it attached or detached anything.
    fn attach_interfaces(&mut self, interfaces: &BTreeSet<String>) -> Result<bool, AgentError> {
        let mut attached = false;
        for ifname in interfaces {
            attached |= self.ensure_attached(ifname)?;
        }
        for ifname in self
            .datapath
            .attached(AttachRole::PodVeth)?
            .difference(interfaces)
        {
            info!(%ifname, "detaching from removed endpoint");
            self.datapath.detach(AttachRole::PodVeth, ifname)?;
            attached = true;
        }
        Ok(attached)
    }

    /// One tick of the rolling check of the maps against the unchanged desired state.
    fn check(&mut self) -> Result<ApplyStats, AgentError> {
        let tick: ScanTick = self.tables.check(
            &mut self.scan,
            Desired::of(&self.desired, self.policy_map_max),
            self.desired_version,
        )?;
        debug!(read = tick.entries_read, swept = ?tick.swept, "checked the maps");
        if !tick.drifted.is_empty() {
            warn!(
                maps = ?tick.drifted.iter().map(|m| m.name()).collect::<Vec<_>>(),
                entries = tick.repaired.len(),
                upserted = tick.stats.upserted,
                removed = tick.stats.removed,
                "drift found by the periodic check; repaired"
            );
            // The first few name what drifted; the rest would flood the log.
            for entry in tick.repaired.iter().take(10) {
                warn!(map = entry.map, kind = entry.kind.as_str(), key = %entry.key, "drift repaired");
            }
        }
        Ok(tick.stats)
    }

    /// Whether the last pass checked everything, as the periodic pass does.
    pub fn last_pass_full(&self) -> bool {
        self.last_pass_full
    }

    /// Pins pinned again since the last call, for status and the metrics.
    pub fn take_pins_restored(&mut self) -> Vec<String> {
        std::mem::take(&mut self.pins_restored)
    }

    /// The map the last pass could not write because it was full.
    pub fn full_map(&self) -> Option<&'static str> {
        self.full_map
    }

    /// Conntrack entries purged since the last call, for the metrics.
    pub fn take_purged(&mut self) -> u64 {
        std::mem::take(&mut self.purged)
    }

    /// The desired state of the current snapshot and interfaces, and what it was compiled
    /// from. The compiler is a pure function of the two, so a pass over the same input (the
    /// periodic one) takes the last output rather than compiling again; a changed input is
    /// compiled incrementally, with the full compile's output. The local interfaces'
    /// indexes are resolved when the endpoints changed, or when `full` asks (an interface
    /// re-created behind the agent's back), else taken from the last pass.
    fn compile(&mut self, full: bool) -> (Arc<DesiredState>, CompiledFrom) {
        let interfaces = match &self.compiled_from {
            Some(from) if !full && !self.interfaces_stale => from.interfaces.clone(),
            _ => self.resolve_interfaces(),
        };
        self.interfaces_stale = false;
        let from = CompiledFrom {
            generation: self.generation,
            interfaces,
        };
        if self.compiled_from.as_ref() == Some(&from) {
            return (Arc::clone(&self.desired), from);
        }
        let node = NodeContext {
            node: self.name.clone(),
            interfaces: from.interfaces.clone(),
            policy_map_max: self.policy_map_max,
            balancing: self.balancing,
            endpoints: Arc::clone(&self.endpoints),
        };
        let started = Instant::now();
        // From here on, changes are counted from this snapshot.
        let named = match self.changes.replace(Changes::default()) {
            Some(changes) => {
                self.compile_cache.update(&self.snapshot, changes, &node);
                true
            }
            None => {
                self.compile_cache.refresh(&self.snapshot, &node);
                false
            }
        };
        let delta = self.compile_cache.take_delta();
        self.compiled.advance(self.compile_cache.state(), &delta);
        self.delta.merge(delta);
        let stats = self.compile_cache.stats();
        if stats.workloads_compiled || stats.services_compiled >= LARGE_COMPILE {
            crate::heap::release_freed();
        }
        // Read by the tests: a change set compiles what it names, not every Service.
        debug!(
            changes = if named { "named" } else { "compared" },
            services_compiled = stats.services_compiled,
            services_contested = stats.services_contested,
            workloads_compiled = stats.workloads_compiled,
            elapsed = ?started.elapsed(),
            "compiled"
        );
        (Arc::clone(self.compiled.current()), from)
    }

    /// The ifindex of each local endpoint's interface that exists.
    fn resolve_interfaces(&self) -> BTreeMap<String, u32> {
        self.snapshot
            .endpoints_on(&self.name)
            .chain(self.endpoints.iter().filter(|e| e.node == self.name))
            .filter_map(|e| {
                let index = nix::net::if_::if_nametoindex(e.interface.as_str()).ok()?;
                Some((e.interface.clone(), index))
            })
            .collect()
    }

    /// Attaches the datapath to `ifname` unless the kernel already runs this agent's
    /// programs there; an earlier agent's are swapped for them in their links.
    fn ensure_attached(&mut self, ifname: &str) -> Result<bool, AgentError> {
        if self.datapath.runs(AttachRole::PodVeth, ifname) {
            return Ok(false);
        }
        info!(%ifname, "attaching datapath");
        // Datapath::attach replaces links left pinned for an interface that was re-created.
        self.datapath.attach(AttachRole::PodVeth, ifname)?;
        Ok(true)
    }
}

/// The flag that sizes `map`, for the error that says it is full.
fn raise_hint(map: &str) -> String {
    sluice_common::MAPS
        .iter()
        .find(|def| def.name == map)
        .and_then(|def| def.capacity)
        .map_or_else(String::new, |setting| {
            format!(" (raise {})", setting.flag())
        })
}
