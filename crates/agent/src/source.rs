//! The cluster-file source: the lab (in the role of the API server and the CNI plugin)
//! writes a snapshot file atomically; this module reads it whenever it is replaced.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use sluice_store::Snapshot;
use tokio::sync::watch;
use tracing::warn;

use crate::AgentError;

/// Starts watching `path`; the receiver always holds the newest snapshot that parsed.
/// A missing file is an empty snapshot at generation 0.
pub fn watch(path: PathBuf) -> Result<watch::Receiver<Arc<Snapshot>>, AgentError> {
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let name: OsString = path.file_name().map(OsString::from).unwrap_or_default();
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(|source| AgentError::Sys {
        call: "inotify_init",
        source,
    })?;
    inotify
        .add_watch(
            &dir,
            AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO,
        )
        .map_err(|source| AgentError::Sys {
            call: "inotify_add_watch",
            source,
        })?;

    let (tx, rx) = watch::channel(Arc::new(read(&path).unwrap_or_default()));
    std::thread::Builder::new()
        .name("cluster-source".into())
        .spawn(move || {
            loop {
                match inotify.read_events() {
                    Ok(events)
                        if events
                            .iter()
                            .any(|e| e.name.as_deref() == Some(name.as_os_str())) =>
                    {
                        if let Some(snapshot) = read(&path) {
                            let newer = snapshot.generation != tx.borrow().generation;
                            if newer && tx.send(Arc::new(snapshot)).is_err() {
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!(error = %e, "inotify read failed; retrying");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .map_err(|source| AgentError::Io {
            call: "spawn",
            path: PathBuf::from("cluster-source"),
            source,
        })?;
    Ok(rx)
}

fn read(path: &Path) -> Option<Snapshot> {
    match Snapshot::read_file(path) {
        Ok(s) => Some(s),
        Err(sluice_store::StoreError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            None
        }
        Err(e) => {
            warn!(error = %e, "ignoring unreadable snapshot; keeping the previous one");
            None
        }
    }
}
