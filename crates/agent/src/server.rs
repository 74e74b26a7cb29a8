//! The local API: one JSON request line and one JSON response line per connection.

use std::{path::Path, sync::Arc};

use sluice_api::{Method, Request, Response};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};
use tracing::warn;

use crate::{AgentError, Node};

/// Binds the socket, replacing a stale one left by a previous agent.
pub fn bind(path: &Path) -> Result<UnixListener, AgentError> {
    let io = |call| {
        move |source| AgentError::Io {
            call,
            path: path.to_path_buf(),
            source,
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("mkdir"))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("unlink")(e)),
        _ => {}
    }
    UnixListener::bind(path).map_err(io("bind"))
}

pub async fn serve(listener: UnixListener, node: Arc<Mutex<Node>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, Arc::clone(&node)));
            }
            Err(e) => warn!(error = %e, "accept on API socket failed"),
        }
    }
}

async fn handle(stream: UnixStream, node: Arc<Mutex<Node>>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    if BufReader::new(read).read_line(&mut line).await.is_err() {
        return;
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => dispatch(request, &node).await,
        Err(e) => Response::Error(format!("malformed request: {e}")),
    };
    let mut out = serde_json::to_vec(&response)
        .unwrap_or_else(|e| format!(r#"{{"error":"encoding response: {e}"}}"#).into_bytes());
    out.push(b'\n');
    if let Err(e) = write.write_all(&out).await {
        warn!(error = %e, "writing API response failed");
    }
}

async fn dispatch(request: Request, node: &Mutex<Node>) -> Response {
    let mut node = node.lock().await;
    let result = match request.method {
        Method::Status => node.status().map(to_json),
        Method::ServiceList => node.services().map(to_json),
        Method::CtList => node.conntrack().map(to_json),
        Method::Verify => {
            let repair = request
                .params
                .get("repair")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false);
            node.verify(repair).map(to_json)
        }
        Method::EndpointList => Ok(to_json(node.endpoints())),
        Method::EndpointGet => param_str(&request.params, "endpoint")
            .and_then(|e| node.endpoint(e))
            .map(to_json),
        Method::IdentityList => Ok(to_json(node.identities())),
        Method::IdentityGet => request
            .params
            .get("id")
            .and_then(serde_json::Value::as_u64)
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| AgentError::Query("params need a numeric \"id\"".into()))
            .and_then(|id| node.identity(id))
            .map(to_json),
        Method::PolicyGet => param_str(&request.params, "endpoint")
            .and_then(|e| node.policy(e))
            .map(to_json),
    };
    match result {
        Ok(value) => Response::Result(value),
        Err(e) => Response::Error(e.to_string()),
    }
}

fn param_str<'a>(params: &'a serde_json::Value, name: &str) -> Result<&'a str, AgentError> {
    params
        .get(name)
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| AgentError::Query(format!("params need a string {name:?}")))
}

fn to_json<T: serde::Serialize>(value: T) -> serde_json::Value {
    serde_json::to_value(value)
        .unwrap_or_else(|e| serde_json::Value::String(format!("encoding failed: {e}")))
}
