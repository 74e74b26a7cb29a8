//! Where desired objects come from.
//!
//! [`manifest`] reads Kubernetes manifests the way `kubectl apply -f` does and validates
//! them the way the API server would, so bad input is refused before anything changes.

pub mod manifest;
mod validate;

pub use manifest::{Manifest, ManifestError, Object, load_paths, parse_str};
