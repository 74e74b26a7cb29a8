//! A node for the plugin: a network namespace of its own with a real `sluice-agent` in it
//! (fed by a cluster file, or by a fake Kubernetes API server on the namespace's loopback;
//! CNI registry under a state directory of its own), and the plugin
//! binary run inside it exactly as a runtime runs it: `CNI_*` variables, configuration on
//! stdin, result or error object on stdout. Everything is removed on drop, also when the
//! test fails.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

#[path = "../../../agent/tests/fake_api/mod.rs"]
pub mod fake_api;

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sluice_api::{
    Client,
    flow::{Flow, FlowFilter, ObserveRequest, Verdict},
};
use sluice_datapath::PinDir;
use sluice_netns::{NetNs, NsThread, OwnedNetNs, unique_name};
use sluice_store::Snapshot;

pub const NODE: &str = "node-1";
pub const POD_CIDR: &str = "10.244.7.0/24";
pub const ROUTER: &str = "10.244.7.1";

/// The network configuration the conflist installs, with this node's agent socket.
pub fn net_conf(version: &str, socket: &Path) -> Value {
    json!({"cniVersion": version, "name": "sluice", "type": "sluice-cni",
           "agentSocket": socket.display().to_string()})
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(unique_name(prefix));
        fs::create_dir_all(&dir).expect("create the test directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn agent_binary() -> PathBuf {
    let path = std::env::var_os("SLUICE_AGENT_BIN").map_or_else(
        || Path::new(env!("CARGO_BIN_EXE_sluice-cni")).with_file_name("sluice-agent"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} not found: run `cargo build -p sluice-agent` first (or set SLUICE_AGENT_BIN)",
        path.display()
    );
    path
}

/// One run of the plugin.
pub struct Run {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// The result object of a successful run.
    pub fn result(&self) -> Value {
        assert!(
            self.success,
            "the plugin failed: {} {}",
            self.stdout, self.stderr
        );
        serde_json::from_str(&self.stdout).expect("a JSON result")
    }

    /// The error code of a failed run, after checking the error object's shape.
    pub fn error_code(&self) -> u64 {
        assert!(!self.success, "the plugin succeeded: {}", self.stdout);
        let error: Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not an error object ({e}): {}", self.stdout));
        assert!(error["cniVersion"].is_string(), "{error}");
        assert!(
            error["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{error}"
        );
        error["code"].as_u64().expect("a numeric code")
    }
}

/// Where the node's agent reads the cluster from.
pub enum Source {
    /// The lab's cluster file, rewritten by [`Node::apply`].
    ClusterFile(PathBuf),
    /// A fake API server on the node namespace's loopback (`--source kubernetes`).
    Kubernetes(fake_api::Served),
}

/// The node: its namespace (forwarding on, reverse-path filtering off, as a node's
/// provisioning leaves it), its agent and files. Fields drop in order: the agent first,
/// the source's server before the namespace.
pub struct Node {
    agent: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub source: Source,
    pub state_dir: PathBuf,
    pins: PinDir,
    pub netns: OwnedNetNs,
    _dir: TempDir,
}

impl Node {
    /// Starts the agent on `snapshot` with `args` added, and waits for its first pass.
    pub fn start(name: &str, snapshot: &Snapshot, args: &[&str]) -> Self {
        Self::start_with(name, snapshot, args, |_| {})
    }

    /// [`Self::start`], with `prepare` run on the node's namespace before the agent starts
    /// (devices the agent's flags name).
    pub fn start_with(
        name: &str,
        snapshot: &Snapshot,
        args: &[&str],
        prepare: impl FnOnce(&NetNs),
    ) -> Self {
        Self::start_from(name, args, |netns, dir| {
            prepare(netns);
            let cluster_file = dir.join("source").join("cluster.json");
            fs::create_dir_all(cluster_file.parent().expect("parent")).expect("source dir");
            snapshot.write_file(&cluster_file).expect("cluster file");
            (Source::ClusterFile(cluster_file), snapshot.revision)
        })
    }

    /// Starts the agent with `--source kubernetes`, its kubeconfig naming a fake API server
    /// on the node namespace's loopback that `seed` filled, and waits for its first pass.
    pub fn start_kubernetes(
        name: &str,
        args: &[&str],
        seed: impl FnOnce(&fake_api::Served),
    ) -> Self {
        Self::start_from(name, args, |netns, _| {
            let api = fake_api::Served::start(netns);
            seed(&api);
            // The source numbers its snapshots from 1, the first once every kind is listed.
            (Source::Kubernetes(api), 1)
        })
    }

    fn start_from(
        name: &str,
        args: &[&str],
        source: impl FnOnce(&NetNs, &Path) -> (Source, u64),
    ) -> Self {
        let dir = TempDir::new(&format!("sluice-test-{name}-"));
        let netns = OwnedNetNs::unique(&format!("sluice-test-{name}-")).expect("node netns");
        netns
            .set_sysctls(&[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ])
            .expect("node sysctls");
        let (source, revision) = source(&netns, &dir.0);
        let mut node = Self {
            agent: None,
            socket: dir.0.join("agent.sock"),
            log: dir.0.join("agent.log"),
            source,
            state_dir: dir.0.join("state"),
            pins: PinDir::unique(&format!("sluice-test-{name}-")),
            netns,
            _dir: dir,
        };
        node.agent = Some(node.spawn_agent(args));
        node.wait_realized(revision);
        node
    }

    /// The cluster file of a node fed by one.
    pub fn cluster_file(&self) -> &Path {
        match &self.source {
            Source::ClusterFile(path) => path,
            Source::Kubernetes(_) => panic!("this node's agent reads the Kubernetes API"),
        }
    }

    /// The fake API server of a node fed by one.
    pub fn api(&self) -> &fake_api::Served {
        match &self.source {
            Source::Kubernetes(api) => api,
            Source::ClusterFile(_) => panic!("this node's agent reads a cluster file"),
        }
    }

    fn spawn_agent(&self, args: &[&str]) -> Child {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let mut command = Command::new(agent_binary());
        command
            .args(["--node", NODE, "--netns", self.netns.name()])
            .args(["--reconcile-interval", "1"]);
        match &self.source {
            Source::ClusterFile(path) => command.arg("--cluster-file").arg(path),
            Source::Kubernetes(api) => command
                .args(["--source", "kubernetes", "--kubeconfig"])
                .arg(&api.kubeconfig),
        };
        command
            .arg("--pin-dir")
            .arg(self.pins.path())
            .arg("--api-socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sluice-agent")
    }

    /// Stops the agent (SIGTERM, as a DaemonSet rollout does) and starts a new one on the
    /// same pins, socket and state directory.
    pub fn restart_agent(&mut self, args: &[&str]) {
        let mut agent = self.agent.take().expect("a running agent");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let status = agent.wait().expect("wait for the agent");
        assert!(status.success(), "{status}\n{}", self.log_text());
        let revision = Snapshot::read_file(self.cluster_file())
            .expect("cluster file")
            .revision;
        self.agent = Some(self.spawn_agent(args));
        self.wait_realized(revision);
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replaces the cluster file and waits until the agent realized it.
    pub fn apply(&mut self, snapshot: &Snapshot) {
        snapshot
            .write_file(self.cluster_file())
            .expect("cluster file");
        self.wait_realized(snapshot.revision);
    }

    /// Waits until the agent realized the source's `revision`; its first pass loads the
    /// datapath, which takes a while in a debug build.
    pub fn wait_realized(&mut self, revision: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self
                .client()
                .status()
                .is_ok_and(|s| s.realized_revision >= revision && s.realized_generation > 0)
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.agent.as_mut().map(Child::try_wait) {
                panic!("the agent exited ({status})\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "revision {revision} not realized\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the plugin in the node's namespace with exactly `vars` and `stdin`.
    pub fn plugin(&self, vars: &[(&str, &str)], stdin: &str) -> Run {
        let mut command = self
            .netns
            .command(env!("CARGO_BIN_EXE_sluice-cni"))
            .expect("enter the node's namespace");
        command
            .env_clear()
            .envs(vars.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command.spawn().expect("spawn sluice-cni");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write the configuration");
        let output = child.wait_with_output().expect("sluice-cni output");
        Run {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed: started.elapsed(),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

/// The variables a runtime sets for `command` on one pod.
pub fn vars<'a>(
    command: &'a str,
    container_id: &'a str,
    netns: &'a str,
    args: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container_id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

/// `CNI_ARGS` as containerd passes them for a pod.
pub fn pod_args(namespace: &str, pod: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID=x"
    )
}

/// A snapshot at `revision`: this node (InternalIP, pod CIDR), the default namespace, and
/// `extra` objects merged in (pods, services, slices, policies).
pub fn snapshot(revision: u64, extra: Value) -> Snapshot {
    let mut objects = json!({
        "revision": revision,
        "nodes": [{"metadata": {"name": NODE},
                   "spec": {"podCIDR": POD_CIDR},
                   "status": {"addresses": [{"type": "InternalIP", "address": "172.16.7.1"}]}}],
        "namespaces": [{"metadata": {"name": "default",
                                     "labels": {"kubernetes.io/metadata.name": "default"}}}],
    });
    if let (Some(objects), Some(extra)) = (objects.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            objects.insert(key.clone(), value.clone());
        }
    }
    serde_json::from_value(objects).expect("a valid snapshot")
}

/// A Pod object of this node without status.podIP yet (the kubelet writes it after ADD).
pub fn pod(name: &str, app: &str, port: Option<u16>) -> Value {
    let ports = port.map_or_else(Vec::new, |p| {
        vec![json!({"containerPort": p, "protocol": "TCP"})]
    });
    json!({"metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
           "spec": {"nodeName": NODE, "containers": [{"name": "c", "ports": ports}]}})
}

/// The median of `samples`.
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// A pod namespace the plugin attached, with its address.
pub struct Pod {
    pub netns: OwnedNetNs,
    pub container: String,
    pub address: String,
}

pub fn add(node: &Node, conf: &str, name: &str) -> (Pod, Duration) {
    let netns = OwnedNetNs::unique(&format!("sluice-test-cni-{name}-")).unwrap();
    let path = netns.path().display().to_string();
    static ADDED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = ADDED.fetch_add(1, Ordering::Relaxed);
    let container = format!("{name}-{}-{n}", std::process::id());
    let args = pod_args("default", name);
    let run = node.plugin(&vars("ADD", &container, &path, &args), conf);
    let result = run.result();
    let address = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.strip_suffix("/32"))
        .expect("a /32")
        .to_string();
    (
        Pod {
            netns,
            container,
            address,
        },
        run.elapsed,
    )
}

pub fn del(node: &Node, conf: &str, pod: &Pod) -> Duration {
    let path = pod.netns.path().display().to_string();
    let run = node.plugin(&vars("DEL", &pod.container, &path, ""), conf);
    assert!(run.success, "{}", run.stdout);
    run.elapsed
}

/// An echo server on the pod's port, stopped on drop.
pub struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<NsThread<()>>,
}

impl Echo {
    pub fn start(netns: &NetNs, port: u16) -> Self {
        let listener = netns
            .run(|| TcpListener::bind(("0.0.0.0", port)))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = netns
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            stream.set_nonblocking(false).unwrap();
                            let mut buf = [0; 64];
                            if let Ok(n) = stream.read(&mut buf) {
                                let _ = stream.write_all(&buf[..n]);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
            .unwrap();
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects from `netns` to `to` and exchanges a line; the error if it could not.
pub fn exchange(netns: &NetNs, to: &str) -> Result<(), String> {
    exchange_within(netns, to, Duration::from_secs(1))
}

/// [`exchange`], giving up on the connection after `connect` (a dropped SYN is not sent
/// again before a second).
pub fn exchange_within(netns: &NetNs, to: &str, connect: Duration) -> Result<(), String> {
    let to: SocketAddr = to.parse().unwrap();
    netns
        .run(move || {
            let mut stream = TcpStream::connect_timeout(&to, connect)
                .map_err(|e| format!("connect {to}: {e}"))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            stream.write_all(b"ping").map_err(|e| e.to_string())?;
            let mut answer = [0; 4];
            stream
                .read_exact(&mut answer)
                .map_err(|e| format!("read from {to}: {e}"))?;
            assert_eq!(&answer, b"ping");
            Ok(())
        })
        .unwrap()
}

/// The endpoint's datapath dropped a connection of `pod` by policy (reason 133).
pub fn assert_policy_drop(node: &Node, pod: &str) {
    let drops: Vec<Flow> = node
        .client()
        .observe(&ObserveRequest {
            last: None,
            follow: false,
            filter: FlowFilter {
                from_pod: vec![pod.into()],
                verdict: vec![Verdict::Dropped],
                ..FlowFilter::default()
            },
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        drops.iter().any(|f| f.drop_reason == 133),
        "no policy drop from {pod}: {drops:?}"
    );
}
