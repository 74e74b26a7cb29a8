//! Agent restarts under load (issue 14, item 1), in a three-node lab: every node's agent is
//! restarted in turn, alternately by SIGTERM and by `kill -9`, while every node's client
//! loops short requests (a new connection each) through a ClusterIP with backends on two
//! nodes and to a pod on another node, and holds long-lived connections (a request every
//! 50 ms) through the ClusterIP and to a pod on another node. Not one request may fail,
//! not one connection be reset, `sluice verify` is clean on every node after each restart,
//! the new agent's first pass writes no map entry (the pins hold what the objects say),
//! and the programs are swapped in their pinned links: a link keeps its id while its
//! program id changes, and no tcx hook is ever seen empty or doubled.
//!
//! node-3's agent is restarted through `sluice lab node restart-agent`, the others' through
//! the lab library. CI runs two restarts per node (one of each kind). The long run restarts every node ten
//! times: `SLUICE_RESTARTS=10 cargo test -p sluice-integration --test restart -- --nocapture`.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use sluice_common::names;
use sluice_integration::{
    TestLab,
    load::{
        ECHO_PORT, HeldConnection, LinkState, TcxWatch, Workers, distinct, drops, echo_server,
        first_pass_writes, hold_connection, pinned_links, watch_tcx,
    },
    multinode::{Mode, NODES, Sample, pod_on, request_loop, three_nodes},
};
use sluice_lab::AgentStop;

/// Restarts per node unless `SLUICE_RESTARTS` says otherwise.
const CI_RESTARTS: usize = 2;
/// The long-lived clients' pace.
const EVERY: Duration = Duration::from_millis(50);

/// `client-k` on node-k (k = 1..3), `web-1` on node-1 and `web-2` on node-2 behind the
/// ClusterIP `web`: HTTP on 80 (the pod servers), echo on 9000 (the test's own servers).
fn workload() -> String {
    let mut yaml = String::new();
    for (k, node) in NODES.iter().enumerate() {
        yaml += &pod_on("default", &format!("client-{}", k + 1), node, "app: client");
        yaml += "---\n";
    }
    for (k, node) in NODES[..2].iter().enumerate() {
        yaml += &pod_on("default", &format!("web-{}", k + 1), node, "app: web");
        yaml += "---\n";
    }
    yaml + &format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: 80, protocol: TCP}}
  - {{name: echo, port: {ECHO_PORT}, targetPort: {ECHO_PORT}, protocol: TCP}}
"
    )
}

fn restarts() -> usize {
    std::env::var("SLUICE_RESTARTS").map_or(CI_RESTARTS, |n| {
        n.parse()
            .expect("SLUICE_RESTARTS: a number of restarts per node")
    })
}

/// The pod on the next node, for pod-to-pod traffic across nodes.
fn peer_of(k: usize) -> String {
    format!("default/client-{}", k % 3 + 1)
}

/// Where `at` falls among the restarts: in one (node, how, from its signal) or after one.
fn during(events: &[Event], at: Instant) -> String {
    let Some((node, how, signalled, realized)) = events
        .iter()
        .rev()
        .find(|(_, _, signalled, _)| *signalled <= at)
    else {
        return "before the first restart".into();
    };
    let since = at - *signalled;
    if at <= *realized {
        format!("{since:?} into the {how:?} restart of {node}")
    } else {
        format!(
            "{:?} after the {how:?} restart of {node} realized",
            at - *realized
        )
    }
}

/// Restarts `node`'s agent: node-3's through `sluice lab node restart-agent`, the others'
/// through the lab library. Returns how long it took to stop, and to realize after it
/// started again.
fn restart(lab: &TestLab, node: &str, how: AgentStop) -> (Duration, Duration) {
    if node != "node-3" {
        let restart = lab
            .lab
            .restart_agent(node, how)
            .unwrap_or_else(|e| panic!("restart {node} ({how:?}): {e}"));
        return (restart.stopped, restart.realized);
    }
    let mut args = vec!["lab", "node", "restart-agent", node];
    if how == AgentStop::Kill {
        args.push("--kill");
    }
    let doc = lab.cli_json(&args);
    let signal = if how == AgentStop::Kill {
        "SIGKILL"
    } else {
        "SIGTERM"
    };
    assert_eq!(doc["node"], node, "{doc}");
    assert_eq!(doc["signal"], signal, "{doc}");
    let ms = |field: &str| Duration::from_secs_f64(doc[field].as_f64().unwrap() / 1e3);
    (ms("stopped_ms"), ms("realized_ms"))
}

/// A restart: which node, how, when it was signalled and when it had realized.
type Event = (&'static str, AgentStop, Instant, Instant);
type Loop = (
    Arc<AtomicBool>,
    Arc<Mutex<Vec<Sample>>>,
    std::thread::JoinHandle<()>,
);

/// Every client's loops: short requests (a new connection each) and long-lived connections,
/// through the ClusterIP and to the pod on the next node.
struct Traffic {
    short: Vec<(String, Loop)>,
    held: Vec<(String, Arc<Mutex<HeldConnection>>)>,
}

fn start_traffic(lab: &TestLab, workers: &mut Workers) -> Traffic {
    let vip = lab.cluster_ip("web");
    for pod in ["web-1", "web-2", "client-1", "client-2", "client-3"] {
        echo_server(lab, workers, &format!("default/{pod}"));
    }
    let mut traffic = Traffic {
        short: Vec::new(),
        held: Vec::new(),
    };
    for k in 1..=3 {
        let client = format!("default/client-{k}");
        let peer = lab.pod_ip(&peer_of(k));
        for (what, ip) in [("ClusterIP", vip), ("pod", peer)] {
            let addr = SocketAddr::from((ip, 80));
            traffic.short.push((
                format!("{client} -> {what} {addr}"),
                request_loop(lab, &client, addr),
            ));
            let addr = SocketAddr::from((ip, ECHO_PORT));
            traffic.held.push((
                format!("{client} -> {what} {addr}"),
                hold_connection(lab, workers, &client, addr, EVERY),
            ));
        }
    }
    traffic
}

/// Restarts every node's agent `per_node` times, alternately by SIGTERM and SIGKILL, with
/// verify clean and no map entry written by the new agent after each.
fn restart_every_node(lab: &TestLab, mode: Mode, per_node: usize) -> Vec<Event> {
    let mut events = Vec::new();
    for round in 0..per_node {
        for node in NODES {
            let how = if round % 2 == 0 {
                AgentStop::Graceful
            } else {
                AgentStop::Kill
            };
            let signalled = Instant::now();
            let (stopped, realized) = restart(lab, node, how);
            events.push((node, how, signalled, Instant::now()));
            eprintln!(
                "{mode:?}: {node} restart {} ({how:?}): stopped in {stopped:?}, realized {realized:?} after its start",
                round + 1,
            );
            // The pins held what the objects say: the new agent rewrote nothing.
            let writes = first_pass_writes(&lab.lab.agent_log(node));
            assert_eq!(
                writes,
                Some((0, 0)),
                "{mode:?}: {node}'s new agent's first pass wrote (upserted, removed) map entries"
            );
            lab.verify_every_node(&format!("{mode:?}: after restart {round} of {node}"));
            // Traffic crosses the restarted node's new programs before the next restart.
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    events
}

/// Stops the traffic, prints what it saw, and fails on any failed request or connection.
fn check_traffic(mode: Mode, traffic: Traffic, workers: &mut Workers, events: &[Event]) {
    // Each short loop is joined, then its samples read.
    let mut short_total = 0;
    let mut short_failed = Vec::new();
    for (what, (stop, samples, thread)) in traffic.short {
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap();
        let samples = samples.lock().unwrap();
        short_total += samples.len();
        short_failed.extend(samples.iter().filter_map(|s| {
            let e = s.answer.as_ref().err()?;
            Some(format!("{what}: {e} ({})", during(events, s.started)))
        }));
    }
    workers.stop();
    let held: Vec<(String, HeldConnection)> = traffic
        .held
        .into_iter()
        .map(|(what, seen)| (what, seen.lock().unwrap().clone()))
        .collect();
    let held_failed: Vec<String> = held
        .iter()
        .flat_map(|(_, h)| &h.failures)
        .map(|(at, e)| format!("{e} ({})", during(events, *at)))
        .collect();
    eprintln!(
        "{mode:?}: {short_total} short requests, {} failed; {} long-lived connections, {} exchanges, {} failed, {} reset, slowest answer {} ms",
        short_failed.len(),
        held.len(),
        held.iter().map(|(_, h)| h.exchanges).sum::<u64>(),
        held_failed.len(),
        held.iter().map(|(_, h)| h.resets).sum::<u64>(),
        held.iter().map(|(_, h)| h.slowest_ms).max().unwrap_or(0),
    );
    assert!(
        short_failed.is_empty(),
        "{mode:?}: short requests failed: {:?}",
        &short_failed[..short_failed.len().min(10)]
    );
    assert!(
        held_failed.is_empty(),
        "{mode:?}: long-lived connections failed: {held_failed:?}"
    );
    for (what, h) in &held {
        assert_eq!(h.connections, 1, "{mode:?}: {what} kept its one connection");
        assert!(h.exchanges > 0, "{mode:?}: {what} exchanged nothing");
    }
}

/// No tcx hook was ever seen empty or doubled, each ran one program per agent, and every
/// pinned link kept its id while it got each new agent's program.
fn check_hooks(
    lab: &TestLab,
    mode: Mode,
    watches: &[(&str, Arc<Mutex<TcxWatch>>)],
    links_before: &BTreeMap<&str, BTreeMap<String, LinkState>>,
    per_node: usize,
) {
    let mut swapped = 0;
    for (node, watch) in watches {
        let watch = watch.lock().unwrap();
        let ids: Vec<usize> = watch.programs.values().map(|ids| distinct(ids)).collect();
        eprintln!(
            "{mode:?}: {node}: {} polls of {} tcx hooks, {} empty, {} doubled, programs per hook {ids:?}",
            watch.polls,
            watch.programs.len(),
            watch.empty.len(),
            watch.doubled.len(),
        );
        assert!(
            watch.empty.is_empty(),
            "{mode:?}: {node}: a hook without its program: {:?}",
            &watch.empty[..watch.empty.len().min(5)]
        );
        assert!(
            watch.doubled.is_empty(),
            "{mode:?}: {node}: two programs on a hook: {:?}",
            &watch.doubled[..watch.doubled.len().min(5)]
        );
        for (hook, history) in &watch.programs {
            assert_eq!(
                distinct(history),
                per_node + 1,
                "{mode:?}: {node}: {hook}: one program per agent: {history:?}"
            );
        }
        let after = pinned_links(&lab.lab.pin_dir(node));
        for (path, before) in &links_before[node] {
            let now = after
                .get(path)
                .unwrap_or_else(|| panic!("{mode:?}: {path} unpinned"));
            assert_eq!(
                now.link_id, before.link_id,
                "{mode:?}: {path} is the same link"
            );
            assert_ne!(
                now.program_id, before.program_id,
                "{mode:?}: {path} runs the new agent's program"
            );
            swapped += 1;
        }
    }
    eprintln!("{mode:?}: {swapped} pinned links kept their id and got new programs");
}

fn restarts_under_load(mode: Mode) {
    let per_node = restarts();
    let mut lab = three_nodes("rst", mode);
    lab.apply_yaml("workload.yaml", &workload());
    lab.verify_every_node("before the restarts");

    let mut workers = Workers::default();
    let traffic = start_traffic(&lab, &mut workers);
    let watches: Vec<_> = NODES
        .iter()
        .map(|node| (*node, watch_tcx(&lab, &mut workers, node)))
        .collect();
    let pins = |node: &str| lab.lab.pin_dir(node);
    let links_before: BTreeMap<&str, _> = NODES
        .iter()
        .map(|node| (*node, pinned_links(&pins(node))))
        .collect();
    let drops_before: BTreeMap<&str, _> = NODES
        .iter()
        .map(|node| (*node, drops(&pins(node))))
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    let started = Instant::now();
    let events = restart_every_node(&lab, mode, per_node);
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let mut times: Vec<Duration> = events.iter().map(|(_, _, from, to)| *to - *from).collect();
    times.sort();
    eprintln!(
        "{mode:?}: {} restarts ({per_node} per node, half SIGTERM, half SIGKILL) in {elapsed:?}; \
         signal to realized: median {:?}, max {:?}",
        times.len(),
        times[times.len() / 2],
        times.last().unwrap(),
    );
    check_traffic(mode, traffic, &mut workers, &events);
    for node in NODES {
        let new: BTreeMap<_, _> = drops(&pins(node))
            .into_iter()
            .filter_map(|(k, n)| {
                let since = n - drops_before[node].get(&k).copied().unwrap_or(0);
                (since > 0).then_some((k, since))
            })
            .collect();
        eprintln!("{mode:?}: {node}: packets dropped during the restarts: {new:?}");
    }
    check_hooks(&lab, mode, &watches, &links_before, per_node);
}

#[test]
fn tunnel_agents_restart_under_load_without_a_failed_request() {
    restarts_under_load(Mode::Tunnel);
}

#[test]
fn native_agents_restart_under_load_without_a_failed_request() {
    restarts_under_load(Mode::Native);
}

/// An agent that finds a pinned map of a layout it does not know (as an agent of another
/// version would) refuses to start, naming the map, before it loads or attaches anything:
/// the running datapath goes on serving the connections it holds and new ones. Once the
/// map is back, a new agent takes over without a failed request.
#[test]
fn an_agent_refusing_a_pinned_map_leaves_the_running_datapath_alone() {
    let mode = Mode::Tunnel;
    let mut lab = three_nodes("rsref", mode);
    lab.apply_yaml("workload.yaml", &workload());
    let vip = lab.cluster_ip("web");
    let mut workers = Workers::default();
    for pod in ["web-1", "web-2", "client-3"] {
        echo_server(&lab, &mut workers, &format!("default/{pod}"));
    }
    let client = "default/client-2";
    let peer = lab.pod_ip("default/client-3");
    let held = [
        hold_connection(&lab, &mut workers, client, (vip, ECHO_PORT).into(), EVERY),
        hold_connection(&lab, &mut workers, client, (peer, ECHO_PORT).into(), EVERY),
    ];
    let (stop, samples, thread) = request_loop(&lab, client, (vip, 80).into());
    std::thread::sleep(Duration::from_millis(300));

    // node-2's conntrack, pinned by a build whose entries are another size.
    let pin = lab.lab.pin_dir("node-2").join(names::CONNTRACK);
    let conntrack = MapData::from_pin(&pin).unwrap();
    std::fs::remove_file(&pin).unwrap();
    let other: HashMap<MapData, u64, [u8; 24]> = HashMap::create(16, 0).unwrap();
    other.pin(&pin).unwrap();
    let refused = lab
        .lab
        .restart_agent("node-2", AgentStop::Graceful)
        .expect_err("an agent refuses a conntrack map of another layout");
    assert!(
        matches!(refused, sluice_lab::LabError::AgentExited { .. }),
        "{refused}"
    );
    // The agent's last words, whatever backtrace follows them.
    let log = std::fs::read_to_string(lab.lab.agent_log("node-2")).unwrap();
    let refusal = log
        .lines()
        .rev()
        .find(|l| l.contains(&format!("map {} pinned at", names::CONNTRACK)))
        .unwrap_or_else(|| panic!("the agent's log names the map: {refused}\n{log}"));
    eprintln!("{mode:?}: the agent refused: {refusal}");
    assert!(
        refusal.contains("value 24"),
        "the refusal says what it found: {refusal}"
    );
    // No agent on node-2 now: its datapath runs on, its conntrack the programs' own.
    let exchanges = || {
        held.iter()
            .map(|h| h.lock().unwrap().exchanges)
            .sum::<u64>()
    };
    let refused_at = exchanges();
    std::thread::sleep(Duration::from_secs(1));
    let answered_meanwhile = exchanges() - refused_at;
    assert!(answered_meanwhile > 0, "the held connections went on");

    std::fs::remove_file(&pin).unwrap();
    conntrack.pin(&pin).unwrap();
    let restart = lab
        .lab
        .restart_agent("node-2", AgentStop::Graceful)
        .unwrap();
    eprintln!(
        "{mode:?}: with its map back, node-2's agent realized {:?} after its start",
        restart.realized
    );
    lab.verify_every_node("after the refused agent was replaced");
    std::thread::sleep(Duration::from_millis(300));

    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
    workers.stop();
    let samples = samples.lock().unwrap();
    let failed: Vec<_> = samples
        .iter()
        .filter_map(|s| s.answer.as_ref().err())
        .collect();
    let held: Vec<HeldConnection> = held.iter().map(|h| h.lock().unwrap().clone()).collect();
    eprintln!(
        "{mode:?}: {} short requests, {} failed; long-lived: {} exchanges ({answered_meanwhile} in the second after the refusal), {:?} failures",
        samples.len(),
        failed.len(),
        held.iter().map(|h| h.exchanges).sum::<u64>(),
        held.iter().map(|h| h.failures.len()).sum::<usize>(),
    );
    assert!(failed.is_empty(), "short requests failed: {failed:?}");
    for h in &held {
        assert!(h.failures.is_empty(), "{:?}", h.failures);
        assert_eq!(h.connections, 1, "one connection throughout");
    }
}
