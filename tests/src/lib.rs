//! Support for the end-to-end tests: a lab that tears itself down, and sockets opened inside
//! a pod's network namespace without spawning a process.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failed step must fail the test loudly"
)]

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use sluice_lab::{Lab, LabBinaries, LabOptions};

pub mod cli;
pub mod cri;
pub mod load;
pub mod multinode;
pub mod netpol;
pub mod node;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A lab with a unique name and state root, removed (namespaces, processes, pins, files) on drop,
/// also when the test panics.
pub struct TestLab {
    pub lab: Lab,
    pub name: String,
    pub opts: LabOptions,
    dir: PathBuf,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub(crate) fn binary(env: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(env).map_or_else(
        || workspace_root().join("target/debug").join(name),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} not found: run `cargo build --bins` first (or set {env})",
        path.display()
    );
    path
}

pub fn examples() -> PathBuf {
    workspace_root().join("examples")
}

impl TestLab {
    /// Starts a lab (`lab_yaml` is the lab file's text) under a unique name.
    pub fn up(prefix: &str, lab_yaml: &str) -> Self {
        // A half-made lab is torn down when `failed` drops.
        Self::try_up(prefix, lab_yaml)
            .unwrap_or_else(|failed| panic!("lab up {}: {}", failed.name, failed.error))
    }

    /// [`Self::up`], or what failed: whatever the attempt made is left for the caller to
    /// inspect, and removed when the [`FailedLab`] drops.
    pub fn try_up(prefix: &str, lab_yaml: &str) -> Result<Self, Box<FailedLab>> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("sluice-test-{name}"));
        fs::create_dir_all(&dir).unwrap();
        let opts = LabOptions {
            binaries: LabBinaries {
                sluice: binary("SLUICE_BIN", "sluice"),
                agent: Some(binary("SLUICE_AGENT_BIN", "sluice-agent")),
            },
            state_root: dir.join("state"),
        };
        let lab_file = dir.join("lab.yaml");
        fs::write(&lab_file, lab_yaml).unwrap();
        match Lab::up(&name, &lab_file, &opts) {
            Ok(lab) => Ok(Self {
                lab,
                name,
                opts,
                dir,
            }),
            Err(error) => Err(Box::new(FailedLab {
                name,
                opts,
                dir,
                error,
            })),
        }
    }

    /// Writes `yaml` to a file and applies it.
    pub fn apply_yaml(&mut self, file: &str, yaml: &str) -> sluice_lab::ApplyReport {
        let path = self.dir.join(file);
        fs::write(&path, yaml).unwrap();
        self.lab
            .apply(&[path])
            .unwrap_or_else(|e| panic!("apply {file}: {e}"))
    }

    /// Writes `yaml` to a file and deletes what it names, like `kubectl delete -f`.
    pub fn delete_yaml(&mut self, file: &str, yaml: &str) -> sluice_lab::ApplyReport {
        let path = self.dir.join(file);
        fs::write(&path, yaml).unwrap();
        self.lab
            .delete(&[path])
            .unwrap_or_else(|e| panic!("delete {file}: {e}"))
    }

    pub fn try_apply_yaml(
        &mut self,
        file: &str,
        yaml: &str,
    ) -> Result<sluice_lab::ApplyReport, sluice_lab::LabError> {
        let path = self.dir.join(file);
        fs::write(&path, yaml).unwrap();
        self.lab.apply(&[path])
    }

    pub fn node(&self) -> String {
        self.lab.nodes().into_iter().next().expect("a node")
    }

    pub fn client(&self) -> sluice_api::Client {
        sluice_api::Client::new(self.lab.agent_socket(&self.node()))
    }

    pub fn cluster_ip(&self, service: &str) -> Ipv4Addr {
        let svc = self
            .lab
            .services()
            .into_iter()
            .find(|s| s.name == service)
            .unwrap_or_else(|| panic!("no service {service}"));
        svc.cluster_ip.parse().unwrap()
    }

    pub fn pod_ip(&self, pod: &str) -> Ipv4Addr {
        let (ns, name) = pod.split_once('/').unwrap();
        self.lab
            .pods()
            .into_iter()
            .find(|p| p.namespace == ns && p.name == name)
            .and_then(|p| p.ip)
            .unwrap()
    }

    /// Pods whose name starts with `prefix`, as `namespace/name`.
    pub fn pods_named(&self, prefix: &str) -> Vec<String> {
        self.lab
            .pods()
            .into_iter()
            .filter(|p| p.name.starts_with(prefix))
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect()
    }

    /// Runs `f` on a thread that has entered `pod`'s network namespace.
    pub fn in_pod<T: Send + 'static>(
        &self,
        pod: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let netns = self.lab.pod_netns(pod).unwrap();
        in_netns(&netns, f)
    }
}

impl TestLab {
    /// The `sluice` command against this lab, to spawn (`observe --follow`).
    pub fn cli_command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(binary("SLUICE_BIN", "sluice"));
        command
            .env("SLUICE_LAB_STATE", &self.opts.state_root)
            .arg("--lab")
            .arg(&self.name)
            .args(args);
        command
    }

    /// Runs the `sluice` binary against this lab, whatever its exit status.
    pub fn cli_output(&self, args: &[&str]) -> std::process::Output {
        self.cli_command(args).output().unwrap()
    }

    /// Runs the `sluice` binary against this lab and returns its stdout; fails the test if it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_output(args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "sluice {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Pids of the lab's (first node's) agent, found by the API socket on its command line.
    pub fn agent_pids(&self) -> Vec<i32> {
        self.agent_pids_of(&self.node())
    }

    /// Pids of `node`'s agent, found by its API socket on the command line.
    pub fn agent_pids_of(&self, node: &str) -> Vec<i32> {
        let socket = self.lab.agent_socket(node);
        let socket = socket.to_string_lossy();
        fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(socket.as_ref()))
            })
            .collect()
    }

    /// [`Self::cli`] with `-o json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        serde_json::from_str(&self.cli(&args)).unwrap()
    }
}

/// A lab that did not come up: its name, options and error.
pub struct FailedLab {
    pub name: String,
    pub opts: LabOptions,
    dir: PathBuf,
    pub error: sluice_lab::LabError,
}

impl Drop for FailedLab {
    fn drop(&mut self) {
        let _ = Lab::down(&self.name, &self.opts);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Err(e) = Lab::down(&self.name, &self.opts) {
            eprintln!("lab down {}: {e}", self.name);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a new thread inside network namespace `/run/netns/<netns>`.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    sluice_netns::NetNs::named(netns)
        .run(f)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// One HTTP GET over a fresh connection; the lab's pod servers answer with their pod name.
pub fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(body.trim().to_string())
}

/// Sends `payload` from a connected UDP socket and returns the answer and who sent it.
pub fn udp_ask(addr: SocketAddr, payload: &[u8]) -> std::io::Result<(String, SocketAddr)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.send(payload)?;
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
}

pub const ONE_NODE_LAB: &str = "apiVersion: sluice.dev/v1alpha1
kind: Lab
serviceCIDR: 10.96.0.0/16
txChecksumOffload: false
nodes:
  - name: node-1
    podCIDR: 10.244.1.0/24
";
