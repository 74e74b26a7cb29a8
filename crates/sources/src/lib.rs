//! Where desired objects come from.
//!
//! [`manifest`] reads Kubernetes manifests the way `kubectl apply -f` does and validates
//! them the way the API server would, so bad input is refused before anything changes.
//! [`validate_nodes`] refuses Node objects that routing could not use, and
//! [`validate_services`] Services that conflict with each other or with the node port range.

pub mod manifest;
mod node_ports;
mod nodes;
mod validate;

pub use manifest::{Manifest, ManifestError, Object, load_paths, parse_str};
pub use node_ports::{NodePortRange, validate_services};
pub use nodes::validate_nodes;

/// Why a set of objects was refused: the first offending object and field. Displays as
/// `Node node-b: spec.podCIDR: 10.244.1.0/24 overlaps node node-a's spec.podCIDR
/// 10.244.1.0/24` or `Service default/b: spec.ports[0].nodePort: 30080/TCP is already
/// used by Service default/a`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}", self.render())]
pub struct ValidationError {
    /// `Node` or `Service`.
    pub kind: &'static str,
    /// The object's name (`namespace/name` when namespaced); empty when it has none.
    pub name: String,
    /// Path of the offending field, e.g. `spec.podCIDR`.
    pub field: String,
    pub message: String,
}

impl ValidationError {
    fn render(&self) -> String {
        let object = if self.name.is_empty() {
            self.kind.to_string()
        } else {
            format!("{} {}", self.kind, self.name)
        };
        format!("{object}: {}: {}", self.field, self.message)
    }
}
