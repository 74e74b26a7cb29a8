//! `lab apply` and `lab delete`: a plan of the objects' new state, carried out.

use std::{path::PathBuf, time::Instant};

use crate::{ApplyReport, CHANGE_TIMEOUT, Lab, LabError, journal::lock, plan, plan::Plan};

impl Lab {
    /// `kubectl apply -f`: creates or updates the objects in `paths` (files or directories).
    /// The whole input is validated first; if anything is wrong, nothing changes.
    pub fn apply(&mut self, paths: &[PathBuf]) -> Result<ApplyReport, LabError> {
        let started = Instant::now();
        let manifests = sluice_sources::load_paths(paths)?;
        let _lock = lock(&self.dir, None)?;
        self.reload()?;
        let plan = plan::apply(&self.state, &manifests)?;
        self.execute(plan, started)
    }

    /// `kubectl delete -f`: every object named must exist, else nothing is deleted. Pods
    /// terminate gracefully: they leave the dataplane before their server stops.
    pub fn delete(&mut self, paths: &[PathBuf]) -> Result<ApplyReport, LabError> {
        let started = Instant::now();
        let manifests = sluice_sources::load_paths(paths)?;
        let _lock = lock(&self.dir, None)?;
        self.reload()?;
        let plan = plan::delete(&self.state, &manifests)?;
        self.execute(plan, started)
    }

    /// Starts the plan's new pods, commits, waits for every agent, then removes the
    /// terminating pods.
    pub(crate) fn execute(
        &mut self,
        plan: Plan,
        started: Instant,
    ) -> Result<ApplyReport, LabError> {
        let Plan {
            mut state,
            create,
            remove,
            lines,
        } = plan;
        self.start_pods(&mut state, &create)?;
        let changed = serde_json::to_value(&state).ok() != serde_json::to_value(&self.state).ok();
        if changed {
            self.commit(state)?;
        }
        // New pods are ready and terminating ones out of service once this is realized.
        self.wait_agents(self.state.generation, CHANGE_TIMEOUT, &[])?;
        if !remove.is_empty() {
            let mut state = self.state.clone();
            let mut first_error = None;
            for k in &remove {
                let Some(record) = state.pods.get(k).cloned() else {
                    continue;
                };
                match self.stop_pod(&record) {
                    Ok(()) => {
                        state.pods.remove(k);
                    }
                    // It stays terminating; the next apply or delete tries again.
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            self.commit(state)?;
            self.wait_agents(self.state.generation, CHANGE_TIMEOUT, &[])?;
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        Ok(ApplyReport {
            lines,
            generation: self.state.generation,
            realized_in: started.elapsed(),
        })
    }
}
