use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("{call} {path}: {source}")]
    Io {
        call: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{call} ({what}): {source}")]
    Sys {
        call: &'static str,
        what: String,
        source: nix::errno::Errno,
    },
    /// A netlink request failed; `call` names the message type (RTM_NEWLINK, ...).
    #[error("{call} {what} in netns {netns}: {source}")]
    Netlink {
        call: &'static str,
        what: String,
        netns: String,
        // Boxed: the error holds a whole netlink message.
        source: Box<rtnetlink::Error>,
    },
    /// A sock_diag request failed; `call` names the message type.
    #[error("{call} (sock_diag): {source}")]
    SockDiag {
        call: &'static str,
        source: std::io::Error,
    },
    #[error("network namespace {0} already exists")]
    Exists(String),
    #[error("no network namespace {0}")]
    NotFound(String),
    #[error("invalid network namespace name {0:?}")]
    BadName(String),
    #[error("interface {interface} in netns {netns} has no {attribute}")]
    NoAttribute {
        netns: String,
        interface: String,
        attribute: &'static str,
    },
    #[error("no interface {interface} in netns {netns}")]
    NoInterface { netns: String, interface: String },
    #[error("no cgroup v2 hierarchy is mounted (in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("invalid cgroup name {0:?}")]
    BadCgroupName(String),
    #[error("cgroup {path} refused: {reason}")]
    CgroupRefused {
        path: PathBuf,
        reason: crate::CgroupRefusal,
    },
}

/// `map_err` helper for I/O failures on a path.
pub(crate) fn io_err(
    call: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> NetNsError {
    let path = path.into();
    move |source| NetNsError::Io { call, path, source }
}

/// `map_err` helper for syscalls that return an errno.
pub(crate) fn sys_err(
    call: &'static str,
    what: impl Into<String>,
) -> impl FnOnce(nix::errno::Errno) -> NetNsError {
    let what = what.into();
    move |source| NetNsError::Sys { call, what, source }
}
