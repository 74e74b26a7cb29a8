//! The lab's state directory: its lock, and the journal of namespaces `lab down` removes.

use std::{
    fs::{self, File},
    io::Write,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use nix::fcntl::{Flock, FlockArg};

use crate::{LabError, POLL, error::io_err};

/// Takes the lab's lock file exclusively (held until the returned value drops); with `wait`,
/// gives up after that long.
pub(crate) fn lock(dir: &Path, wait: Option<Duration>) -> Result<Flock<File>, LabError> {
    let path = dir.join("lock");
    let deadline = wait.map(|w| Instant::now() + w);
    loop {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let arg = if deadline.is_some() {
            FlockArg::LockExclusiveNonblock
        } else {
            FlockArg::LockExclusive
        };
        match Flock::lock(file, arg) {
            Ok(lock) => return Ok(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK))
                if deadline.is_some_and(|d| Instant::now() < d) =>
            {
                thread::sleep(POLL);
            }
            Err((_, source)) => {
                return Err(LabError::Sys {
                    call: "flock",
                    source,
                });
            }
        }
    }
}

/// Records a namespace name before it is created, so `lab down` finds it even when
/// `lab.json` never learned about it.
pub(crate) fn journal_netns(dir: &Path, netns: &str) -> Result<(), LabError> {
    let path = dir.join("netns");
    let mut f = File::options()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    writeln!(f, "{netns}").map_err(io_err("write", &path))?;
    f.sync_data().map_err(io_err("fsync", &path))
}

pub(crate) fn remove_tree(path: &Path) -> Result<(), LabError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LabError::Io {
            call: "remove_dir_all",
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}
