//! Network namespaces, veths, addresses and routes, through iproute2, sysctl and ethtool.
//!
//! Every command names its network namespace (`ip -n`, `nsenter --net=`), so nothing here
//! can touch the root namespace; `ip netns add/del` only manage the names in /run/netns.

use std::{
    ffi::OsStr,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::LabError;

const NETNS_DIR: &str = "/run/netns";
/// Interface holding the node's router address: one end of a veth pair, like Cilium's
/// cilium_host/cilium_net (a dummy would do, but kernels without CONFIG_DUMMY exist; veth is
/// needed for the pods anyway).
pub const HOST_INTERFACE: &str = "sluice_host";
const HOST_PEER: &str = "sluice_net";
/// Interface alias that marks a namespace as the lab's, for `lab down` without `lab.json`.
pub fn alias(lab: &str) -> String {
    format!("sluice-lab={lab}")
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Names in /run/netns starting with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Runs a command to completion; failures carry the command line and its stderr.
pub fn run(cmd: &mut Command) -> Result<String, LabError> {
    let command = describe(cmd);
    let out = cmd.output().map_err(|e| LabError::Command {
        command: command.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `ip -n <netns> <args>`.
fn ip(netns: &str, args: &[&str]) -> Result<String, LabError> {
    run(Command::new("ip").arg("-n").arg(netns).args(args))
}

/// `ip -n <netns> -batch -` with one command per line; stops at the first failing line,
/// which the error names (`Command failed -:<line>`) next to the whole batch.
fn ip_batch(netns: &str, lines: &[String]) -> Result<(), LabError> {
    let command = format!("ip -n {netns} -batch - <<< {lines:?}");
    let fail = |detail: String| LabError::Command {
        command: command.clone(),
        detail,
    };
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(lines.join("\n").as_bytes())
            .map_err(|e| fail(format!("writing the batch: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A command run in `netns` that keeps the host's /sys (unlike `ip netns exec`).
pub fn in_netns(netns: &str, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns_path(netns).display()))
        .arg("--")
        .arg(program);
    cmd
}

fn sysctl(netns: &str, settings: &[String]) -> Result<(), LabError> {
    run(in_netns(netns, "sysctl").arg("-q").arg("-w").args(settings)).map(drop)
}

pub fn add_netns(name: &str) -> Result<(), LabError> {
    run(Command::new("ip").args(["netns", "add", name])).map(drop)
}

/// Removes the name; the namespace itself goes with its last process and interface.
pub fn del_netns(name: &str) -> Result<(), LabError> {
    if !netns_exists(name) {
        return Ok(());
    }
    run(Command::new("ip").args(["netns", "del", name])).map(drop)
}

/// A node: forwarding on, reverse-path filtering off (replies from a service's backends carry
/// the ClusterIP as source, which has no route back), and the router address on `sluice_host`.
pub fn setup_node(lab: &str, netns: &str, router: Ipv4Addr) -> Result<(), LabError> {
    ip_batch(netns, &["link set lo up".into()])?;
    // Before any lxc exists: new interfaces copy `default`, so every lxc gets rp_filter 0.
    sysctl(
        netns,
        &[
            "net.ipv4.ip_forward=1".into(),
            "net.ipv4.conf.all.rp_filter=0".into(),
            "net.ipv4.conf.default.rp_filter=0".into(),
        ],
    )?;
    ip_batch(
        netns,
        &[
            format!("link add {HOST_INTERFACE} type veth peer name {HOST_PEER}"),
            format!("link set {HOST_INTERFACE} alias {}", alias(lab)),
            format!("addr add {router}/32 dev {HOST_INTERFACE}"),
            format!("link set {HOST_PEER} up"),
            format!("link set {HOST_INTERFACE} up"),
        ],
    )
}

/// What connects one pod to its node.
pub struct PodLink<'a> {
    pub lab: &'a str,
    pub node_netns: &'a str,
    pub pod_netns: &'a str,
    /// Host-side veth name.
    pub interface: &'a str,
    pub ip: Ipv4Addr,
    pub router: Ipv4Addr,
    pub tx_checksum_offload: bool,
}

/// The pod's `eth0` with its /32, routed through the node's router address, and the node's
/// /32 route back. The host side has no address: the node answers ARP for its router address
/// on any interface. Batched, one `ip` per namespace, because every process start counts in
/// the time until a new backend takes traffic.
pub fn setup_pod(l: &PodLink<'_>) -> Result<(), LabError> {
    let (node, pod, lxc) = (l.node_netns, l.pod_netns, l.interface);
    let (ip, router) = (l.ip, l.router);
    ip_batch(
        node,
        &[
            format!("link add {lxc} type veth peer name eth0 netns {pod}"),
            format!("link set {lxc} up"),
            format!("route add {ip}/32 dev {lxc} src {router}"),
        ],
    )?;
    ip_batch(
        pod,
        &[
            "link set lo up".into(),
            format!("link set eth0 alias {}", alias(l.lab)),
            format!("addr add {ip}/32 dev eth0"),
            "link set eth0 up".into(),
            format!("route add {router} dev eth0 scope link"),
            format!("route add default via {router} dev eth0"),
        ],
    )?;
    if !l.tx_checksum_offload {
        // Forces real checksums on packets the node sends into the pod, so NAT checksum
        // bugs show up in the lab rather than on a real NIC.
        run(in_netns(node, "ethtool").args(["-K", lxc, "tx", "off"]))?;
    }
    Ok(())
}

/// What connects a world host to its node.
pub struct WorldLink<'a> {
    pub lab: &'a str,
    pub node_netns: &'a str,
    pub world_netns: &'a str,
    /// Node-side veth name.
    pub interface: &'a str,
    pub address: Ipv4Addr,
    pub router: Ipv4Addr,
}

/// Wired like a pod (its `eth0` with a /32, default route via the node's router address, the
/// node's /32 route back), but on an interface no agent attaches to: a host outside the
/// cluster, whose traffic the pods' own interfaces judge.
pub fn setup_world(l: &WorldLink<'_>) -> Result<(), LabError> {
    let (node, world, veth) = (l.node_netns, l.world_netns, l.interface);
    let (address, router) = (l.address, l.router);
    ip_batch(
        node,
        &[
            format!("link add {veth} type veth peer name eth0 netns {world}"),
            format!("link set {veth} up"),
            format!("route add {address}/32 dev {veth} src {router}"),
        ],
    )?;
    ip_batch(
        world,
        &[
            "link set lo up".into(),
            format!("link set eth0 alias {}", alias(l.lab)),
            format!("addr add {address}/32 dev eth0"),
            "link set eth0 up".into(),
            format!("route add {router} dev eth0 scope link"),
            format!("route add default via {router} dev eth0"),
        ],
    )
}

/// Whether an interface of `netns` carries the lab's alias.
pub fn has_alias(netns: &str, lab: &str) -> bool {
    let Ok(out) = ip(netns, &["-o", "link", "show"]) else {
        return false;
    };
    let want = alias(lab);
    out.lines()
        .any(|l| l.split_whitespace().skip_while(|w| *w != "alias").nth(1) == Some(&want))
}
