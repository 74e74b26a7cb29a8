//! Scraping an agent's Prometheus metrics from inside its node's namespace.

use std::{io::Write, net::SocketAddrV4, time::Duration};

use sluice_netns::NetNs;

use crate::{Lab, LabError, spec};

/// One HTTP/1.1 GET, answered and closed by the server: (status line, body).
fn http_get(address: SocketAddrV4, path: &str) -> std::io::Result<(String, String)> {
    use std::io::Read;
    let timeout = Duration::from_secs(5);
    let mut stream = std::net::TcpStream::connect_timeout(&address.into(), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

impl Lab {
    /// Where `node`'s agent serves Prometheus metrics: its router address, reachable from
    /// inside the node's namespace (and its pods). None unless the lab file sets
    /// `observability.metrics`, or for an unknown node.
    pub fn metrics_address(&self, node: &str) -> Option<SocketAddrV4> {
        let spec = &self.state.spec;
        if !spec.observability.metrics {
            return None;
        }
        let node = spec.node(node)?;
        Some(SocketAddrV4::new(node.router_ip(), spec::METRICS_PORT))
    }

    /// `GET /metrics` from `node`'s agent, sent from inside the node's namespace; the body.
    pub fn scrape_metrics(&self, node: &str) -> Result<String, LabError> {
        let address = self
            .metrics_address(node)
            .ok_or_else(|| LabError::Command {
                command: format!("GET /metrics of node {node}"),
                detail: "the lab file does not set observability.metrics for this node".into(),
            })?;
        let failed = |detail: String| LabError::Command {
            command: format!("GET http://{address}/metrics"),
            detail,
        };
        // A thread of its own enters the node's namespace, so this one stays where it is.
        NetNs::named(self.node_netns(node))
            .run(|| http_get(address, "/metrics"))?
            .map_err(|e| failed(e.to_string()))
            .and_then(|(status, body)| {
                if status.starts_with("HTTP/1.1 200 ") {
                    Ok(body)
                } else {
                    Err(failed(status))
                }
            })
    }
}
