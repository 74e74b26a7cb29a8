//! Where the desired objects come from. A [`Source`] runs on a thread of its own and hands
//! the agent whole snapshots; the agent numbers each one it accepts with a generation of its
//! own. The lab's cluster file is one source; the Kubernetes watchers slot in beside it as
//! another variant of [`SourceConfig`].

mod cluster_file;

use std::{path::PathBuf, sync::Arc};

pub use cluster_file::ClusterFile;
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
/// a burst of changes costs one pass.
pub struct Updates(watch::Sender<Arc<Snapshot>>);

impl Updates {
    /// Offers `snapshot` to the agent; false once the agent has stopped listening.
    pub fn send(&self, snapshot: Snapshot) -> bool {
        self.0.send(Arc::new(snapshot)).is_ok()
    }
}

/// Starts the configured source on its own thread. The receiver's first change is the
/// source's first snapshot; `changed()` failing means the source ended.
pub fn start(config: &SourceConfig) -> Result<watch::Receiver<Arc<Snapshot>>, AgentError> {
    let source: Box<dyn Source> = match config {
        SourceConfig::ClusterFile(path) => Box::new(ClusterFile::open(path.clone())?),
    };
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let name = source.describe();
    std::thread::Builder::new()
        .name("source".into())
        .spawn(move || match source.run(&Updates(tx)) {
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
