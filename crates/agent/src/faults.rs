//! Faults repaired behind the agent's back: what `status` lists and the metrics count
//! (`sluice_faults_repaired_total`). Pins are checked by the reconcile loop (`pins`); the
//! API socket and the state directory by [`watch_files`], which binds the socket again and
//! writes the CNI endpoint registry again when either was removed.

use std::{
    collections::BTreeMap,
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
};
use sluice_api::{Fault, RepairedFault};
use tokio::{net::UnixListener, sync::oneshot};
use tracing::warn;

use crate::{cni::Cni, server};

/// How often the socket and the state directory are looked at.
const FILE_CHECK: Duration = Duration::from_secs(1);

/// Repairs by fault and object since the start; cheap clones share the same counts.
#[derive(Clone, Debug, Default)]
pub struct Repairs(Arc<Mutex<BTreeMap<(Fault, String), u64>>>);

impl Repairs {
    pub fn record(&self, fault: Fault, object: String) {
        *self.lock().entry((fault, object)).or_default() += 1;
    }

    /// Every repair, by fault and object.
    pub fn list(&self) -> Vec<RepairedFault> {
        self.lock()
            .iter()
            .map(|((fault, object), count)| RepairedFault {
                fault: *fault,
                object: object.clone(),
                count: *count,
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<(Fault, String), u64>> {
        // Counts only: whatever a panicking holder left is still a count.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Collector for Repairs {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "sluice_faults_repaired",
            "Faults found behind the agent's back and repaired: pin-removed (a pinned map \
             or link pinned again), api-socket-removed (bound again), state-removed (the \
             CNI endpoint registry written again), by object",
            None,
            MetricType::Counter,
        )?;
        for repaired in self.list() {
            let labels = [
                ("fault", repaired.fault.as_str()),
                ("object", repaired.object.as_str()),
            ];
            ConstCounter::new(repaired.count).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Starts serving the API on `listener` until told to stop, then lets its connections
/// finish.
pub type Serve = dyn Fn(UnixListener, oneshot::Receiver<()>) + Send;

/// Serves the API on `listener` (bound at `socket`) and keeps it reachable: when the
/// socket file is removed or replaced, binds it again and serves there (the old listener's
/// connections finish); when the CNI endpoint registry's file is removed, writes it again
/// from memory, so a restart does not hand its addresses out twice. Runs until the agent
/// stops.
pub async fn watch_files(
    socket: PathBuf,
    listener: UnixListener,
    serve: Box<Serve>,
    cni: Arc<Cni>,
    repairs: Repairs,
) {
    let mut inode = server::socket_inode(&socket);
    let (mut stop, stopped) = oneshot::channel();
    serve(listener, stopped);
    let mut tick = tokio::time::interval(FILE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if server::socket_inode(&socket) != inode {
            match server::bind(&socket) {
                Ok(listener) => {
                    warn!(path = %socket.display(), "API socket removed behind the agent's back; bound again");
                    repairs.record(Fault::ApiSocketRemoved, socket.display().to_string());
                    inode = server::socket_inode(&socket);
                    let (next, stopped) = oneshot::channel();
                    // The old server may have ended already; nothing is left to stop then.
                    let _ = std::mem::replace(&mut stop, next).send(());
                    serve(listener, stopped);
                }
                Err(e) => warn!(error = %e, "API socket removed; binding it again failed"),
            }
        }
        match cni.restore_state().await {
            Ok(Some(path)) => {
                warn!(path = %path.display(), "CNI endpoint registry removed behind the agent's back; written again");
                repairs.record(Fault::StateRemoved, path.display().to_string());
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "CNI endpoint registry removed; writing it again failed"),
        }
    }
}
