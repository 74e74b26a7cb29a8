//! The maps the realizer can read and write: kernel maps through aya, and an in-memory
//! stand-in for tests that need no kernel.

use std::{
    borrow::{Borrow, BorrowMut},
    collections::BTreeMap,
};

use aya::{
    Pod,
    maps::{HashMap, MapData, MapError},
};

use crate::RealizerError;

/// A key-value map whose whole content can be read and changed entry by entry.
pub trait KernelMap<K, V> {
    fn name(&self) -> &'static str;
    fn read_all(&self) -> Result<BTreeMap<K, V>, RealizerError>;
    fn upsert(&mut self, key: &K, value: &V) -> Result<(), RealizerError>;
    /// Removes `key`; a key that is already absent is not an error.
    fn remove(&mut self, key: &K) -> Result<(), RealizerError>;
}

/// A named aya hash map (HASH or LRU_HASH).
pub struct Named<T, K, V> {
    pub name: &'static str,
    pub map: HashMap<T, K, V>,
}

impl<T, K, V> KernelMap<K, V> for Named<T, K, V>
where
    T: Borrow<MapData> + BorrowMut<MapData>,
    K: Pod + Ord,
    V: Pod,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn read_all(&self) -> Result<BTreeMap<K, V>, RealizerError> {
        let err = |source| RealizerError::Map {
            op: "iterate",
            map: self.name,
            source,
        };
        self.map.iter().map(|r| r.map_err(err)).collect()
    }

    fn upsert(&mut self, key: &K, value: &V) -> Result<(), RealizerError> {
        self.map
            .insert(key, value, 0)
            .map_err(|source| RealizerError::Map {
                op: "update",
                map: self.name,
                source,
            })
    }

    fn remove(&mut self, key: &K) -> Result<(), RealizerError> {
        match self.map.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
                Ok(())
            }
            Err(source) => Err(RealizerError::Map {
                op: "delete",
                map: self.name,
                source,
            }),
        }
    }
}

/// An in-memory map that records every write, for tests of ordering and convergence.
#[derive(Debug)]
pub struct MemoryMap<K, V> {
    pub name: &'static str,
    pub entries: BTreeMap<K, V>,
    /// Every write in order: `(key, Some(value))` for an upsert, `(key, None)` for a removal.
    pub log: Vec<(K, Option<V>)>,
}

impl<K, V> MemoryMap<K, V> {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            entries: BTreeMap::new(),
            log: Vec::new(),
        }
    }
}

impl<K: Ord + Clone, V: Clone> KernelMap<K, V> for MemoryMap<K, V> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn read_all(&self) -> Result<BTreeMap<K, V>, RealizerError> {
        Ok(self.entries.clone())
    }
    fn upsert(&mut self, key: &K, value: &V) -> Result<(), RealizerError> {
        self.entries.insert(key.clone(), value.clone());
        self.log.push((key.clone(), Some(value.clone())));
        Ok(())
    }
    fn remove(&mut self, key: &K) -> Result<(), RealizerError> {
        self.entries.remove(key);
        self.log.push((key.clone(), None));
        Ok(())
    }
}
