//! healthCheckNodePort, as kube-proxy serves it: for each LoadBalancer Service with
//! externalTrafficPolicy Local, HTTP on the node's own addresses at that port, answering
//! any GET with `{"service":{"namespace":..,"name":..},"localEndpoints":N}`, 200 when the
//! node has endpoints of the Service and 503 when it has none, so a cloud load balancer
//! sends traffic only to nodes that can serve it. Servers follow the compiled state: one
//! starts when a port appears, stops when it goes, and answers with the newest count.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use arc_swap::ArcSwap;
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse};
use serde::Serialize;
use sluice_compiler::{DesiredState, HealthCheck};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use crate::AgentError;

/// The body of every answer, in kube-proxy's shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthAnswer {
    pub service: ServiceName,
    pub local_endpoints: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl From<&HealthCheck> for HealthAnswer {
    fn from(check: &HealthCheck) -> Self {
        Self {
            service: ServiceName {
                namespace: check.namespace.clone(),
                name: check.name.clone(),
            },
            local_endpoints: check.local_endpoints,
        }
    }
}

/// One port's server: its answer, swapped in place, and the tasks that serve it.
struct Server {
    answer: Arc<ArcSwap<HealthAnswer>>,
    addresses: Vec<Ipv4Addr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Stops serving and returns once every listener is closed.
    async fn stop(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // Cancelled: the task and its listener are gone.
            let _ = task.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Aborting the task drops its listener: the port is closed.
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The health check servers of this node, by port.
#[derive(Default)]
pub struct HealthServers {
    servers: BTreeMap<u16, Server>,
    /// Why each port that could not be bound failed last, so a pass logs it only when it
    /// changes, not every two seconds.
    failed: BTreeMap<u16, String>,
}

impl HealthServers {
    /// Brings the servers in line with `desired`: starts the new ports on the node's
    /// addresses, stops the ports gone, and updates every answer. A port that cannot be
    /// bound is logged and tried again on the next pass. Returns once the ports gone are
    /// closed.
    pub async fn follow(&mut self, desired: &DesiredState) {
        let addresses = &desired.node_addresses;
        let gone: Vec<u16> = self
            .servers
            .iter()
            .filter(|(port, server)| {
                !desired.health_checks.contains_key(port) || server.addresses != *addresses
            })
            .map(|(port, _)| *port)
            .collect();
        for port in gone {
            if let Some(server) = self.servers.remove(&port) {
                server.stop().await;
                info!(port, "health check server stopped");
            }
        }
        for (&port, check) in &desired.health_checks {
            let answer = HealthAnswer::from(check);
            if let Some(server) = self.servers.get(&port) {
                if **server.answer.load() != answer {
                    server.answer.store(Arc::new(answer));
                }
                continue;
            }
            match start(port, addresses, answer) {
                Ok(server) => {
                    info!(port, service = %format!("{}/{}", check.namespace, check.name),
                          "health check server started");
                    self.failed.remove(&port);
                    self.servers.insert(port, server);
                }
                Err(e) => {
                    let error = e.to_string();
                    if self.failed.get(&port) != Some(&error) {
                        warn!(port, %error, "health check server not started; retrying every pass");
                        self.failed.insert(port, error);
                    }
                }
            }
        }
        self.failed
            .retain(|port, _| desired.health_checks.contains_key(port));
    }

    /// The ports served, for tests and status.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }
}

/// Binds `port` on each of `addresses` (all or none) and serves `answer` there.
fn start(port: u16, addresses: &[Ipv4Addr], answer: HealthAnswer) -> Result<Server, AgentError> {
    let answer = Arc::new(ArcSwap::from_pointee(answer));
    let mut listeners = Vec::new();
    for &address in addresses {
        listeners.push(bind(SocketAddr::from((address, port)))?);
    }
    let tasks = listeners
        .into_iter()
        .map(|listener| tokio::spawn(serve(listener, Arc::clone(&answer))))
        .collect();
    Ok(Server {
        answer,
        addresses: addresses.to_vec(),
        tasks,
    })
}

fn bind(address: SocketAddr) -> Result<TcpListener, AgentError> {
    let io = |source| AgentError::Io {
        call: "bind",
        path: address.to_string().into(),
        source,
    };
    let listener = std::net::TcpListener::bind(address).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    TcpListener::from_std(listener).map_err(io)
}

async fn serve(listener: TcpListener, answer: Arc<ArcSwap<HealthAnswer>>) {
    let router = Router::new().fallback(respond).with_state(answer);
    if let Err(e) = axum::serve(listener, router).await {
        warn!(error = %e, "health check server failed");
    }
}

/// Any path: kube-proxy's health check answers them all alike.
async fn respond(State(answer): State<Arc<ArcSwap<HealthAnswer>>>) -> impl IntoResponse {
    let answer = answer.load_full();
    let status = if answer.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(answer.as_ref().clone()))
}
