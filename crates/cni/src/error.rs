use sluice_api::ApiError;
use sluice_netns::NetNsError;

use crate::spec::ErrorCode;

/// Everything that makes an operation fail, each with the CNI error code it answers.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("CNI_COMMAND is not set")]
    NoCommand,
    #[error("CNI_COMMAND {0:?} is unknown: ADD, DEL, CHECK, STATUS, VERSION or GC")]
    UnknownCommand(String),
    #[error("{var} is not set ({command} needs it)")]
    MissingVar {
        var: &'static str,
        command: &'static str,
    },
    #[error("CNI_ARGS: {0}")]
    BadArgs(String),
    #[error("reading the network configuration from stdin: {0}")]
    Stdin(std::io::Error),
    #[error("network configuration on stdin: {0}")]
    Decode(serde_json::Error),
    /// A value of the wrong shape, named by its field (`prevResult.ips[0].address`).
    #[error("network configuration on stdin: {field}: {error}")]
    DecodeField {
        field: String,
        error: serde_json::Error,
    },
    #[error("network configuration: {0}")]
    InvalidConfig(String),
    #[error("cniVersion {0:?} is not supported (this plugin speaks 1.0.0 and 1.1.0)")]
    Version(String),
    #[error("CNI_NETNS {0}: no such network namespace")]
    NoNetns(String),
    #[error(transparent)]
    Netns(#[from] NetNsError),
    #[error(transparent)]
    Agent(#[from] ApiError),
    /// CHECK found the attachment differing from what ADD made.
    #[error("CHECK: {0}")]
    Check(String),
    /// STATUS: the agent cannot take pods now.
    #[error("{0}")]
    NotAvailable(String),
}

impl CniError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NoCommand
            | Self::UnknownCommand(_)
            | Self::MissingVar { .. }
            | Self::BadArgs(_) => ErrorCode::InvalidEnvironment,
            Self::Stdin(_) | Self::Netns(_) => ErrorCode::IoFailure,
            Self::Decode(_) | Self::DecodeField { .. } => ErrorCode::DecodeFailure,
            Self::InvalidConfig(_) => ErrorCode::InvalidNetworkConfig,
            Self::Version(_) => ErrorCode::IncompatibleVersion,
            Self::NoNetns(_) => ErrorCode::ContainerUnknown,
            Self::Agent(e) => agent_code(e),
            Self::Check(_) => ErrorCode::CheckFailed,
            Self::NotAvailable(_) => ErrorCode::NotAvailable,
        }
    }
}

/// An agent that cannot be reached, is not ready or did not finish in time is a transient
/// condition the runtime retries; one that knows no such attachment answers "container
/// unknown"; anything else it refused is this plugin's own code, with its message.
fn agent_code(error: &ApiError) -> ErrorCode {
    match error {
        ApiError::Connect { .. }
        | ApiError::Timeout { .. }
        | ApiError::Http { .. }
        | ApiError::Io { .. } => ErrorCode::TryAgainLater,
        ApiError::Agent { status, .. } => match status.as_u16() {
            404 => ErrorCode::ContainerUnknown,
            503 | 504 => ErrorCode::TryAgainLater,
            _ => ErrorCode::AgentRefused,
        },
        ApiError::Encode { .. } | ApiError::Decode { .. } => ErrorCode::AgentRefused,
    }
}
