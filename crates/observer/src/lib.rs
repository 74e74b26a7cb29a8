//! The observer: turns datapath flow events into flows shaped as Hubble's, keeps the last
//! N of them and broadcasts new ones to the API and the policy log.

mod buffer;
mod filter;

pub use buffer::{DEFAULT_FLOWS_MAX, FlowBuffer};
pub use filter::{event_type_code, matches};
pub use sluice_api::flow::Flow;
