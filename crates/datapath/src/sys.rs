//! The bpf(2) commands aya 0.14 does not offer, in one place: opening a pinned object
//! (`BPF_OBJ_GET`), detaching a link (`BPF_LINK_DETACH`), swapping a link's program
//! (`BPF_LINK_UPDATE`), walking a map's keys without knowing their type
//! (`BPF_MAP_GET_NEXT_KEY`), pinning an object held by fd again (`BPF_OBJ_PIN`), an
//! object's id and a link's hook (`BPF_OBJ_GET_INFO_BY_FD`), and batch lookups, updates and deletes
//! (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`), and loading and
//! running a program assembled in Rust (`BPF_PROG_LOAD`, `BPF_PROG_TEST_RUN`: aya cannot
//! relocate a kfunc call).
//!
//! Each command gets its own `#[repr(C)]` member of `union bpf_attr` and passes that
//! member's size; the kernel treats the missing tail of the union as zero. Every failure is
//! an aya [`SyscallError`] naming the command.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya::sys::SyscallError;

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// bpf(2) with `attr` as its `union bpf_attr`.
///
/// # Safety
/// `A` must be the `#[repr(C)]` layout of the member of `union bpf_attr` that `cmd` reads,
/// and every pointer it holds must be valid for what the kernel reads or writes through it
/// during the call.
pub(crate) unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> libc::c_long {
    // SAFETY: the caller vouches for the layout and the pointers; the size passed is A's.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, size_of::<A>()) }
}

pub(crate) fn last_error(call: &'static str) -> SyscallError {
    SyscallError {
        call,
        io_error: io::Error::last_os_error(),
    }
}

pub(crate) fn invalid(call: &'static str) -> SyscallError {
    SyscallError {
        call,
        io_error: io::Error::from_raw_os_error(libc::EINVAL),
    }
}

pub(crate) fn raw_fd(fd: BorrowedFd<'_>, call: &'static str) -> Result<u32, SyscallError> {
    u32::try_from(fd.as_raw_fd()).map_err(|_| invalid(call))
}

/// The `obj_pin` member: BPF_OBJ_GET reads `pathname` and `file_flags`.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Opens the object pinned at `path` (a map, program or link). A missing pin is an error
/// whose kind is [`io::ErrorKind::NotFound`].
pub fn obj_get(path: &Path) -> Result<OwnedFd, SyscallError> {
    const CALL: &str = "bpf(BPF_OBJ_GET)";
    let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| invalid(CALL))?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        ..ObjAttr::default()
    };
    // SAFETY: ObjAttr is the obj_pin member; `path` is NUL-terminated and outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) };
    if fd < 0 {
        return Err(last_error(CALL));
    }
    let fd = i32::try_from(fd).map_err(|_| invalid(CALL))?;
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins the object `fd` refers to (a map, program or link) at `path`, which must not exist.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<(), SyscallError> {
    const CALL: &str = "bpf(BPF_OBJ_PIN)";
    let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| invalid(CALL))?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: raw_fd(fd, CALL)?,
        ..ObjAttr::default()
    };
    // SAFETY: ObjAttr is the obj_pin member; `path` is NUL-terminated and outlives the call.
    if unsafe { bpf(BPF_OBJ_PIN, &mut attr) } < 0 {
        return Err(last_error(CALL));
    }
    Ok(())
}

/// The `info` member: BPF_OBJ_GET_INFO_BY_FD fills `info_len` bytes at `info`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `BPF_LINK_TYPE_CGROUP` and `BPF_LINK_TYPE_TCX` of `enum bpf_link_type`.
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// What the kernel says of a map, program or link: its id and, for a link, whether it
/// still holds its hook (a detached tcx link names ifindex 0, a detached cgroup link
/// cgroup 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjInfo {
    pub id: u32,
    pub attached: bool,
    /// For a link, the id of the program it runs (`bpf_link_info.prog_id`); else 0.
    pub program: u32,
}

/// The id of the object `fd` refers to and, if it is a tcx or cgroup link, whether it is
/// attached. Every info struct (`bpf_map_info`, `bpf_prog_info`, `bpf_link_info`) starts
/// with `type` and `id`; a link's hook follows at byte 16 (`tcx.ifindex`, `cgroup.cgroup_id`).
pub fn obj_info(fd: BorrowedFd<'_>, link: bool) -> Result<ObjInfo, SyscallError> {
    const CALL: &str = "bpf(BPF_OBJ_GET_INFO_BY_FD)";
    /// The info struct's first 64 bytes as 32-bit words, aligned for its 64-bit fields.
    #[repr(C, align(8))]
    struct Words([u32; 16]);
    let mut info = Words([0; 16]);
    let mut attr = InfoAttr {
        bpf_fd: raw_fd(fd, CALL)?,
        info_len: size_of::<Words>() as u32,
        info: info.0.as_mut_ptr() as u64,
    };
    // SAFETY: InfoAttr is the info member; `info` is writable for info_len bytes and
    // outlives the call.
    if unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) } < 0 {
        return Err(last_error(CALL));
    }
    let [kind, id, prog_id, _, hook_lo, hook_hi, ..] = info.0;
    let attached = match (link, kind) {
        (true, BPF_LINK_TYPE_TCX) => hook_lo != 0,
        (true, BPF_LINK_TYPE_CGROUP) => hook_lo != 0 || hook_hi != 0,
        _ => true,
    };
    let program = if link { prog_id } else { 0 };
    Ok(ObjInfo {
        id,
        attached,
        program,
    })
}

/// The `link_detach` member.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Takes the program of `link` off its hook now, rather than when the kernel frees the link.
/// A link already defunct (its interface is gone) fails with `ENOLINK`.
pub fn link_detach(link: BorrowedFd<'_>) -> Result<(), SyscallError> {
    const CALL: &str = "bpf(BPF_LINK_DETACH)";
    let mut attr = LinkDetachAttr {
        link_fd: raw_fd(link, CALL)?,
    };
    // SAFETY: LinkDetachAttr is the link_detach member and holds no pointers.
    if unsafe { bpf(BPF_LINK_DETACH, &mut attr) } < 0 {
        return Err(last_error(CALL));
    }
    Ok(())
}

/// The `link_update` member (no `old_prog_fd`: the swap is unconditional).
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
}

/// Puts `program` in place of the program of `link` in one step, for hooks whose links aya
/// cannot update (cgroup links); the hook is never left empty.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> Result<(), SyscallError> {
    const CALL: &str = "bpf(BPF_LINK_UPDATE)";
    let mut attr = LinkUpdateAttr {
        link_fd: raw_fd(link, CALL)?,
        new_prog_fd: raw_fd(program, CALL)?,
        flags: 0,
    };
    // SAFETY: LinkUpdateAttr is the link_update member and holds no pointers.
    if unsafe { bpf(BPF_LINK_UPDATE, &mut attr) } < 0 {
        return Err(last_error(CALL));
    }
    Ok(())
}

/// The element member used by BPF_MAP_GET_NEXT_KEY.
#[repr(C)]
#[derive(Default)]
struct NextKeyAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    next_key: u64,
}

/// How many keys the map behind `map` holds, whatever their type (`key_size` bytes each),
/// counted by walking them as aya's `keys()` does.
pub fn map_count_keys(map: BorrowedFd<'_>, key_size: usize) -> Result<u64, SyscallError> {
    const CALL: &str = "bpf(BPF_MAP_GET_NEXT_KEY)";
    let map_fd = raw_fd(map, CALL)?;
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut count = 0;
    loop {
        let mut attr = NextKeyAttr {
            map_fd,
            // A null key asks for the first one.
            key: if count == 0 { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            ..NextKeyAttr::default()
        };
        // SAFETY: NextKeyAttr is the element member; `key` and `next` hold key_size bytes,
        // what the kernel reads and writes, and outlive the call.
        if unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } < 0 {
            let err = last_error(CALL);
            return match err.io_error.raw_os_error() {
                Some(libc::ENOENT) => Ok(count),
                _ => Err(err),
            };
        }
        count += 1;
        std::mem::swap(&mut key, &mut next);
    }
}

/// The `batch` member.
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

/// Swaps `inners[i]` in under `keys[i]` of the map of maps behind `outer` (keys of its key
/// type: an ifindex, a frontend), in order, in one batch: each element is one atomic update,
/// and the kernel waits for running programs to let go of the old inner maps once per call
/// (about 14 ms) instead of once per key. The inner maps' fds may close afterwards: the
/// outer map holds them. On error, the updates before the failing one are done.
pub fn swap_inner_maps<K: aya::Pod>(
    outer: BorrowedFd<'_>,
    keys: &[K],
    inners: &[BorrowedFd<'_>],
) -> Result<(), SyscallError> {
    const CALL: &str = "bpf(BPF_MAP_UPDATE_BATCH)";
    if keys.len() != inners.len() {
        return Err(invalid(CALL));
    }
    let values = inners
        .iter()
        .map(|&fd| raw_fd(fd, CALL))
        .collect::<Result<Vec<u32>, _>>()?;
    batch(
        CALL,
        BPF_MAP_UPDATE_BATCH,
        outer,
        keys,
        values.as_ptr() as u64,
    )
    .map_err(|(e, _)| e)
}

/// Deletes `keys` (of the map's key type) from the map behind `map`; keys already absent
/// are skipped.
pub fn map_delete_batch<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), SyscallError> {
    map_delete_batch_counted(map, keys).map(|_| ())
}

/// [`map_delete_batch`], returning how many of `keys` were there and deleted.
pub fn map_delete_batch_counted<K: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
) -> Result<u64, SyscallError> {
    const CALL: &str = "bpf(BPF_MAP_DELETE_BATCH)";
    let mut rest = keys;
    let mut deleted = 0;
    while !rest.is_empty() {
        match batch(CALL, BPF_MAP_DELETE_BATCH, map, rest, 0) {
            Ok(()) => return Ok(deleted + rest.len() as u64),
            // The kernel stops at the first absent key and reports how many it deleted.
            Err((e, done)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                deleted += done as u64;
                rest = rest.get(done + 1..).unwrap_or_default();
            }
            Err((e, _)) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Every element of the array behind `map`, which has `entries` elements of `V`, in index
/// order: one BPF_MAP_LOOKUP_BATCH instead of a lookup per element (a Maglev table has
/// thousands).
pub fn array_lookup_all<V: aya::Pod + Default>(
    map: BorrowedFd<'_>,
    entries: u32,
) -> Result<Vec<V>, SyscallError> {
    const CALL: &str = "bpf(BPF_MAP_LOOKUP_BATCH)";
    let map_fd = raw_fd(map, CALL)?;
    let len = usize::try_from(entries).map_err(|_| invalid(CALL))?;
    let mut keys = vec![0u32; len];
    let mut values = vec![V::default(); len];
    let mut out_batch = 0u32;
    let mut attr = BatchAttr {
        out_batch: &mut out_batch as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: entries,
        map_fd,
        ..BatchAttr::default()
    };
    // SAFETY: BatchAttr is the batch member; `keys` and `values` hold `entries` u32 keys
    // and `V` values (the array's key and value size; the caller names the map's value
    // type), `out_batch` the u32 cursor of an array, all outliving the call.
    if unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) } < 0 {
        let err = last_error(CALL);
        // ENOENT: the array ended before `entries`; what was read is in place.
        if err.io_error.raw_os_error() != Some(libc::ENOENT) {
            return Err(err);
        }
    }
    values.truncate(usize::try_from(attr.count).unwrap_or(0));
    Ok(values)
}

/// Where a batched read of a hash map goes on from: the kernel's opaque bucket cursor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HashCursor(u32);

/// Reads the next entries of the hash map behind `map` (keys of `K`, values of `V`: its
/// key and value types) with one BPF_MAP_LOOKUP_BATCH, from `cursor` on (None: from the
/// start), at most `keys.len()` of them into `keys` and `values`, whole buckets at a time.
/// Returns how many were read and the cursor to go on from, None once the map's end was
/// reached. An entry changed while a read is in progress is seen as it was when its bucket
/// was read, or not at all if its bucket was passed.
pub fn hash_lookup_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    cursor: Option<HashCursor>,
    keys: &mut [K],
    values: &mut [V],
) -> Result<(usize, Option<HashCursor>), SyscallError> {
    let count = keys.len().min(values.len());
    // SAFETY: `keys` and `values` hold `count` keys and values of the map's types (the
    // caller names them) and outlive the call.
    unsafe {
        lookup_batch(
            map,
            cursor,
            keys.as_mut_ptr().cast(),
            values.as_mut_ptr().cast(),
            count,
        )
    }
}

/// How many entries the hash map behind `map` holds (keys of `key_size` bytes, values of
/// `value_size`: not per-CPU), counted with batched reads of 4,096 at a time: a few
/// hundred syscalls for a million entries where walking the keys takes a million.
pub fn hash_count_entries(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> Result<u64, SyscallError> {
    const CHUNK: usize = 4096;
    let mut keys = vec![0u8; key_size.max(1) * CHUNK];
    let mut values = vec![0u8; value_size.max(1) * CHUNK];
    let mut cursor = None;
    let mut total = 0;
    loop {
        // SAFETY: the buffers hold CHUNK keys and values of the sizes the caller gives for
        // the map, and outlive the call.
        let (read, next) =
            unsafe { lookup_batch(map, cursor, keys.as_mut_ptr(), values.as_mut_ptr(), CHUNK)? };
        total += read as u64;
        match next {
            Some(next) => cursor = Some(next),
            None => return Ok(total),
        }
    }
}

/// One BPF_MAP_LOOKUP_BATCH of a hash map (see [`hash_lookup_batch`]).
///
/// # Safety
/// `keys` and `values` must be valid for writes of `count` keys and values of the map's
/// key and value sizes during the call.
pub(crate) unsafe fn lookup_batch(
    map: BorrowedFd<'_>,
    cursor: Option<HashCursor>,
    keys: *mut u8,
    values: *mut u8,
    count: usize,
) -> Result<(usize, Option<HashCursor>), SyscallError> {
    let in_batch = cursor.map(|HashCursor(bucket)| bucket);
    let mut out_batch = 0u32;
    let in_ptr = in_batch
        .as_ref()
        .map_or(0, |bucket| bucket as *const u32 as u64);
    // SAFETY: a hash map's cursors are the u32 bucket index, both valid for the call; the
    // caller vouches for `keys` and `values`.
    let (read, done) = unsafe {
        lookup_batch_raw(
            map,
            in_ptr,
            &mut out_batch as *mut u32 as u64,
            keys,
            values,
            count,
        )?
    };
    Ok((read, (!done).then_some(HashCursor(out_batch))))
}

/// Reads the entries after `after` (None: from the first) of a map whose batched reads
/// walk its keys (an LPM trie: the kernel's generic batch, one syscall for a slice), at
/// most `keys.len()` of them into `keys` and `values` (of `K` and `V`, the map's key and
/// value types). Returns how many were read and whether the map's end was reached; the
/// last key read is where the next read goes on from.
pub fn keyed_lookup_batch<K: aya::Pod + Default, V: aya::Pod>(
    map: BorrowedFd<'_>,
    after: Option<&K>,
    keys: &mut [K],
    values: &mut [V],
) -> Result<(usize, bool), SyscallError> {
    let mut out = K::default();
    let count = keys.len().min(values.len());
    // SAFETY: the cursors are keys of the map's key type, `keys` and `values` hold `count`
    // keys and values of its types (the caller names them), all valid for the call.
    unsafe {
        lookup_batch_raw(
            map,
            after.map_or(0, |k| k as *const K as u64),
            &mut out as *mut K as u64,
            keys.as_mut_ptr().cast(),
            values.as_mut_ptr().cast(),
            count,
        )
    }
}

/// BPF_MAP_LOOKUP_BATCH with the cursors `in_batch` (0: from the start) and `out_batch`.
/// Returns how many entries were read and whether the map's end was reached.
///
/// # Safety
/// `in_batch` (unless 0) and `out_batch` must point to cursors of the map's kind (a u32
/// bucket for hash maps, a key for the generic batch), `keys` and `values` must be valid for
/// writes of `count` keys and values of the map's sizes, all during the call.
unsafe fn lookup_batch_raw(
    map: BorrowedFd<'_>,
    in_batch: u64,
    out_batch: u64,
    keys: *mut u8,
    values: *mut u8,
    count: usize,
) -> Result<(usize, bool), SyscallError> {
    const CALL: &str = "bpf(BPF_MAP_LOOKUP_BATCH)";
    let mut attr = BatchAttr {
        in_batch,
        out_batch,
        keys: keys as u64,
        values: values as u64,
        count: u32::try_from(count).map_err(|_| invalid(CALL))?,
        map_fd: raw_fd(map, CALL)?,
        ..BatchAttr::default()
    };
    // SAFETY: BatchAttr is the batch member; the caller vouches for every pointer.
    let done = if unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) } < 0 {
        let err = last_error(CALL);
        // ENOENT: the map's end; the entries read before it are in place.
        if err.io_error.raw_os_error() != Some(libc::ENOENT) {
            return Err(err);
        }
        true
    } else {
        false
    };
    let read = usize::try_from(attr.count).map_err(|_| invalid(CALL))?;
    Ok((read, done))
}

/// Sets elements 0..values.len() of the array behind `map` (values of `V`, its value type)
/// in one BPF_MAP_UPDATE_BATCH.
pub fn array_update_all<V: aya::Pod>(
    map: BorrowedFd<'_>,
    values: &[V],
) -> Result<(), SyscallError> {
    const CALL: &str = "bpf(BPF_MAP_UPDATE_BATCH)";
    let keys = (0..u32::try_from(values.len()).map_err(|_| invalid(CALL))?).collect::<Vec<_>>();
    batch(
        CALL,
        BPF_MAP_UPDATE_BATCH,
        map,
        &keys,
        values.as_ptr() as u64,
    )
    .map_err(|(e, _)| e)
}

/// One batch command over `keys` (and `values`, a pointer to as many values of the map's
/// value size, or 0).
/// On error, also says how many elements were done.
fn batch<K: aya::Pod>(
    call: &'static str,
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    keys: &[K],
    values: u64,
) -> Result<(), (SyscallError, usize)> {
    let (Ok(count), Ok(map_fd)) = (u32::try_from(keys.len()), raw_fd(map, call)) else {
        return Err((invalid(call), 0));
    };
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values,
        count,
        map_fd,
        ..BatchAttr::default()
    };
    // SAFETY: BatchAttr is the batch member; `keys` holds `count` keys of the map's key type
    // (the callers name it) and `values` (given by the caller) `count` values of the map's
    // value size; both outlive the call.
    if unsafe { bpf(cmd, &mut attr) } < 0 {
        let err = last_error(call);
        return Err((err, usize::try_from(attr.count).unwrap_or(0)));
    }
    Ok(())
}

/// The `prog_load` member, up to `prog_name`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// Loads `insns` (raw `struct bpf_insn`s) as a GPL program of `prog_type` with
/// `prog_flags`. A refusal carries the verifier's log in its error.
pub fn prog_load(
    prog_type: u32,
    prog_flags: u32,
    insns: &[u64],
    name: &str,
) -> Result<OwnedFd, SyscallError> {
    const CALL: &str = "bpf(BPF_PROG_LOAD)";
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut prog_name = [0u8; 16];
    // The kernel wants a NUL within 16 bytes.
    for (to, from) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *to = from;
    }
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: u32::try_from(insns.len()).map_err(|_| invalid(CALL))?,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_flags,
        prog_name,
        ..ProgLoadAttr::default()
    };
    // SAFETY: ProgLoadAttr is the prog_load member's head; `insns`, `license` and `log`
    // are valid for what the kernel reads and writes and outlive the call.
    let fd = unsafe { bpf(BPF_PROG_LOAD, &mut attr) };
    if fd < 0 {
        let err = last_error(CALL);
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        return Err(SyscallError {
            call: CALL,
            io_error: io::Error::new(
                err.io_error.kind(),
                format!(
                    "{}: {}",
                    err.io_error,
                    String::from_utf8_lossy(&log[..end]).trim()
                ),
            ),
        });
    }
    let fd = i32::try_from(fd).map_err(|_| invalid(CALL))?;
    // SAFETY: the kernel just returned this fd for the new program; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The `test` member, whole: a field left out would leave padding, whose bytes are
/// not zeroed, where the kernel reads `cpu` (and refuses the run).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Runs `program` once on `packet` (empty for a `BPF_PROG_TYPE_SYSCALL` program, which
/// takes no packet and no context, nor a repeat count); returns its return value.
pub fn prog_run(program: BorrowedFd<'_>, packet: &[u8]) -> Result<u32, SyscallError> {
    const CALL: &str = "bpf(BPF_PROG_TEST_RUN)";
    let mut attr = TestRunAttr {
        prog_fd: raw_fd(program, CALL)?,
        data_size_in: u32::try_from(packet.len()).map_err(|_| invalid(CALL))?,
        data_in: if packet.is_empty() {
            0
        } else {
            packet.as_ptr() as u64
        },
        ..TestRunAttr::default()
    };
    // SAFETY: TestRunAttr is the test member's head; `packet` outlives the call and
    // nothing is written back through a pointer (no data_out, no ctx).
    if unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) } < 0 {
        return Err(last_error(CALL));
    }
    Ok(attr.retval)
}
