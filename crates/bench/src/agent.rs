//! Agent cost: a real `sluice-agent` programs the node from a cluster file, then the client
//! opens connections through a ClusterIP at a fixed rate ([`measure`]), or nothing happens
//! at all ([`measure_idle`]); its CPU time and RSS come from /proc/<pid>/stat and
//! /proc/<pid>/status.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sluice_common::{IPPROTO_TCP, Lb4Key};
use sluice_datapath::{PROGRAMS, PinDir, PinnedMaps};

use crate::{
    BenchError, Topology,
    kproxy::ServiceSpec,
    load::{self, Rate},
    netns::unique_name,
    sluice::{NODE, snapshot},
};

#[derive(Clone, Copy, Debug, Default)]
pub struct AgentCost {
    pub services: usize,
    pub target_rate: f64,
    pub achieved: Rate,
    /// Share of one core over the load phase.
    pub cpu_fraction: f64,
    pub rss_kib: u64,
    pub seconds: f64,
}

/// The agent binary: `$SLUICE_AGENT_BIN`, else next to this executable.
pub fn agent_binary() -> Result<PathBuf, BenchError> {
    crate::sibling_binary("SLUICE_AGENT_BIN", "sluice-agent", "sluice-agent")
}

/// The agent process, killed and reaped on drop.
pub(crate) struct AgentProcess(pub(crate) Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Err(err) = self.0.kill() {
            eprintln!("cleanup: kill agent {}: {err}", self.0.id());
        }
        if let Err(err) = self.0.wait() {
            eprintln!("cleanup: wait agent {}: {err}", self.0.id());
        }
    }
}

/// A temporary directory, removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_dir_all(&self.0) {
            eprintln!("cleanup: {}: {err}", self.0.display());
        }
    }
}

pub(crate) fn read(path: &Path) -> Result<String, BenchError> {
    fs::read_to_string(path).map_err(|source| BenchError::Io {
        call: "read",
        what: path.display().to_string(),
        source,
    })
}

/// utime + stime of `pid`, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64, BenchError> {
    let stat = read(Path::new(&format!("/proc/{pid}/stat")))?;
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| BenchError::Failed(format!("/proc/{pid}/stat: unexpected format")))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64, BenchError> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| BenchError::Failed(format!("/proc/{pid}/stat: field {i}")))
    };
    // Field 3 (state) is index 0 here, so utime (14) is index 11.
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Ok(total as f64 / hz as f64)
}

pub(crate) fn rss_kib(pid: u32) -> Result<u64, BenchError> {
    let status = read(Path::new(&format!("/proc/{pid}/status")))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| BenchError::Failed(format!("/proc/{pid}/status: no VmRSS")))
}

/// A running agent on a fresh topology, programmed with its services. Fields drop in
/// order: the agent first, then its pins, directory, servers and namespaces.
pub(crate) struct Running {
    pub(crate) agent: AgentProcess,
    pub(crate) pins: PinDir,
    socket: PathBuf,
    cluster_file: PathBuf,
    log: PathBuf,
    _dir: TempDir,
    _servers: Vec<load::Server>,
    pub(crate) topo: Topology,
    /// From the agent's start until the measured frontend was programmed and the client's
    /// veth attached.
    programmed: Duration,
}

/// Starts the agent on a fresh topology with `services` (the measured one last) and waits
/// until the measured frontend is programmed and the client's veth attached.
pub(crate) fn start(services: &[ServiceSpec]) -> Result<Running, BenchError> {
    let measured = services
        .last()
        .ok_or_else(|| BenchError::Failed("no service to measure".into()))?;
    let topo = Topology::new()?;
    let servers = load::Server::start_all(&topo.servers)?;
    let dir = TempDir(std::env::temp_dir().join(unique_name("sluice-bench-agent-")));
    fs::create_dir_all(&dir.0).map_err(|source| BenchError::Io {
        call: "mkdir",
        what: dir.0.display().to_string(),
        source,
    })?;
    let cluster_file = dir.0.join("cluster.json");
    snapshot(services)
        .write_file(&cluster_file)
        .map_err(|e| BenchError::Failed(format!("writing the cluster file: {e}")))?;
    let pins = PinDir::unique("sluice-bench-agent-");
    let log_path = dir.0.join("agent.log");
    let log = fs::File::create(&log_path).map_err(|source| BenchError::Io {
        call: "create",
        what: log_path.display().to_string(),
        source,
    })?;
    let binary = agent_binary()?;
    let socket = dir.0.join("agent.sock");
    let started = Instant::now();
    let child = Command::new(&binary)
        .arg("--node")
        .arg(NODE)
        .arg("--netns")
        .arg(&topo.node.name)
        .arg("--cluster-file")
        .arg(&cluster_file)
        .arg("--pin-dir")
        .arg(pins.path())
        .arg("--api-socket")
        .arg(&socket)
        // The CNI registry stays in the run's directory, never the host's /var/lib/sluice.
        .arg("--state-dir")
        .arg(&dir.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|source| BenchError::Io {
            call: "spawn",
            what: binary.display().to_string(),
            source,
        })?;
    let agent = AgentProcess(child);

    let frontend = Lb4Key::new(measured.vip, measured.port, IPPROTO_TCP, 0);
    // from_container's link, the first the agent pins.
    let link = sluice_datapath::link_pin_path(pins.path(), &PROGRAMS[0], crate::CLIENT_IF);
    // 100k services take the agent a while to parse, compile and write.
    let deadline = started + Duration::from_secs(600);
    loop {
        let programmed = PinnedMaps::open(pins.path())
            .ok()
            .is_some_and(|maps| maps.services.get(&frontend, 0).is_ok());
        if programmed && link.exists() {
            break;
        }
        if Instant::now() > deadline {
            let log = read(&log_path).unwrap_or_default();
            return Err(BenchError::Failed(format!(
                "the agent did not program {} within 600 s; log:\n{log}",
                measured.vip
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Running {
        agent,
        pins,
        socket,
        cluster_file,
        log: log_path,
        _dir: dir,
        _servers: servers,
        topo,
        programmed: started.elapsed(),
    })
}

/// Starts the agent on a fresh topology with `services` (the measured one last), waits
/// until the measured frontend is programmed and the client's veth attached, then opens
/// connections at `target_rate` per second for `duration`.
pub fn measure(
    services: &[ServiceSpec],
    target_rate: f64,
    duration: Duration,
) -> Result<AgentCost, BenchError> {
    let measured = services
        .last()
        .ok_or_else(|| BenchError::Failed("no service to measure".into()))?;
    let running = start(services)?;
    let pid = running.agent.0.id();
    // Let the start-up work (first realize, attach) settle out of the measurement.
    std::thread::sleep(Duration::from_millis(500));

    let cpu_before = cpu_seconds(pid)?;
    let t = Instant::now();
    let achieved = load::connect_request_close(
        &running.topo.client,
        crate::vip_addr(measured),
        duration,
        Some(target_rate),
    )?;
    let seconds = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu_before;
    let rss = rss_kib(pid)?;
    drop(running);
    Ok(AgentCost {
        services: services.len(),
        target_rate,
        achieved,
        cpu_fraction: cpu / seconds,
        rss_kib: rss,
        seconds,
    })
}

/// The agent's cost with nothing to do: no traffic and no change after it programmed N
/// services; then what one more Service costs it.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdleCost {
    pub services: usize,
    pub service_entries: usize,
    pub backend_entries: usize,
    /// From the agent's start until the services were programmed.
    pub programmed: Duration,
    /// The first pass, which compiled and wrote everything (the agent's `realized` log line).
    pub first_pass: Option<Duration>,
    /// The pass that realized one more Service (its `realized` log line).
    pub one_change: Option<Duration>,
    /// From the replaced cluster file to the new frontend in the kernel's map: the pass,
    /// plus reading and parsing the whole file.
    pub one_change_seen: Duration,
    /// Share of one core over the measured time.
    pub cpu_fraction: f64,
    pub rss_kib: u64,
    /// The kernel memory of every pinned map (`memlock` in fdinfo).
    pub map_memory: u64,
    pub seconds: f64,
    /// The slowest of a few `status` calls after the measurement (status counts every
    /// map's entries).
    pub status: Duration,
}

/// `status` calls timed after an idle measurement.
const STATUS_CALLS: usize = 5;

/// Starts the agent with `services`, lets its start-up settle (one sweep of the periodic
/// check), then measures its CPU time over `duration` with no traffic and no change, and
/// last the time one more Service takes to reach the kernel.
pub fn measure_idle(services: &[ServiceSpec], duration: Duration) -> Result<IdleCost, BenchError> {
    let running = start(services)?;
    let pid = running.agent.0.id();
    // Past the first pass and the digest of the desired content that follows it.
    std::thread::sleep(Duration::from_secs(5));
    let cpu_before = cpu_seconds(pid)?;
    let t = Instant::now();
    std::thread::sleep(duration);
    let seconds = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu_before;
    let rss = rss_kib(pid)?;
    let client = sluice_api::Client::new(&running.socket);
    let mut status = Duration::ZERO;
    for _ in 0..STATUS_CALLS {
        let asked = Instant::now();
        client
            .status()
            .map_err(|e| BenchError::Failed(format!("status: {e}")))?;
        status = status.max(asked.elapsed());
    }
    let maps = PinnedMaps::open(running.pins.path())
        .map_err(|e| BenchError::Failed(format!("open the agent's maps: {e}")))?;
    let service_entries = maps.services.keys().count();
    let backend_entries = maps.backends.keys().count();
    let map_memory = crate::cluster::map_fill(running.pins.path())?
        .iter()
        .map(|m| m.memlock)
        .sum();
    let first_pass = realized_passes(&read(&running.log)?).first().copied();
    let one_change_seen = one_more_service(&running, services, &maps)?;
    let one_change = realized_passes(&read(&running.log)?).last().copied();
    Ok(IdleCost {
        services: services.len(),
        service_entries,
        backend_entries,
        programmed: running.programmed,
        first_pass,
        one_change,
        one_change_seen,
        cpu_fraction: cpu / seconds,
        rss_kib: rss,
        map_memory,
        seconds,
        status,
    })
}

/// Replaces the cluster file with `services` and one more, and waits for its frontend.
fn one_more_service(
    running: &Running,
    services: &[ServiceSpec],
    maps: &PinnedMaps,
) -> Result<Duration, BenchError> {
    let extra = crate::decoy(services.len());
    let frontend = Lb4Key::new(extra.vip, extra.port, IPPROTO_TCP, 0);
    let mut more = services.to_vec();
    more.push(extra);
    let mut text = snapshot(&more);
    // The source takes a file of the same revision for the same content.
    text.revision += 1;
    let written = Instant::now();
    text.write_file(&running.cluster_file)
        .map_err(|e| BenchError::Failed(format!("writing the cluster file: {e}")))?;
    while maps.services.get(&frontend, 0).is_err() {
        if written.elapsed() > Duration::from_secs(120) {
            return Err(BenchError::Failed(
                "one more Service was not programmed within 120 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Until the pass has logged: the entry is written before the line.
    std::thread::sleep(Duration::from_millis(200));
    Ok(written.elapsed().saturating_sub(Duration::from_millis(200)))
}

/// The `elapsed` of every `realized` line in the agent's log, in order.
fn realized_passes(log: &str) -> Vec<Duration> {
    log.lines()
        .filter(|l| l.contains(" realized"))
        .filter_map(|l| {
            let value = l.split_once("elapsed=")?.1.split_whitespace().next()?;
            parse_duration(value)
        })
        .collect()
}

/// A `Duration` as its Debug form prints it: `850ns`, `12.3µs`, `4.5ms`, `1.2s`.
fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit {
        "ns" => value * 1e-9,
        "µs" | "us" => value * 1e-6,
        "ms" => value * 1e-3,
        "s" => value,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_passes_are_read_from_the_agents_log() {
        let log = "2026-12-06T09:00:00Z  INFO sluice_agent::node: attaching datapath\n\
                   2026-12-06T09:00:01Z  INFO sluice_agent::node: realized generation=1 \
                   upserted=5 removed=0 attached=true elapsed=1.5s\n\
                   2026-12-06T09:00:03Z  INFO sluice_agent::node: realized generation=2 \
                   upserted=4 removed=0 attached=false elapsed=12.25ms\n";
        assert_eq!(
            realized_passes(log),
            [Duration::from_millis(1500), Duration::from_micros(12250)]
        );
        assert_eq!(parse_duration("850µs"), Some(Duration::from_micros(850)));
        assert_eq!(parse_duration("soon"), None);
    }
}
