//! A container runtime driven the way a kubelet drives it: a CRI client (gRPC over the
//! runtime's Unix socket), a private containerd in a node's network namespace, and the
//! offline sandbox image it needs.

mod client;
mod containerd;
mod image;

pub use client::{CriClient, proto};
pub use containerd::{Containerd, Footprint, Sandbox};
pub use image::{PAUSE_IMAGE, write_pause_image};
