//! The cluster-file source: the lab writes a snapshot file through a temporary file and a
//! rename; this reads it whenever it is replaced, and names what changed by comparing it
//! with the one it sent before, object by object (the lab's files are small).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use sluice_store::Snapshot;
use tracing::warn;

use super::{Source, Updates, changes};
use crate::AgentError;

pub struct ClusterFile {
    path: PathBuf,
    dir: PathBuf,
    name: OsString,
    /// Watches the directory, not the file: a rename replaces the file's inode.
    inotify: Inotify,
}

impl ClusterFile {
    /// Starts watching `path`'s directory, so no replacement after this call is missed.
    pub fn open(path: PathBuf) -> Result<Self, AgentError> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let name = path.file_name().map(OsString::from).unwrap_or_default();
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(|source| AgentError::Sys {
            call: "inotify_init",
            source,
        })?;
        inotify
            .add_watch(
                &dir,
                AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_MOVE_SELF,
            )
            .map_err(|source| AgentError::Sys {
                call: "inotify_add_watch",
                source,
            })?;
        Ok(Self {
            path,
            dir,
            name,
            inotify,
        })
    }
}

impl Source for ClusterFile {
    fn describe(&self) -> String {
        format!("cluster file {}", self.path.display())
    }

    /// Nothing is sent until the file exists: an agent started before the lab wrote it
    /// is not ready (`/readyz`) and keeps what its pins hold. The source ends when its
    /// directory goes away: nothing can replace the file after that.
    fn run(self: Box<Self>, updates: &Updates) -> Result<(), AgentError> {
        // The snapshot sent last, to compare the next one with.
        let mut sent: Option<Arc<Snapshot>> = None;
        let send = |sent: &mut Option<Arc<Snapshot>>, snapshot: Snapshot| {
            let snapshot = Arc::new(snapshot);
            let changes = sent
                .as_deref()
                .and_then(|before| changes::between(before, &snapshot));
            // Kept by reference: the agent holds the same snapshot.
            *sent = Some(Arc::clone(&snapshot));
            updates.send(snapshot, changes)
        };
        if let Some(first) = read(&self.path)
            && !send(&mut sent, first)
        {
            return Ok(());
        }
        let gone =
            AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_IGNORED;
        loop {
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(e) => {
                    warn!(error = %e, "inotify read failed; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if events.iter().any(|e| e.mask.intersects(gone)) {
                return Err(AgentError::SourceGone {
                    path: self.dir.clone(),
                });
            }
            if !events
                .iter()
                .any(|e| e.name.as_deref() == Some(self.name.as_os_str()))
            {
                continue;
            }
            // The same revision written again is no change.
            if let Some(snapshot) = read(&self.path)
                && sent.as_ref().map(|s| s.revision) != Some(snapshot.revision)
                && !send(&mut sent, snapshot)
            {
                return Ok(());
            }
        }
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test")]

    use std::{sync::Arc, time::Duration};

    use tokio::sync::watch;

    use super::*;

    fn snapshot(revision: u64) -> Snapshot {
        Snapshot {
            revision,
            ..Snapshot::default()
        }
    }

    /// The next snapshot the source sends, or None once it has ended.
    fn next(rx: &mut watch::Receiver<Arc<Snapshot>>) -> Option<u64> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), rx.changed())
                .await
                .unwrap()
                .ok()?;
            Some(rx.borrow_and_update().revision)
        })
    }

    /// Removes the directory also when the test fails before it does.
    struct Cleanup(PathBuf);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn sends_each_new_revision_and_ends_with_its_directory() {
        let dir = std::env::temp_dir().join(format!("sluice-cluster-file-{}", std::process::id()));
        let _cleanup = Cleanup(dir.clone());
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.json");
        snapshot(1).write_file(&path).unwrap();
        let source = Box::new(ClusterFile::open(path.clone()).unwrap());
        let (tx, mut rx) = watch::channel(Arc::new(Snapshot::default()));
        let thread = std::thread::spawn(move || source.run(&Updates::new(tx, Default::default())));

        assert_eq!(next(&mut rx), Some(1), "the file as it is at start");
        snapshot(1).write_file(&path).unwrap();
        snapshot(2).write_file(&path).unwrap();
        assert_eq!(
            next(&mut rx),
            Some(2),
            "the same revision again is no change"
        );
        std::fs::write(dir.join("other.json"), "{}").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(next(&mut rx), None, "the source ended");
        let ended = thread.join().unwrap();
        assert!(
            matches!(&ended, Err(AgentError::SourceGone { path }) if *path == dir),
            "{ended:?}"
        );
    }
}
