//! Why the datapath dropped (or rejected) a packet. Mirrors the `DROP_*` defines in
//! `bpf/lib/common.h`; numbers follow Cilium's where the meaning is the same.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum DropReason {
    Invalid,
    WriteError,
    CtCreateFailed,
    NoService,
    ServicePortUnknown,
    NoBackendSlot,
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        DropReason::Invalid,
        DropReason::WriteError,
        DropReason::CtCreateFailed,
        DropReason::NoService,
        DropReason::ServicePortUnknown,
        DropReason::NoBackendSlot,
    ];

    pub const fn code(self) -> u8 {
        match self {
            DropReason::Invalid => 134,
            DropReason::WriteError => 141,
            DropReason::CtCreateFailed => 155,
            DropReason::NoService => 158,
            DropReason::ServicePortUnknown => 210,
            DropReason::NoBackendSlot => 211,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The name the C header uses, without its `DROP_` prefix.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Invalid => "INVALID",
            DropReason::WriteError => "WRITE_ERROR",
            DropReason::CtCreateFailed => "CT_CREATE_FAILED",
            DropReason::NoService => "NO_SERVICE",
            DropReason::ServicePortUnknown => "SERVICE_PORT_UNKNOWN",
            DropReason::NoBackendSlot => "NO_BACKEND_SLOT",
        }
    }

    pub const fn description(self) -> &'static str {
        match self {
            DropReason::Invalid => "Invalid packet",
            DropReason::WriteError => "Failed to write packet",
            DropReason::CtCreateFailed => "Conntrack entry could not be created",
            DropReason::NoService => "Service has no ready backend (rejected)",
            DropReason::ServicePortUnknown => "Service port not found",
            DropReason::NoBackendSlot => "Service backend slot not found",
        }
    }
}
