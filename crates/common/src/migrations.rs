//! The map layouts an agent can upgrade from: for each, the map, the earlier value layout it
//! finds pinned, and the conversion of one entry to today's layout. The conversions live
//! beside their map's layout (`Ct4Entry::from(Ct4EntryV1)` in `maps/conntrack.rs`,
//! `Lb4Service::try_from(Lb4ServiceV1)` in `maps/services.rs`); `sluice-datapath` runs them
//! at load (a new map filled, the programs swapped to it, then the pin replaced).
//!
//! A pinned layout is told by the kernel's (kind, key size, value size) of the map, which
//! every layout change so far has altered; keys are never converted.

use std::fmt;

use aya::Pod;

use crate::{Ct4Entry, Ct4EntryV1, Lb4Service, Lb4ServiceV1, MapDef, MapId};

/// A field of an old entry whose value today's layout cannot hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unconvertible {
    pub field: &'static str,
    pub value: u64,
    /// The largest value today's field holds.
    pub limit: u64,
}

impl fmt::Display for Unconvertible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "field {} is {}, today's layout holds at most {}",
            self.field, self.value, self.limit
        )
    }
}

/// An upgrade of one map from an earlier value layout to the registry's.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    pub map: MapId,
    /// The earlier layout's value type (its Rust mirror) and size.
    pub from_value_type: &'static str,
    pub from_value_size: usize,
    /// Converts one value of the earlier layout (exactly `from_value_size` bytes) to the
    /// registry's value type.
    pub convert: fn(&[u8]) -> Result<Vec<u8>, Unconvertible>,
}

impl Migration {
    pub fn def(&self) -> &'static MapDef {
        self.map.def()
    }

    /// The earlier layout, worded as [`layout`] words today's.
    pub fn from_layout(&self) -> String {
        let def = self.def();
        format!(
            "{:?} key {} ({}) value {} ({})",
            def.kind, def.key_size, def.key_type, self.from_value_size, self.from_value_type
        )
    }

    /// The layout it converts to: the registry's.
    pub fn to_layout(&self) -> String {
        layout(self.def())
    }
}

/// The layout of `def` in words: kind, key and value sizes and types.
pub fn layout(def: &MapDef) -> String {
    format!(
        "{:?} key {} ({}) value {} ({})",
        def.kind, def.key_size, def.key_type, def.value_size, def.value_type
    )
}

/// Every migration, at most one per (map, earlier value size).
pub const MIGRATIONS: [Migration; 2] = [
    Migration {
        map: MapId::Conntrack,
        from_value_type: "Ct4EntryV1",
        from_value_size: size_of::<Ct4EntryV1>(),
        convert: |bytes| convert::<Ct4EntryV1, Ct4Entry>(bytes, |old| Ok(old.into())),
    },
    Migration {
        map: MapId::Services,
        from_value_type: "Lb4ServiceV1",
        from_value_size: size_of::<Lb4ServiceV1>(),
        convert: |bytes| convert::<Lb4ServiceV1, Lb4Service>(bytes, Lb4Service::try_from),
    },
];

/// Maps whose entries any build may drop: the flow cache (every decision is taken again by
/// the slow path), its per-CPU scratch and host routing's routes to local pods (looked up
/// again). A pinned one of another layout is replaced by an empty map of today's at an
/// upgrade instead of refusing it.
pub const DROPPED_AT_UPGRADE: [MapId; 3] = [MapId::FlowCache, MapId::FlowNotes, MapId::HostRoutes];

/// The migration of `map` from a pinned value of `value_size` bytes, if there is one.
pub fn migration(map: MapId, value_size: usize) -> Option<&'static Migration> {
    MIGRATIONS
        .iter()
        .find(|m| m.map == map && m.from_value_size == value_size)
}

/// Reads `bytes` as an `Old`, converts it and returns the `New` as bytes.
fn convert<Old: Pod + Default, New: Pod>(
    bytes: &[u8],
    to_new: impl FnOnce(Old) -> Result<New, Unconvertible>,
) -> Result<Vec<u8>, Unconvertible> {
    let mut old = Old::default();
    // A short or long value is a caller's mistake (the sizes are the map's); reading only
    // what both hold keeps it memory-safe, and the conversion sees zeros for the rest.
    let len = bytes.len().min(size_of::<Old>());
    // SAFETY: `Old` is Pod (every bit pattern valid, no padding), `len` bytes fit in both.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&raw mut old).cast::<u8>(), len);
    }
    let new = to_new(old)?;
    // SAFETY: `New` is Pod: all its bytes are initialized.
    let out =
        unsafe { std::slice::from_raw_parts((&raw const new).cast::<u8>(), size_of::<New>()) };
    Ok(out.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T: Pod>(value: &T) -> Vec<u8> {
        // SAFETY: T is Pod: all its bytes are initialized.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    #[test]
    fn every_migration_is_found_by_an_earlier_value_size_other_than_todays() {
        for m in &MIGRATIONS {
            assert_ne!(m.from_value_size, m.def().value_size, "{}", m.def().name);
            let found = migration(m.map, m.from_value_size).unwrap();
            assert_eq!(found.from_value_type, m.from_value_type);
        }
        assert!(migration(MapId::Conntrack, 48).is_none());
    }

    #[test]
    fn a_conntrack_entry_of_layout_1_keeps_every_field() {
        let old = Ct4EntryV1 {
            created_ns: 1,
            last_seen_ns: 2,
            packets: u32::MAX,
            bytes: 4,
            nat_address: 5,
            nat_port: 6,
            flags: 7,
            tcp_flags_seen: 8,
            ifindex: 9,
            pad: 0,
        };
        let m = migration(MapId::Conntrack, 40).unwrap();
        let new = (m.convert)(&bytes(&old)).unwrap();
        let expected = Ct4Entry {
            created_ns: 1,
            last_seen_ns: 2,
            packets: u64::from(u32::MAX),
            bytes: 4,
            nat_address: 5,
            nat_port: 6,
            flags: 7,
            tcp_flags_seen: 8,
            ifindex: 9,
            pad: 0,
        };
        assert_eq!(new, bytes(&expected));
    }

    #[test]
    fn a_frontend_with_more_slots_than_sixteen_bits_does_not_convert() {
        let m = migration(MapId::Services, 20).unwrap();
        let old = Lb4ServiceV1 {
            count: 3,
            flags: 1,
            maglev_size: 251,
            affinity_timeout: 10,
            ..Default::default()
        };
        let expected = Lb4Service {
            count: 3,
            flags: 1,
            maglev_size: 251,
            affinity_timeout: 10,
            ..Default::default()
        };
        assert_eq!((m.convert)(&bytes(&old)).unwrap(), bytes(&expected));
        let too_many = Lb4ServiceV1 {
            count: 70_000,
            ..old
        };
        let err = (m.convert)(&bytes(&too_many)).unwrap_err();
        assert_eq!(err.field, "count");
        assert_eq!(err.value, 70_000);
    }
}
