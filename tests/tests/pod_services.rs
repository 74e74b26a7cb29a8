//! Socket-level load balancing for pods (issue 18 item 2), end to end: the lab runs each
//! pod's processes in a cgroup of their own below the node's pods' cgroup, and the node's
//! agent attaches the pods' socket programs to that parent (`--pod-cgroup`). A process run
//! in a pod with `lab exec` (the pod's namespace and cgroup) has its connect() to a
//! ClusterIP translated once to a backend: no service conntrack entry exists, its flows
//! name the backend, and getpeername() still shows the ClusterIP. The same client
//! run in the pod's namespace only (outside the pod's cgroup) takes the per-packet path,
//! which gives the comparison (connect() timed by this binary run again in the pod, the
//! `timing_client` test). A connected UDP socket whose backend is removed is destroyed by
//! the agent, so the application sees ECONNABORTED and its next connect() reaches a live
//! backend; a pod reaching a Service whose only backend is itself works; the backend's
//! policy judges a socket-LB connection; ClientIP affinity stays per packet.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use sluice_common::kinds::CtScope;
use sluice_integration::{ONE_NODE_LAB, TestLab, examples, multinode::pod_on};

/// `client`, `web-1` and `web-2` on node-1; `web` (TCP and UDP 80) over both web pods, and
/// `self-1` over web-1 alone.
fn workload() -> String {
    let mut yaml = pod_on("default", "client", "node-1", "app: client") + "---\n";
    for pod in ["web-1", "web-2"] {
        yaml += &pod_on("default", pod, "node-1", &format!("app: web, pod: {pod}"));
        yaml += "---\n";
    }
    yaml + "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 80, protocol: TCP}
  - {name: dns, port: 80, targetPort: 80, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: self-1}
spec:
  selector: {pod: web-1}
  ports:
  - {name: http, port: 80, targetPort: 80, protocol: TCP}
"
}

/// A process killed when dropped, also when the test fails.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (5 s at most: the agent drains its flow events every 100 ms) for a flow of the
/// last 500 that `wanted` accepts (each flow as `observe -o json` prints it, under
/// `flow`); panics with them otherwise. A connection's conntrack entries are gone once it
/// closed cleanly, so its flows are what shows the path it took.
fn wait_for_flow(lab: &TestLab, what: &str, wanted: impl Fn(&serde_json::Value) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let flows = lab.cli(&["observe", "--last", "500", "-o", "json"]);
        if flows
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|line| wanted(&line["flow"]))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no flow {what}:\n{flows}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `curl` of `url` from `command` (already placed in a pod): the body (the answering pod's
/// name) and the peer curl saw.
fn curl(mut command: Command, url: &str) -> (String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .args([
            "-sS",
            "--max-time",
            "5",
            "-w",
            " %{remote_ip}:%{remote_port}",
            url,
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&stdout).into_owned();
    assert!(
        status.success(),
        "curl {url} failed ({status}): {out}{}",
        String::from_utf8_lossy(&stderr)
    );
    let (name, peer) = out.trim().rsplit_once(' ').unwrap();
    (name.trim().to_owned(), peer.to_owned())
}

/// Set in the timing client's environment to the address it connects to; the
/// `timing_client` test does nothing without it.
const CLIENT_ENV: &str = "SLUICE_POD_LB_CLIENT";
/// Connections the timing client makes.
const TIMED_CONNECTIONS: usize = 300;

/// The median TCP connect() time, in microseconds, of [`TIMED_CONNECTIONS`] connections
/// to `target` by this test binary run again through `command` (placed in a pod).
fn timed_connects(mut command: Command, target: &str) -> f64 {
    let Output { status, stdout, .. } = command
        .args(["--exact", "timing_client", "--ignored", "--nocapture"])
        .env(CLIENT_ENV, target)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&stdout);
    assert!(status.success(), "timing client: {out}");
    out.lines()
        .find_map(|l| l.strip_prefix("median_us "))
        .unwrap_or_else(|| panic!("no median in {out}"))
        .parse()
        .unwrap()
}

/// The client [`timed_connects`] runs: connects to `$SLUICE_POD_LB_CLIENT` and closes, each
/// connection checking that its peer is that address, and prints the median connect time.
#[test]
#[ignore = "the timing client of the other tests, run by them inside a pod"]
fn timing_client() {
    let Ok(target) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let target: std::net::SocketAddr = target.parse().unwrap();
    let mut times: Vec<f64> = (0..TIMED_CONNECTIONS)
        .map(|_| {
            let start = Instant::now();
            let stream = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
            let elapsed = start.elapsed().as_secs_f64() * 1e6;
            assert_eq!(stream.peer_addr().unwrap(), target);
            elapsed
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!("median_us {:.1}", times[times.len() / 2]);
}

#[test]
fn pod_reaches_cluster_ip_by_socket_lb_without_service_conntrack() {
    const REQUESTS: usize = 20;
    let mut lab = TestLab::up("podlb", ONE_NODE_LAB);
    lab.apply_yaml("web.yaml", &workload());
    let vip = lab.cluster_ip("web");
    let url = format!("http://{vip}/");
    let client_ip = lab.pod_ip("default/client");
    let backends: BTreeSet<String> = ["web-1", "web-2"]
        .iter()
        .map(|p| format!("{}:80", lab.pod_ip(&format!("default/{p}"))))
        .collect();

    // Socket LB: curl in the client pod's namespace and cgroup.
    let mut answers = BTreeSet::new();
    for _ in 0..REQUESTS {
        let command = lab.lab.command_in("default/client", "curl").unwrap();
        let (name, peer) = curl(command, &url);
        assert_eq!(peer, format!("{vip}:80"), "getpeername shows the ClusterIP");
        answers.insert(name);
    }
    assert_eq!(
        answers,
        BTreeSet::from(["web-1".to_owned(), "web-2".to_owned()]),
        "both backends"
    );

    let ct = lab.cli_json(&["ct", "list"]);
    let entries = ct.as_array().unwrap();
    let service: Vec<_> = entries.iter().filter(|e| e["scope"] == "service").collect();
    assert!(
        service.is_empty(),
        "no service conntrack entry through socket LB: {service:?}"
    );
    // The packets went to a backend, not the ClusterIP, with nothing to reverse-NAT.
    let from_client = |f: &serde_json::Value| f["IP"]["source"] == client_ip.to_string();
    wait_for_flow(&lab, "from the client straight to a backend", |f| {
        from_client(f)
            && backends.contains(&format!(
                "{}:{}",
                f["IP"]["destination"].as_str().unwrap_or(""),
                f["l4"]["TCP"]["destination_port"]
            ))
            && f.get("destination_service").is_none()
    });

    // The per-packet path: the same curl in the pod's namespace, outside its cgroup.
    let command = lab.lab.pod_command("default/client", "curl").unwrap();
    let (_, peer) = curl(command, &url);
    assert_eq!(peer, format!("{vip}:80"));
    // Outside the pod's cgroup the per-packet path translates.
    wait_for_flow(&lab, "from the client translated from the ClusterIP", |f| {
        from_client(f) && f.get("destination_service").is_some()
    });
    // connect() timed in one process each way: in the pod's cgroup, and outside it.
    let exe = std::env::current_exe().unwrap();
    let exe = exe.to_str().unwrap();
    let target = format!("{vip}:80");
    let socket_lb = timed_connects(lab.lab.command_in("default/client", exe).unwrap(), &target);
    let per_packet = timed_connects(lab.lab.pod_command("default/client", exe).unwrap(), &target);
    println!(
        "TCP connect() to the ClusterIP from a pod, median of {TIMED_CONNECTIONS}: socket LB \
         {socket_lb:.1} µs, per packet {per_packet:.1} µs; {REQUESTS} curl requests made {} \
         service conntrack entries by socket LB",
        service.len()
    );
    lab.verify_every_node("socket LB for pods");
}

#[test]
fn pod_reaches_a_service_whose_only_backend_is_itself() {
    let mut lab = TestLab::up("podhair", ONE_NODE_LAB);
    lab.apply_yaml("web.yaml", &workload());
    let vip = lab.cluster_ip("self-1");
    for _ in 0..5 {
        let command = lab.lab.command_in("default/web-1", "curl").unwrap();
        let (name, peer) = curl(command, &format!("http://{vip}/"));
        assert_eq!(name, "web-1", "hairpin: the pod answers itself");
        assert_eq!(peer, format!("{vip}:80"));
    }
    println!("5 of 5 hairpin requests from web-1 through the ClusterIP of self-1 answered");
}

#[test]
fn pod_reaches_backends_on_other_nodes_by_socket_lb() {
    const REQUESTS: usize = 20;
    let lab_yaml = std::fs::read_to_string(examples().join("lab-3nodes.yaml")).unwrap();
    let mut lab = TestLab::up("podx", &lab_yaml);
    let mut yaml = pod_on("default", "client", "node-1", "app: client") + "---\n";
    for (pod, node) in [("web-2", "node-2"), ("web-3", "node-3")] {
        yaml += &pod_on("default", pod, node, "app: web");
        yaml += "---\n";
    }
    yaml += "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 80, protocol: TCP}]
";
    lab.apply_yaml("web.yaml", &yaml);
    let vip = lab.cluster_ip("web");
    let answers: BTreeSet<String> = (0..REQUESTS)
        .map(|_| {
            let command = lab.lab.command_in("default/client", "curl").unwrap();
            let (name, peer) = curl(command, &format!("http://{vip}/"));
            assert_eq!(peer, format!("{vip}:80"));
            name
        })
        .collect();
    assert_eq!(
        answers,
        BTreeSet::from(["web-2".to_owned(), "web-3".to_owned()]),
        "both backends, on node-2 and node-3"
    );
    let service = lab.agent("node-1").conntrack().unwrap();
    assert!(
        !service.iter().any(|e| e.scope == CtScope::Service),
        "no service entry on node-1: {service:?}"
    );
    println!(
        "{REQUESTS} requests from a pod on node-1 through the ClusterIP (tunnel): {answers:?}"
    );
}

/// `web` again, with sessionAffinity ClientIP.
const STICKY: &str = "apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 80, targetPort: 80, protocol: TCP}
";

#[test]
fn affinity_frontends_stay_with_the_per_packet_path() {
    const REQUESTS: usize = 10;
    let mut lab = TestLab::up("podaff", ONE_NODE_LAB);
    lab.apply_yaml("web.yaml", &workload());
    lab.apply_yaml("sticky.yaml", STICKY);
    let vip = lab.cluster_ip("sticky");
    let answers: BTreeSet<String> = (0..REQUESTS)
        .map(|_| {
            let command = lab.lab.command_in("default/client", "curl").unwrap();
            let (name, peer) = curl(command, &format!("http://{vip}/"));
            assert_eq!(peer, format!("{vip}:80"));
            name
        })
        .collect();
    assert_eq!(
        answers.len(),
        1,
        "one backend by the pod's address: {answers:?}"
    );
    // Translated per packet: the flows name the Service.
    let client_ip = lab.pod_ip("default/client").to_string();
    wait_for_flow(&lab, "from the client translated from the ClusterIP", |f| {
        f["IP"]["source"] == client_ip.as_str() && f.get("destination_service").is_some()
    });
    println!(
        "{REQUESTS} requests from a pod to a ClientIP-affinity ClusterIP: all on {answers:?}, translated per packet"
    );
}

/// web-1 admits ingress only from pods labelled `app: nobody`.
const WEB_1_ISOLATED: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-1-isolated}
spec:
  podSelector: {matchLabels: {pod: web-1}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: nobody}}
";

#[test]
fn policy_judges_a_socket_lb_connection_by_the_backend() {
    let mut lab = TestLab::up("podpol", ONE_NODE_LAB);
    lab.apply_yaml("web.yaml", &workload());
    let url = format!("http://{}/", lab.cluster_ip("self-1"));
    let attempt = |lab: &TestLab| {
        lab.lab
            .command_in("default/client", "curl")
            .unwrap()
            .args(["-sS", "--max-time", "2", &url])
            .output()
            .unwrap()
    };
    let allowed = attempt(&lab);
    assert!(allowed.status.success(), "{allowed:?}");

    lab.apply_yaml("policy.yaml", WEB_1_ISOLATED);
    let denied = attempt(&lab);
    assert!(
        !denied.status.success(),
        "web-1's policy denies the client through the ClusterIP: {denied:?}"
    );
    let status = lab.cli_json(&["status"]);
    println!(
        "socket-LB connection to web-1 denied by its policy (curl: {})",
        String::from_utf8_lossy(&denied.stderr).trim()
    );
    assert_eq!(status["healthy"], true, "{status}");

    lab.delete_yaml("policy.yaml", WEB_1_ISOLATED);
    let again = attempt(&lab);
    assert!(again.status.success(), "allowed again: {again:?}");
}

/// socat with one connected UDP socket to `target`, in the client pod's namespace and
/// cgroup: each line written to it is a datagram, each answer comes back on its stdout.
struct UdpClient {
    child: Reaped,
    stdin: std::process::ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl UdpClient {
    fn connect(lab: &TestLab, target: &str) -> Self {
        let mut child = lab
            .lab
            .command_in("default/client", "socat")
            .unwrap()
            .args(["-T", "30", "-", target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        // The pod answers with its bare name, no newline: each read is one answer.
        thread::spawn(move || {
            let mut stdout = stdout;
            let mut buf = [0u8; 512];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                let answer = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
                if tx.send(answer).is_err() {
                    break;
                }
            }
        });
        Self {
            child: Reaped(child),
            stdin,
            lines,
        }
    }

    /// Asks the pod behind the socket its name.
    fn ask(&mut self) -> String {
        self.stdin.write_all(b"hostname\n").unwrap();
        self.lines
            .recv_timeout(Duration::from_secs(5))
            .expect("an answer on the connected socket")
    }

    /// Waits (bounded) for socat to end; its status and what it wrote to stderr.
    fn ended(mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                let mut err = String::new();
                self.child
                    .0
                    .stderr
                    .as_mut()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return (status, err);
            }
            assert!(
                Instant::now() < deadline,
                "the connected UDP socket of a removed backend was not destroyed"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn connected_udp_socket_of_a_removed_backend_is_destroyed() {
    let mut lab = TestLab::up("podudp", ONE_NODE_LAB);
    lab.apply_yaml("web.yaml", &workload());
    let vip = lab.cluster_ip("web");
    let target = format!("UDP4:{vip}:80");

    let mut client = UdpClient::connect(&lab, &target);
    let first = client.ask();
    assert!(["web-1", "web-2"].contains(&first.as_str()), "{first:?}");
    let other = if first == "web-1" { "web-2" } else { "web-1" };

    // The backend goes away: its pod is deleted.
    let removed_at = Instant::now();
    lab.delete_yaml(
        "gone.yaml",
        &pod_on("default", &first, "node-1", "app: web"),
    );
    let (status, stderr) = client.ended(Duration::from_secs(10));
    let aborted = removed_at.elapsed();
    assert!(
        !status.success() && stderr.contains("Software caused connection abort"),
        "the socket was destroyed (ECONNABORTED): {status} {stderr}"
    );

    // The application connects again and reaches the backend that is left.
    let mut again = UdpClient::connect(&lab, &target);
    let answer = again.ask();
    assert_eq!(answer, other, "a new connect() reaches a live backend");
    println!(
        "connected UDP socket on {first}: destroyed {:.1} ms after the pod's deletion \
         began (ECONNABORTED); reconnected to {answer}",
        aborted.as_secs_f64() * 1e3
    );
}
