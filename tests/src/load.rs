//! Traffic that must survive agent restarts (issue 14): echo servers in pods, clients that
//! hold one TCP connection and exchange a request on it every ~50 ms, and a watcher of
//! every tcx hook and pinned link of a node.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::programs::{
    SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
};
use sluice_datapath::{AttachRole, Hook, PROGRAMS, link_pin_path};

use crate::{TestLab, in_netns};

/// The port the echo servers listen on in their pods.
pub const ECHO_PORT: u16 = 9000;
/// A request of the long-lived clients: a sequence number.
const REQUEST: usize = 8;

/// Threads that run until the returned guard drops (also when the test fails).
#[derive(Default)]
pub struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    pub fn spawn(&mut self, f: impl FnOnce() + Send + 'static) {
        self.threads.push(std::thread::spawn(f));
    }

    /// Stops every thread and waits for them.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An echo server on `pod`'s [`ECHO_PORT`]: every connection gets back what it sends.
pub fn echo_server(lab: &TestLab, workers: &mut Workers, pod: &str) {
    let listener = lab.in_pod(pod, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, ECHO_PORT)).unwrap()
    });
    listener.set_nonblocking(true).unwrap();
    let stop = workers.stop_flag();
    workers.spawn(move || {
        let mut connections = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    let stop = Arc::clone(&stop);
                    connections.push(std::thread::spawn(move || echo(conn, &stop)));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        for c in connections {
            let _ = c.join();
        }
    });
}

fn echo(mut conn: TcpStream, stop: &AtomicBool) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// What a long-lived client saw.
#[derive(Debug, Default, Clone)]
pub struct HeldConnection {
    /// Requests answered with their own bytes.
    pub exchanges: u64,
    /// Connections opened (1 if the first one lasted the whole run).
    pub connections: u64,
    /// Failures, each with when it happened and what failed how.
    pub failures: Vec<(std::time::Instant, String)>,
    /// Failures that were a reset by the peer (or on its behalf).
    pub resets: u64,
    /// The longest wait for an answer, in ms.
    pub slowest_ms: u64,
}

/// A client in `pod` holding one TCP connection to `addr`, sending a request every
/// `every` and reading its echo; a failed connection is counted and replaced.
pub fn hold_connection(
    lab: &TestLab,
    workers: &mut Workers,
    pod: &str,
    addr: SocketAddr,
    every: Duration,
) -> Arc<Mutex<HeldConnection>> {
    let seen = Arc::new(Mutex::new(HeldConnection::default()));
    let netns = lab.lab.pod_netns(pod).unwrap();
    let stop = workers.stop_flag();
    let out = Arc::clone(&seen);
    let name = format!("{pod} -> {addr}");
    workers.spawn(move || {
        in_netns(&netns, move || {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let result = exchange_until(addr, every, &stop, &mut seq, &out);
                let mut seen = out.lock().unwrap();
                seen.connections += 1;
                if let Err(e) = result {
                    if e.kind() == ErrorKind::ConnectionReset {
                        seen.resets += 1;
                    }
                    seen.failures.push((
                        std::time::Instant::now(),
                        format!("{name}: request {seq}: {e}"),
                    ));
                    drop(seen);
                    std::thread::sleep(every);
                }
            }
        });
    });
    seen
}

/// Exchanges requests on one connection until `stop` (Ok) or a failure (Err).
fn exchange_until(
    addr: SocketAddr,
    every: Duration,
    stop: &AtomicBool,
    seq: &mut u64,
    seen: &Mutex<HeldConnection>,
) -> std::io::Result<()> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_nodelay(true)?;
    while !stop.load(Ordering::Relaxed) {
        *seq += 1;
        let started = std::time::Instant::now();
        conn.write_all(&seq.to_be_bytes())?;
        let mut answer = [0u8; REQUEST];
        conn.read_exact(&mut answer)?;
        if u64::from_be_bytes(answer) != *seq {
            return Err(std::io::Error::other(format!(
                "answered {} to request {seq}",
                u64::from_be_bytes(answer)
            )));
        }
        let mut seen = seen.lock().unwrap();
        seen.exchanges += 1;
        seen.slowest_ms = seen.slowest_ms.max(started.elapsed().as_millis() as u64);
        drop(seen);
        std::thread::sleep(every);
    }
    Ok(())
}

/// One pinned link of a node: its path, its kernel id and the program it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub link_id: u32,
    pub program_id: u32,
}

/// Every link pinned under `pin_dir` (devices and cgroups), by pin path.
pub fn pinned_links(pin_dir: &Path) -> BTreeMap<String, LinkState> {
    let mut links = BTreeMap::new();
    for role in AttachRole::ALL {
        let dir = pin_dir.join("links").join(role.pin_dir_name());
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let link = FdLink::from(PinnedLink::from_pin(&path).unwrap());
            let info = link.info().unwrap();
            links.insert(
                path.to_string_lossy().into_owned(),
                LinkState {
                    link_id: info.id(),
                    program_id: info.program_id(),
                },
            );
        }
    }
    links
}

/// The tcx hooks (interface, program) the node's pinned device links sit on.
fn tcx_hooks(pin_dir: &Path) -> Vec<(String, &'static sluice_datapath::ProgramDef)> {
    let mut hooks = Vec::new();
    for program in PROGRAMS.iter().filter(|p| matches!(p.hook, Hook::Tcx(_))) {
        let dir = pin_dir.join("links").join(program.role.pin_dir_name());
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(target) = name.strip_suffix(&format!("_{}", program.link_suffix)) else {
                continue;
            };
            if link_pin_path(pin_dir, program, target) == entry.path() {
                hooks.push((target.to_owned(), program));
            }
        }
    }
    hooks
}

/// What a [`watch_tcx`] thread saw on a node's hooks.
#[derive(Debug, Default, Clone)]
pub struct TcxWatch {
    /// Queries made of every hook.
    pub polls: u64,
    /// Polls that found a hook with no program of its name (a gap: detached).
    pub empty: Vec<String>,
    /// Polls that found two programs of its name on a hook (attached beside the old one).
    pub doubled: Vec<String>,
    /// Program ids seen per hook, in the order they appeared.
    pub programs: BTreeMap<String, Vec<u32>>,
}

/// Queries every tcx hook of `node` in a loop, from inside its namespace, until the
/// workers stop: a program that is replaced in its link is never missing, never doubled.
pub fn watch_tcx(lab: &TestLab, workers: &mut Workers, node: &str) -> Arc<Mutex<TcxWatch>> {
    let pin_dir = lab.lab.pin_dir(node);
    let hooks = tcx_hooks(&pin_dir);
    assert!(!hooks.is_empty(), "{node}: no pinned tcx link");
    let netns = lab.lab.node_netns(node);
    let watch = Arc::new(Mutex::new(TcxWatch::default()));
    let (stop, out) = (workers.stop_flag(), Arc::clone(&watch));
    workers.spawn(move || {
        in_netns(&netns, move || {
            while !stop.load(Ordering::Relaxed) {
                let mut seen = BTreeMap::new();
                for (ifname, program) in &hooks {
                    let Hook::Tcx(attach) = program.hook else {
                        continue;
                    };
                    let key = format!("{ifname}/{}", program.name);
                    seen.insert(key, tcx_programs(ifname, attach, program.name));
                }
                let mut watch = out.lock().unwrap();
                watch.polls += 1;
                for (key, ids) in seen {
                    match ids.len() {
                        0 => watch.empty.push(key.clone()),
                        1 => {}
                        _ => watch.doubled.push(format!("{key}: {ids:?}")),
                    }
                    let history = watch.programs.entry(key).or_default();
                    for id in ids {
                        if history.last() != Some(&id) {
                            history.push(id);
                        }
                    }
                }
                drop(watch);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    });
    watch
}

/// The ids of the programs named `name` on a tcx hook. The query lists the hook's
/// program ids, then opens each: a program freed in between (the old one of a link
/// swapped by a restarting agent) fails the whole query, which is then asked again, so
/// only a hook that held none of them, or could not be queried at all (its device gone),
/// counts as empty.
fn tcx_programs(ifname: &str, attach: TcAttachType, name: &str) -> Vec<u32> {
    for _ in 0..3 {
        if let Ok((_, programs)) = SchedClassifier::query_tcx(ifname, attach) {
            return programs
                .iter()
                .filter(|p| p.name_as_str() == Some(name))
                .map(|p| p.id())
                .collect();
        }
    }
    Vec::new()
}

/// Distinct program ids in a history (for the report).
pub fn distinct(ids: &[u32]) -> usize {
    ids.iter().collect::<BTreeSet<_>>().len()
}

/// Packets the node's datapath dropped so far, by reason and direction (0 egress from the
/// pod, 1 ingress), those with any.
pub fn drops(pin_dir: &Path) -> BTreeMap<(String, u32), u64> {
    let maps = sluice_datapath::PinnedMaps::open(pin_dir).unwrap();
    let mut out = BTreeMap::new();
    for reason in sluice_common::DropReason::ALL {
        for dir in [0, 1] {
            let index = sluice_common::metrics_index(reason.code(), dir);
            let values = maps.metrics.get(&index, 0).unwrap();
            let packets: u64 = values.iter().map(|v| v.packets).sum();
            if packets > 0 {
                out.insert((format!("{reason:?}"), dir), packets);
            }
        }
    }
    out
}

/// The map entries the first pass of the agent that wrote `log` last wrote (upserted,
/// removed), from its `realized` line; None before that agent has realized anything.
pub fn first_pass_writes(log: &Path) -> Option<(u64, u64)> {
    let text = fs::read_to_string(log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().rposition(|l| l.contains("agent running"))?;
    let realized = lines[start..]
        .iter()
        .find(|l| l.contains(" realized ") || l.ends_with(" realized"))?;
    let field = |name: &str| -> u64 {
        let at = realized
            .find(&format!(" {name}="))
            .unwrap_or_else(|| panic!("no {name} in {realized:?}"));
        realized[at + name.len() + 2..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {realized:?}"))
    };
    Some((field("upserted"), field("removed")))
}
