//! Faults injected into a running agent (issue 14 item 2): pins removed from bpffs, a map
//! too small for the desired state, the ring buffer full, the API socket and the state
//! directory removed. Each is reported (status, metrics, log) and repaired, or fails
//! closed. A real agent on a node namespace with a client and a server pod (needs root and
//! bpffs; never skipped). The node and its pods: `fault_node`.
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fault_node;
mod support;

use std::{
    io::Write,
    net::UdpSocket,
    os::unix::fs::PermissionsExt,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::MapInfo;
use fault_node::{CLIENT, METRICS, Node, PORT, SERVER, cluster, line, sample};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use sluice_api::{AgentStatus, Client, Fault, VerifyRequest};
use sluice_common::{LB4_SCOPE_DEFAULT, Lb4Key, Lb4Service, names};
use sluice_datapath::PinnedMaps;
use support::{snapshot, vip};

fn repaired(status: &AgentStatus, fault: Fault, object: &str) -> u64 {
    status
        .repaired
        .iter()
        .find(|r| r.fault == fault && r.object == object)
        .map_or(0, |r| r.count)
}

/// The kernel's id of the object pinned at `path`.
fn map_id(path: &Path) -> u32 {
    MapInfo::from_pin(path).expect("map info").id()
}

#[test]
fn removed_pins_are_pinned_again_and_reported() {
    let mut node = Node::new("pins", &cluster(1, &[PORT]), &[]);
    assert!(node.connects(), "{}", node.agent.log_text());
    let pins = node.agent.pins.path().to_path_buf();
    let link = std::fs::read_dir(pins.join("links/pod"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("lxc-sv"))
        })
        .expect("a pinned link on lxc-sv");
    let link_name = link.strip_prefix(&pins).unwrap().display().to_string();
    let ids = [names::SERVICES, names::CONNTRACK].map(|m| map_id(&pins.join(m)));

    // One map of desired state, conntrack (runtime state) and a link.
    for path in [
        pins.join(names::SERVICES),
        pins.join(names::CONNTRACK),
        link,
    ] {
        std::fs::remove_file(&path).unwrap();
    }
    let removed = Instant::now();
    // The agent's own fd keeps the link: the server stays policed, no pass needed.
    assert!(node.attached("lxc-sv"), "the link went with its pin");
    assert!(node.connects(), "traffic broke with the pins removed");
    node.agent
        .wait("the pins restored", Duration::from_secs(10), |a| {
            let s = a.status();
            repaired(&s, Fault::PinRemoved, names::SERVICES) == 1
                && repaired(&s, Fault::PinRemoved, names::CONNTRACK) == 1
                && repaired(&s, Fault::PinRemoved, &link_name) == 1
        });
    eprintln!(
        "map and link pins removed: pinned again and reported after {:?} (interval 0.5 s)",
        removed.elapsed()
    );
    // The same maps, not new empty ones.
    assert_eq!(
        [names::SERVICES, names::CONNTRACK].map(|m| map_id(&pins.join(m))),
        ids
    );
    node.verify_clean();
    let metrics = node.metrics();
    for object in [names::SERVICES, names::CONNTRACK, link_name.as_str()] {
        let line =
            format!("sluice_faults_repaired_total{{fault=\"pin-removed\",object=\"{object}\"}}");
        assert_eq!(sample(&metrics, &line), 1.0, "{line} in\n{metrics}");
    }
    assert!(
        node.agent.log_text().contains("pinned again"),
        "{}",
        node.agent.log_text()
    );

    // The whole pin directory, every map and link in it.
    std::fs::remove_dir_all(&pins).unwrap();
    let removed = Instant::now();
    assert!(
        node.connects(),
        "traffic broke with the pin directory removed"
    );
    node.agent
        .wait("the pin directory restored", Duration::from_secs(10), |a| {
            repaired(&a.status(), Fault::PinRemoved, names::IPCACHE) == 1
        });
    eprintln!(
        "pin directory removed: every pin back after {:?}",
        removed.elapsed()
    );
    assert_eq!(map_id(&pins.join(names::SERVICES)), ids[0]);
    node.verify_clean();

    // A restarted agent finds the same maps, and its links on the pods.
    node.agent
        .restart(&["--reconcile-interval", "0.5", "--metrics-address", METRICS]);
    node.agent.wait_realized(1);
    assert_eq!(map_id(&pins.join(names::CONNTRACK)), ids[1]);
    assert!(node.connects());
    node.verify_clean();
}

/// The pinned links of the programs on `ifname`.
fn pod_links(pins: &Path, ifname: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(pins.join("links/pod"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{ifname}_")))
        })
        .collect()
}

/// A change pass realizes its change without the checks it does not need: a program taken
/// off an interface and a map pin removed behind the agent's back are left as they are by
/// it, and the periodic pass finds both and repairs them.
#[test]
fn a_change_pass_skips_the_fixed_checks_and_the_periodic_pass_repairs_drift() {
    // Long enough that a change pass runs between two periodic ones.
    let mut node = Node::new(
        "chgpass",
        &cluster(1, &[PORT]),
        &["--reconcile-interval", "3"],
    );
    assert!(node.connects(), "{}", node.agent.log_text());
    let pins = node.agent.pins.path().to_path_buf();
    // A periodic pass may land between the drift and the change: then again, on the next
    // revision.
    let mut clean = None;
    for revision in 2..6 {
        let links = pod_links(&pins, "lxc-sv");
        assert!(!links.is_empty(), "no pinned link on lxc-sv");
        let mark = node.agent.log_text().len();
        for link in &links {
            let fd = sluice_datapath::sys::obj_get(link).unwrap();
            sluice_datapath::sys::link_detach(std::os::fd::AsFd::as_fd(&fd)).unwrap();
            std::fs::remove_file(link).unwrap();
        }
        std::fs::remove_file(pins.join(names::SERVICES)).unwrap();
        assert!(!node.attached("lxc-sv"));
        let ports: Vec<u16> = (0..revision as u16).map(|i| PORT + i).collect();
        support::write(&node.agent.cluster_file(), &cluster(revision, &ports));
        node.agent.wait_realized(revision);
        let log = node.agent.log_text()[mark..].to_owned();
        let mut at = 0;
        let mut found = None;
        for l in log.split_inclusive('\n') {
            if l.contains(" realized ") && l.contains(&format!(" revision={revision} ")) {
                found = Some((at, l.trim_end().to_owned()));
                break;
            }
            at += l.len();
        }
        let (realized, line) = found.expect("the pass that realized the revision logs it");
        // Nothing repaired before the change pass: no periodic pass came between.
        let before = &log[..realized];
        if line.contains("full=false")
            && !before.contains("attaching datapath")
            && !before.contains("pinned again")
        {
            clean = Some((revision, line, Instant::now()));
            break;
        }
        // Repaired by a periodic pass: wait for it to end before the next try.
        node.agent
            .wait("the drift repaired", Duration::from_secs(10), |_| {
                pins.join(names::SERVICES).exists() && !pod_links(&pins, "lxc-sv").is_empty()
            });
    }
    let (revision, line, realized) = clean.expect("a change pass with no periodic pass before");
    assert!(line.contains("attached=false"), "{line}");
    // The change is in the maps; the drift is left to the periodic pass.
    node.agent
        .wait("the drift repaired", Duration::from_secs(10), |a| {
            let s = a.status();
            repaired(&s, Fault::PinRemoved, names::SERVICES) >= 1
                && !pod_links(&pins, "lxc-sv").is_empty()
        });
    eprintln!(
        "revision {revision} realized by a change pass ({line}); the periodic pass repaired the \
         drift {:?} later (interval 3 s)",
        realized.elapsed()
    );
    let log = node.agent.log_text();
    assert!(log.contains("attaching datapath ifname=lxc-sv"), "{log}");
    assert!(node.attached("lxc-sv"));
    assert!(node.connects(), "{log}");
    node.verify_clean();
}

#[test]
fn a_policy_too_large_for_its_map_fails_closed() {
    // Three ports from the client: more rows than a policy map of 2 holds.
    let node = Node::new(
        "policy-full",
        &cluster(1, &[PORT, 8081, 8082]),
        &["--policy-map-max", "2"],
    );
    let status = node.agent.status();
    assert_eq!(status.fails_closed.len(), 1, "{status:?}");
    assert_eq!(status.fails_closed[0].endpoint, "default/server");
    let before = sample(
        &node.metrics(),
        "sluice_drop_packets_total{reason=\"POLICY_UNAVAILABLE\",direction=\"ingress\"}",
    );
    // Even the port the policy allows: the endpoint takes no new connection.
    assert!(
        !node.connects(),
        "a policy that does not fit let traffic in"
    );
    let after = sample(
        &node.metrics(),
        "sluice_drop_packets_total{reason=\"POLICY_UNAVAILABLE\",direction=\"ingress\"}",
    );
    eprintln!("policy over its map: SYNs dropped as POLICY_UNAVAILABLE: {before} -> {after}");
    assert!(after > before, "no POLICY_UNAVAILABLE drop counted");
    let report = Client::new(&node.agent.socket)
        .verify(VerifyRequest { repair: false })
        .expect("verify");
    assert_eq!(report.fails_closed.len(), 1, "{report:?}");
}

/// Every frontend the kernel holds has each slot its count names.
fn frontends_complete(maps: &PinnedMaps) -> usize {
    let services: std::collections::BTreeMap<Lb4Key, Lb4Service> =
        maps.services.iter().map(Result::unwrap).collect();
    let frontends: Vec<_> = services
        .iter()
        .filter(|(k, _)| k.slot == 0 && k.proto != 0 && k.scope == LB4_SCOPE_DEFAULT)
        .collect();
    for (key, frontend) in &frontends {
        for slot in 1..=frontend.count {
            assert!(
                services.contains_key(&Lb4Key { slot, ..**key }),
                "frontend {key:?} counts slot {slot}, which is missing"
            );
        }
    }
    frontends.len()
}

#[test]
fn a_full_service_map_is_reported_and_leaves_complete_frontends() {
    // 4 entries a Service (its address, its frontend, two slots): 10 hold two Services
    // and the slots of a third, not four.
    let mut node = Node::new("lb-full", &snapshot(1, 2), &["--lb-map-max", "10"]);
    let maps = PinnedMaps::open(node.agent.pins.path()).unwrap();
    assert_eq!(frontends_complete(&maps), 2);
    support::write(&node.agent.cluster_file(), &snapshot(2, 4));
    node.agent
        .wait("the full map reported", Duration::from_secs(20), |a| {
            a.status()
                .last_error
                .is_some_and(|e| e.contains("map lb4_services is full (raise --lb-map-max)"))
        });
    let status = node.agent.status();
    eprintln!("services map full: {:?}", status.last_error);
    assert!(!status.healthy);
    assert_eq!(status.realized_revision, 1, "{status:?}");
    // Slots go in before their frontends: the new Services have none, the old are whole.
    assert_eq!(frontends_complete(&maps), 2);
    assert!(
        maps.services
            .get(&Lb4Key::new(vip(3), 80, 6, 0), 0)
            .is_err()
    );
    let metrics = node.metrics();
    assert!(
        sample(&metrics, "sluice_map_full_total{map=\"lb4_services\"}") >= 1.0,
        "{metrics}"
    );
    assert!(node.agent.log_text().contains("map lb4_services is full"));

    // Back within the map: realized, healthy, no drift.
    support::write(&node.agent.cluster_file(), &snapshot(3, 2));
    node.agent.wait_realized(3);
    let status = node.agent.status();
    assert!(status.healthy, "{status:?}");
    assert_eq!(frontends_complete(&maps), 2);
    node.verify_clean();

    // Two Services replaced by two others in a full map: the end state fits, the write
    // order (new slots before old frontends go) does not; the Services that go whole make
    // room first.
    let mut swapped = snapshot(4, 4);
    swapped.services.drain(..2);
    swapped.endpoint_slices.drain(..2);
    support::write(&node.agent.cluster_file(), &swapped);
    node.agent.wait_realized(4);
    let status = node.agent.status();
    assert!(status.healthy, "{status:?}");
    assert_eq!(frontends_complete(&maps), 2);
    assert!(maps.services.get(&Lb4Key::new(vip(3), 80, 6, 0), 0).is_ok());
    assert!(
        maps.services
            .get(&Lb4Key::new(vip(0), 80, 6, 0), 0)
            .is_err()
    );
    node.verify_clean();
}

#[test]
fn a_full_event_ring_counts_the_lost_events() {
    // No rate limit: every drop is offered to the ring.
    let node = Node::new("ring-full", &cluster(1, &[PORT]), &["--event-rate", "0"]);
    let pid = Pid::from_raw(i32::try_from(node.agent.pid()).unwrap());
    // A stopped agent reads nothing: 40,000 denied datagrams overflow the 1 MiB ring.
    kill(pid, Signal::SIGSTOP).unwrap();
    let sent = node
        .client
        .run(|| {
            let socket = UdpSocket::bind((CLIENT, 0)).unwrap();
            (0..40_000)
                .filter(|_| socket.send_to(b"x", (SERVER, 9999)).is_ok())
                .count()
        })
        .unwrap();
    kill(pid, Signal::SIGCONT).unwrap();
    let status = node.agent.status();
    let metrics = node.metrics();
    let lost = sample(
        &metrics,
        "sluice_events_total{type=\"drop\",direction=\"ingress\",outcome=\"lost\"}",
    );
    let emitted = sample(
        &metrics,
        "sluice_events_total{type=\"drop\",direction=\"ingress\",outcome=\"emitted\"}",
    );
    eprintln!(
        "{sent} denied datagrams with the reader stopped: {emitted} drop events written, \
         {lost} lost to the full ring; status events_lost {}",
        status.events_lost
    );
    assert!(lost > 0.0, "{metrics}");
    assert!(status.events_lost >= lost as u64, "{status:?}");
    // The reader goes on once the agent runs again.
    assert!(status.healthy, "{status:?}");
}

#[test]
fn a_removed_api_socket_and_state_directory_are_restored() {
    let mut node = Node::new("files", &cluster(1, &[PORT]), &[]);
    // A CNI endpoint registry from an earlier run, so the agent holds one allocation.
    let state = node.agent.socket.with_file_name("state");
    let registry = state.join("cni-endpoints.json");
    let endpoint = serde_json::json!({"version": 1, "endpoints": [{
        "container_id": "c0ffee", "ifname": "eth0", "netns": "/run/netns/x",
        "namespace": "default", "pod": "cni-pod", "interface": "lxc-cni0", "address": "10.244.1.9"}]});
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(&registry, endpoint.to_string()).unwrap();
    node.agent
        .restart(&["--reconcile-interval", "0.5", "--metrics-address", METRICS]);
    node.agent.wait_realized(1);
    let socket = node.agent.socket.clone();
    let before = Client::new(&socket).cni_endpoints().expect("cni endpoints");
    assert_eq!(before.len(), 1);

    std::fs::remove_file(&socket).unwrap();
    let removed = Instant::now();
    node.agent
        .wait("the socket bound again", Duration::from_secs(10), |_| {
            Client::new(&socket).status().is_ok()
        });
    eprintln!(
        "API socket removed: answering again after {:?}",
        removed.elapsed()
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket bound again is {mode:o}");

    std::fs::remove_dir_all(&state).unwrap();
    let removed = Instant::now();
    node.agent.wait(
        "the registry written again",
        Duration::from_secs(10),
        |_| registry.exists(),
    );
    eprintln!(
        "state directory removed: registry written again after {:?}",
        removed.elapsed()
    );
    let status = node.agent.status();
    assert_eq!(
        repaired(
            &status,
            Fault::ApiSocketRemoved,
            &socket.display().to_string()
        ),
        1,
        "{status:?}"
    );
    assert_eq!(
        repaired(
            &status,
            Fault::StateRemoved,
            &registry.display().to_string()
        ),
        1,
        "{status:?}"
    );
    let metrics = node.metrics();
    assert_eq!(
        sample(
            &metrics,
            &format!(
                "sluice_faults_repaired_total{{fault=\"api-socket-removed\",object=\"{}\"}}",
                socket.display()
            )
        ),
        1.0,
        "{metrics}"
    );
    // What a restart reads back: the same allocation.
    node.agent
        .restart(&["--reconcile-interval", "0.5", "--metrics-address", METRICS]);
    node.agent.wait_realized(1);
    assert_eq!(
        Client::new(&socket).cni_endpoints().expect("cni endpoints"),
        before
    );
}

#[test]
fn a_full_conntrack_table_keeps_the_connection_in_use_and_opens_nothing() {
    const CT_MAX: u32 = 1024;
    const CHURN: usize = 3000;
    let ct_max = CT_MAX.to_string();
    let node = Node::new(
        "ct-full",
        &cluster(1, &[PORT]),
        &["--ct-max-entries", &ct_max, "--ct-pressure-interval", "0.2"],
    );
    let mut held = node.connect().expect("the held connection");
    // Short connections, each a conntrack entry on both pods' sides, three times what the
    // table holds: the LRU evicts, the garbage collector removes the closed ones early.
    let started = Instant::now();
    let failed = (0..CHURN).filter(|_| !node.connects()).count();
    let churn = started.elapsed();
    let status = node.agent.status();
    let pressure = status
        .conntrack_pressure
        .clone()
        .expect("conntrack pressure");
    // The connection in use all along answers again.
    writeln!(held, "again").unwrap();
    let answer = line(&mut held);
    let metrics = node.metrics();
    let create_failed = sample(
        &metrics,
        "sluice_drop_packets_total{reason=\"CT_MAP_INSERTION_FAILED\",direction=\"ingress\"}",
    ) + sample(
        &metrics,
        "sluice_drop_packets_total{reason=\"CT_MAP_INSERTION_FAILED\",direction=\"egress\"}",
    );
    let denied = sample(
        &metrics,
        "sluice_policy_verdicts_total{direction=\"ingress\",verdict=\"denied\"}",
    );
    let created = sample(&metrics, "sluice_conntrack_entries_created_total");
    eprintln!(
        "{CHURN} connections through a conntrack table of {CT_MAX} in {churn:?}: {failed} \
         failed; {created} entries created, fill {} of {}, {} closed or half-open removed \
         under pressure, {} CT_MAP_INSERTION_FAILED drops, {denied} denied; the held \
         connection: {answer:?}",
        pressure.entries, pressure.max_entries, pressure.removed_under_pressure, create_failed
    );
    assert_eq!(answer.unwrap(), "ok\n", "the connection in use was broken");
    assert_eq!(failed, 0, "connections failed with the table full");
    // Still enforced: UDP is not allowed, whatever conntrack went through.
    let udp_denied = node
        .client
        .run(|| {
            let socket = UdpSocket::bind((CLIENT, 0)).unwrap();
            socket.send_to(b"x", (SERVER, 9999)).is_ok()
        })
        .unwrap();
    assert!(udp_denied);
    let after = sample(
        &node.metrics(),
        "sluice_policy_verdicts_total{direction=\"ingress\",verdict=\"denied\"}",
    );
    assert!(
        after > denied,
        "a denied flow was not judged with the table full"
    );
}

#[test]
fn verify_reports_and_repairs_a_removed_pin() {
    // A pass a minute apart: verify sees the pin gone before any pass puts it back.
    let mut agent = support::Agent::start("verify-pin", &snapshot(1, 1), "60");
    agent.wait_realized(1);
    let pin = agent.pins.path().join(names::BACKENDS);
    let id = map_id(&pin);
    std::fs::remove_file(&pin).unwrap();
    let client = Client::new(&agent.socket);
    let report = client.verify(VerifyRequest { repair: false }).unwrap();
    assert_eq!(report.drift.len(), 1, "{:?}", report.drift);
    assert_eq!(
        (report.drift[0].map.as_str(), report.drift[0].key.as_str()),
        ("pins", names::BACKENDS)
    );
    assert!(!pin.exists());
    let report = client.verify(VerifyRequest { repair: true }).unwrap();
    assert!(report.repaired);
    assert_eq!(map_id(&pin), id, "the same map pinned again");
    assert!(
        client
            .verify(VerifyRequest { repair: false })
            .unwrap()
            .drift
            .is_empty()
    );
    let status = agent.status();
    assert_eq!(
        repaired(&status, Fault::PinRemoved, names::BACKENDS),
        1,
        "{status:?}"
    );
}
