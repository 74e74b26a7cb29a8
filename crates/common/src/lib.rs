//! Facts shared by user space and the C datapath: map layouts, map names, drop reasons.
//!
//! Every struct here mirrors one in `bpf/lib/common.h`. Sizes are checked at compile
//! time below, and `sluice-datapath`'s test `btf_layouts_match` compares every field
//! offset against the BTF of the compiled object.

pub mod kinds;
pub mod maps;
pub mod reasons;

pub use maps::*;
pub use reasons::DropReason;
