//! Network namespaces the benchmark creates and always removes (sluice-netns's
//! `OwnedNetNs`), and running code or commands inside them. Nothing here touches the root
//! namespace.

use std::{
    io::Write,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

pub use sluice_netns::unique_name;
use sluice_netns::{Ipv4Net, OwnedNetNs, Route};

use crate::BenchError;

/// Runs `cmd`, feeding `stdin` if any; its stdout, or a failure with the command line and
/// stderr.
fn output(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<String, BenchError> {
    let line = format!("{cmd:?}");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().map_err(|source| BenchError::Io {
        call: "spawn",
        what: line.clone(),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input).map_err(|source| BenchError::Io {
            call: "write stdin",
            what: line.clone(),
            source,
        })?;
    }
    let out = child.wait_with_output().map_err(|source| BenchError::Io {
        call: "wait",
        what: line.clone(),
        source,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(BenchError::Command {
            command: line,
            status: out.status.to_string(),
            stderr: stderr.chars().take(2000).collect(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (under /run/netns), deleted on drop with everything in it.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
    ns: OwnedNetNs,
}

impl NetNs {
    pub fn new(role: &str) -> Result<Self, BenchError> {
        let ns = OwnedNetNs::unique(&format!("sbench-{role}-"))?;
        Ok(Self {
            name: ns.name().into(),
            ns,
        })
    }

    /// `program args...` inside this namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, BenchError> {
        output(self.ns.command(program)?.args(args), None)
    }

    /// Like [`exec`](Self::exec), feeding `input` on stdin (rule sets for restore tools).
    pub fn exec_stdin(
        &self,
        program: &str,
        args: &[&str],
        input: &[u8],
    ) -> Result<String, BenchError> {
        output(self.ns.command(program)?.args(args), Some(input))
    }

    /// `program args...` as a process inside this namespace and `cgroup` from its start
    /// (a pod's process); its stdout.
    pub fn exec_in_cgroup(
        &self,
        program: &std::path::Path,
        args: &[&str],
        cgroup: &sluice_netns::Cgroup,
    ) -> Result<String, BenchError> {
        let mut command = self.ns.command(program)?;
        command.args(args);
        cgroup.enter_on_exec(&mut command)?;
        output(&mut command, None)
    }

    /// The namespace itself, for links whose peer goes into it.
    pub fn ns(&self) -> &sluice_netns::NetNs {
        &self.ns
    }

    /// A netlink connection acting in this namespace.
    pub fn netlink(&self) -> Result<sluice_netns::Netlink, BenchError> {
        Ok(self.ns.netlink()?)
    }

    pub fn sysctl(&self, settings: &[(&str, &str)]) -> Result<(), BenchError> {
        Ok(self.ns.set_sysctls(settings)?)
    }

    /// Connects `pod` to this namespace (the node) like a pod on its node: `lxc` here with
    /// the gateway's /24, `eth0` in the pod with `address`/24 and a default route via the
    /// gateway (`address` with its last octet 1).
    pub fn wire_pod(&self, pod: &NetNs, lxc: &str, address: Ipv4Addr) -> Result<(), BenchError> {
        let [a, b, c, _] = address.octets();
        let gateway = Ipv4Addr::new(a, b, c, 1);
        let subnet = |ip| Ipv4Net::new(ip, 24).map_err(|e| BenchError::Failed(e.to_string()));
        let node = self.ns.netlink()?;
        node.add_veth(lxc, "eth0", Some(&pod.ns))?;
        node.add_address(lxc, subnet(gateway)?.into())?;
        node.set_up(lxc)?;
        let inside = pod.ns.netlink()?;
        inside.add_address("eth0", subnet(address)?.into())?;
        inside.set_up("eth0")?;
        inside.add_route(&Route::default_via(gateway))?;
        Ok(())
    }

    /// Runs `f` on a thread inside this namespace and waits for it. Threads it spawns
    /// inherit the namespace, and sockets it creates stay in it.
    pub fn run<T, F>(&self, f: F) -> Result<T, BenchError>
    where
        T: Send,
        F: FnOnce() -> Result<T, BenchError> + Send,
    {
        self.ns.run(f)?
    }
}
