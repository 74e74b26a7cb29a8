//! How many elements a hash map holds, as the kernel counts them: the map keeps a per-CPU
//! count of its elements (LRU evictions included), which programs read through the
//! kfunc `bpf_map_sum_elem_count` (kernel 6.6, as tcx). One run of a four-instruction
//! program costs about a microsecond where walking a 65,536-entry table costs
//! milliseconds. aya 0.14 cannot relocate a kfunc call in an ELF object, so the program is
//! assembled here and loaded with a raw `BPF_PROG_LOAD`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use aya_obj::btf::{Btf, BtfKind};

use crate::{DatapathError, sys};

const KFUNC: &str = "bpf_map_sum_elem_count";

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
        let btf = Btf::from_sys_fs().map_err(|source| DatapathError::KernelBtf {
            name: KFUNC,
            source,
        })?;
        let kfunc = btf
            .id_by_type_name_kind(KFUNC, BtfKind::Func)
            .map_err(|source| DatapathError::KernelBtf {
                name: KFUNC,
                source,
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
