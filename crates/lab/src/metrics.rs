//! Scraping an agent's Prometheus metrics from inside its node's namespace.

use std::{net::SocketAddrV4, time::Duration};

use sluice_netns::NetNs;

use crate::{Lab, LabError, spec};

/// How long a metrics scrape may take, connection included.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

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
            .run(|| sluice_api::scrape(address.into(), "/metrics", SCRAPE_TIMEOUT))?
            .map_err(|e| failed(e.to_string()))
    }
}
