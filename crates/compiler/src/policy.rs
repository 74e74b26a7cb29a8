//! NetworkPolicy: identities, the ipcache and every local endpoint's allow rows.
//!
//! Selectors are evaluated on pods and the result is expressed as the identities of the
//! selected pods. That is exact because pods sharing an identity share every label a
//! selector can look at: pod labels (high-cardinality keys stay in when a policy names
//! them), namespace name and labels, and the policy CIDRs that contain their address. A
//! peer is matched once per group of pods that look alike to every selector
//! ([`peers::PeerGroups`]), not once per pod: the cost grows with identities, not pods.
//!
//! The steps, each in its module: the pods as policy sees them ([`workloads`]), their
//! identities and those of the policy CIDRs ([`identities`], [`cidr`]), the ipcache
//! (`crate::ipcache`), the peers of every rule ([`peers`]), and each endpoint's rows
//! ([`rows`], with port ranges and named ports in [`ports`]).

use std::collections::{BTreeMap, BTreeSet, btree_map::Entry};

use k8s_openapi::api::{
    core::v1::Namespace,
    networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
};
use sluice_common::{IDENTITY_HOST, IpcacheEntry, POLICY_EGRESS, POLICY_INGRESS};
use sluice_store::{
    LocalEndpoint, Snapshot,
    selector::{self, Labels},
};

use crate::{
    Delta, DesiredState, NodeContext, ObjectKind, ObjectRef, Problem, ipcache, namespace_of,
    problem::Problems,
};

mod cidr;
pub(crate) mod explain;
mod identities;
mod local_endpoints;
mod peers;
#[cfg(test)]
mod peers_tests;
mod pod_index;
mod policy_index;
mod ports;
mod remote_nodes;
mod rows;
mod workloads;

use self::{
    peers::{IdentityPrefixes, PeerGroups, Peers, World},
    workloads::Workload,
};
pub(crate) use self::{
    pod_index::{NotInPlace, PodIndex},
    policy_index::PolicyIndex,
};

/// The label the API server puts on every namespace.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A NetworkPolicy with its name and the directions it isolates.
struct Policy<'a> {
    /// `namespace/name`: the origin its rows carry.
    owner: String,
    object: ObjectRef,
    namespace: &'a str,
    policy: &'a NetworkPolicy,
    ingress: bool,
    egress: bool,
    /// The peers of each rule, in `rules` order; they do not depend on the endpoint, so
    /// they are resolved once.
    peers: Vec<Peers>,
}

pub(crate) struct PolicyInput<'a> {
    pub snapshot: &'a Snapshot,
    pub node: &'a NodeContext,
    /// The local endpoints that were given an interface, by ifindex.
    pub endpoints: &'a BTreeMap<u32, &'a LocalEndpoint>,
}

/// What the full compile of the policy part resolved, kept so that a change of one Pod
/// or NetworkPolicy can be compiled in place.
pub(crate) struct WorkloadIndex {
    pub pods: PodIndex,
    pub policies: PolicyIndex,
    /// The ipcache entries of the nodes' addresses, for `remote_nodes`.
    pub node_addresses: crate::nodes::NodeAddresses,
    /// This node's local endpoints, admitted or not, for `local_endpoints`.
    pub local_endpoints: Vec<LocalEndpoint>,
}

impl WorkloadIndex {
    /// Applies the Namespace `name` written (`Some`) or deleted: its labels, and when pods
    /// live in it their identities renamed through the ipcache, the policies' peers and
    /// the rows that name them (see `pod_index::relabel`), changed in `state` and
    /// recorded in `delta`; returns how many identities were renamed. [`NotInPlace`]
    /// when that cannot be done in place; the part must then be compiled whole.
    pub(crate) fn put_namespace(
        &mut self,
        name: &str,
        namespace: Option<&Namespace>,
        state: &mut DesiredState,
        delta: &mut Delta,
    ) -> Result<usize, NotInPlace> {
        let labels = namespace.and_then(labels_of_namespace);
        if labels.as_ref().is_some_and(|(n, _)| n != name) {
            return Err(NotInPlace);
        }
        let labels = labels.map(|(_, labels)| labels);
        let local = self.policies.local_identities();
        let renamed = self.pods.put_namespace(
            name,
            labels.as_ref(),
            local,
            &mut state.ipcache,
            &mut delta.ipcache,
        )?;
        self.policies
            .put_namespace(name, labels, &renamed, state, delta)?;
        Ok(renamed.len())
    }
}

/// Compiles the policy part into `state`; with `index`, also returns what it resolved, for
/// [`PodIndex::put`] and [`PolicyIndex::put`].
pub(crate) fn compile(
    input: &PolicyInput<'_>,
    state: &mut DesiredState,
    problems: &mut Problems,
    index: bool,
) -> Option<WorkloadIndex> {
    let resolved = resolve_indexed(input, state, problems, index, |world, policies, _| {
        world.endpoints(input, policies)
    });
    let (compiled, labels_of, mut index) = resolved;
    let mut used: BTreeSet<u32> = state.ipcache.values().map(|e| e.identity).collect();
    for (ifindex, endpoint) in compiled {
        used.insert(endpoint.details.identity);
        state.endpoints.insert(ifindex, endpoint.info);
        state.endpoint_details.insert(ifindex, endpoint.details);
        if let Some(policy) = endpoint.policy {
            used.extend(policy.rows.keys().map(|k| k.rule.identity));
            state.policies.insert(ifindex, policy);
        }
        problems.extend(&endpoint.problems);
        if let Some(index) = &mut index {
            index.policies.endpoint_problems(ifindex, endpoint.problems);
        }
    }
    state.identities = identities::named(used, labels_of);
    index
}

/// Explains one flow against the policies of `input`, as [`compile`] would program them.
pub(crate) fn explain(
    input: &PolicyInput<'_>,
    state: &mut DesiredState,
    flow: &explain::FlowQuery,
) -> Result<explain::Explanation, explain::Unexplained> {
    let mut problems = Problems::default();
    let (explanation, _) = resolve(input, state, &mut problems, |world, policies, _| {
        let compiled = world.endpoints(input, policies);
        explain::explain(world, policies, &compiled, input.node, flow)
    });
    explanation
}

/// Fills the state's ipcache, resolves the peers of every policy's rules, and hands the
/// policies with what they are evaluated against to `f`; returns its answer with the
/// labels of every identity given out.
fn resolve<R>(
    input: &PolicyInput<'_>,
    state: &mut DesiredState,
    problems: &mut Problems,
    f: impl FnOnce(&World<'_>, &[Policy<'_>], &mut Problems) -> R,
) -> (R, BTreeMap<u32, Vec<String>>) {
    let (answer, labels_of, _) = resolve_indexed(input, state, problems, false, f);
    (answer, labels_of)
}

/// [`resolve`], and with `index` the [`WorkloadIndex`] of what it resolved. Problems of
/// the policies themselves are gathered apart, so the index can keep them apart.
fn resolve_indexed<R>(
    input: &PolicyInput<'_>,
    state: &mut DesiredState,
    problems: &mut Problems,
    index: bool,
    f: impl FnOnce(&World<'_>, &[Policy<'_>], &mut Problems) -> R,
) -> (R, BTreeMap<u32, Vec<String>>, Option<WorkloadIndex>) {
    let snapshot = input.snapshot;
    let mut policy_problems = Problems::default();
    let mut policies = policies_in_order(&snapshot.network_policies, &mut policy_problems);
    let cidrs = cidr::policy_cidrs(&policies, &mut policy_problems);
    let namespaces = namespace_labels(snapshot, problems);
    let this = input.node.node.as_str();
    let node_addresses = state.nodes.addresses(snapshot, this);
    let mut workloads = workloads::workloads(input, &namespaces, &node_addresses.entries, problems);

    let mut labels_of = identities::reserved();
    let selected_keys = selected_pod_keys(&policies);
    let sets = identities::pods(
        &mut workloads,
        &cidrs,
        &selected_keys,
        &mut labels_of,
        problems,
    );
    let cidr_identities = identities::cidrs(&cidrs, &mut labels_of, problems);
    let pod_addresses = workloads.iter().filter_map(|w| {
        let address = w.address?;
        let entry = IpcacheEntry {
            identity: w.identity,
            tunnel_endpoint: state.nodes.pod_tunnel(this, w.node, address),
        };
        Some((address, entry))
    });
    state.ipcache = ipcache::build(
        &cidr_identities,
        pod_addresses,
        &node_addresses.entries,
        &state.nodes,
    );

    let peer_groups = PeerGroups::new(&workloads, &selected_keys);
    let prefixes = IdentityPrefixes::new(&state.ipcache, &node_addresses.router_only);
    let world = World {
        ipcache: &state.ipcache,
        prefixes: &prefixes,
        workloads: &workloads,
        peers: &peer_groups,
        namespaces: &namespaces,
    };
    for p in &mut policies {
        p.peers = rules(p.policy)
            .map(|(_, peers, _)| world.peers(&p.object, p.namespace, peers, &mut policy_problems))
            .collect();
    }
    let answer = f(&world, &policies, problems);
    let index = index.then(|| {
        let context = pod_index::Context {
            this,
            namespaces: &namespaces,
            cidrs: &cidrs,
            selected_keys: &selected_keys,
            node_addresses: &node_addresses.entries,
            nodes: &state.nodes,
        };
        let pods = PodIndex::new(&context, input, &workloads, sets, &policies);
        let parts = policy_index::Parts {
            snapshot,
            input,
            workloads: &workloads,
            groups: peer_groups,
            prefixes,
            problems: problems.clone(),
            policy_problems: policy_problems.clone(),
            host_in_ipcache: state.ipcache.values().any(|e| e.identity == IDENTITY_HOST),
        };
        let policies = PolicyIndex::new(&context, parts, policies);
        WorkloadIndex {
            pods,
            policies,
            node_addresses: node_addresses.clone(),
            local_endpoints: snapshot
                .endpoints
                .iter()
                .chain(input.node.endpoints.iter())
                .filter(|e| e.node == this)
                .cloned()
                .collect(),
        }
    });
    problems.extend(&policy_problems);
    (answer, labels_of, index)
}

/// NetworkPolicies sorted by (namespace, name); a name defined twice is skipped, since
/// keeping either copy would make the output depend on list order.
fn policies_in_order<'a>(
    objects: impl IntoIterator<Item = &'a NetworkPolicy>,
    problems: &mut Problems,
) -> Vec<Policy<'a>> {
    let mut by_name: BTreeMap<(&str, &str), Vec<&NetworkPolicy>> = BTreeMap::new();
    for policy in objects {
        let namespace = namespace_of(policy.metadata.namespace.as_ref());
        let name = policy.metadata.name.as_deref().unwrap_or("");
        by_name.entry((namespace, name)).or_default().push(policy);
    }
    let mut out = Vec::new();
    for ((namespace, name), copies) in by_name {
        let object = ObjectRef::new(ObjectKind::NetworkPolicy, namespace, name);
        let [policy] = copies.as_slice() else {
            problems.insert(Problem::Duplicate {
                object,
                copies: copies.len(),
            });
            continue;
        };
        let Some(spec) = &policy.spec else {
            problems.insert(Problem::NoSpec { object });
            continue;
        };
        // The API server's defaulting: Ingress always, Egress when there are egress rules.
        let (ingress, egress) = match spec.policy_types.as_deref() {
            Some(types) if !types.is_empty() => (
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
            ),
            _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        };
        out.push(Policy {
            owner: format!("{namespace}/{name}"),
            object,
            namespace,
            policy,
            ingress,
            egress,
            peers: Vec::new(),
        });
    }
    out
}

/// A rule: its direction, peers (`from` or `to`) and ports.
type Rule<'a> = (
    u8,
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

/// The peers of every rule of the policy, with the direction they are in.
fn rules(policy: &NetworkPolicy) -> impl Iterator<Item = Rule<'_>> {
    let spec = policy.spec.as_ref();
    let ingress = spec
        .and_then(|s| s.ingress.as_ref())
        .into_iter()
        .flatten()
        .map(|r| (POLICY_INGRESS, r.from.as_ref(), r.ports.as_ref()));
    let egress = spec
        .and_then(|s| s.egress.as_ref())
        .into_iter()
        .flatten()
        .map(|r| (POLICY_EGRESS, r.to.as_ref(), r.ports.as_ref()));
    ingress.chain(egress)
}

/// Pod label keys named by any policy's pod selectors.
fn selected_pod_keys(policies: &[Policy<'_>]) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for p in policies {
        if let Some(s) = p.policy.spec.as_ref().and_then(|s| s.pod_selector.as_ref()) {
            keys.extend(selector::keys(s).map(String::from));
        }
        for (_, peers, _) in rules(p.policy) {
            for s in peers
                .into_iter()
                .flatten()
                .filter_map(|peer| peer.pod_selector.as_ref())
            {
                keys.extend(selector::keys(s).map(String::from));
            }
        }
    }
    keys
}

/// Namespace name -> labels, with the name label the API server sets on every namespace.
fn namespace_labels(snapshot: &Snapshot, problems: &mut Problems) -> BTreeMap<String, Labels> {
    let mut out: BTreeMap<String, Labels> = BTreeMap::new();
    let mut twice = BTreeSet::new();
    for (name, labels) in snapshot.namespaces.iter().filter_map(labels_of_namespace) {
        match out.entry(name) {
            Entry::Occupied(e) => {
                twice.insert(e.key().clone());
            }
            Entry::Vacant(e) => {
                e.insert(labels);
            }
        }
    }
    // A namespace defined twice is treated as unknown: either copy would depend on order.
    for name in twice {
        out.remove(&name);
        problems.insert(Problem::NamespaceDuplicate { name });
    }
    out
}

/// A Namespace's name and labels, with the name label the API server sets; None without
/// a name.
fn labels_of_namespace(ns: &Namespace) -> Option<(String, Labels)> {
    let name = ns.metadata.name.clone()?;
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
    Some((name, labels))
}

/// Whether `policy` selects the pod `w`.
fn selects(policy: &Policy<'_>, w: &Workload<'_>) -> bool {
    let selector = policy
        .policy
        .spec
        .as_ref()
        .and_then(|s| s.pod_selector.as_ref());
    policy.namespace == w.namespace && selector.is_none_or(|s| selector::matches(s, &w.labels))
}
