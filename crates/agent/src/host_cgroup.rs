//! Socket load balancing for the node's own processes (`--host-cgroup`): the socket
//! programs (`bpf/sock.c`) on the cgroup that holds them, so a process on the node reaches
//! ClusterIPs and NodePorts as kube-proxy allows, without TC programs on the node's
//! devices.

use std::path::Path;

use sluice_datapath::{AttachRole, Datapath, HOST_CGROUP_TARGET};
use sluice_netns::Cgroup;
use tracing::info;

use crate::AgentError;

/// Attaches the socket programs to `cgroup`, or, without one, detaches those an earlier
/// run left pinned.
///
/// Every connect() and sendto() of every process in the cgroup and its descendants goes
/// through the programs; so a cgroup is refused when it is the root, or holds a process
/// outside this agent's network namespace (the host's, another node's): its connections
/// would be sent to this node's backends.
pub fn attach(datapath: &mut Datapath, cgroup: Option<&Path>) -> Result<(), AgentError> {
    match cgroup {
        Some(path) => {
            Cgroup::at(path).check_confined()?;
            datapath.attach_cgroup(path)?;
            info!(cgroup = %path.display(), "socket load balancing attached");
        }
        None => {
            if !datapath.attached(AttachRole::HostCgroup)?.is_empty() {
                datapath.detach(AttachRole::HostCgroup, HOST_CGROUP_TARGET)?;
                info!("no --host-cgroup: socket load balancing detached");
            }
        }
    }
    Ok(())
}
