//! `lab apply` and `lab delete`: a plan of the objects' new state, carried out.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    CHANGE_TIMEOUT, Lab, LabError,
    changes::{Action, AgentRealized, ApplyReport, Change},
    journal::lock,
    plan,
    plan::Plan,
    state::LabState,
};

/// New pods started between two progress reports.
const PROGRESS_BATCH: usize = 16;

/// Told (pods started, pods to start) as an apply's new pods come up.
pub type PodProgress<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// kubectl's flags of `apply` and `delete`, and who to tell how far it got.
#[derive(Clone, Copy, Default)]
pub struct ChangeOptions<'a> {
    /// Report what would change, and change nothing.
    pub dry_run: bool,
    /// `delete`: an object that is not there is skipped, not an error.
    pub ignore_not_found: bool,
    /// With it the new pods start in batches of [`PROGRESS_BATCH`], each reported; without
    /// it all at once.
    pub progress: Option<PodProgress<'a>>,
}

impl Lab {
    /// `kubectl apply -f`: creates or updates the objects in `paths` (files, directories of
    /// `*.yaml`/`*.yml`/`*.json`, or `-` for stdin). The whole input is validated first; if
    /// anything is wrong, nothing changes.
    pub fn apply(&mut self, paths: &[PathBuf]) -> Result<ApplyReport, LabError> {
        self.apply_with(paths, ChangeOptions::default())
    }

    /// [`Self::apply`] with kubectl's flags.
    pub fn apply_with(
        &mut self,
        paths: &[PathBuf],
        options: ChangeOptions<'_>,
    ) -> Result<ApplyReport, LabError> {
        let started = Instant::now();
        let manifests = sluice_sources::load_paths(paths)?;
        let _lock = lock(&self.dir, None)?;
        self.reload()?;
        let plan = plan::apply(&self.state, &manifests)?;
        self.carry_out(plan, started, options)
    }

    /// `kubectl delete -f`: every object named must exist (unless
    /// [`ChangeOptions::ignore_not_found`]), else nothing is deleted. Pods terminate
    /// gracefully: they leave the dataplane before their server stops.
    pub fn delete(&mut self, paths: &[PathBuf]) -> Result<ApplyReport, LabError> {
        self.delete_with(paths, ChangeOptions::default())
    }

    /// [`Self::delete`] with kubectl's flags.
    pub fn delete_with(
        &mut self,
        paths: &[PathBuf],
        options: ChangeOptions<'_>,
    ) -> Result<ApplyReport, LabError> {
        let started = Instant::now();
        let manifests = sluice_sources::load_paths(paths)?;
        let _lock = lock(&self.dir, None)?;
        self.reload()?;
        let plan = plan::delete(&self.state, &manifests, options.ignore_not_found)?;
        self.carry_out(plan, started, options)
    }

    /// The plan executed, or with a dry run only reported.
    fn carry_out(
        &mut self,
        plan: Plan,
        started: Instant,
        options: ChangeOptions<'_>,
    ) -> Result<ApplyReport, LabError> {
        if !options.dry_run {
            return self.execute_reporting(plan, started, options.progress);
        }
        let changes = with_owned_pods(&self.state, &plan);
        Ok(ApplyReport {
            changes,
            warnings: plan.warnings,
            dry_run: true,
            generation: self.state.generation,
            realized_in: Duration::ZERO,
            agents: Vec::new(),
        })
    }

    /// Starts the plan's new pods, commits, waits for every agent, then removes the
    /// terminating pods.
    pub(crate) fn execute(
        &mut self,
        plan: Plan,
        started: Instant,
    ) -> Result<ApplyReport, LabError> {
        self.execute_reporting(plan, started, None)
    }

    fn execute_reporting(
        &mut self,
        plan: Plan,
        started: Instant,
        progress: Option<PodProgress<'_>>,
    ) -> Result<ApplyReport, LabError> {
        let changes = with_owned_pods(&self.state, &plan);
        let Plan {
            mut state,
            create,
            remove,
            warnings,
            ..
        } = plan;
        match progress {
            None => self.start_pods(&mut state, &create)?,
            Some(progress) => self.start_pods_reporting(&mut state, &create, progress)?,
        }
        let changed = serde_json::to_value(&state).ok() != serde_json::to_value(&self.state).ok();
        if changed {
            self.commit(state)?;
        }
        // New pods are ready and terminating ones out of service once this is realized.
        let mut realized = self.wait_agents(self.state.generation, CHANGE_TIMEOUT, &[])?;
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
            realized = self.wait_agents(self.state.generation, CHANGE_TIMEOUT, &[])?;
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        Ok(ApplyReport {
            changes,
            warnings,
            dry_run: false,
            generation: self.state.generation,
            realized_in: started.elapsed(),
            agents: realized
                .into_iter()
                .map(|(node, at)| AgentRealized {
                    node,
                    realized_in: at.saturating_duration_since(started),
                })
                .collect(),
        })
    }
}

impl Lab {
    /// [`Lab::start_pods`] in batches, each reported to `progress`; on failure the pods of
    /// the batches before are stopped too, so that nothing of the apply is left running.
    fn start_pods_reporting(
        &self,
        state: &mut LabState,
        keys: &[String],
        progress: PodProgress<'_>,
    ) -> Result<(), LabError> {
        progress(0, keys.len());
        for (n, batch) in keys.chunks(PROGRESS_BATCH).enumerate() {
            if let Err(e) = self.start_pods(state, batch) {
                for k in &keys[..n * PROGRESS_BATCH] {
                    if let Some(record) = state.pods.get(k) {
                        // Best effort: the error that stopped the apply is the one to report.
                        let _ = self.stop_pod(record);
                    }
                }
                return Err(e);
            }
            progress(n * PROGRESS_BATCH + batch.len(), keys.len());
        }
        Ok(())
    }
}

/// The plan's changes, then the pods its controllers create and remove (pods of a bare
/// Pod manifest are already among the changes; pods an earlier failed call left
/// terminating are not news).
fn with_owned_pods(current: &LabState, plan: &Plan) -> Vec<Change> {
    let pod_change = |action, key: &String, state: &LabState| {
        let record = state.pods.get(key)?;
        let owner = record.owner.as_ref()?;
        Some(Change {
            action,
            kind: "Pod",
            namespace: Some(record.namespace().to_string()),
            name: record.name().to_string(),
            fields: Vec::new(),
            owner: Some(format!("Deployment {}", owner.deployment)),
        })
    };
    let created = plan
        .create
        .iter()
        .filter_map(|k| pod_change(Action::Created, k, &plan.state));
    let removed = plan
        .remove
        .iter()
        .filter(|k| current.pods.get(*k).is_some_and(|p| p.deleting.is_none()))
        .filter_map(|k| pod_change(Action::Deleted, k, &plan.state));
    plan.changes
        .iter()
        .cloned()
        .chain(created)
        .chain(removed)
        .collect()
}
