//! A pass that knows what the maps hold: after a pass that succeeded, the maps hold what it
//! realized, so the next change's plan is the difference between the two desired states,
//! found in memory without reading the kernel ([`Tables::plan_delta`]). Writes, order and
//! counters are those of a full pass over maps that hold the realized state. Whatever
//! changed behind the agent's back since is not seen here: the rolling check
//! (`Scan`), which restarts after every change, finds it and sends it to a full pass.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet},
};

use sluice_compiler::{Delta, EndpointPolicy};

use crate::{
    Backing, Desired, MapDiff, Plan, PolicyTable, RealizerError, Tables, diff_policies,
    maglev::{diff_tables, pack},
};

/// The difference from `realized` to `desired`, walking both in key order once.
pub fn diff_sorted<K: Ord + Clone, V: PartialEq + Clone>(
    desired: &BTreeMap<K, V>,
    realized: &BTreeMap<K, V>,
) -> MapDiff<K, V> {
    let mut diff = MapDiff {
        upserts: Vec::new(),
        removes: Vec::new(),
    };
    let (mut want, mut have) = (desired.iter().peekable(), realized.iter().peekable());
    loop {
        let order = match (want.peek(), have.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((w, _)), Some((h, _))) => w.cmp(h),
        };
        match order {
            Ordering::Less => {
                if let Some((k, v)) = want.next() {
                    diff.upserts.push((k.clone(), v.clone(), None));
                }
            }
            Ordering::Greater => {
                if let Some((k, v)) = have.next() {
                    diff.removes.push((k.clone(), v.clone()));
                }
            }
            Ordering::Equal => {
                if let (Some((k, v)), Some((_, old))) = (want.next(), have.next())
                    && v != old
                {
                    diff.upserts.push((k.clone(), v.clone(), Some(old.clone())));
                }
            }
        }
    }
    diff
}

/// The difference, over the keys `before` lists with their old values, from those values
/// to `desired`: [`diff_sorted`] of only the entries that may have changed.
pub fn diff_touched<K: Ord + Clone, V: PartialEq + Clone>(
    desired: &BTreeMap<K, V>,
    before: &BTreeMap<K, Option<V>>,
) -> MapDiff<K, V> {
    let mut diff = MapDiff {
        upserts: Vec::new(),
        removes: Vec::new(),
    };
    for (k, old) in before {
        match (desired.get(k), old) {
            (Some(v), old) if Some(v) != old.as_ref() => {
                diff.upserts.push((k.clone(), v.clone(), old.clone()))
            }
            (None, Some(old)) => diff.removes.push((k.clone(), old.clone())),
            _ => {}
        }
    }
    diff
}

/// Whether two endpoint policies program the same rows (their origins are not in the map).
fn same_rows(a: Option<&EndpointPolicy>, b: Option<&EndpointPolicy>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.rows.keys().eq(b.rows.keys()),
        (None, None) => true,
        _ => false,
    }
}

impl<B: Backing> Tables<B> {
    /// The plan that takes maps holding exactly `realized` to `desired`. Only the policy
    /// maps of endpoints whose rows change are read, for their counters to carry over.
    /// The agent plans from the compiler's delta instead ([`Self::plan_changes`]); this
    /// whole-state diff is the reference the tests hold that plan to.
    pub fn plan_delta(
        &self,
        realized: Desired<'_>,
        desired: Desired<'_>,
    ) -> Result<Plan, RealizerError> {
        let endpoints: BTreeSet<u32> = desired
            .policies
            .keys()
            .chain(realized.policies.keys())
            .copied()
            .collect();
        let capacity_changed = realized.policy_capacity != desired.policy_capacity;
        let mut changed = BTreeMap::new();
        let mut installed = BTreeMap::new();
        for ifindex in endpoints {
            let (want, have) = (
                desired.policies.get(&ifindex),
                realized.policies.get(&ifindex),
            );
            if !capacity_changed && same_rows(want, have) {
                continue;
            }
            if let Some(policy) = want {
                changed.insert(ifindex, policy.clone());
            }
            if have.is_some()
                && let Some(current) = self.policy.read(ifindex)?
            {
                installed.insert(ifindex, current);
            }
        }
        let maglev_changed: BTreeMap<_, _> = desired
            .maglev
            .iter()
            .filter(|(k, t)| realized.maglev.get(*k) != Some(*t))
            .map(|(k, t)| (*k, t.clone()))
            .collect();
        let maglev_held = realized
            .maglev
            .iter()
            .filter(|(k, t)| desired.maglev.get(*k) != Some(*t))
            .map(|(k, t)| (*k, pack(t)))
            .collect();
        Ok(Plan {
            services: diff_sorted(desired.services, realized.services),
            backends: diff_sorted(desired.backends, realized.backends),
            endpoints: diff_sorted(desired.endpoints, realized.endpoints),
            ipcache: diff_sorted(desired.ipcache, realized.ipcache),
            source_ranges: diff_sorted(desired.source_ranges, realized.source_ranges),
            policy: diff_policies(&changed, desired.policy_capacity, installed),
            maglev: diff_tables(&maglev_changed, maglev_held),
        })
    }

    /// The plan that takes maps holding the state before `delta` (the compiler's record
    /// of the entries it changed, with their values before) to `desired`, in time
    /// proportional to the change: the same plan as [`Self::plan_delta`] from that state,
    /// for policy maps of one capacity.
    pub fn plan_changes(&self, delta: &Delta, desired: Desired<'_>) -> Result<Plan, RealizerError> {
        let mut changed = BTreeMap::new();
        let mut installed = BTreeMap::new();
        for (&ifindex, have) in &delta.policies {
            let want = desired.policies.get(&ifindex);
            if same_rows(want, have.as_ref()) {
                continue;
            }
            if let Some(policy) = want {
                changed.insert(ifindex, policy.clone());
            }
            if have.is_some()
                && let Some(current) = self.policy.read(ifindex)?
            {
                installed.insert(ifindex, current);
            }
        }
        let mut maglev_changed = BTreeMap::new();
        let mut maglev_held = BTreeMap::new();
        for (key, old) in &delta.maglev {
            let new = desired.maglev.get(key);
            if new == old.as_ref() {
                continue;
            }
            if let Some(table) = new {
                maglev_changed.insert(*key, table.clone());
            }
            if let Some(table) = old {
                maglev_held.insert(*key, pack(table));
            }
        }
        Ok(Plan {
            services: diff_touched(desired.services, &delta.services),
            backends: diff_touched(desired.backends, &delta.backends),
            endpoints: diff_touched(desired.endpoints, &delta.endpoints),
            ipcache: diff_touched(desired.ipcache, &delta.ipcache),
            source_ranges: diff_touched(desired.source_ranges, &delta.source_ranges),
            policy: diff_policies(&changed, desired.policy_capacity, installed),
            maglev: diff_tables(&maglev_changed, maglev_held),
        })
    }
}
