//! Where the desired objects come from. A [`Source`] runs on a thread of its own and hands
//! the agent whole snapshots, each with the change set that leads to it when the source
//! knows it (`changes.rs`); the agent numbers each one it accepts with a generation of its
//! own. The lab's cluster file is one source; the Kubernetes API (kube-rs watchers) is
//! the other.

pub mod changes;
mod cluster_file;
mod debounce;
pub mod kubernetes;
mod slim;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
};

pub use cluster_file::ClusterFile;
pub use kubernetes::{Kubernetes, KubernetesConfig};
pub use slim::slimmed;
use sluice_compiler::Changes;
use sluice_sources::{NodePortRange, validate_services};
use sluice_store::Snapshot;
use tokio::sync::watch;
use tracing::{error, info};

use crate::AgentError;

/// Which source an agent reads.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A snapshot file that the lab (in the roles of the API server and the CNI plugin)
    /// replaces atomically.
    ClusterFile(PathBuf),
    /// The API server's objects, through its list and watch API.
    Kubernetes(KubernetesConfig),
}

/// A producer of snapshots. It runs on a thread of its own, so a blocking reader (inotify)
/// needs nothing more, and an async one (kube-rs watchers) drives its streams there on a
/// current-thread runtime of its own, apart from the agent's.
pub trait Source: Send + 'static {
    /// Names the source in logs.
    fn describe(&self) -> String;

    /// Sends a whole snapshot once it knows the objects, and again whenever they change;
    /// returns when the source ends for good or [`Updates::send`] says nobody listens.
    /// The agent keeps the last snapshot after that and goes on reconciling.
    fn run(self: Box<Self>, updates: &Updates) -> Result<(), AgentError>;
}

/// The source's end of the channel to the agent: only the newest snapshot the agent has
/// not taken yet matters, so a burst of changes costs one pass; their change sets are
/// merged until the agent takes them. Every source's snapshots are checked here, whole.
pub struct Updates {
    tx: watch::Sender<Arc<Snapshot>>,
    node_ports: NodePortRange,
    /// The changes from the snapshot the agent took last to the newest one; None when
    /// not known. Locked around the snapshot's send and take, so the two always match.
    changes: Arc<Mutex<Option<Changes>>>,
}

impl Updates {
    pub fn new(tx: watch::Sender<Arc<Snapshot>>, node_ports: NodePortRange) -> Self {
        Self {
            tx,
            node_ports,
            changes: Arc::new(Mutex::new(None)),
        }
    }

    /// The channel from a source to the agent.
    pub fn channel(node_ports: NodePortRange) -> (Self, Feed) {
        let (tx, snapshots) = watch::channel(Arc::new(Snapshot::default()));
        let updates = Self::new(tx, node_ports);
        let feed = Feed {
            snapshots,
            changes: Arc::clone(&updates.changes),
        };
        (updates, feed)
    }

    /// Offers `snapshot` to the agent with what changed since the source's previous one
    /// (`changes`; None: not known); false once the agent has stopped listening. A
    /// snapshot whose Services clash on a node port, or use one outside the range, is
    /// refused whole and logged with the object and field: the agent keeps the last one it
    /// accepted, so nothing of it is applied (and the next one's changes are not known).
    pub fn send(&self, snapshot: impl Into<Arc<Snapshot>>, changes: Option<Changes>) -> bool {
        let snapshot = snapshot.into();
        // Checked before the lock: the agent's loop takes it.
        let valid = validate_services(&snapshot.services, self.node_ports);
        let mut pending = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = valid {
            error!(revision = snapshot.revision, error = %e, "snapshot refused");
            *pending = None;
            return !self.tx.is_closed();
        }
        changes::merge(&mut pending, changes);
        self.tx.send(snapshot).is_ok()
    }

    /// Resolves once the agent has stopped listening, for an async source to stop.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// The agent's end of a source.
pub struct Feed {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    changes: Arc<Mutex<Option<Changes>>>,
}

impl Feed {
    /// Waits for a snapshot not taken yet; an error once the source has ended.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.snapshots.changed().await
    }

    /// The newest snapshot, with the changes since the one taken last (None: not known).
    pub fn take(&mut self) -> (Arc<Snapshot>, Option<Changes>) {
        let mut pending = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        let snapshot = Arc::clone(&self.snapshots.borrow_and_update());
        // From here on, changes are counted from this snapshot.
        let changes = pending.replace(Changes::default());
        (snapshot, changes)
    }
}

/// Starts the configured source on its own thread. The receiver's first change is the
/// source's first snapshot; `changed()` failing means the source ended.
pub fn start(
    config: &SourceConfig,
    node_ports: NodePortRange,
    stats: kubernetes::SourceStats,
) -> Result<Feed, AgentError> {
    let source: Box<dyn Source> = match config {
        SourceConfig::ClusterFile(path) => Box::new(ClusterFile::open(path.clone())?),
        SourceConfig::Kubernetes(config) => Box::new(Kubernetes::open(config.clone(), stats)?),
    };
    let (updates, feed) = Updates::channel(node_ports);
    let name = source.describe();
    std::thread::Builder::new()
        .name("source".into())
        .spawn(move || match source.run(&updates) {
            Ok(()) => info!(source = %name, "source stopped"),
            Err(e) => error!(source = %name, error = %e, "source ended"),
        })
        .map_err(|source| AgentError::Io {
            call: "spawn",
            path: PathBuf::from("source"),
            source,
        })?;
    Ok(feed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test")]

    use super::*;

    fn with_node_port(revision: u64, name: &str, node_port: i32) -> Snapshot {
        let service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": node_port}]},
        }))
        .unwrap();
        Snapshot {
            revision,
            services: vec![service],
            ..Snapshot::default()
        }
    }

    #[test]
    fn a_snapshot_with_a_bad_node_port_is_refused_whole() {
        let (updates, mut feed) = Updates::channel("30000-30100".parse().unwrap());
        assert!(updates.send(with_node_port(1, "web", 30080), None));
        assert_eq!(feed.take().0.revision, 1);
        let known = Some(Changes::default());
        assert!(updates.send(with_node_port(2, "web", 30081), known.clone()));
        let (snapshot, changes) = feed.take();
        assert_eq!(snapshot.revision, 2);
        assert!(changes.is_some(), "the source's change set");
        // Outside the configured range: the agent keeps revision 2.
        assert!(updates.send(with_node_port(3, "web", 30200), known.clone()));
        assert_eq!(feed.take().0.revision, 2);
        let mut clash = with_node_port(4, "web", 30080);
        clash
            .services
            .extend(with_node_port(4, "api", 30080).services);
        assert!(updates.send(clash, known.clone()));
        assert!(updates.send(with_node_port(5, "web", 30082), known));
        let (snapshot, changes) = feed.take();
        assert_eq!(snapshot.revision, 5);
        assert!(
            changes.is_none(),
            "after a refused snapshot the changes are not known"
        );
        drop(feed);
        assert!(!updates.send(with_node_port(6, "web", 30080), None));
    }
}
