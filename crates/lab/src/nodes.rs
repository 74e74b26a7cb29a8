//! A lab's nodes: each one's namespace and underlay link, and adding and removing nodes
//! while the lab runs (`lab node add|remove`, or `lab up -f` again with a changed file).

use std::{collections::BTreeSet, fs, net::Ipv4Addr, path::Path, time::Instant};

use sluice_netns::{Ipv4Net, NetNs, Route};

use crate::{
    CHANGE_TIMEOUT, Lab, LabError, LabSpec, NodeSpec, PIN_ROOT, STARTUP_TIMEOUT, STOP_GRACE,
    WorldAttach,
    error::io_err,
    journal::{journal_netns, lock, remove_tree},
    names, net, plan, process,
    spec::router_address,
    state::now,
    topology::{self, UNDERLAY_DEVICE},
};

impl Lab {
    /// A node's namespace: forwarding and its router address as today, its link to the
    /// underlay, and routes to the world hosts that are not behind it.
    pub(crate) fn build_node(&self, spec: &LabSpec, node: &NodeSpec) -> Result<(), LabError> {
        let lab = &self.state.name;
        let netns = self.node_netns(&node.name);
        journal_netns(&self.dir, &netns)?;
        NetNs::create(&netns)?;
        self.create_node_cgroup(&node.name)?;
        net::setup_node(lab, &netns, node.router_ip())?;
        if let (Some(underlay), Some(address)) = (spec.underlay, node.underlay_address) {
            net::join_underlay(&net::UnderlayLink {
                lab,
                underlay_netns: &self.underlay_netns(),
                netns: &netns,
                port: &names::underlay_port(&node.name),
                device: UNDERLAY_DEVICE,
                address,
                cidr: underlay.cidr,
                mtu: underlay.mtu,
            })?;
            for host in &spec.world {
                let to = Ipv4Net::from(host.address);
                let route = match &host.attach {
                    WorldAttach::Underlay => Route::device(to, UNDERLAY_DEVICE),
                    WorldAttach::Router => match router_address(spec) {
                        Some(router) => Route::via(to, router).dev(UNDERLAY_DEVICE),
                        None => continue,
                    },
                    WorldAttach::Node(behind) if *behind == node.name => continue,
                    WorldAttach::Node(behind) => {
                        match spec.node(behind).and_then(|n| n.underlay_address) {
                            Some(via) => Route::via(to, via).dev(UNDERLAY_DEVICE),
                            None => continue,
                        }
                    }
                };
                net::add_route(&netns, &route)?;
            }
        }
        let dir = self.dir.join("nodes").join(&node.name);
        fs::create_dir_all(&dir).map_err(io_err("mkdir", &dir))
    }

    /// Adds a node to the running lab: its namespace, underlay link and agent; its Node
    /// object in the snapshot; returns once every agent, the new one included, realized it.
    /// Without `underlay_address` it gets the lowest free one from `network + 11`. A node
    /// the lab's rules refuse changes nothing.
    pub fn add_node(&mut self, node: NodeSpec) -> Result<(), LabError> {
        let _lock = lock(&self.dir, None)?;
        self.reload()?;
        self.add_node_locked(node)
    }

    /// Removes a node from the running lab: its pods terminate first (out of every agent's
    /// dataplane, then stopped), then its agent stops and its namespace, pins and Node
    /// object go, and Deployments replace their pods on the other nodes; returns once every
    /// remaining agent realized that. The last node, and a
    /// node a world host hangs off, are refused.
    pub fn remove_node(&mut self, name: &str) -> Result<(), LabError> {
        let _lock = lock(&self.dir, None)?;
        self.reload()?;
        self.check_removable(name)?;
        self.remove_node_locked(name)
    }

    /// `lab up -f` on a running lab: adds the nodes the file has and the lab not, removes
    /// those the lab has and the file not. Only nodes may change, and a node that stays
    /// keeps its pod CIDR, zone and underlay address; everything is checked before anything
    /// changes.
    pub fn reapply(&mut self, lab_file: &Path) -> Result<(), LabError> {
        let (wanted, explicit) = LabSpec::load_explicit(lab_file)?;
        let _lock = lock(&self.dir, None)?;
        self.reload()?;
        let current = self.state.spec.clone();
        check_same_but_nodes(lab_file, &current, &wanted)?;
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for (i, node) in wanted.nodes.iter().enumerate() {
            match current.node(&node.name) {
                None => add.push(node.clone()),
                Some(have) if have.pod_cidr != node.pod_cidr => {
                    return Err(LabError::LabFile {
                        path: lab_file.to_path_buf(),
                        field: format!("nodes[{i}].podCIDR"),
                        message: format!(
                            "node {} runs with podCIDR {}; remove it before giving it another",
                            node.name, have.pod_cidr
                        ),
                    });
                }
                // Its agent and the slices of its pods' services hold the zone it started in.
                Some(have) if have.zone != node.zone => {
                    return Err(LabError::LabFile {
                        path: lab_file.to_path_buf(),
                        field: format!("nodes[{i}].zone"),
                        message: format!(
                            "node {} runs in zone {}; remove it before giving it another",
                            node.name,
                            have.zone.as_deref().unwrap_or("(none)")
                        ),
                    });
                }
                Some(_) => {}
            }
        }
        for node in &current.nodes {
            if wanted.node(&node.name).is_none() {
                remove.push(node.name.clone());
            }
        }
        // The whole change, checked as one: the nodes that stay, then the new ones with the
        // addresses they will get.
        let mut target = current.clone();
        target.nodes.retain(|n| !remove.contains(&n.name));
        for node in &mut add {
            // The file's default address is its position there; a running lab hands out
            // the lowest free one instead, so the nodes that stay keep theirs.
            if !explicit.contains(&node.name) {
                node.underlay_address = None;
            }
            target = self.with_node(&target, node.clone())?;
        }
        for name in &remove {
            Self::removable(&target, name)?;
        }
        for name in &remove {
            self.remove_node_locked(name)?;
        }
        for node in add {
            let node = target.node(&node.name).cloned().unwrap_or(node);
            self.add_node_locked(node)?;
        }
        Ok(())
    }

    fn add_node_locked(&mut self, node: NodeSpec) -> Result<(), LabError> {
        let spec = self.with_node(&self.state.spec, node)?;
        let Some(node) = spec.nodes.last().cloned() else {
            return Ok(());
        };
        let netns = self.node_netns(&node.name);
        if NetNs::named(netns.as_str()).exists() {
            return Err(LabError::NetnsExists(netns));
        }
        let before = self.state.clone();
        let started = self.start_node(spec, &node);
        if started.is_err() {
            // Best effort: the error that stopped the add is the one to report.
            let _ = self.teardown_node(&node.name);
            if self.state.spec.node(&node.name).is_some() {
                let mut state = self.state.clone();
                state.spec.nodes = before.spec.nodes;
                let _ = self.commit(state);
            }
        }
        started
    }

    fn start_node(&mut self, spec: LabSpec, node: &NodeSpec) -> Result<(), LabError> {
        self.build_node(&spec, node)?;
        let mut state = self.state.clone();
        state.spec = spec;
        self.commit(state)?;
        // Once the node is in the state, so that a rollback's teardown removes these too.
        if self.state.spec.has_router() {
            self.router_route_to_node(node, false)?;
        }
        for host in &self.state.spec.world {
            if host.attach == WorldAttach::Underlay {
                let world = names::world_netns(&self.state.name, &host.name);
                self.route_to_node(&world, node, false)?;
            }
        }
        let mut agents = Vec::new();
        if let Some(agent) = self.opts.binaries.agent.clone() {
            let cmd = self.agent_command(&agent, &node.name)?;
            agents.push((
                node.name.clone(),
                process::spawn_detached(cmd, &self.agent_log(&node.name))?,
            ));
        }
        self.wait_agents(self.state.generation, STARTUP_TIMEOUT, &agents)?;
        Ok(())
    }

    /// `spec` with `node` added last, if the lab's rules take it; refused naming the node
    /// and its field otherwise.
    fn with_node(&self, spec: &LabSpec, mut node: NodeSpec) -> Result<LabSpec, LabError> {
        let Some(underlay) = spec.underlay else {
            return Err(LabError::NoUnderlay(self.state.name.clone()));
        };
        let invalid = |field: &str, message: String| LabError::InvalidNode {
            node: node.name.clone(),
            field: field.to_string(),
            message,
        };
        let netns = self.node_netns(&node.name);
        if let Some(host) = spec
            .world
            .iter()
            .find(|w| node.name == format!("world-{}", w.name))
        {
            return Err(invalid(
                "name",
                format!("its network namespace would be world host {}'s", host.name),
            ));
        }
        if let Some(pod) = self.state.pods.values().find(|p| p.netns == netns) {
            return Err(invalid(
                "name",
                format!(
                    "its network namespace {netns} is pod {}/{}'s",
                    pod.namespace(),
                    pod.name()
                ),
            ));
        }
        if node.underlay_address.is_none() {
            let used: BTreeSet<Ipv4Addr> = spec
                .nodes
                .iter()
                .filter_map(|n| n.underlay_address)
                .chain(spec.world.iter().map(|w| w.address))
                .collect();
            node.underlay_address = underlay.free_address(&used);
        }
        let mut candidate = spec.clone();
        candidate.nodes.push(node.clone());
        let last = candidate.nodes.len() - 1;
        let names: Vec<String> = candidate.nodes.iter().map(|n| n.name.clone()).collect();
        let field_of = |i: usize, f: &str| match (i == last, f.is_empty()) {
            (true, _) => f.to_string(),
            (false, true) => format!("node {}", names[i]),
            (false, false) => format!("{f} of node {}", names[i]),
        };
        topology::check_nodes(&candidate, &field_of).map_err(|(f, m)| invalid(&f, m))?;
        Ok(candidate)
    }

    fn check_removable(&self, name: &str) -> Result<(), LabError> {
        if self.state.spec.node(name).is_none() {
            return Err(LabError::NodeNotFound(name.to_string()));
        }
        let mut rest = self.state.spec.clone();
        rest.nodes.retain(|n| n.name != name);
        Self::removable(&rest, name)
    }

    /// Whether `name` may go, leaving the nodes of `rest`.
    fn removable(rest: &LabSpec, name: &str) -> Result<(), LabError> {
        if rest.nodes.is_empty() {
            return Err(LabError::LastNode(name.to_string()));
        }
        if let Some(host) = rest
            .world
            .iter()
            .find(|w| w.attach == WorldAttach::Node(name.to_string()))
        {
            return Err(LabError::NodeInUse {
                node: name.to_string(),
                host: host.name.clone(),
            });
        }
        Ok(())
    }

    fn remove_node_locked(&mut self, name: &str) -> Result<(), LabError> {
        let keys: Vec<String> = self
            .state
            .pods
            .iter()
            .filter(|(_, p)| p.node == name)
            .map(|(k, _)| k.clone())
            .collect();
        if !keys.is_empty() {
            // As a drained node's pods: terminating until every agent has realized it.
            let mut state = self.state.clone();
            let when = now();
            for k in &keys {
                if let Some(p) = state.pods.get_mut(k) {
                    p.deleting.get_or_insert_with(|| when.clone());
                }
            }
            self.commit(state)?;
            self.wait_agents(self.state.generation, CHANGE_TIMEOUT, &[])?;
        }
        let mut state = self.state.clone();
        let mut result = Ok(());
        for k in &keys {
            let Some(record) = state.pods.get(k).cloned() else {
                continue;
            };
            result = self.stop_pod(&record);
            if result.is_err() {
                break;
            }
            state.pods.remove(k);
        }
        if result.is_ok() {
            result = self.teardown_node(name);
        }
        if result.is_ok() {
            state.spec.nodes.retain(|n| n.name != name);
        }
        self.commit(state)?;
        result?;
        self.wait_agents(self.state.generation, CHANGE_TIMEOUT, &[])?;
        // Deployments get their replicas back on the remaining nodes.
        let plan = plan::reconcile_deployments(&self.state)?;
        if !plan.create.is_empty() {
            self.execute(plan, Instant::now())?;
        }
        Ok(())
    }

    /// Stops the node's agent and removes its namespace (its underlay link goes with it),
    /// pins and files, then the world hosts' routes to it.
    fn teardown_node(&self, name: &str) -> Result<(), LabError> {
        let netns = self.node_netns(name);
        process::kill_netns(&netns, STOP_GRACE)?;
        self.remove_node_cgroup(name)?;
        // The namespace's links go with it only later, from the kernel's cleanup work; the
        // underlay port is removed now so the node can be added again at once.
        if self.state.spec.underlay.is_some() {
            net::leave_underlay(
                &names::underlay_netns(&self.state.name),
                &names::underlay_port(name),
            )?;
        }
        if NetNs::named(netns.as_str()).exists() {
            NetNs::delete(&netns)?;
        }
        remove_tree(&Path::new(PIN_ROOT).join(&self.state.name).join(name))?;
        remove_tree(&self.dir.join("nodes").join(name))?;
        let spec = &self.state.spec;
        let Some(node) = spec.node(name) else {
            return Ok(());
        };
        if spec.has_router() {
            self.router_route_to_node(node, true)?;
        }
        for host in spec
            .world
            .iter()
            .filter(|w| w.attach == WorldAttach::Underlay)
        {
            let world = names::world_netns(&self.state.name, &host.name);
            self.route_to_node(&world, node, true)?;
        }
        Ok(())
    }
}

/// A re-applied lab file may change its nodes only: anything else is refused, naming the
/// first field that differs.
fn check_same_but_nodes(path: &Path, current: &LabSpec, wanted: &LabSpec) -> Result<(), LabError> {
    let differs = [
        ("serviceCIDR", current.service_cidr != wanted.service_cidr),
        ("clusterCIDR", current.cluster_cidr != wanted.cluster_cidr),
        ("routingMode", current.routing_mode != wanted.routing_mode),
        ("underlay", current.underlay != wanted.underlay),
        (
            "txChecksumOffload",
            current.tx_checksum_offload != wanted.tx_checksum_offload,
        ),
        ("world", current.world != wanted.world),
        (
            "policyMapMax",
            current.policy_map_max != wanted.policy_map_max,
        ),
        (
            "nodePortRange",
            current.node_port_range != wanted.node_port_range,
        ),
        (
            "observability",
            current.observability != wanted.observability,
        ),
        (
            "loadBalancer",
            current.load_balancer != wanted.load_balancer,
        ),
        ("masquerade", current.masquerade != wanted.masquerade),
    ];
    match differs.iter().find(|(_, d)| *d) {
        Some((field, _)) => Err(LabError::LabFile {
            path: path.to_path_buf(),
            field: (*field).to_string(),
            message: "differs from the running lab's; only nodes change on a running lab (`lab down` and `lab up` for the rest)".into(),
        }),
        None => Ok(()),
    }
}
