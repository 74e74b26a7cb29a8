//! A map handled as bytes, for code that knows its layout only at run time (the layout
//! migration reads a map of an earlier layout and writes one of today's). Every call checks
//! the buffers against the key and value sizes the kernel reports for the map.

use std::os::fd::AsFd;

use aya::{maps::MapData, sys::SyscallError};

use crate::sys::{self, HashCursor};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
/// Flags of BPF_MAP_UPDATE_ELEM: create or replace.
pub(crate) const BPF_ANY: u64 = 0;

/// The element member used by BPF_MAP_UPDATE_ELEM.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// One entry as bytes: its key and its value.
pub(crate) type RawEntry = (Vec<u8>, Vec<u8>);

pub(crate) struct RawMap<'a> {
    data: &'a MapData,
    key_size: usize,
    value_size: usize,
}

impl<'a> RawMap<'a> {
    /// `data` with the key and value sizes `(key_size, value_size)` read from the kernel.
    pub(crate) fn new(data: &'a MapData, sizes: (usize, usize)) -> Self {
        Self {
            data,
            key_size: sizes.0,
            value_size: sizes.1,
        }
    }

    /// Every entry of the hash map, as (key, value) bytes, read 4,096 at a time; an entry
    /// changed during the read is seen as it was when its bucket was read.
    pub(crate) fn hash_entries(&self) -> Result<Vec<RawEntry>, SyscallError> {
        const CHUNK: usize = 4096;
        let (key_size, value_size) = (self.key_size.max(1), self.value_size.max(1));
        let mut keys = vec![0u8; key_size * CHUNK];
        let mut values = vec![0u8; value_size * CHUNK];
        let mut cursor: Option<HashCursor> = None;
        let mut entries = Vec::new();
        loop {
            // SAFETY: the buffers hold CHUNK keys and values of the sizes the kernel gave
            // for this map, and outlive the call.
            let (read, next) = unsafe {
                sys::lookup_batch(
                    self.data.fd().as_fd(),
                    cursor,
                    keys.as_mut_ptr(),
                    values.as_mut_ptr(),
                    CHUNK,
                )?
            };
            entries.extend(
                keys.chunks_exact(key_size)
                    .zip(values.chunks_exact(value_size))
                    .take(read)
                    .map(|(k, v)| (k.to_vec(), v.to_vec())),
            );
            match next {
                Some(next) => cursor = Some(next),
                None => return Ok(entries),
            }
        }
    }

    /// Sets `key` to `value` with the update `flags` (`BPF_ANY`: create or replace).
    pub(crate) fn update(&self, key: &[u8], value: &[u8], flags: u64) -> Result<(), SyscallError> {
        const CALL: &str = "bpf(BPF_MAP_UPDATE_ELEM)";
        if key.len() != self.key_size || value.len() != self.value_size {
            return Err(sys::invalid(CALL));
        }
        let mut attr = ElemAttr {
            map_fd: sys::raw_fd(self.data.fd().as_fd(), CALL)?,
            pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            flags,
        };
        // SAFETY: ElemAttr is the element member; `key` and `value` hold exactly the map's
        // key and value sizes (checked above) and outlive the call.
        if unsafe { sys::bpf(BPF_MAP_UPDATE_ELEM, &mut attr) } < 0 {
            return Err(sys::last_error(CALL));
        }
        Ok(())
    }
}
