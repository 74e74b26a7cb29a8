//! Support for the multi-node tests (issue 10): the lab file of a three-node lab in either
//! routing mode, pods pinned to a node, each node's agent, and code run in a node's
//! namespace.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{TestLab, http_get, in_netns};

/// The node names of [`lab_yaml`], in lab-file order.
pub const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
pub const UNDERLAY_CIDR: &str = "172.30.0.0/24";

/// `tunnel` or `native`, as the lab file and the agent flag spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Tunnel,
    Native,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tunnel => "tunnel",
            Mode::Native => "native",
        }
    }
}

/// A lab file with `nodes` nodes (10.244.<k+1>.0/24 each) joined by an underlay of MTU
/// `underlay_mtu`, checksum offload off.
pub fn lab_yaml(mode: Mode, nodes: usize, underlay_mtu: u32) -> String {
    let mut out = format!(
        "apiVersion: sluice.dev/v1alpha1
kind: Lab
serviceCIDR: 10.96.0.0/16
clusterCIDR: 10.244.0.0/16
routingMode: {}
txChecksumOffload: false
underlay: {{cidr: {UNDERLAY_CIDR}, mtu: {underlay_mtu}}}
nodes:
",
        mode.as_str()
    );
    for k in 0..nodes {
        out += &format!(
            "  - {{name: node-{}, podCIDR: 10.244.{}.0/24}}\n",
            k + 1,
            k + 1
        );
    }
    out
}

/// Node k's underlay address by interface 1's rule: the CIDR's network + 11 + k.
pub fn underlay_address(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, 11 + k as u8)
}

/// The router address of node k of [`lab_yaml`]: the first host of its pod CIDR.
pub fn router_address(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, k as u8 + 1, 1)
}

/// A pod `ns/name` on `node` with `labels` (YAML flow-map content) serving HTTP on 80 and
/// UDP on 80 (a `hostname` datagram gets its name).
pub fn pod_on(ns: &str, name: &str, node: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{{labels}}}
spec:
  nodeName: {node}
  containers:
  - name: c
    image: agnhost
    ports:
    - {{containerPort: 80, protocol: TCP}}
    - {{containerPort: 80, protocol: UDP}}
"
    )
}

impl TestLab {
    /// The API client of `node`'s agent.
    pub fn agent(&self, node: &str) -> sluice_api::Client {
        sluice_api::Client::new(self.lab.agent_socket(node))
    }

    /// Runs `f` on a thread inside `node`'s network namespace.
    pub fn in_node<T: Send + 'static>(
        &self,
        node: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        in_netns(&self.lab.node_netns(node), f)
    }

    /// `sluice verify` over every node of the lab (interface 7): fails the test, with the
    /// drifting node's name, unless every node's kernel matches its compiler output.
    pub fn verify_every_node(&self, what: &str) {
        let out = self.cli_output(&["verify"]);
        assert!(
            out.status.success(),
            "{what}: verify found drift: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The node a pod runs on, from the lab's view of its pods.
    pub fn node_of(&self, pod: &str) -> String {
        let (ns, name) = pod.split_once('/').expect("ns/pod");
        self.lab
            .pods()
            .into_iter()
            .find(|p| p.namespace == ns && p.name == name)
            .map(|p| p.node)
            .unwrap_or_else(|| panic!("no pod {pod}"))
    }
}

/// A TCP server in a node's namespace that answers each connection with the peer's address
/// as it saw it, until the listener is dropped. Returns the port.
pub fn serve_peer_address(lab: &TestLab, node: &str, address: Ipv4Addr) -> u16 {
    let listener = lab.in_node(node, move || TcpListener::bind((address, 0)).unwrap());
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            if let Ok(peer) = conn.peer_addr() {
                let _ = conn.write_all(peer.ip().to_string().as_bytes());
            }
        }
    });
    port
}

/// Connects to `addr` and reads what the server says before it closes.
pub fn read_answer(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The metrics of a node's datapath: packets dropped for `reason` in direction `dir`.
pub fn dropped(lab: &TestLab, node: &str, reason: sluice_common::DropReason, dir: u32) -> u64 {
    let maps = sluice_datapath::PinnedMaps::open(&lab.lab.pin_dir(node)).unwrap();
    let values: aya::maps::PerCpuValues<sluice_common::MetricsValue> = maps
        .metrics
        .get(&sluice_common::metrics_index(reason.code(), dir), 0)
        .unwrap();
    values.iter().map(|v| v.packets).sum()
}

/// A three-node lab in `mode` (underlay MTU 1,500), its nodes checked.
pub fn three_nodes(prefix: &str, mode: Mode) -> TestLab {
    let started = Instant::now();
    let lab = TestLab::up(prefix, &lab_yaml(mode, 3, 1500));
    eprintln!("{mode:?}: lab up with 3 nodes in {:?}", started.elapsed());
    assert_eq!(lab.lab.nodes(), NODES, "the lab's nodes, in lab-file order");
    lab
}

/// One request of a loop: when it started and what answered.
pub struct Sample {
    pub started: Instant,
    pub answer: Result<String, String>,
}

/// A request loop from `pod` to `addr` until the returned flag is set.
pub fn request_loop(
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
            in_netns(&netns, move || {
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

/// Byte `i` of a transfer: period 251, so a buffer of a multiple of 251 bytes repeats it.
fn pattern(i: usize) -> u8 {
    ((i % 251) * 7 % 251) as u8
}

/// Sends `len` bytes from `from` to a listener in `to`, checking every byte as it arrives.
pub fn bulk_transfer(lab: &TestLab, from: &str, to: &str, len: usize) -> Duration {
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
