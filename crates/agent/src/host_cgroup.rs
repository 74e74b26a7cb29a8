//! Socket load balancing: the socket programs (`bpf/sock.c`) on the cgroup that holds the
//! node's own processes (`--host-cgroup`), so a process on the node reaches ClusterIPs and
//! NodePorts as kube-proxy allows, without TC programs on the node's devices; and on the
//! parent cgroup of the node's pods (`--pod-cgroup`), so a pod's connection to a frontend
//! is translated once, at connect(), instead of in every packet.

use std::path::{Path, PathBuf};

use sluice_api::Drift;
use sluice_common::kinds::DriftKind;
use sluice_datapath::{AttachRole, Datapath};
use sluice_netns::{Cgroup, NetNsError};
use tracing::{info, warn};

use crate::AgentError;

/// The cgroups the socket programs run on, by role ([`AttachRole::HostCgroup`],
/// [`AttachRole::PodCgroup`]); a role without a cgroup has its programs off.
#[derive(Debug, Default)]
pub struct SocketCgroups {
    host: Option<PathBuf>,
    pods: Option<PathBuf>,
}

impl SocketCgroups {
    /// Attaches the socket programs of each role to its cgroup at start, or, for a role
    /// without one, detaches those an earlier run left pinned.
    ///
    /// Every connect() and sendto() of every process in a cgroup and its descendants goes
    /// through the programs, so a cgroup is refused when it is the root or holds a process
    /// the role is not for: the host cgroup only the node's own (its network namespace),
    /// the pods' cgroup only processes of network namespaces other than the node's and the
    /// host's. Their connections would be sent to this node's backends, or balanced for the
    /// wrong client.
    pub fn start(
        datapath: &mut Datapath,
        host: Option<&Path>,
        pods: Option<&Path>,
    ) -> Result<Self, AgentError> {
        let cgroups = Self {
            host: host.map(Path::to_owned),
            pods: pods.map(Path::to_owned),
        };
        for (role, cgroup) in cgroups.roles() {
            match cgroup {
                Some(path) => {
                    check(role, path)?;
                    datapath.attach_cgroup(role, path)?;
                    info!(?role, cgroup = %path.display(), "socket load balancing attached");
                }
                None => detach(datapath, role)?,
            }
        }
        Ok(cgroups)
    }

    fn roles(&self) -> [(AttachRole, Option<&Path>); 2] {
        [
            (AttachRole::HostCgroup, self.host.as_deref()),
            (AttachRole::PodCgroup, self.pods.as_deref()),
        ]
    }

    /// The pods' cgroup, if socket load balancing serves pods.
    pub fn pods(&self) -> Option<&Path> {
        self.pods.as_deref()
    }

    /// The node's own cgroup, if socket load balancing serves the node's processes.
    pub fn host(&self) -> Option<&Path> {
        self.host.as_deref()
    }

    /// Every full pass: each cgroup is checked again, as a process may have been moved into it
    /// since (then its programs come off and the pass fails, naming the process), and links
    /// removed or replaced behind the agent's back are attached again. Returns whether
    /// anything was attached. Both cgroups are seen to before the first refusal is
    /// returned.
    pub fn reconcile(&self, datapath: &mut Datapath) -> Result<bool, AgentError> {
        let mut attached = false;
        let mut refused = None;
        for (role, cgroup) in self.roles() {
            let Some(cgroup) = cgroup else { continue };
            match reconcile(datapath, role, cgroup) {
                Ok(done) => attached |= done,
                Err(err) => refused = refused.or(Some(err)),
            }
        }
        refused.map_or(Ok(attached), Err)
    }

    /// The socket programs not running on their cgroup, as `verify` reports them.
    pub fn drift(&self, datapath: &mut Datapath) -> Result<Vec<Drift>, AgentError> {
        let mut drift = Vec::new();
        for (role, cgroup) in self.roles() {
            let Some(cgroup) = cgroup else { continue };
            drift.extend(
                datapath
                    .stale_cgroup_links(role)?
                    .into_iter()
                    .map(|program| Drift {
                        map: "cgroup".into(),
                        kind: DriftKind::Missing,
                        key: format!("{} {}", cgroup.display(), program.link_suffix),
                        desired: Some(program.name.to_owned()),
                        actual: None,
                    }),
            );
        }
        Ok(drift)
    }
}

/// Refuses `cgroup` for `role` unless it holds only the processes the role is for.
fn check(role: AttachRole, cgroup: &Path) -> Result<(), NetNsError> {
    match role {
        AttachRole::PodCgroup => Cgroup::at(cgroup).check_pods_only(),
        AttachRole::HostCgroup
        | AttachRole::PodVeth
        | AttachRole::TunnelDevice
        | AttachRole::Netdev => Cgroup::at(cgroup).check_confined(),
    }
}

fn reconcile(datapath: &mut Datapath, role: AttachRole, cgroup: &Path) -> Result<bool, AgentError> {
    if let Err(refused) = check(role, cgroup) {
        warn!(?role, error = %refused, "socket load balancing detached");
        detach(datapath, role)?;
        return Err(refused.into());
    }
    let stale = datapath.stale_cgroup_links(role)?;
    if stale.is_empty() {
        return Ok(false);
    }
    info!(?role, cgroup = %cgroup.display(), hooks = ?stale.iter().map(|p| p.link_suffix).collect::<Vec<_>>(), "attaching socket programs");
    datapath.attach_cgroup(role, cgroup)?;
    Ok(true)
}

fn detach(datapath: &mut Datapath, role: AttachRole) -> Result<(), AgentError> {
    let Some(target) = role.cgroup_target() else {
        return Ok(());
    };
    if !datapath.attached(role)?.is_empty() {
        datapath.detach(role, target)?;
        info!(?role, "socket load balancing detached");
    }
    Ok(())
}
