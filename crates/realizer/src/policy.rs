//! Per-endpoint policy maps: the `policy` hash of maps points each enforced endpoint's
//! ifindex at an LPM trie of allow rows.
//!
//! A policy is never edited in place: when an endpoint's rows or its map's capacity differ
//! from the desired ones, a new map is created, filled completely and swapped into the
//! outer map with one update, so the datapath sees either the old policy or the new one,
//! never an empty or partial one. Endpoints whose rows match are not touched.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use aya::maps::{HashOfMaps, IterableMap, MapData, lpm_trie::Key};
use sluice_common::{IDENTITY_ANY, POLICY_PREFIX_FULL, PolicyEntry, PolicyKey, PolicyMatch, names};
use sluice_compiler::EndpointPolicy;
use sluice_datapath::{PolicyMap, create_policy_map, sys};

use crate::{
    DriftEntry, DriftKind, RealizerError,
    maps::{is_not_found, open_map_of_maps},
    write_stamp,
};

fn sys_err(err: aya::sys::SyscallError) -> RealizerError {
    RealizerError::Sys {
        call: err.call,
        map: names::POLICY,
        source: err.io_error,
    }
}

/// One endpoint's policy map as the kernel holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstalledPolicy {
    /// max_entries of the map.
    pub capacity: u32,
    /// Allow rows with their counters.
    pub rows: BTreeMap<PolicyKey, PolicyEntry>,
}

/// The outer `policy` map and the inner maps it points at.
pub trait PolicyTable {
    /// Every endpoint (ifindex) with a policy map installed.
    fn endpoints(&self) -> Result<BTreeSet<u32>, RealizerError>;
    /// The map installed for `ifindex`, read from the kernel, or None.
    fn read(&self, ifindex: u32) -> Result<Option<InstalledPolicy>, RealizerError>;
    /// For each install, creates a map of its capacity holding exactly its rows, then points
    /// its endpoint at it with one update of the outer map.
    fn install(&mut self, installs: &[PolicyInstall]) -> Result<(), RealizerError>;
    /// Removes these endpoints' maps; an endpoint without one is not an error.
    fn remove(&mut self, ifindexes: &[u32]) -> Result<(), RealizerError>;

    /// Every installed map.
    fn read_all(&self) -> Result<BTreeMap<u32, InstalledPolicy>, RealizerError> {
        let mut out = BTreeMap::new();
        for ifindex in self.endpoints()? {
            // An entry removed between listing and reading is simply not there.
            if let Some(policy) = self.read(ifindex)? {
                out.insert(ifindex, policy);
            }
        }
        Ok(out)
    }
}

/// A map to create and swap in for one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyInstall {
    pub ifindex: u32,
    pub capacity: u32,
    /// The new map's full content: counters of rows that stay are carried over.
    pub rows: BTreeMap<PolicyKey, PolicyEntry>,
    /// What the kernel holds now, if anything.
    pub installed: Option<InstalledPolicy>,
}

/// What differs between the desired and the installed policy maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyPlan {
    pub installs: Vec<PolicyInstall>,
    /// Endpoints whose map must go (not enforced, gone, or failing closed), with the map.
    pub removes: Vec<(u32, InstalledPolicy)>,
}

impl PolicyPlan {
    pub fn is_empty(&self) -> bool {
        self.installs.is_empty() && self.removes.is_empty()
    }

    /// Every drifted map and row, per endpoint.
    pub fn drift(&self) -> Vec<DriftEntry> {
        let mut out = Vec::new();
        let entry = |kind, key: String, desired, actual| DriftEntry {
            map: names::POLICY,
            kind,
            key,
            desired,
            actual,
        };
        for install in &self.installs {
            let ifindex = install.ifindex;
            let Some(installed) = &install.installed else {
                out.push(entry(
                    DriftKind::Missing,
                    format!("ifindex {ifindex}"),
                    Some(describe_map(install.rows.len(), install.capacity)),
                    None,
                ));
                continue;
            };
            if installed.capacity != install.capacity {
                out.push(entry(
                    DriftKind::Differs,
                    format!("ifindex {ifindex} capacity"),
                    Some(format!("max_entries={}", install.capacity)),
                    Some(format!("max_entries={}", installed.capacity)),
                ));
            }
            for key in install.rows.keys() {
                if !installed.rows.contains_key(key) {
                    out.push(entry(
                        DriftKind::Missing,
                        format!("ifindex {ifindex} {key} prefix {}", key.prefixlen),
                        Some("allow".into()),
                        None,
                    ));
                }
            }
            for (key, counters) in &installed.rows {
                if !install.rows.contains_key(key) {
                    out.push(entry(
                        DriftKind::Unexpected,
                        format!("ifindex {ifindex} {key} prefix {}", key.prefixlen),
                        None,
                        Some(format!("allow {counters}")),
                    ));
                }
            }
        }
        for (ifindex, installed) in &self.removes {
            out.push(entry(
                DriftKind::Unexpected,
                format!("ifindex {ifindex}"),
                None,
                Some(describe_map(installed.rows.len(), installed.capacity)),
            ));
        }
        out
    }
}

fn describe_map(rows: usize, capacity: u32) -> String {
    format!("map with {rows} rows, max_entries={capacity}")
}

/// Compares the desired rows of each endpoint (maps of `capacity`) with `installed`.
/// Counters are runtime state and never count as a difference.
pub fn diff_policies(
    desired: &BTreeMap<u32, EndpointPolicy>,
    capacity: u32,
    mut installed: BTreeMap<u32, InstalledPolicy>,
) -> PolicyPlan {
    let mut plan = PolicyPlan::default();
    for (&ifindex, policy) in desired {
        let current = installed.remove(&ifindex);
        let same = current
            .as_ref()
            .is_some_and(|c| c.capacity == capacity && c.rows.keys().eq(policy.rows.keys()));
        if same {
            continue;
        }
        let rows = policy
            .rows
            .keys()
            .map(|k| {
                let counters = current
                    .as_ref()
                    .and_then(|c| c.rows.get(k).copied())
                    .unwrap_or_default();
                (*k, counters)
            })
            .collect();
        plan.installs.push(PolicyInstall {
            ifindex,
            capacity,
            rows,
            installed: current,
        });
    }
    plan.removes = installed.into_iter().collect();
    plan
}

/// What [`KernelPolicy::lookup`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyLookup {
    /// The endpoint has no policy map.
    NoMap,
    /// No row admits the connection.
    NoRow,
    /// The admitting row: the peer's own (`identity`) or any peer's (0), with its counters.
    Row { identity: u32, entry: PolicyEntry },
}

/// The kernel's `policy` hash of maps.
pub struct KernelPolicy {
    map: HashOfMaps<MapData, u32, PolicyMap>,
    /// The same map, for the batch updates aya does not offer.
    fd: OwnedFd,
}

fn policy_err(op: &'static str, ifindex: u32) -> impl Fn(aya::maps::MapError) -> RealizerError {
    move |source| RealizerError::Policy {
        op,
        ifindex,
        source,
    }
}

impl KernelPolicy {
    /// Opens the `policy` map pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, RealizerError> {
        let (map, fd) = open_map_of_maps(pin_dir, names::POLICY)?;
        Ok(Self { map, fd })
    }

    /// The row the datapath finds in `ifindex`'s map for a new connection matching `rule`
    /// (one port): the kernel's longest-prefix lookup of the peer's own row, else of the
    /// row for any peer, as `policy_row_lookup` in bpf/lib/policy.h.
    pub fn lookup(&self, ifindex: u32, rule: PolicyMatch) -> Result<PolicyLookup, RealizerError> {
        let inner = match self.map.get(&ifindex, 0) {
            Ok(inner) => inner,
            Err(e) if is_not_found(&e) => return Ok(PolicyLookup::NoMap),
            Err(e) => return Err(policy_err("lookup", ifindex)(e)),
        };
        for identity in [rule.identity, IDENTITY_ANY] {
            let key = Key::new(POLICY_PREFIX_FULL, PolicyMatch { identity, ..rule });
            match inner.get(&key, 0) {
                Ok(entry) => return Ok(PolicyLookup::Row { identity, entry }),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(policy_err("lookup row", ifindex)(e)),
            }
        }
        Ok(PolicyLookup::NoRow)
    }

    /// How many endpoints have a policy map.
    pub fn endpoint_count(&self) -> usize {
        self.map.keys().count()
    }
}

impl PolicyTable for KernelPolicy {
    fn endpoints(&self) -> Result<BTreeSet<u32>, RealizerError> {
        self.map
            .keys()
            .map(|r| {
                r.map_err(|source| RealizerError::Map {
                    op: "iterate",
                    map: names::POLICY,
                    source,
                })
            })
            .collect()
    }

    fn read(&self, ifindex: u32) -> Result<Option<InstalledPolicy>, RealizerError> {
        // Each lookup opens a new fd on the inner map; it is closed when `inner` drops.
        let inner = match self.map.get(&ifindex, 0) {
            Ok(inner) => inner,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(policy_err("lookup", ifindex)(e)),
        };
        let capacity = inner
            .map()
            .info()
            .map_err(policy_err("map info", ifindex))?
            .max_entries();
        let rows = inner
            .iter()
            .map(|r| {
                r.map(|(k, v)| {
                    (
                        PolicyKey {
                            prefixlen: k.prefix_len(),
                            rule: k.data(),
                        },
                        v,
                    )
                })
                .map_err(policy_err("iterate", ifindex))
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(InstalledPolicy { capacity, rows }))
    }

    fn install(&mut self, installs: &[PolicyInstall]) -> Result<(), RealizerError> {
        if installs.is_empty() {
            return Ok(());
        }
        let mut fresh = Vec::with_capacity(installs.len());
        for install in installs {
            let mut map = create_policy_map(install.capacity)
                .map_err(|e| RealizerError::Datapath(Box::new(e)))?;
            for (key, counters) in &install.rows {
                map.insert(&Key::new(key.prefixlen, key.rule), counters, 0)
                    .map_err(policy_err("fill new map", install.ifindex))?;
            }
            fresh.push(map);
        }
        // The swaps, in one batch (sys::swap_inner_maps says why).
        let keys: Vec<u32> = installs.iter().map(|i| i.ifindex).collect();
        let inners: Vec<_> = fresh.iter().map(|m| m.map().fd().as_fd()).collect();
        sys::swap_inner_maps(self.fd.as_fd(), &keys, &inners).map_err(sys_err)
    }

    fn remove(&mut self, ifindexes: &[u32]) -> Result<(), RealizerError> {
        if ifindexes.is_empty() {
            return Ok(());
        }
        sys::map_delete_batch(self.fd.as_fd(), ifindexes).map_err(sys_err)
    }
}

/// One write to a [`MemoryPolicy`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyWrite {
    /// A complete map swapped in for the endpoint.
    Install {
        ifindex: u32,
        policy: InstalledPolicy,
    },
    Remove {
        ifindex: u32,
    },
}

/// An in-memory policy table that records every write, for tests.
#[derive(Debug, Default)]
pub struct MemoryPolicy {
    pub maps: BTreeMap<u32, InstalledPolicy>,
    pub log: Vec<PolicyWrite>,
    /// The [`write_stamp`] of each write in `log`.
    pub stamps: Vec<u64>,
}

impl PolicyTable for MemoryPolicy {
    fn endpoints(&self) -> Result<BTreeSet<u32>, RealizerError> {
        Ok(self.maps.keys().copied().collect())
    }

    fn read(&self, ifindex: u32) -> Result<Option<InstalledPolicy>, RealizerError> {
        Ok(self.maps.get(&ifindex).cloned())
    }

    fn install(&mut self, installs: &[PolicyInstall]) -> Result<(), RealizerError> {
        for install in installs {
            let policy = InstalledPolicy {
                capacity: install.capacity,
                rows: install.rows.clone(),
            };
            self.maps.insert(install.ifindex, policy.clone());
            self.log.push(PolicyWrite::Install {
                ifindex: install.ifindex,
                policy,
            });
            self.stamps.push(write_stamp());
        }
        Ok(())
    }

    fn remove(&mut self, ifindexes: &[u32]) -> Result<(), RealizerError> {
        for &ifindex in ifindexes {
            self.maps.remove(&ifindex);
            self.log.push(PolicyWrite::Remove { ifindex });
            self.stamps.push(write_stamp());
        }
        Ok(())
    }
}
