//! `sluice lab`: a local cluster built from ordinary Kubernetes YAML. Nodes and pods are
//! network namespaces on this machine, every pod serves its containerPorts, and one agent
//! per node runs the real dataplane against them.
//!
//! The lab plays the API server (validation, ClusterIP allocation), the controllers
//! (Deployment pods, EndpointSlices), the scheduler, the kubelet and the CNI plugin. Its state
//! lives in `<state_root>/<lab>/lab.json`; what the agents read is `cluster.json`.
//!
//! Where things are: [`Lab`] and where its parts live (this file); `lifecycle` (up, open,
//! down, list, the agents' command lines); `apply` (carrying out a `plan`); `changes` (what
//! an apply or delete reports); `generations`
//! (writing cluster.json and waiting for the agents to realize it); `pods` (pod and world
//! host namespaces, links and servers); `views` (`lab get`); `journal` (the state
//! directory's lock and namespace journal); `metrics`; `net` (wiring, over sluice-netns);
//! `process` (detached processes and stopping them by namespace); `topology` (cluster CIDR,
//! routing mode, underlay and the rules nodes obey); `nodes` (adding and removing nodes of
//! a running lab); `restart` (stopping and starting one node's agent).

mod apply;
mod changes;
mod error;
mod generations;
mod healthcheck;
mod host_cgroup;
mod ipam;
mod journal;
mod lifecycle;
mod loadbalancer;
mod metrics;
mod names;
mod net;
mod nodes;
mod plan;
mod pods;
mod probe;
mod process;
mod restart;
mod router;
mod server;
mod slices;
mod spec;
mod state;
mod topology;
mod views;

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use sluice_netns::NetNs;

pub use apply::{ChangeOptions, PodProgress};
pub use changes::{Action, AgentRealized, ApplyReport, Change};
pub use error::{LabError, LogTail};
pub use healthcheck::run_router_health;
/// Node pod CIDRs and the lab's ranges, as [`NodeSpec`] takes them.
pub use ipnet::Ipv4Net;
pub use probe::{Probe, ProbeMatrix, ProbeOptions, ProbeRequest, Protocol, Via};
pub use restart::{AgentRestart, AgentStop};
pub use router::VIP_ROUTE_PROTOCOL;
pub use server::serve_pod;
pub use spec::{
    HealthCheckSpec, LabSpec, LoadBalancerSpec, METRICS_PORT, NodePortRange, NodeSpec,
    Observability, WorldHostSpec, WorldPort, router_address,
};
pub use topology::{RoutingMode, UNDERLAY_BRIDGE, UNDERLAY_DEVICE, UnderlaySpec, WorldAttach};
pub use views::{EndpointsView, PodView, ServiceView, WorldHostView};

use crate::{
    error::io_err,
    state::{LabState, PodRecord},
};

/// Where the agents pin their maps and links: `<PIN_ROOT>/<lab>/<node>`.
const PIN_ROOT: &str = "/sys/fs/bpf/sluice";
/// How long agents get to realize a change, and pod servers to bind their ports.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Agents load the datapath before their first generation, which takes longer.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);
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

/// A lab that exists on this machine.
pub struct Lab {
    dir: PathBuf,
    opts: LabOptions,
    state: LabState,
}

fn state_dir(opts: &LabOptions, name: &str) -> PathBuf {
    opts.state_root.join(name)
}

fn split_pod_ref(pod: &str) -> (&str, &str) {
    pod.split_once('/').unwrap_or(("default", pod))
}

impl Lab {
    /// A Command that runs `program` inside the pod's network namespace (`namespace/name`, or
    /// `name` in `default`), keeping the host's /sys and bpffs.
    pub fn pod_command(&self, pod: &str, program: &str) -> Result<Command, LabError> {
        Ok(NetNs::named(self.pod_netns(pod)?).command(program)?)
    }

    /// A Command that runs `program` in a pod (its network namespace and cgroup) or, for
    /// `world/<name>`, in that world host's network namespace: `lab exec` reaches both.
    pub fn command_in(&self, target: &str, program: &str) -> Result<Command, LabError> {
        match self.world_host_ref(target) {
            Some(host) => Ok(
                NetNs::named(names::world_netns(&self.state.name, &host.name)).command(program)?,
            ),
            None => self.command_in_pod(target, program),
        }
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

    pub fn pin_dir(&self, node: &str) -> PathBuf {
        Path::new(PIN_ROOT).join(&self.state.name).join(node)
    }

    pub fn node_netns(&self, node: &str) -> String {
        names::node_netns(&self.state.name, node)
    }

    /// The namespace holding the underlay bridge (`br0`) every node's `underlay0` is linked
    /// to; it exists only in a lab with an underlay.
    pub fn underlay_netns(&self) -> String {
        names::underlay_netns(&self.state.name)
    }

    /// The lab as its file (and later node changes) made it: routing mode, underlay, nodes
    /// with their underlay addresses.
    pub fn spec(&self) -> &LabSpec {
        &self.state.spec
    }

    /// The file the agents read.
    pub fn cluster_file(&self) -> PathBuf {
        self.dir.join("cluster.json")
    }

    fn pod_dir(&self, record: &PodRecord) -> PathBuf {
        self.dir
            .join("pods")
            .join(format!("{}_{}", record.namespace(), record.name()))
    }
}
