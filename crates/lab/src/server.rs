//! The process behind every lab pod: it serves the pod's containerPorts like agnhost's
//! netexec. TCP: HTTP requests get `200 OK` with the pod name, anything else is echoed.
//! UDP: `hostname` gets the pod name, anything else is echoed.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};

use sluice_netns::NetNs;

use crate::{LabError, error::io_err};

/// Methods that start an HTTP/1 request line.
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE",
];
/// How long a connection may hold a prefix of a method (`GE`) before it counts as echo.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(200);
const MAX_HEAD: usize = 64 * 1024;

/// Enters `netns` (on this thread, before any runtime thread exists, so all of them are in
/// it), binds every port on 0.0.0.0, writes `ready_file`, and serves until killed.
pub fn serve_pod(
    netns: &str,
    name: &str,
    tcp: &[u16],
    udp: &[u16],
    ready_file: &Path,
) -> Result<(), LabError> {
    let ns = NetNs::open(netns)?;
    ns.enter()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("tokio runtime", ns.path()))?;
    runtime.block_on(serve(name, tcp, udp, ready_file))
}

async fn serve(name: &str, tcp: &[u16], udp: &[u16], ready_file: &Path) -> Result<(), LabError> {
    let name: Arc<str> = Arc::from(name);
    let mut tasks = tokio::task::JoinSet::new();
    for &port in tcp {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(io_err("bind tcp", format!("{addr}")))?;
        tasks.spawn(accept_loop(listener, Arc::clone(&name)));
    }
    for &port in udp {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(io_err("bind udp", format!("{addr}")))?;
        tasks.spawn(udp_loop(socket, Arc::clone(&name)));
    }
    // Readiness means "every port is bound": the file appears atomically after that.
    let tmp = ready_file.with_extension("tmp");
    fs::write(&tmp, b"ready\n").map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, ready_file).map_err(io_err("rename", ready_file))?;
    eprintln!("pod {name}: serving tcp {tcp:?} udp {udp:?}");
    match tasks.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(LabError::Command {
            command: format!("pod server {name}"),
            detail: e.to_string(),
        }),
        // No ports: nothing to serve, but the pod lives on like a pause container.
        None => std::future::pending().await,
    }
}

async fn accept_loop(listener: TcpListener, name: Arc<str>) -> Result<(), LabError> {
    loop {
        let (stream, peer) = listener
            .accept()
            .await
            .map_err(io_err("accept", "tcp listener"))?;
        let name = Arc::clone(&name);
        tokio::spawn(async move {
            if let Err(e) = handle_tcp(stream, &name).await {
                eprintln!("pod {name}: connection from {peer}: {e}");
            }
        });
    }
}

async fn udp_loop(socket: UdpSocket, name: Arc<str>) -> Result<(), LabError> {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = socket
            .recv_from(&mut buf)
            .await
            .map_err(io_err("recvfrom", "udp socket"))?;
        let payload = &buf[..n];
        let reply = udp_reply(payload, &name);
        if let Err(e) = socket.send_to(reply, peer).await {
            eprintln!("pod {name}: sendto {peer}: {e}");
        }
    }
}

fn udp_reply<'a>(payload: &'a [u8], name: &'a str) -> &'a [u8] {
    match payload {
        b"hostname" | b"hostname\n" => name.as_bytes(),
        _ => payload,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Sniff {
    Http,
    Echo,
    /// A proper prefix of `METHOD `: wait for more.
    NeedMore,
}

fn sniff(buf: &[u8]) -> Sniff {
    let mut need_more = false;
    for method in METHODS {
        let token = [method.as_bytes(), b" "].concat();
        if buf.starts_with(&token) {
            return Sniff::Http;
        }
        if token.starts_with(buf) {
            need_more = true;
        }
    }
    if need_more {
        Sniff::NeedMore
    } else {
        Sniff::Echo
    }
}

async fn handle_tcp(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(SNIFF_TIMEOUT, stream.read(&mut chunk));
        let n = match read.await {
            Ok(n) => n?,
            // A client that sent "GE" and waits for its echo.
            Err(_) if !buf.is_empty() => return echo(stream, buf).await,
            // Silent so far: keep waiting without a deadline.
            Err(_) => stream.read(&mut chunk).await?,
        };
        if n == 0 {
            return if buf.is_empty() {
                Ok(())
            } else {
                echo(stream, buf).await
            };
        }
        buf.extend_from_slice(&chunk[..n]);
        match sniff(&buf) {
            Sniff::Http => return http(stream, buf, name).await,
            Sniff::Echo => return echo(stream, buf).await,
            Sniff::NeedMore => {}
        }
    }
}

async fn echo(mut stream: TcpStream, first: Vec<u8>) -> std::io::Result<()> {
    stream.write_all(&first).await?;
    let (mut rd, mut wr) = stream.split();
    tokio::io::copy(&mut rd, &mut wr).await?;
    wr.shutdown().await
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    head_len: usize,
    method: String,
    http10: bool,
    content_length: usize,
    close: bool,
    keep_alive: bool,
    chunked: bool,
}

/// Parses the head in `buf` if complete (`Ok(None)` if more is needed).
fn parse_head(buf: &[u8]) -> Result<Option<Request>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err("request head too large".into());
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let version = parts.nth(1).unwrap_or_default();
    let mut req = Request {
        head_len: end + 4,
        method,
        http10: version == "HTTP/1.0",
        content_length: 0,
        close: false,
        keep_alive: false,
        chunked: false,
    };
    for line in lines {
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_ascii_lowercase();
        match field.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                req.content_length = value
                    .parse()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?;
            }
            "connection" => {
                req.close |= value.split(',').any(|t| t.trim() == "close");
                req.keep_alive |= value.split(',').any(|t| t.trim() == "keep-alive");
            }
            "transfer-encoding" => req.chunked = value.contains("chunked"),
            _ => {}
        }
    }
    Ok(Some(req))
}

/// Answers every request with the pod's name; the `X-Client-Address` header says whom the
/// pod saw connect (what nginx logs as `$remote_addr`), so a test sees whether the
/// client's address survived the way in.
async fn http(mut stream: TcpStream, mut buf: Vec<u8>, name: &str) -> std::io::Result<()> {
    let body = format!("{name}\n");
    let client = stream
        .peer_addr()
        .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
    loop {
        let req = loop {
            match parse_head(&buf) {
                Ok(Some(req)) => break req,
                Ok(None) => {}
                Err(e) => return respond_error(&mut stream, &e).await,
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        // Skip the request body; chunked bodies are not parsed, so the connection ends after.
        let mut rest = buf.split_off(req.head_len);
        while rest.len() < req.content_length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        buf = rest.split_off(req.content_length);
        let close = req.close || req.chunked || (req.http10 && !req.keep_alive);
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nX-Client-Address: {client}\r\nContent-Length: {}\r\n",
            body.len()
        );
        if close {
            response.push_str("Connection: close\r\n");
        } else if req.http10 {
            response.push_str("Connection: keep-alive\r\n");
        }
        response.push_str("\r\n");
        if req.method != "HEAD" {
            response.push_str(&body);
        }
        stream.write_all(response.as_bytes()).await?;
        if close {
            return stream.shutdown().await;
        }
    }
}

async fn respond_error(stream: &mut TcpStream, message: &str) -> std::io::Result<()> {
    let body = format!("{message}\n");
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_tells_http_from_echo() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniff::Http);
        assert_eq!(sniff(b"DELETE "), Sniff::Http);
        assert_eq!(sniff(b"GE"), Sniff::NeedMore);
        assert_eq!(sniff(b"GET"), Sniff::NeedMore);
        assert_eq!(sniff(b"GETX"), Sniff::Echo);
        assert_eq!(sniff(b"hello"), Sniff::Echo);
        assert_eq!(sniff(b"\x16\x03\x01"), Sniff::Echo);
    }

    #[test]
    fn heads_are_parsed_for_length_and_connection() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap(), None);
        let req =
            parse_head(b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nConnection: Close\r\n\r\nabc")
                .unwrap()
                .unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.content_length, 3);
        assert!(req.close && !req.http10);
        assert_eq!(
            req.head_len,
            b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nConnection: Close\r\n\r\n".len()
        );
        let req = parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(req.http10 && req.keep_alive && !req.close);
        assert!(parse_head(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
    }

    #[test]
    fn udp_answers_hostname_and_echoes_the_rest() {
        assert_eq!(udp_reply(b"hostname", "web-1"), b"web-1");
        assert_eq!(udp_reply(b"hostname\n", "web-1"), b"web-1");
        assert_eq!(udp_reply(b"hostnames", "web-1"), b"hostnames");
        assert_eq!(udp_reply(b"", "web-1"), b"");
    }
}
