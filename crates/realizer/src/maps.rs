//! The maps the realizer can read and write: kernel maps through aya, and an in-memory
//! stand-in for tests that need no kernel.

use std::{
    borrow::{Borrow, BorrowMut},
    collections::{BTreeMap, HashSet},
    hash::Hash,
    ops::Bound,
    os::fd::{AsFd, OwnedFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::{
    Pod,
    maps::{
        HashMap, HashOfMaps, InnerMap, IterableMap, Map, MapData, MapError,
        lpm_trie::{Key, LpmTrie},
    },
};
use sluice_common::{IpcacheEntry, IpcacheKey, Lb4SourceRange, Lb4SourceRangeKey};
use sluice_datapath::{
    digest::{
        Digest, DigestPrograms, DigestedMap, footprint, footprints_count_entries, pod_bytes,
        pod_entry_hash,
    },
    sys::{self, HashCursor},
};

use crate::RealizerError;

/// Opens the map of maps `name` pinned in `pin_dir` (endpoint policy, Maglev tables), with
/// a second handle on it for the batch updates aya does not offer.
pub(crate) fn open_map_of_maps<K: Pod, V: InnerMap>(
    pin_dir: &Path,
    name: &'static str,
) -> Result<(HashOfMaps<MapData, K, V>, OwnedFd), RealizerError> {
    let map_err = |source| RealizerError::Map {
        op: "open pinned",
        map: name,
        source,
    };
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err)?;
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| RealizerError::Sys {
            call: "dup",
            map: name,
            source,
        })?;
    let map = Map::from_map_data(data)
        .and_then(HashOfMaps::try_from)
        .map_err(map_err)?;
    Ok((map, fd))
}

/// Where a read of a map in slices goes on from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Cursor<K> {
    /// The map's first entry.
    #[default]
    Start,
    /// A hash map's next bucket, as the kernel's batched read left it.
    Bucket(HashCursor),
    /// The entry after this key (LPM tries and in-memory maps, which have no buckets).
    After(K),
}

/// Where a digest of a map in slices goes on from.
#[derive(Clone, Debug)]
pub enum Walk<K> {
    /// Entries read with batched lookups and folded here, up to `cursor`. `accounted`
    /// holds every key the fold holds a value of: those read, and those a change wrote
    /// meanwhile (see [`Walk::follow`]), which the rest of the walk skips.
    Read {
        cursor: Cursor<K>,
        fold: Digest,
        accounted: HashSet<K>,
    },
    /// The kernel folded the whole map at once; this many entries' worth of slices pass
    /// before it folds it again.
    Rest { left: u64 },
}

impl<K: Pod + Hash + Ord> Walk<K> {
    /// Whether the walk is a fold of some slices, which a full pass starts over; a
    /// whole-map fold already taken keeps its rest.
    pub fn partial(&self) -> bool {
        matches!(self, Walk::Read { .. })
    }

    /// The realizer wrote `before`'s keys (each with its value before) to hold their values
    /// in `now`: a fold of some slices takes out what it holds of each and takes in the
    /// new value, so it still describes the map as it is, whichever side of the cursor a
    /// key lies (under continuous changes a walk that started over would never end).
    pub fn follow<V: Pod>(
        &mut self,
        seed: u64,
        before: &BTreeMap<K, Option<V>>,
        now: &BTreeMap<K, V>,
    ) {
        let Walk::Read {
            fold, accounted, ..
        } = self
        else {
            return;
        };
        for (key, old) in before {
            if let Some(old) = old.as_ref().filter(|_| accounted.contains(key)) {
                fold.remove(pod_entry_hash(seed, key, old));
            }
            if let Some(new) = now.get(key) {
                fold.add(pod_entry_hash(seed, key, new));
                accounted.insert(*key);
            }
        }
    }
}

/// A key-value map whose whole content can be read and changed entry by entry.
pub trait KernelMap<K, V> {
    fn name(&self) -> &'static str;
    fn read_all(&self) -> Result<BTreeMap<K, V>, RealizerError>;
    /// Reads about `max` entries from `cursor` on, handing each to `visit`, and returns the
    /// cursor to go on from, None once the map's end was reached.
    fn read_from(
        &self,
        cursor: Cursor<K>,
        max: usize,
        visit: &mut dyn FnMut(&K, &V),
    ) -> Result<Option<Cursor<K>>, RealizerError>;
    fn upsert(&mut self, key: &K, value: &V) -> Result<(), RealizerError>;
    /// Removes `key`; a key that is already absent is not an error.
    fn remove(&mut self, key: &K) -> Result<(), RealizerError>;

    /// A number that moves whenever an entry is added to or removed from the map, read
    /// for a cost that does not grow with it; None: the map has none.
    fn footprint(&self) -> Result<Option<u64>, RealizerError> {
        Ok(None)
    }

    /// Whether each key of `desired` holds its value in the map (entries of other keys
    /// aside: with an unmoved [`Self::footprint`], there are none). This one reads the
    /// whole map; a hash map looks up each key instead.
    fn holds_each(&self, desired: &BTreeMap<K, V>) -> Result<bool, RealizerError>
    where
        K: Pod + Ord,
        V: Pod,
    {
        let held = self.read_all()?;
        Ok(desired
            .iter()
            .all(|(k, v)| held.get(k).is_some_and(|h| pod_bytes(h) == pod_bytes(v))))
    }

    /// Folds about `max` more entries of the walk `walk` holds (None: a new walk) into the
    /// map's digest from `seed`; returns how many, and the digest once the walk reached the
    /// map's end (`walk` then holds what the next walk starts from, if anything). This one
    /// reads the entries ([`Self::read_from`]) and hashes them here.
    fn digest_from(
        &self,
        walk: &mut Option<Walk<K>>,
        max: usize,
        seed: u64,
    ) -> Result<(usize, Option<Digest>), RealizerError>
    where
        K: Pod + Hash + Eq,
        V: Pod,
    {
        let (cursor, mut fold, mut accounted) = match walk.take() {
            Some(Walk::Read {
                cursor,
                fold,
                accounted,
            }) => (cursor, fold, accounted),
            Some(Walk::Rest { .. }) | None => (Cursor::Start, Digest::default(), HashSet::new()),
        };
        let mut seen = 0;
        let next = self.read_from(cursor, max, &mut |k, v| {
            seen += 1;
            if accounted.insert(*k) {
                fold.add(pod_entry_hash(seed, k, v));
            }
        })?;
        Ok(match next {
            Some(cursor) => {
                *walk = Some(Walk::Read {
                    cursor,
                    fold,
                    accounted,
                });
                (seen, None)
            }
            None => (seen, Some(fold)),
        })
    }
}

/// The map's entries' digest from `seed`, folded here.
pub fn digest_of<'a, K: Pod + 'a, V: Pod + 'a>(
    seed: u64,
    entries: impl IntoIterator<Item = (&'a K, &'a V)>,
) -> Digest {
    let mut digest = Digest::default();
    for (k, v) in entries {
        digest.add(pod_entry_hash(seed, k, v));
    }
    digest
}

/// A named aya hash map (HASH or LRU_HASH), with the program that digests it.
pub struct Named<T, K, V> {
    pub name: &'static str,
    pub map: HashMap<T, K, V>,
    /// Loaded with the seed of the tables the map is in.
    pub digest: (Arc<DigestPrograms>, DigestedMap),
}

impl<T, K, V> KernelMap<K, V> for Named<T, K, V>
where
    T: Borrow<MapData> + BorrowMut<MapData>,
    K: Pod + Ord + Default,
    V: Pod + Default,
{
    fn name(&self) -> &'static str {
        self.name
    }

    /// The kernel memory the map reports: these maps allocate per entry, so it moves with
    /// every entry added or removed (unless this kernel reports its capacity's instead).
    fn footprint(&self) -> Result<Option<u64>, RealizerError> {
        if !footprints_count_entries() {
            return Ok(None);
        }
        footprint(self.map.map().fd().as_fd())
            .map(Some)
            .map_err(|e| RealizerError::Datapath(Box::new(e)))
    }

    /// One lookup per key: a cost of the keys, where a digest or a batched read walks
    /// every bucket of the map's capacity (a million for the services map).
    fn holds_each(&self, desired: &BTreeMap<K, V>) -> Result<bool, RealizerError> {
        for (k, v) in desired {
            match self.map.get(k, 0) {
                Ok(held) if pod_bytes(&held) == pod_bytes(v) => {}
                Ok(_) => return Ok(false),
                Err(e) if is_not_found(&e) => return Ok(false),
                Err(source) => {
                    return Err(RealizerError::Map {
                        op: "lookup",
                        map: self.name,
                        source,
                    });
                }
            }
        }
        Ok(true)
    }

    fn read_all(&self) -> Result<BTreeMap<K, V>, RealizerError> {
        let err = |source| RealizerError::Map {
            op: "iterate",
            map: self.name,
            source,
        };
        self.map.iter().map(|r| r.map_err(err)).collect()
    }

    /// One BPF_MAP_LOOKUP_BATCH: whole buckets, so a slice may end a little short of `max`.
    fn read_from(
        &self,
        cursor: Cursor<K>,
        max: usize,
        visit: &mut dyn FnMut(&K, &V),
    ) -> Result<Option<Cursor<K>>, RealizerError> {
        // Only Start and Bucket ever come back from here.
        let bucket = match cursor {
            Cursor::Bucket(bucket) => Some(bucket),
            Cursor::Start | Cursor::After(_) => None,
        };
        let mut keys = vec![K::default(); max.max(1)];
        let mut values = vec![V::default(); max.max(1)];
        let (read, next) =
            sys::hash_lookup_batch(self.map.map().fd().as_fd(), bucket, &mut keys, &mut values)
                .map_err(|e| RealizerError::Sys {
                    call: e.call,
                    map: self.name,
                    source: e.io_error,
                })?;
        for (k, v) in keys.iter().zip(&values).take(read) {
            visit(k, v);
        }
        Ok(next.map(Cursor::Bucket))
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

    /// Folded in the kernel by the map's digest program, the whole map in one run, at
    /// the first slice of a sweep: no entry crosses into user space, and a drift found is
    /// reported at once. A map larger than a slice then rests for two sweeps' worth of
    /// slices: a fold is exact when taken, so drift is found within one rest, where a map
    /// read in slices takes up to two sweeps.
    fn digest_from(
        &self,
        walk: &mut Option<Walk<K>>,
        max: usize,
        _seed: u64,
    ) -> Result<(usize, Option<Digest>), RealizerError> {
        let max = max as u64;
        match walk.take() {
            Some(Walk::Rest { left }) => {
                if left > max {
                    *walk = Some(Walk::Rest { left: left - max });
                }
                Ok((0, None))
            }
            Some(Walk::Read { .. }) | None => {
                let (programs, map) = &self.digest;
                let digest = programs
                    .map(*map)
                    .map_err(|e| RealizerError::Datapath(Box::new(e)))?;
                if digest.entries > max {
                    *walk = Some(Walk::Rest {
                        left: 2 * digest.entries - max,
                    });
                }
                let read = usize::try_from(digest.entries).unwrap_or(usize::MAX);
                Ok((read, Some(digest)))
            }
        }
    }

    fn remove(&mut self, key: &K) -> Result<(), RealizerError> {
        match self.map.remove(key) {
            Err(source) if !is_not_found(&source) => Err(RealizerError::Map {
                op: "delete",
                map: self.name,
                source,
            }),
            _ => Ok(()),
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
    /// The [`write_stamp`] of each write in `log`, to order writes across maps.
    pub stamps: Vec<u64>,
}

static WRITE_CLOCK: AtomicU64 = AtomicU64::new(0);

/// A process-wide increasing number, stamped on every write to an in-memory table so tests
/// can check the order of writes across maps.
pub fn write_stamp() -> u64 {
    WRITE_CLOCK.fetch_add(1, Ordering::Relaxed)
}

impl<K, V> MemoryMap<K, V> {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            entries: BTreeMap::new(),
            log: Vec::new(),
            stamps: Vec::new(),
        }
    }
}

impl<K: Ord + Clone, V: Clone> KernelMap<K, V> for MemoryMap<K, V> {
    fn name(&self) -> &'static str {
        self.name
    }
    /// The entry count: like a kernel hash map's footprint, it moves with every entry
    /// added or removed and not with a value rewritten.
    fn footprint(&self) -> Result<Option<u64>, RealizerError> {
        Ok(Some(self.entries.len() as u64))
    }
    fn read_all(&self) -> Result<BTreeMap<K, V>, RealizerError> {
        Ok(self.entries.clone())
    }
    fn read_from(
        &self,
        cursor: Cursor<K>,
        max: usize,
        visit: &mut dyn FnMut(&K, &V),
    ) -> Result<Option<Cursor<K>>, RealizerError> {
        let from = match &cursor {
            Cursor::After(key) => Bound::Excluded(key),
            Cursor::Start | Cursor::Bucket(_) => Bound::Unbounded,
        };
        let mut last = None;
        for (k, v) in self
            .entries
            .range((from, Bound::Unbounded))
            .take(max.max(1))
        {
            visit(k, v);
            last = Some(k);
        }
        let more = last.is_some_and(|k| {
            self.entries
                .range((Bound::Excluded(k), Bound::Unbounded))
                .next()
                .is_some()
        });
        Ok(last.filter(|_| more).map(|k| Cursor::After(k.clone())))
    }
    fn upsert(&mut self, key: &K, value: &V) -> Result<(), RealizerError> {
        self.entries.insert(key.clone(), value.clone());
        self.log.push((key.clone(), Some(value.clone())));
        self.stamps.push(write_stamp());
        Ok(())
    }
    fn remove(&mut self, key: &K) -> Result<(), RealizerError> {
        self.entries.remove(key);
        self.log.push((key.clone(), None));
        self.stamps.push(write_stamp());
        Ok(())
    }
}

/// A key of an LPM trie as the registry declares it (prefix length first), and as aya
/// wants it: its LPM key around the data after the prefix length.
pub trait LpmKey: Ord + Clone {
    type Data: Pod;
    fn to_lpm(&self) -> Key<Self::Data>;
    fn from_lpm(key: &Key<Self::Data>) -> Self;
}

impl LpmKey for IpcacheKey {
    type Data = u32;
    fn to_lpm(&self) -> Key<u32> {
        Key::new(self.prefixlen, self.address)
    }
    fn from_lpm(key: &Key<u32>) -> Self {
        IpcacheKey {
            prefixlen: key.prefix_len(),
            address: key.data(),
        }
    }
}

impl LpmKey for Lb4SourceRangeKey {
    type Data = Lb4SourceRange;
    fn to_lpm(&self) -> Key<Lb4SourceRange> {
        Key::new(self.prefixlen, self.range)
    }
    fn from_lpm(key: &Key<Lb4SourceRange>) -> Self {
        Lb4SourceRangeKey {
            prefixlen: key.prefix_len(),
            range: key.data(),
        }
    }
}

/// A named LPM trie (the ipcache, the source ranges).
pub struct Lpm<K: LpmKey, V> {
    pub name: &'static str,
    pub map: LpmTrie<MapData, K::Data, V>,
}

/// The ipcache LPM trie.
pub type Ipcache = Lpm<IpcacheKey, IpcacheEntry>;

impl<K: LpmKey + Pod + Default, V: Pod + Default> KernelMap<K, V> for Lpm<K, V> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn read_all(&self) -> Result<BTreeMap<K, V>, RealizerError> {
        self.map
            .iter()
            .map(|r| {
                r.map(|(k, v)| (K::from_lpm(&k), v))
                    .map_err(|source| RealizerError::Map {
                        op: "iterate",
                        map: self.name,
                        source,
                    })
            })
            .collect()
    }

    /// One BPF_MAP_LOOKUP_BATCH, the kernel's generic one: it walks the keys from the last
    /// one read (the registry's LPM keys are the kernel's: prefix length, then the data).
    fn read_from(
        &self,
        cursor: Cursor<K>,
        max: usize,
        visit: &mut dyn FnMut(&K, &V),
    ) -> Result<Option<Cursor<K>>, RealizerError> {
        let after = match cursor {
            Cursor::After(key) => Some(key),
            Cursor::Start | Cursor::Bucket(_) => None,
        };
        let mut keys = vec![K::default(); max.max(1)];
        let mut values = vec![V::default(); max.max(1)];
        let (read, done) = sys::keyed_lookup_batch(
            self.map.map().fd().as_fd(),
            after.as_ref(),
            &mut keys,
            &mut values,
        )
        .map_err(|e| RealizerError::Sys {
            call: e.call,
            map: self.name,
            source: e.io_error,
        })?;
        for (k, v) in keys.iter().zip(&values).take(read) {
            visit(k, v);
        }
        let last = read.checked_sub(1).and_then(|i| keys.get(i)).cloned();
        // Nothing read and not at the end cannot happen; it ends the sweep all the same.
        Ok(last.filter(|_| !done).map(Cursor::After))
    }

    fn upsert(&mut self, key: &K, value: &V) -> Result<(), RealizerError> {
        self.map
            .insert(&key.to_lpm(), value, 0)
            .map_err(|source| RealizerError::Map {
                op: "update",
                map: self.name,
                source,
            })
    }

    fn remove(&mut self, key: &K) -> Result<(), RealizerError> {
        match self.map.remove(&key.to_lpm()) {
            Err(source) if !is_not_found(&source) => Err(RealizerError::Map {
                op: "delete",
                map: self.name,
                source,
            }),
            _ => Ok(()),
        }
    }
}

/// Whether a map error means the key (or the map behind an id) is absent.
pub(crate) fn is_not_found(err: &MapError) -> bool {
    match err {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}
