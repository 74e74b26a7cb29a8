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
    #[error(transparent)]
    Store(#[from] sluice_store::StoreError),
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
        "agent of node {node} did not realize generation {generation} within {timeout:?} ({last}); see {log}"
    )]
    AgentTimeout {
        node: String,
        generation: u64,
        timeout: Duration,
        last: String,
        log: PathBuf,
    },
    #[error("agent of node {node} exited ({status}); see {log}")]
    AgentExited {
        node: String,
        status: String,
        log: PathBuf,
    },
    #[error("pod server of {pod} {problem}; see {log}")]
    PodServer {
        pod: String,
        problem: String,
        log: PathBuf,
    },
    #[error("no pod {0} in the lab")]
    PodNotFound(String),
    #[error("no node {0} in the lab")]
    NodeNotFound(String),
    #[error("{0}")]
    Exhausted(String),
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
