//! Restarting one node's agent in a running lab, gracefully or by `kill -9`, as an upgrade
//! or a crash would: the datapath stays pinned meanwhile, and the new agent takes it over.

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{Lab, LabError, process};

/// How an agent is stopped before it is started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentStop {
    /// SIGTERM: the agent finishes its pass and exits.
    Graceful,
    /// SIGKILL: the agent dies wherever it is.
    Kill,
}

impl AgentStop {
    fn signal(self) -> Signal {
        match self {
            AgentStop::Graceful => Signal::SIGTERM,
            AgentStop::Kill => Signal::SIGKILL,
        }
    }
}

/// How long a restart took, by phase.
#[derive(Clone, Copy, Debug)]
pub struct AgentRestart {
    /// From the signal until the old agent had exited (zero if none ran).
    pub stopped: Duration,
    /// From the new agent's start until it was healthy and had realized the lab's current
    /// generation.
    pub realized: Duration,
}

/// How long an agent gets to exit after SIGTERM before the restart fails.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new agent gets to realize the lab: twice a start's, as it loads every
/// program again on a node that is carrying traffic (about 6 s of verifier time here,
/// 15-20 s while another lab restarts its agents on the same two cores).
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);

impl Lab {
    /// Stops `node`'s agent as `how` says (if one runs: an agent that exited is started
    /// again), starts it with the lab's command line, and waits until it is healthy and has
    /// realized the lab's current generation.
    pub fn restart_agent(&self, node: &str, how: AgentStop) -> Result<AgentRestart, LabError> {
        let Some(agent) = self
            .opts
            .binaries
            .agent
            .as_deref()
            .filter(|_| self.state.agents)
        else {
            return Err(LabError::Command {
                command: format!("restart the agent of node {node}"),
                detail: "the lab runs no agents".into(),
            });
        };
        if !self.nodes().iter().any(|n| n == node) {
            return Err(LabError::NodeNotFound(node.to_owned()));
        }
        let pids = self.agent_pids(node);
        let signalled = Instant::now();
        for pid in &pids {
            match kill(Pid::from_raw(*pid), how.signal()) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(source) => {
                    return Err(LabError::Sys {
                        call: "kill",
                        source,
                    });
                }
            }
        }
        while !self.agent_pids(node).is_empty() {
            if signalled.elapsed() > EXIT_TIMEOUT {
                return Err(LabError::Command {
                    command: format!("kill -{} (agent of node {node})", how.signal().as_str()),
                    detail: format!("still running after {EXIT_TIMEOUT:?}: {pids:?}"),
                });
            }
            thread::sleep(Duration::from_millis(5));
        }
        let stopped = signalled.elapsed();
        let started = Instant::now();
        let cmd = self.agent_command(agent, node)?;
        let child = process::spawn_detached(cmd, &self.agent_log(node))?;
        self.wait_agents(
            self.state.generation,
            RESTART_TIMEOUT,
            &[(node.to_owned(), child)],
        )?;
        Ok(AgentRestart {
            stopped,
            realized: started.elapsed(),
        })
    }

    /// The agent processes of `node`: those in its namespace started with its API socket.
    fn agent_pids(&self, node: &str) -> Vec<i32> {
        let mut socket = self
            .agent_socket(node)
            .into_os_string()
            .into_encoded_bytes();
        socket.push(0);
        process::pids_in_netns(&self.node_netns(node))
            .into_iter()
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|cmdline| cmdline.windows(socket.len()).any(|w| w == socket))
            })
            .collect()
    }
}
