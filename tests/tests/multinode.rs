//! Several nodes (issue 10), end to end, in both routing modes: three node namespaces, each
//! with its own agent, joined by an underlay built from namespaces. Pods reach each other
//! and the nodes across nodes by TCP and UDP, a ClusterIP balances over backends on two
//! nodes from all three and scales under a request loop, 100 MB cross nodes intact, the
//! upstream conformance model spread over the nodes gets the reference's verdicts, path-MTU
//! discovery works over a lowered underlay, nodes come and go while traffic flows, bad node
//! input is refused, and `observe` merges every node's flows.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_integration::{
    TestLab, http_get,
    multinode::{self, Mode, NODES, lab_yaml, pod_on},
    netpol::{self, Change, Created, Probe, policy, random_change, upstream_cases},
    udp_ask,
};

fn three_nodes(prefix: &str, mode: Mode) -> TestLab {
    let started = Instant::now();
    let lab = TestLab::up(prefix, &lab_yaml(mode, 3, 1500));
    eprintln!("{mode:?}: lab up with 3 nodes in {:?}", started.elapsed());
    assert_eq!(lab.lab.nodes(), NODES, "the lab's nodes, in lab-file order");
    lab
}

/// `client-k` on node-k (k = 1..3), `web-1` on node-1 and `web-2` on node-2 behind the
/// ClusterIP `web`.
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
    yaml + "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {port: 80, targetPort: 80, protocol: TCP}
"
}

fn pod_to_pod_across_nodes(lab: &TestLab, mode: Mode) {
    for i in 1..=3 {
        for j in (1..=3).filter(|j| *j != i) {
            let to = format!("client-{j}");
            let addr = SocketAddr::from((lab.pod_ip(&format!("default/{to}")), 80));
            let from = format!("default/client-{i}");
            let tcp = lab.in_pod(&from, move || http_get(addr));
            assert_eq!(tcp.unwrap(), to, "{mode:?}: TCP {from} -> {to}");
            let udp = lab.in_pod(&from, move || udp_ask(addr, b"hostname"));
            let (name, answered_by) = udp.unwrap();
            assert_eq!(name, to, "{mode:?}: UDP {from} -> {to}");
            assert_eq!(answered_by, addr, "{mode:?}: the answer comes from the pod");
        }
    }
}

/// A node reaches a pod on another node, and a pod reaches another node's address; the
/// node's server sees the pod's own address.
fn node_to_pod_both_ways(lab: &TestLab, mode: Mode) {
    for (node, pod) in [
        ("node-1", "client-2"),
        ("node-2", "client-3"),
        ("node-3", "client-1"),
    ] {
        let addr = SocketAddr::from((lab.pod_ip(&format!("default/{pod}")), 80));
        let answer = lab.in_node(node, move || http_get(addr));
        assert_eq!(answer.unwrap(), pod, "{mode:?}: {node} -> {pod}");
    }
    for (pod, k) in [("client-3", 0), ("client-1", 1)] {
        let node = NODES[k];
        let router = multinode::router_address(k);
        let port = multinode::serve_peer_address(lab, node, router);
        let addr = SocketAddr::from((router, port));
        let seen = lab.in_pod(&format!("default/{pod}"), move || {
            multinode::read_answer(addr)
        });
        let pod_ip = lab.pod_ip(&format!("default/{pod}"));
        assert_eq!(
            seen.unwrap(),
            pod_ip.to_string(),
            "{mode:?}: {pod} -> {node}'s address {router}"
        );
    }
}

/// Every node's client reaches the ClusterIP and is answered by backends on both nodes.
fn service_from_every_node(lab: &TestLab, mode: Mode) {
    let vip = SocketAddr::from((lab.cluster_ip("web"), 80));
    for k in 1..=3 {
        let answers: BTreeSet<String> = lab.in_pod(&format!("default/client-{k}"), move || {
            (0..30).map(|_| http_get(vip).unwrap()).collect()
        });
        assert_eq!(
            answers,
            BTreeSet::from(["web-1".to_owned(), "web-2".to_owned()]),
            "{mode:?}: client-{k} on node-{k} is balanced over both nodes' backends"
        );
    }
}

struct Sample {
    started: Instant,
    answer: Result<String, String>,
}

/// A request loop from `pod` to `addr` until the returned flag is set.
fn request_loop(
    lab: &TestLab,
    pod: &str,
    addr: SocketAddr,
) -> (
    Arc<AtomicBool>,
    Arc<Mutex<Vec<Sample>>>,
    std::thread::JoinHandle<()>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let netns = lab.lab.pod_netns(pod).unwrap();
    let thread = {
        let (stop, samples) = (Arc::clone(&stop), Arc::clone(&samples));
        std::thread::spawn(move || {
            sluice_integration::in_netns(&netns, move || {
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let answer = http_get(addr).map_err(|e| e.to_string());
                    samples.lock().unwrap().push(Sample { started, answer });
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        })
    };
    (stop, samples, thread)
}

/// Adds a backend on node-3 and removes web-1 while client-3 loops requests: no request
/// fails once each change is realized, and web-1 gets no new connection after its removal.
fn scale_under_load(lab: &mut TestLab, mode: Mode) {
    let vip = SocketAddr::from((lab.cluster_ip("web"), 80));
    let (stop, samples, thread) = request_loop(lab, "default/client-3", vip);
    std::thread::sleep(Duration::from_millis(300));
    let web3 = pod_on("default", "web-3", "node-3", "app: web");
    let up_started = Instant::now();
    lab.apply_yaml("web-3.yaml", &web3);
    let up_realized = Instant::now();
    std::thread::sleep(Duration::from_millis(600));
    let web1 = pod_on("default", "web-1", "node-1", "app: web");
    let down_started = Instant::now();
    lab.delete_yaml("web-1.yaml", &web1);
    let down_realized = Instant::now();
    std::thread::sleep(Duration::from_millis(600));
    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();

    let samples = samples.lock().unwrap();
    let answered = |name: &str| samples.iter().any(|s| s.answer.as_deref() == Ok(name));
    eprintln!(
        "{mode:?}: {} requests while scaling (+web-3 realized in {:?}, -web-1 in {:?}), {} failed in all",
        samples.len(),
        up_realized - up_started,
        down_realized - down_started,
        samples.iter().filter(|s| s.answer.is_err()).count()
    );
    assert!(
        answered("web-3"),
        "{mode:?}: the new backend on node-3 got traffic"
    );
    for s in samples.iter().filter(|s| s.started >= up_realized) {
        let answer = s
            .answer
            .as_ref()
            .unwrap_or_else(|e| panic!("{mode:?}: a request after a realized change failed: {e}"));
        if s.started >= down_realized {
            assert_ne!(
                answer, "web-1",
                "{mode:?}: removed backend got a new connection"
            );
        }
    }
}

const BULK: usize = 100 << 20;

/// Byte `i` of a transfer: period 251, so a buffer of a multiple of 251 bytes repeats it.
fn pattern(i: usize) -> u8 {
    ((i % 251) * 7 % 251) as u8
}

/// Sends `len` bytes from `from` to a listener in `to`, checking every byte as it arrives.
fn bulk_transfer(lab: &TestLab, from: &str, to: &str, len: usize) -> Duration {
    let listener = lab.in_pod(to, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, 9000)).unwrap()
    });
    let addr = SocketAddr::from((lab.pod_ip(to), 9000));
    let stream = lab.in_pod(from, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap()
    });
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut stream = stream;
        let chunk: Vec<u8> = (0..251 * 256).map(pattern).collect();
        let mut sent = 0;
        while sent < len {
            let n = chunk.len().min(len - sent);
            stream.write_all(&chunk[..n]).unwrap();
            sent += n;
        }
        stream.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let (mut accepted, _) = listener.accept().unwrap();
    accepted
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // What any read may hold, from any phase of the pattern: compared with one memcmp.
    let expected: Vec<u8> = (0..251 + (1 << 16)).map(pattern).collect();
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = accepted.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        let phase = received % 251;
        assert!(
            buf[..n] == expected[phase..phase + n],
            "bytes {received}..{} differ",
            received + n
        );
        received += n;
    }
    writer.join().unwrap();
    assert_eq!(received, len, "every byte arrived");
    started.elapsed()
}

/// The flows `sluice --lab L observe` merges from every node, as JSON.
fn observe(lab: &TestLab, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["observe", "--last", "4000", "-o", "json"];
    all.extend(args);
    lab.cli(&all)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect()
}

/// A policy on web-2 (node-2) admits only app=web; client-1 on node-1 is dropped there.
/// `observe` shows the drop on node-2 with both identities, and client-1's side on node-1.
fn cross_node_drop_is_observed(lab: &mut TestLab, mode: Mode) {
    let only_web = policy(
        "only-web",
        "default",
        "  podSelector:\n    matchLabels: {app: web}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {app: web}\n",
    );
    lab.apply_yaml("only-web.yaml", &only_web);
    lab.verify_every_node("after the policy");
    let addr = SocketAddr::from((lab.pod_ip("default/web-2"), 80));
    let denied = lab.in_pod("default/client-1", move || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(700))
    });
    assert!(denied.is_err(), "{mode:?}: client-1 -> web-2 is denied");

    let deadline = Instant::now() + Duration::from_secs(5);
    let (drop, flows) = loop {
        let flows = observe(
            lab,
            &[
                "--from-pod",
                "default/client-1",
                "--to-pod",
                "default/web-2",
            ],
        );
        let drop = flows.iter().find(|f| {
            f["flow"]["verdict"] == "DROPPED" && f["flow"]["drop_reason_desc"] == "POLICY_DENIED"
        });
        if let Some(drop) = drop {
            break (drop.clone(), flows);
        }
        assert!(
            Instant::now() < deadline,
            "{mode:?}: no POLICY_DENIED flow observed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("{mode:?}: observed {drop}");
    let node_of = |f: &serde_json::Value| {
        f["flow"]["node_name"]
            .as_str()
            .or_else(|| f["node_name"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(node_of(&drop), "node-2", "the drop happens where web-2 is");
    let flow = &drop["flow"];
    assert_eq!(flow["source"]["pod_name"], "client-1");
    assert_eq!(flow["destination"]["pod_name"], "web-2");
    let label = |side: &str, want: &str| {
        flow[side]["labels"]
            .as_array()
            .is_some_and(|ls| ls.iter().any(|l| l == want))
    };
    assert!(
        label("source", "k8s:app=client"),
        "sender's identity: {flow}"
    );
    assert!(
        label("destination", "k8s:app=web"),
        "receiver's identity: {flow}"
    );
    assert!(flow["source"]["identity"].as_u64().unwrap() >= 256);
    assert!(flow["destination"]["identity"].as_u64().unwrap() >= 256);
    let nodes: BTreeSet<String> = flows.iter().map(node_of).collect();
    assert!(
        nodes.contains("node-1") && nodes.contains("node-2"),
        "{mode:?}: the connection is seen on both nodes: {nodes:?}"
    );
    lab.delete_yaml("only-web.yaml", &only_web);
}

/// Policy on the pods of node-2 admitting only app=client: a 3,000-byte ping from node-1's
/// client arrives in fragments and passes whole; a datagram client-1 sends from an address
/// not its own is dropped; node-1 (remote-node there) is denied while node-2 (the pod's own
/// host) passes, until an ipBlock holding every node's address admits remote-node.
fn fragments_spoofing_and_nodes(lab: &mut TestLab, mode: Mode) {
    let clients_only = policy(
        "clients-only",
        "default",
        "  podSelector:\n    matchLabels: {app: client}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {app: client}\n",
    );
    lab.apply_yaml("clients-only.yaml", &clients_only);
    let to = lab.pod_ip("default/client-2").to_string();
    let ping = lab
        .lab
        .pod_command("default/client-1", "ping")
        .unwrap()
        .args(["-c", "2", "-W", "2", "-s", "3000", &to])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "{mode:?}: fragmented ping across nodes: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );

    let spoofed = Ipv4Addr::new(10, 244, 1, 250);
    let add = lab
        .lab
        .pod_command("default/client-1", "ip")
        .unwrap()
        .args(["addr", "add", &format!("{spoofed}/32"), "dev", "eth0"])
        .status()
        .unwrap();
    assert!(add.success(), "add a second address inside client-1");
    let peer = SocketAddr::from((lab.pod_ip("default/client-2"), 80));
    let before = multinode::dropped(
        lab,
        "node-1",
        sluice_common::DropReason::InvalidSource,
        sluice_common::METRIC_DIR_EGRESS,
    );
    let (honest, forged) = lab.in_pod("default/client-1", move || {
        let honest = udp_ask(peer, b"hostname").is_ok();
        let s = std::net::UdpSocket::bind((spoofed, 0)).unwrap();
        s.connect(peer).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.send(b"hostname").unwrap();
        let mut buf = [0u8; 64];
        (honest, s.recv(&mut buf).is_ok())
    });
    assert!(
        honest,
        "{mode:?}: from its own address client-1 is answered"
    );
    assert!(
        !forged,
        "{mode:?}: from a forged address nothing comes back"
    );
    let after = multinode::dropped(
        lab,
        "node-1",
        sluice_common::DropReason::InvalidSource,
        sluice_common::METRIC_DIR_EGRESS,
    );
    assert!(after > before, "{mode:?}: dropped at the sender's node");

    let pod = SocketAddr::from((lab.pod_ip("default/client-2"), 80));
    let from_node = |lab: &TestLab, node: &str| {
        lab.in_node(node, move || {
            TcpStream::connect_timeout(&pod, Duration::from_millis(700)).is_ok()
        })
    };
    assert!(
        from_node(lab, "node-2"),
        "{mode:?}: the pod's own host passes"
    );
    assert!(!from_node(lab, "node-1"), "{mode:?}: remote-node is denied");
    // Policy judges identities: remote-node is every other node at once, so the block
    // must hold every node's own address (router addresses are not judged).
    let nodes_too = policy(
        "node-1-too",
        "default",
        &format!(
            "  podSelector:\n    matchLabels: {{app: client}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: {}}}\n",
            multinode::UNDERLAY_CIDR
        ),
    );
    lab.apply_yaml("node-1-too.yaml", &nodes_too);
    assert!(
        from_node(lab, "node-1"),
        "{mode:?}: an ipBlock admits node-1"
    );
    lab.verify_every_node("with node policies");
    lab.delete_yaml("node-1-too.yaml", &nodes_too);
    lab.delete_yaml("clients-only.yaml", &clients_only);
}

fn pods_services_and_flows(mode: Mode) {
    let mut lab = three_nodes(&format!("mn-{}", mode.as_str()), mode);
    lab.apply_yaml("workload.yaml", &workload());
    lab.verify_every_node("after the workload");
    pod_to_pod_across_nodes(&lab, mode);
    node_to_pod_both_ways(&lab, mode);
    service_from_every_node(&lab, mode);
    let took = bulk_transfer(&lab, "default/client-1", "default/client-3", BULK);
    eprintln!(
        "{mode:?}: 100 MB node-1 -> node-3 in {took:?} ({:.2} Gbit/s)",
        BULK as f64 * 8.0 / took.as_secs_f64() / 1e9
    );
    scale_under_load(&mut lab, mode);
    fragments_spoofing_and_nodes(&mut lab, mode);
    cross_node_drop_is_observed(&mut lab, mode);
    lab.verify_every_node("at the end");
}

#[test]
fn tunnel_pods_nodes_services_and_flows_across_three_nodes() {
    pods_services_and_flows(Mode::Tunnel);
}

#[test]
fn native_pods_nodes_services_and_flows_across_three_nodes() {
    pods_services_and_flows(Mode::Native);
}

fn check(lab: &TestLab, probes: &[Probe], what: &str) {
    let snapshot = netpol::snapshot(lab);
    let expected = netpol::expected(&snapshot, probes);
    let actual = netpol::probe_all(lab, probes, &expected);
    let report = netpol::mismatches(&expected, &actual);
    assert!(report.is_empty(), "{what}: verdicts differ:\n{report}");
    lab.verify_every_node(what);
}

/// The upstream model with its nine pods spread over three nodes: every probe, for every
/// upstream policy, equals the reference, and every node's kernel equals its compiler.
fn conformance(mode: Mode) {
    let mut lab = three_nodes(&format!("mnc-{}", mode.as_str()), mode);
    lab.apply_yaml("model.yaml", &netpol::model_yaml_on(&NODES));
    for pod in netpol::model_pods() {
        let (ns, name) = pod.split_once('/').unwrap();
        assert_eq!(lab.node_of(&pod), netpol::node_for(ns, name, &NODES));
    }
    let probes = netpol::full_matrix();
    check(&lab, &probes, &format!("{mode:?}: no policy"));
    let except = lab.pod_ip("y/b").to_string();
    for (name, yaml) in upstream_cases() {
        let yaml = yaml.replace("EXCEPT", &except);
        let file = format!("{name}.yaml");
        lab.apply_yaml(&file, &yaml);
        check(&lab, &probes, &format!("{mode:?}: {name}"));
        lab.delete_yaml(&file, &yaml);
    }
    check(&lab, &probes, &format!("{mode:?}: all policies deleted"));
}

#[test]
fn tunnel_conformance_model_spread_over_three_nodes() {
    conformance(Mode::Tunnel);
}

#[test]
fn native_conformance_model_spread_over_three_nodes() {
    conformance(Mode::Native);
}

/// Lowers the MTU of every underlay link (each node's `underlay0`, the underlay bridge and
/// its ports) to `underlay`, and each node's tunnel device to `underlay` − 50.
fn lower_underlay_mtu(lab: &TestLab, underlay: u32) {
    let bridge_side = sluice_netns::NetNs::named(lab.lab.underlay_netns());
    let links = bridge_side.netlink().unwrap();
    for link in links.links().unwrap() {
        if link.name != "lo" {
            links.set_mtu(&link.name, underlay).unwrap();
        }
    }
    for node in lab.lab.nodes() {
        let links = sluice_netns::NetNs::named(lab.lab.node_netns(&node))
            .netlink()
            .unwrap();
        links.set_mtu("underlay0", underlay).unwrap();
        links.set_mtu("sluice_vxlan", underlay - 50).unwrap();
    }
}

/// Path MTU: a lab whose underlay carries 1,400 bytes moves a TCP transfer (DF, as Linux
/// TCP sends) intact; then the underlay shrinks under the running lab, the pods keep their
/// larger MTU, and a new transfer still completes because the sender's node answers the
/// DF packets that no longer fit with ICMP fragmentation needed.
#[test]
fn tunnel_path_mtu_discovery_over_a_lowered_underlay() {
    let mut lab = TestLab::up("mn-pmtu", &lab_yaml(Mode::Tunnel, 3, 1400));
    let mut yaml = pod_on("default", "client-1", "node-1", "app: client");
    yaml += "---\n";
    yaml += &pod_on("default", "client-2", "node-2", "app: client");
    lab.apply_yaml("pods.yaml", &yaml);
    let took = bulk_transfer(&lab, "default/client-1", "default/client-2", 8 << 20);
    eprintln!("8 MiB over a 1,400-byte underlay in {took:?}");

    lower_underlay_mtu(&lab, 1300);
    let before = multinode::dropped(
        &lab,
        "node-1",
        sluice_common::DropReason::FragNeeded,
        sluice_common::METRIC_DIR_EGRESS,
    );
    let took = bulk_transfer(&lab, "default/client-1", "default/client-2", 8 << 20);
    let frag_needed = multinode::dropped(
        &lab,
        "node-1",
        sluice_common::DropReason::FragNeeded,
        sluice_common::METRIC_DIR_EGRESS,
    ) - before;
    eprintln!(
        "8 MiB after the underlay shrank to 1,300 in {took:?}; {frag_needed} packets answered with fragmentation needed"
    );
    assert!(frag_needed > 0, "path-MTU discovery was exercised");
}

fn node_spec(name: &str, pod_cidr: &str) -> sluice_lab::NodeSpec {
    serde_json::from_value(serde_json::json!({"name": name, "podCidr": pod_cidr})).unwrap()
}

/// Whether `node`'s ipcache holds exactly `address/prefix` (a lookup would find the
/// longest prefix holding it, 0.0.0.0/0 at worst).
fn in_ipcache(lab: &TestLab, node: &str, address: Ipv4Addr, prefix: u32) -> bool {
    let maps = sluice_datapath::PinnedMaps::open(&lab.lab.pin_dir(node)).unwrap();
    let want = sluice_common::addr_be(address);
    maps.ipcache
        .keys()
        .map(Result::unwrap)
        .any(|key| key.prefix_len() == prefix && key.data() == want)
}

/// A third node joins and leaves while node-1's pod loops requests to node-2's: no request
/// fails; the new node's pods are reached while it is there, and when it goes every other
/// node forgets it (ipcache). Bad nodes are refused and change nothing.
fn nodes_come_and_go(mode: Mode) {
    let mut lab = TestLab::up(
        &format!("mn-churn-{}", mode.as_str()),
        &lab_yaml(mode, 2, 1500),
    );
    let mut yaml = pod_on("default", "client-1", "node-1", "app: client");
    yaml += "---\n";
    yaml += &pod_on("default", "web-2", "node-2", "app: web");
    lab.apply_yaml("pods.yaml", &yaml);
    let addr = SocketAddr::from((lab.pod_ip("default/web-2"), 80));
    let (stop, samples, thread) = request_loop(&lab, "default/client-1", addr);
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    lab.lab
        .add_node(node_spec("node-3", "10.244.3.0/24"))
        .unwrap();
    eprintln!("{mode:?}: node-3 added in {:?}", started.elapsed());
    lab.apply_yaml(
        "web-3.yaml",
        &pod_on("default", "web-3", "node-3", "app: web"),
    );
    let to_new = SocketAddr::from((lab.pod_ip("default/web-3"), 80));
    for from in ["default/client-1", "default/web-2"] {
        let answer = lab.in_pod(from, move || http_get(to_new));
        assert_eq!(
            answer.unwrap(),
            "web-3",
            "{mode:?}: {from} reaches node-3's pod"
        );
    }
    lab.verify_every_node("with node-3");
    let node3 = multinode::underlay_address(2);
    assert!(in_ipcache(&lab, "node-1", node3, 32));

    lab.delete_yaml(
        "web-3.yaml",
        &pod_on("default", "web-3", "node-3", "app: web"),
    );
    let started = Instant::now();
    lab.lab.remove_node("node-3").unwrap();
    eprintln!("{mode:?}: node-3 removed in {:?}", started.elapsed());
    assert_eq!(lab.lab.nodes(), NODES[..2]);
    for node in ["node-1", "node-2"] {
        assert!(!in_ipcache(&lab, node, node3, 32), "{node} forgot node-3");
        assert!(
            !in_ipcache(&lab, node, Ipv4Addr::new(10, 244, 3, 0), 24),
            "{node} forgot node-3's pod CIDR"
        );
    }
    lab.verify_every_node("after node-3 left");

    // Bad nodes: an overlapping pod CIDR, one outside the cluster CIDR. Nothing changes.
    let generation = lab.agent("node-1").status().unwrap().realized_generation;
    for (spec, field) in [
        (node_spec("node-4", "10.244.2.0/24"), "podCIDR"),
        (node_spec("node-4", "10.99.0.0/24"), "podCIDR"),
    ] {
        let err = lab.lab.add_node(spec).expect_err("a bad node").to_string();
        eprintln!("{mode:?}: refused: {err}");
        assert!(err.contains("node-4") && err.contains(field), "{err}");
    }
    assert_eq!(lab.lab.nodes(), NODES[..2], "no node was added");
    assert_eq!(
        lab.agent("node-1").status().unwrap().realized_generation,
        generation,
        "the dataplane did not change"
    );

    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
    let samples = samples.lock().unwrap();
    let failed: Vec<&String> = samples
        .iter()
        .filter_map(|s| s.answer.as_ref().err())
        .collect();
    eprintln!(
        "{mode:?}: {} requests node-1 -> node-2 while node-3 came and went, {} failed",
        samples.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{mode:?}: failed requests: {failed:?}");
}

#[test]
fn tunnel_nodes_come_and_go_while_traffic_flows() {
    nodes_come_and_go(Mode::Tunnel);
}

#[test]
fn native_nodes_come_and_go_while_traffic_flows() {
    nodes_come_and_go(Mode::Native);
}

/// A lab file whose nodes overlap is refused before anything is made.
#[test]
fn a_lab_with_overlapping_pod_cidrs_is_refused_and_makes_nothing() {
    let yaml = lab_yaml(Mode::Tunnel, 2, 1500).replace("10.244.2.0/24", "10.244.1.128/25");
    let Err(failed) = TestLab::try_up("mn-overlap", &yaml) else {
        panic!("a lab with overlapping pod CIDRs came up");
    };
    let err = failed.error.to_string();
    eprintln!("refused: {err}");
    // The lab file's second node, by name or by its place in the file.
    assert!(
        (err.contains("node-2") || err.contains("nodes[1]")) && err.contains("podCIDR"),
        "{err}"
    );
    let left = sluice_netns::NetNs::list_with_prefix(&format!("sluice-{}", failed.name));
    assert!(left.is_empty(), "namespaces were made: {left:?}");
}

/// The property test's random steps on the model spread over three nodes: after every step
/// each node's kernel equals its compiler (`verify` on every node) and sampled probes,
/// most of them between nodes, get the reference's verdicts.
fn random_changes(mode: Mode) {
    let seed = std::env::var("SLUICE_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let steps: usize = std::env::var("SLUICE_PROPERTY_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    eprintln!(
        "{mode:?}: property seed {seed} ({steps} steps; rerun with SLUICE_PROPERTY_SEED={seed})"
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut lab = three_nodes(&format!("mnp-{}", mode.as_str()), mode);
    lab.apply_yaml("model.yaml", &netpol::model_yaml_on(&NODES));
    let mut created = Created::default();
    for step in 0..steps {
        let what = match random_change(&mut rng, step, &mut created, &NODES) {
            Change::Apply(what, yaml) => {
                lab.apply_yaml(&format!("step-{step}.yaml"), &yaml);
                what
            }
            Change::Delete(what, yaml) => {
                lab.delete_yaml(&format!("delete-{step}.yaml"), &yaml);
                what
            }
        };
        let mut pods = netpol::model_pods();
        pods.extend(created.pods.iter().map(|(pod, _)| pod.clone()));
        let all = netpol::matrix(&pods);
        let sample: Vec<Probe> = (0..24)
            .map(|_| all[rng.usize(..all.len())].clone())
            .collect();
        check(
            &lab,
            &sample,
            &format!("{mode:?} seed {seed} step {step} ({what})"),
        );
    }
}

#[test]
fn tunnel_random_changes_keep_every_node_equal_to_the_reference() {
    random_changes(Mode::Tunnel);
}

#[test]
fn native_random_changes_keep_every_node_equal_to_the_reference() {
    random_changes(Mode::Native);
}
