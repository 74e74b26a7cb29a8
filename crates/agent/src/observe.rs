//! The observer's agent side: configures the datapath's events, reads the ring buffer and
//! pushes the events, raw, into the flow buffer, which names them when they are read.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use sluice_common::{EVENT_CONFIG_F_ENABLED, EventConfig, FlowEvent};
use sluice_compiler::{Changes, DesiredState, ObjectKey};
use sluice_datapath::PinnedMaps;
use sluice_observer::{FlowBuffer, PodNames, Resolver, pod_address};
use sluice_store::{LocalEndpoint, Snapshot};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

use crate::{AgentError, cni::LocalEndpoints};

/// Events per second per CPU unless configured otherwise: enough for a few thousand new
/// connections per second per CPU (each has a trace, a verdict and a close per side), few
/// enough that a flood of drops cannot keep the agent busy decoding.
pub const DEFAULT_EVENT_RATE: u32 = 10_000;
/// Events a CPU may send at once above the rate.
pub const DEFAULT_EVENT_BURST: u32 = 10_000;
/// The datapath wakes the reader only once the ring holds 1,024 events; this drains the rest.
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

/// What the datapath emits; written to `event_config` at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventsConfig {
    pub enabled: bool,
    /// Events per second per CPU; 0: no limit.
    pub rate: u32,
    pub burst: u32,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rate: DEFAULT_EVENT_RATE,
            burst: DEFAULT_EVENT_BURST,
        }
    }
}

/// Writes `config` to the datapath's `event_config`. Drops are counted in `metrics`
/// whatever it says.
pub fn configure_events(pin_dir: &Path, config: EventsConfig) -> Result<(), AgentError> {
    let mut maps = PinnedMaps::open(pin_dir)?;
    let value = EventConfig {
        flags: if config.enabled {
            EVENT_CONFIG_F_ENABLED
        } else {
            0
        },
        rate: config.rate,
        burst: config.burst,
        pad: 0,
    };
    maps.event_config
        .set(0, value, 0)
        .map_err(|source| AgentError::Map {
            map: sluice_common::names::EVENT_CONFIG,
            source,
        })
}

/// Keeps the flow buffer's names current: a resolver of each new desired state (shared,
/// not copied) and the pod names, changed in place by the pods each change set names.
pub struct Names {
    node: String,
    /// Wall clock minus CLOCK_MONOTONIC at start: event times are monotonic.
    boot_offset_ns: i64,
    /// What the buffer's resolver was built from.
    named: Mutex<Named>,
    pods: Arc<PodNames>,
    flows: Arc<FlowBuffer>,
}

/// The inputs of the resolver in use.
struct Named {
    /// The version of the desired state; u64::MAX before the first.
    version: u64,
    /// The snapshot's and the CNI plugin's endpoints the local names were taken from (not
    /// the snapshot: holding it would make the source copy its next one whole).
    local: Option<(Vec<LocalEndpoint>, LocalEndpoints)>,
}

/// The pods whose names the observer has not caught up with since the last update.
pub enum Unnamed {
    /// Every pod: the changes are not known (the first snapshot, a relist).
    Every,
    /// These, by key, with their address now (None: deleted, or none yet).
    Pods(BTreeMap<ObjectKey, Option<Ipv4Addr>>),
}

impl Default for Unnamed {
    fn default() -> Self {
        Unnamed::Pods(BTreeMap::new())
    }
}

impl Unnamed {
    /// Adds the pods of a change set (None: not known).
    pub fn add(&mut self, changes: Option<&Changes>) {
        match (&mut *self, changes) {
            (Unnamed::Pods(pods), Some(changes)) => pods.extend(
                changes
                    .pods
                    .iter()
                    .map(|(key, pod)| (key.clone(), pod.as_ref().and_then(pod_address))),
            ),
            (_, None) => *self = Unnamed::Every,
            (Unnamed::Every, Some(_)) => {}
        }
    }
}

impl Names {
    /// The flow buffer of `capacity` events, naming no party yet but stamping flows with
    /// the node and the wall time (a restarted agent's pinned programs may send events
    /// before its first desired state), and what names its events from then on.
    pub fn new(node: &str, capacity: usize) -> Result<(Self, Arc<FlowBuffer>), AgentError> {
        let boot_offset_ns = boot_offset_ns()?;
        let flows = Arc::new(FlowBuffer::new(
            capacity,
            Resolver::for_node(node, boot_offset_ns),
        ));
        let names = Self {
            node: node.to_string(),
            boot_offset_ns,
            named: Mutex::new(Named {
                version: u64::MAX,
                local: None,
            }),
            pods: Arc::default(),
            flows: Arc::clone(&flows),
        };
        Ok((names, flows))
    }

    /// Catches the pod names up with `unnamed` (all of `snapshot`'s pods for
    /// [`Unnamed::Every`]) and the local endpoints' with `snapshot` and `endpoints`, and
    /// swaps in a resolver of `desired` if `version` is not the one in use. Costs what
    /// changed, not the cluster's size.
    pub fn update(
        &self,
        version: u64,
        desired: &Arc<DesiredState>,
        snapshot: &Snapshot,
        endpoints: &LocalEndpoints,
        unnamed: Unnamed,
    ) {
        let mut named = self
            .named
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match unnamed {
            Unnamed::Every => self.pods.replace(snapshot),
            Unnamed::Pods(pods) => self.pods.apply(pods.iter().map(|(k, a)| (k, *a))),
        }
        let local_same = named
            .local
            .as_ref()
            .is_some_and(|(s, e)| *s == snapshot.endpoints && e == endpoints);
        if !local_same {
            self.pods.set_local(snapshot, endpoints);
            named.local = Some((snapshot.endpoints.clone(), Arc::clone(endpoints)));
        }
        if named.version == version {
            return;
        }
        let resolver = Resolver::new(
            &self.node,
            self.boot_offset_ns,
            Arc::clone(desired),
            Arc::clone(&self.pods),
        );
        self.flows.set_resolver(Arc::new(resolver));
        named.version = version;
    }
}

fn boot_offset_ns() -> Result<i64, AgentError> {
    use nix::time::{ClockId, clock_gettime};
    let ns = |clock| {
        clock_gettime(clock)
            .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
            .map_err(|source| AgentError::Sys {
                call: "clock_gettime",
                source,
            })
    };
    Ok(ns(ClockId::CLOCK_REALTIME)? - ns(ClockId::CLOCK_MONOTONIC)?)
}

/// Opens the ring buffer; [`read_events`] then reads it until the agent stops.
pub fn open(pin_dir: &Path) -> Result<AsyncFd<RingBuf<MapData>>, AgentError> {
    let ring = sluice_datapath::open_events(pin_dir)?;
    // SAFETY: the ring buffer owns its map's fd (an OwnedFd in MapData) and always returns
    // that one from as_raw_fd, so it stays open and the same while the AsyncFd owns it.
    unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
        AgentError::Io {
            call: "epoll_ctl",
            path: pin_dir.join(sluice_common::names::EVENTS),
            source: e.into_parts().1,
        }
    })
}

/// Events copied out of the ring before they are pushed into the buffer under one lock.
const BATCH: usize = 1024;

/// Drains the ring whenever the datapath wakes it (>= 1,024 events pending), when a reader of
/// the flows asks, and every 100 ms.
pub async fn read_events(mut ring: AsyncFd<RingBuf<MapData>>, flows: Arc<FlowBuffer>) {
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            ready = ring.readable_mut() => match ready {
                Ok(mut guard) => {
                    drain(guard.get_inner_mut(), &flows, &mut batch);
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!(error = %e, "waiting on the event ring failed; draining on the timer only");
                    return poll_only(ring, flows, batch).await;
                }
            },
            () = flows.drain_wanted() => drain(ring.get_mut(), &flows, &mut batch),
            _ = tick.tick() => drain(ring.get_mut(), &flows, &mut batch),
        }
    }
}

async fn poll_only(
    mut ring: AsyncFd<RingBuf<MapData>>,
    flows: Arc<FlowBuffer>,
    mut batch: Vec<FlowEvent>,
) {
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    loop {
        tokio::select! {
            () = flows.drain_wanted() => {}
            _ = tick.tick() => {}
        }
        drain(ring.get_mut(), &flows, &mut batch);
    }
}

/// Copies every pending record out of the ring into `batch` (allocated once, by the
/// caller) and pushes them raw, [`BATCH`] at a time: nothing is named or allocated here.
fn drain(ring: &mut RingBuf<MapData>, flows: &FlowBuffer, batch: &mut Vec<FlowEvent>) {
    while let Some(record) = ring.next() {
        match FlowEvent::from_bytes(&record) {
            Some(event) => batch.push(event),
            None => warn!(len = record.len(), "short flow event record"),
        }
        if batch.len() == BATCH {
            flows.push_all(batch);
            batch.clear();
        }
    }
    flows.push_all(batch);
    batch.clear();
    flows.drained();
}
