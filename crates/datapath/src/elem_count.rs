//! How many elements a hash map holds, as the kernel counts them: the map keeps a per-CPU
//! count of its elements (LRU evictions included), which programs read through the
//! kfunc `bpf_map_sum_elem_count` (kernel 6.6, as tcx). One run of a four-instruction
//! program costs about a microsecond where walking a 65,536-entry table costs
//! milliseconds. aya 0.14 cannot relocate a kfunc call in an ELF object, so the program is
//! assembled here and loaded with a raw `BPF_PROG_LOAD`.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::PathBuf,
};

use crate::{DatapathError, sys};

const KFUNC: &str = "bpf_map_sum_elem_count";
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// A program type that runs with no packet and no context through BPF_PROG_TEST_RUN.
const BPF_PROG_TYPE_SYSCALL: u32 = 31;
/// Syscall programs must be sleepable.
const BPF_F_SLEEPABLE: u32 = 1 << 4;

const BPF_LD_IMM64: u8 = 0x18;
const BPF_CALL: u8 = 0x85;
const BPF_EXIT: u8 = 0x95;
/// `ld_imm64`'s source: the immediate is a map's fd, replaced by the map.
const BPF_PSEUDO_MAP_FD: u8 = 1;
/// `call`'s source: the immediate is a kernel function's BTF id (in vmlinux: offset 0).
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
const R1: u8 = 1;

/// One `struct bpf_insn` as the kernel reads it (little endian: the destination register
/// in the low nibble of the second byte).
fn insn(code: u8, dst: u8, src: u8, imm: i32) -> u64 {
    u64::from(code) | u64::from(dst | src << 4) << 8 | u64::from(imm as u32) << 32
}

/// The element count of one map, read by running a program bound to it.
#[derive(Debug)]
pub struct ElemCount {
    map: &'static str,
    program: OwnedFd,
}

impl ElemCount {
    /// Loads the counting program for `fd`, the map `map` (a name for errors). The program
    /// holds a reference to the map.
    pub fn new(map: &'static str, fd: BorrowedFd<'_>) -> Result<Self, DatapathError> {
        let btf = std::fs::read(VMLINUX_BTF).map_err(|source| DatapathError::Io {
            call: "read",
            path: PathBuf::from(VMLINUX_BTF),
            source,
        })?;
        let kfunc = func_id(&btf, KFUNC).ok_or_else(|| DatapathError::Io {
            call: "find a function in",
            path: PathBuf::from(VMLINUX_BTF),
            source: io::Error::new(io::ErrorKind::NotFound, KFUNC),
        })?;
        drop(btf);
        let insns = [
            // r1 = the map; the second half of ld_imm64 carries the upper 32 bits (none).
            insn(BPF_LD_IMM64, R1, BPF_PSEUDO_MAP_FD, fd.as_raw_fd()),
            0,
            // r0 = bpf_map_sum_elem_count(r1)
            insn(BPF_CALL, 0, BPF_PSEUDO_KFUNC_CALL, kfunc as i32),
            insn(BPF_EXIT, 0, 0, 0),
        ];
        let program = sys::prog_load(BPF_PROG_TYPE_SYSCALL, BPF_F_SLEEPABLE, &insns, "elem_count")
            .map_err(|source| DatapathError::Sys { map, source })?;
        Ok(Self { map, program })
    }

    /// The elements the map holds now. Counts are per CPU and summed without a lock, so a
    /// count taken while programs insert and delete is exact only to within those.
    pub fn get(&self) -> Result<u64, DatapathError> {
        sys::prog_run(self.program.as_fd())
            .map(u64::from)
            .map_err(|source| DatapathError::Sys {
                map: self.map,
                source,
            })
    }
}

/// BTF kinds whose records this scan must step over (uapi `btf.h`).
const BTF_KIND_FUNC: u32 = 12;

/// The type id of the function `name` in the raw BTF `btf`, by a walk over its type
/// records that allocates nothing. aya-obj's parser builds every one of the kernel's
/// 100,000-odd types, tens of MiB the agent's heap keeps after they are freed.
fn func_id(btf: &[u8], name: &str) -> Option<u32> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(btf.get(at..at + 4)?.try_into().ok()?))
    };
    // struct btf_header: magic, version, flags (4 bytes), hdr_len, type_off, type_len,
    // str_off, str_len.
    if btf.get(..2)? != [0x9f, 0xeb] {
        return None;
    }
    let header = word(4)? as usize;
    let types = header + word(8)? as usize;
    let types_end = types + word(12)? as usize;
    let strings = btf.get(header + word(16)? as usize..)?;
    let mut at = types;
    let mut id = 1;
    while at < types_end {
        let (name_off, info) = (word(at)? as usize, word(at + 4)?);
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        if kind == BTF_KIND_FUNC
            && strings.get(name_off..)?.split(|&b| b == 0).next()? == name.as_bytes()
        {
            return Some(id);
        }
        // struct btf_type (12 bytes), then what its kind appends.
        at += 12
            + match kind {
                // INT, VAR, DECL_TAG: one u32.
                1 | 14 | 17 => 4,
                // ARRAY: struct btf_array.
                3 => 12,
                // STRUCT, UNION, DATASEC, ENUM64: vlen records of 12 bytes.
                4 | 5 | 15 | 19 => 12 * vlen,
                // ENUM, FUNC_PROTO: vlen records of 8 bytes.
                6 | 13 => 8 * vlen,
                // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG.
                2 | 7..=12 | 16 | 18 => 0,
                _ => return None,
            };
        id += 1;
    }
    None
}
