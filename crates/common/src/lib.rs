//! Facts shared by user space and the C datapath: the map registry, map layouts, drop
//! reasons.
//!
//! Every struct in [`maps`] mirrors one in `bpf/lib/common.h`. Sizes are checked at
//! compile time, and `sluice-datapath`'s test `btf_layouts_match` compares every field
//! offset against the BTF of the compiled object; its `registry_matches_the_object`
//! compares [`registry::MAPS`] with the object's map definitions.

pub mod kinds;
pub mod maps;
pub mod migrations;
pub mod reasons;
pub mod registry;

pub use maps::*;
pub use migrations::{MIGRATIONS, Migration, Unconvertible};
pub use reasons::DropReason;
pub use registry::{CapacitySetting, Count, MAPS, MapDef, MapId, names};
