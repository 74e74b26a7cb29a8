//! A real `sluice-agent` process in an empty network namespace of its own, with its pins,
//! socket, log and cluster file under names unique to the test; all removed on drop, also
//! when the test panics.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use sluice_api::{AgentStatus, Client};
use sluice_datapath::PinDir;
use sluice_store::Snapshot;

pub const NODE: &str = "node-1";

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(status.success(), "ip {args:?}: {status}");
}

/// An empty network namespace under /run/netns.
pub struct NetNs(pub String);

impl NetNs {
    pub fn new(prefix: &str) -> Self {
        sluice_netns::reap_orphans(prefix);
        let name = sluice_netns::unique_name(prefix);
        ip(&["netns", "add", &name]);
        Self(name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running agent and everything it was given. Fields drop in order: the process first.
pub struct Agent {
    child: Child,
    launch: Launch,
    pub pins: PinDir,
    /// Kept until the agent is gone; None when the caller owns the namespace.
    _netns: Option<NetNs>,
    /// Holds only the cluster file, so removing it ends the source and nothing else.
    pub source_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    _dir: TempDir,
}

impl Agent {
    /// Writes `snapshot` as the cluster file, then starts the agent on it.
    pub fn start(name: &str, snapshot: &Snapshot, reconcile_interval: &str) -> Self {
        Self::start_with(
            name,
            snapshot,
            &["--reconcile-interval", reconcile_interval],
        )
    }

    /// Writes `snapshot` as the cluster file, then starts the agent on it with `args`.
    pub fn start_with(name: &str, snapshot: &Snapshot, args: &[&str]) -> Self {
        let pins = PinDir::unique(&format!("sluice-test-{name}-"));
        Self::start_on_pins(name, snapshot, pins, args)
    }

    /// [`Self::start_with`] on `pins`, which an earlier datapath may have filled.
    pub fn start_on_pins(name: &str, snapshot: &Snapshot, pins: PinDir, args: &[&str]) -> Self {
        let dir = TempDir(
            std::env::temp_dir().join(sluice_netns::unique_name(&format!("sluice-test-{name}-"))),
        );
        let source_dir = dir.0.join("source");
        fs::create_dir_all(&source_dir).expect("create the test directory");
        let netns = NetNs::new(&format!("sluice-test-{name}-"));
        let cluster_file = source_dir.join("cluster.json");
        snapshot
            .write_file(&cluster_file)
            .expect("write the cluster file");
        let mut agent = Self::spawn(NODE, &netns.0, &cluster_file, args, dir, pins);
        agent._netns = Some(netns);
        agent
    }

    /// Starts the agent of `node` inside the caller's namespace `netns`, on the caller's
    /// cluster file, with `args` added.
    pub fn start_node(
        name: &str,
        node: &str,
        netns: &str,
        cluster_file: &Path,
        args: &[&str],
    ) -> Self {
        let dir = TempDir(
            std::env::temp_dir().join(sluice_netns::unique_name(&format!("sluice-test-{name}-"))),
        );
        fs::create_dir_all(&dir.0).expect("create the test directory");
        let pins = PinDir::unique(&format!("sluice-test-{name}-"));
        Self::spawn(node, netns, cluster_file, args, dir, pins)
    }

    fn spawn(
        node: &str,
        netns: &str,
        cluster_file: &Path,
        args: &[&str],
        dir: TempDir,
        pins: PinDir,
    ) -> Self {
        let socket = dir.0.join("agent.sock");
        let log = dir.0.join("agent.log");
        let launch = Launch {
            node: node.to_owned(),
            netns: netns.to_owned(),
            cluster_file: cluster_file.to_owned(),
        };
        let child = launch.spawn(pins.path(), &socket, &log, args);
        Self {
            child,
            launch,
            pins,
            _netns: None,
            source_dir: cluster_file
                .parent()
                .map_or_else(PathBuf::new, Path::to_path_buf),
            socket,
            log,
            _dir: dir,
        }
    }

    /// The agent's process id, for signals of the test's own (SIGSTOP, SIGCONT).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn cluster_file(&self) -> PathBuf {
        self.source_dir.join("cluster.json")
    }

    pub fn status(&self) -> AgentStatus {
        Client::new(&self.socket)
            .status()
            .unwrap_or_else(|e| panic!("status: {e}\n{}", self.log_text()))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `done` holds, failing with the agent's log after `timeout`.
    pub fn wait(&mut self, what: &str, timeout: Duration, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the agent exited ({status}) waiting for {what}\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the agent has realized the source's `revision`; the first pass loads
    /// the datapath, which takes a while in a debug build.
    pub fn wait_realized(&mut self, revision: u64) {
        self.wait(
            &format!("revision {revision} realized"),
            Duration::from_secs(120),
            |a| {
                Client::new(&a.socket)
                    .status()
                    .is_ok_and(|s| s.realized_revision >= revision)
            },
        );
    }

    /// Waits for the agent to exit by itself, failing after `timeout`.
    pub fn exit(&mut self, timeout: Duration) -> ExitStatus {
        self.wait_exit(timeout, "the agent still runs")
    }

    /// Starts a new agent with `args` on the same cluster file, pins, socket and log, as a
    /// restarted DaemonSet pod would, once the current one is stopped (here, unless the
    /// caller stopped it already).
    pub fn restart(&mut self, args: &[&str]) {
        let exit = match self.child.try_wait().expect("wait for the agent") {
            Some(exit) => exit,
            None => self.terminate(Duration::from_secs(10)),
        };
        assert!(exit.success(), "{exit}\n{}", self.log_text());
        self.start_again(args);
    }

    /// Kills the agent with SIGKILL: no chance to finish the pass it is in.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill().expect("kill -KILL the agent");
        self.child.wait().expect("wait for the agent")
    }

    /// Starts a new agent with `args` on the same cluster file, pins, socket and log, once
    /// the caller stopped the last one (the log starts afresh).
    pub fn start_again(&mut self, args: &[&str]) {
        self.child = self
            .launch
            .spawn(self.pins.path(), &self.socket, &self.log, args);
    }

    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        kill(pid, Signal::SIGTERM).expect("kill -TERM the agent");
        self.wait_exit(timeout, "the agent ignored SIGTERM")
    }

    /// The agent's exit status once it exits, failing with `what` after `timeout`.
    fn wait_exit(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the agent") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what} after {timeout:?}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What an agent process is started with, besides its pins, socket, log and flags.
struct Launch {
    node: String,
    netns: String,
    cluster_file: PathBuf,
}

impl Launch {
    fn spawn(&self, pins: &Path, socket: &Path, log: &Path, args: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_sluice-agent"))
            .args(["--node", &self.node, "--netns", &self.netns])
            .arg("--cluster-file")
            .arg(&self.cluster_file)
            .arg("--pin-dir")
            .arg(pins)
            .arg("--api-socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(socket.with_file_name("state"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).expect("create the agent log"))
            .spawn()
            .expect("spawn sluice-agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The frontend address of service `i`.
pub fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i)
}

/// A snapshot at `revision` with `services` ClusterIP services on port 80/TCP, each with
/// two ready backends, and node-1 as the only node.
pub fn snapshot(revision: u64, services: u32) -> Snapshot {
    let mut objects = serde_json::json!({
        "revision": revision,
        "nodes": [{"metadata": {"name": NODE},
                   "status": {"addresses": [{"type": "InternalIP", "address": "172.16.0.1"}]}}],
        "services": [],
        "endpointSlices": [],
    });
    for i in 0..services {
        let name = format!("svc-{i}");
        let backend = |n: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + 2 * i + n);
        objects["services"]
            .as_array_mut()
            .expect("services")
            .push(serde_json::json!({
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"type": "ClusterIP", "clusterIP": vip(i).to_string(),
                         "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
            }));
        let endpoints = [0, 1].map(|n| {
            serde_json::json!({"addresses": [backend(n).to_string()], "conditions": {"ready": true}})
        });
        objects["endpointSlices"]
            .as_array_mut()
            .expect("slices")
            .push(serde_json::json!({
                "metadata": {"name": format!("{name}-1"), "namespace": "default",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            }));
    }
    serde_json::from_value(objects).expect("a valid snapshot")
}

pub fn write(path: &Path, snapshot: &Snapshot) {
    snapshot.write_file(path).expect("write the cluster file");
}

/// A node namespace that forwards (reverse-path filter off), with `router` on its
/// router interface, and its netlink handle for wiring pods to it.
pub fn routed_node(
    prefix: &str,
    router: std::net::Ipv4Addr,
) -> (sluice_netns::OwnedNetNs, sluice_netns::Netlink) {
    let node = sluice_netns::OwnedNetNs::unique(prefix).unwrap();
    node.set_sysctls(&[
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ])
    .unwrap();
    let on_node = node.netlink().unwrap();
    sluice_netns::add_router_interface(&on_node, router, None).unwrap();
    (node, on_node)
}

/// A pod namespace with `address` on its `eth0`, wired to the node by `interface`.
pub fn wired_pod(
    on_node: &sluice_netns::Netlink,
    prefix: &str,
    interface: &str,
    address: std::net::Ipv4Addr,
    router: std::net::Ipv4Addr,
) -> sluice_netns::OwnedNetNs {
    let ns = sluice_netns::OwnedNetNs::unique(prefix).unwrap();
    let guest = sluice_netns::Guest {
        interface,
        device: "eth0",
        address,
        router,
        mtu: None,
        alias: None,
    };
    sluice_netns::wire_guest(on_node, &ns, &guest).unwrap();
    ns
}
