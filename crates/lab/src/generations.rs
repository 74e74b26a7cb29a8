//! The snapshot generations the agents read, and waiting until they realized one.

use std::{thread, time::Duration, time::Instant};

use sluice_api::Client;

use crate::{Lab, LabError, LogTail, POLL, process::Detached, state::LabState};

impl Lab {
    pub(crate) fn reload(&mut self) -> Result<(), LabError> {
        self.state = LabState::read(&self.dir.join("lab.json"))?;
        Ok(())
    }

    pub(crate) fn write(&self, state: &LabState) -> Result<(), LabError> {
        state.write(&self.dir.join("lab.json"))?;
        state.snapshot().write_file(&self.cluster_file())?;
        Ok(())
    }

    /// Makes `state` the lab's state under a new generation.
    pub(crate) fn commit(&mut self, mut state: LabState) -> Result<u64, LabError> {
        state.generation = self.state.generation + 1;
        self.write(&state)?;
        self.state = state;
        // The cloud's side of the change: VIPs given or released, nodes come or gone.
        self.sync_router()?;
        Ok(self.state.generation)
    }

    /// Waits until every node's agent has realized `generation`. `started` are the agents
    /// `lab up` just started: those must also be healthy, and one that exits fails the wait.
    /// Returns when each node was first seen with it realized, in node order.
    pub(crate) fn wait_agents(
        &self,
        generation: u64,
        timeout: Duration,
        started: &[(String, Detached)],
    ) -> Result<Vec<(String, Instant)>, LabError> {
        if !self.state.agents {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + timeout;
        let mut pending = self.nodes();
        let mut realized = Vec::new();
        let mut last = String::new();
        loop {
            let mut still = Vec::new();
            for node in pending {
                match Client::new(self.agent_socket(&node)).status() {
                    // At startup the agent must also be healthy: it has loaded the datapath.
                    Ok(s)
                        if s.realized_revision >= generation
                            && (s.healthy || started.is_empty()) =>
                    {
                        realized.push((node, Instant::now()));
                    }
                    Ok(s) => {
                        last = format!(
                            "realized {} of {}, healthy {}{}",
                            s.realized_revision,
                            s.desired_revision,
                            s.healthy,
                            s.last_error
                                .map(|e| format!(", last error: {e}"))
                                .unwrap_or_default()
                        );
                        still.push(node);
                    }
                    Err(e) => {
                        last = e.to_string();
                        still.push(node);
                    }
                }
            }
            pending = still;
            let Some(node) = pending.first() else {
                let order = self.nodes();
                realized.sort_by_key(|(n, _)| order.iter().position(|o| o == n));
                return Ok(realized);
            };
            if let Some((_, agent)) = started.iter().find(|(n, _)| n == node)
                && let Some(status) = agent.exited()
            {
                return Err(LabError::AgentExited {
                    node: node.clone(),
                    status: status.to_string(),
                    log: self.agent_log(node),
                    tail: LogTail::of(&self.agent_log(node)),
                });
            }
            if Instant::now() > deadline {
                return Err(LabError::AgentTimeout {
                    node: node.clone(),
                    generation,
                    timeout,
                    last,
                    log: self.agent_log(node),
                    tail: LogTail::of(&self.agent_log(node)),
                });
            }
            thread::sleep(POLL);
        }
    }
}
