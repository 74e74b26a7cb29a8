//! Which agents a command talks to: one socket, or the agents of a lab's nodes (all of them
//! for `observe` and `verify`, one for the rest), chosen with `--node`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use sluice_api::Client;
use sluice_lab::Lab;

/// The agent socket outside a lab, as the DaemonSet mounts it.
const DEFAULT_SOCKET: &str = "/run/sluice/agent.sock";

/// One agent: its socket and, in a lab, the node it runs on.
#[derive(Clone, Debug)]
pub struct Agent {
    pub node: Option<String>,
    pub socket: PathBuf,
}

impl Agent {
    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    /// How messages name it: its node, else its socket.
    pub fn name(&self) -> String {
        self.node
            .clone()
            .unwrap_or_else(|| self.socket.display().to_string())
    }
}

/// Where the agents are.
pub enum Agents {
    /// `--socket`, `--agents`, or the node's own agent outside a lab.
    Sockets(Vec<PathBuf>),
    Lab(Box<Lab>),
}

impl Agents {
    /// `sockets` if given, else the agents of lab `lab` if it exists, else the default socket.
    pub fn find(sockets: Vec<PathBuf>, lab: &str) -> anyhow::Result<Self> {
        if !sockets.is_empty() {
            return Ok(Self::Sockets(sockets));
        }
        let opts = crate::lab::options()?;
        if Lab::list(&opts)?.iter().any(|l| l == lab) {
            return Ok(Self::Lab(Box::new(Lab::open(lab, &opts)?)));
        }
        Ok(Self::Sockets(vec![PathBuf::from(DEFAULT_SOCKET)]))
    }

    /// Every agent `node` selects: in a lab that node's, else every node's; outside a lab
    /// every socket (`node` then filters flows by their node).
    pub fn selected(&self, node: Option<&str>) -> anyhow::Result<Vec<Agent>> {
        match self {
            Self::Sockets(sockets) => Ok(sockets
                .iter()
                .map(|s| Agent {
                    node: None,
                    socket: s.clone(),
                })
                .collect()),
            Self::Lab(lab) => match node {
                Some(node) => Ok(vec![lab_agent(lab, node)?]),
                None => Ok(lab
                    .nodes()
                    .iter()
                    .map(|n| lab_agent(lab, n))
                    .collect::<Result<_, _>>()?),
            },
        }
    }

    /// The one agent of a single-agent command: `--node`'s, else the first node's.
    pub fn one(&self, node: Option<&str>) -> anyhow::Result<Agent> {
        match self {
            Self::Sockets(sockets) => {
                let [socket] = &sockets[..] else {
                    bail!("this command talks to one agent: give one socket");
                };
                Ok(Agent {
                    node: None,
                    socket: socket.clone(),
                })
            }
            Self::Lab(lab) => match node {
                Some(node) => lab_agent(lab, node),
                None => {
                    let first = lab.nodes().into_iter().next();
                    lab_agent(lab, &first.context("the lab has no nodes")?)
                }
            },
        }
    }

    /// The agent that holds endpoint `endpoint` (`namespace/pod`, a pod name or an
    /// ifindex): `--node`'s if given, else in a lab the node the pod runs on.
    pub fn of_endpoint(&self, node: Option<&str>, endpoint: &str) -> anyhow::Result<Agent> {
        let (Self::Lab(lab), None) = (self, node) else {
            return self.one(node);
        };
        let pods = lab.pods();
        let (namespace, name) = match endpoint.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, endpoint),
        };
        let mut found = pods
            .iter()
            .filter(|p| p.name == name && namespace.is_none_or(|ns| p.namespace == ns));
        match (found.next(), found.next()) {
            (Some(pod), None) => lab_agent(lab, &pod.node),
            // An ifindex, a name in several namespaces, or no such pod: the first node's
            // agent answers or says what it does not know.
            _ => self.one(None),
        }
    }
}

fn lab_agent(lab: &Lab, node: &str) -> anyhow::Result<Agent> {
    let nodes = lab.nodes();
    if !nodes.iter().any(|n| n == node) {
        bail!(
            "--node {node}: lab {} has no such node (nodes: {})",
            lab.name(),
            nodes.join(", ")
        );
    }
    Ok(Agent {
        node: Some(node.to_string()),
        socket: lab.agent_socket(node),
    })
}
