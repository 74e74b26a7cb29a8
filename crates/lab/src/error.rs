use std::{path::PathBuf, time::Duration};

use sluice_sources::ManifestError;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{call} {path}: {source}")]
    Io {
        call: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{call}: {source}")]
    Sys {
        call: &'static str,
        source: nix::Error,
    },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{path}: {field}: {message}")]
    LabFile {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("invalid lab name {name:?}: {message}")]
    LabName { name: String, message: String },
    #[error("lab {name:?} already exists ({path}); `lab down` it first")]
    Exists { name: String, path: PathBuf },
    #[error("network namespace {0} already exists")]
    NetnsExists(String),
    #[error("lab {name:?} does not exist (no {path})")]
    NotFound { name: String, path: PathBuf },
    #[error("lab state {path}: {source}")]
    State {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("encoding {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Store(#[from] sluice_store::StoreError),
    /// Namespaces, links, addresses, routes, sysctls and offloads.
    #[error(transparent)]
    Netns(#[from] sluice_netns::NetNsError),
    /// Generic manifest errors, from the sources crate.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Lab-level checks of a whole apply or delete: every violation, one per line.
    #[error("{}", render_violations(.0))]
    Invalid(Vec<ManifestError>),
    #[error("{what} not found at {path} (set {env} to its path)")]
    Binary {
        what: &'static str,
        path: PathBuf,
        env: &'static str,
    },
    #[error(
        "agent of node {node} did not realize generation {generation} within {timeout:?} ({last}); see {log}{tail}"
    )]
    AgentTimeout {
        node: String,
        generation: u64,
        timeout: Duration,
        last: String,
        log: PathBuf,
        tail: LogTail,
    },
    #[error("agent of node {node} exited ({status}); see {log}{tail}")]
    AgentExited {
        node: String,
        status: String,
        log: PathBuf,
        tail: LogTail,
    },
    #[error("pod server of {pod} {problem}; see {log}{tail}")]
    PodServer {
        pod: String,
        problem: String,
        log: PathBuf,
        tail: LogTail,
    },
    #[error("server of world host {host} {problem}; see {log}{tail}")]
    WorldServer {
        host: String,
        problem: String,
        log: PathBuf,
        tail: LogTail,
    },
    /// A probe that cannot be run as asked (bad target, no such service, SCTP).
    #[error("probe: {0}")]
    Probe(String),
    #[error("no pod {0} in the lab")]
    PodNotFound(String),
    #[error("no node {0} in the lab")]
    NodeNotFound(String),
    /// A node refused by `lab node add` (or a re-applied lab file), nothing changed.
    #[error("node {node}: {field}: {message}")]
    InvalidNode {
        node: String,
        field: String,
        message: String,
    },
    /// The pods of a removed node could not be replaced on the others.
    #[error("deployment {deployment}: replacing the pods of a removed node: {message}")]
    Reschedule { deployment: String, message: String },
    #[error("node {0} is the lab's last node: `lab down` removes the lab")]
    LastNode(String),
    #[error(
        "lab {0} has no underlay: a lab of one node without `underlay:` in its file runs local mode and takes no more nodes"
    )]
    NoUnderlay(String),
    #[error("node {node}: world host {host} hangs off it; take the host off the lab file first")]
    NodeInUse { node: String, host: String },
}

fn render_violations(violations: &[ManifestError]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `map_err` helper for std::io calls on a path.
pub(crate) fn io_err(
    call: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> LabError {
    let path = path.into();
    move |source| LabError::Io { call, path, source }
}

/// The last lines of a process's log, shown with the error: a failed `lab up` removes the
/// log file itself.
#[derive(Debug)]
pub struct LogTail(String);

impl LogTail {
    const LINES: usize = 15;

    pub(crate) fn of(path: &std::path::Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(Self::LINES);
        LogTail(
            lines[start..]
                .iter()
                .map(|l| format!("\n    {l}"))
                .collect(),
        )
    }
}

impl std::fmt::Display for LogTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, ", which ends:{}", self.0)
        }
    }
}
