//! The agent's local API.
//!
//! The agent listens on a Unix socket. Each connection carries one request line and one
//! response line, both JSON: `{"method":"status","params":null}` answers
//! `{"result":{...}}` or `{"error":"..."}`. A line protocol keeps the CLI free of an HTTP
//! stack; the Hubble-compatible gRPC API planned for the observer is a separate listener.

use std::{
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub mod flow;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("connect {path}: {source} (is the agent running?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{call} on {path}: {source}")]
    Io {
        call: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed message from {path}: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("agent at {path} answered: {message}")]
    Agent { path: PathBuf, message: String },
}

/// One request line.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub method: Method,
    #[serde(default)]
    pub params: serde_json::Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// [`AgentStatus`]
    Status,
    /// `Vec<`[`ServiceEntry`]`>`
    ServiceList,
    /// `Vec<`[`CtEntry`]`>`
    CtList,
    /// [`VerifyReport`]; params `{"repair": bool}`
    Verify,
    /// `Vec<`[`EndpointEntry`]`>`
    EndpointList,
    /// [`EndpointEntry`]; params `{"endpoint": "ns/pod" | "pod" | "<ifindex>"}`
    EndpointGet,
    /// `Vec<`[`IdentityEntry`]`>`
    IdentityList,
    /// [`IdentityEntry`]; params `{"id": u32}`
    IdentityGet,
    /// [`EndpointPolicyView`]; params `{"endpoint": ...}` as for `EndpointGet`
    PolicyGet,
    /// A stream of [`flow::Flow`]s, one JSON line each (no response envelope), ending when
    /// the buffered flows are sent or, with `follow`, when the client hangs up; params
    /// [`flow::ObserveRequest`]. A refused request answers one `{"error":...}` line.
    Observe,
}

/// One response line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    Result(serde_json::Value),
    Error(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: String,
    pub version: String,
    /// False while the last reconcile failed; `last_error` says why.
    pub healthy: bool,
    /// The agent's number for the newest snapshot it accepted from its source.
    pub desired_generation: u64,
    /// Generation whose map content is in the kernel.
    pub realized_generation: u64,
    /// The source's own revision of the desired generation (the lab's generation).
    pub desired_revision: u64,
    /// The source's revision of the realized generation: what a writer waits for.
    pub realized_revision: u64,
    pub last_error: Option<String>,
    pub reconciles: u64,
    pub endpoints: usize,
    pub maps: Vec<MapStatus>,
    /// Endpoints whose policy does not fit their map: they drop new connections in every
    /// enforced direction until it does.
    #[serde(default)]
    pub fails_closed: Vec<FailsClosed>,
    /// Fields of programmed objects the datapath does not implement yet: each object is
    /// programmed without them, as `programmed` says.
    #[serde(default)]
    pub unsupported: Vec<UnsupportedField>,
}

/// A field the compiler does not implement, on one object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsupportedField {
    /// `Service`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The field's path, such as `spec.sessionAffinity`.
    pub field: String,
    pub value: String,
    /// What is programmed without the field.
    pub programmed: String,
}

/// An endpoint whose computed policy needs more rows than its map may hold.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailsClosed {
    /// `namespace/pod`.
    pub endpoint: String,
    pub ifindex: u32,
    pub rows_needed: usize,
    pub map_max: u32,
}

/// A local endpoint with its identity and policy state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointEntry {
    /// ifindex of the host-side veth: the key of the endpoints and policy maps.
    pub ifindex: u32,
    pub namespace: String,
    pub pod: String,
    pub interface: String,
    pub ipv4: Ipv4Addr,
    pub identity: u32,
    /// Labels of the identity.
    pub labels: Vec<String>,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    /// Rows its policy needs.
    pub policy_rows: usize,
    pub policy_map_max: u32,
    /// NetworkPolicies (`namespace/name`) selecting it.
    pub policies: Vec<String>,
    /// `ready`, or `fails-closed` when its policy does not fit its map.
    pub status: String,
}

/// A security identity and the local endpoints that carry it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdentityEntry {
    pub id: u32,
    pub labels: Vec<String>,
    /// `namespace/pod` of local endpoints with this identity.
    pub endpoints: Vec<String>,
}

/// One endpoint's policy map as the kernel holds it, joined with the desired rows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointPolicyView {
    pub endpoint: EndpointEntry,
    /// max_entries of the installed map; None when no map is installed.
    pub map_max_entries: Option<u32>,
    pub rows: Vec<PolicyRow>,
}

/// An allow row.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyRow {
    /// `ingress` or `egress`.
    pub direction: String,
    /// 0 (ANY) matches every peer.
    pub identity: u32,
    pub identity_labels: Vec<String>,
    /// `TCP`, `UDP`, `SCTP`, or `ANY`.
    pub protocol: String,
    /// First and last destination port; None for any protocol.
    pub ports: Option<(u16, u16)>,
    /// LPM prefix length of the row: 40 any protocol, 48 any port, 64 one port.
    pub prefix: u32,
    /// Counters from the kernel: packets and bytes of the connections it admitted.
    pub packets: u64,
    pub bytes: u64,
    /// What allows it: NetworkPolicies (`namespace/name`) or `reserved:host`.
    pub allowed_by: Vec<String>,
    /// `realized` (in the kernel and desired), `unexpected` (in the kernel only) or
    /// `missing` (desired, not in the kernel).
    pub state: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapStatus {
    pub name: String,
    pub entries: u64,
    pub max_entries: u32,
}

/// A frontend with its backends, as read back from the kernel.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// `namespace/name:port-name` of the Kubernetes Service, when the agent knows it.
    pub service: Option<String>,
    pub kind: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    pub backends: Vec<BackendEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendEntry {
    pub address: Ipv4Addr,
    pub port: u16,
    pub state: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CtEntry {
    pub protocol: String,
    /// `egress`, `ingress` or `service`.
    pub scope: String,
    pub source: String,
    pub destination: String,
    /// Backend (service scope) or frontend to restore on replies (egress scope).
    pub nat: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub age_seconds: u64,
    pub idle_seconds: u64,
    pub flags: Vec<String>,
}

/// What `sluice verify` found: entries whose kernel content differs from the desired one.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub generation: u64,
    pub drift: Vec<Drift>,
    pub repaired: bool,
    /// Endpoints realized as intended but failing closed: their policy does not fit.
    #[serde(default)]
    pub fails_closed: Vec<FailsClosed>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Drift {
    pub map: String,
    /// `missing`, `unexpected` or `differs`.
    pub kind: String,
    pub key: String,
    pub desired: Option<String>,
    pub actual: Option<String>,
}

/// Blocking client, one connection per call.
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            timeout: Duration::from_secs(30),
        }
    }

    pub fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        params: serde_json::Value,
    ) -> Result<T, ApiError> {
        let path = &self.path;
        let stream = self.send(method, params, Some(self.timeout))?;
        let mut reply = String::new();
        BufReader::new(stream)
            .read_line(&mut reply)
            .map_err(|source| ApiError::Io {
                call: "read",
                path: path.clone(),
                source,
            })?;
        let decode = |source| ApiError::Decode {
            path: path.clone(),
            source,
        };
        match serde_json::from_str::<Response>(&reply).map_err(decode)? {
            Response::Result(value) => serde_json::from_value(value).map_err(decode),
            Response::Error(message) => Err(ApiError::Agent {
                path: path.clone(),
                message,
            }),
        }
    }

    pub fn status(&self) -> Result<AgentStatus, ApiError> {
        self.call(Method::Status, serde_json::Value::Null)
    }

    /// Streams flows: the buffered ones the request selects, then (with `follow`) new ones
    /// as they come, until the iterator is dropped.
    pub fn observe(&self, request: &flow::ObserveRequest) -> Result<FlowStream, ApiError> {
        let params = serde_json::to_value(request).map_err(|source| ApiError::Decode {
            path: self.path.clone(),
            source,
        })?;
        // A followed stream may be quiet for as long as the traffic is.
        let timeout = (!request.follow).then_some(self.timeout);
        let stream = self.send(Method::Observe, params, timeout)?;
        Ok(FlowStream {
            path: self.path.clone(),
            reader: BufReader::new(stream),
        })
    }

    /// Connects to the agent and sends one request; replies are read with `timeout`.
    fn send(
        &self,
        method: Method,
        params: serde_json::Value,
        timeout: Option<Duration>,
    ) -> Result<UnixStream, ApiError> {
        let path = &self.path;
        let io = |call| {
            move |source| ApiError::Io {
                call,
                path: path.clone(),
                source,
            }
        };
        let mut stream = UnixStream::connect(path).map_err(|source| ApiError::Connect {
            path: path.clone(),
            source,
        })?;
        stream.set_read_timeout(timeout).map_err(io("setsockopt"))?;
        let mut line =
            serde_json::to_vec(&Request { method, params }).map_err(|source| ApiError::Decode {
                path: path.clone(),
                source,
            })?;
        line.push(b'\n');
        stream.write_all(&line).map_err(io("write"))?;
        Ok(stream)
    }
}

/// The flows of one `observe` call, in order; ends when the agent closes the stream.
pub struct FlowStream {
    path: PathBuf,
    reader: BufReader<UnixStream>,
}

impl Iterator for FlowStream {
    type Item = Result<flow::Flow, ApiError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(source) => {
                return Some(Err(ApiError::Io {
                    call: "read",
                    path: self.path.clone(),
                    source,
                }));
            }
        }
        let decode = |source| ApiError::Decode {
            path: self.path.clone(),
            source,
        };
        let value = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(value) => value,
            Err(e) => return Some(Err(decode(e))),
        };
        if let Some(message) = value.get("error").and_then(serde_json::Value::as_str) {
            return Some(Err(ApiError::Agent {
                path: self.path.clone(),
                message: message.to_string(),
            }));
        }
        Some(serde_json::from_value(value).map_err(decode))
    }
}
