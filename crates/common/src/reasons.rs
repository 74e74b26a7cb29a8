//! Why the datapath dropped (or rejected) a packet. Mirrors the `DROP_*` defines in
//! `bpf/lib/common.h`; numbers follow Cilium's where the meaning is the same.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum DropReason {
    InvalidSource,
    Policy,
    Invalid,
    UnknownL3,
    WriteError,
    CtCreateFailed,
    NoService,
    FragNotFound,
    ServicePortUnknown,
    NoBackendSlot,
    PolicyUnavailable,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::InvalidSource,
        DropReason::Policy,
        DropReason::Invalid,
        DropReason::UnknownL3,
        DropReason::WriteError,
        DropReason::CtCreateFailed,
        DropReason::NoService,
        DropReason::FragNotFound,
        DropReason::ServicePortUnknown,
        DropReason::NoBackendSlot,
        DropReason::PolicyUnavailable,
    ];

    pub const fn code(self) -> u8 {
        match self {
            DropReason::InvalidSource => 132,
            DropReason::Policy => 133,
            DropReason::Invalid => 134,
            DropReason::UnknownL3 => 139,
            DropReason::WriteError => 141,
            DropReason::CtCreateFailed => 155,
            DropReason::NoService => 158,
            DropReason::FragNotFound => 175,
            DropReason::ServicePortUnknown => 210,
            DropReason::NoBackendSlot => 211,
            DropReason::PolicyUnavailable => 212,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The name the C header uses, without its `DROP_` prefix.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::InvalidSource => "INVALID_SOURCE",
            DropReason::Policy => "POLICY",
            DropReason::Invalid => "INVALID",
            DropReason::UnknownL3 => "UNKNOWN_L3",
            DropReason::WriteError => "WRITE_ERROR",
            DropReason::CtCreateFailed => "CT_CREATE_FAILED",
            DropReason::NoService => "NO_SERVICE",
            DropReason::FragNotFound => "FRAG_NOT_FOUND",
            DropReason::ServicePortUnknown => "SERVICE_PORT_UNKNOWN",
            DropReason::NoBackendSlot => "NO_BACKEND_SLOT",
            DropReason::PolicyUnavailable => "POLICY_UNAVAILABLE",
        }
    }

    /// The name Hubble's flow JSON gives the reason (`drop_reason_desc`); sluice's own
    /// reasons keep their header name.
    pub const fn hubble_name(self) -> &'static str {
        match self {
            DropReason::InvalidSource => "INVALID_SOURCE_IP",
            DropReason::Policy => "POLICY_DENIED",
            DropReason::Invalid => "INVALID_PACKET_DROPPED",
            DropReason::UnknownL3 => "UNKNOWN_L3_TARGET_ADDRESS",
            DropReason::WriteError => "ERROR_WRITING_TO_PACKET",
            DropReason::CtCreateFailed => "CT_MAP_INSERTION_FAILED",
            DropReason::NoService => "SERVICE_BACKEND_NOT_FOUND",
            DropReason::FragNotFound => "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND",
            DropReason::ServicePortUnknown
            | DropReason::NoBackendSlot
            | DropReason::PolicyUnavailable => self.name(),
        }
    }

    pub const fn description(self) -> &'static str {
        match self {
            DropReason::InvalidSource => "Invalid source ip",
            DropReason::Policy => "Policy denied",
            DropReason::Invalid => "Invalid packet",
            DropReason::UnknownL3 => "Unsupported L3 protocol (IPv6 is not supported yet)",
            DropReason::WriteError => "Failed to write packet",
            DropReason::CtCreateFailed => "Conntrack entry could not be created",
            DropReason::NoService => "Service has no ready backend (rejected)",
            DropReason::FragNotFound => "First logical datagram fragment not found",
            DropReason::ServicePortUnknown => "Service port not found",
            DropReason::NoBackendSlot => "Service backend slot not found",
            DropReason::PolicyUnavailable => "Endpoint policy not realized (fails closed)",
        }
    }
}
