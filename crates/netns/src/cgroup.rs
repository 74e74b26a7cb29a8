//! cgroup v2 directories for the processes of one node (or one test): made, entered by a
//! command between fork and exec, emptied and removed; and the check that a cgroup holds
//! only processes of the caller's network namespace, before socket programs attach to it.

use std::{
    fs,
    io::{self, Write},
    os::{
        fd::AsRawFd,
        unix::{fs::MetadataExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use crate::{NetNsError, error::io_err};

const MOUNTINFO: &str = "/proc/self/mountinfo";
const PROCS: &str = "cgroup.procs";
const KILL: &str = "cgroup.kill";
const EVENTS: &str = "cgroup.events";

/// Why a cgroup may not carry the node's socket programs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupRefusal {
    #[error("it is the root of the cgroup v2 hierarchy, which holds every process")]
    Root,
    #[error("it is not a directory of the cgroup v2 hierarchy mounted at {0}")]
    NotCgroup2(PathBuf),
    #[error(
        "process {pid} (in {cgroup}) is in another network namespace: its sockets are \
         not the node's"
    )]
    ForeignProcess { pid: i32, cgroup: PathBuf },
    #[error(
        "process {pid} (in {cgroup}) shares the network namespace of the node or the host: \
         it is no pod"
    )]
    NotAPod { pid: i32, cgroup: PathBuf },
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on a hybrid host), from this process's mount table.
pub fn cgroup2_root() -> Result<PathBuf, NetNsError> {
    let table = fs::read_to_string(MOUNTINFO).map_err(io_err("read", MOUNTINFO))?;
    table
        .lines()
        .find_map(|line| {
            // "<id> <parent> <dev> <root> <mount point> <options> [tags] - <fstype> ..."
            let (fields, rest) = line.split_once(" - ")?;
            (rest.split(' ').next()? == "cgroup2").then(|| fields.split(' ').nth(4))?
        })
        .map(PathBuf::from)
        .ok_or(NetNsError::NoCgroup2)
}

/// A cgroup v2 directory, by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// The cgroup at `path` (which may not exist yet).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The cgroup `name` directly under the cgroup v2 root, created if missing.
    pub fn create(name: &str) -> Result<Self, NetNsError> {
        Self::at(cgroup2_root()?).create_child(name)
    }

    /// The cgroup `name` directly under this one, created if missing.
    pub fn create_child(&self, name: &str) -> Result<Self, NetNsError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(NetNsError::BadCgroupName(name.to_owned()));
        }
        let cgroup = Self::at(self.path.join(name));
        match fs::create_dir(&cgroup.path) {
            Ok(()) => Ok(cgroup),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(cgroup),
            Err(err) => Err(io_err("mkdir", &cgroup.path)(err)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn exists(&self) -> bool {
        self.path.is_dir()
    }

    /// The processes directly in this cgroup.
    pub fn procs(&self) -> Result<Vec<i32>, NetNsError> {
        let path = self.path.join(PROCS);
        let text = fs::read_to_string(&path).map_err(io_err("read", &path))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Makes `command`'s process enter this cgroup between fork and exec, so everything it
    /// runs, and every socket it opens, is in it from the start.
    pub fn enter_on_exec(&self, command: &mut Command) -> Result<(), NetNsError> {
        let path = self.path.join(PROCS);
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        // SAFETY: write(2) is async-signal-safe and nothing here allocates or locks.
        unsafe {
            command.pre_exec(move || {
                // "0" moves the writing process itself.
                let written = libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1);
                if written == 1 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        Ok(())
    }

    /// Kills every process in this cgroup and its descendants, waits for them to be
    /// gone and removes the directory, its descendants first; a cgroup that does not
    /// exist is fine.
    pub fn remove(&self) -> Result<(), NetNsError> {
        if !self.exists() {
            return Ok(());
        }
        // cgroup.kill covers the descendants, but rmdir takes only a cgroup without any.
        let mut below = descendants(&self.path)?;
        below.remove(0);
        for child in below.iter().rev() {
            Cgroup::at(child).remove_one()?;
        }
        self.remove_one()
    }

    /// Kills what runs in this cgroup (and below) and removes its directory, which must
    /// have no child cgroup left.
    fn remove_one(&self) -> Result<(), NetNsError> {
        if !self.exists() {
            return Ok(());
        }
        let kill = self.path.join(KILL);
        fs::OpenOptions::new()
            .write(true)
            .open(&kill)
            .and_then(|mut file| file.write_all(b"1"))
            .map_err(io_err("write", &kill))?;
        // Killed processes leave the cgroup once the kernel has reaped their threads,
        // which takes a moment; rmdir fails with EBUSY until then.
        let mut attempt = 0;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(err) if err.raw_os_error() == Some(libc::EBUSY) && attempt < 500 => {
                    attempt += 1;
                    thread::sleep(Duration::from_millis(10));
                }
                Err(err) => return Err(io_err("rmdir", &self.path)(err)),
            }
        }
    }

    /// Whether a process is in this cgroup or a descendant (`populated` of cgroup.events).
    pub fn populated(&self) -> Result<bool, NetNsError> {
        let path = self.path.join(EVENTS);
        let text = fs::read_to_string(&path).map_err(io_err("read", &path))?;
        Ok(text.lines().any(|l| l.trim() == "populated 1"))
    }

    /// Refuses this cgroup as the home of the node's socket programs unless it is a
    /// cgroup v2 directory other than the root, and every process in it and in its
    /// descendants (programs apply to those too) shares the calling thread's network
    /// namespace. Socket programs rewrite every connect() of every process in the cgroup:
    /// on the root, or on a cgroup holding processes of the host or of another node, they
    /// would send those processes' connections to this node's backends.
    pub fn check_confined(&self) -> Result<(), NetNsError> {
        let own = own_netns()?;
        self.check_processes(|pid, ns, cgroup| {
            (ns != own).then_some(CgroupRefusal::ForeignProcess { pid, cgroup })
        })
    }

    /// Refuses this cgroup as the home of the pods' socket programs unless it is a cgroup
    /// v2 directory other than the root whose every process (descendants included) lives
    /// in a network namespace of its own: neither the calling thread's (the node's own
    /// processes, served as the node by [`Self::check_confined`]'s cgroup; on a real node
    /// also the host's and hostNetwork pods') nor that of PID 1 (the host's), where this
    /// process may look at it (a sandbox may deny it even to root). The pods' programs take
    /// every such socket for a pod's.
    pub fn check_pods_only(&self) -> Result<(), NetNsError> {
        let own = own_netns()?;
        let host = netns_id(Path::new("/proc/1/ns/net")).unwrap_or(None);
        self.check_processes(|pid, ns, cgroup| {
            (ns == own || Some(ns) == host).then_some(CgroupRefusal::NotAPod { pid, cgroup })
        })
    }

    /// The network namespaces of the processes in this cgroup and its descendants, one
    /// `/proc/<pid>/ns/net` path for each, in the order first seen.
    pub fn netns_of_processes(&self) -> Result<Vec<PathBuf>, NetNsError> {
        let mut seen = Vec::new();
        let mut paths = Vec::new();
        for cgroup in descendants(&self.path)? {
            for pid in Cgroup::at(&cgroup).procs()? {
                let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if let Some(ns) = netns_id(&path)?
                    && !seen.contains(&ns)
                {
                    seen.push(ns);
                    paths.push(path);
                }
            }
        }
        Ok(paths)
    }

    /// Refuses the root, what is not a cgroup v2 directory, and any cgroup where `refuse`
    /// says no to a process (by pid, network namespace and cgroup) in it or a descendant.
    fn check_processes(
        &self,
        refuse: impl Fn(i32, (u64, u64), PathBuf) -> Option<CgroupRefusal>,
    ) -> Result<(), NetNsError> {
        let root = cgroup2_root()?;
        let refused = |reason| NetNsError::CgroupRefused {
            path: self.path.clone(),
            reason,
        };
        let path = fs::canonicalize(&self.path).map_err(io_err("realpath", &self.path))?;
        let root = fs::canonicalize(&root).map_err(io_err("realpath", &root))?;
        if path == root {
            return Err(refused(CgroupRefusal::Root));
        }
        if !path.starts_with(&root) || !path.join(PROCS).is_file() {
            return Err(refused(CgroupRefusal::NotCgroup2(root)));
        }
        for cgroup in descendants(&path)? {
            for pid in Cgroup::at(&cgroup).procs()? {
                let ns = netns_id(&PathBuf::from(format!("/proc/{pid}/ns/net")))?;
                // A process that exited meanwhile holds no socket.
                if let Some(reason) = ns.and_then(|ns| refuse(pid, ns, cgroup.clone())) {
                    return Err(refused(reason));
                }
            }
        }
        Ok(())
    }
}

/// `(device, inode)` of the calling thread's network namespace.
fn own_netns() -> Result<(u64, u64), NetNsError> {
    netns_id(Path::new("/proc/thread-self/ns/net"))?.ok_or_else(|| NetNsError::Io {
        call: "stat",
        path: "/proc/thread-self/ns/net".into(),
        source: io::ErrorKind::NotFound.into(),
    })
}

/// `(device, inode)` of a network namespace file; None if the process is gone.
fn netns_id(path: &Path) -> Result<Option<(u64, u64)>, NetNsError> {
    match fs::metadata(path) {
        Ok(meta) => Ok(Some((meta.dev(), meta.ino()))),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(io_err("stat", path)(err)),
    }
}

/// `dir` and every cgroup below it.
fn descendants(dir: &Path) -> Result<Vec<PathBuf>, NetNsError> {
    let mut found = vec![dir.to_owned()];
    let mut next = 0;
    while next < found.len() {
        let current = found[next].clone();
        next += 1;
        for entry in fs::read_dir(&current).map_err(io_err("readdir", &current))? {
            let entry = entry.map_err(io_err("readdir", &current))?;
            if entry
                .file_type()
                .map_err(io_err("stat", entry.path()))?
                .is_dir()
            {
                found.push(entry.path());
            }
        }
    }
    Ok(found)
}

/// A cgroup this process created, killed and removed when dropped (also on a panic).
#[derive(Debug)]
pub struct OwnedCgroup(Cgroup);

impl OwnedCgroup {
    /// A cgroup named `<prefix><pid>-<n>` under the cgroup v2 root, unique to this process
    /// and call.
    pub fn unique(prefix: &str) -> Result<Self, NetNsError> {
        Cgroup::create(&crate::unique_name(prefix)).map(Self)
    }
}

impl std::ops::Deref for OwnedCgroup {
    type Target = Cgroup;

    fn deref(&self) -> &Cgroup {
        &self.0
    }
}

impl Drop for OwnedCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.0.remove() {
            eprintln!("cleanup: {e}");
        }
    }
}
