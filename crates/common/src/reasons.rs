//! Why the datapath dropped (or rejected) a packet. Mirrors the `DROP_*` defines in
//! `bpf/lib/common.h`; numbers follow Cilium's where the meaning is the same.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum DropReason {
    InvalidSource,
    Policy,
    Invalid,
    FragNeeded,
    UnknownL3,
    WriteError,
    NoTunnelKey,
    CtCreateFailed,
    NoService,
    NoTunnelEndpoint,
    NatNoMapping,
    InvalidIdentity,
    UnknownSender,
    FragNotFound,
    NotInSrcRange,
    ServicePortUnknown,
    NoBackendSlot,
    PolicyUnavailable,
    NoNodeAddress,
    SlotBackendMissing,
}

impl DropReason {
    pub const ALL: [DropReason; 20] = [
        DropReason::InvalidSource,
        DropReason::Policy,
        DropReason::Invalid,
        DropReason::FragNeeded,
        DropReason::UnknownL3,
        DropReason::WriteError,
        DropReason::NoTunnelKey,
        DropReason::CtCreateFailed,
        DropReason::NoService,
        DropReason::NoTunnelEndpoint,
        DropReason::NatNoMapping,
        DropReason::InvalidIdentity,
        DropReason::UnknownSender,
        DropReason::FragNotFound,
        DropReason::NotInSrcRange,
        DropReason::ServicePortUnknown,
        DropReason::NoBackendSlot,
        DropReason::PolicyUnavailable,
        DropReason::NoNodeAddress,
        DropReason::SlotBackendMissing,
    ];

    pub const fn code(self) -> u8 {
        match self {
            DropReason::InvalidSource => 132,
            DropReason::Policy => 133,
            DropReason::Invalid => 134,
            DropReason::FragNeeded => 136,
            DropReason::UnknownL3 => 139,
            DropReason::WriteError => 141,
            DropReason::NoTunnelKey => 147,
            DropReason::CtCreateFailed => 155,
            DropReason::NoService => 158,
            DropReason::NoTunnelEndpoint => 160,
            DropReason::NatNoMapping => 167,
            DropReason::InvalidIdentity => 171,
            DropReason::UnknownSender => 172,
            DropReason::FragNotFound => 175,
            DropReason::NotInSrcRange => 177,
            DropReason::ServicePortUnknown => 210,
            DropReason::NoBackendSlot => 211,
            DropReason::PolicyUnavailable => 212,
            DropReason::NoNodeAddress => 213,
            DropReason::SlotBackendMissing => 214,
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
            DropReason::FragNeeded => "FRAG_NEEDED",
            DropReason::UnknownL3 => "UNKNOWN_L3",
            DropReason::WriteError => "WRITE_ERROR",
            DropReason::NoTunnelKey => "NO_TUNNEL_KEY",
            DropReason::CtCreateFailed => "CT_CREATE_FAILED",
            DropReason::NoService => "NO_SERVICE",
            DropReason::NoTunnelEndpoint => "NO_TUNNEL_ENDPOINT",
            DropReason::NatNoMapping => "NAT_NO_MAPPING",
            DropReason::InvalidIdentity => "INVALID_IDENTITY",
            DropReason::UnknownSender => "UNKNOWN_SENDER",
            DropReason::FragNotFound => "FRAG_NOT_FOUND",
            DropReason::NotInSrcRange => "NOT_IN_SRC_RANGE",
            DropReason::ServicePortUnknown => "SERVICE_PORT_UNKNOWN",
            DropReason::NoBackendSlot => "NO_BACKEND_SLOT",
            DropReason::PolicyUnavailable => "POLICY_UNAVAILABLE",
            DropReason::NoNodeAddress => "NO_NODE_ADDRESS",
            DropReason::SlotBackendMissing => "SLOT_BACKEND_MISSING",
        }
    }

    /// The name Hubble's flow JSON gives the reason (`drop_reason_desc`); sluice's own
    /// reasons keep their header name.
    pub const fn hubble_name(self) -> &'static str {
        match self {
            DropReason::InvalidSource => "INVALID_SOURCE_IP",
            DropReason::Policy => "POLICY_DENIED",
            DropReason::Invalid => "INVALID_PACKET_DROPPED",
            DropReason::FragNeeded => "FRAG_NEEDED",
            DropReason::UnknownL3 => "UNKNOWN_L3_TARGET_ADDRESS",
            DropReason::WriteError => "ERROR_WRITING_TO_PACKET",
            DropReason::NoTunnelKey => "ERROR_RETRIEVING_TUNNEL_KEY",
            DropReason::CtCreateFailed => "CT_MAP_INSERTION_FAILED",
            DropReason::NoService => "SERVICE_BACKEND_NOT_FOUND",
            DropReason::NoTunnelEndpoint => "NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT",
            DropReason::NatNoMapping => "SNAT_NO_MAP_FOUND",
            DropReason::InvalidIdentity => "INVALID_IDENTITY",
            DropReason::UnknownSender => "UNKNOWN_SENDER",
            DropReason::FragNotFound => "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND",
            DropReason::NotInSrcRange => "DENIED_BY_LB_SRC_RANGE_CHECK",
            DropReason::ServicePortUnknown
            | DropReason::NoBackendSlot
            | DropReason::PolicyUnavailable
            | DropReason::NoNodeAddress
            | DropReason::SlotBackendMissing => self.name(),
        }
    }

    pub const fn description(self) -> &'static str {
        match self {
            DropReason::InvalidSource => "Invalid source ip",
            DropReason::Policy => "Policy denied",
            DropReason::Invalid => "Invalid packet",
            DropReason::FragNeeded => "Fragmentation needed (answered with ICMP)",
            DropReason::UnknownL3 => "Unsupported L3 protocol (IPv6 is not supported yet)",
            DropReason::WriteError => "Failed to write packet",
            DropReason::NoTunnelKey => "Error retrieving tunnel key",
            DropReason::CtCreateFailed => "Conntrack entry could not be created",
            DropReason::NoService => "Service has no ready backend (rejected)",
            DropReason::NoTunnelEndpoint => "No tunnel/encapsulation endpoint",
            DropReason::NatNoMapping => "No free SNAT port toward the backend",
            DropReason::InvalidIdentity => "Invalid identity",
            DropReason::UnknownSender => "Tunnel packet from an address that is no node",
            DropReason::FragNotFound => "First logical datagram fragment not found",
            DropReason::NotInSrcRange => "Source outside the load balancer's source ranges",
            DropReason::ServicePortUnknown => "Service port not found",
            DropReason::NoBackendSlot => "Service backend slot not found",
            DropReason::PolicyUnavailable => "Endpoint policy not realized (fails closed)",
            DropReason::NoNodeAddress => "Backend on another node, but no node address to SNAT to",
            DropReason::SlotBackendMissing => "Service backend slot names a removed backend",
        }
    }
}
