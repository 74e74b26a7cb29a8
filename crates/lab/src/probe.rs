//! `sluice lab probe`: real connections between the lab's pods and world hosts, as the
//! upstream NetworkPolicy e2e tests make them, gathered into their "truth table".
//!
//! A probe runs on a thread that has entered the source's network namespace, so the packets
//! leave through the source's own interface and meet the dataplane exactly as its traffic
//! would. TCP: connect, send a unique token, expect it echoed. UDP: send the token, expect it
//! back. Anything else within the timeout (no answer, refused, reset) counts as denied.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    str::FromStr,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;
use sluice_netns::NetNs;

use crate::{
    Lab, LabError, names, plan, slices,
    state::{PodRecord, key},
};

mod outcome;

use outcome::Traced;
pub use outcome::{LEGEND, Outcome};

/// How peers outside the cluster are named among pods (`world/internet`).
pub const WORLD_PREFIX: &str = "world/";
/// How the lab's nodes are named as probe sources (`node/node-1`): traffic from the node's
/// own namespace, which the node's datapath names `host` and the other nodes `remote-node`.
pub const NODE_PREFIX: &str = "node/";
/// Probes in flight at once: a 9x9 matrix on 4 port/protocol pairs finishes in a few
/// timeouts even when everything is denied.
const MAX_PARALLEL: usize = 32;
/// UDP has no handshake: the token is sent this many times within the timeout, so one
/// datagram lost to neighbour resolution does not read as a denial.
const UDP_ATTEMPTS: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(format!("{s:?} is not a protocol (TCP, UDP or SCTP)")),
        }
    }
}

/// Which address of a destination pod a probe connects to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// The pod's own IP.
    #[default]
    PodIp,
    /// The ClusterIP of a Service whose ready endpoints are exactly that pod and that has a
    /// port numbered as the probed port with the probed protocol (the conformance model
    /// makes one such Service per pod). World hosts are always probed at their address;
    /// a world host probing a ClusterIP is denied, as outside a real cluster: only the pods'
    /// own interfaces translate ClusterIPs.
    Service,
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Via::PodIp => "pod-ip",
            Via::Service => "service",
        })
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ProbeOptions {
    pub via: Via,
    /// For the whole probe: connect and echo (TCP), or the echo (UDP).
    pub timeout: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            via: Via::PodIp,
            timeout: Duration::from_secs(1),
        }
    }
}

/// A matrix: every selected peer to every selected peer, on every port and protocol.
#[derive(Clone, Debug, Default)]
pub struct ProbeRequest {
    /// Pods of these namespaces (all if empty).
    pub namespaces: Vec<String>,
    /// Pods carrying all these labels (matchLabels).
    pub selector: BTreeMap<String, String>,
    /// The world hosts too, as sources and destinations.
    pub world: bool,
    /// The lab's nodes too, as sources (nothing on a node answers a probe).
    pub nodes: bool,
    pub ports: Vec<u16>,
    pub protocols: Vec<Protocol>,
    pub options: ProbeOptions,
}

/// One connection attempt and its outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Probe {
    /// `namespace/pod` or `world/<host>`.
    pub from: String,
    /// `namespace/pod`, `world/<host>`, or the address probed when given as one.
    pub to: String,
    /// What the probe connected to: pod IP, ClusterIP or world address.
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub allowed: bool,
    /// `echoed`, `timed out`, `refused`, `reset`, `unreachable`, ...
    pub detail: String,
    /// Why: what the socket saw, and for silence the datapath's drop events.
    pub outcome: Outcome,
}

/// Every probe of a request; `sources` and `destinations` in row and column order.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeMatrix {
    pub via: Via,
    pub sources: Vec<String>,
    pub destinations: Vec<String>,
    pub probes: Vec<Probe>,
}

impl ProbeMatrix {
    /// The verdict for one cell, if it was probed.
    pub fn allowed(&self, from: &str, to: &str, port: u16, protocol: Protocol) -> Option<bool> {
        self.probes
            .iter()
            .find(|p| p.from == from && p.to == to && p.port == port && p.protocol == protocol)
            .map(|p| p.allowed)
    }

    /// One truth table per port and protocol, as the upstream e2e tests print them: rows are
    /// sources, columns destinations, `.` allowed and `X` denied.
    pub fn render(&self) -> String {
        let pairs: BTreeSet<(u16, Protocol)> =
            self.probes.iter().map(|p| (p.port, p.protocol)).collect();
        let cells: BTreeMap<(&str, &str, u16, Protocol), char> = self
            .probes
            .iter()
            .map(|p| {
                (
                    (p.from.as_str(), p.to.as_str(), p.port, p.protocol),
                    p.outcome.mark(),
                )
            })
            .collect();
        let first = self
            .sources
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0)
            .max(1);
        let mut out = String::new();
        for (port, protocol) in pairs {
            let allowed = self
                .probes
                .iter()
                .filter(|p| p.port == port && p.protocol == protocol && p.allowed)
                .count();
            let total = self.sources.len() * self.destinations.len();
            let unrunnable = self
                .probes
                .iter()
                .filter(|p| p.port == port && p.protocol == protocol)
                .filter(|p| matches!(p.outcome, Outcome::NotRunnable { .. }))
                .count();
            let unrunnable = if unrunnable > 0 {
                format!(", {unrunnable} not runnable")
            } else {
                String::new()
            };
            out.push_str(&format!(
                "{port}/{protocol} via {}: {allowed} of {total} allowed{unrunnable}\n",
                self.via
            ));
            out.push_str(&format!("{:first$}", "-"));
            for d in &self.destinations {
                out.push_str(&format!(" {d}"));
            }
            out.push('\n');
            for s in &self.sources {
                let mut row = format!("{s:first$}");
                for d in &self.destinations {
                    let mark = cells
                        .get(&(s.as_str(), d.as_str(), port, protocol))
                        .copied()
                        .unwrap_or('?');
                    row.push_str(&format!(" {mark:w$}", w = d.len()));
                }
                out.push_str(row.trim_end());
                out.push('\n');
            }
            out.push('\n');
        }
        out.push_str(LEGEND);
        out.push('\n');
        out
    }

    /// Cells that could not run (SCTP without SCTP sockets, ...).
    pub fn not_runnable(&self) -> usize {
        self.probes
            .iter()
            .filter(|p| matches!(p.outcome, Outcome::NotRunnable { .. }))
            .count()
    }
}

/// A peer of a matrix or a single probe.
struct Peer {
    name: String,
    netns: String,
    kind: PeerKind,
}

enum PeerKind {
    /// Key of the pod record.
    Pod(String),
    World(Ipv4Addr),
    /// A source only.
    Node,
}

/// One probe to run: from a source's namespace to an address; or, with `skip`, one that
/// cannot run, with its outcome.
struct Job {
    from: String,
    netns: usize,
    to: String,
    address: SocketAddr,
    protocol: Protocol,
    skip: Option<Outcome>,
}

/// Why `protocol` cannot be probed here, if it cannot.
fn unrunnable(protocol: Protocol) -> Option<String> {
    if protocol != Protocol::Sctp {
        return None;
    }
    Some(
        match nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::empty(),
            nix::sys::socket::SockProtocol::Sctp,
        ) {
            Err(e) => format!("this kernel has no SCTP sockets (socket: {e})"),
            Ok(_) => "the lab's servers serve TCP and UDP only".into(),
        },
    )
}

fn labels_match(record: &PodRecord, selector: &BTreeMap<String, String>) -> bool {
    let labels = record.pod.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

impl Lab {
    /// Probes every selected peer to every selected peer on every port and protocol.
    pub fn probe(&self, request: &ProbeRequest) -> Result<ProbeMatrix, LabError> {
        if request.ports.is_empty() || request.protocols.is_empty() {
            return Err(LabError::Probe(
                "at least one port and one protocol are needed".into(),
            ));
        }
        let mut peers: Vec<Peer> = self
            .state
            .pods
            .iter()
            .filter(|(_, p)| p.ready && p.deleting.is_none())
            .filter(|(_, p)| {
                request.namespaces.is_empty()
                    || request.namespaces.iter().any(|n| n == p.namespace())
            })
            .filter(|(_, p)| labels_match(p, &request.selector))
            .map(|(k, p)| Peer {
                name: k.clone(),
                netns: p.netns.clone(),
                kind: PeerKind::Pod(k.clone()),
            })
            .collect();
        if request.world {
            peers.extend(self.world_peers());
        }
        if peers.is_empty() {
            return Err(LabError::Probe(format!(
                "no ready pod matches namespaces {:?} and selector {:?}",
                request.namespaces, request.selector
            )));
        }
        let destinations: Vec<String> = peers.iter().map(|p| p.name.clone()).collect();
        if request.nodes {
            let nodes: Vec<Peer> = self.node_peers();
            // Nodes first among the sources, then pods and world hosts as before.
            peers.splice(0..0, nodes);
        }
        let netns: Vec<String> = peers.iter().map(|p| p.netns.clone()).collect();
        let services = self.single_pod_services();
        let mut jobs = Vec::new();
        let mut traced = Vec::new();
        for &port in &request.ports {
            for &protocol in &request.protocols {
                let unrunnable = unrunnable(protocol);
                for (i, from) in peers.iter().enumerate() {
                    for to in peers.iter().filter(|p| !matches!(p.kind, PeerKind::Node)) {
                        // A cell that cannot run needs no Service of its protocol.
                        let via = match unrunnable {
                            Some(_) => Via::PodIp,
                            None => request.options.via,
                        };
                        let address = self.address_of(to, port, protocol, via, &services)?;
                        let skip = match &unrunnable {
                            Some(why) => Some(Outcome::NotRunnable { why: why.clone() }),
                            None => not_routed(from, request.options.via),
                        };
                        traced.push(self.traced(from, to, address));
                        jobs.push(Job {
                            from: from.name.clone(),
                            netns: i,
                            to: to.name.clone(),
                            address: SocketAddr::from((address, port)),
                            protocol,
                            skip,
                        });
                    }
                }
            }
        }
        let since = outcome::now();
        let mut probes = run(&netns, jobs, request.options.timeout)?;
        outcome::explain(&mut probes, &traced, &self.agents(), since);
        let sources: Vec<String> = peers.into_iter().map(|p| p.name).collect();
        Ok(ProbeMatrix {
            via: request.options.via,
            sources,
            destinations,
            probes,
        })
    }

    /// One probe. `from`: `namespace/pod`, `pod` (in default), `world/<host>` or
    /// `node/<node>`; `to`: a pod or world host, or an IPv4 address.
    pub fn probe_one(
        &self,
        from: &str,
        to: &str,
        port: u16,
        protocol: Protocol,
        options: &ProbeOptions,
    ) -> Result<Probe, LabError> {
        if let Some(why) = unrunnable(protocol) {
            return Err(LabError::Probe(format!("cannot probe {protocol}: {why}")));
        }
        let source = self.peer(from)?;
        let (to, address, destination) = match to.parse::<Ipv4Addr>() {
            Ok(address) => (to.to_string(), address, None),
            Err(_) => {
                let peer = self.peer(to)?;
                if matches!(peer.kind, PeerKind::Node) {
                    return Err(LabError::Probe(format!(
                        "{to}: a node is a probe source only (nothing on it answers); probe its address instead"
                    )));
                }
                let services = self.single_pod_services();
                let address = self.address_of(&peer, port, protocol, options.via, &services)?;
                (peer.name.clone(), address, Some(peer))
            }
        };
        let traced = match &destination {
            Some(peer) => self.traced(&source, peer, address),
            None => Traced {
                source: self.source_address(&source),
                destinations: vec![address],
            },
        };
        let job = Job {
            from: source.name.clone(),
            netns: 0,
            to,
            address: SocketAddr::from((address, port)),
            protocol,
            skip: destination.and(not_routed(&source, options.via)),
        };
        let since = outcome::now();
        let mut probes = run(&[source.netns], vec![job], options.timeout)?;
        outcome::explain(&mut probes, &[traced], &self.agents(), since);
        probes
            .pop()
            .ok_or_else(|| LabError::Probe("the probe produced no result".into()))
    }

    fn world_peers(&self) -> Vec<Peer> {
        self.state
            .spec
            .world
            .iter()
            .map(|w| Peer {
                name: format!("{WORLD_PREFIX}{}", w.name),
                netns: names::world_netns(&self.state.name, &w.name),
                kind: PeerKind::World(w.address),
            })
            .collect()
    }

    /// Every node's agent, asked for drop events with a short timeout.
    fn agents(&self) -> Vec<sluice_api::Client> {
        self.state
            .spec
            .nodes
            .iter()
            .map(|n| {
                sluice_api::Client::new(self.agent_socket(&n.name))
                    .with_timeout(Duration::from_secs(2))
            })
            .collect()
    }

    /// The address a source's packets carry, where the lab knows it (a node picks its own).
    fn source_address(&self, peer: &Peer) -> Option<Ipv4Addr> {
        match &peer.kind {
            PeerKind::Pod(k) => self.state.pods.get(k).map(|p| p.ip),
            PeerKind::World(address) => Some(*address),
            PeerKind::Node => None,
        }
    }

    /// How the drop events name a probe from `from` to `to` at `address`: the dialled
    /// address, and the pod itself when that is its ClusterIP.
    fn traced(&self, from: &Peer, to: &Peer, address: Ipv4Addr) -> Traced {
        let mut destinations = vec![address];
        if let Some(ip) = self.source_address(to)
            && ip != address
        {
            destinations.push(ip);
        }
        Traced {
            source: self.source_address(from),
            destinations,
        }
    }

    fn node_peers(&self) -> Vec<Peer> {
        self.state
            .spec
            .nodes
            .iter()
            .map(|n| Peer {
                name: format!("{NODE_PREFIX}{}", n.name),
                netns: names::node_netns(&self.state.name, &n.name),
                kind: PeerKind::Node,
            })
            .collect()
    }

    fn peer(&self, text: &str) -> Result<Peer, LabError> {
        if let Some(name) = text.strip_prefix(NODE_PREFIX)
            && self.state.spec.node(name).is_some()
        {
            return Ok(Peer {
                name: text.to_string(),
                netns: names::node_netns(&self.state.name, name),
                kind: PeerKind::Node,
            });
        }
        if let Some(host) = text
            .strip_prefix(WORLD_PREFIX)
            .and_then(|name| self.state.spec.world_host(name))
        {
            return Ok(Peer {
                name: format!("{WORLD_PREFIX}{}", host.name),
                netns: names::world_netns(&self.state.name, &host.name),
                kind: PeerKind::World(host.address),
            });
        }
        let (namespace, name) = text.split_once('/').unwrap_or(("default", text));
        let k = key(namespace, name);
        let record = self.state.pods.get(&k).ok_or_else(|| {
            if text.starts_with(WORLD_PREFIX) {
                LabError::Probe(format!("no world host {name} (and no pod {k}) in the lab"))
            } else if text.starts_with(NODE_PREFIX) {
                LabError::Probe(format!("no node {name} (and no pod {k}) in the lab"))
            } else {
                LabError::PodNotFound(k.clone())
            }
        })?;
        Ok(Peer {
            name: k.clone(),
            netns: record.netns.clone(),
            kind: PeerKind::Pod(k),
        })
    }

    /// Service key -> (ClusterIP, the single ready endpoint address), for every Service with a
    /// ClusterIP whose ready endpoints are exactly one address.
    fn single_pod_services(&self) -> BTreeMap<String, (Ipv4Addr, Ipv4Addr)> {
        let pods = self.state.pod_objects();
        let all = self.state.endpoint_slices(&pods);
        let mut out = BTreeMap::new();
        for (k, svc) in &self.state.services {
            let Some(cluster_ip) = plan::cluster_ip(&svc.object) else {
                continue;
            };
            let namespace = svc
                .object
                .metadata
                .namespace
                .as_deref()
                .unwrap_or("default");
            let name = svc.object.metadata.name.as_deref().unwrap_or_default();
            let ready: BTreeSet<&str> = all
                .iter()
                .filter(|s| {
                    s.metadata.namespace.as_deref() == Some(namespace)
                        && s.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(slices::SERVICE_NAME_LABEL))
                            .is_some_and(|n| n == name)
                })
                .flat_map(|s| &s.endpoints)
                // An absent condition means ready, as the API defines it.
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                .flat_map(|e| &e.addresses)
                .map(String::as_str)
                .collect();
            if let [only] = ready.into_iter().collect::<Vec<_>>()[..]
                && let Ok(address) = only.parse()
            {
                out.insert(k.clone(), (cluster_ip, address));
            }
        }
        out
    }

    fn address_of(
        &self,
        peer: &Peer,
        port: u16,
        protocol: Protocol,
        via: Via,
        services: &BTreeMap<String, (Ipv4Addr, Ipv4Addr)>,
    ) -> Result<Ipv4Addr, LabError> {
        let record = match &peer.kind {
            PeerKind::World(address) => return Ok(*address),
            PeerKind::Node => {
                return Err(LabError::Probe(format!(
                    "{}: a node is a probe source only",
                    peer.name
                )));
            }
            PeerKind::Pod(k) => self
                .state
                .pods
                .get(k)
                .ok_or_else(|| LabError::PodNotFound(k.clone()))?,
        };
        if via == Via::PodIp {
            return Ok(record.ip);
        }
        // In key order, so the choice is stable when several qualify.
        let found = services.iter().find(|(k, (_, endpoint))| {
            *endpoint == record.ip
                && self.state.services.get(*k).is_some_and(|svc| {
                    svc.object.metadata.namespace.as_deref() == Some(record.namespace())
                        && svc
                            .object
                            .spec
                            .iter()
                            .flat_map(|s| s.ports.iter().flatten())
                            .any(|p| {
                                i32::from(port) == p.port
                                    && slices::protocol(p.protocol.as_ref()) == protocol.as_str()
                            })
                })
        });
        found.map(|(_, (cluster_ip, _))| *cluster_ip).ok_or_else(|| {
            LabError::Probe(format!(
                "--via service: no Service in {} has exactly {} as its ready endpoint and a port {port}/{protocol}",
                record.namespace(),
                peer.name
            ))
        })
    }
}

/// A world host to a ClusterIP: kube-proxy routes none from outside the cluster.
fn not_routed(from: &Peer, via: Via) -> Option<Outcome> {
    (matches!(from.kind, PeerKind::World(_)) && via == Via::Service).then_some(Outcome::NotRouted)
}

/// Runs the jobs on up to [`MAX_PARALLEL`] threads, each entering the namespace of its job's
/// source (threads of their own: the caller's namespace never changes). Results in job order.
fn run(netns: &[String], jobs: Vec<Job>, timeout: Duration) -> Result<Vec<Probe>, LabError> {
    let namespaces = netns
        .iter()
        .map(|n| NetNs::open(n))
        .collect::<Result<Vec<NetNs>, _>>()?;
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Probe>>> = Mutex::new(jobs.iter().map(|_| None).collect());
    let first_error: Mutex<Option<LabError>> = Mutex::new(None);
    let token_base = fastrand::u64(..);
    thread::scope(|scope| {
        for _ in 0..jobs.len().min(MAX_PARALLEL) {
            scope.spawn(|| {
                let mut entered = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    if entered != Some(job.netns) {
                        // This scoped thread is the probe's own: it may switch namespaces.
                        if let Err(e) = namespaces[job.netns].enter() {
                            if let Ok(mut slot) = first_error.lock() {
                                slot.get_or_insert(e.into());
                            }
                            break;
                        }
                        entered = Some(job.netns);
                    }
                    let token = format!(
                        "sluice-probe {token_base:016x}-{i} {} -> {}\n",
                        job.from, job.to
                    );
                    let (allowed, detail, outcome) = match &job.skip {
                        Some(outcome) => (false, outcome.describe(), outcome.clone()),
                        None => {
                            let (allowed, detail) = match job.protocol {
                                Protocol::Udp => probe_udp(job.address, token.as_bytes(), timeout),
                                _ => probe_tcp(job.address, token.as_bytes(), timeout),
                            };
                            let outcome = outcome::from_socket(allowed, &detail);
                            (allowed, detail, outcome)
                        }
                    };
                    if let Ok(mut slots) = results.lock() {
                        slots[i] = Some(Probe {
                            from: job.from.clone(),
                            to: job.to.clone(),
                            address: match job.address {
                                SocketAddr::V4(a) => *a.ip(),
                                SocketAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
                            },
                            port: job.address.port(),
                            protocol: job.protocol,
                            allowed,
                            detail,
                            outcome,
                        });
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    let results = results.into_inner().unwrap_or_default();
    let probes: Vec<Probe> = results.into_iter().flatten().collect();
    if probes.len() != jobs.len() {
        return Err(LabError::Probe(format!(
            "{} of {} probes produced no result",
            jobs.len() - probes.len(),
            jobs.len()
        )));
    }
    Ok(probes)
}

fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timed out".into(),
        ErrorKind::ConnectionRefused => "refused".into(),
        ErrorKind::ConnectionReset => "reset".into(),
        ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable => "unreachable".into(),
        _ => e.to_string(),
    }
}

/// Time left until `deadline`, at least a millisecond (a zero timeout means "none" to std).
fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn probe_tcp(address: SocketAddr, token: &[u8], timeout: Duration) -> (bool, String) {
    let deadline = Instant::now() + timeout;
    let mut stream = match TcpStream::connect_timeout(&address, timeout) {
        Ok(s) => s,
        Err(e) => return (false, describe(&e)),
    };
    let mut exchange = || -> std::io::Result<Vec<u8>> {
        stream.set_write_timeout(Some(left(deadline)))?;
        stream.write_all(token)?;
        let mut got = Vec::with_capacity(token.len());
        let mut buf = [0u8; 512];
        while got.len() < token.len() {
            stream.set_read_timeout(Some(left(deadline)))?;
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok(got)
    };
    match exchange() {
        Ok(got) if got == token => (true, "echoed".into()),
        Ok(got) => (
            false,
            format!(
                "connected, but the answer was {:?}",
                String::from_utf8_lossy(&got)
            ),
        ),
        Err(e) => (false, format!("connected, then {}", describe(&e))),
    }
}

fn probe_udp(address: SocketAddr, token: &[u8], timeout: Duration) -> (bool, String) {
    let deadline = Instant::now() + timeout;
    let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| {
        s.connect(address)?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => return (false, format!("socket: {e}")),
    };
    let mut buf = [0u8; 2048];
    let mut last = "timed out".to_string();
    for _ in 0..UDP_ATTEMPTS {
        if Instant::now() >= deadline {
            break;
        }
        if let Err(e) = socket.send(token) {
            return (false, describe(&e));
        }
        let wait = (timeout / UDP_ATTEMPTS).min(left(deadline));
        loop {
            if let Err(e) = socket.set_read_timeout(Some(wait.max(Duration::from_millis(1)))) {
                return (false, e.to_string());
            }
            match socket.recv(&mut buf) {
                Ok(n) if &buf[..n] == token => return (true, "echoed".into()),
                // Something else (a late answer to nothing we sent): keep listening.
                Ok(_) => {}
                // ICMP port unreachable: nothing listens, or a reject.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    return (false, "refused".into());
                }
                Err(e) => {
                    last = describe(&e);
                    break;
                }
            }
        }
    }
    (false, last)
}

#[cfg(test)]
mod tests;
