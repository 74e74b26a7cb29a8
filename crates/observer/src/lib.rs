//! The observer: turns datapath flow events into flows shaped as Hubble's, keeps the last
//! N of them and broadcasts new ones to the API and the policy log.
//!
//! Everything here is pure: the agent reads the ring buffer and pushes the events into the
//! [`FlowBuffer`], which names them when read with a [`Resolver`] of its current desired
//! state and the [`PodNames`] it keeps. The CLI merges the flows of several agents with [`merge_last`] and
//! [`interleave`].

mod buffer;
mod compact;
mod decode;
mod filter;
mod merge;
mod names;
#[cfg(test)]
mod tests;

pub use buffer::{DEFAULT_FLOWS_MAX, FlowBuffer, FlowReceiver};
pub use compact::{compact, compact_with_node};
pub use decode::{Resolver, drop_reason_desc};
pub use filter::matches;
pub use merge::{Arrival, FollowSource, SourceFlows, interleave, merge_last};
pub use names::{PodNames, pod_address};
pub use sluice_api::flow::Flow;
