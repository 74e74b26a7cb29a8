//! Where desired objects come from.
//!
//! [`manifest`] reads Kubernetes manifests the way `kubectl apply -f` does and validates
//! them the way the API server would, so bad input is refused before anything changes.
//! [`validate_nodes`] refuses Node objects that routing could not use.

pub mod manifest;
mod nodes;
mod validate;

pub use manifest::{Manifest, ManifestError, Object, load_paths, parse_str};
pub use nodes::{ValidationError, validate_nodes};
