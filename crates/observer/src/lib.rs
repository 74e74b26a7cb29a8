//! The observer: turns datapath flow events into flows shaped as Hubble's, keeps the last
//! N of them and broadcasts new ones to the API and the policy log.
//!
//! Everything here is pure: the agent reads the ring buffer and hands the events to a
//! [`Resolver`] built from its current desired state, then pushes the flows into the
//! [`FlowBuffer`].

mod buffer;
mod compact;
mod decode;
mod filter;
#[cfg(test)]
mod tests;

pub use buffer::{DEFAULT_FLOWS_MAX, FlowBuffer};
pub use compact::compact;
pub use decode::{Resolver, drop_reason_desc};
pub use filter::matches;
pub use sluice_api::flow::Flow;
