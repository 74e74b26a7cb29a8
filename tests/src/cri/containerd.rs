//! A private containerd for one test, run inside a network namespace the test owns (the
//! "node"), so the CNI plugins it runs, and the host side of every pod's interface, are in
//! that namespace and never in the root one. Root, state, sockets, runc state, pod network
//! namespaces and config all live under one temporary directory; sandbox cgroups under a
//! parent named for the test. Drop removes every sandbox (the CNI DEL a kubelet would cause),
//! then the daemon, its shims, mounts, cgroups and files, also when the test panics. Left
//! are two empty directories containerd 1.6 has no setting for: /run/containerd/s (shim
//! sockets) and /var/lib/cni/results (libcni's result cache); removing them could race
//! another test's daemon.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use sluice_netns::NetNs;
use tonic::Status;

use super::{
    client::{CriClient, proto},
    image::{PAUSE_IMAGE, write_pause_image},
};

/// The containerd namespace the CRI plugin keeps its images and sandboxes in.
const CRI_NAMESPACE: &str = "k8s.io";
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A sandbox as the runtime reports it: its id, whether it is ready, the pod IP from its
/// status, and the network namespace the runtime made for it (the CNI_NETNS its plugins
/// were given).
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: String,
    pub ready: bool,
    pub ip: String,
    pub netns: NetNs,
}

/// The daemon with its CRI client. Fields drop in order: the client after `drop` has
/// removed the sandboxes through it, then the daemon and everything it made.
pub struct Containerd {
    pub cri: CriClient,
    daemon: Daemon,
}

/// The containerd process and its files; dropping it removes both.
struct Daemon {
    dir: PathBuf,
    snapshotter: &'static str,
    socket: PathBuf,
    log: PathBuf,
    cgroup_parent: String,
    process: Child,
}

/// overlayfs where this kernel and filesystem mount it, else the copying `native`
/// snapshotter (slower, works anywhere).
fn pick_snapshotter(dir: &Path) -> &'static str {
    let probe = dir.join("overlay-probe");
    let [lower, upper, work, merged] = ["lower", "upper", "work", "merged"].map(|d| probe.join(d));
    for d in [&lower, &upper, &work, &merged] {
        fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let mounted = mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    );
    let snapshotter = match mounted {
        Ok(()) => {
            let _ = umount2(&merged, MntFlags::MNT_DETACH);
            "overlayfs"
        }
        Err(e) => {
            eprintln!("containerd: overlayfs cannot mount here ({e}), using native");
            "native"
        }
    };
    let _ = fs::remove_dir_all(&probe);
    snapshotter
}

fn config_toml(dir: &Path, snapshotter: &str) -> String {
    let d = dir.display();
    let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
    // Every path is the test's: nothing is shared with a system containerd. The pod
    // network namespaces go under the state directory, not /run/netns. This machine's
    // root lacks CAP_SYS_RESOURCE, so the kernel refuses the sandbox's oom_score_adj of
    // -998 (runc: "failed to update /proc/self/oom_score_adj: Permission denied");
    // restrict_oom_score_adj keeps it at containerd's own.
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.internal.v1.restart", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "{snapshotter}"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        Root = "{d}/runc"
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
"#
    )
}

impl Containerd {
    /// Starts containerd in `node`, imports the pause image and connects the CRI client;
    /// panics, after cleaning up, with the daemon's log if any step fails. The CNI setup is
    /// laid out as a node's installer would: `plugins` linked into its `bin_dir` under their
    /// file names, and the network configuration list `conflist(dir)` (`dir` being the
    /// daemon's own, for plugin state) as the only file of its `conf_dir`.
    pub fn start(node: &NetNs, plugins: &[&Path], conflist: impl FnOnce(&Path) -> String) -> Self {
        let name = sluice_netns::unique_name("sluice-cri-");
        let dir = std::env::temp_dir().join(&name);
        for sub in ["root", "state", "opt", "runc", "cni/bin", "cni/conf"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        }
        for plugin in plugins {
            let file_name = plugin.file_name().expect("a plugin binary's file name");
            let link = dir.join("cni/bin").join(file_name);
            symlink(plugin, &link).unwrap_or_else(|e| panic!("link {}: {e}", link.display()));
        }
        fs::write(dir.join("cni/conf/10-test.conflist"), conflist(&dir)).unwrap();
        let snapshotter = pick_snapshotter(&dir);
        let config = dir.join("config.toml");
        fs::write(&config, config_toml(&dir, snapshotter)).unwrap();
        let log = dir.join("containerd.log");
        let log_file = fs::File::create(&log).unwrap();
        let spawned = node
            .command("containerd")
            .map_err(|e| e.to_string())
            .and_then(|mut command| {
                command
                    .arg("--config")
                    .arg(&config)
                    .stdin(Stdio::null())
                    .stdout(log_file.try_clone().unwrap())
                    .stderr(log_file)
                    .spawn()
                    .map_err(|e| format!("spawn containerd: {e} (scripts/setup.sh installs it)"))
            });
        let process = spawned.unwrap_or_else(|error| {
            // Without a process there is no Daemon to clean up: the directory goes here.
            let _ = fs::remove_dir_all(&dir);
            panic!("{error}")
        });
        let mut daemon = Daemon {
            socket: dir.join("containerd.sock"),
            dir,
            snapshotter,
            log,
            cgroup_parent: format!("/{name}"),
            process,
        };
        daemon.wait_for_socket();
        daemon.import_pause_image();
        let cri = CriClient::connect(&daemon.socket)
            .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
        Self { cri, daemon }
    }

    /// The directory holding everything of this daemon.
    pub fn dir(&self) -> &Path {
        &self.daemon.dir
    }

    /// Where this daemon's traces would be, to check they are gone after drop.
    pub fn footprint(&self) -> Footprint {
        self.daemon.footprint()
    }

    /// The snapshotter the CRI plugin unpacks images with.
    pub fn snapshotter(&self) -> &'static str {
        self.daemon.snapshotter
    }

    /// The last lines of the daemon's log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.daemon.log_tail()
    }
}

impl Daemon {
    fn wait_for_socket(&mut self) {
        let start = Instant::now();
        while !self.socket.exists() {
            if let Ok(Some(status)) = self.process.try_wait() {
                panic!("containerd exited: {status}\n{}", self.log_tail());
            }
            assert!(
                start.elapsed() < START_TIMEOUT,
                "containerd made no socket in {START_TIMEOUT:?}\n{}",
                self.log_tail()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ctr images import`, unpacked for the snapshotter the CRI plugin uses.
    fn import_pause_image(&self) {
        let tarball = self.dir.join("pause.tar");
        write_pause_image(&tarball).unwrap_or_else(|e| panic!("pause image: {e}"));
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", CRI_NAMESPACE, "images", "import", "--snapshotter"])
            .arg(self.snapshotter)
            .arg(&tarball)
            .output()
            .unwrap_or_else(|e| panic!("ctr: {e}"));
        assert!(
            out.status.success(),
            "ctr images import: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The cgroup directories sandboxes get, one per mounted hierarchy.
    fn cgroups(&self) -> Vec<PathBuf> {
        let parent = self.cgroup_parent.trim_start_matches('/');
        cgroup_mounts()
            .into_iter()
            .map(|m| m.join(parent))
            .collect()
    }

    /// What the daemon could leave behind, to check after it is gone.
    fn footprint(&self) -> Footprint {
        Footprint {
            dir: self.dir.clone(),
            socket: self.socket.clone(),
            cgroups: self.cgroups(),
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(30)..];
        format!(
            "containerd log ({}):\n{}",
            self.log.display(),
            tail.join("\n")
        )
    }
}

impl Containerd {
    /// The sandbox config a kubelet sends for pod `namespace/name`: metadata, hostname,
    /// and the test's cgroup parent.
    pub fn sandbox_config(&self, namespace: &str, name: &str) -> proto::PodSandboxConfig {
        proto::PodSandboxConfig {
            metadata: Some(proto::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{namespace}-{name}"),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self
                .daemon
                .dir
                .join("pods")
                .join(name)
                .display()
                .to_string(),
            linux: Some(proto::LinuxPodSandboxConfig {
                cgroup_parent: self.daemon.cgroup_parent.clone(),
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox, then PodSandboxStatus: the sandbox with its IP and network namespace.
    pub fn run_pod(&mut self, namespace: &str, name: &str) -> Result<Sandbox, Status> {
        let config = self.sandbox_config(namespace, name);
        let id = self.cri.run_pod_sandbox(config)?;
        self.sandbox(&id)
    }

    /// A sandbox's status as a [`Sandbox`].
    pub fn sandbox(&mut self, id: &str) -> Result<Sandbox, Status> {
        let response = self.cri.pod_sandbox_status(id)?;
        let status = response.status.unwrap_or_default();
        let ready = status.state() == proto::PodSandboxState::SandboxReady;
        let ip = status.network.unwrap_or_default().ip;
        // containerd's verbose info: its runtime spec names the network namespace.
        let info: serde_json::Value = response
            .info
            .get("info")
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_default();
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str())
            .ok_or_else(|| Status::internal(format!("no network namespace in {info}")))?;
        let netns = NetNs::at_path(netns).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Sandbox {
            id: id.into(),
            ready,
            ip,
            netns,
        })
    }

    /// StopPodSandbox then RemovePodSandbox, as a kubelet deletes a pod.
    pub fn remove_pod(&mut self, id: &str) -> Result<(), Status> {
        self.cri.stop_pod_sandbox(id)?;
        self.cri.remove_pod_sandbox(id)
    }
}

/// The places a daemon's traces would be: its directory (and mounts under it), its cgroups
/// and processes naming its socket (its shims).
pub struct Footprint {
    dir: PathBuf,
    socket: PathBuf,
    cgroups: Vec<PathBuf>,
}

impl Footprint {
    /// What is still there, described; empty once everything is cleaned up.
    pub fn remaining(&self) -> Vec<String> {
        let mut left: Vec<String> = mounts_under(&self.dir)
            .iter()
            .map(|m| format!("mount {}", m.display()))
            .collect();
        left.extend(
            [&self.dir]
                .into_iter()
                .chain(&self.cgroups)
                .filter(|path| path.exists())
                .map(|path| format!("directory {}", path.display())),
        );
        left.extend(
            pids_naming(&self.socket)
                .iter()
                .map(|pid| format!("process {pid}")),
        );
        left
    }
}

/// Pids of processes whose command line names `socket` (a daemon's shims), but this one's.
fn pids_naming(socket: &Path) -> Vec<i32> {
    let socket = socket.to_string_lossy().into_owned();
    let own = std::process::id().to_string();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|pid| *pid != own)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&socket))
        })
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

/// Mount points under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut mounts: Vec<PathBuf> = mount_table()
        .into_iter()
        .map(|(point, _)| point)
        .filter(|point| point.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts
}

/// Mount points of every cgroup hierarchy (v1 controllers and v2).
fn cgroup_mounts() -> Vec<PathBuf> {
    mount_table()
        .into_iter()
        .filter(|(_, fstype)| fstype == "cgroup" || fstype == "cgroup2")
        .map(|(point, _)| point)
        .collect()
}

/// (mount point, fs type) of every mount of this process's mount namespace.
fn mount_table() -> Vec<(PathBuf, String)> {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    table
        .lines()
        .filter_map(|line| {
            // "<id> <parent> <dev> <root> <mount point> <options> [tags] - <fstype> ..."
            let (fields, rest) = line.split_once(" - ")?;
            let point = fields.split(' ').nth(4)?;
            let fstype = rest.split(' ').next()?;
            Some((PathBuf::from(point), fstype.to_owned()))
        })
        .collect()
}

/// Removes the cgroup directory `path` and every one below it, deepest first.
fn remove_cgroup_tree(path: &Path) {
    let Ok(entries) = fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    if let Err(e) = fs::remove_dir(path) {
        eprintln!("cleanup: rmdir {}: {e}", path.display());
    }
}

/// Pids in the cgroup directory `path` and below.
fn cgroup_pids(path: &Path, pids: &mut Vec<i32>) {
    let procs = fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
    pids.extend(procs.lines().filter_map(|l| l.parse::<i32>().ok()));
    for entry in fs::read_dir(path).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            cgroup_pids(&entry.path(), pids);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Through the CRI, so the plugins see DEL as under a kubelet.
        if let Ok(sandboxes) = self.cri.list_pod_sandbox() {
            for sandbox in sandboxes {
                if let Err(e) = self.remove_pod(&sandbox.id) {
                    eprintln!("cleanup: sandbox {}: {e}", sandbox.id);
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let daemon = Pid::from_raw(self.process.id() as i32);
        let _ = kill(daemon, Signal::SIGTERM);
        let start = Instant::now();
        while matches!(self.process.try_wait(), Ok(None)) && start.elapsed() < START_TIMEOUT {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
        // Whatever a failed removal left: shims, and pause processes in the test's cgroups.
        // The daemon is gone, so only its shims name its socket now.
        let cgroups = self.cgroups();
        let mut leftovers = pids_naming(&self.socket);
        for cgroup in &cgroups {
            cgroup_pids(cgroup, &mut leftovers);
        }
        leftovers.sort_unstable();
        leftovers.dedup();
        for pid in &leftovers {
            eprintln!("cleanup: killing leftover process {pid}");
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        if !leftovers.is_empty() {
            thread::sleep(Duration::from_millis(200));
        }
        // Mounts under the directory (rootfs, pod network namespaces), deepest first.
        for point in mounts_under(&self.dir) {
            if let Err(e) = umount2(&point, MntFlags::MNT_DETACH) {
                eprintln!("cleanup: umount {}: {e}", point.display());
            }
        }
        for cgroup in &cgroups {
            if cgroup.exists() {
                remove_cgroup_tree(cgroup);
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("cleanup: remove {}: {e}", self.dir.display());
        }
    }
}
