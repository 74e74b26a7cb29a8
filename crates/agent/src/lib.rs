//! The sluice agent, one per node.
//!
//! Data flows one way: a [`source`] hands the agent whole snapshots; on every new snapshot
//! and on a periodic tick, the [`reconcile`] loop has [`Node`] compile the snapshot into
//! the desired content of every map and realize it (diff against the kernel, apply the
//! difference). The periodic pass is what repairs drift: it re-reads the kernel even when
//! nothing upstream changed. All kernel work runs on the blocking pool; [`server`] answers
//! the CLI on a Unix socket from the state the loop publishes (see [`views`]).

pub mod cni;
mod conntrack;
mod desired;
mod faults;
pub mod health;
mod heap;
mod host_cgroup;
mod http;
pub mod masquerade;
pub mod metrics;
mod node;
mod nodes;
mod observe;
mod pins;
pub mod policy_log;
mod reconcile;
pub mod routing;
mod server;
mod sock_purge;
pub mod source;
mod views;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
pub use conntrack::GcConfig;
pub use node::{Node, Pass};
pub use observe::{DEFAULT_EVENT_BURST, DEFAULT_EVENT_RATE, EventsConfig};
pub use source::SourceConfig;
use tracing::info;

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
    #[error("{path} was removed or moved away")]
    SourceGone { path: PathBuf },
    /// The source has not delivered its first snapshot (or ended without one).
    #[error("no snapshot from the source yet")]
    NoSnapshot,
    #[error(transparent)]
    Netns(#[from] sluice_netns::NetNsError),
    #[error("--routing-mode {mode} needs --underlay-device")]
    NoUnderlay { mode: sluice_common::RoutingMode },
    #[error("--masquerade needs --underlay-device: to_netdev masquerades on it")]
    MasqueradeWithoutUnderlay,
    #[error(
        "--tunnel-device {0:?}: an interface name has 1 to 15 characters and no dot, slash or space"
    )]
    BadTunnelDevice(String),
    /// A device named as the tunnel device exists but is not ours to use.
    #[error(
        "tunnel device {device} is {found}, not a VXLAN device with external and dstport {port}"
    )]
    TunnelDevice {
        device: String,
        found: String,
        port: u16,
    },
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes API config: not in a pod ({incluster}), and no kubeconfig ({kubeconfig})"
    )]
    NoKubeConfig {
        incluster: kube::config::InClusterError,
        kubeconfig: kube::config::KubeconfigError,
    },
    #[error("kubernetes client: {0}")]
    KubeClient(kube::Error),
    #[error("the reconcile loop has stopped")]
    Stopped,
    /// The CNI plugin named an attachment the registry does not hold.
    #[error("no CNI endpoint for container {container_id} interface {ifname}")]
    CniUnknown {
        container_id: String,
        ifname: String,
    },
    /// The agent cannot take pods yet (no Node, no pod CIDR): ask again later.
    #[error("{0}")]
    CniNotReady(String),
    #[error("no free address in the pod CIDR {pod_cidr}")]
    CniPoolExhausted { pod_cidr: ipnet::Ipv4Net },
    /// A CNI request the agent will not carry out, with the field and why.
    #[error("{0}")]
    CniRefused(String),
    #[error("CNI ADD: still waiting after {after:?} for {waiting}")]
    CniTimeout { after: Duration, waiting: String },
    /// The registry's file under --state-dir cannot be read back.
    #[error("CNI endpoint registry {path}: {detail}")]
    CniState { path: PathBuf, detail: String },
    /// A reconcile step or API view on the blocking pool panicked or was cancelled.
    #[error("blocking task: {0}")]
    Blocking(#[from] tokio::task::JoinError),
}

impl AgentError {
    /// The map a pass could not write because it was full, if that is why it failed.
    pub fn full_map(&self) -> Option<&'static str> {
        match self {
            AgentError::Realizer(e) => e.full_map(),
            _ => None,
        }
    }
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
    /// Where the desired objects come from.
    pub source: SourceConfig,
    /// Ports node port Services may use; a snapshot using others is refused.
    pub node_port_range: sluice_sources::NodePortRange,
    /// bpffs directory for this agent's maps and links.
    pub pin_dir: PathBuf,
    pub api_socket: PathBuf,
    /// How often a full reconcile re-reads the kernel, whatever changed upstream.
    pub reconcile_interval: Duration,
    /// Rows each endpoint's policy map holds; a policy that needs more fails closed.
    pub policy_map_max: u32,
    /// The default load-balancing algorithm and the Maglev table size.
    pub balancing: sluice_compiler::Balancing,
    pub datapath: sluice_datapath::DatapathConfig,
    /// Flows the observer keeps for `sluice observe --last`.
    pub flows_max: usize,
    /// Which datapath events to emit, at what rate.
    pub events: EventsConfig,
    /// Where to serve Prometheus metrics (`GET /metrics`); None: not served.
    pub metrics_address: Option<SocketAddr>,
    /// Policy action log; None: off.
    pub policy_log: Option<policy_log::PolicyLogConfig>,
    /// How pod traffic reaches other nodes.
    pub routing: routing::RoutingConfig,
    /// When the conntrack garbage collector runs: its interval and pressure threshold.
    pub ct_gc: GcConfig,
    /// The cgroup of the node's own processes, for socket load balancing; None: no socket
    /// programs.
    pub host_cgroup: Option<PathBuf>,
    /// The parent cgroup of the node's pods, for their socket load balancing; None: the
    /// pods' connections are translated per packet.
    pub pod_cgroup: Option<PathBuf>,
    /// The CNI endpoint registry's directory and how long `ADD` waits.
    pub cni: cni::CniConfig,
}

/// Runs the agent until SIGTERM or SIGINT. Pinned maps and links stay, so traffic keeps
/// flowing while the agent is down and a new agent picks up where this one stopped.
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    // Refused before anything is loaded or created.
    config.routing.validate()?;
    let node = tokio::task::spawn_blocking({
        let config = config.clone();
        move || Node::start(&config)
    })
    .await??;
    // The observer's flows: the API serves them, the policy log subscribes to them.
    let (names, flows) = observe::Names::new(&config.node, config.flows_max)?;
    let names = Arc::new(names);
    observe::configure_events(&config.pin_dir, config.events)?;
    tokio::spawn(observe::read_events(
        observe::open(&config.pin_dir)?,
        Arc::clone(&flows),
    ));
    // Read before anything is served: the plugin's endpoints are compiled with the first
    // snapshot, so a restarted agent keeps policing its pods.
    let (registry, local_endpoints) = cni::Registry::open(&config.node, &config.cni.state_dir)?;
    let published = Arc::new(ArcSwap::from_pointee(node.published()));
    let (changes, changes_rx) = tokio::sync::watch::channel(());
    let cni = cni::Cni::new(
        registry,
        Arc::clone(&published),
        changes_rx,
        config.routing.clone(),
        config.cni.add_timeout,
    );
    let (requests, requests_rx) = tokio::sync::mpsc::channel(8);
    let metrics = metrics::Metrics::default();
    metrics.count_migrated(node.migrated());
    let views = views::Views::new(
        Arc::clone(&published),
        views::ApiMaps::open(&config.pin_dir)?,
        views::GcView {
            metrics: metrics.clone(),
            pressure_threshold: config.ct_gc.pressure_threshold,
        },
        requests,
    );
    let listener = server::bind(&config.api_socket)?;
    let cni = Arc::new(cni);
    let serve: Box<faults::Serve> = Box::new({
        let (views, flows, cni) = (Arc::new(views), Arc::clone(&flows), Arc::clone(&cni));
        move |listener, stop| {
            let (views, flows, cni) = (Arc::clone(&views), Arc::clone(&flows), Arc::clone(&cni));
            tokio::spawn(server::serve(listener, views, flows, cni, stop));
        }
    });
    tokio::spawn(faults::watch_files(
        config.api_socket.clone(),
        listener,
        serve,
        cni,
        metrics.repairs(),
    ));

    let readiness = http::Readiness::default();
    if let Some(address) = config.metrics_address {
        // Handles of its own on the pinned maps: a scrape never waits for a pass.
        let maps = Arc::new(sluice_datapath::PinnedMaps::open(&config.pin_dir)?);
        let (scrape, published) = (metrics.clone(), Arc::clone(&published));
        let render: http::Render = Arc::new(move || {
            let counted = &published.load().counted;
            Ok((scrape.render(&maps, counted)?, metrics::CONTENT_TYPE))
        });
        let listener = http::bind(address).await?;
        info!(%address, "serving metrics");
        tokio::spawn(http::serve(listener, render, readiness.clone()));
    }
    if let Some(log) = &config.policy_log {
        let logger = policy_log::PolicyLogger::start(log, metrics.policy_log_suppressed())?;
        info!(path = %log.path.display(), mode = ?log.mode, "policy action log");
        tokio::spawn(policy_log::follow(flows.subscribe(), logger));
    }

    tokio::spawn({
        let (pin_dir, metrics) = (config.pin_dir.clone(), metrics.clone());
        async move {
            if let Err(e) = conntrack::collect_garbage(pin_dir, config.ct_gc, metrics).await {
                tracing::error!(error = %e, "conntrack GC stopped");
            }
        }
    });

    let snapshots = source::start(
        &config.source,
        config.node_port_range,
        metrics.source_stats(),
    )?;
    info!(node = %config.node, "agent running");
    let result = reconcile::Loop {
        node,
        snapshots,
        local_endpoints,
        requests: requests_rx,
        published,
        changes,
        names,
        metrics,
        readiness,
        interval: config.reconcile_interval,
    }
    .run()
    .await;
    let _ = std::fs::remove_file(&config.api_socket);
    result
}
