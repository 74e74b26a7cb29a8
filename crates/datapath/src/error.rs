use std::{io, path::PathBuf};

use aya::{
    EbpfError,
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, links::LinkError},
};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{call} {path}: {source}")]
    Io {
        call: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("loading the datapath object: {0}")]
    Load(#[source] EbpfError),
    #[error("program {0} is not in the datapath object")]
    MissingProgram(String),
    #[error("program {program} is not of the type its hook needs: {source}")]
    ProgramType {
        program: String,
        source: ProgramError,
    },
    #[error("loading program {program}: {source}")]
    ProgramLoad {
        program: &'static str,
        source: ProgramError,
    },
    #[error("{0:?} programs attach to a cgroup, not to an interface")]
    NotADeviceRole(crate::AttachRole),
    #[error("{0:?} programs attach to an interface, not to a cgroup")]
    NotACgroupRole(crate::AttachRole),
    #[error("invalid interface name {0:?}")]
    InvalidInterfaceName(String),
    #[error("attaching {program} to {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        source: ProgramError,
    },
    #[error("attaching {program} to cgroup {cgroup}: {source}")]
    AttachCgroup {
        program: &'static str,
        cgroup: PathBuf,
        source: ProgramError,
    },
    #[error("link pinned at {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error("pinning link at {path}: {source}")]
    PinLink { path: PathBuf, source: PinError },
    #[error("map {map} at {path}: {source}")]
    Map {
        map: &'static str,
        path: PathBuf,
        source: MapError,
    },
    #[error("creating a {map} map: {source}")]
    MapCreate { map: &'static str, source: MapError },
    #[error("map {map}: {source}")]
    Sys {
        map: &'static str,
        source: aya::sys::SyscallError,
    },
    #[error("reading map {map}: {source}")]
    MapRead { map: &'static str, source: MapError },
    #[error("writing map {map}: {source}")]
    MapWrite { map: &'static str, source: MapError },
    #[error("reading the kernel's info on map {map}: {source}")]
    MapInfo { map: &'static str, source: MapError },
    #[error(
        "map {map} pinned at {path} is {found}, the datapath needs {expected} and has no \
         migration from it; the running datapath is left as it is (remove the pins to start \
         over)"
    )]
    IncompatibleMap {
        map: &'static str,
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "map {map}: {count} pinned entries of layout {from} do not convert to {to}, the first \
         (key {key}): {reason}; nothing was migrated, the running datapath is left as it is",
        map = migration.def().name,
        from = migration.from_layout(),
        to = migration.to_layout()
    )]
    Unconvertible {
        migration: &'static sluice_common::Migration,
        key: String,
        reason: sluice_common::Unconvertible,
        count: usize,
    },
}
