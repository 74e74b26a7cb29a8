//! The socket programs (`bpf/sock.c`) on the cgroup of the node's own processes
//! ([`AttachRole::HostCgroup`]) and on the parent cgroup of its pods
//! ([`AttachRole::PodCgroup`]): attached through links pinned under
//! `<pin_dir>/links/cgroup/`, which a new loader updates in place.

use std::{fs, io, path::Path};

use aya::{
    programs::{
        CgroupAttachMode, CgroupSockAddr,
        links::{FdLink, LinkError, PinnedLink},
    },
    sys::SyscallError,
};

use crate::{
    AttachRole, Datapath, DatapathError, ProgramDef, create_dir, link_pin_path, pin_new_link,
    remove_file, sys, typed_program,
};

impl Datapath {
    /// Attaches the socket programs of the cgroup role `role` to the cgroup v2 directory
    /// `cgroup`, pinning their links as `<pin_dir>/links/cgroup/<target>_<hook>`. If links
    /// are pinned already (agent restarted), this program is swapped into them in one step
    /// and they keep the cgroup they were made for. The caller vouches that `cgroup` holds
    /// only the processes `role` is for (the node's own, or its pods'): every socket they
    /// open is load-balanced.
    pub fn attach_cgroup(&mut self, role: AttachRole, cgroup: &Path) -> Result<(), DatapathError> {
        let target = role
            .cgroup_target()
            .ok_or(DatapathError::NotACgroupRole(role))?;
        create_dir(&self.links_dir(role))?;
        let dir = fs::File::open(cgroup).map_err(|source| DatapathError::Io {
            call: "open",
            path: cgroup.into(),
            source,
        })?;
        for program in role.programs() {
            let path = link_pin_path(&self.pin_dir, program, target);
            let sock: &mut CgroupSockAddr = typed_program(self.ebpf(program.object), program.name)?;
            attach_cgroup_link(sock, program.name, &dir, cgroup, &path)?;
        }
        Ok(())
    }

    /// The socket programs of the cgroup role `role` whose pinned cgroup link is missing
    /// or runs another program than this loader's (removed or replaced behind the agent's
    /// back).
    pub fn stale_cgroup_links(
        &mut self,
        role: AttachRole,
    ) -> Result<Vec<&'static ProgramDef>, DatapathError> {
        let target = role
            .cgroup_target()
            .ok_or(DatapathError::NotACgroupRole(role))?;
        let mut stale = Vec::new();
        for program in role.programs() {
            let path = link_pin_path(&self.pin_dir, program, target);
            let linked = match PinnedLink::from_pin(&path) {
                Ok(pinned) => FdLink::from(pinned)
                    .info()
                    .map_err(|source| DatapathError::Link {
                        path: path.clone(),
                        source,
                    })?
                    .program_id(),
                Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound =>
                {
                    0
                }
                Err(source) => return Err(DatapathError::Link { path, source }),
            };
            if linked != self.program_info(program.name)?.id() {
                stale.push(program);
            }
        }
        Ok(stale)
    }
}

/// Attaches `program` to the cgroup open as `dir` through the link pinned at `path`: the
/// pinned link gets this program in place of its own, or, when there is none or its
/// cgroup was removed, a new link is made and pinned.
fn attach_cgroup_link(
    program: &mut CgroupSockAddr,
    name: &'static str,
    dir: &fs::File,
    cgroup: &Path,
    path: &Path,
) -> Result<(), DatapathError> {
    use std::os::fd::AsFd;
    let attach_err = |source| DatapathError::AttachCgroup {
        program: name,
        cgroup: cgroup.into(),
        source,
    };
    let sys_err = |err: SyscallError| DatapathError::Io {
        call: err.call,
        path: path.into(),
        source: err.io_error,
    };
    match sys::obj_get(path) {
        Ok(link) => {
            let fd = program.fd().map_err(attach_err)?;
            match sys::link_update(link.as_fd(), fd.as_fd()) {
                Ok(()) => return Ok(()),
                // The cgroup behind the link is gone.
                Err(err) if err.io_error.raw_os_error() == Some(libc::ENOLINK) => {
                    remove_file(path)?;
                }
                Err(err) => return Err(sys_err(err)),
            }
        }
        Err(err) if err.io_error.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(sys_err(err)),
    }

    // A link is always one of many on its cgroup; the kernel takes no mode flags with it.
    let id = program
        .attach(dir, CgroupAttachMode::Single)
        .map_err(attach_err)?;
    let link = program.take_link(id).map_err(attach_err)?;
    pin_new_link(link, path)
}
