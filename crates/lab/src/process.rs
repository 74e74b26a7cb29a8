//! Processes that outlive the CLI call that started them (agents, pod servers), and finding
//! them again by network namespace.

use std::{
    fs,
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::Path,
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use sluice_netns::NetNs;

use crate::{LabError, error::io_err};

/// A started process. A thread reaps it when it exits, so a long-lived caller (a test)
/// collects no zombies; when the CLI exits first, init inherits it.
pub struct Detached {
    exit: Arc<Mutex<Option<ExitStatus>>>,
}

impl Detached {
    /// The exit status, once the process has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.exit.lock().ok().and_then(|s| *s)
    }
}

/// Starts `cmd` in a session of its own, stdin from /dev/null and its output appended to `log`.
pub fn spawn_detached(mut cmd: Command, log: &Path) -> Result<Detached, LabError> {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err("open", log))?;
    let err = out.try_clone().map_err(io_err("dup", log))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().map_err(io_err("spawn", program))?;
    let exit = Arc::new(Mutex::new(None));
    let reaped = Arc::clone(&exit);
    thread::spawn(move || {
        if let (Ok(status), Ok(mut slot)) = (child.wait(), reaped.lock()) {
            *slot = Some(status);
        }
    });
    Ok(Detached { exit })
}

/// (device, inode) of a namespace file: what identifies the namespace.
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Processes with any thread in network namespace `/run/netns/<netns>`, except this one.
pub fn pids_in_netns(netns: &str) -> Vec<i32> {
    // None also for an unmounted name, a plain file of /run that no process can be "in".
    let Some(target) = NetNs::named(netns).id() else {
        return Vec::new();
    };
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let tasks = Path::new("/proc").join(pid.to_string()).join("task");
            fs::read_dir(tasks).is_ok_and(|tasks| {
                tasks
                    .filter_map(Result::ok)
                    .any(|t| ns_id(&t.path().join("ns/net")) == Some(target))
            })
        })
        .filter_map(|pid| i32::try_from(pid).ok())
        .collect()
}

/// Stops every process in `netns`: SIGTERM, then SIGKILL for those still there after `grace`.
/// Returns how many there were.
pub fn kill_netns(netns: &str, grace: Duration) -> Result<usize, LabError> {
    let pids = pids_in_netns(netns);
    if pids.is_empty() {
        return Ok(0);
    }
    signal_all(&pids, Signal::SIGTERM)?;
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if pids_in_netns(netns).is_empty() {
            return Ok(pids.len());
        }
        thread::sleep(Duration::from_millis(10));
    }
    signal_all(&pids_in_netns(netns), Signal::SIGKILL)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pids_in_netns(netns).is_empty() {
        if Instant::now() > deadline {
            return Err(LabError::Command {
                command: format!("kill -KILL (processes in netns {netns})"),
                detail: format!("still running: {:?}", pids_in_netns(netns)),
            });
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(pids.len())
}

fn signal_all(pids: &[i32], signal: Signal) -> Result<(), LabError> {
    for pid in pids {
        match kill(Pid::from_raw(*pid), signal) {
            // Gone in between: what we wanted.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(source) => {
                return Err(LabError::Sys {
                    call: "kill",
                    source,
                });
            }
        }
    }
    Ok(())
}
