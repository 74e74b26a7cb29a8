//! The subset of the CNI specification (SPEC.md, versions 1.0.0 and 1.1.0) this plugin
//! speaks, by the spec's own field names: the network configuration it reads on stdin, the
//! success result of ADD (and CHECK's `prevResult`), VERSION's answer and the error object.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The versions this plugin reads configurations of and writes results in.
pub const SUPPORTED_VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];
/// What an answer says when the request named no version this plugin can use.
pub const LATEST_VERSION: &str = "1.1.0";
/// The `type` the runtime finds this plugin's binary by.
pub const PLUGIN_TYPE: &str = "sluice-cni";
/// Where the agent serves its API when the configuration does not say.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/sluice/agent.sock";

/// The well-known error codes (SPEC.md, "Error"); 100 and above are this plugin's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    ContainerUnknown = 3,
    InvalidEnvironment = 4,
    IoFailure = 5,
    DecodeFailure = 6,
    InvalidNetworkConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot take ADDs now.
    NotAvailable = 50,
    /// The agent refused the request for a reason of its own (its message says which).
    AgentRefused = 100,
    /// CHECK: the attachment is not what ADD made (or no longer policed).
    CheckFailed = 101,
}

/// The network configuration on stdin, as a runtime passes it for one plugin of a list.
/// Fields this plugin does not use (`runtimeConfig`, `args`, `ipam`, `dns`, ...) are read past.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// This plugin's own field: the agent's API socket.
    #[serde(default)]
    pub agent_socket: Option<String>,
    /// CHECK (and DEL): what ADD returned.
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    /// GC: the attachments the runtime still has; every other one is stale.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<GcAttachment>>,
    /// The same list under the name an earlier draft of the spec used; libcni sends both.
    #[serde(default, rename = "cni.dev/attachments")]
    pub attachments: Option<Vec<GcAttachment>>,
}

/// One attachment of GC's list.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// VERSION reads only the version on stdin.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionRequest {
    pub cni_version: String,
}

/// VERSION's answer.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionResult {
    pub cni_version: String,
    pub supported_versions: Vec<String>,
}

/// ADD's success result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddResult {
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<RouteConfig>,
    pub dns: Dns,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The container's namespace for an interface inside it; absent for the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR notation: the pod's address with its prefix.
    pub address: ipnet::Ipv4Net,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Index into `interfaces` of the interface holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    pub dst: ipnet::Ipv4Net,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<Ipv4Addr>,
}

/// Left empty: cluster DNS is the kubelet's to configure.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {}

/// The error object a failed operation prints on stdout.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

/// Whether this plugin speaks `version`.
pub fn supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}
