//! Where the desired objects come from. A [`Source`] runs on a thread of its own and hands
//! the agent whole snapshots; the agent numbers each one it accepts with a generation of its
//! own. The lab's cluster file is one source; the Kubernetes API (kube-rs watchers) is
//! the other.

mod cluster_file;
mod debounce;
pub mod kubernetes;
mod slim;

use std::{path::PathBuf, sync::Arc};

pub use cluster_file::ClusterFile;
pub use kubernetes::{Kubernetes, KubernetesConfig};
pub use slim::slimmed;
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

/// The agent's end of a source: only the newest snapshot it has not taken yet matters, so
/// a burst of changes costs one pass. Every source's snapshots are checked here, whole.
pub struct Updates {
    tx: watch::Sender<Arc<Snapshot>>,
    node_ports: NodePortRange,
}

impl Updates {
    pub fn new(tx: watch::Sender<Arc<Snapshot>>, node_ports: NodePortRange) -> Self {
        Self { tx, node_ports }
    }

    /// Offers `snapshot` to the agent; false once the agent has stopped listening. A
    /// snapshot whose Services clash on a node port, or use one outside the range, is
    /// refused whole and logged with the object and field: the agent keeps the last one it
    /// accepted, so nothing of it is applied.
    pub fn send(&self, snapshot: Snapshot) -> bool {
        if let Err(e) = validate_services(&snapshot.services, self.node_ports) {
            error!(revision = snapshot.revision, error = %e, "snapshot refused");
            return !self.tx.is_closed();
        }
        self.tx.send(Arc::new(snapshot)).is_ok()
    }
}

impl Updates {
    /// Resolves once the agent has stopped listening, for an async source to stop.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// Starts the configured source on its own thread. The receiver's first change is the
/// source's first snapshot; `changed()` failing means the source ended.
pub fn start(
    config: &SourceConfig,
    node_ports: NodePortRange,
    stats: kubernetes::SourceStats,
) -> Result<watch::Receiver<Arc<Snapshot>>, AgentError> {
    let source: Box<dyn Source> = match config {
        SourceConfig::ClusterFile(path) => Box::new(ClusterFile::open(path.clone())?),
        SourceConfig::Kubernetes(config) => Box::new(Kubernetes::open(config.clone(), stats)?),
    };
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let name = source.describe();
    std::thread::Builder::new()
        .name("source".into())
        .spawn(move || match source.run(&Updates::new(tx, node_ports)) {
            Ok(()) => info!(source = %name, "source stopped"),
            Err(e) => error!(source = %name, error = %e, "source ended"),
        })
        .map_err(|source| AgentError::Io {
            call: "spawn",
            path: PathBuf::from("source"),
            source,
        })?;
    Ok(rx)
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
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let updates = Updates::new(tx, "30000-30100".parse().unwrap());
        assert!(updates.send(with_node_port(1, "web", 30080)));
        assert_eq!(rx.borrow().revision, 1);
        // Outside the configured range: the agent keeps revision 1.
        assert!(updates.send(with_node_port(2, "web", 30200)));
        assert_eq!(rx.borrow().revision, 1);
        let mut clash = with_node_port(3, "web", 30080);
        clash
            .services
            .extend(with_node_port(3, "api", 30080).services);
        assert!(updates.send(clash));
        assert_eq!(rx.borrow().revision, 1);
        drop(rx);
        assert!(!updates.send(with_node_port(4, "web", 30080)));
    }
}
