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

pub mod local;
pub mod report;

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::fd::{AsFd, AsRawFd},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, lpm_trie::Key};
use sluice_common::{IPPROTO_TCP, IpcacheEntry, Lb4Key, MAPS, addr_be};
use sluice_datapath::{PinDir, PinnedMaps};
use sluice_fake_apiserver::{
    FakeApiServer, Resource, Traffic,
    cluster::{self, CLUSTER_CIDR, LOCAL_NODE, SERVICE_PORT, Shape},
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
    let agent = spawn_agent(&node, &dir.0, &kubeconfig, pins.path(), metrics)?;
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

fn spawn_agent(
    node: &NetNs,
    dir: &Path,
    kubeconfig: &Path,
    pins: &Path,
    metrics: SocketAddr,
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
fn map_fill(pins: &Path) -> Result<Vec<MapFill>, BenchError> {
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

/// What a change must make true in the maps.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// The ipcache's answer for `address` is not `was` any more.
    IpcacheChanges {
        address: Ipv4Addr,
        was: IpcacheEntry,
    },
    /// The ipcache answers `is` for `address`.
    IpcacheIs { address: Ipv4Addr, is: IpcacheEntry },
    /// The frontend `vip:80/TCP` has `count` backends.
    Backends { vip: Ipv4Addr, count: u16 },
}

struct Pending {
    change: Change,
    since: Instant,
    expect: Expect,
}

#[derive(Default)]
struct Observed {
    pending: Vec<Pending>,
    latencies: BTreeMap<Change, Vec<f64>>,
    missed: BTreeMap<Change, usize>,
}

/// A thread that reads the pinned maps every millisecond and times each pending change.
struct Poller {
    observed: Arc<Mutex<Observed>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The bench's own handle, for the values a change starts from.
    maps: PinnedMaps,
}

fn ipcache_at(maps: &PinnedMaps, address: Ipv4Addr) -> Option<IpcacheEntry> {
    maps.ipcache.get(&Key::new(32, addr_be(address)), 0).ok()
}

fn holds(maps: &PinnedMaps, expect: &Expect) -> bool {
    match *expect {
        Expect::IpcacheChanges { address, was } => ipcache_at(maps, address) != Some(was),
        Expect::IpcacheIs { address, is } => ipcache_at(maps, address) == Some(is),
        Expect::Backends { vip, count } => maps
            .services
            .get(&Lb4Key::new(vip, SERVICE_PORT, IPPROTO_TCP, 0), 0)
            .is_ok_and(|s| s.count == count),
    }
}

impl Poller {
    fn start(pins: &Path, timeout: Duration) -> Result<Self, BenchError> {
        let open = || PinnedMaps::open(pins).map_err(|e| BenchError::Failed(e.to_string()));
        let (maps, own) = (open()?, open()?);
        let observed = Arc::new(Mutex::new(Observed::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, s) = (Arc::clone(&observed), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                {
                    let mut o = o.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let now = Instant::now();
                    let Observed {
                        pending,
                        latencies,
                        missed,
                    } = &mut *o;
                    pending.retain(|p| {
                        if holds(&maps, &p.expect) {
                            let seconds = now.duration_since(p.since).as_secs_f64();
                            latencies.entry(p.change).or_default().push(seconds);
                            return false;
                        }
                        if now.duration_since(p.since) > timeout {
                            *missed.entry(p.change).or_default() += 1;
                            return false;
                        }
                        true
                    });
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Ok(Self {
            observed,
            stop,
            thread: Some(thread),
            maps: own,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Observed> {
        self.observed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn expect(&self, change: Change, since: Instant, expect: Expect) {
        self.lock().pending.push(Pending {
            change,
            since,
            expect,
        });
    }

    /// Waits until every pending change is seen or has timed out.
    fn drain(&self) {
        while !self.lock().pending.is_empty() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(mut self) -> (BTreeMap<Change, Vec<f64>>, BTreeMap<Change, usize>) {
        self.drain();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let mut o = self.lock();
        (
            std::mem::take(&mut o.latencies),
            std::mem::take(&mut o.missed),
        )
    }
}

/// A pod's replacement and a Service's rolling step, applied at their rates for the
/// churn's duration; returns how many watch events they made.
fn churn(
    server: &FakeApiServer,
    config: &ClusterConfig,
    poller: &Poller,
) -> Result<usize, BenchError> {
    let shape = &config.shape;
    let remote_pods = shape.pods - shape.local_pods;
    let pod_interval = Duration::from_secs_f64(1.0 / config.pod_events_per_second.max(0.1));
    let step_interval = Duration::from_secs_f64(1.0 / config.rolling_services.max(1) as f64);
    // Rolled: the Services after the LoadBalancers (Service 0 is the largest).
    let rollable = shape.services - shape.load_balancers - 1;
    let first_rolled = shape.load_balancers + 1;
    let mut generations: BTreeMap<usize, u32> = BTreeMap::new();
    let mut surged: BTreeMap<usize, bool> = BTreeMap::new();
    // A replacement in progress: the pod deleted, to be added back next.
    let mut deleted: Option<usize> = None;
    let (mut pod_turn, mut step_turn) = (0_usize, 0_usize);
    let start = Instant::now();
    let (mut next_pod, mut next_step) = (start, start);
    let mut events = 0;
    while start.elapsed() < config.churn {
        let now = Instant::now();
        if now >= next_pod {
            next_pod += pod_interval;
            events += pod_event(
                server,
                shape,
                poller,
                &mut deleted,
                &mut generations,
                || {
                    pod_turn += 1;
                    shape.local_pods + (pod_turn * 7_919) % remote_pods
                },
            )?;
        }
        if now >= next_step {
            next_step += step_interval;
            // Each Service of the window gets ten steps, then the window moves on.
            let window = step_turn / (config.rolling_services * 10);
            let s = first_rolled
                + (window * config.rolling_services + step_turn % config.rolling_services)
                    % rollable.max(1);
            step_turn += 1;
            let surge = !surged.get(&s).copied().unwrap_or(false);
            surged.insert(s, surge);
            events += roll(server, shape, poller, s, surge)?;
        }
        let wake = next_pod.min(next_step);
        if let Some(wait) = wake.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    // Leave no Service surged and no pod missing.
    if let Some(p) = deleted {
        let generation = generations.get(&p).copied().unwrap_or(0);
        server
            .apply_json(Resource::Pods, cluster::pod(shape, p, generation))
            .map_err(fake)?;
        events += 1;
    }
    for (s, surge) in surged {
        if surge {
            events += roll(server, shape, poller, s, false)?;
        }
    }
    Ok(events)
}

/// The ipcache's answer for an address inside `node`'s pod CIDR that no pod has: the pod
/// CIDR's own entry.
fn pod_cidr_entry(poller: &Poller, node: usize) -> Option<IpcacheEntry> {
    let unused = Ipv4Addr::from(u32::from(Shape::pod_cidr(node)) + 255);
    ipcache_at(&poller.maps, unused)
}

/// One pod event: the pod of the replacement in progress is added back with a new
/// address, or the next pod is deleted.
fn pod_event(
    server: &FakeApiServer,
    shape: &Shape,
    poller: &Poller,
    deleted: &mut Option<usize>,
    generations: &mut BTreeMap<usize, u32>,
    next: impl FnOnce() -> usize,
) -> Result<usize, BenchError> {
    if let Some(p) = deleted.take() {
        let generation = generations.entry(p).or_default();
        *generation += 1;
        let address = shape.pod_address(p, *generation);
        let was = ipcache_at(&poller.maps, address);
        let since = Instant::now();
        server
            .apply_json(Resource::Pods, cluster::pod(shape, p, *generation))
            .map_err(fake)?;
        if let Some(was) = was {
            poller.expect(
                Change::PodAdded,
                since,
                Expect::IpcacheChanges { address, was },
            );
        }
        return Ok(1);
    }
    let p = next();
    let address = shape.pod_address(p, generations.get(&p).copied().unwrap_or(0));
    let node = cluster_node_of(shape, address);
    let since = Instant::now();
    if server.delete(Resource::Pods, &shape.pod_key(p)).is_none() {
        return Ok(0);
    }
    *deleted = Some(p);
    if let Some(is) = node.and_then(|n| pod_cidr_entry(poller, n)) {
        poller.expect(Change::PodDeleted, since, Expect::IpcacheIs { address, is });
    }
    Ok(1)
}

/// The node whose pod CIDR holds `address`.
fn cluster_node_of(shape: &Shape, address: Ipv4Addr) -> Option<usize> {
    let [_, b, c, _] = address.octets();
    let n = usize::from(b.checked_sub(64)?) * 256 + usize::from(c);
    (n < shape.nodes).then_some(n)
}

/// A rolling step of Service `s`: one endpoint more (`surge`), or back to its own.
fn roll(
    server: &FakeApiServer,
    shape: &Shape,
    poller: &Poller,
    s: usize,
    surge: bool,
) -> Result<usize, BenchError> {
    let slices = cluster::endpoint_slices(shape, s, surge);
    let count = shape.endpoint_count(s) + usize::from(surge);
    let since = Instant::now();
    let mut events = 0;
    let kept = slices.len();
    for slice in slices {
        server
            .apply_json(Resource::EndpointSlices, slice)
            .map_err(fake)?;
        events += 1;
    }
    // The surge's own slice goes when it is empty again.
    if !surge
        && server
            .delete(
                Resource::EndpointSlices,
                &cluster::slice_key(shape, s, kept),
            )
            .is_some()
    {
        events += 1;
    }
    let count = u16::try_from(count).unwrap_or(u16::MAX);
    poller.expect(
        Change::ServiceRolled,
        since,
        Expect::Backends {
            vip: Shape::cluster_ip(s),
            count,
        },
    );
    Ok(events)
}

/// The last node is deleted, then created again.
fn node_leaves_and_joins(
    server: &FakeApiServer,
    shape: &Shape,
    poller: &Poller,
) -> Result<(), BenchError> {
    let n = shape.nodes - 1;
    let unused = Ipv4Addr::from(u32::from(Shape::pod_cidr(n)) + 255);
    let Some(was) = ipcache_at(&poller.maps, unused) else {
        return Err(BenchError::Failed(format!(
            "node {n}'s pod CIDR is not in the ipcache"
        )));
    };
    let since = Instant::now();
    server
        .delete(Resource::Nodes, &Shape::node_name(n))
        .ok_or_else(|| BenchError::Failed(format!("node {n} was not served")))?;
    poller.expect(
        Change::NodeLeft,
        since,
        Expect::IpcacheChanges {
            address: unused,
            was,
        },
    );
    poller.drain();
    let since = Instant::now();
    server
        .apply_json(Resource::Nodes, cluster::node(n))
        .map_err(fake)?;
    poller.expect(
        Change::NodeJoined,
        since,
        Expect::IpcacheIs {
            address: unused,
            is: was,
        },
    );
    poller.drain();
    Ok(())
}
