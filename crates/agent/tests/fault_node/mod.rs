//! The faults tests' node: a node namespace with a client and a server pod wired to it, a
//! NetworkPolicy on the server, and a real agent; removed on drop, also when a test panics.
//!
//! ```text
//! client eth0 10.244.1.2 ─veth─ lxc-cl ┐ node (router 10.244.1.1, the agent)
//! server eth0 10.244.1.3 ─veth─ lxc-sv ┘ NetworkPolicy: server takes TCP from app=client
//! ```
// Each test uses a different subset of these helpers.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::{programs::SchedClassifier, programs::tc::TcAttachType};
use sluice_api::{Client, VerifyRequest};
use sluice_netns::{NsThread, OwnedNetNs};

use crate::support::{Agent, NODE, routed_node, wired_pod};

pub const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
pub const PORT: u16 = 8080;
pub const TIMEOUT: Duration = Duration::from_secs(3);
pub const METRICS: &str = "127.0.0.1:9962";

/// node-1 with both pods, and `policy_ports` TCP ports of the server open to app=client.
pub fn cluster(revision: u64, policy_ports: &[u16]) -> sluice_store::Snapshot {
    let pod = |name: &str, address: Ipv4Addr| {
        serde_json::json!({"metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
            "spec": {"nodeName": NODE, "containers": [{"name": "c"}]},
            "status": {"podIP": address.to_string()}})
    };
    let endpoint = |name: &str, interface: &str, address: Ipv4Addr| {
        serde_json::json!({"node": NODE, "namespace": "default", "pod": name,
            "interface": interface, "addresses": [address.to_string()]})
    };
    let ports: Vec<_> = policy_ports
        .iter()
        .map(|p| serde_json::json!({"protocol": "TCP", "port": p}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "revision": revision,
        "nodes": [{"metadata": {"name": NODE}, "spec": {"podCIDR": "10.244.1.0/24"},
                   "status": {"addresses": [{"type": "InternalIP", "address": "172.31.0.1"}]}}],
        "namespaces": [{"metadata": {"name": "default",
                                      "labels": {"kubernetes.io/metadata.name": "default"}}}],
        "pods": [pod("client", CLIENT), pod("server", SERVER)],
        "endpoints": [endpoint("client", "lxc-cl", CLIENT), endpoint("server", "lxc-sv", SERVER)],
        "networkPolicies": [{"metadata": {"name": "server", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                  "ports": ports}]}}],
    }))
    .unwrap()
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Answers "ok" to every new connection and to every line a held one sends, until
/// stopped; joined on drop. One thread, no thread per connection.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<NsThread<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("the server thread panicked");
        }
    }
}

fn serve(pod: &OwnedNetNs, ports: &[u16]) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let ports = ports.to_vec();
    let thread = pod
        .spawn({
            let stop = stop.clone();
            move || {
                let listeners: Vec<_> = ports
                    .iter()
                    .map(|port| {
                        let listener = TcpListener::bind(SocketAddrV4::new(SERVER, *port)).unwrap();
                        listener.set_nonblocking(true).unwrap();
                        listener
                    })
                    .collect();
                let mut held: Vec<TcpStream> = Vec::new();
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    for listener in &listeners {
                        while let Ok((mut conn, _)) = listener.accept() {
                            conn.set_nonblocking(true).unwrap();
                            if writeln!(conn, "ok").is_ok() {
                                held.push(conn);
                            }
                        }
                    }
                    held.retain_mut(|conn| match conn.read(&mut buf) {
                        Ok(0) => false,
                        Ok(n) => {
                            let lines = buf[..n].iter().filter(|b| **b == b'\n').count();
                            (0..lines).all(|_| writeln!(conn, "ok").is_ok())
                        }
                        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                    });
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
        .unwrap();
    Server {
        stop,
        thread: Some(thread),
    }
}

/// Reads one line from `conn`.
pub fn line(conn: &mut TcpStream) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    Ok(line)
}

/// The node with its pods wired, the server serving, and the agent.
/// Fields drop in order: server and agent before the namespaces they run in.
pub struct Node {
    _server: Server,
    pub agent: Agent,
    pub client: OwnedNetNs,
    _server_ns: OwnedNetNs,
    pub node: OwnedNetNs,
    _dir: TempDir,
}

impl Node {
    pub fn new(name: &str, cluster: &sluice_store::Snapshot, args: &[&str]) -> Self {
        Self::serving(name, cluster, args, &[PORT])
    }

    /// The node with the server answering on each of `ports`.
    pub fn serving(
        name: &str,
        cluster: &sluice_store::Snapshot,
        args: &[&str],
        ports: &[u16],
    ) -> Self {
        let (node, on_node) = routed_node("sft-node-", ROUTER);
        let pod = |prefix: &str, interface: &str, address: Ipv4Addr| {
            wired_pod(&on_node, prefix, interface, address, ROUTER)
        };
        let client = pod("sft-client-", "lxc-cl", CLIENT);
        let server_ns = pod("sft-server-", "lxc-sv", SERVER);
        let server = serve(&server_ns, ports);
        let dir = TempDir(std::env::temp_dir().join(sluice_netns::unique_name("sft-cluster-")));
        std::fs::create_dir_all(&dir.0).unwrap();
        let cluster_file = dir.0.join("cluster.json");
        cluster.write_file(&cluster_file).unwrap();
        let mut all = vec!["--metrics-address", METRICS];
        // A test's own interval wins over the faults' 0.5 s.
        if !args.contains(&"--reconcile-interval") {
            all.extend(["--reconcile-interval", "0.5"]);
        }
        all.extend_from_slice(args);
        let mut agent = Agent::start_node(name, NODE, node.name(), &cluster_file, &all);
        agent.wait_realized(cluster.revision);
        Self {
            _server: server,
            agent,
            client,
            _server_ns: server_ns,
            node,
            _dir: dir,
        }
    }

    /// A TCP connection from the client to the server that got the server's greeting.
    pub fn connect(&self) -> Option<TcpStream> {
        self.client
            .run(|| {
                let to = SocketAddrV4::new(SERVER, PORT).into();
                let mut conn = TcpStream::connect_timeout(&to, TIMEOUT).ok()?;
                conn.set_read_timeout(Some(TIMEOUT)).unwrap();
                (line(&mut conn).ok()? == "ok\n").then_some(conn)
            })
            .unwrap()
    }

    /// Whether the client gets the server's answer over a new TCP connection.
    pub fn connects(&self) -> bool {
        self.connect().is_some()
    }

    /// GET /metrics from the agent, inside the node's namespace.
    pub fn metrics(&self) -> String {
        self.node
            .run(|| {
                let mut conn = TcpStream::connect(METRICS).expect("connect to /metrics");
                conn.set_read_timeout(Some(TIMEOUT)).unwrap();
                write!(
                    conn,
                    "GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let mut text = String::new();
                conn.read_to_string(&mut text).expect("read /metrics");
                text
            })
            .unwrap()
    }

    /// Whether the pod programs run on `ifname` in the node's namespace.
    pub fn attached(&self, ifname: &'static str) -> bool {
        self.node
            .run(move || {
                SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)
                    .is_ok_and(|(_, progs)| !progs.is_empty())
            })
            .unwrap()
    }

    pub fn verify_clean(&self) {
        let report = Client::new(&self.agent.socket)
            .verify(VerifyRequest { repair: false })
            .expect("verify");
        assert!(report.drift.is_empty(), "{:?}", report.drift);
    }
}

/// The value of the sample `name` (with its labels) in a metrics text, 0 if absent.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}
