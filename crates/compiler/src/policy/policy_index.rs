//! What the full compile resolved of every NetworkPolicy, kept so that a change of some
//! compiles in place: their peers again, and the rows of the local endpoints they select
//! (before or after), nothing else.
//!
//! In place only while the change keeps the policies' CIDRs and the high-cardinality or
//! namespace-like pod label keys their selectors name (those feed every pod's identity and
//! the ipcache; other keys only regroup the peer groups), and names no ipBlock whose
//! verdicts the [`PodIndex`] does not keep; otherwise [`NotInPlace`]. Peers are
//! matched against the peer groups and identity prefixes of the last full compile: a Pod
//! changed in place since keeps every identity's groups, named ports and ipBlock verdicts
//! (see `pod_index`), so they still answer as a full compile would.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
use sluice_common::IDENTITY_HOST;
use sluice_store::{LocalEndpoint, selector::Labels};

use super::{
    Policy, PolicyInput,
    cidr::{self, block, ipv4_blocks},
    identities,
    peers::{Group, IdentityPrefixes, PeerGroups, Peers, World},
    pod_index::{Attached, Context, LocalIdentity, Moved, NotInPlace, PodIndex, Renamed},
    policies_in_order,
    remote_nodes::PrefixMove,
    rows::CompiledEndpoint,
    rules, selected_pod_keys, selects,
    workloads::Workload,
};
use crate::{
    Delta, DesiredState, Identity, ObjectKind, ObjectRef,
    changes::{ObjectKey, touched},
    ipcache::Ipcache,
    namespace_of,
    problem::Problems,
};

mod local;
mod nodes;
mod relabel;

/// What [`PolicyIndex::new`] takes from the full compile besides the policies.
pub(super) struct Parts<'a> {
    pub snapshot: &'a sluice_store::Snapshot,
    pub input: &'a PolicyInput<'a>,
    pub workloads: &'a [Workload<'a>],
    pub groups: PeerGroups,
    pub prefixes: IdentityPrefixes,
    /// The problems of everything but the policies and the endpoints' rows.
    pub problems: Problems,
    pub policy_problems: Problems,
    pub host_in_ipcache: bool,
}

/// A local endpoint with what its rows read of its pod.
struct LocalPod {
    endpoint: LocalEndpoint,
    /// None when its Pod is defined twice: it fails closed whatever the policies say.
    pod: Option<PodLabels>,
}

struct PodLabels {
    labels: Labels,
    ports: Vec<(String, u8, u16)>,
    identity: u32,
}

impl LocalPod {
    fn workload(&self) -> Option<Workload<'_>> {
        let pod = self.pod.as_ref()?;
        Some(Workload {
            namespace: &self.endpoint.namespace,
            name: &self.endpoint.pod,
            labels: std::borrow::Cow::Borrowed(&pod.labels),
            namespace_labels: None,
            address: None,
            claimed: None,
            node: None,
            ports: pod.ports.clone(),
            identity: pod.identity,
        })
    }
}

/// Every NetworkPolicy with its resolved peers, and the local endpoints they police.
pub(crate) struct PolicyIndex {
    /// By namespace and name; None when the snapshot names one twice.
    objects: Option<BTreeMap<ObjectKey, NetworkPolicy>>,
    /// The peers of each policy's rules, in rule order.
    peers: BTreeMap<ObjectKey, Vec<Peers>>,
    selected_keys: BTreeSet<String>,
    cidrs: BTreeSet<Ipv4Net>,
    matching: Matching,
    /// By ifindex.
    local: BTreeMap<u32, LocalPod>,
    capacity: u32,
    base_problems: Problems,
    policy_problems: Problems,
    endpoint_problems: BTreeMap<u32, Problems>,
    host_in_ipcache: bool,
}

/// What peers are matched against, besides the ipcache.
struct Matching {
    groups: PeerGroups,
    prefixes: IdentityPrefixes,
    namespaces: BTreeMap<String, Labels>,
}

impl Matching {
    /// The world peers are matched in: no pods, only their groups.
    fn world<'a>(&'a self, ipcache: &'a Ipcache) -> World<'a> {
        World {
            ipcache,
            prefixes: &self.prefixes,
            workloads: &[],
            peers: &self.groups,
            namespaces: &self.namespaces,
        }
    }
}

/// A rule whose peers are identities: its policy's key, its peers as written and the
/// identities they select.
struct IdentityRule<'a> {
    key: &'a ObjectKey,
    list: &'a [NetworkPolicyPeer],
    ids: &'a mut BTreeSet<u32>,
}

impl IdentityRule<'_> {
    fn object(&self) -> ObjectRef {
        ObjectRef::new(ObjectKind::NetworkPolicy, &self.key.0, &self.key.1)
    }
}

/// Every rule of the policies `objects` whose peers (`peers`, by policy) are identities.
fn identity_rules<'a>(
    objects: &'a BTreeMap<ObjectKey, NetworkPolicy>,
    peers: &'a mut BTreeMap<ObjectKey, Vec<Peers>>,
) -> impl Iterator<Item = IdentityRule<'a>> {
    peers
        .iter_mut()
        .filter_map(|(key, peers)| Some((key, objects.get(key)?, peers)))
        .flat_map(|(key, policy, peers)| {
            rules(policy)
                .zip(peers.iter_mut())
                .filter_map(move |((_, list, _), p)| match p {
                    Peers::Identities(ids) => Some(IdentityRule {
                        key,
                        list: list.map(Vec::as_slice).unwrap_or_default(),
                        ids,
                    }),
                    Peers::Any => None,
                })
        })
}

fn key_of(policy: &NetworkPolicy) -> ObjectKey {
    (
        namespace_of(policy.metadata.namespace.as_ref()).to_string(),
        policy.metadata.name.clone().unwrap_or_default(),
    )
}

impl PolicyIndex {
    pub(super) fn new(context: &Context<'_>, parts: Parts<'_>, policies: Vec<Policy<'_>>) -> Self {
        let mut objects = Some(BTreeMap::new());
        for policy in &parts.snapshot.network_policies {
            let twice = objects
                .as_mut()
                .is_some_and(|o| o.insert(key_of(policy), policy.clone()).is_some());
            if twice {
                objects = None;
            }
        }
        let peers = policies
            .into_iter()
            .map(|p| (key_of(p.policy), p.peers))
            .collect();
        let local = parts
            .input
            .endpoints
            .iter()
            .map(|(&ifindex, endpoint)| {
                let key = (endpoint.namespace.as_str(), endpoint.pod.as_str());
                let pod = parts
                    .workloads
                    .binary_search_by(|w| (w.namespace, w.name).cmp(&key))
                    .ok()
                    .map(|at| {
                        let w = &parts.workloads[at];
                        PodLabels {
                            labels: Labels::clone(&w.labels),
                            ports: w.ports.clone(),
                            identity: w.identity,
                        }
                    });
                let endpoint = (*endpoint).clone();
                (ifindex, LocalPod { endpoint, pod })
            })
            .collect();
        Self {
            objects,
            peers,
            selected_keys: context.selected_keys.clone(),
            cidrs: context.cidrs.clone(),
            matching: Matching {
                groups: parts.groups,
                prefixes: parts.prefixes,
                namespaces: context.namespaces.clone(),
            },
            local,
            capacity: parts.input.node.policy_map_max,
            base_problems: parts.problems,
            policy_problems: parts.policy_problems,
            endpoint_problems: BTreeMap::new(),
            host_in_ipcache: parts.host_in_ipcache,
        }
    }

    /// Records what the rows of the endpoint `ifindex` could not represent.
    pub(crate) fn endpoint_problems(&mut self, ifindex: u32, problems: Problems) {
        self.endpoint_problems.insert(ifindex, problems);
    }

    /// Every problem of the policy part.
    pub(crate) fn problems(&self) -> Problems {
        let mut all = self.base_problems.clone();
        all.extend(&self.policy_problems);
        for problems in self.endpoint_problems.values() {
            all.extend(problems);
        }
        all
    }

    /// Applies the NetworkPolicies `changes` written (`Some`) or deleted: their peers and
    /// the rows of the endpoints they select, before or after, changed in `state` and
    /// recorded in `delta`; [`NotInPlace`] when the change moves identities or the
    /// ipcache (the index is then dropped: the part is compiled whole). A change of the
    /// label keys selectors name that moves no label set regroups the peers in place.
    pub(crate) fn put(
        &mut self,
        changes: &BTreeMap<ObjectKey, Option<NetworkPolicy>>,
        pods: &mut PodIndex,
        state: &mut DesiredState,
        delta: &mut Delta,
    ) -> Result<(), NotInPlace> {
        let objects = self.objects.as_ref().ok_or(NotInPlace)?;
        if changes
            .iter()
            .any(|(key, p)| p.as_ref().is_some_and(|p| key_of(p) != *key))
        {
            return Err(NotInPlace);
        }
        let kept = objects
            .iter()
            .filter(|(key, _)| !changes.contains_key(*key))
            .map(|(_, p)| p);
        let mut policy_problems = Problems::default();
        let mut policies =
            policies_in_order(kept.chain(changes.values().flatten()), &mut policy_problems);
        let cidrs = cidr::policy_cidrs(&policies, &mut policy_problems);
        if cidrs != self.cidrs {
            return Err(NotInPlace);
        }
        let keys = selected_pod_keys(&policies);
        if keys != self.selected_keys {
            // Keys that move no label set: the peer groups read labels under other keys.
            let (removed, added) = pods.rekey(&keys)?;
            let value = |identity, key: &str| pods.label_value(identity, key);
            self.matching.groups.rekey(&removed, &added, value)?;
            self.selected_keys = keys;
        }
        let world = self.matching.world(&state.ipcache);
        for p in &mut policies {
            let key = key_of(p.policy);
            if !changes.contains_key(&key) {
                p.peers = self.peers.get(&key).cloned().unwrap_or_default();
                continue;
            }
            let mut ignored = Problems::default();
            if ipv4_blocks(p, &mut ignored).any(|(cidr, except)| !pods.knows_block(cidr, &except)) {
                return Err(NotInPlace);
            }
            p.peers = rules(p.policy)
                .map(|(_, peers, _)| {
                    world.peers(&p.object, p.namespace, peers, &mut policy_problems)
                })
                .collect();
        }
        // The endpoints a changed policy selects, before or after: their rows again.
        let before = policies_in_order(
            changes.keys().filter_map(|key| objects.get(key)),
            &mut Problems::default(),
        );
        let after = policies_in_order(changes.values().flatten(), &mut Problems::default());
        let compiled = self.endpoints_of(&world, &before, &after, &policies, &BTreeSet::new());
        let new_peers: Vec<(ObjectKey, Vec<Peers>)> = policies
            .iter_mut()
            .map(|p| (key_of(p.policy), std::mem::take(&mut p.peers)))
            .filter(|(key, _)| changes.contains_key(key))
            .collect();
        drop((before, after, policies));

        for (key, policy) in changes {
            self.peers.remove(key);
            if let Some(objects) = &mut self.objects {
                match policy {
                    Some(policy) => objects.insert(key.clone(), policy.clone()),
                    None => objects.remove(key),
                };
            }
        }
        self.peers.extend(new_peers);
        self.policy_problems = policy_problems;
        self.write(compiled, state, delta);
        Ok(())
    }

    /// Whether [`Self::follow`] can follow identities that appear or vanish.
    pub(crate) fn can_follow(&self) -> bool {
        self.objects.is_some()
    }

    /// Follows the identities a Pod change made appear or vanish: the peer groups, the
    /// peers of every rule, the rows of the endpoints whose policies' peers changed, and
    /// the identities table.
    pub(crate) fn follow(
        &mut self,
        moved: Vec<Moved>,
        state: &mut DesiredState,
        delta: &mut Delta,
    ) {
        let Some(objects) = &self.objects else {
            return;
        };
        let mut changed = BTreeSet::new();
        for m in moved {
            match m {
                Moved::Vanished { identity } => {
                    self.matching.groups.remove(identity);
                    self.matching.prefixes.remove(identity);
                    for rule in identity_rules(objects, &mut self.peers) {
                        if rule.ids.remove(&identity) {
                            changed.insert(rule.key.clone());
                        }
                    }
                    state.identities.remove(&identity);
                }
                Moved::Appeared {
                    identity,
                    set,
                    namespace,
                    labels,
                    address,
                    ports,
                } => {
                    let group = Group::new(identity, &namespace, &labels, &self.selected_keys);
                    let world = self.matching.world(&state.ipcache);
                    for rule in identity_rules(objects, &mut self.peers) {
                        let object = rule.object();
                        let selects = rule.list.iter().any(|peer| {
                            world.selects_new(&object, &rule.key.0, peer, &group, address)
                        });
                        if selects {
                            rule.ids.insert(identity);
                            changed.insert(rule.key.clone());
                        }
                    }
                    self.matching.groups.add(group, ports);
                    self.matching.prefixes.add(identity, address);
                    state.identities.insert(
                        identity,
                        Identity {
                            id: identity,
                            labels: set,
                        },
                    );
                }
            }
        }
        self.rows_again(&changed, &BTreeSet::new(), state, delta);
    }

    /// Compiles again the rows of the endpoints that a policy of `changed` selects, and
    /// of those of `also` (by ifindex).
    fn rows_again(
        &mut self,
        changed: &BTreeSet<ObjectKey>,
        also: &BTreeSet<u32>,
        state: &mut DesiredState,
        delta: &mut Delta,
    ) {
        let Some(objects) = &self.objects else {
            return;
        };
        if changed.is_empty() && also.is_empty() {
            return;
        }
        let mut ignored = Problems::default();
        let mut policies = policies_in_order(objects.values(), &mut ignored);
        for p in &mut policies {
            p.peers = self
                .peers
                .get(&key_of(p.policy))
                .cloned()
                .unwrap_or_default();
        }
        let changed: Vec<Policy<'_>> = policies_in_order(
            changed.iter().filter_map(|key| objects.get(key)),
            &mut ignored,
        );
        let world = self.matching.world(&state.ipcache);
        let compiled = self.endpoints_of(&world, &changed, &[], &policies, also);
        drop((changed, policies));
        self.write(compiled, state, delta);
    }

    /// The local endpoints a policy of `before` or `after` selects, and those of `also`,
    /// compiled against `policies`.
    fn endpoints_of(
        &self,
        world: &World<'_>,
        before: &[Policy<'_>],
        after: &[Policy<'_>],
        policies: &[Policy<'_>],
        also: &BTreeSet<u32>,
    ) -> Vec<(u32, CompiledEndpoint)> {
        let mut compiled = Vec::new();
        for (&ifindex, local) in &self.local {
            let Some(w) = local.workload() else { continue };
            if also.contains(&ifindex) || before.iter().chain(after).any(|p| selects(p, &w)) {
                let endpoint = world.endpoint(&local.endpoint, &w, policies, self.capacity);
                compiled.push((ifindex, endpoint));
            }
        }
        compiled
    }

    /// Writes endpoints compiled again into `state`, recording what changed.
    fn write(
        &mut self,
        compiled: Vec<(u32, CompiledEndpoint)>,
        state: &mut DesiredState,
        delta: &mut Delta,
    ) {
        for (ifindex, endpoint) in compiled {
            if state.endpoints.get(&ifindex) != Some(&endpoint.info) {
                let before = state.endpoints.insert(ifindex, endpoint.info);
                touched(&mut delta.endpoints, ifindex, before);
            }
            state.endpoint_details.insert(ifindex, endpoint.details);
            if state.policies.get(&ifindex) != endpoint.policy.as_ref() {
                let before = match endpoint.policy {
                    Some(policy) => state.policies.insert(ifindex, policy),
                    None => state.policies.remove(&ifindex),
                };
                touched(&mut delta.policies, ifindex, before);
            }
            self.endpoint_problems.insert(ifindex, endpoint.problems);
        }
        // Every row's peer is in the ipcache but the host's, which every policy map holds.
        let in_use = self.host_in_ipcache || !state.policies.is_empty();
        identities::keep_reserved(&mut state.identities, IDENTITY_HOST, in_use);
    }
}
