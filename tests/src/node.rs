//! A node as a container runtime sees it: a network namespace of its own (forwarding on and
//! reverse-path filtering off, as a node's provisioning leaves them) with a real
//! `sluice-agent` in it, fed by a cluster file, keeping its CNI endpoint registry under a
//! state directory of its own. Agent, pins, namespace and files are removed on drop, also
//! when the test panics.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sluice_api::Client;
use sluice_datapath::PinDir;
use sluice_netns::{OwnedNetNs, unique_name};
use sluice_store::Snapshot;

use crate::binary;

pub const NODE: &str = "node-1";
/// The node's spec.podCIDR: the agent's IPAM hands out addresses from it.
pub const POD_CIDR: &str = "10.244.9.0/24";
/// The first agent pass loads the datapath, which takes a while in a debug build.
const REALIZE_TIMEOUT: Duration = Duration::from_secs(120);

/// A snapshot at `revision` with this node, the default namespace and the `objects`
/// (pods, services, slices, policies by their snapshot keys).
pub fn snapshot(revision: u64, objects: &Value) -> Snapshot {
    let mut snapshot = json!({
        "revision": revision,
        "nodes": [{"metadata": {"name": NODE},
                   "spec": {"podCIDR": POD_CIDR},
                   "status": {"addresses": [{"type": "InternalIP", "address": "172.16.9.1"}]}}],
        "namespaces": [{"metadata": {"name": "default",
                                     "labels": {"kubernetes.io/metadata.name": "default"}}}],
    });
    for (key, value) in objects.as_object().expect("objects by kind") {
        snapshot[key] = value.clone();
    }
    serde_json::from_value(snapshot).expect("a valid snapshot")
}

/// A Pod object of this node in the default namespace, without status.podIP: a kubelet
/// writes it only after CNI ADD returned.
pub fn pod(name: &str, app: &str, port: Option<u16>) -> Value {
    let ports: Vec<Value> = port
        .into_iter()
        .map(|p| json!({"containerPort": p, "protocol": "TCP"}))
        .collect();
    json!({"metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
           "spec": {"nodeName": NODE, "containers": [{"name": "c", "ports": ports}]}})
}

/// The node. Fields drop after `drop` stopped the agent: pins, then the namespace.
pub struct AgentNode {
    pub socket: PathBuf,
    pub log: PathBuf,
    pub dir: PathBuf,
    agent: Child,
    _pins: PinDir,
    pub netns: OwnedNetNs,
}

impl AgentNode {
    /// Starts the agent on `snapshot`, with `args` added, and waits until it realized it.
    pub fn start(prefix: &str, snapshot: &Snapshot, args: &[&str]) -> Self {
        let name = unique_name(&format!("sluice-{prefix}-"));
        let dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&dir).unwrap();
        let netns = OwnedNetNs::unique(&format!("{prefix}-node-")).unwrap();
        netns
            .set_sysctls(&[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ])
            .unwrap();
        let cluster_file = dir.join("cluster.json");
        snapshot.write_file(&cluster_file).unwrap();
        let pins = PinDir::unique(&format!("sluice-{prefix}-"));
        let (socket, log) = (dir.join("agent.sock"), dir.join("agent.log"));
        let agent = Command::new(binary("SLUICE_AGENT_BIN", "sluice-agent"))
            .args([
                "--node",
                NODE,
                "--netns",
                netns.name(),
                "--reconcile-interval",
                "1",
            ])
            .arg("--cluster-file")
            .arg(&cluster_file)
            .arg("--pin-dir")
            .arg(pins.path())
            .arg("--api-socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut node = Self {
            socket,
            log,
            dir,
            agent,
            _pins: pins,
            netns,
        };
        node.wait_realized(snapshot.revision);
        node
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_realized(&mut self, revision: u64) {
        let start = Instant::now();
        loop {
            let status = self.client().status();
            if status.is_ok_and(|s| s.realized_revision >= revision && s.realized_generation > 0) {
                return;
            }
            if let Ok(Some(exit)) = self.agent.try_wait() {
                panic!("the agent exited ({exit})\n{}", self.log_text());
            }
            assert!(
                start.elapsed() < REALIZE_TIMEOUT,
                "revision {revision} not realized\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentNode {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The `sluice-cni` plugin binary (`SLUICE_CNI_BIN`, else the workspace's debug build).
pub fn sluice_cni() -> PathBuf {
    binary("SLUICE_CNI_BIN", "sluice-cni")
}
