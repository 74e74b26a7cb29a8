//! Named network namespaces under /run/netns, made and removed the way `ip netns add/del`
//! makes and removes them (so `ip netns` and every other tool sees them), and code or
//! processes run inside them.
//!
//! A network namespace belongs to a thread, not a process: entering one on a thread of our
//! own leaves the caller's namespace, and the mount namespace (so /sys and bpffs), alone.

use std::{
    ffi::OsStr,
    fs::{self, File},
    os::unix::{
        fs::{MetadataExt, OpenOptionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
};

use nix::{
    errno::Errno,
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
};

use crate::{
    NetNsError,
    error::{io_err, sys_err},
};

/// Where named namespaces are bind-mounted, as iproute2 keeps them.
pub const NETNS_DIR: &str = "/run/netns";

/// Serializes making /run/netns a shared mount within this process: two threads that both
/// found it unmounted would otherwise stack two bind mounts.
static RUN_DIR: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`/run/netns/<name>`), or one a runtime names by any path of
/// nsfs (a CNI plugin's `CNI_NETNS`). The handle does not own it: see [`OwnedNetNs`] for one
/// deleted on drop.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// The namespace called `name`, whether or not it exists yet.
    pub fn named(name: impl Into<String>) -> Self {
        let name = name.into();
        let path = Self::path_of(&name);
        Self { name, path }
    }

    /// The namespace bind-mounted (or, under /proc, held) at `path`, named by that path in
    /// messages. It must exist.
    pub fn at_path(path: impl Into<PathBuf>) -> Result<Self, NetNsError> {
        let path = path.into();
        let name = path.display().to_string();
        if !path.exists() {
            return Err(NetNsError::NotFound(name));
        }
        Ok(Self { name, path })
    }

    /// An existing namespace.
    pub fn open(name: &str) -> Result<Self, NetNsError> {
        let ns = Self::named(name);
        if !ns.exists() {
            return Err(NetNsError::NotFound(name.into()));
        }
        Ok(ns)
    }

    /// Creates `/run/netns/<name>` with its loopback up (`ip netns add` leaves it down, and
    /// every user here wants it). Fails if the name exists.
    pub fn create(name: &str) -> Result<Self, NetNsError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(NetNsError::BadName(name.into()));
        }
        share_run_dir()?;
        let path = Self::path_of(name);
        // The mount point; O_EXCL makes the name ours or fails.
        match File::options()
            .write(true)
            .create_new(true)
            .mode(0o000)
            .open(&path)
        {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(NetNsError::Exists(name.into()));
            }
            other => drop(other.map_err(io_err("create", &path))?),
        }
        let ns = Self::named(name);
        let made = thread::scope(|scope| {
            // A thread of its own unshares, so no caller thread changes namespace; the
            // bind mount keeps the namespace alive after the thread ends.
            let thread = scope.spawn(|| {
                unshare(CloneFlags::CLONE_NEWNET).map_err(sys_err("unshare", "CLONE_NEWNET"))?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(sys_err("mount", path.display().to_string()))
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        let made = made.and_then(|()| ns.netlink()?.set_up("lo"));
        if let Err(e) = made {
            // Best effort: the error that stopped the creation is the one to report.
            let _ = Self::delete(name);
            return Err(e);
        }
        Ok(ns)
    }

    /// Unmounts and removes `/run/netns/<name>`, like `ip netns del`; the namespace itself
    /// goes with its last process and open file. A name that does not exist is not an error.
    pub fn delete(name: &str) -> Result<(), NetNsError> {
        let path = Self::path_of(name);
        match umount2(&path, MntFlags::MNT_DETACH) {
            // EINVAL: not a mount point (a creation that failed half way).
            Ok(()) | Err(Errno::EINVAL) => {}
            Err(Errno::ENOENT) => return Ok(()),
            Err(source) => {
                return Err(NetNsError::Sys {
                    call: "umount2",
                    what: path.display().to_string(),
                    source,
                });
            }
        }
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("unlink", path)(e)),
            _ => Ok(()),
        }
    }

    /// Names under /run/netns, sorted.
    pub fn list() -> Vec<String> {
        let Ok(entries) = fs::read_dir(NETNS_DIR) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }

    /// Names under /run/netns starting with `prefix`, sorted.
    pub fn list_with_prefix(prefix: &str) -> Vec<String> {
        Self::list()
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect()
    }

    pub fn path_of(name: &str) -> PathBuf {
        Path::new(NETNS_DIR).join(name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }

    pub fn exists(&self) -> bool {
        self.path().exists()
    }

    /// (device, inode) of the namespace: equal for every path that names it, such as
    /// `/proc/<pid>/task/<tid>/ns/net`. None if it does not exist.
    pub fn id(&self) -> Option<(u64, u64)> {
        let meta = fs::metadata(self.path()).ok()?;
        // An unmounted name is a plain file of /run, not a namespace.
        let nsfs = fs::metadata("/proc/self/ns/net").ok()?.dev();
        (meta.dev() == nsfs).then(|| (meta.dev(), meta.ino()))
    }

    fn file(&self) -> Result<File, NetNsError> {
        let path = self.path();
        File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => NetNsError::NotFound(self.name.clone()),
            _ => io_err("open", path)(e),
        })
    }

    /// Moves the calling thread into this namespace for good. Only for a thread that is
    /// the caller's own (a worker it spawned, or `main` before any other thread exists, so
    /// that every thread started later inherits it); anything else wants [`Self::run`].
    pub fn enter(&self) -> Result<(), NetNsError> {
        let file = self.file()?;
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(sys_err("setns", self.name.clone()))
    }

    /// Runs `f` on a new thread inside this namespace and returns its value; a panic in `f`
    /// goes on in the caller. Threads `f` spawns inherit the namespace, and sockets it
    /// opens stay in it.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T, NetNsError> {
        let file = self.file()?;
        thread::scope(|scope| {
            let thread = thread::Builder::new()
                .name(format!("netns {}", self.name))
                .spawn_scoped(scope, move || {
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .map_err(sys_err("setns", self.name.clone()))?;
                    Ok(f())
                })
                .map_err(io_err("spawn thread in", self.path()))?;
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts `f` on a new thread inside this namespace, once the thread has entered it.
    pub fn spawn<T, F>(&self, f: F) -> Result<NsThread<T>, NetNsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let file = self.file()?;
        let (entered_tx, entered) = mpsc::sync_channel(1);
        let handle = thread::Builder::new()
            .name(format!("netns {}", self.name))
            .spawn(move || {
                let result = setns(&file, CloneFlags::CLONE_NEWNET);
                let ok = result.is_ok();
                // The receiver waits for this message; it cannot be gone.
                let _ = entered_tx.send(result);
                ok.then(f)
            })
            .map_err(io_err("spawn thread in", self.path()))?;
        match entered.recv() {
            Ok(Ok(())) => Ok(NsThread { handle }),
            Ok(Err(source)) => Err(NetNsError::Sys {
                call: "setns",
                what: self.name.clone(),
                source,
            }),
            // The thread ended without a word: only a panic in setns's wrapper does that.
            Err(_) => match handle.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(_) => Err(NetNsError::Sys {
                    call: "setns",
                    what: self.name.clone(),
                    source: Errno::UnknownErrno,
                }),
            },
        }
    }

    /// A `Command` whose process enters this namespace between fork and exec (what
    /// `nsenter --net` does), keeping the caller's mount namespace, so /sys and bpffs.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command, NetNsError> {
        let file = self.file()?;
        let mut command = Command::new(program);
        // SAFETY: setns is async-signal-safe, and neither it nor the error conversion
        // allocates or takes a lock.
        unsafe {
            command.pre_exec(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        Ok(command)
    }
}

/// A thread started by [`NetNs::spawn`], inside its namespace.
#[derive(Debug)]
pub struct NsThread<T> {
    handle: thread::JoinHandle<Option<T>>,
}

impl<T> NsThread<T> {
    /// Waits for the thread, like [`thread::JoinHandle::join`]: `Err` holds its panic.
    pub fn join(self) -> thread::Result<T> {
        self.handle.join().map(|value| {
            // `spawn` returns an NsThread only once the thread has entered, and then it runs `f`.
            value.unwrap_or_else(|| unreachable!("an NsThread runs its function"))
        })
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// A network namespace this process created, deleted when dropped (also on a panic).
#[derive(Debug)]
pub struct OwnedNetNs(NetNs);

impl OwnedNetNs {
    pub fn create(name: &str) -> Result<Self, NetNsError> {
        NetNs::create(name).map(Self)
    }

    /// A namespace named `<prefix><pid>-<n>`, unique to this process and call; first
    /// deletes the namespaces of `prefix` that killed runs left (see [`orphans`]).
    pub fn unique(prefix: &str) -> Result<Self, NetNsError> {
        reap_orphans(prefix);
        Self::create(&unique_name(prefix))
    }
}

/// Deletes the namespaces named `<prefix><pid>-<n>` whose process is gone.
pub fn reap_orphans(prefix: &str) {
    for name in orphans(Path::new(NETNS_DIR), prefix) {
        if let Err(e) = NetNs::delete(&name) {
            eprintln!("cleanup of a killed run's {name}: {e}");
        }
    }
}

/// The entries of `dir` named `<prefix><pid>-<n>` (as [`unique_name`] names them) whose
/// process no longer runs: what a run killed before its destructors ran left behind, for
/// the next run of the same prefix to remove. A live process's entries are never named.
pub fn orphans(dir: &Path, prefix: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| {
            let Some((pid, n)) = name.strip_prefix(prefix).and_then(|r| r.split_once('-')) else {
                return false;
            };
            n.parse::<u32>().is_ok()
                && pid
                    .parse::<u32>()
                    .is_ok_and(|pid| !Path::new("/proc").join(pid.to_string()).exists())
        })
        .collect()
}

/// `<prefix><pid>-<n>`: unique to this process and call (namespaces, pin directories).
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}-{n}", std::process::id())
}

impl std::ops::Deref for OwnedNetNs {
    type Target = NetNs;

    fn deref(&self) -> &NetNs {
        &self.0
    }
}

impl Drop for OwnedNetNs {
    fn drop(&mut self) {
        if let Err(e) = NetNs::delete(self.0.name()) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Makes /run/netns a shared mount (bind-mounting it onto itself first if it is not a
/// mount yet), as iproute2 does, so the namespaces mounted in it show in every mount
/// namespace that later copies it.
fn share_run_dir() -> Result<(), NetNsError> {
    let _serial = RUN_DIR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    fs::create_dir_all(NETNS_DIR).map_err(io_err("mkdir", NETNS_DIR))?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        // EINVAL: not a mount point yet.
        Err(Errno::EINVAL) => {
            mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(sys_err("mount --bind", NETNS_DIR))?;
            shared().map_err(sys_err("mount --make-shared", NETNS_DIR))
        }
        Err(source) => Err(NetNsError::Sys {
            call: "mount --make-shared",
            what: NETNS_DIR.into(),
            source,
        }),
    }
}

#[cfg(test)]
mod orphan_tests {
    use super::*;

    #[test]
    fn orphans_are_the_entries_of_the_prefix_whose_process_is_gone() {
        let dir = std::env::temp_dir().join(unique_name("sluice-orphans-"));
        fs::create_dir(&dir).expect("a scratch directory");
        let live = format!("run-{}-0", std::process::id());
        for name in [
            live.as_str(),
            "run-4000000000-3",
            "run-4000000000-x",
            "running-4000000000-1",
            "other-4000000000-2",
        ] {
            fs::write(dir.join(name), b"").expect("an entry");
        }
        let found = orphans(&dir, "run-");
        fs::remove_dir_all(&dir).expect("remove the scratch directory");
        assert_eq!(found, vec!["run-4000000000-3".to_string()]);
    }
}
