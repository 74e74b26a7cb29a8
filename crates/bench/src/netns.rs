//! Network namespaces the benchmark creates and always removes (RAII), and running code
//! or commands inside them. Nothing here touches the root namespace.

use std::{
    io::Write,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use crate::BenchError;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call (namespaces, pin directories).
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}-{n}", std::process::id())
}

/// Runs `cmd`, returning its stdout; a failure carries the command line and stderr.
pub fn run(cmd: &mut Command) -> Result<String, BenchError> {
    output(cmd, None)
}

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
}

impl NetNs {
    pub fn new(role: &str) -> Result<Self, BenchError> {
        let name = unique_name(&format!("sbench-{role}-"));
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Result<String, BenchError> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// `ip netns exec <ns> program args...`
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, BenchError> {
        run(self.command(program).args(args))
    }

    /// Like [`exec`](Self::exec), feeding `input` on stdin (rule sets for restore tools).
    pub fn exec_stdin(
        &self,
        program: &str,
        args: &[&str],
        input: &[u8],
    ) -> Result<String, BenchError> {
        output(self.command(program).args(args), Some(input))
    }

    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    pub fn sysctl(&self, settings: &[&str]) -> Result<(), BenchError> {
        let mut args = vec!["-q", "-w"];
        args.extend_from_slice(settings);
        self.exec("sysctl", &args).map(drop)
    }

    /// Starts `f` on a new thread inside this namespace. Threads it spawns inherit the
    /// namespace, and sockets it creates stay in it.
    pub fn spawn<T, F>(&self, f: F) -> Result<thread::JoinHandle<Result<T, BenchError>>, BenchError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, BenchError> + Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).map_err(|source| BenchError::Io {
            call: "open",
            what: path.clone(),
            source,
        })?;
        thread::Builder::new()
            .name(format!("ns-{}", self.name))
            .spawn(move || {
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|errno| {
                    BenchError::Io {
                        call: "setns",
                        what: path,
                        source: errno.into(),
                    }
                })?;
                f()
            })
            .map_err(|source| BenchError::Io {
                call: "spawn thread",
                what: self.name.clone(),
                source,
            })
    }

    /// Runs `f` inside this namespace and waits for it.
    pub fn run<T, F>(&self, f: F) -> Result<T, BenchError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, BenchError> + Send + 'static,
    {
        self.spawn(f)?
            .join()
            .map_err(|_| BenchError::Failed(format!("a thread in {} panicked", self.name)))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(err) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("cleanup: {err}");
        }
    }
}
