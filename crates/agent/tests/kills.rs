//! The agent killed at random points inside a realize pass (issue 14 item 2): a real agent
//! on a node namespace (client and server pods, `fault_node`) realizes changes of thousands
//! of Services and of the pods' policies, and is killed with SIGKILL at a seeded random
//! delay within the time such a pass takes, then started again. After each kill the half
//! done state in the kernel is checked (every slot a frontend counts is there and names a
//! backend `lb4_backends` holds; every enforced endpoint has a policy map with rows), after
//! each restart the agent converges and `verify` is clean, and over the whole run the
//! datapath's own counters of what it found dangling (NO_BACKEND_SLOT, SLOT_BACKEND_MISSING,
//! POLICY_UNAVAILABLE) or denied (POLICY, for traffic every revision allows) stay at 0
//! while a client loops requests through a ClusterIP whose slots change every pass.
//!
//! `SLUICE_KILL_TRIALS` (5 by default, CI) and `SLUICE_KILL_SEED` (decimal) set the run;
//! the long run (100 trials) is `kill_trials_long`, ignored, whose figures go into
//! bench/results/reliability/report.md. Needs root and bpffs; never skipped.
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fault_node;
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use fault_node::{CLIENT, METRICS, Node, SERVER, line};
use sluice_common::{
    DropReason, ENDPOINT_F_EGRESS_ENFORCED, ENDPOINT_F_INGRESS_ENFORCED,
    ENDPOINT_F_POLICY_OVERFLOW, LB4_SCOPE_DEFAULT, Lb4BackendKey, Lb4Key, Lb4Service,
    METRIC_DIR_EGRESS, METRIC_DIR_INGRESS,
};
use sluice_datapath::PinnedMaps;
use sluice_netns::NsThread;
use sluice_store::Snapshot;
use support::{NODE, vip};

/// Services besides the one the client uses: enough that a pass takes measurable time.
const SERVICES: u32 = 4000;
/// The ports the server answers on; the web Service's slots move among them.
const SERVER_PORTS: [u16; 3] = [8080, 8081, 8082];
/// What `Node` starts the agent with, for starting it again.
const ARGS: [&str; 4] = ["--reconcile-interval", "0.5", "--metrics-address", METRICS];

/// Backend `n` of bulk Service `i` at `revision`: odd revisions give each Service two
/// backends, even ones three others, so every pass replaces every backend and slot and
/// changes every frontend's count.
fn bulk_backends(i: u32, revision: u64) -> Vec<Ipv4Addr> {
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 8;
    if revision % 2 == 1 {
        (0..2).map(|n| Ipv4Addr::from(base + n)).collect()
    } else {
        (4..7).map(|n| Ipv4Addr::from(base + n)).collect()
    }
}

/// The web Service's backends at `revision` (the server on two or three ports).
fn web_ports(revision: u64) -> &'static [u16] {
    if revision % 2 == 1 {
        &SERVER_PORTS[..2]
    } else {
        &SERVER_PORTS
    }
}

fn service(name: &str, address: Ipv4Addr) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": address.to_string(),
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
    })
}

/// One EndpointSlice of Service `service`: `addresses` ready on `port`.
fn slice(service: &str, n: u16, addresses: &[Ipv4Addr], port: u16) -> serde_json::Value {
    let endpoints: Vec<_> = addresses
        .iter()
        .map(|a| serde_json::json!({"addresses": [a.to_string()], "conditions": {"ready": true}}))
        .collect();
    serde_json::json!({
        "metadata": {"name": format!("{service}-{n}"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    })
}

/// The policies at `revision`: the server takes the client on its ports and the client
/// reaches the server on them, each with a port that changes every revision, so every pass
/// swaps both pods' policy maps; and an ipBlock rule that changes with it.
fn policies(revision: u64) -> serde_json::Value {
    let ports = |extra: u64| {
        let mut ports: Vec<_> = SERVER_PORTS
            .iter()
            .map(|p| serde_json::json!({"protocol": "TCP", "port": p}))
            .collect();
        ports.push(serde_json::json!({"protocol": "TCP", "port": extra + revision % 50}));
        ports
    };
    let peer = |app: &str| serde_json::json!([{"podSelector": {"matchLabels": {"app": app}}}]);
    serde_json::json!([
        {"metadata": {"name": "server", "namespace": "default"},
         "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                  "ingress": [{"from": peer("client"), "ports": ports(9000)}]}},
        {"metadata": {"name": "client", "namespace": "default"},
         "spec": {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                  "egress": [{"to": peer("server"), "ports": ports(9100)}]}},
        {"metadata": {"name": "blocks", "namespace": "default"},
         "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                  "ingress": [{"from": [{"ipBlock": {"cidr": format!("10.{}.0.0/16", 1 + revision % 50)}}],
                               "ports": [{"protocol": "TCP", "port": 7000}]}]}},
    ])
}

/// node-1 with the client and server pods, the web Service (`vip(0)`, the server on the
/// ports of [`web_ports`]), [`SERVICES`] others, and the [`policies`] of `revision`.
fn cluster(revision: u64) -> Snapshot {
    let pod = |name: &str, address: Ipv4Addr| {
        serde_json::json!({"metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
            "spec": {"nodeName": NODE, "containers": [{"name": "c"}]},
            "status": {"podIP": address.to_string()}})
    };
    let endpoint = |name: &str, interface: &str, address: Ipv4Addr| {
        serde_json::json!({"node": NODE, "namespace": "default", "pod": name,
            "interface": interface, "addresses": [address.to_string()]})
    };
    let mut services = vec![service("web", vip(0))];
    let mut slices: Vec<_> = (0u16..)
        .zip(web_ports(revision))
        .map(|(n, port)| slice("web", n, &[SERVER], *port))
        .collect();
    for i in 0..SERVICES {
        let name = format!("svc-{i}");
        services.push(service(&name, vip(i + 1)));
        slices.push(slice(&name, 0, &bulk_backends(i, revision), 8080));
    }
    serde_json::from_value(serde_json::json!({
        "revision": revision,
        "nodes": [{"metadata": {"name": NODE}, "spec": {"podCIDR": "10.244.1.0/24"},
                   "status": {"addresses": [{"type": "InternalIP", "address": "172.31.0.1"}]}}],
        "namespaces": [{"metadata": {"name": "default",
                                      "labels": {"kubernetes.io/metadata.name": "default"}}}],
        "pods": [pod("client", CLIENT), pod("server", SERVER)],
        "endpoints": [endpoint("client", "lxc-cl", CLIENT), endpoint("server", "lxc-sv", SERVER)],
        "services": services,
        "endpointSlices": slices,
        "networkPolicies": policies(revision),
    }))
    .unwrap()
}

/// Where a kill landed in the pass from `revision - 1` to `revision`, told by the bulk
/// backends the kernel holds (written first, removed last).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Landed {
    /// None of the new backends yet: still compiling, or not yet started.
    BeforeWrites,
    /// Some written and not all of the old ones removed: a half-done pass.
    MidPass,
    /// The new state whole.
    AfterWrites,
}

fn landed(maps: &PinnedMaps, revision: u64) -> Landed {
    let held: BTreeSet<Lb4BackendKey> = maps.backends.keys().map(Result::unwrap).collect();
    let count = |revision: u64| {
        let keys: Vec<_> = (0..SERVICES)
            .flat_map(|i| bulk_backends(i, revision))
            .map(|a| Lb4BackendKey::new(a, 8080, sluice_common::IPPROTO_TCP))
            .collect();
        let present = keys.iter().filter(|k| held.contains(k)).count();
        (present, keys.len())
    };
    let (new, new_all) = count(revision);
    let (old, old_all) = count(revision - 1);
    match (new, old) {
        (0, o) if o == old_all => Landed::BeforeWrites,
        (n, 0) if n == new_all => Landed::AfterWrites,
        _ => Landed::MidPass,
    }
}

/// The kernel's state, however far a pass got, names nothing that is not there: every
/// slot a frontend counts is present and names a backend `lb4_backends` holds, and every
/// endpoint whose policy is enforced has a policy map with rows. Returns the frontends
/// and enforced endpoints checked.
fn whole_references(maps: &PinnedMaps) -> (usize, usize) {
    let services: BTreeMap<Lb4Key, Lb4Service> = maps.services.iter().map(Result::unwrap).collect();
    let backends: BTreeSet<Lb4BackendKey> = maps.backends.keys().map(Result::unwrap).collect();
    let frontends: Vec<_> = services
        .iter()
        .filter(|(k, _)| k.slot == 0 && k.proto != 0 && k.scope == LB4_SCOPE_DEFAULT)
        .collect();
    for (key, frontend) in &frontends {
        for slot in 1..=frontend.count {
            let named = services
                .get(&Lb4Key { slot, ..**key })
                .unwrap_or_else(|| panic!("frontend {key:?} counts slot {slot}, which is missing"));
            let backend = Lb4BackendKey::new(named.backend(), named.port(), key.proto);
            assert!(
                backends.contains(&backend),
                "slot {slot} of {key:?} names {backend:?}, which lb4_backends does not hold"
            );
        }
    }
    let mut enforced = 0;
    for entry in maps.endpoints.iter() {
        let (ifindex, info) = entry.unwrap();
        let flags = ENDPOINT_F_INGRESS_ENFORCED | ENDPOINT_F_EGRESS_ENFORCED;
        if info.flags & flags == 0 || info.flags & ENDPOINT_F_POLICY_OVERFLOW != 0 {
            continue;
        }
        enforced += 1;
        let rows = maps
            .policy
            .get(&ifindex, 0)
            .unwrap_or_else(|e| panic!("enforced endpoint {ifindex} has no policy map: {e}"))
            .keys()
            .count();
        assert!(
            rows > 0,
            "enforced endpoint {ifindex} has an empty policy map"
        );
    }
    (frontends.len(), enforced)
}

/// The datapath's counters that would show a dangling or missing reference read, or a
/// request every revision allows denied, summed over both directions.
const WATCHED: [DropReason; 4] = [
    DropReason::NoBackendSlot,
    DropReason::SlotBackendMissing,
    DropReason::PolicyUnavailable,
    DropReason::Policy,
];

fn counters(maps: &PinnedMaps) -> BTreeMap<&'static str, u64> {
    WATCHED
        .iter()
        .map(|reason| {
            let packets = [METRIC_DIR_EGRESS, METRIC_DIR_INGRESS]
                .iter()
                .map(|dir| maps.counted(reason.code(), *dir).unwrap().packets)
                .sum();
            (reason.name(), packets)
        })
        .collect()
}

/// Requests through the web Service from the client pod, one after another until stopped.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    thread: Option<NsThread<(u64, Vec<String>)>>,
}

impl ClientLoop {
    fn start(node: &Node) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = node
            .client
            .spawn({
                let stop = stop.clone();
                move || {
                    let (mut answered, mut failed) = (0, Vec::new());
                    let to = SocketAddrV4::new(vip(0), 80).into();
                    let started = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        let answer = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                            .and_then(|mut conn| {
                                conn.set_read_timeout(Some(Duration::from_secs(2)))?;
                                line(&mut conn)
                            });
                        match answer {
                            Ok(text) if text == "ok\n" => answered += 1,
                            other => failed.push(format!("{:?}: {other:?}", started.elapsed())),
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    (answered, failed)
                }
            })
            .unwrap();
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the loop: the requests answered and the failures, with when they happened.
    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for ClientLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A sample of the bulk backends a pass to `revision` writes and removes (one Service in
/// 20, a lookup each: cheap enough to look every millisecond), to see it start and end.
struct Sample {
    new: Vec<Lb4BackendKey>,
    old: Vec<Lb4BackendKey>,
}

impl Sample {
    fn new(revision: u64) -> Self {
        let keys = |revision| {
            (0..SERVICES)
                .step_by(20)
                .flat_map(|i| bulk_backends(i, revision))
                .map(|a| Lb4BackendKey::new(a, 8080, sluice_common::IPPROTO_TCP))
                .collect()
        };
        Self {
            new: keys(revision),
            old: keys(revision - 1),
        }
    }

    /// The pass has written its first backends.
    fn started(&self, maps: &PinnedMaps) -> bool {
        self.new.iter().any(|k| maps.backends.get(k, 0).is_ok())
    }

    /// The pass has removed the last backends.
    fn finished(&self, maps: &PinnedMaps) -> bool {
        self.old.iter().all(|k| maps.backends.get(k, 0).is_err())
    }
}

/// Polls until `done` holds; how long that took.
fn until(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{what}: not within 120 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    started.elapsed()
}

/// A pass left alone: how long after writing `revision` its writes begin, and how long
/// they last.
fn pass_phases(node: &mut Node, maps: &PinnedMaps, revision: u64) -> (Duration, Duration) {
    let sample = Sample::new(revision);
    support::write(&node.agent.cluster_file(), &cluster(revision));
    let before = until("the first write", || sample.started(maps));
    let writing = until("the last write", || sample.finished(maps));
    node.agent.wait_realized(revision);
    (before, writing)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is no number"))
        })
        .unwrap_or(default)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

fn kill_trials(trials: u64) {
    let seed: u64 = env_or("SLUICE_KILL_SEED", 14);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut node = Node::serving("kills", &cluster(1), &[], &SERVER_PORTS);
    let maps = PinnedMaps::open(node.agent.pins.path()).unwrap();
    // Two passes left alone: how long a pass computes before it writes, and how long it
    // writes (the sample's first to last write), to draw the kills' delays from.
    let phases: Vec<_> = (2..=3).map(|r| pass_phases(&mut node, &maps, r)).collect();
    let computing = phases.iter().map(|p| p.0).min().unwrap();
    let writing = phases.iter().map(|p| p.1).max().unwrap().mul_f64(1.2);
    let before = counters(&maps);
    let client = ClientLoop::start(&node);
    let started = Instant::now();
    let mut landed_at: BTreeMap<Landed, u64> = BTreeMap::new();
    let mut converged = Vec::new();
    for trial in 0..trials {
        let revision = 4 + trial;
        let sample = Sample::new(revision);
        let written = Instant::now();
        support::write(&node.agent.cluster_file(), &cluster(revision));
        // One kill in four while the pass computes and reads; the others inside its
        // writes, once they have begun.
        if rng.u8(..4) == 0 {
            std::thread::sleep(computing.mul_f64(rng.f64()));
        } else {
            until("the pass's first write", || sample.started(&maps));
            std::thread::sleep(writing.mul_f64(rng.f64()));
        }
        let delay = written.elapsed();
        node.agent.kill();
        let at = landed(&maps, revision);
        *landed_at.entry(at).or_default() += 1;
        let (frontends, enforced) = whole_references(&maps);
        let restarted = Instant::now();
        node.agent.start_again(&ARGS);
        node.agent.wait_realized(revision);
        let realized = restarted.elapsed();
        converged.push(realized);
        node.verify_clean();
        eprintln!(
            "trial {trial}: killed {delay:?} after the change, {at:?} ({frontends} frontends, \
             {enforced} enforced endpoints whole); realized {realized:?} after the restart, \
             verify clean"
        );
    }
    let (answered, failed) = client.finish();
    let after = counters(&maps);
    eprintln!(
        "{trials} kills (seed {seed}; passes left alone computed {computing:?} and wrote \
         {phases:?}, changing {SERVICES} Services and 3 policies) in {:?}: landed \
         {landed_at:?}; realized after a restart in median {:?}, max {:?}; counters {before:?} -> {after:?}; client {answered} requests \
         answered, {} failed {failed:?}",
        started.elapsed(),
        median(converged.clone()),
        converged.iter().max().copied().unwrap_or_default(),
        failed.len(),
    );
    assert_eq!(
        before, after,
        "the datapath read a dangling or missing reference"
    );
    assert!(failed.is_empty(), "requests through the ClusterIP failed");
    assert!(answered > 0, "the client loop made no request");
}

#[test]
fn agent_killed_inside_a_realize_pass_converges_and_never_dangles() {
    kill_trials(env_or("SLUICE_KILL_TRIALS", 5));
}

#[test]
#[ignore = "the long run (about 25 minutes): bench/results/reliability/report.md"]
fn kill_trials_long() {
    kill_trials(env_or("SLUICE_KILL_TRIALS", 100));
}
