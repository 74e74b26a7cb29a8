//! `sluice lab`: a local cluster built from ordinary Kubernetes YAML. Nodes and pods are
//! network namespaces on this machine, every pod serves its containerPorts, and one agent
//! per node runs the real dataplane against them.
//!
//! The lab plays the API server (validation, ClusterIP allocation), the controllers
//! (Deployment pods, EndpointSlices), the scheduler, the kubelet and the CNI plugin. Its state
//! lives in `<state_root>/<lab>/lab.json`; what the agents read is `cluster.json`.

mod error;
mod ipam;
mod names;
mod net;
mod plan;
mod probe;
mod process;
mod server;
mod slices;
mod spec;
mod state;

use std::{
    collections::BTreeSet,
    env,
    fs::{self, File},
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use sluice_api::Client;

pub use error::{LabError, LogTail};
pub use probe::{Probe, ProbeMatrix, ProbeOptions, ProbeRequest, Protocol, Via};
pub use server::serve_pod;
pub use spec::{LabSpec, METRICS_PORT, NodeSpec, Observability, WorldHostSpec, WorldPort};

use crate::{
    error::io_err,
    plan::Plan,
    process::Detached,
    state::{LabState, PodRecord},
};

/// Where the agents pin their maps and links: `<PIN_ROOT>/<lab>/<node>`.
const PIN_ROOT: &str = "/sys/fs/bpf/sluice";
/// How long agents get to realize a change, and pod servers to bind their ports.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Agents load the datapath before their first generation, which takes longer.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);
/// How long a metrics scrape may take, connection included.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The programs the lab starts.
#[derive(Clone, Debug)]
pub struct LabBinaries {
    /// Runs the pod servers as `sluice lab pod-server ...`.
    pub sluice: PathBuf,
    /// None: no dataplane at all (bare routing), for tests and benchmarks.
    pub agent: Option<PathBuf>,
}

impl LabBinaries {
    /// SLUICE_BIN / SLUICE_AGENT_BIN, else `sluice` / `sluice-agent` next to the current
    /// executable. Whether they exist is checked when the lab starts them.
    pub fn discover() -> Result<Self, LabError> {
        let exe = env::current_exe().map_err(io_err("current_exe", "/proc/self/exe"))?;
        let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        let find =
            |var: &str, name: &str| env::var_os(var).map_or_else(|| dir.join(name), PathBuf::from);
        Ok(Self {
            sluice: find("SLUICE_BIN", "sluice"),
            agent: Some(find("SLUICE_AGENT_BIN", "sluice-agent")),
        })
    }
}

#[derive(Clone, Debug)]
pub struct LabOptions {
    pub binaries: LabBinaries,
    /// Labs live in `<state_root>/<lab>/` (the CLI uses /run/sluice/labs).
    pub state_root: PathBuf,
}

/// What `lab apply` / `lab delete` did.
#[derive(Clone, Debug, Serialize)]
pub struct ApplyReport {
    /// kubectl's lines: "deployment.apps/nginx-deployment created".
    pub lines: Vec<String>,
    /// Generation of `cluster.json` after the call.
    pub generation: u64,
    /// From the start of the call until every agent had realized the final generation: for a
    /// new backend, the time from `lab apply` until it can receive traffic.
    pub realized_in: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub ready: bool,
    /// `Running` or `Terminating`, as kubectl shows it.
    pub status: String,
    pub ip: Option<Ipv4Addr>,
    pub node: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    /// ClusterIP, NodePort, LoadBalancer or ExternalName.
    pub kind: String,
    /// The address, `None` for a headless service, empty for ExternalName.
    pub cluster_ip: String,
    /// `80/TCP,53/UDP` (`80:30080/TCP` with a nodePort).
    pub ports: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointsView {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints as `ip:port,...`, like `kubectl get endpoints`; empty if none.
    pub endpoints: String,
}

/// A host outside the cluster, as `lab get world` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct WorldHostView {
    pub name: String,
    pub address: Ipv4Addr,
    pub node: String,
    /// `80/TCP,53/UDP`.
    pub ports: String,
    pub netns: String,
}

/// A lab that exists on this machine.
pub struct Lab {
    dir: PathBuf,
    opts: LabOptions,
    state: LabState,
}

fn state_dir(opts: &LabOptions, name: &str) -> PathBuf {
    opts.state_root.join(name)
}

/// Takes the lab's lock file exclusively (held until the returned value drops); with `wait`,
/// gives up after that long.
fn lock(dir: &Path, wait: Option<Duration>) -> Result<Flock<File>, LabError> {
    let path = dir.join("lock");
    let deadline = wait.map(|w| Instant::now() + w);
    loop {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let arg = if deadline.is_some() {
            FlockArg::LockExclusiveNonblock
        } else {
            FlockArg::LockExclusive
        };
        match Flock::lock(file, arg) {
            Ok(lock) => return Ok(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK))
                if deadline.is_some_and(|d| Instant::now() < d) =>
            {
                thread::sleep(POLL);
            }
            Err((_, source)) => {
                return Err(LabError::Sys {
                    call: "flock",
                    source,
                });
            }
        }
    }
}

/// Records a namespace name before it is created, so `lab down` finds it even when
/// `lab.json` never learned about it.
fn journal_netns(dir: &Path, netns: &str) -> Result<(), LabError> {
    let path = dir.join("netns");
    let mut f = File::options()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    writeln!(f, "{netns}").map_err(io_err("write", &path))?;
    f.sync_data().map_err(io_err("fsync", &path))
}

fn remove_tree(path: &Path) -> Result<(), LabError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LabError::Io {
            call: "remove_dir_all",
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn require_binary(path: &Path, what: &'static str, env: &'static str) -> Result<(), LabError> {
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

fn split_pod_ref(pod: &str) -> (&str, &str) {
    pod.split_once('/').unwrap_or(("default", pod))
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
        for netns in nodes.chain(world) {
            if net::netns_exists(&netns) {
                return Err(LabError::Exists {
                    name: name.into(),
                    path: net::netns_path(&netns),
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
        for node in &spec.nodes {
            let netns = names::node_netns(name, &node.name);
            journal_netns(&dir, &netns)?;
            net::add_netns(&netns)?;
            net::setup_node(name, &netns, node.router_ip())?;
            let node_dir = dir.join("nodes").join(&node.name);
            fs::create_dir_all(&node_dir).map_err(io_err("mkdir", &node_dir))?;
        }
        let lab = Lab {
            dir,
            opts: opts.clone(),
            state,
        };
        lab.write(&lab.state)?;
        lab.start_world()?;
        let mut agents = Vec::new();
        if let Some(agent) = &opts.binaries.agent {
            for node in &spec.nodes {
                let mut cmd = Command::new(agent);
                cmd.arg("--node")
                    .arg(&node.name)
                    .arg("--netns")
                    .arg(lab.node_netns(&node.name))
                    .arg("--cluster-file")
                    .arg(lab.dir.join("cluster.json"))
                    .arg("--pin-dir")
                    .arg(lab.pin_dir(&node.name))
                    .arg("--api-socket")
                    .arg(lab.agent_socket(&node.name));
                if let Some(max) = spec.policy_map_max {
                    cmd.arg("--policy-map-max").arg(max.to_string());
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
                        .arg(lab.policy_log(&node.name));
                    if let Some(rate) = observability.policy_log_rate {
                        cmd.arg("--policy-log-rate").arg(rate.to_string());
                    }
                }
                agents.push((
                    node.name.clone(),
                    process::spawn_detached(cmd, &lab.agent_log(&node.name))?,
                ));
            }
        }
        lab.wait_agents(1, STARTUP_TIMEOUT, &agents)?;
        Ok(lab)
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

    /// `kubectl apply -f`: creates or updates the objects in `paths` (files or directories).
    /// The whole input is validated first; if anything is wrong, nothing changes.
    pub fn apply(&mut self, paths: &[PathBuf]) -> Result<ApplyReport, LabError> {
        let started = Instant::now();
        let manifests = sluice_sources::load_paths(paths)?;
        let _lock = lock(&self.dir, None)?;
        self.reload()?;
        let plan = plan::apply(&self.state, &manifests)?;
        self.execute(plan, started)
    }

    /// `kubectl delete -f`: every object named must exist, else nothing is deleted. Pods
    /// terminate gracefully: they leave the dataplane before their server stops.
    pub fn delete(&mut self, paths: &[PathBuf]) -> Result<ApplyReport, LabError> {
        let started = Instant::now();
        let manifests = sluice_sources::load_paths(paths)?;
        let _lock = lock(&self.dir, None)?;
        self.reload()?;
        let plan = plan::delete(&self.state, &manifests)?;
        self.execute(plan, started)
    }

    pub fn pods(&self) -> Vec<PodView> {
        self.state
            .pods
            .values()
            .map(|p| PodView {
                namespace: p.namespace().into(),
                name: p.name().into(),
                ready: p.ready && p.deleting.is_none(),
                status: if p.deleting.is_some() {
                    "Terminating"
                } else {
                    "Running"
                }
                .into(),
                ip: Some(p.ip),
                node: p.node.clone(),
            })
            .collect()
    }

    pub fn services(&self) -> Vec<ServiceView> {
        self.state
            .services
            .values()
            .map(|s| {
                let spec = s.object.spec.clone().unwrap_or_default();
                let ports = spec
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| {
                        let proto = slices::protocol(p.protocol.as_ref());
                        match p.node_port {
                            Some(np) => format!("{}:{np}/{proto}", p.port),
                            None => format!("{}/{proto}", p.port),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                ServiceView {
                    namespace: s.object.metadata.namespace.clone().unwrap_or_default(),
                    name: s.object.metadata.name.clone().unwrap_or_default(),
                    kind: spec.type_.unwrap_or_else(|| "ClusterIP".into()),
                    cluster_ip: spec.cluster_ip.unwrap_or_default(),
                    ports,
                }
            })
            .collect()
    }

    pub fn endpoints(&self) -> Vec<EndpointsView> {
        let pods = self.state.pod_objects();
        let all = self.state.endpoint_slices(&pods);
        self.state
            .services
            .values()
            .map(|s| {
                let namespace = s.object.metadata.namespace.clone().unwrap_or_default();
                let name = s.object.metadata.name.clone().unwrap_or_default();
                let mut endpoints = Vec::new();
                let of_service = all.iter().filter(|slice| {
                    slice.metadata.namespace.as_deref() == Some(&namespace)
                        && slice
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(slices::SERVICE_NAME_LABEL))
                            == Some(&name)
                });
                for slice in of_service {
                    // An unset `ready` means ready, per the EndpointSlice API.
                    let ready = slice
                        .endpoints
                        .iter()
                        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true));
                    let ports: Vec<i32> = slice
                        .ports
                        .iter()
                        .flatten()
                        .filter_map(|p| p.port)
                        .collect();
                    for address in ready.flat_map(|e| &e.addresses) {
                        let ip = address.parse().unwrap_or(Ipv4Addr::UNSPECIFIED);
                        if ports.is_empty() {
                            endpoints.push((ip, None, address.clone()));
                        }
                        endpoints.extend(
                            ports
                                .iter()
                                .map(|p| (ip, Some(*p), format!("{address}:{p}"))),
                        );
                    }
                }
                // In address order, as the Endpoints object lists them.
                endpoints.sort();
                let endpoints: Vec<String> =
                    endpoints.into_iter().map(|(_, _, text)| text).collect();
                EndpointsView {
                    namespace,
                    name,
                    endpoints: endpoints.join(","),
                }
            })
            .collect()
    }

    /// A Command that runs `program` inside the pod's network namespace (`namespace/name`, or
    /// `name` in `default`), keeping the host's /sys and bpffs.
    pub fn pod_command(&self, pod: &str, program: &str) -> Result<Command, LabError> {
        Ok(net::in_netns(&self.pod_netns(pod)?, program))
    }

    /// A Command that runs `program` in a pod's network namespace or, for `world/<name>`, in
    /// that world host's: `lab exec` reaches both.
    pub fn command_in(&self, target: &str, program: &str) -> Result<Command, LabError> {
        Ok(net::in_netns(&self.netns_of(target)?, program))
    }

    /// The network namespace of a pod (`namespace/name` or `name`) or a world host
    /// (`world/<name>`). A lab that declares a world host `<name>` means that host by
    /// `world/<name>`, even if a namespace `world` has a pod of that name.
    pub fn netns_of(&self, target: &str) -> Result<String, LabError> {
        match self.world_host_ref(target) {
            Some(host) => Ok(names::world_netns(&self.state.name, &host.name)),
            None => self.pod_netns(target),
        }
    }

    fn world_host_ref(&self, target: &str) -> Option<&WorldHostSpec> {
        let name = target.strip_prefix(probe::WORLD_PREFIX)?;
        self.state.spec.world_host(name)
    }

    /// The lab's hosts outside the cluster, in lab file order.
    pub fn world_hosts(&self) -> Vec<WorldHostView> {
        self.state
            .spec
            .world
            .iter()
            .map(|w| WorldHostView {
                name: w.name.clone(),
                address: w.address,
                node: w.node.clone(),
                ports: w
                    .ports
                    .iter()
                    .map(|p| format!("{}/{}", p.port, p.protocol))
                    .collect::<Vec<_>>()
                    .join(","),
                netns: names::world_netns(&self.state.name, &w.name),
            })
            .collect()
    }

    /// The network namespace (under /run/netns) of a pod, `namespace/name` or `name`.
    pub fn pod_netns(&self, pod: &str) -> Result<String, LabError> {
        let (namespace, name) = split_pod_ref(pod);
        self.state
            .pods
            .get(&state::key(namespace, name))
            .map(|p| p.netns.clone())
            .ok_or_else(|| LabError::PodNotFound(format!("{namespace}/{name}")))
    }

    /// Node names, in lab file order.
    pub fn nodes(&self) -> Vec<String> {
        self.state
            .spec
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .collect()
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Generation of the last `cluster.json` written.
    pub fn generation(&self) -> u64 {
        self.state.generation
    }

    pub fn agent_socket(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node).join("agent.sock")
    }

    pub fn agent_log(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node).join("agent.log")
    }

    /// The policy action log of `node`'s agent (rotated files get `.1`, `.2`, ...), written
    /// when the lab file sets `observability.policyLog`.
    pub fn policy_log(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node).join("policy_action.log")
    }

    /// Where `node`'s agent serves Prometheus metrics: its router address, reachable from
    /// inside the node's namespace (and its pods). None unless the lab file sets
    /// `observability.metrics`, or for an unknown node.
    pub fn metrics_address(&self, node: &str) -> Option<SocketAddrV4> {
        let spec = &self.state.spec;
        if !spec.observability.metrics {
            return None;
        }
        let node = spec.node(node)?;
        Some(SocketAddrV4::new(node.router_ip(), spec::METRICS_PORT))
    }

    /// `GET /metrics` from `node`'s agent, sent from inside the node's namespace; the body.
    pub fn scrape_metrics(&self, node: &str) -> Result<String, LabError> {
        let address = self
            .metrics_address(node)
            .ok_or_else(|| LabError::Command {
                command: format!("GET /metrics of node {node}"),
                detail: "the lab file does not set observability.metrics for this node".into(),
            })?;
        let netns = net::netns_path(&self.node_netns(node));
        let ns = File::open(&netns).map_err(io_err("open", &netns))?;
        let failed = |detail: String| LabError::Command {
            command: format!("GET http://{address}/metrics"),
            detail,
        };
        // A thread of its own enters the node's namespace, so this one stays where it is.
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                        |source| LabError::Sys {
                            call: "setns",
                            source,
                        },
                    )?;
                    sluice_api::scrape(address.into(), "/metrics", SCRAPE_TIMEOUT)
                        .map_err(|e| failed(e.to_string()))
                })
                .join()
                .map_err(|_| failed("the scraping thread panicked".into()))?
        })
    }

    pub fn pin_dir(&self, node: &str) -> PathBuf {
        Path::new(PIN_ROOT).join(&self.state.name).join(node)
    }

    pub fn node_netns(&self, node: &str) -> String {
        names::node_netns(&self.state.name, node)
    }

    /// The file the agents read.
    pub fn cluster_file(&self) -> PathBuf {
        self.dir.join("cluster.json")
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
        for candidate in net::netns_with_prefix(&prefix) {
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
        for ns in &netns {
            if let Err(e) = net::del_netns(ns) {
                errors.push(e);
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

    fn reload(&mut self) -> Result<(), LabError> {
        self.state = LabState::read(&self.dir.join("lab.json"))?;
        Ok(())
    }

    fn write(&self, state: &LabState) -> Result<(), LabError> {
        state.write(&self.dir.join("lab.json"))?;
        state.snapshot().write_file(&self.cluster_file())?;
        Ok(())
    }

    /// Makes `state` the lab's state under a new generation.
    fn commit(&mut self, mut state: LabState) -> Result<u64, LabError> {
        state.generation = self.state.generation + 1;
        self.write(&state)?;
        self.state = state;
        Ok(self.state.generation)
    }

    fn execute(&mut self, plan: Plan, started: Instant) -> Result<ApplyReport, LabError> {
        let Plan {
            mut state,
            create,
            remove,
            lines,
        } = plan;
        self.start_pods(&mut state, &create)?;
        let changed = serde_json::to_value(&state).ok() != serde_json::to_value(&self.state).ok();
        if changed {
            self.commit(state)?;
        }
        // New pods are ready and terminating ones out of service once this is realized.
        self.wait_agents(self.state.generation, CHANGE_TIMEOUT, &[])?;
        if !remove.is_empty() {
            let mut state = self.state.clone();
            let mut first_error = None;
            for k in &remove {
                let Some(record) = state.pods.get(k).cloned() else {
                    continue;
                };
                match self.stop_pod(&record) {
                    Ok(()) => {
                        state.pods.remove(k);
                    }
                    // It stays terminating; the next apply or delete tries again.
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            self.commit(state)?;
            self.wait_agents(self.state.generation, CHANGE_TIMEOUT, &[])?;
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        Ok(ApplyReport {
            lines,
            generation: self.state.generation,
            realized_in: started.elapsed(),
        })
    }

    fn pod_dir(&self, record: &PodRecord) -> PathBuf {
        self.dir
            .join("pods")
            .join(format!("{}_{}", record.namespace(), record.name()))
    }

    /// Creates the pods' namespaces and links, starts their servers and waits until every
    /// one is ready. On failure the pods started so far are removed again.
    fn start_pods(&self, state: &mut LabState, keys: &[String]) -> Result<(), LabError> {
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
        if net::netns_exists(&record.netns) {
            return Err(LabError::NetnsExists(record.netns.clone()));
        }
        journal_netns(&self.dir, &record.netns)?;
        net::add_netns(&record.netns)?;
        created.push(record);
        net::setup_pod(&net::PodLink {
            lab: &state.name,
            node_netns: &self.node_netns(&node.name),
            pod_netns: &record.netns,
            interface: &record.interface,
            ip: record.ip,
            router: node.router_ip(),
            tx_checksum_offload: state.spec.tx_checksum_offload,
        })?;
        let dir = self.pod_dir(record);
        fs::create_dir_all(&dir).map_err(io_err("mkdir", &dir))?;
        let (tcp, udp) = record.ports();
        self.spawn_server(&record.netns, record.name(), &tcp, &udp, &dir)
    }

    /// Creates every world host's namespace and link to its node, starts its server and
    /// waits until all of them serve.
    fn start_world(&self) -> Result<(), LabError> {
        if !self.state.spec.world.is_empty() {
            require_binary(&self.opts.binaries.sluice, "sluice", "SLUICE_BIN")?;
        }
        let mut started = Vec::new();
        for host in &self.state.spec.world {
            let node = self
                .state
                .spec
                .node(&host.node)
                .ok_or_else(|| LabError::NodeNotFound(host.node.clone()))?;
            let netns = names::world_netns(&self.state.name, &host.name);
            journal_netns(&self.dir, &netns)?;
            net::add_netns(&netns)?;
            net::setup_world(&net::WorldLink {
                lab: &self.state.name,
                node_netns: &self.node_netns(&node.name),
                world_netns: &netns,
                interface: &names::world_interface(&host.name),
                address: host.address,
                router: node.router_ip(),
            })?;
            let dir = self.dir.join("world").join(&host.name);
            fs::create_dir_all(&dir).map_err(io_err("mkdir", &dir))?;
            let (tcp, udp) = host.ports();
            let server = self.spawn_server(&netns, &host.name, &tcp, &udp, &dir)?;
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

    /// Starts `sluice lab pod-server` in `netns`; it writes `<dir>/ready` once it serves and
    /// logs to `<dir>/server.log`.
    fn spawn_server(
        &self,
        netns: &str,
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
        let mut cmd = Command::new(&self.opts.binaries.sluice);
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
    fn stop_pod(&self, record: &PodRecord) -> Result<(), LabError> {
        process::kill_netns(&record.netns, STOP_GRACE)?;
        net::del_netns(&record.netns)?;
        remove_tree(&self.pod_dir(record))
    }

    /// Waits until every node's agent has realized `generation`. `started` are the agents
    /// `lab up` just started: those must also be healthy, and one that exits fails the wait.
    fn wait_agents(
        &self,
        generation: u64,
        timeout: Duration,
        started: &[(String, Detached)],
    ) -> Result<(), LabError> {
        if !self.state.agents {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let mut pending = self.nodes();
        let mut last = String::new();
        loop {
            let mut still = Vec::new();
            for node in pending {
                match Client::new(self.agent_socket(&node)).status() {
                    // At startup the agent must also be healthy: it has loaded the datapath.
                    Ok(s)
                        if s.realized_generation >= generation
                            && (s.healthy || started.is_empty()) => {}
                    Ok(s) => {
                        last = format!(
                            "realized {} of {}, healthy {}{}",
                            s.realized_generation,
                            s.desired_generation,
                            s.healthy,
                            s.last_error
                                .map(|e| format!(", last error: {e}"))
                                .unwrap_or_default()
                        );
                        still.push(node);
                    }
                    Err(e) => {
                        last = e.to_string();
                        still.push(node);
                    }
                }
            }
            pending = still;
            let Some(node) = pending.first() else {
                return Ok(());
            };
            if let Some((_, agent)) = started.iter().find(|(n, _)| n == node)
                && let Some(status) = agent.exited()
            {
                return Err(LabError::AgentExited {
                    node: node.clone(),
                    status: status.to_string(),
                    log: self.agent_log(node),
                    tail: LogTail::of(&self.agent_log(node)),
                });
            }
            if Instant::now() > deadline {
                return Err(LabError::AgentTimeout {
                    node: node.clone(),
                    generation,
                    timeout,
                    last,
                    log: self.agent_log(node),
                    tail: LogTail::of(&self.agent_log(node)),
                });
            }
            thread::sleep(POLL);
        }
    }
}
