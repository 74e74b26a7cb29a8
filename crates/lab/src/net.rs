//! Network namespaces, veths, addresses and routes, through iproute2, sysctl and ethtool.
//!
//! Every command names its network namespace (`ip -n`, `nsenter --net=`), so nothing here
//! can touch the root namespace; `ip netns add/del` only manage the names in /run/netns.

use std::{
    ffi::OsStr,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
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
    ip(netns, &["link", "set", "lo", "up"])?;
    sysctl(
        netns,
        &[
            "net.ipv4.ip_forward=1".into(),
            "net.ipv4.conf.all.rp_filter=0".into(),
            "net.ipv4.conf.default.rp_filter=0".into(),
        ],
    )?;
    ip(
        netns,
        &[
            "link",
            "add",
            HOST_INTERFACE,
            "type",
            "veth",
            "peer",
            "name",
            HOST_PEER,
        ],
    )?;
    ip(
        netns,
        &["link", "set", HOST_INTERFACE, "alias", &alias(lab)],
    )?;
    ip(
        netns,
        &[
            "addr",
            "add",
            &format!("{router}/32"),
            "dev",
            HOST_INTERFACE,
        ],
    )?;
    ip(netns, &["link", "set", HOST_PEER, "up"])?;
    ip(netns, &["link", "set", HOST_INTERFACE, "up"])?;
    Ok(())
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
/// on any interface.
pub fn setup_pod(l: &PodLink<'_>) -> Result<(), LabError> {
    let (node, pod, lxc) = (l.node_netns, l.pod_netns, l.interface);
    let (ip_text, router) = (l.ip.to_string(), l.router.to_string());
    ip(pod, &["link", "set", "lo", "up"])?;
    ip(
        node,
        &[
            "link", "add", lxc, "type", "veth", "peer", "name", "eth0", "netns", pod,
        ],
    )?;
    ip(pod, &["link", "set", "eth0", "alias", &alias(l.lab)])?;
    ip(
        pod,
        &["addr", "add", &format!("{ip_text}/32"), "dev", "eth0"],
    )?;
    ip(pod, &["link", "set", "eth0", "up"])?;
    ip(
        pod,
        &["route", "add", &router, "dev", "eth0", "scope", "link"],
    )?;
    ip(
        pod,
        &["route", "add", "default", "via", &router, "dev", "eth0"],
    )?;
    sysctl(node, &[format!("net.ipv4.conf.{lxc}.rp_filter=0")])?;
    if !l.tx_checksum_offload {
        // Forces real checksums on packets the node sends into the pod, so NAT checksum
        // bugs show up in the lab rather than on a real NIC.
        run(in_netns(node, "ethtool").args(["-K", lxc, "tx", "off"]))?;
    }
    ip(node, &["link", "set", lxc, "up"])?;
    ip(
        node,
        &[
            "route",
            "add",
            &format!("{ip_text}/32"),
            "dev",
            lxc,
            "src",
            &router,
        ],
    )?;
    Ok(())
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
