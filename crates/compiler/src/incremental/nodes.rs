//! The Nodes as the compile reads them, to tell a Node change that moves nothing (a
//! kubelet's status heartbeat, another node's labels) from one that moves addresses,
//! routes or tunnels (see `policy::remote_nodes`).

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::{Node, NodeAddress};
use sluice_store::Snapshot;

use crate::policy::NotInPlace;

/// What the compile reads of a Node other than the one it compiles for: its addresses
/// and pod CIDR (the name is the key; labels matter for this node's zone only).
#[derive(PartialEq)]
struct Routing {
    addresses: Option<Vec<NodeAddress>>,
    pod_cidr: Option<String>,
}

impl Routing {
    fn of(node: &Node) -> Self {
        Self {
            addresses: node.status.as_ref().and_then(|s| s.addresses.clone()),
            pod_cidr: node.spec.as_ref().and_then(|s| s.pod_cidr.clone()),
        }
    }
}

/// Every other Node's [`Routing`], as last compiled whole.
pub(super) struct NodeIndex {
    this: String,
    routing: HashMap<String, Routing>,
    /// Names defined twice, or not at all.
    faulty: HashSet<String>,
}

impl NodeIndex {
    pub(super) fn new(snapshot: &Snapshot, this: &str) -> Self {
        let mut routing = HashMap::new();
        let mut faulty = HashSet::new();
        for node in &snapshot.nodes {
            let name = node.metadata.name.clone().unwrap_or_default();
            if name.is_empty() || routing.contains_key(&name) {
                faulty.insert(name);
            } else {
                routing.insert(name, Routing::of(node));
            }
        }
        Self {
            this: this.to_string(),
            routing,
            faulty,
        }
    }

    /// Takes the Node `name` written as `node` (None: deleted): whether it moves
    /// addresses, routes or tunnels, which `WorkloadIndex::put_nodes` then follows.
    /// [`NotInPlace`] for this node and for a name defined twice or not as its key.
    pub(super) fn put(&mut self, name: &str, node: Option<&Node>) -> Result<bool, NotInPlace> {
        let named = node.is_none_or(|n| n.metadata.name.as_deref() == Some(name));
        if name == self.this || self.faulty.contains(name) || !named {
            return Err(NotInPlace);
        }
        let routing = node.map(Routing::of);
        let moved = self.routing.get(name) != routing.as_ref();
        match routing {
            Some(routing) => self.routing.insert(name.to_string(), routing),
            None => self.routing.remove(name),
        };
        Ok(moved)
    }
}
