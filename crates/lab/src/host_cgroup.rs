//! Each node's cgroup: the processes the lab runs on a node (`lab exec --node`) live in
//! it, and the node's agent attaches its socket programs to it (`--host-cgroup`), so they
//! reach ClusterIPs and NodePorts. It is named like the node's namespace, directly under
//! the cgroup v2 root, made with the node and removed with it; it never holds a process
//! the lab did not start in the node's namespace, as the agent checks.
//!
//! Beside it, `<node's namespace>-pods` is the node's pods' parent cgroup, as the kubelet's
//! kubepods is on a real node: one cgroup per pod below it (named like the pod's
//! namespace) holds the pod's server and what `lab exec <pod>` runs, and the node's agent
//! attaches the pods' socket programs to the parent (`--pod-cgroup`). A sibling, not a
//! child of the node's cgroup, so the node's programs never see a pod's socket.

use std::{path::PathBuf, process::Command};

use sluice_netns::{Cgroup, NetNs, cgroup2_root};

use crate::{Lab, LabError, state::PodRecord};

/// Ends the name of a node's pods' cgroup, after the node's namespace name.
const PODS_SUFFIX: &str = "-pods";

impl Lab {
    /// The cgroup of `node`'s own processes.
    pub fn node_cgroup(&self, node: &str) -> Result<PathBuf, LabError> {
        Ok(cgroup2_root()?.join(self.node_netns(node)))
    }

    /// The parent cgroup of `node`'s pods.
    pub fn pods_cgroup(&self, node: &str) -> Result<PathBuf, LabError> {
        Ok(cgroup2_root()?.join(pods_cgroup_name(&self.node_netns(node))))
    }

    /// The cgroup of the pod `record`, below its node's pods' cgroup.
    fn pod_cgroup(&self, record: &PodRecord) -> Result<Cgroup, LabError> {
        Ok(Cgroup::at(
            self.pods_cgroup(&record.node)?.join(&record.netns),
        ))
    }

    pub(crate) fn create_node_cgroup(&self, node: &str) -> Result<(), LabError> {
        let netns = self.node_netns(node);
        Cgroup::create(&netns)?;
        Cgroup::create(&pods_cgroup_name(&netns))?;
        Ok(())
    }

    /// Kills what runs in the node's cgroup and its pods' and removes them (fine if they
    /// are gone).
    pub(crate) fn remove_node_cgroup(&self, node: &str) -> Result<(), LabError> {
        remove_cgroup(&self.node_netns(node))
    }

    /// Creates the pod's cgroup, for its processes to enter.
    pub(crate) fn create_pod_cgroup(&self, record: &PodRecord) -> Result<Cgroup, LabError> {
        let pods = Cgroup::at(self.pods_cgroup(&record.node)?);
        Ok(pods.create_child(&record.netns)?)
    }

    /// Kills what still runs in the pod's cgroup and removes it (fine if it is gone).
    pub(crate) fn remove_pod_cgroup(&self, record: &PodRecord) -> Result<(), LabError> {
        self.pod_cgroup(record)?.remove()?;
        Ok(())
    }

    /// `program` run in `pod` (`namespace/name`): in its network namespace and cgroup, as
    /// a process of the pod, so its sockets are the pod's (socket load balancing).
    pub fn command_in_pod(&self, pod: &str, program: &str) -> Result<Command, LabError> {
        let (namespace, name) = crate::split_pod_ref(pod);
        let record = self
            .state
            .pods
            .get(&crate::state::key(namespace, name))
            .ok_or_else(|| LabError::PodNotFound(format!("{namespace}/{name}")))?;
        // Namespace first: the pods' cgroup must never hold a process of the host's.
        let mut command = NetNs::named(record.netns.as_str()).command(program)?;
        self.pod_cgroup(record)?.enter_on_exec(&mut command)?;
        Ok(command)
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

/// Removes the cgroup named `name` (a node's namespace name) and its pods' cgroup, for
/// `lab down`, which knows the namespaces but perhaps not the nodes.
pub(crate) fn remove_cgroup(name: &str) -> Result<(), LabError> {
    let root = cgroup2_root()?;
    Cgroup::at(root.join(pods_cgroup_name(name))).remove()?;
    Cgroup::at(root.join(name)).remove()?;
    Ok(())
}

fn pods_cgroup_name(node_netns: &str) -> String {
    format!("{node_netns}{PODS_SUFFIX}")
}
