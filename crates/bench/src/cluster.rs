//! The simulated cluster (issue 19, item 6): one real `sluice-agent` with `--source
//! kubernetes`, fed by the fake API server on its node namespace's loopback with a
//! generated cluster (`sluice_fake_apiserver::cluster`, GKE's limits or a fraction of
//! them). It measures the time from start to the first realized snapshot (`/readyz`),
//! steady CPU and RSS, the maps' fill and kernel memory, then churn (pods replaced at a
//! fixed rate cluster-wide, Services rolled a window at a time) with the time from each
//! watch event to the map entry it changes, and a node leaving and joining.
//!
//! Latency is measured from outside: the change is applied to the fake server, and a
//! poller reads the pinned map entry the change must produce (a pod's /32 in the ipcache,
//! a frontend's backend count in `lb4_services`, a node's pod CIDR) until it does.

mod churn;
pub mod local;
mod poller;
pub mod report;

use std::{
    collections::BTreeMap,
    fs,
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd, AsRawFd},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::MapData;
use churn::{churn, node_leaves_and_joins};
use poller::Poller;
use sluice_common::MAPS;
use sluice_datapath::{PinDir, PinnedMaps};
use sluice_fake_apiserver::{
    FakeApiServer, Resource, Traffic,
    cluster::{CLUSTER_CIDR, LOCAL_NODE, Shape},
};

use crate::{
    BenchError,
    agent::{AgentProcess, TempDir, agent_binary, cpu_seconds, read, rss_kib},
    netns::{NetNs, unique_name},
};

/// What to run.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub shape: Shape,
    /// Wait after the first realize before measuring the steady state.
    pub settle: Duration,
    /// The steady-state measurement.
    pub steady: Duration,
    /// The churn phase.
    pub churn: Duration,
    /// Pod events per second cluster-wide (a replacement is two: DELETED, ADDED).
    pub pod_events_per_second: f64,
    /// Services rolled at a time; each gets a step (one more endpoint, or one fewer
    /// again) per second.
    pub rolling_services: usize,
    /// How long a change may take to show in the maps before it counts as missed.
    pub change_timeout: Duration,
    /// How long the first realize may take.
    pub start_timeout: Duration,
}

impl ClusterConfig {
    /// GKE's limits, 100 pod events/s and 10 Services rolled at a time.
    pub fn full() -> Self {
        Self::with_shape(Shape::gke_limits())
    }

    pub fn with_shape(shape: Shape) -> Self {
        Self {
            shape,
            settle: Duration::from_secs(5),
            steady: Duration::from_secs(20),
            churn: Duration::from_secs(60),
            pod_events_per_second: 100.0,
            rolling_services: 10,
            change_timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(900),
        }
    }

    /// A few objects and seconds, for CI.
    pub fn tiny() -> Self {
        Self {
            settle: Duration::from_millis(200),
            steady: Duration::from_secs(1),
            churn: Duration::from_secs(2),
            pod_events_per_second: 20.0,
            rolling_services: 2,
            start_timeout: Duration::from_secs(120),
            ..Self::with_shape(Shape::tiny())
        }
    }
}

/// CPU as a share of one core over a phase, and RSS at its end.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub seconds: f64,
    pub cpu_fraction: f64,
    pub rss_kib: u64,
}

/// One map: entries, capacity and the kernel's memory for it (`memlock` in fdinfo).
#[derive(Clone, Debug)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u32,
    pub memlock: u64,
}

/// What kind of change a latency belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    PodAdded,
    PodDeleted,
    ServiceRolled,
    NodeLeft,
    NodeJoined,
}

impl Change {
    pub fn name(self) -> &'static str {
        match self {
            Change::PodAdded => "pod added (ipcache /32 appears)",
            Change::PodDeleted => "pod deleted (ipcache /32 goes)",
            Change::ServiceRolled => "Service rolled (frontend's backend count)",
            Change::NodeLeft => "node left (its pod CIDR's ipcache entry goes)",
            Change::NodeJoined => "node joined (its pod CIDR's ipcache entry returns)",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ClusterResults {
    pub objects: usize,
    /// Generating and loading the objects into the fake server.
    pub load_seconds: f64,
    /// Wiring the local pods' veths.
    pub wire_seconds: f64,
    /// Agent start to `/readyz` 200 (every initial list complete and realized).
    pub start_to_ready: f64,
    pub steady: Usage,
    /// The slowest of a few `status` calls right after the steady measurement.
    pub steady_status: Duration,
    pub churn: Usage,
    /// Watch events the churn applied.
    pub churn_events: usize,
    /// Seconds from the change to the map, per kind of change.
    pub latencies: BTreeMap<Change, Vec<f64>>,
    /// Changes not seen in the maps within the timeout.
    pub missed: BTreeMap<Change, usize>,
    pub maps: Vec<MapFill>,
    /// The agent's peak RSS (VmHWM) at the end.
    pub peak_rss_kib: u64,
    /// What the API server sent this agent: by the first realize, and during the churn.
    pub traffic_start: BTreeMap<Resource, Traffic>,
    pub traffic_churn: BTreeMap<Resource, Traffic>,
    /// The source's and the loop's counters from the metrics endpoint at the end.
    pub agent_metrics: Vec<String>,
}

/// Runs the simulated cluster; `log` gets progress lines.
pub fn run(
    config: &ClusterConfig,
    log: &mut dyn FnMut(&str),
) -> Result<ClusterResults, BenchError> {
    let shape = &config.shape;
    shape
        .check()
        .map_err(|e| BenchError::Failed(e.to_string()))?;
    let mut results = ClusterResults {
        objects: shape.objects(),
        ..ClusterResults::default()
    };
    let node = NetNs::new("cluster")?;
    let listener = node.run(|| {
        TcpListener::bind("127.0.0.1:0").map_err(|source| BenchError::Io {
            call: "bind",
            what: "the fake API server's listener".into(),
            source,
        })
    })?;
    let server = FakeApiServer::start(listener).map_err(fake)?;
    let t = Instant::now();
    server.load_cluster(shape).map_err(fake)?;
    results.load_seconds = t.elapsed().as_secs_f64();
    log(&format!(
        "cluster: {} objects loaded into the fake API server in {:.1} s",
        results.objects, results.load_seconds
    ));

    let dir = TempDir(std::env::temp_dir().join(unique_name("sluice-bench-cluster-")));
    fs::create_dir_all(&dir.0).map_err(|source| BenchError::Io {
        call: "mkdir",
        what: dir.0.display().to_string(),
        source,
    })?;
    let kubeconfig = dir.0.join("kubeconfig");
    fs::write(&kubeconfig, server.kubeconfig()).map_err(|source| BenchError::Io {
        call: "write",
        what: kubeconfig.display().to_string(),
        source,
    })?;
    let t = Instant::now();
    let _local = local::wire(&node, shape, &dir.0)?;
    results.wire_seconds = t.elapsed().as_secs_f64();
    log(&format!(
        "cluster: {} pods wired on the agent's node in {:.1} s",
        shape.local_pods, results.wire_seconds
    ));
    let pins = PinDir::unique("sluice-bench-cluster-");
    let log_path = dir.0.join("agent.log");
    let metrics: SocketAddr = ([127, 0, 0, 1], 9962).into();
    let lb_map_max = lb_map_max(shape);
    let agent = spawn_agent(&node, &dir.0, &kubeconfig, pins.path(), metrics, lb_map_max)?;
    let pid = agent.0.id();
    let started = Instant::now();
    wait_ready(&node, metrics, config.start_timeout, &log_path)?;
    results.start_to_ready = started.elapsed().as_secs_f64();
    results.traffic_start = server.traffic();
    log(&format!(
        "cluster: first realized {:.1} s after the agent started",
        results.start_to_ready
    ));

    std::thread::sleep(config.settle);
    results.steady = usage(pid, config.steady)?;
    log(&format!(
        "cluster: steady {:.1}% of a core, RSS {} MiB",
        results.steady.cpu_fraction * 100.0,
        results.steady.rss_kib / 1024
    ));
    results.steady_status = slowest_status(&dir.0.join("agent.sock"))?;
    log(&format!(
        "cluster: status answered in {:.1} ms at steady state (slowest of {STATUS_CALLS})",
        results.steady_status.as_secs_f64() * 1e3
    ));
    results.maps = map_fill(pins.path())?;

    let poller = Poller::start(pins.path(), config.change_timeout)?;
    let churn_cpu = cpu_seconds(pid)?;
    let t = Instant::now();
    let before = server.traffic();
    results.churn_events = churn(&server, config, &poller)?;
    let seconds = t.elapsed().as_secs_f64();
    results.churn = Usage {
        seconds,
        cpu_fraction: (cpu_seconds(pid)? - churn_cpu) / seconds,
        rss_kib: rss_kib(pid)?,
    };
    results.traffic_churn = difference(&server.traffic(), &before);
    log(&format!(
        "cluster: churn of {} events in {seconds:.1} s: {:.1}% of a core, RSS {} MiB",
        results.churn_events,
        results.churn.cpu_fraction * 100.0,
        results.churn.rss_kib / 1024
    ));
    poller.drain();
    node_leaves_and_joins(&server, shape, &poller)?;
    let (latencies, missed) = poller.finish();
    results.latencies = latencies;
    results.missed = missed;
    results.peak_rss_kib = peak_rss_kib(pid)?;
    results.agent_metrics = agent_metrics(&node, metrics);
    drop(agent);
    drop(pins);
    drop(server);
    Ok(results)
}

fn fake(e: sluice_fake_apiserver::FakeError) -> BenchError {
    BenchError::Failed(format!("fake API server: {e}"))
}

/// `status` calls timed at steady state.
const STATUS_CALLS: usize = 5;

/// The slowest of [`STATUS_CALLS`] `status` calls to the agent at `socket`.
fn slowest_status(socket: &Path) -> Result<Duration, BenchError> {
    let client = sluice_api::Client::new(socket);
    let mut slowest = Duration::ZERO;
    for _ in 0..STATUS_CALLS {
        let asked = Instant::now();
        client
            .status()
            .map_err(|e| BenchError::Failed(format!("status: {e}")))?;
        slowest = slowest.max(asked.elapsed());
    }
    Ok(slowest)
}

/// The service and backend maps' capacity for `shape`, as an operator sizes
/// `--lb-map-max` to the cluster: the service map holds an entry per frontend and per
/// backend slot, so 100,000 Services with 1,000,000 endpoints fill the default 2^20 (the
/// agent then fails every pass with "map lb4_services is full (raise --lb-map-max)").
/// Half as much again as the frontends and endpoints, in a power of two, never below the
/// default.
fn lb_map_max(shape: &Shape) -> u32 {
    let default = sluice_datapath::DatapathConfig::default().lb_max_entries;
    let wanted = (shape.services + shape.endpoints).saturating_mul(3) / 2;
    u32::try_from(wanted.next_power_of_two()).map_or(default, |w| w.max(default))
}

fn spawn_agent(
    node: &NetNs,
    dir: &Path,
    kubeconfig: &Path,
    pins: &Path,
    metrics: SocketAddr,
    lb_map_max: u32,
) -> Result<AgentProcess, BenchError> {
    let log_path = dir.join("agent.log");
    let log = fs::File::create(&log_path).map_err(|source| BenchError::Io {
        call: "create",
        what: log_path.display().to_string(),
        source,
    })?;
    let binary = agent_binary()?;
    let child = Command::new(&binary)
        .args(["--node", LOCAL_NODE, "--netns", &node.name])
        .args(["--source", "kubernetes", "--cluster-cidr", CLUSTER_CIDR])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--pin-dir")
        .arg(pins)
        .arg("--api-socket")
        .arg(dir.join("agent.sock"))
        .arg("--state-dir")
        .arg(dir)
        .arg("--metrics-address")
        .arg(metrics.to_string())
        .arg("--lb-map-max")
        .arg(lb_map_max.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|source| BenchError::Io {
            call: "spawn",
            what: binary.display().to_string(),
            source,
        })?;
    Ok(AgentProcess(child))
}

/// Waits for `/readyz` to answer 200 (from inside the node namespace).
fn wait_ready(
    node: &NetNs,
    metrics: SocketAddr,
    timeout: Duration,
    log_path: &Path,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready = node
            .run(|| Ok(sluice_api::scrape(metrics, "/readyz", Duration::from_secs(2)).is_ok()))?;
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            let log = read(log_path).unwrap_or_default();
            let tail: String = log
                .chars()
                .rev()
                .take(4000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(BenchError::Failed(format!(
                "the agent was not ready within {timeout:?}; its log ends:\n{tail}"
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn usage(pid: u32, over: Duration) -> Result<Usage, BenchError> {
    let cpu = cpu_seconds(pid)?;
    let t = Instant::now();
    std::thread::sleep(over);
    let seconds = t.elapsed().as_secs_f64();
    Ok(Usage {
        seconds,
        cpu_fraction: (cpu_seconds(pid)? - cpu) / seconds,
        rss_kib: rss_kib(pid)?,
    })
}

fn peak_rss_kib(pid: u32) -> Result<u64, BenchError> {
    let status = read(Path::new(&format!("/proc/{pid}/status")))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| BenchError::Failed(format!("/proc/{pid}/status: no VmHWM")))
}

/// Every map of the registry: entries, capacity, and the kernel memory charged for it.
pub(crate) fn map_fill(pins: &Path) -> Result<Vec<MapFill>, BenchError> {
    let maps = PinnedMaps::open(pins).map_err(|e| BenchError::Failed(e.to_string()))?;
    MAPS.iter()
        .map(|def| {
            let data = MapData::from_pin(pins.join(def.name))
                .map_err(|e| BenchError::Failed(format!("{}: {e}", def.name)))?;
            let fdinfo = format!("/proc/self/fdinfo/{}", data.fd().as_fd().as_raw_fd());
            let memlock = read(Path::new(&fdinfo))?
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            Ok(MapFill {
                name: def.name,
                entries: maps
                    .inventory
                    .entries(def.id)
                    .map_err(|e| BenchError::Failed(e.to_string()))?,
                capacity: maps.inventory.capacity(def.id),
                memlock,
            })
        })
        .collect()
}

fn difference(
    after: &BTreeMap<Resource, Traffic>,
    before: &BTreeMap<Resource, Traffic>,
) -> BTreeMap<Resource, Traffic> {
    after
        .iter()
        .map(|(resource, a)| {
            let b = before.get(resource).copied().unwrap_or_default();
            let t = Traffic {
                watch_events: a.watch_events - b.watch_events,
                watch_bytes: a.watch_bytes - b.watch_bytes,
                list_pages: a.list_pages - b.list_pages,
                list_bytes: a.list_bytes - b.list_bytes,
            };
            (*resource, t)
        })
        .collect()
}

/// The source's and loop's counters, as the metrics endpoint gives them.
fn agent_metrics(node: &NetNs, metrics: SocketAddr) -> Vec<String> {
    let text = node
        .run(|| {
            sluice_api::scrape(metrics, "/metrics", Duration::from_secs(10))
                .map_err(|e| BenchError::Failed(e.to_string()))
        })
        .unwrap_or_default();
    text.lines()
        .filter(|l| {
            !l.starts_with('#')
                && !l.contains("_bucket")
                && (l.starts_with("sluice_kubernetes_") || l.starts_with("sluice_reconcile"))
        })
        .map(str::to_owned)
        .collect()
}
