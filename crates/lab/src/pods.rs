//! Pods and world hosts as processes: their namespaces and links, their servers, readiness
//! and stopping.

use std::{fs, path::Path, thread, time::Instant};

use sluice_netns::{Cgroup, NetNs, Route};

use crate::{
    CHANGE_TIMEOUT, Lab, LabError, LogTail, NodeSpec, POLL, STOP_GRACE, WorldAttach, WorldHostSpec,
    error::io_err,
    journal::{journal_netns, remove_tree},
    lifecycle::require_binary,
    names, net,
    process::{self, Detached},
    state::{LabState, PodRecord},
};

/// Waits for a server started by [`Lab::spawn_server`] to write `<dir>/ready`; what went
/// wrong if it does not.
fn wait_server(dir: &Path, server: &Detached, deadline: Instant) -> Option<String> {
    loop {
        if dir.join("ready").exists() {
            return None;
        }
        if let Some(status) = server.exited() {
            return Some(format!("exited ({status}) before binding its ports"));
        }
        if Instant::now() > deadline {
            return Some(format!("did not bind its ports within {CHANGE_TIMEOUT:?}"));
        }
        thread::sleep(POLL);
    }
}

impl Lab {
    /// Creates the pods' namespaces and links, starts their servers and waits until every
    /// one is ready. On failure the pods started so far are removed again.
    pub(crate) fn start_pods(&self, state: &mut LabState, keys: &[String]) -> Result<(), LabError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut started: Vec<(String, Detached)> = Vec::new();
        // Pods whose namespace this call created: the rollback below removes exactly those.
        let mut created: Vec<&PodRecord> = Vec::new();
        let result = keys.iter().try_for_each(|k| {
            let record = state
                .pods
                .get(k)
                .ok_or_else(|| LabError::PodNotFound(k.clone()))?;
            started.push((k.clone(), self.start_pod(state, record, &mut created)?));
            Ok(())
        });
        let result = result.and_then(|()| self.wait_ready(state, &started));
        if let Err(e) = result {
            for record in created {
                // Best effort: the error that stopped the apply is the one to report.
                let _ = self.stop_pod(record);
            }
            return Err(e);
        }
        for (k, _) in &started {
            if let Some(p) = state.pods.get_mut(k) {
                p.ready = true;
            }
        }
        Ok(())
    }

    fn start_pod<'a>(
        &self,
        state: &LabState,
        record: &'a PodRecord,
        created: &mut Vec<&'a PodRecord>,
    ) -> Result<Detached, LabError> {
        require_binary(&self.opts.binaries.sluice, "sluice", "SLUICE_BIN")?;
        let node = state
            .spec
            .node(&record.node)
            .ok_or_else(|| LabError::NodeNotFound(record.node.clone()))?;
        if NetNs::named(record.netns.as_str()).exists() {
            return Err(LabError::NetnsExists(record.netns.clone()));
        }
        journal_netns(&self.dir, &record.netns)?;
        NetNs::create(&record.netns)?;
        created.push(record);
        net::setup_pod(&net::PodLink {
            lab: &state.name,
            node_netns: &self.node_netns(&node.name),
            pod_netns: &record.netns,
            interface: &record.interface,
            ip: record.ip,
            router: node.router_ip(),
            tx_checksum_offload: state.spec.tx_checksum_offload,
            mtu: state.spec.pod_mtu(),
        })?;
        let dir = self.pod_dir(record);
        fs::create_dir_all(&dir).map_err(io_err("mkdir", &dir))?;
        let cgroup = self.create_pod_cgroup(record)?;
        let (tcp, udp) = record.ports();
        self.spawn_server(
            &record.netns,
            Some(&cgroup),
            record.name(),
            &tcp,
            &udp,
            &dir,
        )
    }

    /// Creates every world host's namespace and link to its node, starts its server and
    /// waits until all of them serve.
    pub(crate) fn start_world(&self) -> Result<(), LabError> {
        if !self.state.spec.world.is_empty() {
            require_binary(&self.opts.binaries.sluice, "sluice", "SLUICE_BIN")?;
        }
        let mut started = Vec::new();
        for host in &self.state.spec.world {
            let netns = names::world_netns(&self.state.name, &host.name);
            journal_netns(&self.dir, &netns)?;
            NetNs::create(&netns)?;
            self.wire_world_host(host, &netns)?;
            let dir = self.dir.join("world").join(&host.name);
            fs::create_dir_all(&dir).map_err(io_err("mkdir", &dir))?;
            let (tcp, udp) = host.ports();
            let server = self.spawn_server(&netns, None, &host.name, &tcp, &udp, &dir)?;
            started.push((host.name.clone(), dir, server));
        }
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        for (host, dir, server) in &started {
            if let Some(problem) = wait_server(dir, server, deadline) {
                let log = dir.join("server.log");
                return Err(LabError::WorldServer {
                    host: host.clone(),
                    problem,
                    tail: LogTail::of(&log),
                    log,
                });
            }
        }
        Ok(())
    }

    /// A world host's link: a veth to its node as a pod has, a veth to the router in front
    /// of the nodes, or a port of the underlay bridge with a route to every node's pod CIDR
    /// via that node, as a native underlay routes them (and to the hosts behind the router
    /// via the router).
    fn wire_world_host(&self, host: &WorldHostSpec, netns: &str) -> Result<(), LabError> {
        let spec = &self.state.spec;
        match (&host.attach, spec.underlay) {
            (WorldAttach::Underlay, Some(underlay)) => {
                net::join_underlay(&net::UnderlayLink {
                    lab: &self.state.name,
                    underlay_netns: &self.underlay_netns(),
                    netns,
                    port: &names::world_interface(&host.name),
                    device: "eth0",
                    address: host.address,
                    cidr: underlay.cidr,
                    mtu: underlay.mtu,
                })?;
                for node in &spec.nodes {
                    self.route_to_node(netns, node, false)?;
                }
                self.routes_behind_router(netns)
            }
            (WorldAttach::Underlay | WorldAttach::Router, None) => {
                Err(LabError::NoUnderlay(self.state.name.clone()))
            }
            (WorldAttach::Router, Some(_)) => self.wire_behind_router(host, netns),
            (WorldAttach::Node(name), _) => {
                let node = spec
                    .node(name)
                    .ok_or_else(|| LabError::NodeNotFound(name.clone()))?;
                net::setup_world(&net::WorldLink {
                    lab: &self.state.name,
                    node_netns: &self.node_netns(&node.name),
                    world_netns: netns,
                    interface: &names::world_interface(&host.name),
                    address: host.address,
                    router: node.router_ip(),
                    mtu: spec.pod_mtu(),
                })
            }
        }
    }

    /// In a world host on the underlay: `node`'s pod CIDR via its underlay address (added,
    /// or with `remove` deleted as the node leaves).
    pub(crate) fn route_to_node(
        &self,
        netns: &str,
        node: &NodeSpec,
        remove: bool,
    ) -> Result<(), LabError> {
        let Some(address) = node.underlay_address else {
            return Ok(());
        };
        let route = Route::via(node.pod_cidr, address).dev("eth0");
        if remove {
            net::delete_route(netns, &route)
        } else {
            net::add_route(netns, &route)
        }
    }

    /// Starts `sluice lab pod-server` in `netns` (and a pod's in its `cgroup`); it writes
    /// `<dir>/ready` once it serves and logs to `<dir>/server.log`.
    fn spawn_server(
        &self,
        netns: &str,
        cgroup: Option<&Cgroup>,
        name: &str,
        tcp: &[u16],
        udp: &[u16],
        dir: &Path,
    ) -> Result<Detached, LabError> {
        let ready = dir.join("ready");
        if ready.exists() {
            fs::remove_file(&ready).map_err(io_err("unlink", &ready))?;
        }
        let list = |ports: &[u16]| {
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        // In the namespace from exec on: a pod's cgroup never holds a process of the host's.
        let mut cmd = NetNs::named(netns).command(&self.opts.binaries.sluice)?;
        if let Some(cgroup) = cgroup {
            cgroup.enter_on_exec(&mut cmd)?;
        }
        cmd.args(["lab", "pod-server", "--netns", netns, "--name", name]);
        if !tcp.is_empty() {
            cmd.arg("--tcp").arg(list(tcp));
        }
        if !udp.is_empty() {
            cmd.arg("--udp").arg(list(udp));
        }
        cmd.arg("--ready-file").arg(&ready);
        process::spawn_detached(cmd, &dir.join("server.log"))
    }

    fn wait_ready(&self, state: &LabState, started: &[(String, Detached)]) -> Result<(), LabError> {
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        for (k, server) in started {
            let Some(record) = state.pods.get(k) else {
                continue;
            };
            let dir = self.pod_dir(record);
            if let Some(problem) = wait_server(&dir, server, deadline) {
                let log = dir.join("server.log");
                return Err(LabError::PodServer {
                    pod: k.clone(),
                    problem,
                    tail: LogTail::of(&log),
                    log,
                });
            }
        }
        Ok(())
    }

    /// Stops the pod's server and removes its namespace (and with it both veth ends).
    pub(crate) fn stop_pod(&self, record: &PodRecord) -> Result<(), LabError> {
        process::kill_netns(&record.netns, STOP_GRACE)?;
        self.remove_pod_cgroup(record)?;
        NetNs::delete(&record.netns)?;
        remove_tree(&self.pod_dir(record))
    }
}
