//! `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH`, which aya does not offer: when the
//! map is a map of maps, the kernel waits for running programs to let go of the old inner
//! maps once per call (about 14 ms), so a batch costs one wait instead of one per endpoint.

use std::{io, os::fd::BorrowedFd};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Sets `keys[i]` to `values[i]` in the map behind `map`, in order. On error, the updates
/// before the failing one are done.
pub fn update(map: BorrowedFd<'_>, keys: &[u32], values: &[u32]) -> io::Result<()> {
    if keys.len() != values.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    batch(BPF_MAP_UPDATE_BATCH, map, keys, values.as_ptr() as u64).map_err(|(e, _)| e)
}

/// Deletes `keys` from the map behind `map`; keys already absent are skipped.
pub fn delete(map: BorrowedFd<'_>, keys: &[u32]) -> io::Result<()> {
    let mut rest = keys;
    while !rest.is_empty() {
        match batch(BPF_MAP_DELETE_BATCH, map, rest, 0) {
            Ok(_) => return Ok(()),
            // The kernel stops at the first absent key and reports how many it deleted.
            Err((e, done)) if e.raw_os_error() == Some(libc::ENOENT) => {
                rest = rest.get(done + 1..).unwrap_or_default();
            }
            Err((e, _)) => return Err(e),
        }
    }
    Ok(())
}

/// One batch command over `keys` (and `values`, a pointer to as many values, or 0). On
/// error, also says how many elements were done.
fn batch(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    keys: &[u32],
    values: u64,
) -> Result<(), (io::Error, usize)> {
    use std::os::fd::AsRawFd;
    let (Ok(count), Ok(map_fd)) = (u32::try_from(keys.len()), u32::try_from(map.as_raw_fd()))
    else {
        return Err((io::Error::from_raw_os_error(libc::EINVAL), 0));
    };
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values,
        count,
        map_fd,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is the bpf_attr of a batch command and its size is passed; `keys` (and
    // `values`, given by the caller for `count` elements) hold u32 ifindexes and u32 map fds,
    // the sizes of the policy map's key and value, and outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return Err((err, usize::try_from(attr.count).unwrap_or(0)));
    }
    Ok(())
}
