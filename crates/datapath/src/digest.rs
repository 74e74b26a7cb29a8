//! The drift check's in-kernel digest (`bpf/digest.c`): a program walks one realized map
//! in the kernel (`bpf_for_each_map_elem`) and folds a hash of every entry into a
//! [`Digest`], so the check compares three numbers with the desired content's instead of
//! reading the map. The programs are socket filters attached nowhere, run on demand by
//! `BPF_PROG_TEST_RUN`; each leaves its fold in its object's `.bss`.
//!
//! Hash maps, arrays and maps of maps have a for_each, LPM tries do not: those are read
//! with batched lookups. (A map element iterator would fold through a seq_file instead;
//! this kernel refuses `iter/bpf_map_elem` programs with EPERM, and aya 0.14 does not load
//! `syscall` programs.)
//!
//! [`entry_hash`] and [`Digest`] are `bpf/lib/digest.h` in Rust, so the desired content
//! digests to the same numbers.

use std::{
    fs, io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock, PoisonError},
};

use aya::{
    EbpfLoader, Pod,
    maps::{Array, HashMap, IterableMap, MapData},
    programs::{ProgramError, ProgramFd, SocketFilter},
};
use sluice_common::{Lb4Key, MAPS};

use crate::{DatapathError, sys};

static DIGEST_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/digest.o"));

const WORD_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

/// A map's content up to order: `struct digest` of bpf/lib/digest.h. Equal digests mean
/// equal content but for a 2^-64 chance.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    pub entries: u64,
    pub sum: u64,
    pub xor: u64,
}

const _: () = assert!(size_of::<Digest>() == 24);

/// `struct digest_run` of bpf/lib/digest.h: the object's `.bss`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    fold: Digest,
    frontend: Lb4Key,
    found: u32,
}

// bpf/lib/digest.h asserts the same sizes and offsets.
const _: () = assert!(size_of::<Run>() == 40);
const _: () = assert!(std::mem::offset_of!(Run, frontend) == 24);
const _: () = assert!(std::mem::offset_of!(Run, found) == 36);

// SAFETY: plain integers, no padding (checked above: 24 + 12 + 4).
unsafe impl Pod for Run {}

impl Digest {
    /// Folds in one entry's [`entry_hash`].
    pub fn add(&mut self, hash: u64) {
        self.entries += 1;
        self.sum = self.sum.wrapping_add(hash);
        self.xor ^= hash;
    }

    /// Takes out an entry folded in before (for a digest kept up to date by changes).
    pub fn remove(&mut self, hash: u64) {
        self.entries = self.entries.wrapping_sub(1);
        self.sum = self.sum.wrapping_sub(hash);
        self.xor ^= hash;
    }
}

fn hash_word(h: u64, word: u32) -> u64 {
    let h = (h ^ u64::from(word)).wrapping_mul(WORD_MUL);
    h ^ (h >> 29)
}

fn finish(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn hash_bytes(mut h: u64, bytes: &[u8]) -> u64 {
    for word in bytes.chunks_exact(4) {
        let mut w = [0; 4];
        w.copy_from_slice(word);
        h = hash_word(h, u32::from_ne_bytes(w));
    }
    h
}

/// The hash the programs fold for one entry: its key's then its value's bytes in 32-bit
/// words (both a multiple of 4 bytes long), from `seed`.
pub fn entry_hash(seed: u64, key: &[u8], value: &[u8]) -> u64 {
    finish(hash_bytes(hash_bytes(seed, key), value))
}

/// The bytes of a map key or value, as the kernel holds them.
pub fn pod_bytes<T: Pod>(value: &T) -> &[u8] {
    // SAFETY: a Pod is plain data without padding, readable as its bytes for its lifetime.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

/// The [`entry_hash`] of a typed entry.
pub fn pod_entry_hash<K: Pod, V: Pod>(seed: u64, key: &K, value: &V) -> u64 {
    entry_hash(seed, pod_bytes(key), pod_bytes(value))
}

/// A map's footprint: the kernel memory it reports (`memlock` in its fdinfo), which for a
/// hash map allocated per entry (`BPF_F_NO_PREALLOC`) grows and shrinks with every entry
/// added or removed (since Linux 6.6, see [`footprints_count_entries`]), for the cost of
/// reading a few lines. It does not move when a value is rewritten in place.
pub fn footprint(map: BorrowedFd<'_>) -> Result<u64, DatapathError> {
    let path = PathBuf::from(format!("/proc/self/fdinfo/{}", map.as_raw_fd()));
    let io_err = |source| DatapathError::Io {
        call: "read",
        path: path.clone(),
        source,
    };
    let text = fs::read_to_string(&path).map_err(io_err)?;
    text.lines()
        .find_map(|line| line.strip_prefix("memlock:"))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| io_err(io::Error::from(io::ErrorKind::InvalidData)))
}

/// Whether this kernel's [`footprint`] of a hash map moves with its entry count (older
/// kernels report the memory its capacity would take), found once per process on a map
/// made for the purpose, large enough that the kernel counts its entries per CPU as it
/// does the realized maps' (more than 32 per CPU), so it is that count the probe sees.
pub fn footprints_count_entries() -> bool {
    static COUNTS: OnceLock<bool> = OnceLock::new();
    *COUNTS.get_or_init(|| {
        // A kernel refusing the probe map is treated as one whose footprints say nothing:
        // the maps are then digested, which is exact, only dearer.
        let probe = || -> Result<bool, DatapathError> {
            let mut map = HashMap::<MapData, u32, u32>::create(1 << 16, BPF_F_NO_PREALLOC)
                .map_err(|source| DatapathError::MapCreate {
                    map: "footprint probe",
                    source,
                })?;
            let empty = footprint(map.map().fd().as_fd())?;
            map.insert(0, 0, 0)
                .map_err(|source| DatapathError::MapWrite {
                    map: "footprint probe",
                    source,
                })?;
            Ok(footprint(map.map().fd().as_fd())? != empty)
        };
        probe().unwrap_or(false)
    })
}

const BPF_F_NO_PREALLOC: u32 = 1;

/// Which realized hash map a program of `bpf/digest.c` folds (its index in [`PROGRAMS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigestedMap {
    Services = 0,
    Backends = 1,
    Endpoints = 2,
}

/// The programs of `bpf/digest.c`: [`DigestedMap`]'s in its order, then the Maglev table's.
const PROGRAMS: [&str; 4] = [
    "digest_services",
    "digest_backends",
    "digest_endpoints",
    "digest_maglev",
];
const DIGEST_MAGLEV: usize = 3;
const BSS: &str = ".bss";

/// The digest programs, loaded against the maps pinned in one directory with one seed.
pub struct DigestPrograms {
    /// The object's `.bss`; one run at a time, as every run leaves its fold there.
    bss: Mutex<Array<MapData, Run>>,
    /// Each of [`PROGRAMS`], found and checked once at load; its fd keeps it loaded.
    programs: Vec<ProgramFd>,
}

impl DigestPrograms {
    /// Loads the programs against the maps pinned in `pin_dir` (the datapath's), hashing
    /// from `seed`.
    pub fn load(pin_dir: &Path, seed: u64) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        loader.override_global("seed", &seed, true);
        for def in &MAPS {
            loader.map_pin_path(def.name, pin_dir.join(def.name));
        }
        let mut ebpf = loader.load(DIGEST_OBJECT).map_err(DatapathError::Load)?;
        let programs = PROGRAMS
            .iter()
            .map(|&name| {
                let program: &mut SocketFilter = ebpf
                    .program_mut(name)
                    .ok_or_else(|| DatapathError::MissingProgram(name.into()))?
                    .try_into()
                    .map_err(|source| DatapathError::ProgramType {
                        program: name.into(),
                        source,
                    })?;
                let load_err = |source| DatapathError::ProgramLoad {
                    program: name,
                    source,
                };
                program.load().map_err(load_err)?;
                program
                    .fd()
                    .and_then(|fd| fd.try_clone().map_err(ProgramError::from))
                    .map_err(load_err)
            })
            .collect::<Result<_, _>>()?;
        let bss_err = |source| DatapathError::MapRead { map: BSS, source };
        let bss = ebpf
            .take_map(BSS)
            .ok_or_else(|| DatapathError::MissingProgram(BSS.into()))?
            .try_into()
            .map_err(bss_err)?;
        // The object itself goes: the programs and `.bss` are all a run needs.
        Ok(Self {
            bss: Mutex::new(bss),
            programs,
        })
    }

    /// The digest of one realized hash map, folded in the kernel.
    pub fn map(&self, map: DigestedMap) -> Result<Digest, DatapathError> {
        Ok(self.run(map as usize, Run::default())?.fold)
    }

    /// The digest of the Maglev table installed for `frontend`, or None.
    pub fn maglev(&self, frontend: &Lb4Key) -> Result<Option<Digest>, DatapathError> {
        let run = Run {
            frontend: *frontend,
            ..Run::default()
        };
        let run = self.run(DIGEST_MAGLEV, run)?;
        Ok((run.found != 0).then_some(run.fold))
    }

    /// Writes `run` to the object's `.bss`, runs program `index` of [`PROGRAMS`] once and
    /// reads `.bss` back.
    fn run(&self, index: usize, run: Run) -> Result<Run, DatapathError> {
        let name = PROGRAMS[index];
        // A run that panicked left nothing half written that the next one reads.
        let mut bss = self.bss.lock().unwrap_or_else(PoisonError::into_inner);
        bss.set(0, run, 0)
            .map_err(|source| DatapathError::MapWrite { map: BSS, source })?;
        // The smallest packet a socket filter's run takes: an Ethernet header, and a
        // little more; the result is in `.bss`, not the return value.
        sys::prog_run(self.programs[index].as_fd(), &[0u8; 64])
            .map_err(|source| DatapathError::Sys { map: name, source })?;
        bss.get(&0, 0)
            .map_err(|source| DatapathError::MapRead { map: BSS, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fold_is_order_free_and_an_entry_taken_out_leaves_no_trace() {
        let hashes: Vec<u64> = (0u32..100)
            .map(|i| entry_hash(7, &i.to_ne_bytes(), &(i * 3).to_ne_bytes()))
            .collect();
        let (mut forward, mut backward) = (Digest::default(), Digest::default());
        hashes.iter().for_each(|&h| forward.add(h));
        hashes.iter().rev().for_each(|&h| backward.add(h));
        assert_eq!(forward, backward);
        let before = forward;
        forward.add(12345);
        forward.remove(12345);
        assert_eq!(forward, before);
    }

    #[test]
    fn every_key_and_value_bit_changes_the_hash() {
        let (key, value) = ([1u8; 12], [2u8; 16]);
        let base = entry_hash(1, &key, &value);
        for bit in 0..(12 + 16) * 8 {
            let (mut k, mut v) = (key, value);
            if bit < 96 {
                k[bit / 8] ^= 1 << (bit % 8);
            } else {
                v[(bit - 96) / 8] ^= 1 << (bit % 8);
            }
            assert_ne!(entry_hash(1, &k, &v), base, "bit {bit}");
        }
        assert_ne!(entry_hash(2, &key, &value), base, "the seed");
    }
}
