//! The local API on the agent's Unix socket: axum routes, one per question of
//! [`sluice_api::routes`], typed requests and JSON answers; `observe` answers a chunked
//! stream of flow lines.

use std::{path::Path, sync::Arc};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{
        Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
    http::{Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures_util::{StreamExt, stream};
use serde::Serialize;
use sluice_api::{
    AgentStatus, CtEntry, EndpointEntry, EndpointPolicyView, EndpointQuery, ErrorBody,
    IdentityEntry, IdentityQuery, NDJSON, ServiceEntry, VerifyReport, VerifyRequest,
    cni::{
        CniAddRequest, CniAllocation, CniAttachment, CniEndpoint, CniEndpointState, CniRemoved,
        CniStatus,
    },
    explain::{ExplainRequest, PolicyExplanation},
    flow::{Flow, ObserveRequest},
    routes,
};
use sluice_observer::{FlowBuffer, FlowReceiver};
use tokio::{net::UnixListener, sync::broadcast};
use tracing::warn;

use crate::{AgentError, cni::Cni, views::Views};

/// How long `observe` waits for the event reader to drain the ring before answering from
/// what the buffer holds.
const CATCH_UP: std::time::Duration = std::time::Duration::from_millis(250);

/// Binds the socket, replacing a stale one left by a previous agent. The API changes the
/// node's dataplane, so only root may connect: the socket is 0600, and a directory the
/// agent creates for it is 0700 (one that exists, such as a shared /run, keeps its mode).
pub fn bind(path: &Path) -> Result<UnixListener, AgentError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |call| {
        move |source| AgentError::Io {
            call,
            path: path.to_path_buf(),
            source,
        }
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("mkdir"))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("unlink")(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(io("bind"))?;
    // bind(2) leaves the mode to the umask; narrow it before anyone is served.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io("chmod"))?;
    Ok(listener)
}

/// The inode of the socket file at `path`, None if there is none: the agent compares it
/// with the one it bound to notice the file removed or replaced.
pub fn socket_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|meta| meta.ino())
}

/// Serves until `stop` fires (or its sender is dropped), then lets open connections finish.
pub async fn serve(
    listener: UnixListener,
    views: Arc<Views>,
    flows: Arc<FlowBuffer>,
    cni: Arc<Cni>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let server = axum::serve(listener, router(views, flows, cni)).with_graceful_shutdown(async {
        let _ = stop.await;
    });
    if let Err(e) = server.await {
        warn!(error = %e, "API server stopped");
    }
}

/// The views answer without waiting for a reconcile pass: they read the state the loop
/// published and, on the blocking pool, the kernel maps.
#[derive(Clone)]
struct Api {
    views: Arc<Views>,
}

fn router(views: Arc<Views>, flows: Arc<FlowBuffer>, cni: Arc<Cni>) -> Router {
    Router::new()
        .route(routes::STATUS, get(status))
        .route(routes::SERVICES, get(services))
        .route(routes::CONNTRACK, get(conntrack))
        .route(routes::VERIFY, post(verify))
        .route(routes::ENDPOINTS, get(endpoints))
        .route(routes::ENDPOINT, get(endpoint))
        .route(routes::IDENTITIES, get(identities))
        .route(routes::IDENTITY, get(identity))
        .route(routes::POLICY, get(policy))
        .route(routes::POLICY_EXPLAIN, get(explain))
        .with_state(Api { views })
        .merge(observe_router(flows))
        .merge(cni_router(cni))
        .fallback(unknown_route)
}

/// The CNI plugin's routes: they need the endpoint registry, not the views.
fn cni_router(cni: Arc<Cni>) -> Router {
    Router::new()
        .route(routes::CNI_ADD, post(cni_add))
        .route(routes::CNI_ATTACHED, post(cni_attached))
        .route(routes::CNI_CHECK, post(cni_check))
        .route(routes::CNI_DEL, post(cni_del))
        .route(routes::CNI_STATUS, get(cni_status))
        .route(routes::CNI_ENDPOINTS, get(cni_endpoints))
        .with_state(cni)
}

/// The flows need no node: kept apart, they are served (and tested) from the buffer alone.
fn observe_router(flows: Arc<FlowBuffer>) -> Router {
    Router::new()
        .route(routes::OBSERVE, post(observe))
        .with_state(flows)
}

/// A refused request: its status and the message the CLI prints.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<AgentError> for Refusal {
    fn from(e: AgentError) -> Self {
        let status = match e {
            // The request names no endpoint or identity of this node (or, for a bare pod
            // name, no single one).
            AgentError::Query(_) => StatusCode::NOT_FOUND,
            // No snapshot yet, or the reconcile loop is shutting down: ask again later.
            AgentError::NoSnapshot | AgentError::Stopped | AgentError::CniNotReady(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AgentError::CniUnknown { .. } => StatusCode::NOT_FOUND,
            AgentError::CniRefused(_) => StatusCode::BAD_REQUEST,
            AgentError::CniPoolExhausted { .. } => StatusCode::CONFLICT,
            AgentError::CniTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Refusal(status, e.to_string())
    }
}

impl From<JsonRejection> for Refusal {
    fn from(e: JsonRejection) -> Self {
        Refusal(e.status(), format!("malformed request: {}", e.body_text()))
    }
}

impl From<QueryRejection> for Refusal {
    fn from(e: QueryRejection) -> Self {
        Refusal(e.status(), format!("malformed request: {}", e.body_text()))
    }
}

async fn unknown_route(method: Method, uri: Uri) -> Refusal {
    Refusal(StatusCode::NOT_FOUND, format!("no route {method} {uri}"))
}

type Answer<T> = Result<Json<T>, Refusal>;

fn answer<T>(result: Result<T, AgentError>) -> Answer<T> {
    result.map(Json).map_err(Refusal::from)
}

async fn status(State(api): State<Api>) -> Answer<AgentStatus> {
    answer(api.views.status().await)
}

async fn services(State(api): State<Api>) -> Answer<Vec<ServiceEntry>> {
    answer(api.views.services().await)
}

async fn conntrack(State(api): State<Api>) -> Answer<Vec<CtEntry>> {
    answer(api.views.conntrack().await)
}

async fn verify(
    State(api): State<Api>,
    request: Result<Json<VerifyRequest>, JsonRejection>,
) -> Answer<VerifyReport> {
    let Json(request) = request?;
    answer(api.views.verify(request.repair).await)
}

async fn endpoints(State(api): State<Api>) -> Answer<Vec<EndpointEntry>> {
    Ok(Json(api.views.endpoints()))
}

async fn endpoint(
    State(api): State<Api>,
    query: Result<Query<EndpointQuery>, QueryRejection>,
) -> Answer<EndpointEntry> {
    let Query(query) = query?;
    answer(api.views.endpoint(&query.endpoint))
}

async fn identities(State(api): State<Api>) -> Answer<Vec<IdentityEntry>> {
    Ok(Json(api.views.identities()))
}

async fn identity(
    State(api): State<Api>,
    query: Result<Query<IdentityQuery>, QueryRejection>,
) -> Answer<IdentityEntry> {
    let Query(query) = query?;
    answer(api.views.identity(query.id))
}

async fn policy(
    State(api): State<Api>,
    query: Result<Query<EndpointQuery>, QueryRejection>,
) -> Answer<EndpointPolicyView> {
    let Query(query) = query?;
    answer(api.views.policy(query.endpoint).await)
}

async fn explain(
    State(api): State<Api>,
    query: Result<Query<ExplainRequest>, QueryRejection>,
) -> Answer<PolicyExplanation> {
    let Query(query) = query?;
    answer(api.views.explain(query).await)
}

async fn cni_add(
    State(cni): State<Arc<Cni>>,
    request: Result<Json<CniAddRequest>, JsonRejection>,
) -> Answer<CniAllocation> {
    let Json(request) = request?;
    answer(cni.add(request).await)
}

async fn cni_attached(
    State(cni): State<Arc<Cni>>,
    request: Result<Json<CniAttachment>, JsonRejection>,
) -> Answer<CniEndpointState> {
    let Json(attachment) = request?;
    answer(cni.attached(attachment).await)
}

async fn cni_check(
    State(cni): State<Arc<Cni>>,
    request: Result<Json<CniAttachment>, JsonRejection>,
) -> Answer<CniEndpointState> {
    let Json(attachment) = request?;
    answer(cni.check(attachment).await)
}

async fn cni_del(
    State(cni): State<Arc<Cni>>,
    request: Result<Json<CniAttachment>, JsonRejection>,
) -> Answer<CniRemoved> {
    let Json(attachment) = request?;
    answer(cni.del(attachment).await)
}

async fn cni_status(State(cni): State<Arc<Cni>>) -> Answer<CniStatus> {
    answer(cni.status().await)
}

async fn cni_endpoints(State(cni): State<Arc<Cni>>) -> Answer<Vec<CniEndpoint>> {
    answer(cni.endpoints().await)
}

/// Sends the buffered flows the request selects, then, with `follow`, every new matching
/// flow until the client hangs up (hyper then drops the body). Filtering happens here, as
/// in Hubble, so a follower of a rare flow costs the socket nothing for the others.
async fn observe(
    State(flows): State<Arc<FlowBuffer>>,
    request: Result<Json<ObserveRequest>, JsonRejection>,
) -> Result<Response, Refusal> {
    let Json(request) = request?;
    let filter = request.filter;
    let keep = move |flow: &Flow| sluice_observer::matches(&filter, flow);
    // Flows of traffic that just ended may still sit in the ring: `observe --last` right
    // after a request must show it.
    flows.catch_up(CATCH_UP).await;
    let (buffered, receiver) = flows.snapshot(request.last, &keep);
    let mut head = Vec::new();
    for flow in &buffered {
        head.extend(line(flow));
    }
    let body = if request.follow {
        let first = stream::once(async move { Ok(Bytes::from(head)) });
        Body::from_stream(first.chain(follow(receiver, keep)))
    } else {
        Body::from(head)
    };
    Ok(([(header::CONTENT_TYPE, NDJSON)], body).into_response())
}

/// New flows that `keep` selects, one line each, until the buffer closes.
fn follow(
    receiver: FlowReceiver,
    keep: impl Fn(&Flow) -> bool + Send + 'static,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    stream::unfold((receiver, keep), |(mut receiver, keep)| async move {
        loop {
            match receiver.recv().await {
                Ok(flow) if keep(&flow) => {
                    return Some((Ok(Bytes::from(line(&flow))), (receiver, keep)));
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    warn!(missed, "observe client too slow; skipped flows");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

fn line<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(value)
        .unwrap_or_else(|e| format!(r#"{{"error":"encoding a flow: {e}"}}"#).into_bytes());
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use sluice_api::{
        Client,
        flow::{FlowEventType, FlowFilter},
    };
    use sluice_common::{EVENT_DROP, EVENT_TRACE, FlowEvent, IPPROTO_TCP, addr_be};
    use sluice_observer::Resolver;

    use super::*;

    /// An event of `type_` whose source port is `n`, and the flow the buffer names it as.
    fn event(n: u16, type_: u8) -> (FlowEvent, Flow) {
        let event = FlowEvent {
            type_,
            reason: if type_ == EVENT_DROP { 133 } else { 0 },
            proto: IPPROTO_TCP,
            saddr: addr_be(Ipv4Addr::new(10, 0, 0, 1)),
            daddr: addr_be(Ipv4Addr::new(10, 0, 0, 2)),
            sport: n.to_be(),
            dport: 80u16.to_be(),
            ..FlowEvent::default()
        };
        (event, resolver().flow(&event))
    }

    fn resolver() -> Resolver {
        Resolver::for_node("node-1", 0)
    }

    /// Buffered flows, then followed ones as they come, filtered in the agent, one JSON
    /// line each over the chunked body; a malformed request is refused with its status.
    #[test]
    fn observe_streams_buffered_then_followed_flows() {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let dir = Removed(
            std::env::temp_dir().join(format!("sluice-test-observe-{}", std::process::id())),
        );
        let socket = dir.0.join("api.sock");
        let listener = runtime.block_on(async { bind(&socket) }).expect("bind");
        let flows = Arc::new(FlowBuffer::new(16, resolver()));
        flows.push(event(1, EVENT_TRACE).0);
        flows.push(event(2, EVENT_DROP).0);
        let router = observe_router(Arc::clone(&flows)).fallback(unknown_route);
        runtime.spawn(async move { axum::serve(listener, router).await });

        let client = Client::new(&socket);
        let drops = FlowFilter {
            event_type: vec![FlowEventType::Drop],
            ..FlowFilter::default()
        };
        let buffered: Vec<Flow> = client
            .observe(&ObserveRequest {
                last: None,
                follow: false,
                filter: drops.clone(),
            })
            .expect("observe")
            .collect::<Result<_, _>>()
            .expect("flows");
        assert_eq!(buffered, [event(2, EVENT_DROP).1]);

        let mut followed = client
            .observe(&ObserveRequest {
                last: Some(1),
                follow: true,
                filter: drops,
            })
            .expect("follow");
        assert_eq!(
            followed.next().and_then(Result::ok),
            Some(event(2, EVENT_DROP).1)
        );
        // The subscription exists once the buffered flow arrived: later pushes reach it.
        flows.push(event(3, EVENT_TRACE).0);
        flows.push(event(4, EVENT_DROP).0);
        assert_eq!(
            followed.next().and_then(Result::ok),
            Some(event(4, EVENT_DROP).1)
        );
        assert_eq!(flows.subscribers(), 1);
        // The client hanging up ends the follow: hyper drops the body and its subscription.
        drop(followed);
        let hung_up = std::time::Instant::now();
        while flows.subscribers() > 0 {
            assert!(
                hung_up.elapsed() < Duration::from_secs(5),
                "the follow outlived its client"
            );
            std::thread::sleep(Duration::from_millis(10));
        }

        let refused = raw_post(&socket, routes::OBSERVE, r#"{"last": "many"}"#);
        assert!(refused.starts_with("HTTP/1.1 422 "), "{refused}");
        assert!(refused.contains("malformed request"), "{refused}");
        runtime.shutdown_timeout(Duration::from_secs(1));
    }

    /// A directory removed when the test ends, passed or failed.
    struct Removed(std::path::PathBuf);

    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A raw POST on the socket, for answers the client turns into errors.
    fn raw_post(path: &Path, route: &str, body: &str) -> String {
        use std::io::{Read, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(path).expect("connect");
        write!(
            stream,
            "POST {route} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut out = String::new();
        stream.read_to_string(&mut out).expect("read");
        out
    }
}
