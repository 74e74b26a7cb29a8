//! A minimal HTTP/1.1 server for `GET /metrics`: one request per connection, then close.
//!
//! Prometheus needs nothing more, and a server this small has no state to get wrong:
//! each connection reads at most one bounded request head, under a timeout, and is closed.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, warn};

use crate::AgentError;

/// A request head larger than this is refused: a scrape sends a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// A client that does not send its request in this time is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Produces the body of `GET /metrics` and its content type. Called on a blocking thread:
/// it reads kernel maps with one syscall per entry.
pub type Render = Arc<dyn Fn() -> Result<(String, &'static str), AgentError> + Send + Sync>;

pub async fn bind(address: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| AgentError::Io {
            call: "bind",
            path: address.to_string().into(),
            source,
        })
}

pub async fn serve(listener: TcpListener, render: Render) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let render = Arc::clone(&render);
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, render).await {
                        debug!(%peer, error = %e, "metrics connection failed");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "accept on metrics address failed");
                // Out of descriptors, most likely: give connections time to close.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, render: Render) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let response = match head {
        None => response("400 Bad Request", "text/plain", "bad request\n"),
        Some(head) => match request_target(&head) {
            Some(("GET" | "HEAD", "/metrics")) => {
                let body = tokio::task::spawn_blocking(move || render()).await;
                match body {
                    Ok(Ok((body, content_type))) => {
                        let mut out = response("200 OK", content_type, &body);
                        if head.starts_with("HEAD ") {
                            out.truncate(out.len() - body.len());
                        }
                        out
                    }
                    Ok(Err(e)) => {
                        warn!(error = %e, "reading metrics failed");
                        response("500 Internal Server Error", "text/plain", &format!("{e}\n"))
                    }
                    Err(e) => {
                        response("500 Internal Server Error", "text/plain", &format!("{e}\n"))
                    }
                }
            }
            Some(("GET" | "HEAD", _)) => response("404 Not Found", "text/plain", "not found\n"),
            Some(_) => response("405 Method Not Allowed", "text/plain", "only GET\n"),
            None => response("400 Bad Request", "text/plain", "bad request\n"),
        },
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the blank line that ends the request head; None if it is too long or the
/// client closed first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(String::from_utf8(buf).ok());
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

/// Method and path of the request line, without any query string.
fn request_target(head: &str) -> Option<(&str, &str)> {
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    Some((method, target.split('?').next().unwrap_or(target)))
}

fn response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn request(address: SocketAddr, raw: &str) -> String {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(raw.as_bytes()).await.expect("write");
        let mut out = String::new();
        stream.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_the_rest() {
        let listener = bind("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("bind");
        let address = listener.local_addr().expect("local address");
        let render: Render = Arc::new(|| {
            let metrics = crate::metrics::Metrics::default();
            Ok((metrics.render_agent_only(), crate::metrics::CONTENT_TYPE))
        });
        tokio::spawn(serve(listener, render));

        let ok = request(
            address,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Type: application/openmetrics-text"),
            "{ok}"
        );
        assert!(
            ok.contains("# TYPE sluice_reconcile_duration_seconds histogram"),
            "{ok}"
        );
        assert!(ok.contains("sluice_build_info{version="), "{ok}");
        let (head, body) = ok.split_once("\r\n\r\n").expect("head and body");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );

        let missing = request(address, "GET / HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        let post = request(address, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        let garbage = request(address, "hello\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
        // Exactly one byte too many, so the server has read all of it when it answers.
        let huge = request(address, &"X".repeat(MAX_HEAD + 1)).await;
        assert!(huge.starts_with("HTTP/1.1 400 "), "{huge}");
    }
}
