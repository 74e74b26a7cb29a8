//! Policy action logging, as GKE's network policy logging does it: one JSON line per
//! connection decision (allowed or denied by NetworkPolicy), in a file rotated by size.
//!
//! Writing never blocks the caller: lines pass a rate limit and then a bounded queue to a
//! writer thread, and a line that finds the limit exhausted or the queue full is dropped
//! and counted as suppressed.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{BufWriter, Write},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    str::FromStr,
    sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use sluice_api::flow::{Endpoint, Flow, Layer4, TrafficDirection, Verdict};
use sluice_common::{DropReason, EVENT_F_DENIED, EVENT_POLICY_VERDICT};
use sluice_observer::FlowReceiver;
use tokio::sync::broadcast::error::RecvError;
use tracing::warn;

use crate::AgentError;

/// Which decisions are logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyLogMode {
    Allow,
    Deny,
    All,
}

impl FromStr for PolicyLogMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            "all" => Ok(Self::All),
            other => Err(format!(
                "policy log mode {other:?}: expected allow, deny or all"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PolicyLogConfig {
    pub mode: PolicyLogMode,
    pub path: PathBuf,
    /// The active file is rotated before a line would take it past this many bytes.
    pub max_size: u64,
    /// Files kept, the active one included: `path`, `path.1`, ... `path.<max_files - 1>`.
    pub max_files: u32,
    /// Lines per second; 0: no limit.
    pub rate: u32,
}

impl PolicyLogConfig {
    pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024;
    pub const DEFAULT_MAX_FILES: u32 = 5;
    pub const DEFAULT_RATE: u32 = 500;
}

/// Lines that may wait for the writer; more are suppressed rather than queued.
const QUEUE: usize = 4096;

/// One connection decision, in GKE's policy action log shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyLogEntry {
    pub connection: Connection,
    /// `allow` or `deny`.
    pub disposition: &'static str,
    /// For allow: the NetworkPolicies whose rule admitted the connection. For deny: empty.
    pub policies: Vec<PolicyRef>,
    /// Why a connection was denied: `default deny` (no rule allows it) or, for an endpoint
    /// whose policy is not installed, `policy unavailable`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    pub src: Peer,
    pub dest: Peer,
    pub node_name: String,
    /// RFC 3339, UTC, nanoseconds.
    pub timestamp: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Connection {
    pub src_ip: Ipv4Addr,
    pub dest_ip: Ipv4Addr,
    pub src_port: u16,
    pub dest_port: u16,
    /// Lower case, as GKE writes it: `tcp`, `udp`, `sctp`, `icmp`.
    pub protocol: String,
    /// `ingress` or `egress`, seen from the endpoint whose policy decided.
    pub direction: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyRef {
    pub name: String,
    pub namespace: String,
}

/// One side of the connection: a pod, or an address outside the cluster's pods.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Peer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The address, for peers that are no pod (nodes, world).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<Ipv4Addr>,
}

impl PolicyLogEntry {
    /// The decision a policy verdict flow records; None for any other flow.
    pub fn from_flow(flow: &Flow) -> Option<Self> {
        if !flow.is_policy_verdict() {
            return None;
        }
        let allowed = flow.verdict == Verdict::Forwarded;
        let (src_port, dest_port) = flow.ports().unwrap_or((0, 0));
        let protocol = match &flow.l4 {
            Some(Layer4::Tcp(_)) => "tcp",
            Some(Layer4::Udp(_)) => "udp",
            Some(Layer4::Sctp(_)) => "sctp",
            Some(Layer4::Icmpv4(_)) => "icmp",
            None => "unknown",
        };
        let (direction, allowed_by) = match flow.traffic_direction {
            TrafficDirection::Ingress => ("ingress", &flow.ingress_allowed_by),
            TrafficDirection::Egress => ("egress", &flow.egress_allowed_by),
        };
        let reason = (!allowed).then(|| {
            if flow.drop_reason == u32::from(DropReason::PolicyUnavailable.code()) {
                "policy unavailable"
            } else {
                "default deny"
            }
        });
        Some(Self {
            connection: Connection {
                src_ip: flow.ip.source,
                dest_ip: flow.ip.destination,
                src_port,
                dest_port,
                protocol: protocol.into(),
                direction,
            },
            disposition: if allowed { "allow" } else { "deny" },
            policies: if allowed {
                allowed_by
                    .iter()
                    .map(|p| PolicyRef {
                        name: p.name.clone(),
                        namespace: p.namespace.clone(),
                    })
                    .collect()
            } else {
                Vec::new()
            },
            reason,
            src: Peer::of(&flow.source, flow.ip.source),
            dest: Peer::of(&flow.destination, flow.ip.destination),
            node_name: flow.node_name.clone(),
            timestamp: flow.time.to_string(),
        })
    }
}

impl Peer {
    fn of(endpoint: &Endpoint, address: Ipv4Addr) -> Self {
        if endpoint.pod_name.is_empty() {
            Self::instance(address)
        } else {
            Self::pod(&endpoint.namespace, &endpoint.pod_name)
        }
    }

    pub fn pod(namespace: &str, name: &str) -> Self {
        Self {
            pod_name: Some(name.to_string()),
            pod_namespace: Some(namespace.to_string()),
            namespace: Some(namespace.to_string()),
            instance: None,
        }
    }

    pub fn instance(address: Ipv4Addr) -> Self {
        Self {
            instance: Some(address),
            ..Self::default()
        }
    }
}

/// The producer side: mode filter, rate limit and the queue to the writer thread.
pub struct PolicyLogger {
    mode: PolicyLogMode,
    bucket: TokenBucket,
    queue: SyncSender<String>,
    suppressed: Counter,
    writer: JoinHandle<()>,
}

impl PolicyLogger {
    /// Opens (appending to) the log file and starts the writer thread. `suppressed` counts
    /// every line not written.
    pub fn start(config: &PolicyLogConfig, suppressed: Counter) -> Result<Self, AgentError> {
        let file = RotatingFile::open(config)?;
        let (queue, lines) = sync_channel(QUEUE);
        let writer = std::thread::Builder::new()
            .name("policy-log".into())
            .spawn(move || write_lines(lines, file))
            .map_err(|source| AgentError::Io {
                call: "spawn policy log writer",
                path: config.path.clone(),
                source,
            })?;
        Ok(Self {
            mode: config.mode,
            bucket: TokenBucket::new(config.rate, Instant::now()),
            queue,
            suppressed,
            writer,
        })
    }

    /// Whether decisions with this disposition are logged at all.
    pub fn wants(&self, allowed: bool) -> bool {
        match self.mode {
            PolicyLogMode::All => true,
            PolicyLogMode::Allow => allowed,
            PolicyLogMode::Deny => !allowed,
        }
    }

    /// Queues one line, or counts it as suppressed; never waits.
    pub fn log(&mut self, entry: &PolicyLogEntry, now: Instant) {
        if !self.bucket.take(now) {
            self.suppressed.inc();
            return;
        }
        let line = match serde_json::to_string(entry) {
            Ok(line) => line,
            Err(e) => {
                warn!(error = %e, "encoding a policy log line failed");
                self.suppressed.inc();
                return;
            }
        };
        match self.queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.suppressed.inc();
            }
        }
    }

    /// Counts lines lost before they reached [`PolicyLogger::log`] (a lagging subscriber).
    pub fn suppress(&self, lines: u64) {
        self.suppressed.inc_by(lines);
    }

    /// Writes what is queued and stops the writer.
    pub fn close(self) {
        drop(self.queue);
        if self.writer.join().is_err() {
            warn!("policy log writer panicked");
        }
    }
}

/// Logs every policy verdict flow `flows` receives until the observer stops, then
/// writes what is queued.
pub async fn follow(mut flows: FlowReceiver, mut logger: PolicyLogger) {
    let mut denials = RecentDenials::default();
    loop {
        match flows.recv_event().await {
            Ok(event) => {
                // Only the verdicts the mode logs are named: the other events of a
                // connection cost the log nothing.
                let denied = event.flags & EVENT_F_DENIED != 0;
                if event.type_ != EVENT_POLICY_VERDICT || !logger.wants(!denied) {
                    continue;
                }
                let Some(entry) = PolicyLogEntry::from_flow(&flows.name(&event)) else {
                    continue;
                };
                let now = Instant::now();
                let allowed = entry.disposition == "allow";
                if logger.wants(allowed) && (allowed || denials.first(&entry.connection, now)) {
                    logger.log(&entry, now);
                }
            }
            // Flows missed by a lagging subscriber are counted whatever their type: an
            // upper bound of the lines lost, never an undercount.
            Err(RecvError::Lagged(missed)) => logger.suppress(missed),
            Err(RecvError::Closed) => break,
        }
    }
    // The writer thread does blocking file I/O.
    if let Err(e) = tokio::task::spawn_blocking(move || logger.close()).await {
        warn!(error = %e, "closing the policy log failed");
    }
}

/// Connections denied lately. A denied connection's client retransmits its first packet,
/// and each retransmission is judged again; the log records the decision once.
#[derive(Default)]
struct RecentDenials {
    seen: HashMap<Connection, Instant>,
}

impl RecentDenials {
    /// Longer than a client's retransmissions of a connection attempt usually last.
    const WINDOW: Duration = Duration::from_secs(30);
    /// Past this many connections, the expired ones are forgotten.
    const PURGE_AT: usize = 4096;

    /// Whether `connection` was not denied within the window; records it.
    fn first(&mut self, connection: &Connection, now: Instant) -> bool {
        if self.seen.len() >= Self::PURGE_AT {
            self.seen
                .retain(|_, at| now.duration_since(*at) < Self::WINDOW);
        }
        match self.seen.insert(connection.clone(), now) {
            Some(at) => now.duration_since(at) >= Self::WINDOW,
            None => true,
        }
    }
}

fn write_lines(lines: Receiver<String>, mut file: RotatingFile) {
    while let Ok(line) = lines.recv() {
        let mut next = Some(line);
        // Drain what is queued before flushing, so a burst costs one write syscall per
        // buffer rather than one per line.
        while let Some(line) = next {
            if let Err(e) = file.write_line(&line) {
                warn!(error = %e, path = %file.path.display(), "writing the policy log failed");
            }
            next = lines.try_recv().ok();
        }
        if let Err(e) = file.flush() {
            warn!(error = %e, path = %file.path.display(), "writing the policy log failed");
        }
    }
}

/// The active log file and its rotated predecessors.
struct RotatingFile {
    path: PathBuf,
    out: BufWriter<File>,
    size: u64,
    max_size: u64,
    max_files: u32,
}

impl RotatingFile {
    fn open(config: &PolicyLogConfig) -> Result<Self, AgentError> {
        let io = |call| {
            let path = config.path.clone();
            move |source| AgentError::Io { call, path, source }
        };
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io("mkdir"))?;
        }
        let file = append(&config.path).map_err(io("open"))?;
        let size = file.metadata().map_err(io("fstat"))?.len();
        Ok(Self {
            path: config.path.clone(),
            out: BufWriter::new(file),
            size,
            max_size: config.max_size,
            max_files: config.max_files.max(1),
        })
    }

    fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_size {
            self.rotate()?;
        }
        self.out.write_all(line.as_bytes())?;
        self.out.write_all(b"\n")?;
        self.size += len;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// `path.<n-1>` is dropped, each `path.<i>` becomes `path.<i+1>`, `path` becomes
    /// `path.1`, and a new `path` is started.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let last = self.max_files - 1;
        if last == 0 {
            self.out = BufWriter::new(File::create(&self.path)?);
            self.size = 0;
            return Ok(());
        }
        remove_if_present(&rotated(&self.path, last))?;
        for i in (1..last).rev() {
            rename_if_present(&rotated(&self.path, i), &rotated(&self.path, i + 1))?;
        }
        fs::rename(&self.path, rotated(&self.path, 1))?;
        self.out = BufWriter::new(append(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

fn append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// `path.<n>`: the n-th most recent rotated file.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn rename_if_present(from: &Path, to: &Path) -> std::io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `rate` tokens per second, holding at most one second's worth.
struct TokenBucket {
    rate: u32,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, now: Instant) -> Self {
        Self {
            rate,
            tokens: f64::from(rate),
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let rate = f64::from(self.rate);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests;
