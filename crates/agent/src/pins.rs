//! Pins removed behind the agent's back. Every map and link the agent pinned is held here by
//! an fd of its own, so unlinking its pin from bpffs frees nothing: a removed map pin would
//! otherwise make the next start create an empty map (conntrack lost), and a removed link
//! pin would detach the datapath from its interface at once (traffic unpoliced until the
//! next pass attached it again). After every pass the guard pins each one again from its fd.

use std::{
    collections::BTreeMap,
    fs,
    io::ErrorKind,
    os::{fd::AsFd, fd::OwnedFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use sluice_common::MAPS;
use sluice_datapath::{AttachRole, sys};
use tracing::warn;

use crate::AgentError;

/// Subdirectory of the pin directory holding the pinned links (the datapath's layout).
const LINKS_DIR: &str = "links";

/// One pinned object held open.
struct Held {
    fd: OwnedFd,
    /// The pin file's inode when it was opened: a pin made again gets a new one.
    inode: u64,
    link: bool,
}

/// Held pins whose file is gone.
struct Gone {
    /// To pin again, with the object's id.
    repin: Vec<(PathBuf, u32)>,
    /// Links detached (by the agent, or with their device), to let go of.
    released: Vec<PathBuf>,
}

pub struct PinGuard {
    pin_dir: PathBuf,
    held: BTreeMap<PathBuf, Held>,
}

impl PinGuard {
    pub fn new(pin_dir: &Path) -> Self {
        Self {
            pin_dir: pin_dir.to_path_buf(),
            held: BTreeMap::new(),
        }
    }

    /// Pins again every held map, and every held link still attached, whose pin is gone,
    /// and returns their names relative to the pin directory; then holds every pin now
    /// present. Called between passes, so a link the agent itself detached (its pin
    /// removed with it) is detached in the kernel too, and is let go instead.
    pub fn check(&mut self) -> Result<Vec<String>, AgentError> {
        let Gone { repin, released } = self.gone()?;
        let mut restored = Vec::new();
        for (path, id) in repin {
            let Some(held) = self.held.get(&path) else {
                continue;
            };
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(|source| AgentError::Io {
                    call: "mkdir",
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            sys::obj_pin(held.fd.as_fd(), &path).map_err(sys_err(&path))?;
            let name = self.name(&path);
            warn!(pin = %name, id, "pin removed behind the agent's back; pinned again");
            restored.push(name);
        }
        for path in released {
            self.held.remove(&path);
        }
        for (path, link) in self.pins()? {
            let Some(inode) = pin_inode(&path)? else {
                continue;
            };
            if self.held.get(&path).is_some_and(|h| h.inode == inode) {
                continue;
            }
            // Pinned anew (a re-attached link, a restored pin): hold the current object.
            match sys::obj_get(&path) {
                Ok(fd) => {
                    self.held.insert(path, Held { fd, inode, link });
                }
                Err(e) if e.io_error.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(sys_err(&path)(e)),
            }
        }
        Ok(restored)
    }

    /// The held pins that are gone, relative to the pin directory, for `verify`.
    pub fn missing(&self) -> Result<Vec<String>, AgentError> {
        let gone = self.gone()?;
        Ok(gone.repin.iter().map(|(path, _)| self.name(path)).collect())
    }

    /// The held pins that are gone.
    fn gone(&self) -> Result<Gone, AgentError> {
        let (mut repin, mut released) = (Vec::new(), Vec::new());
        for (path, held) in &self.held {
            if pin_inode(path)?.is_some() {
                continue;
            }
            let info = sys::obj_info(held.fd.as_fd(), held.link).map_err(sys_err(path))?;
            if info.attached {
                repin.push((path.clone(), info.id));
            } else {
                released.push(path.clone());
            }
        }
        Ok(Gone { repin, released })
    }

    /// Every map pin of the registry and every link pin of every role, present or not.
    fn pins(&self) -> Result<Vec<(PathBuf, bool)>, AgentError> {
        let mut pins: Vec<_> = MAPS
            .iter()
            .map(|def| (self.pin_dir.join(def.name), false))
            .collect();
        for role in AttachRole::ALL {
            let dir = self.pin_dir.join(LINKS_DIR).join(role.pin_dir_name());
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(AgentError::Io {
                        call: "readdir",
                        path: dir,
                        source,
                    });
                }
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    pins.push((entry.path(), true));
                }
            }
        }
        Ok(pins)
    }

    /// A pin's name as status and the metrics show it: relative to the pin directory.
    fn name(&self, path: &Path) -> String {
        path.strip_prefix(&self.pin_dir)
            .unwrap_or(path)
            .display()
            .to_string()
    }
}

/// The inode of the pin at `path`, None if there is none.
fn pin_inode(path: &Path) -> Result<Option<u64>, AgentError> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(Some(meta.ino())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AgentError::Io {
            call: "stat",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn sys_err(path: &Path) -> impl Fn(aya::sys::SyscallError) -> AgentError + '_ {
    move |e| AgentError::Io {
        call: e.call,
        path: path.to_path_buf(),
        source: e.io_error,
    }
}
