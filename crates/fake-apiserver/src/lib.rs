//! A Kubernetes API server at the HTTP level, for tests: cluster-wide `GET` lists with a
//! resourceVersion (in pages with `limit` and `continue`, all read at the first page's
//! version), and `?watch=1&resourceVersion=..&allowWatchBookmarks=true` as chunked
//! streams of JSON lines (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR), as the API reference
//! describes them. A test can inject what a real server does to its clients: 410 Gone (in
//! the stream and as the answer to a watch), dropped connections, 500 and 429.
//!
//! It serves on a listener the test made, so the test chooses the network namespace (a
//! test namespace's loopback); it runs on a thread and runtime of its own.

pub mod cluster;
mod resource;
mod state;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    thread::JoinHandle,
};

use axum::{
    Router,
    body::Body,
    extract::{Path, Query, State as Extract},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
pub use resource::Resource;
use serde::{Deserialize, Serialize};
pub use state::Traffic;
use state::{Answer, State};
use tokio::sync::{oneshot, watch};

#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    #[error("{call}: {source}")]
    Io {
        call: &'static str,
        source: std::io::Error,
    },
    #[error("{kind} is not a kind this server serves")]
    UnknownKind { kind: String },
    #[error("a {kind} without metadata.name")]
    NoName { kind: &'static str },
    #[error("encoding a {kind}: {source}")]
    Encode {
        kind: &'static str,
        source: serde_json::Error,
    },
}

/// A fault the next matching request of a resource meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next list or watch is answered with this HTTP status and a Status body.
    Status(u16),
    /// The next watch is answered with HTTP 410 Gone (lists are not affected).
    GoneOnWatchStart,
}

/// One request the server answered, for tests to check what the client asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLog {
    pub resource: Resource,
    pub watch: bool,
    /// The `resourceVersion` parameter, as sent.
    pub resource_version: Option<String>,
    pub status: u16,
}

pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
    /// Resources whose lists wait (the connection open, no answer) until resumed.
    paused: Arc<watch::Sender<BTreeSet<Resource>>>,
    address: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Serves on `listener` (bound by the caller, in the namespace it chose).
    pub fn start(listener: std::net::TcpListener) -> Result<Self, FakeError> {
        let io = |call| move |source| FakeError::Io { call, source };
        let address = listener.local_addr().map_err(io("getsockname"))?;
        listener.set_nonblocking(true).map_err(io("fcntl"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("tokio runtime"))?;
        let state = Arc::new(Mutex::new(State::default()));
        let paused = Arc::new(watch::Sender::new(BTreeSet::new()));
        let router = router(Shared {
            state: Arc::clone(&state),
            paused: Arc::clone(&paused),
        });
        let (shutdown, stop) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let serve = axum::serve(listener, router).with_graceful_shutdown(async {
                        let _ = stop.await;
                    });
                    if let Err(e) = serve.await {
                        tracing::warn!(error = %e, "fake API server stopped");
                    }
                });
            })
            .map_err(io("spawn"))?;
        Ok(Self {
            state,
            paused,
            address,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// A kubeconfig naming this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: test\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: test\n\
             current-context: fake\n",
            self.address
        )
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates or replaces `object` (any of the served kinds); returns its resourceVersion.
    pub fn apply<K: k8s_openapi::Resource + Serialize>(
        &self,
        object: &K,
    ) -> Result<u64, FakeError> {
        let resource = Resource::of_kind(K::KIND).ok_or_else(|| FakeError::UnknownKind {
            kind: K::KIND.to_owned(),
        })?;
        let value = serde_json::to_value(object).map_err(|source| FakeError::Encode {
            kind: resource.kind(),
            source,
        })?;
        self.apply_json(resource, value)
    }

    /// Creates or replaces an object of `resource` given as JSON (a generated cluster's
    /// objects skip the typed round trip); returns its resourceVersion.
    pub fn apply_json(
        &self,
        resource: Resource,
        object: serde_json::Value,
    ) -> Result<u64, FakeError> {
        self.lock()
            .apply(resource, object)
            .ok_or(FakeError::NoName {
                kind: resource.kind(),
            })
    }

    /// What the server has sent on watches and lists so far, per resource.
    pub fn traffic(&self) -> std::collections::BTreeMap<Resource, Traffic> {
        self.lock().traffic.clone()
    }

    /// Deletes the object `key` (`namespace/name`, or `name` for Nodes and Namespaces);
    /// None if it did not exist.
    pub fn delete(&self, resource: Resource, key: &str) -> Option<u64> {
        self.lock().delete(resource, key)
    }

    /// The current resourceVersion.
    pub fn revision(&self) -> u64 {
        self.lock().revision()
    }

    /// Sends a BOOKMARK at the current version on every watch that allows them.
    pub fn bookmark(&self) {
        self.lock().bookmark();
    }

    /// Forgets the event history: open watches get an ERROR event with a 410 Status and
    /// end, and a watch from an older version gets the same.
    pub fn compact(&self) {
        self.lock().compact();
    }

    /// Drops the open watches of `resource` at once, without the final chunk.
    pub fn drop_watches(&self, resource: Resource) {
        self.lock().drop_watches(resource, false);
    }

    /// Drops the open watches of `resource` half way through their next event.
    pub fn drop_watches_mid_event(&self, resource: Resource) {
        self.lock().drop_watches(resource, true);
    }

    pub fn inject(&self, resource: Resource, fault: Fault) {
        self.lock().inject(resource, fault);
    }

    /// Holds the lists of `resource` unanswered until [`Self::resume`], as a slow server
    /// would: the client's initial list stays incomplete meanwhile.
    pub fn pause(&self, resource: Resource) {
        self.paused.send_modify(|p| {
            p.insert(resource);
        });
    }

    pub fn resume(&self, resource: Resource) {
        self.paused.send_modify(|p| {
            p.remove(&resource);
        });
    }

    /// Open watches of `resource`.
    pub fn watches(&self, resource: Resource) -> usize {
        self.lock().watch_count(resource)
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.lock().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // Open watches end with the state's senders; graceful shutdown waits for them.
        *self.lock() = State::default();
        self.paused.send_replace(BTreeSet::new());
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<State>>,
    paused: Arc<watch::Sender<BTreeSet<Resource>>>,
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/api/{version}/{plural}", get(core))
        .route("/apis/{group}/{version}/{plural}", get(grouped))
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such path\n") })
        .with_state(state)
}

/// The query parameters of a list or watch this server reads (label and field selectors,
/// which sluice does not send, are ignored).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Params {
    watch: Option<String>,
    resource_version: Option<String>,
    allow_watch_bookmarks: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

fn truthy(value: Option<&str>) -> bool {
    matches!(value, Some("1" | "true"))
}

async fn core(
    Extract(state): Extract<Shared>,
    Path((version, plural)): Path<(String, String)>,
    Query(params): Query<Params>,
) -> Response {
    serve(&state, "", &version, &plural, &params).await
}

async fn grouped(
    Extract(state): Extract<Shared>,
    Path((group, version, plural)): Path<(String, String, String)>,
    Query(params): Query<Params>,
) -> Response {
    serve(&state, &group, &version, &plural, &params).await
}

async fn serve(
    shared: &Shared,
    group: &str,
    version: &str,
    plural: &str,
    params: &Params,
) -> Response {
    let Some(resource) = Resource::from_path(group, version, plural) else {
        let body = state::status(
            404,
            "NotFound",
            format!("the server could not find {plural}"),
        );
        return json_response(StatusCode::NOT_FOUND, &body);
    };
    let watch = truthy(params.watch.as_deref());
    if !watch {
        // The sender lives as long as the server; a closed channel just answers.
        let _ = shared
            .paused
            .subscribe()
            .wait_for(|p| !p.contains(&resource))
            .await;
    }
    let answer = shared
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .answer(&state::Request {
            resource,
            watch,
            resource_version: params.resource_version.as_deref(),
            bookmarks: truthy(params.allow_watch_bookmarks.as_deref()),
            limit: params.limit,
            continue_token: params.continue_token.as_deref(),
        });
    match answer {
        Answer::Status(code, body) => json_response(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &body,
        ),
        Answer::List(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Answer::Watch(rx) => {
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                let chunk = rx.recv().await?;
                if chunk.is_err() {
                    // hyper flushes what it buffered when the body waits; failing at once
                    // could drop the chunks before the cut along with the connection.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Some((chunk, rx))
            });
            (
                [(header::CONTENT_TYPE, "application/json")],
                Body::from_stream(stream),
            )
                .into_response()
        }
    }
}

fn json_response(code: StatusCode, body: &serde_json::Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
