//! `sluice verify`: the desired state compared with everything in the kernel, on demand.

use std::collections::BTreeSet;

use sluice_api::{Drift, VerifyReport};
use sluice_common::kinds::DriftKind;
use sluice_datapath::AttachRole;
use sluice_realizer::Desired;

use super::Node;
use crate::{AgentError, nodes, routing, views::fails_closed};

impl Node {
    /// Recompiles from the current snapshot and compares with the kernel; optionally repairs.
    pub fn verify(&mut self, repair: bool) -> Result<VerifyReport, AgentError> {
        let (desired, _) = self.compile(true);
        let plan = self
            .tables
            .plan(Desired::of(&desired, self.policy_map_max))?;
        let mut drift: Vec<Drift> = plan
            .drift()
            .into_iter()
            .map(|d| Drift {
                map: d.map.to_string(),
                kind: d.kind,
                key: d.key,
                desired: d.desired,
                actual: d.actual,
            })
            .collect();
        let detached: BTreeSet<_> = desired
            .interfaces
            .iter()
            .filter(|i| !self.datapath.runs(AttachRole::PodVeth, i))
            .cloned()
            .collect();
        drift.extend(detached.iter().map(|i| Drift {
            map: "tcx".into(),
            kind: DriftKind::Missing,
            key: i.clone(),
            desired: Some(routing::programs(AttachRole::PodVeth)),
            actual: None,
        }));
        drift.extend(self.cgroups.drift(&mut self.datapath)?);
        let (others, own) = nodes::routed(&desired.nodes);
        drift.extend(self.routing.drift(&self.datapath, &others, own)?);
        drift.extend(self.pins.missing()?.into_iter().map(|pin| Drift {
            map: "pins".into(),
            kind: DriftKind::Missing,
            key: pin,
            desired: Some("pinned".into()),
            actual: None,
        }));
        let repaired = repair && !drift.is_empty();
        if repaired {
            let restored = self.pins.check()?;
            self.pins_restored.extend(restored);
            // The maps now hold this compile's state, which may be newer than `desired`.
            self.maps_hold_desired = false;
            self.tables.apply(&plan)?;
            self.scan
                .written(Desired::of(&desired, self.policy_map_max));
            for ifname in &detached {
                self.ensure_attached(ifname)?;
            }
            self.cgroups.reconcile(&mut self.datapath)?;
            self.routing.reconcile(&mut self.datapath, &others, own)?;
        }
        Ok(VerifyReport {
            generation: self.generation,
            drift,
            repaired,
            fails_closed: fails_closed(&desired, self.policy_map_max),
        })
    }
}
