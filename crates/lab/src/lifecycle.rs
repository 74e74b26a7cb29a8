//! A lab's life: `lab up` (nodes, world hosts, agents), opening it again, `lab down`, listing.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use sluice_netns::NetNs;

use crate::{
    CHANGE_TIMEOUT, Lab, LabError, LabOptions, LabSpec, PIN_ROOT, STARTUP_TIMEOUT, STOP_GRACE,
    error::io_err,
    journal::{journal_netns, lock, remove_tree},
    names, net, process, spec,
    state::LabState,
    state_dir,
    topology::UNDERLAY_DEVICE,
};

pub(crate) fn require_binary(
    path: &Path,
    what: &'static str,
    env: &'static str,
) -> Result<(), LabError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(LabError::Binary {
            what,
            path: path.to_path_buf(),
            env,
        })
    }
}

impl Lab {
    /// Creates the lab's nodes and starts their agents; waits until every agent is healthy.
    /// Fails if a lab of that name exists. On failure nothing of the lab is left behind.
    pub fn up(name: &str, lab_file: &Path, opts: &LabOptions) -> Result<Lab, LabError> {
        names::check_lab_name(name)?;
        let spec = LabSpec::load(lab_file)?;
        if let Some(agent) = &opts.binaries.agent {
            require_binary(agent, "sluice-agent", "SLUICE_AGENT_BIN")?;
        }
        // Namespace names are global to the machine, whatever the state root.
        let nodes = spec.nodes.iter().map(|n| names::node_netns(name, &n.name));
        let world = spec.world.iter().map(|w| names::world_netns(name, &w.name));
        let underlay = spec.underlay.map(|_| names::underlay_netns(name));
        let router = spec.has_router().then(|| names::router_netns(name));
        for netns in nodes.chain(world).chain(underlay).chain(router) {
            if NetNs::named(netns.as_str()).exists() {
                return Err(LabError::Exists {
                    name: name.into(),
                    path: NetNs::path_of(&netns),
                });
            }
        }
        let dir = state_dir(opts, name);
        fs::create_dir_all(&opts.state_root).map_err(io_err("mkdir", &opts.state_root))?;
        match fs::create_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(LabError::Exists {
                    name: name.into(),
                    path: dir,
                });
            }
            other => other.map_err(io_err("mkdir", &dir))?,
        }
        let started = lock(&dir, None).and_then(|lock| {
            let lab = Self::start(name, spec, dir, opts)?;
            drop(lock);
            Ok(lab)
        });
        started.inspect_err(|_| {
            // Best effort: the error that stopped `up` is the one to report.
            let _ = Self::down(name, opts);
        })
    }

    fn start(name: &str, spec: LabSpec, dir: PathBuf, opts: &LabOptions) -> Result<Lab, LabError> {
        let mut state = LabState::new(name, spec.clone(), opts.binaries.agent.is_some());
        state.generation = 1;
        for sub in ["nodes", "pods"] {
            fs::create_dir_all(dir.join(sub)).map_err(io_err("mkdir", dir.join(sub)))?;
        }
        let lab = Lab {
            dir,
            opts: opts.clone(),
            state,
        };
        if let Some(underlay) = spec.underlay {
            let netns = lab.underlay_netns();
            journal_netns(&lab.dir, &netns)?;
            NetNs::create(&netns)?;
            net::setup_underlay(name, &netns, underlay.mtu)?;
        }
        for node in &spec.nodes {
            lab.build_node(&spec, node)?;
        }
        if spec.has_router() {
            lab.build_router(&spec)?;
        }
        lab.write(&lab.state)?;
        lab.start_world()?;
        lab.start_health_checker()?;
        let mut agents = Vec::new();
        if let Some(agent) = &opts.binaries.agent {
            for node in &spec.nodes {
                let cmd = lab.agent_command(agent, &node.name)?;
                agents.push((
                    node.name.clone(),
                    process::spawn_detached(cmd, &lab.agent_log(&node.name))?,
                ));
            }
        }
        lab.wait_agents(1, STARTUP_TIMEOUT, &agents)?;
        Ok(lab)
    }

    /// `sluice-agent` for `node`, started inside the node's namespace, as a DaemonSet pod
    /// with hostNetwork runs in its node's (it is also told `--netns`, and enters it itself
    /// when started elsewhere).
    pub(crate) fn agent_command(&self, agent: &Path, node: &str) -> Result<Command, LabError> {
        let spec = &self.state.spec;
        let mut cmd = NetNs::named(self.node_netns(node)).command(agent)?;
        cmd.arg("--node")
            .arg(node)
            .arg("--netns")
            .arg(self.node_netns(node))
            .arg("--cluster-file")
            .arg(self.dir.join("cluster.json"))
            .arg("--pin-dir")
            .arg(self.pin_dir(node))
            .arg("--api-socket")
            .arg(self.agent_socket(node))
            // The lab plays the CNI plugin through its cluster file; the agent's own
            // registry stays empty, in the lab's directory, never the host's.
            .arg("--state-dir")
            .arg(self.dir.join("nodes").join(node).join("state"))
            .arg("--host-cgroup")
            .arg(self.node_cgroup(node)?)
            .arg("--pod-cgroup")
            .arg(self.pods_cgroup(node)?);
        if spec.underlay.is_some() {
            cmd.arg("--routing-mode")
                .arg(spec.routing_mode.as_str())
                .arg("--underlay-device")
                .arg(UNDERLAY_DEVICE);
        }
        if let Some(max) = spec.policy_map_max {
            cmd.arg("--policy-map-max").arg(max.to_string());
        }
        if let Some(range) = spec.node_port_range {
            cmd.arg("--node-port-range").arg(range.to_string());
        }
        if let Some(masquerade) = &spec.masquerade {
            cmd.arg("--masquerade");
            for cidr in &masquerade.non_masquerade_cidrs {
                cmd.arg("--non-masquerade-cidr").arg(cidr.to_string());
            }
        }
        let observability = &spec.observability;
        if observability.metrics {
            // Every address of the node's namespace, none of the root's.
            cmd.arg("--metrics-address")
                .arg(format!("0.0.0.0:{}", spec::METRICS_PORT));
        }
        if let Some(mode) = &observability.policy_log {
            cmd.arg("--policy-log")
                .arg(mode)
                .arg("--policy-log-file")
                .arg(self.policy_log(node));
            if let Some(rate) = observability.policy_log_rate {
                cmd.arg("--policy-log-rate").arg(rate.to_string());
            }
        }
        Ok(cmd)
    }

    /// A lab made by an earlier `up`, possibly in another process.
    pub fn open(name: &str, opts: &LabOptions) -> Result<Lab, LabError> {
        names::check_lab_name(name)?;
        let dir = state_dir(opts, name);
        let path = dir.join("lab.json");
        if !path.exists() {
            return Err(LabError::NotFound {
                name: name.into(),
                path,
            });
        }
        let state = LabState::read(&path)?;
        Ok(Lab {
            dir,
            opts: opts.clone(),
            state,
        })
    }

    /// Stops every process of the lab and removes its namespaces, pins and files. Works from
    /// what is on the machine, not only from `lab.json`, so a damaged or half-made lab goes
    /// too; a lab that does not exist is not an error.
    pub fn down(name: &str, opts: &LabOptions) -> Result<(), LabError> {
        names::check_lab_name(name)?;
        let dir = state_dir(opts, name);
        // A command stuck with the lock must not keep the lab alive forever.
        let _lock = dir
            .is_dir()
            .then(|| lock(&dir, Some(CHANGE_TIMEOUT)).ok())
            .flatten();

        let prefix = names::netns_prefix(name);
        let mut netns: BTreeSet<String> = fs::read_to_string(dir.join("netns"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .map(String::from)
            .collect();
        if let Ok(state) = LabState::read(&dir.join("lab.json")) {
            netns.extend(state.netns_names());
        }
        // Namespaces neither file knows (both lost): the prefix also matches other labs
        // (`demo` and `demo-2`), so only those with this lab's alias count.
        for candidate in NetNs::list_with_prefix(&prefix) {
            if !netns.contains(&candidate) && net::has_alias(&candidate, name) {
                netns.insert(candidate);
            }
        }
        let mut errors = Vec::new();
        for ns in &netns {
            if let Err(e) = process::kill_netns(ns, STOP_GRACE) {
                errors.push(e);
            }
        }
        // Nodes' cgroups carry their namespace's name; other namespaces have none.
        for ns in &netns {
            if let Err(e) = crate::host_cgroup::remove_cgroup(ns) {
                errors.push(e);
            }
        }
        for ns in &netns {
            if let Err(e) = NetNs::delete(ns) {
                errors.push(e.into());
            }
        }
        if let Err(e) = remove_tree(&Path::new(PIN_ROOT).join(name)) {
            errors.push(e);
        }
        // Only once empty: other labs may be using it.
        let _ = fs::remove_dir(PIN_ROOT);
        if let Some(e) = errors.into_iter().next() {
            // Keep the state so that another `down` can retry.
            return Err(e);
        }
        remove_tree(&dir)
    }

    /// Names of the labs under the state root.
    pub fn list(opts: &LabOptions) -> Result<Vec<String>, LabError> {
        let entries = match fs::read_dir(&opts.state_root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(LabError::Io {
                    call: "read_dir",
                    path: opts.state_root.clone(),
                    source: e,
                });
            }
        };
        let mut labs: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().join("lab.json").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        labs.sort();
        Ok(labs)
    }
}
