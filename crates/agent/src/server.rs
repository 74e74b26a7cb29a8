//! The local API: one JSON request line and one JSON response line per connection, except
//! `observe`, which answers a stream of flow lines.

use std::{path::Path, sync::Arc};

use sluice_api::{
    Method, Request, Response,
    flow::{Flow, ObserveRequest},
};
use sluice_observer::FlowBuffer;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        UnixListener, UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::broadcast::error::RecvError,
};
use tracing::warn;

use crate::{AgentError, views::Views};

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

pub async fn serve(listener: UnixListener, views: Arc<Views>, flows: Arc<FlowBuffer>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, Arc::clone(&views), Arc::clone(&flows)));
            }
            Err(e) => warn!(error = %e, "accept on API socket failed"),
        }
    }
}

async fn handle(stream: UnixStream, views: Arc<Views>, flows: Arc<FlowBuffer>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    if read.read_line(&mut line).await.is_err() {
        return;
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) if request.method == Method::Observe => {
            match serde_json::from_value::<ObserveRequest>(request.params) {
                Ok(observe) => return stream_flows(observe, read, write, &flows).await,
                Err(e) => Response::Error(format!("malformed observe params: {e}")),
            }
        }
        Ok(request) => dispatch(request, &views).await,
        Err(e) => Response::Error(format!("malformed request: {e}")),
    };
    if let Err(e) = write.write_all(&encode(&response)).await {
        warn!(error = %e, "writing API response failed");
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(value)
        .unwrap_or_else(|e| format!(r#"{{"error":"encoding response: {e}"}}"#).into_bytes());
    out.push(b'\n');
    out
}

/// Sends the buffered flows the request selects, then, with `follow`, every new matching
/// flow until the client hangs up. Filtering happens here, as in Hubble, so a follower of
/// a rare flow costs the socket nothing for the others.
async fn stream_flows(
    request: ObserveRequest,
    mut read: BufReader<OwnedReadHalf>,
    mut write: OwnedWriteHalf,
    flows: &FlowBuffer,
) {
    let keep = |flow: &Flow| sluice_observer::matches(&request.filter, flow);
    let (buffered, mut receiver) = flows.snapshot(request.last, keep);
    let mut out = Vec::new();
    for flow in &buffered {
        out.extend(encode(flow.as_ref()));
    }
    if write.write_all(&out).await.is_err() || !request.follow {
        return;
    }
    let mut scratch = [0u8; 64];
    loop {
        tokio::select! {
            // The client sends nothing more: a read returning is its hang-up.
            _ = read.read(&mut scratch) => return,
            received = receiver.recv() => match received {
                Ok(flow) if keep(&flow) => {
                    if write.write_all(&encode(flow.as_ref())).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    warn!(missed, "observe client too slow; skipped flows");
                }
                Err(RecvError::Closed) => return,
            },
        }
    }
}

async fn dispatch(request: Request, views: &Views) -> Response {
    let result = match request.method {
        Method::Status => views.status().await.map(to_json),
        Method::ServiceList => views.services().await.map(to_json),
        Method::CtList => views.conntrack().await.map(to_json),
        Method::Verify => {
            let repair = request
                .params
                .get("repair")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false);
            views.verify(repair).await.map(to_json)
        }
        Method::EndpointList => Ok(to_json(views.endpoints())),
        Method::EndpointGet => param_str(&request.params, "endpoint")
            .and_then(|e| views.endpoint(e))
            .map(to_json),
        Method::IdentityList => Ok(to_json(views.identities())),
        Method::IdentityGet => request
            .params
            .get("id")
            .and_then(serde_json::Value::as_u64)
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| AgentError::Query("params need a numeric \"id\"".into()))
            .and_then(|id| views.identity(id))
            .map(to_json),
        Method::PolicyGet => match param_str(&request.params, "endpoint") {
            Ok(e) => views.policy(e.to_string()).await.map(to_json),
            Err(e) => Err(e),
        },
        // Answered by handle() as a stream before it gets here.
        Method::Observe => Err(AgentError::Query("observe is a stream".into())),
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
