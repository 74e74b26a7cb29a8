//! The sluice agent, one per node.
//!
//! Data flows one way: the [`source`] turns the cluster file into store snapshots; on every
//! new snapshot and on a periodic tick, [`node::Node::reconcile`] compiles the snapshot into
//! the desired content of every map and hands it to the realizer, which diffs it against the
//! kernel and applies the difference. The periodic pass is what repairs drift: it re-reads the
//! kernel even when nothing upstream changed. [`server`] answers the CLI on a Unix socket.

mod http;
pub mod metrics;
mod node;
mod observe;
pub mod policy_log;
mod server;
mod source;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

pub use node::Node;
pub use observe::{DEFAULT_EVENT_BURST, DEFAULT_EVENT_RATE, EventsConfig};
use tokio::sync::Mutex;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    // Boxed: the datapath's error is large and every agent result would carry its size.
    #[error(transparent)]
    Datapath(Box<sluice_datapath::DatapathError>),
    #[error(transparent)]
    Realizer(#[from] sluice_realizer::RealizerError),
    #[error(transparent)]
    Store(#[from] sluice_store::StoreError),
    #[error("{call} {path}: {source}")]
    Io {
        call: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{call}: {source}")]
    Sys {
        call: &'static str,
        source: nix::Error,
    },
    /// An API request the agent cannot answer: an unknown endpoint or identity, or
    /// missing params.
    #[error("{0}")]
    Query(String),
    #[error("reading map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
}

impl From<sluice_datapath::DatapathError> for AgentError {
    fn from(e: sluice_datapath::DatapathError) -> Self {
        AgentError::Datapath(Box::new(e))
    }
}

/// Everything the agent needs to know at start.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node: String,
    /// Snapshot written by the lab (later: produced by the Kubernetes watchers).
    pub cluster_file: PathBuf,
    /// bpffs directory for this agent's maps and links.
    pub pin_dir: PathBuf,
    pub api_socket: PathBuf,
    /// How often a full reconcile re-reads the kernel, whatever changed upstream.
    pub reconcile_interval: Duration,
    /// Rows each endpoint's policy map holds; a policy that needs more fails closed.
    pub policy_map_max: u32,
    pub datapath: sluice_datapath::DatapathConfig,
    /// Flows the observer keeps for `sluice observe --last`.
    pub flows_max: usize,
    /// Which datapath events to emit, at what rate.
    pub events: EventsConfig,
    /// Where to serve Prometheus metrics (`GET /metrics`); None: not served.
    pub metrics_address: Option<SocketAddr>,
    /// Policy action log; None: off.
    pub policy_log: Option<policy_log::PolicyLogConfig>,
}

/// Runs the agent until SIGTERM or SIGINT. Pinned maps and links stay, so traffic keeps
/// flowing while the agent is down and a new agent picks up where this one stopped.
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    let node = Arc::new(Mutex::new(Node::start(&config)?));
    // The observer's flows: the API serves them, the policy log subscribes to them.
    let flows = Arc::new(sluice_observer::FlowBuffer::new(config.flows_max));
    observe::configure_events(&config.pin_dir, config.events)?;
    let names = Arc::new(observe::Names::new(&config.node)?);
    tokio::spawn(observe::read_events(
        observe::open(&config.pin_dir)?,
        Arc::clone(&names),
        Arc::clone(&flows),
    ));
    let mut snapshots = source::watch(config.cluster_file.clone())?;
    node.lock()
        .await
        .set_snapshot(Arc::clone(&snapshots.borrow_and_update()));
    let listener = server::bind(&config.api_socket)?;
    tokio::spawn(server::serve(
        listener,
        Arc::clone(&node),
        Arc::clone(&flows),
    ));

    let metrics = metrics::Metrics::default();
    let readiness = http::Readiness::default();
    if let Some(address) = config.metrics_address {
        // Handles of its own on the pinned maps: a scrape never waits for the node's lock.
        let maps = Arc::new(sluice_datapath::PinnedMaps::open(&config.pin_dir)?);
        let scrape = metrics.clone();
        let render: http::Render =
            Arc::new(move || Ok((scrape.render(&maps)?, metrics::CONTENT_TYPE)));
        let listener = http::bind(address).await?;
        info!(%address, "serving metrics");
        tokio::spawn(http::serve(listener, render, readiness.clone()));
    }
    if let Some(log) = &config.policy_log {
        let logger = policy_log::PolicyLogger::start(log, metrics.policy_log_suppressed())?;
        info!(path = %log.path.display(), mode = ?log.mode, "policy action log");
        tokio::spawn(policy_log::follow(flows.subscribe(), logger));
    }

    let mut tick = tokio::time::interval(config.reconcile_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = signal(tokio::signal::unix::SignalKind::interrupt())?;
    info!(node = %config.node, "agent running");
    loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    warn!("cluster source stopped; keeping the last snapshot");
                    // Without a source only the periodic reconcile is left.
                    std::future::pending::<()>().await;
                }
                let snapshot = Arc::clone(&snapshots.borrow_and_update());
                node.lock().await.set_snapshot(snapshot);
            }
            _ = tick.tick() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        let mut guard = node.lock().await;
        let started = Instant::now();
        let ok = guard.reconcile();
        metrics.observe_reconcile(started.elapsed(), ok);
        if ok {
            readiness.set();
        }
        guard.name_flows(&names);
    }
    info!("agent stopping; pinned maps and links keep the datapath running");
    let _ = std::fs::remove_file(&config.api_socket);
    Ok(())
}

fn signal(
    kind: tokio::signal::unix::SignalKind,
) -> Result<tokio::signal::unix::Signal, AgentError> {
    tokio::signal::unix::signal(kind).map_err(|source| AgentError::Io {
        call: "sigaction",
        path: PathBuf::new(),
        source,
    })
}
