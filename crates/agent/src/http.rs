//! The metrics address: `GET /metrics` for Prometheus, `/healthz` and `/readyz` for the
//! kubelet's probes, on axum.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    extract::State,
    http::{Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;
use tracing::warn;

use crate::AgentError;

/// Produces the body of `GET /metrics` and its content type. Called on a blocking thread:
/// it reads kernel maps with one syscall per entry.
pub type Render = Arc<dyn Fn() -> Result<(String, &'static str), AgentError> + Send + Sync>;

/// Whether the agent is ready to serve its node: set once a reconcile pass has realized
/// the first snapshot its source delivered (the Kubernetes source delivers none before
/// every initial list is complete; the cluster file none before the file exists; the
/// empty snapshot the agent starts with never counts), and never cleared (a later failed pass is `status`'s business, not a
/// reason for the kubelet to restart an agent whose datapath keeps running).
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

pub async fn bind(address: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| AgentError::Io {
            call: "bind",
            path: address.to_string().into(),
            source,
        })
}

pub async fn serve(listener: TcpListener, render: Render, readiness: Readiness) {
    if let Err(e) = axum::serve(listener, router(render, readiness)).await {
        warn!(error = %e, "metrics server stopped");
    }
}

#[derive(Clone)]
struct Probes {
    render: Render,
    readiness: Readiness,
}

fn router(render: Render, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(unknown_route)
        .with_state(Probes { render, readiness })
}

async fn metrics(State(probes): State<Probes>) -> Response {
    let render = probes.render;
    match tokio::task::spawn_blocking(move || render()).await {
        Ok(Ok((body, content_type))) => {
            ([(header::CONTENT_TYPE, content_type)], body).into_response()
        }
        Ok(Err(e)) => {
            warn!(error = %e, "reading metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// Liveness: the process serves.
async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(probes): State<Probes>) -> (StatusCode, &'static str) {
    if probes.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no reconcile pass has realized the maps yet\n",
        )
    }
}

async fn unknown_route(method: Method, uri: Uri) -> (StatusCode, String) {
    (StatusCode::NOT_FOUND, format!("no route {method} {uri}\n"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn request(address: SocketAddr, raw: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream.write_all(raw.as_bytes()).await.expect("write");
        let mut out = String::new();
        stream.read_to_string(&mut out).await.expect("read");
        out
    }

    async fn start(readiness: Readiness) -> SocketAddr {
        let listener = bind("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("bind");
        let address = listener.local_addr().expect("local address");
        let render: Render = Arc::new(|| {
            let metrics = crate::metrics::Metrics::default();
            Ok((metrics.render_agent_only(), crate::metrics::CONTENT_TYPE))
        });
        tokio::spawn(serve(listener, render, readiness));
        address
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_the_rest() {
        let address = start(Readiness::default()).await;
        let ok = request(
            address,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        // hyper writes header names in lower case, as HTTP/2 requires and HTTP/1.1 allows.
        assert!(
            ok.contains("content-type: application/openmetrics-text"),
            "{ok}"
        );
        assert!(
            ok.contains("# TYPE sluice_reconcile_duration_seconds histogram"),
            "{ok}"
        );
        assert!(ok.contains("sluice_build_info{version="), "{ok}");
        let (head, body) = ok.split_once("\r\n\r\n").expect("head and body");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );

        let close = "HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let missing = request(address, &format!("GET / {close}")).await;
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        let post = request(address, &format!("POST /metrics {close}")).await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        let garbage = request(address, "hello\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    }

    /// The probes as the kubelet sees them, through the client the lab uses.
    #[test]
    fn ready_only_after_the_first_pass() {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let readiness = Readiness::default();
        let address = runtime.block_on(start(readiness.clone()));
        let timeout = Duration::from_secs(5);
        let get = |path: &str| sluice_api::scrape(address, path, timeout);

        assert_eq!(get("/healthz").expect("healthz"), "ok\n");
        match get("/readyz") {
            Err(sluice_api::ApiError::Agent {
                status, message, ..
            }) => {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
                assert!(message.contains("not ready"), "{message}");
            }
            other => panic!("ready before the first pass: {other:?}"),
        }
        readiness.set();
        assert_eq!(get("/readyz").expect("readyz"), "ready\n");
        assert_eq!(get("/healthz").expect("healthz"), "ok\n");
        match get("/nothing-here") {
            Err(sluice_api::ApiError::Agent {
                status, message, ..
            }) => {
                assert_eq!(status, StatusCode::NOT_FOUND);
                assert!(message.contains("no route GET /nothing-here"), "{message}");
            }
            other => panic!("an unknown route answered: {other:?}"),
        }
    }
}
