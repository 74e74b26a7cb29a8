//! The observer's agent side: configures the datapath's events, reads the ring buffer and
//! pushes the events, raw, into the flow buffer, which names them when they are read.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use sluice_common::{EVENT_CONFIG_F_ENABLED, EventConfig, FlowEvent};
use sluice_compiler::DesiredState;
use sluice_datapath::PinnedMaps;
use sluice_observer::{FlowBuffer, Resolver};
use sluice_store::Snapshot;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

use crate::AgentError;

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

/// Builds the resolver the flow buffer names events with whenever the desired state
/// changes.
pub struct Names {
    node: String,
    /// Wall clock minus CLOCK_MONOTONIC at start: event times are monotonic.
    boot_offset_ns: i64,
    /// The version of the desired state the buffer's resolver was built from; u64::MAX
    /// before the first.
    version: Mutex<u64>,
    flows: Arc<FlowBuffer>,
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
            version: Mutex::new(u64::MAX),
            flows: Arc::clone(&flows),
        };
        Ok((names, flows))
    }

    /// Rebuilds the resolver if `version` of the desired state is not the one it has.
    pub fn update(&self, version: u64, desired: &DesiredState, snapshot: &Snapshot) {
        let mut current = self
            .version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *current == version {
            return;
        }
        let resolver = Resolver::new(&self.node, self.boot_offset_ns, desired, snapshot);
        self.flows.set_resolver(Arc::new(resolver));
        *current = version;
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
