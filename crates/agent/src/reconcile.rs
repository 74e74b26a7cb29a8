//! The reconcile loop: takes snapshots from the source, runs a change pass on every new one
//! and a full pass on a periodic tick, and answers verify requests between passes. Each step runs on
//! the blocking pool with the [`Node`] moved into it, so no lock exists for an API request
//! to wait on; after each step the loop publishes what the API reads.

use std::{sync::Arc, time::Duration, time::Instant};

use arc_swap::ArcSwap;
use sluice_api::{Fault, VerifyReport};
use tokio::{
    signal::unix::{Signal, SignalKind},
    sync::{mpsc, oneshot, watch},
};
use tracing::{info, warn};

use crate::{
    AgentError, Node, Pass, cni::LocalEndpoints, conntrack::Removal, health::HealthServers,
    http::Readiness, metrics::Metrics, observe::Names, source::Feed, views::Published,
};

/// What the API asks of the loop: work that writes the kernel or must not overlap a pass.
pub enum Request {
    Verify {
        repair: bool,
        reply: oneshot::Sender<Result<VerifyReport, AgentError>>,
    },
}

pub struct Loop {
    pub node: Node,
    pub snapshots: Feed,
    /// The CNI plugin's endpoints, compiled beside every snapshot the source hands over.
    pub local_endpoints: watch::Receiver<LocalEndpoints>,
    pub requests: mpsc::Receiver<Request>,
    pub published: Arc<ArcSwap<Published>>,
    /// Told after every publication (the CNI ADD waits on it for its realized generation).
    pub changes: watch::Sender<()>,
    pub names: Arc<Names>,
    pub metrics: Metrics,
    /// Set after the first pass that realized a snapshot of the source (`/readyz`).
    pub readiness: Readiness,
    /// How often a full pass re-reads the kernel, whatever changed upstream.
    pub interval: Duration,
}

impl Loop {
    /// Runs until SIGTERM or SIGINT; a pass in progress finishes first.
    pub async fn run(self) -> Result<(), AgentError> {
        let Loop {
            mut node,
            mut snapshots,
            mut local_endpoints,
            mut requests,
            published,
            changes,
            names,
            metrics,
            readiness,
            interval,
        } = self;
        // A tick before the first snapshot does nothing; the first pass is full and resets
        // the tick below, so a tick ready beside the first snapshot makes no second pass.
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut source_open = true;
        let mut registry_open = true;
        let mut health = HealthServers::default();
        let publish = |state: Published| {
            published.store(Arc::new(state));
            changes.send_replace(());
        };
        loop {
            let pass = tokio::select! {
                changed = snapshots.changed(), if source_open => {
                    if changed.is_err() {
                        // Only the periodic pass is left; it still repairs drift.
                        source_open = false;
                        if !node.has_snapshot() {
                            return Err(AgentError::NoSnapshot);
                        }
                        warn!("source ended; keeping the last snapshot");
                        continue;
                    }
                    let (snapshot, changes) = snapshots.take();
                    // The first snapshot takes the endpoints read at start with it.
                    let endpoints = (!node.has_snapshot()
                        || local_endpoints.has_changed().unwrap_or(false))
                    .then(|| Arc::clone(&local_endpoints.borrow_and_update()));
                    node.accept(snapshot, changes, endpoints);
                    publish(node.published());
                    Pass::Change
                }
                changed = local_endpoints.changed(), if registry_open => {
                    if changed.is_err() {
                        registry_open = false;
                        continue;
                    }
                    // Before the source's first snapshot a pass would empty the pinned
                    // maps; that snapshot takes the endpoints with it.
                    if !node.has_snapshot() {
                        continue;
                    }
                    node.accept_endpoints(Arc::clone(&local_endpoints.borrow_and_update()));
                    publish(node.published());
                    Pass::Change
                }
                _ = tick.tick() => {
                    if !node.has_snapshot() {
                        continue;
                    }
                    Pass::Periodic
                }
                Some(request) = requests.recv() => {
                    node = step(node, move |node| request.answer(node)).await?;
                    // verify --repair pins again what it found gone.
                    for pin in node.take_pins_restored() {
                        metrics.repairs().record(Fault::PinRemoved, pin);
                    }
                    continue;
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            };
            let (names, metrics, ready) = (Arc::clone(&names), metrics.clone(), readiness.clone());
            node = step(node, move |node| {
                let started = Instant::now();
                let ok = node.reconcile(pass);
                metrics.observe_reconcile(started.elapsed(), ok);
                metrics.count_ct_removed(Removal::BackendRemoved, node.take_purged());
                if let Some(map) = node.full_map() {
                    metrics.count_map_full(map);
                }
                for pin in node.take_pins_restored() {
                    metrics.repairs().record(Fault::PinRemoved, pin);
                }
                // Only a snapshot the source delivered makes the agent ready.
                if ok && node.has_snapshot() {
                    ready.set();
                }
                node.name_flows(&names);
            })
            .await?;
            // The next full pass comes an interval after this one, not right after the
            // first pass or one after a failure.
            if node.last_pass_full() {
                tick.reset();
            }
            let state = node.published();
            health.follow(&state.desired).await;
            publish(state);
        }
        info!("agent stopping; pinned maps and links keep the datapath running");
        Ok(())
    }
}

impl Request {
    fn answer(self, node: &mut Node) {
        match self {
            Request::Verify { repair, reply } => {
                // Against an empty snapshot a repair would empty the pinned maps.
                let report = if node.has_snapshot() {
                    node.verify(repair)
                } else {
                    Err(AgentError::NoSnapshot)
                };
                // The asker may have hung up; the repair is done either way.
                let _ = reply.send(report);
            }
        }
    }
}

/// Runs `f` on the blocking pool and hands the node back.
async fn step(
    mut node: Node,
    f: impl FnOnce(&mut Node) + Send + 'static,
) -> Result<Node, AgentError> {
    Ok(tokio::task::spawn_blocking(move || {
        f(&mut node);
        node
    })
    .await?)
}

fn signal(kind: SignalKind) -> Result<Signal, AgentError> {
    tokio::signal::unix::signal(kind).map_err(|source| AgentError::Io {
        call: "sigaction",
        path: std::path::PathBuf::new(),
        source,
    })
}
