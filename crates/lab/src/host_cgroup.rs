//! Each node's cgroup: the processes the lab runs on a node (`lab exec --node`) live in
//! it, and the node's agent attaches its socket programs to it (`--host-cgroup`), so they
//! reach ClusterIPs and NodePorts. It is named like the node's namespace, directly under
//! the cgroup v2 root, made with the node and removed with it; it never holds a process
//! the lab did not start in the node's namespace, as the agent checks.

use std::{path::PathBuf, process::Command};

use sluice_netns::{Cgroup, NetNs, cgroup2_root};

use crate::{Lab, LabError};

impl Lab {
    /// The cgroup of `node`'s own processes.
    pub fn node_cgroup(&self, node: &str) -> Result<PathBuf, LabError> {
        Ok(cgroup2_root()?.join(self.node_netns(node)))
    }

    pub(crate) fn create_node_cgroup(&self, node: &str) -> Result<(), LabError> {
        Cgroup::create(&self.node_netns(node))?;
        Ok(())
    }

    /// Kills what runs in the node's cgroup and removes it (fine if it is gone).
    pub(crate) fn remove_node_cgroup(&self, node: &str) -> Result<(), LabError> {
        remove_cgroup(&self.node_netns(node))
    }

    /// `program` run on `node`: in the node's network namespace and cgroup, as a process of
    /// the node itself (hostNetwork).
    pub fn command_on_node(&self, node: &str, program: &str) -> Result<Command, LabError> {
        if self.state.spec.node(node).is_none() {
            return Err(LabError::NodeNotFound(node.to_owned()));
        }
        let mut command = NetNs::named(self.node_netns(node)).command(program)?;
        Cgroup::at(self.node_cgroup(node)?).enter_on_exec(&mut command)?;
        Ok(command)
    }
}

/// Removes the cgroup named `name` (a node's namespace name), for `lab down`, which knows
/// the namespaces but perhaps not the nodes.
pub(crate) fn remove_cgroup(name: &str) -> Result<(), LabError> {
    Cgroup::at(cgroup2_root()?.join(name)).remove()?;
    Ok(())
}
