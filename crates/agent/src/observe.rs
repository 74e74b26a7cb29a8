//! The observer's agent side: configures the datapath's events, reads the ring buffer and
//! pushes each event, named by the current desired state, into the flow buffer.

use std::{
    path::Path,
    sync::{Arc, RwLock},
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
/// The datapath wakes the reader only once the ring holds 64 events; this drains the rest.
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

/// The resolver the reader names events with, replaced whenever the desired state changes.
pub struct Names {
    node: String,
    /// Wall clock minus CLOCK_MONOTONIC at start: event times are monotonic.
    boot_offset_ns: i64,
    current: RwLock<(u64, Arc<Resolver>)>,
}

impl Names {
    pub fn new(node: &str) -> Result<Self, AgentError> {
        let boot_offset_ns = boot_offset_ns()?;
        let before_first = Resolver::for_node(node, boot_offset_ns);
        Ok(Self {
            node: node.to_string(),
            boot_offset_ns,
            current: RwLock::new((u64::MAX, Arc::new(before_first))),
        })
    }

    /// Rebuilds the resolver if `version` of the desired state is not the one it has.
    pub fn update(&self, version: u64, desired: &DesiredState, snapshot: &Snapshot) {
        if self.read().0 == version {
            return;
        }
        let resolver = Arc::new(Resolver::new(
            &self.node,
            self.boot_offset_ns,
            desired,
            snapshot,
        ));
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (version, resolver);
    }

    fn resolver(&self) -> Arc<Resolver> {
        Arc::clone(&self.read().1)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, (u64, Arc<Resolver>)> {
        // A panicked writer leaves a whole tuple behind: keep using it.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// Drains the ring whenever the datapath wakes it (>= 64 events pending), when a reader of
/// the flows asks, and every 100 ms.
pub async fn read_events(
    mut ring: AsyncFd<RingBuf<MapData>>,
    names: Arc<Names>,
    flows: Arc<FlowBuffer>,
) {
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ready = ring.readable_mut() => match ready {
                Ok(mut guard) => {
                    drain(guard.get_inner_mut(), &names, &flows);
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!(error = %e, "waiting on the event ring failed; draining on the timer only");
                    return poll_only(ring, names, flows).await;
                }
            },
            () = flows.drain_wanted() => drain(ring.get_mut(), &names, &flows),
            _ = tick.tick() => drain(ring.get_mut(), &names, &flows),
        }
    }
}

async fn poll_only(mut ring: AsyncFd<RingBuf<MapData>>, names: Arc<Names>, flows: Arc<FlowBuffer>) {
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    loop {
        tokio::select! {
            () = flows.drain_wanted() => {}
            _ = tick.tick() => {}
        }
        drain(ring.get_mut(), &names, &flows);
    }
}

fn drain(ring: &mut RingBuf<MapData>, names: &Names, flows: &FlowBuffer) {
    let resolver = names.resolver();
    while let Some(record) = ring.next() {
        match FlowEvent::from_bytes(&record) {
            Some(event) => flows.push(resolver.flow(&event)),
            None => warn!(len = record.len(), "short flow event record"),
        }
    }
    flows.drained();
}
