//! Socket load balancing for the node's own processes (`--host-cgroup`): the socket
//! programs (`bpf/sock.c`) on the cgroup that holds them, so a process on the node reaches
//! ClusterIPs and NodePorts as kube-proxy allows, without TC programs on the node's
//! devices.

use std::path::Path;

use sluice_api::Drift;
use sluice_common::kinds::DriftKind;
use sluice_datapath::{AttachRole, Datapath, HOST_CGROUP_TARGET};
use sluice_netns::Cgroup;
use tracing::{info, warn};

use crate::AgentError;

/// Attaches the socket programs to `cgroup` at start, or, without one, detaches those an
/// earlier run left pinned.
///
/// Every connect() and sendto() of every process in the cgroup and its descendants goes
/// through the programs; so a cgroup is refused when it is the root, or holds a process
/// outside this agent's network namespace (the host's, another node's): its connections
/// would be sent to this node's backends.
pub fn start(datapath: &mut Datapath, cgroup: Option<&Path>) -> Result<(), AgentError> {
    match cgroup {
        Some(path) => {
            Cgroup::at(path).check_confined()?;
            datapath.attach_cgroup(path)?;
            info!(cgroup = %path.display(), "socket load balancing attached");
        }
        None => detach(datapath)?,
    }
    Ok(())
}

/// Every pass: the cgroup is checked again, as a process may have been moved into it
/// since (then the programs come off and the pass fails, naming the process), and links
/// removed or replaced behind the agent's back are attached again. Returns whether
/// anything was attached.
pub fn reconcile(datapath: &mut Datapath, cgroup: &Path) -> Result<bool, AgentError> {
    if let Err(refused) = Cgroup::at(cgroup).check_confined() {
        warn!(error = %refused, "socket load balancing detached");
        detach(datapath)?;
        return Err(refused.into());
    }
    let stale = datapath.stale_cgroup_links()?;
    if stale.is_empty() {
        return Ok(false);
    }
    info!(cgroup = %cgroup.display(), hooks = ?stale.iter().map(|p| p.link_suffix).collect::<Vec<_>>(), "attaching socket programs");
    datapath.attach_cgroup(cgroup)?;
    Ok(true)
}

/// The socket programs not running on `cgroup`, as `verify` reports them.
pub fn drift(datapath: &mut Datapath, cgroup: &Path) -> Result<Vec<Drift>, AgentError> {
    Ok(datapath
        .stale_cgroup_links()?
        .into_iter()
        .map(|program| Drift {
            map: "cgroup".into(),
            kind: DriftKind::Missing,
            key: format!("{} {}", cgroup.display(), program.link_suffix),
            desired: Some(program.name.to_owned()),
            actual: None,
        })
        .collect())
}

fn detach(datapath: &mut Datapath) -> Result<(), AgentError> {
    if !datapath.attached(AttachRole::HostCgroup)?.is_empty() {
        datapath.detach(AttachRole::HostCgroup, HOST_CGROUP_TARGET)?;
        info!("socket load balancing detached");
    }
    Ok(())
}
