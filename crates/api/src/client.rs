//! The blocking client: hyper's HTTP/1.1 client on one connection per call, driven by a
//! current-thread runtime of its own, so the CLI and the lab keep synchronous call sites.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpStream, UnixStream},
    runtime::Runtime,
};

use crate::{
    AgentStatus, CtEntry, EndpointEntry, EndpointPolicyView, EndpointQuery, ErrorBody,
    IdentityEntry, IdentityQuery, ServiceEntry, VerifyReport, VerifyRequest,
    cni::{
        CniAddRequest, CniAllocation, CniAttachment, CniEndpoint, CniEndpointState, CniRemoved,
        CniStatus,
    },
    explain, flow, routes,
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("connect {at}: {source} (is the agent running?)")]
    Connect { at: String, source: std::io::Error },
    #[error("{call} for {at}: {source}")]
    Io {
        call: &'static str,
        at: String,
        source: std::io::Error,
    },
    #[error("HTTP to {at}: {source}")]
    Http { at: String, source: hyper::Error },
    #[error("encoding a request to {at}: {detail}")]
    Encode { at: String, detail: String },
    #[error("malformed message from {at}: {source}")]
    Decode {
        at: String,
        source: serde_json::Error,
    },
    #[error("{at} did not answer within {after:?}")]
    Timeout { at: String, after: Duration },
    #[error("agent at {at} answered: {message}")]
    Agent {
        at: String,
        status: StatusCode,
        message: String,
    },
}

/// Blocking client of one agent's socket, one connection per call.
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

    /// The same client, waiting up to `timeout` (30 s by default) for each answer.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }

    pub fn status(&self) -> Result<AgentStatus, ApiError> {
        self.get(routes::STATUS, None::<&()>)
    }

    pub fn services(&self) -> Result<Vec<ServiceEntry>, ApiError> {
        self.get(routes::SERVICES, None::<&()>)
    }

    pub fn conntrack(&self) -> Result<Vec<CtEntry>, ApiError> {
        self.get(routes::CONNTRACK, None::<&()>)
    }

    pub fn verify(&self, request: VerifyRequest) -> Result<VerifyReport, ApiError> {
        self.json(self.post(routes::VERIFY, &request)?)
    }

    pub fn endpoints(&self) -> Result<Vec<EndpointEntry>, ApiError> {
        self.get(routes::ENDPOINTS, None::<&()>)
    }

    pub fn endpoint(&self, endpoint: &str) -> Result<EndpointEntry, ApiError> {
        let query = EndpointQuery {
            endpoint: endpoint.to_string(),
        };
        self.get(routes::ENDPOINT, Some(&query))
    }

    pub fn identities(&self) -> Result<Vec<IdentityEntry>, ApiError> {
        self.get(routes::IDENTITIES, None::<&()>)
    }

    pub fn identity(&self, id: u32) -> Result<IdentityEntry, ApiError> {
        self.get(routes::IDENTITY, Some(&IdentityQuery { id }))
    }

    pub fn policy(&self, endpoint: &str) -> Result<EndpointPolicyView, ApiError> {
        let query = EndpointQuery {
            endpoint: endpoint.to_string(),
        };
        self.get(routes::POLICY, Some(&query))
    }

    /// Why `request`'s flow is allowed or denied, and whether the kernel agrees.
    pub fn explain(
        &self,
        request: &explain::ExplainRequest,
    ) -> Result<explain::PolicyExplanation, ApiError> {
        self.get(routes::POLICY_EXPLAIN, Some(request))
    }

    /// CNI `ADD`, first step: records the attachment and allocates its address.
    pub fn cni_add(&self, request: &CniAddRequest) -> Result<CniAllocation, ApiError> {
        self.json(self.post(routes::CNI_ADD, request)?)
    }

    /// CNI `ADD`, second step: the veth is wired; answers once its policy is realized.
    pub fn cni_attached(&self, attachment: &CniAttachment) -> Result<CniEndpointState, ApiError> {
        self.json(self.post(routes::CNI_ATTACHED, attachment)?)
    }

    /// CNI `CHECK`: the recorded endpoint and whether it is realized.
    pub fn cni_check(&self, attachment: &CniAttachment) -> Result<CniEndpointState, ApiError> {
        self.json(self.post(routes::CNI_CHECK, attachment)?)
    }

    /// CNI `DEL`: removes the attachment and releases its address; idempotent.
    pub fn cni_del(&self, attachment: &CniAttachment) -> Result<CniRemoved, ApiError> {
        self.json(self.post(routes::CNI_DEL, attachment)?)
    }

    /// CNI `STATUS`: whether the agent can take new pods.
    pub fn cni_status(&self) -> Result<CniStatus, ApiError> {
        self.get(routes::CNI_STATUS, None::<&()>)
    }

    /// Every attachment the agent holds (CNI `GC` removes those the runtime no longer has).
    pub fn cni_endpoints(&self) -> Result<Vec<CniEndpoint>, ApiError> {
        self.get(routes::CNI_ENDPOINTS, None::<&()>)
    }

    /// Streams flows: the buffered ones the request selects, then (with `follow`) new ones
    /// as they come, until the iterator is dropped.
    pub fn observe(&self, request: &flow::ObserveRequest) -> Result<FlowStream, ApiError> {
        let runtime = runtime(&self.at())?;
        let body = encode_json(&self.at(), request)?;
        let response = runtime.block_on(self.send(Method::POST, routes::OBSERVE.into(), body))?;
        let response = runtime.block_on(refused(&self.at(), response, self.timeout))?;
        Ok(FlowStream {
            at: self.at(),
            runtime,
            body: response.into_body(),
            pending: Vec::new(),
            // A followed stream may be quiet for as long as the traffic is.
            timeout: (!request.follow).then_some(self.timeout),
        })
    }

    fn at(&self) -> String {
        self.path.display().to_string()
    }

    fn get<Q: Serialize, T: DeserializeOwned>(
        &self,
        route: &str,
        query: Option<&Q>,
    ) -> Result<T, ApiError> {
        let uri = match query {
            None => route.to_string(),
            Some(query) => {
                let query = serde_urlencoded::to_string(query).map_err(|e| ApiError::Encode {
                    at: self.at(),
                    detail: e.to_string(),
                })?;
                format!("{route}?{query}")
            }
        };
        let runtime = runtime(&self.at())?;
        let body = runtime.block_on(async {
            let response = self.send(Method::GET, uri, Bytes::new()).await?;
            read_body(&self.at(), response, self.timeout).await
        })?;
        self.json(body)
    }

    fn post<B: Serialize>(&self, route: &str, body: &B) -> Result<Bytes, ApiError> {
        let body = encode_json(&self.at(), body)?;
        let runtime = runtime(&self.at())?;
        runtime.block_on(async {
            let response = self.send(Method::POST, route.into(), body).await?;
            read_body(&self.at(), response, self.timeout).await
        })
    }

    fn json<T: DeserializeOwned>(&self, body: Bytes) -> Result<T, ApiError> {
        serde_json::from_slice(&body).map_err(|source| ApiError::Decode {
            at: self.at(),
            source,
        })
    }

    /// Connects to the agent and sends one request; the answer's head comes back within
    /// the timeout.
    async fn send(
        &self,
        method: Method,
        uri: String,
        body: Bytes,
    ) -> Result<Response<Incoming>, ApiError> {
        let at = self.at();
        let stream = UnixStream::connect(&self.path)
            .await
            .map_err(|source| ApiError::Connect {
                at: at.clone(),
                source,
            })?;
        within(&at, self.timeout, exchange(&at, stream, method, uri, body)).await
    }
}

/// `GET path` from an HTTP server at `address` (the agent's metrics and probes); the body
/// of a 2xx answer, else [`ApiError::Agent`] with the status. Blocking, like [`Client`].
pub fn scrape(address: SocketAddr, path: &str, timeout: Duration) -> Result<String, ApiError> {
    let at = address.to_string();
    let runtime = runtime(&at)?;
    let body = runtime.block_on(async {
        let stream = within(&at, timeout, async {
            TcpStream::connect(address)
                .await
                .map_err(|source| ApiError::Connect {
                    at: at.clone(),
                    source,
                })
        })
        .await?;
        let response = within(
            &at,
            timeout,
            exchange(&at, stream, Method::GET, path.into(), Bytes::new()),
        )
        .await?;
        read_body(&at, response, timeout).await
    })?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn runtime(at: &str) -> Result<Runtime, ApiError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ApiError::Io {
            call: "create runtime",
            at: at.to_string(),
            source,
        })
}

fn encode_json<T: Serialize>(at: &str, value: &T) -> Result<Bytes, ApiError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| ApiError::Encode {
            at: at.to_string(),
            detail: e.to_string(),
        })
}

async fn within<T>(
    at: &str,
    after: Duration,
    work: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::time::timeout(after, work)
        .await
        .map_err(|_| ApiError::Timeout {
            at: at.to_string(),
            after,
        })?
}

/// One request on a fresh HTTP/1.1 connection over `io`.
async fn exchange<S>(
    at: &str,
    io: S,
    method: Method,
    uri: String,
    body: Bytes,
) -> Result<Response<Incoming>, ApiError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let http = |source| ApiError::Http {
        at: at.to_string(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(http)?;
    // Drives the connection while the caller's runtime runs; ends with it.
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "sluice-agent")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| ApiError::Encode {
            at: at.to_string(),
            detail: e.to_string(),
        })?;
    sender.send_request(request).await.map_err(http)
}

/// The whole body of a 2xx answer.
async fn read_body(
    at: &str,
    response: Response<Incoming>,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let response = refused(at, response, timeout).await?;
    within(at, timeout, async {
        let collected = response
            .into_body()
            .collect()
            .await
            .map_err(|source| ApiError::Http {
                at: at.to_string(),
                source,
            })?;
        Ok(collected.to_bytes())
    })
    .await
}

/// Passes a 2xx answer through; turns any other into [`ApiError::Agent`] with the
/// agent's message.
async fn refused(
    at: &str,
    response: Response<Incoming>,
    timeout: Duration,
) -> Result<Response<Incoming>, ApiError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = within(at, timeout, async {
        response
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|source| ApiError::Http {
                at: at.to_string(),
                source,
            })
    })
    .await?;
    let message = match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(body) => body.error,
        // Not the agent's own refusal (a proxy, a probe endpoint): its status and text.
        Err(_) => format!("{status}: {}", String::from_utf8_lossy(&body).trim()),
    };
    Err(ApiError::Agent {
        at: at.to_string(),
        status,
        message,
    })
}

/// The flows of one `observe` call, in order; ends when the agent closes the stream.
pub struct FlowStream {
    at: String,
    runtime: Runtime,
    body: Incoming,
    /// Bytes received past the last complete line.
    pending: Vec<u8>,
    /// How long to wait for the next chunk; None while following.
    timeout: Option<Duration>,
}

impl FlowStream {
    fn next_chunk(&mut self) -> Result<Option<Bytes>, ApiError> {
        let at = self.at.clone();
        let body = &mut self.body;
        let next = async move {
            loop {
                match body.frame().await {
                    None => return Ok(None),
                    Some(Err(source)) => return Err(ApiError::Http { at, source }),
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            return Ok(Some(data));
                        }
                    }
                }
            }
        };
        match self.timeout {
            None => self.runtime.block_on(next),
            Some(after) => self.runtime.block_on(within(&self.at, after, next)),
        }
    }

    fn decode(&self, line: &[u8]) -> Result<flow::Flow, ApiError> {
        serde_json::from_slice(line).map_err(|source| ApiError::Decode {
            at: self.at.clone(),
            source,
        })
    }
}

impl Iterator for FlowStream {
    type Item = Result<flow::Flow, ApiError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Some(self.decode(&line[..end]));
            }
            match self.next_chunk() {
                Ok(Some(data)) => self.pending.extend_from_slice(&data),
                Ok(None) if self.pending.iter().all(u8::is_ascii_whitespace) => return None,
                Ok(None) => {
                    let line = std::mem::take(&mut self.pending);
                    return Some(self.decode(&line));
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
