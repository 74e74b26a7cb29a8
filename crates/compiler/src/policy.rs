//! NetworkPolicy: identities, the ipcache and every local endpoint's allow rows.
//!
//! Selectors are evaluated on pods and the result is expressed as the identities of the
//! selected pods. That is exact because pods sharing an identity share every label a
//! selector can look at: pod labels (high-cardinality keys stay in when a policy names
//! them), namespace name and labels, and the policy CIDRs that contain their address.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    net::Ipv4Addr,
};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::{
    api::{
        core::v1::Pod,
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use sluice_common::kinds::RuleOrigin;
use sluice_common::{
    ENDPOINT_F_EGRESS_ENFORCED, ENDPOINT_F_INGRESS_ENFORCED, ENDPOINT_F_POLICY_OVERFLOW,
    EndpointInfo, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD, IpcacheEntry,
    IpcacheKey, POLICY_EGRESS, POLICY_INGRESS, PolicyKey,
};
use sluice_store::{
    LocalEndpoint, Snapshot,
    selector::{self, Labels},
};

use crate::{
    DesiredState, EndpointDetails, EndpointPolicy, Identity, NodeContext,
    identity::{self, LABEL_HOST, LABEL_REMOTE_NODE, LABEL_WORLD, Scope},
    namespace_of, protocol_number,
};

/// The label the API server puts on every namespace.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A NetworkPolicy with its name and the directions it isolates.
struct Policy<'a> {
    /// `namespace/name`.
    owner: String,
    namespace: &'a str,
    policy: &'a NetworkPolicy,
    ingress: bool,
    egress: bool,
    /// The peers of each rule, in `rules` order; they do not depend on the endpoint, so
    /// they are resolved once.
    peers: Vec<Peers>,
}

/// A pod as policy sees it.
struct Workload<'a> {
    namespace: &'a str,
    name: &'a str,
    labels: Labels,
    /// None when the namespace object is unknown: no namespaceSelector selects the pod then.
    namespace_labels: Option<&'a Labels>,
    /// The address the ipcache maps to the pod's identity, if it has one there.
    address: Option<Ipv4Addr>,
    /// containerPorts as (name, protocol, number), for named ports.
    ports: Vec<(String, u8, u16)>,
    identity: u32,
}

/// The remote side of a rule.
enum Peers {
    /// No `from`/`to`: every peer (identity 0 in the row).
    Any,
    Identities(BTreeSet<u32>),
}

pub(crate) struct PolicyInput<'a> {
    pub snapshot: &'a Snapshot,
    pub node: &'a NodeContext,
    /// The local endpoints that were given an interface, by ifindex.
    pub endpoints: &'a BTreeMap<u32, &'a LocalEndpoint>,
}

pub(crate) fn compile(
    input: &PolicyInput<'_>,
    state: &mut DesiredState,
    problems: &mut BTreeSet<String>,
) {
    let snapshot = input.snapshot;
    let policies = policies_in_order(snapshot, problems);
    let cidrs = policy_cidrs(&policies, problems);
    let namespaces = namespace_labels(snapshot, problems);
    let node_addresses = node_addresses(snapshot, &input.node.node);
    let mut workloads = workloads(input, &namespaces, &node_addresses, problems);

    let mut labels_of: BTreeMap<u32, Vec<String>> = [
        (IDENTITY_HOST, vec![LABEL_HOST.to_string()]),
        (IDENTITY_WORLD, vec![LABEL_WORLD.to_string()]),
        (IDENTITY_REMOTE_NODE, vec![LABEL_REMOTE_NODE.to_string()]),
    ]
    .into();
    let selected_keys = selected_pod_keys(&policies);
    pod_identities(
        &mut workloads,
        &cidrs,
        &selected_keys,
        &mut labels_of,
        problems,
    );
    let cidr_identities = cidr_identities(&cidrs, &mut labels_of, problems);

    // The ipcache, more specific sources last so they replace less specific ones.
    let ipcache = &mut state.ipcache;
    ipcache.insert(
        IpcacheKey::new(Ipv4Addr::UNSPECIFIED, 0),
        IpcacheEntry::local(IDENTITY_WORLD),
    );
    for (prefix, &id) in &cidr_identities {
        ipcache.insert(
            IpcacheKey::new(prefix.network(), prefix.prefix_len()),
            IpcacheEntry::local(id),
        );
    }
    for w in &workloads {
        if let Some(address) = w.address {
            ipcache.insert(
                IpcacheKey::new(address, 32),
                IpcacheEntry::local(w.identity),
            );
        }
    }
    for (&address, &id) in &node_addresses {
        ipcache.insert(IpcacheKey::new(address, 32), IpcacheEntry::local(id));
    }

    let world = World {
        ipcache: &state.ipcache,
        workloads: &workloads,
        namespaces: &namespaces,
    };
    let mut policies = policies;
    for p in &mut policies {
        p.peers = rules(p.policy)
            .map(|(_, peers, _)| world.peers(&p.owner, p.namespace, peers, problems))
            .collect();
    }
    let mut used: BTreeSet<u32> = state.ipcache.values().map(|e| e.identity).collect();
    let by_name: BTreeMap<(&str, &str), &Workload<'_>> = workloads
        .iter()
        .map(|w| ((w.namespace, w.name), w))
        .collect();
    let mut endpoints = Vec::new();
    for (&ifindex, endpoint) in input.endpoints {
        let key = (endpoint.namespace.as_str(), endpoint.pod.as_str());
        let compiled = match by_name.get(&key) {
            Some(w) => world.endpoint(endpoint, w, &policies, input.node.policy_map_max, problems),
            None => CompiledEndpoint::unknown(endpoint),
        };
        used.insert(compiled.details.identity);
        if let Some(policy) = &compiled.policy {
            used.extend(policy.rows.keys().map(|k| k.rule.identity));
        }
        endpoints.push((ifindex, compiled));
    }
    for (ifindex, compiled) in endpoints {
        state.endpoints.insert(ifindex, compiled.info);
        state.endpoint_details.insert(ifindex, compiled.details);
        if let Some(policy) = compiled.policy {
            state.policies.insert(ifindex, policy);
        }
    }
    used.remove(&IDENTITY_ANY);
    for id in used {
        if let Some(labels) = labels_of.remove(&id) {
            state.identities.insert(id, Identity { id, labels });
        }
    }
}

/// One local endpoint's map entries.
struct CompiledEndpoint {
    info: EndpointInfo,
    details: EndpointDetails,
    /// None when no direction is enforced or the rows do not fit.
    policy: Option<EndpointPolicy>,
}

impl CompiledEndpoint {
    /// An endpoint whose Pod is defined twice (reported with the pods): which labels apply
    /// is unknown, so it fails closed in both directions.
    fn unknown(endpoint: &LocalEndpoint) -> Self {
        let mut info = EndpointInfo::new(endpoint.ipv4, IDENTITY_ANY);
        info.flags = ENDPOINT_F_INGRESS_ENFORCED | ENDPOINT_F_EGRESS_ENFORCED;
        Self {
            info,
            details: EndpointDetails {
                namespace: endpoint.namespace.clone(),
                pod: endpoint.pod.clone(),
                interface: endpoint.interface.clone(),
                ipv4: endpoint.ipv4,
                identity: IDENTITY_ANY,
                ingress_enforced: true,
                egress_enforced: true,
                policy_rows: 0,
                overflow: false,
                policies: Vec::new(),
            },
            policy: None,
        }
    }
}

/// Every pod with an address or a local endpoint, sorted by (namespace, name), with the
/// local endpoints that have no Pod object at all as pods without labels. Of two pods
/// claiming one address the first keeps it; node addresses win over pods.
fn workloads<'a>(
    input: &PolicyInput<'a>,
    namespaces: &'a BTreeMap<String, Labels>,
    node_addresses: &BTreeMap<Ipv4Addr, u32>,
    problems: &mut BTreeSet<String>,
) -> Vec<Workload<'a>> {
    let local: BTreeMap<(&str, &str), &LocalEndpoint> = input
        .endpoints
        .values()
        .map(|e| ((e.namespace.as_str(), e.pod.as_str()), *e))
        .collect();
    let (pods, missing) = pods_in_order(input.snapshot, &local, problems);
    let mut workloads: Vec<Workload<'a>> = pods
        .into_iter()
        .filter_map(|(namespace, name, pod)| {
            let endpoint = local.get(&(namespace, name)).copied();
            workload(namespace, name, Some(pod), endpoint, namespaces)
        })
        .collect();
    for endpoint in missing {
        problems.insert(format!(
            "endpoint {}/{}: no Pod object: treated as a pod without labels",
            endpoint.namespace, endpoint.pod
        ));
        workloads.extend(workload(
            &endpoint.namespace,
            &endpoint.pod,
            None,
            Some(endpoint),
            namespaces,
        ));
    }
    workloads.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));

    let mut address_owner: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for w in &mut workloads {
        let Some(address) = w.address else { continue };
        let who = format!("{}/{}", w.namespace, w.name);
        if node_addresses.contains_key(&address) {
            problems.insert(format!(
                "pod {who}: address {address} belongs to a node: not in the ipcache"
            ));
            w.address = None;
        } else if let Some(holder) = address_owner.get(&address) {
            problems.insert(format!(
                "pod {who}: address {address} already belongs to pod {holder}: not in the ipcache"
            ));
            w.address = None;
        } else {
            address_owner.insert(address, who);
        }
    }
    workloads
}

/// Gives every workload the identity of its label set.
fn pod_identities(
    workloads: &mut [Workload<'_>],
    cidrs: &BTreeSet<Ipv4Net>,
    selected_keys: &BTreeSet<String>,
    labels_of: &mut BTreeMap<u32, Vec<String>>,
    problems: &mut BTreeSet<String>,
) {
    let sets: Vec<Vec<String>> = workloads
        .iter()
        .map(|w| {
            let containing = w
                .address
                .map(|a| cidrs.iter().filter(move |c| c.contains(&a)).copied())
                .into_iter()
                .flatten();
            identity::pod_labels(
                w.namespace,
                &w.labels,
                w.namespace_labels,
                containing,
                selected_keys,
            )
        })
        .collect();
    let (numbers, left_out) = identity::allocate(&sets.iter().cloned().collect(), Scope::Label);
    for set in left_out {
        problems.insert(format!(
            "identity space exhausted: pods labelled {} are the world",
            set.join(",")
        ));
    }
    for (w, set) in workloads.iter_mut().zip(sets) {
        w.identity = numbers.get(&set).copied().unwrap_or(IDENTITY_WORLD);
        if w.identity != IDENTITY_WORLD {
            labels_of.insert(w.identity, set);
        }
    }
}

/// The identity of every policy CIDR but 0.0.0.0/0, which is the world itself.
fn cidr_identities(
    cidrs: &BTreeSet<Ipv4Net>,
    labels_of: &mut BTreeMap<u32, Vec<String>>,
    problems: &mut BTreeSet<String>,
) -> BTreeMap<Ipv4Net, u32> {
    let sets: BTreeMap<Ipv4Net, Vec<String>> = cidrs
        .iter()
        .filter(|c| c.prefix_len() > 0)
        .map(|&p| {
            let containing = cidrs.iter().filter(|c| c.contains(&p)).copied();
            (p, identity::cidr_labels(containing))
        })
        .collect();
    let (numbers, left_out) = identity::allocate(&sets.values().cloned().collect(), Scope::Cidr);
    for set in left_out {
        problems.insert(format!(
            "identity space exhausted: {} is the world",
            set.join(",")
        ));
    }
    sets.into_iter()
        .map(|(prefix, set)| {
            let id = numbers.get(&set).copied().unwrap_or(IDENTITY_WORLD);
            if id != IDENTITY_WORLD {
                labels_of.insert(id, set);
            }
            (prefix, id)
        })
        .collect()
}

/// NetworkPolicies sorted by (namespace, name); a name defined twice is skipped, since
/// keeping either copy would make the output depend on list order.
fn policies_in_order<'a>(
    snapshot: &'a Snapshot,
    problems: &mut BTreeSet<String>,
) -> Vec<Policy<'a>> {
    let mut by_name: BTreeMap<(&str, &str), Vec<&NetworkPolicy>> = BTreeMap::new();
    for policy in &snapshot.network_policies {
        let namespace = namespace_of(policy.metadata.namespace.as_ref());
        let name = policy.metadata.name.as_deref().unwrap_or("");
        by_name.entry((namespace, name)).or_default().push(policy);
    }
    let mut out = Vec::new();
    for ((namespace, name), copies) in by_name {
        let owner = format!("{namespace}/{name}");
        let [policy] = copies.as_slice() else {
            problems.insert(format!(
                "networkpolicy {owner}: defined {} times: skipped",
                copies.len()
            ));
            continue;
        };
        let Some(spec) = &policy.spec else {
            problems.insert(format!("networkpolicy {owner}: no spec: skipped"));
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
            owner,
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

/// A parsed ipBlock: IPv6 parts are dropped (they never contain an IPv4 address).
struct Block {
    cidr: Option<Ipv4Net>,
    except: Vec<Ipv4Net>,
}

/// Parses an ipBlock; an unparsable part is reported and makes the peer match nothing.
fn block(owner: &str, peer: &NetworkPolicyPeer, problems: &mut BTreeSet<String>) -> Option<Block> {
    let ip_block = peer.ip_block.as_ref()?;
    let mut bad = false;
    let mut parse = |s: &str| match s.parse::<IpNet>() {
        Ok(IpNet::V4(net)) => Some(net.trunc()),
        Ok(IpNet::V6(_)) => None,
        Err(_) => {
            problems.insert(format!(
                "networkpolicy {owner}: ipBlock {s:?} is not a CIDR: the peer matches nothing"
            ));
            bad = true;
            None
        }
    };
    let cidr = parse(&ip_block.cidr);
    let except = ip_block
        .except
        .iter()
        .flatten()
        .filter_map(|e| parse(e))
        .collect();
    Some(Block {
        cidr: if bad { None } else { cidr },
        except,
    })
}

/// Every IPv4 prefix named by an ipBlock, as cidr or except.
fn policy_cidrs(policies: &[Policy<'_>], problems: &mut BTreeSet<String>) -> BTreeSet<Ipv4Net> {
    let mut out = BTreeSet::new();
    for p in policies {
        for (_, peers, _) in rules(p.policy) {
            for peer in peers.into_iter().flatten() {
                if let Some(b) = block(&p.owner, peer, problems) {
                    out.extend(b.cidr);
                    out.extend(b.except);
                }
            }
        }
    }
    out
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
fn namespace_labels(
    snapshot: &Snapshot,
    problems: &mut BTreeSet<String>,
) -> BTreeMap<String, Labels> {
    let mut out: BTreeMap<String, Labels> = BTreeMap::new();
    let mut twice = BTreeSet::new();
    for ns in &snapshot.namespaces {
        let Some(name) = ns.metadata.name.clone() else {
            continue;
        };
        let mut labels = ns.metadata.labels.clone().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
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
        problems.insert(format!(
            "namespace {name}: defined more than once: its labels are ignored"
        ));
        out.remove(&name);
    }
    out
}

/// A pod with its namespace and name.
type NamedPod<'a> = (&'a str, &'a str, &'a Pod);

/// Pods by (namespace, name), skipping names defined twice, and the local endpoints that
/// have no Pod object at all.
fn pods_in_order<'a>(
    snapshot: &'a Snapshot,
    local: &BTreeMap<(&'a str, &'a str), &'a LocalEndpoint>,
    problems: &mut BTreeSet<String>,
) -> (Vec<NamedPod<'a>>, Vec<&'a LocalEndpoint>) {
    let mut by_name: BTreeMap<(&str, &str), Vec<&Pod>> = BTreeMap::new();
    for pod in &snapshot.pods {
        let namespace = namespace_of(pod.metadata.namespace.as_ref());
        let name = pod.metadata.name.as_deref().unwrap_or("");
        by_name.entry((namespace, name)).or_default().push(pod);
    }
    let missing = local
        .iter()
        .filter(|(k, _)| !by_name.contains_key(*k))
        .map(|(_, e)| *e)
        .collect();
    let mut pods = Vec::new();
    for ((namespace, name), copies) in by_name {
        match copies.as_slice() {
            [pod] => pods.push((namespace, name, *pod)),
            _ => {
                problems.insert(format!(
                    "pod {namespace}/{name}: defined {} times: skipped",
                    copies.len()
                ));
            }
        }
    }
    (pods, missing)
}

/// The pod as policy sees it, or None if it neither has an address nor is a local endpoint.
fn workload<'a>(
    namespace: &'a str,
    name: &'a str,
    pod: Option<&'a Pod>,
    endpoint: Option<&LocalEndpoint>,
    namespaces: &'a BTreeMap<String, Labels>,
) -> Option<Workload<'a>> {
    let status = pod.and_then(|p| p.status.as_ref());
    let spec = pod.and_then(|p| p.spec.as_ref());
    // A host-network pod is the node as far as addresses go, and a terminated one has
    // none; either still matters if it is a local endpoint, for its flags and rows.
    let host_network = spec.and_then(|s| s.host_network) == Some(true);
    let terminated = matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    if (host_network || terminated) && endpoint.is_none() {
        return None;
    }
    let address = if host_network || terminated {
        None
    } else {
        status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            .or(endpoint.map(|e| e.ipv4))
    };
    // Without an address or a local endpoint a pod can be neither reached nor judged.
    if address.is_none() && endpoint.is_none() {
        return None;
    }
    let ports = spec
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let name = p.name.clone()?;
            let proto = protocol_number(p.protocol.as_ref())?;
            let number = u16::try_from(p.container_port).ok()?;
            Some((name, proto, number))
        })
        .collect();
    Some(Workload {
        namespace,
        name,
        labels: pod
            .and_then(|p| p.metadata.labels.clone())
            .unwrap_or_default(),
        namespace_labels: namespaces.get(namespace),
        address,
        ports,
        identity: IDENTITY_WORLD,
    })
}

/// IPv4 addresses of every node -> host (this node) or remote-node (the others).
fn node_addresses(snapshot: &Snapshot, this_node: &str) -> BTreeMap<Ipv4Addr, u32> {
    let mut nodes: Vec<_> = snapshot.nodes.iter().collect();
    nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut out = BTreeMap::new();
    for node in nodes {
        let id = if node.metadata.name.as_deref() == Some(this_node) {
            IDENTITY_HOST
        } else {
            IDENTITY_REMOTE_NODE
        };
        let addresses = node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten());
        for address in addresses.filter_map(|a| a.address.parse::<Ipv4Addr>().ok()) {
            // The host identity wins an address claimed by this node and another.
            let entry = out.entry(address).or_insert(id);
            *entry = (*entry).min(id);
        }
    }
    out
}

fn selects(policy: &Policy<'_>, w: &Workload<'_>) -> bool {
    let selector = policy
        .policy
        .spec
        .as_ref()
        .and_then(|s| s.pod_selector.as_ref());
    policy.namespace == w.namespace && selector.is_none_or(|s| selector::matches(s, &w.labels))
}

/// What rules are evaluated against.
struct World<'a> {
    ipcache: &'a BTreeMap<IpcacheKey, IpcacheEntry>,
    workloads: &'a [Workload<'a>],
    namespaces: &'a BTreeMap<String, Labels>,
}

impl World<'_> {
    /// The flags, details and rows of a local endpoint.
    fn endpoint(
        &self,
        endpoint: &LocalEndpoint,
        w: &Workload<'_>,
        policies: &[Policy<'_>],
        capacity: u32,
        problems: &mut BTreeSet<String>,
    ) -> CompiledEndpoint {
        let selecting: Vec<&Policy<'_>> = policies.iter().filter(|p| selects(p, w)).collect();
        let ingress = selecting.iter().any(|p| p.ingress);
        let egress = selecting.iter().any(|p| p.egress);
        let mut rows: BTreeMap<PolicyKey, BTreeSet<RuleOrigin>> = BTreeMap::new();
        for p in &selecting {
            self.policy_rows(p, w, &mut rows, problems);
        }
        let mut flags = 0;
        for (enforced, direction, flag) in [
            (ingress, POLICY_INGRESS, ENDPOINT_F_INGRESS_ENFORCED),
            (egress, POLICY_EGRESS, ENDPOINT_F_EGRESS_ENFORCED),
        ] {
            if enforced {
                flags |= flag;
                rows.entry(PolicyKey::any(IDENTITY_HOST, direction))
                    .or_default()
                    .insert(RuleOrigin::Host);
            }
        }
        let overflow = rows.len() > capacity as usize;
        if overflow {
            flags |= ENDPOINT_F_POLICY_OVERFLOW;
            problems.insert(format!(
                "endpoint {}/{}: policy needs {} rows, the map holds {capacity}: fails closed",
                endpoint.namespace,
                endpoint.pod,
                rows.len()
            ));
        }
        let mut info = EndpointInfo::new(endpoint.ipv4, w.identity);
        info.flags = flags;
        CompiledEndpoint {
            info,
            details: EndpointDetails {
                namespace: endpoint.namespace.clone(),
                pod: endpoint.pod.clone(),
                interface: endpoint.interface.clone(),
                ipv4: endpoint.ipv4,
                identity: w.identity,
                ingress_enforced: ingress,
                egress_enforced: egress,
                policy_rows: rows.len(),
                overflow,
                policies: selecting.iter().map(|p| p.owner.clone()).collect(),
            },
            policy: ((ingress || egress) && !overflow).then_some(EndpointPolicy { rows }),
        }
    }

    /// Adds the rows `policy` allows for endpoint `w`, in the directions it isolates.
    fn policy_rows(
        &self,
        policy: &Policy<'_>,
        w: &Workload<'_>,
        rows: &mut BTreeMap<PolicyKey, BTreeSet<RuleOrigin>>,
        problems: &mut BTreeSet<String>,
    ) {
        for ((direction, _, ports), peers) in rules(policy.policy).zip(&policy.peers) {
            let isolates = if direction == POLICY_INGRESS {
                policy.ingress
            } else {
                policy.egress
            };
            if !isolates {
                continue;
            }
            let mut add = |key: PolicyKey| {
                rows.entry(key)
                    .or_default()
                    .insert(RuleOrigin::Policy(policy.owner.clone()));
            };
            let ports = ports.map(Vec::as_slice).unwrap_or_default();
            if ports.is_empty() {
                for id in peers.ids() {
                    add(PolicyKey::any(id, direction));
                }
                continue;
            }
            for port in ports {
                let Some(proto) = protocol_number(port.protocol.as_ref()) else {
                    problems.insert(format!(
                        "networkpolicy {}: unsupported protocol {:?}: the port matches nothing",
                        policy.owner,
                        port.protocol.as_deref().unwrap_or("")
                    ));
                    continue;
                };
                match &port.port {
                    None => {
                        for id in peers.ids() {
                            add(PolicyKey::any_port(id, direction, proto));
                        }
                    }
                    Some(IntOrString::Int(first)) => {
                        let last = port.end_port.unwrap_or(*first);
                        let range = u16::try_from(*first).ok().zip(u16::try_from(last).ok());
                        let Some((first, last)) = range.filter(|(f, l)| f <= l) else {
                            problems.insert(format!(
                                "networkpolicy {}: port range {first}..{last} is empty or out of range: the port matches nothing",
                                policy.owner
                            ));
                            continue;
                        };
                        for (start, bits) in port_prefixes(first, last) {
                            for id in peers.ids() {
                                add(PolicyKey::ports(id, direction, proto, start, bits));
                            }
                        }
                    }
                    Some(IntOrString::String(name)) if direction == POLICY_INGRESS => {
                        // The destination is this endpoint.
                        for number in named(w, name, proto) {
                            for id in peers.ids() {
                                add(PolicyKey::ports(id, direction, proto, number, 16));
                            }
                        }
                    }
                    Some(IntOrString::String(name)) => {
                        // The destination is the peer: resolve per destination pod, so only
                        // pod identities get rows and each with its own numbers.
                        for d in self.workloads.iter().filter(|d| d.address.is_some()) {
                            if !peers.contains(d.identity) {
                                continue;
                            }
                            for number in named(d, name, proto) {
                                add(PolicyKey::ports(d.identity, direction, proto, number, 16));
                            }
                        }
                    }
                }
            }
        }
    }

    /// The peers of one rule of the policy `owner` in `namespace`.
    fn peers(
        &self,
        owner: &str,
        namespace: &str,
        peers: Option<&Vec<NetworkPolicyPeer>>,
        problems: &mut BTreeSet<String>,
    ) -> Peers {
        match peers {
            Some(list) if !list.is_empty() => {
                let mut ids = BTreeSet::new();
                for peer in list {
                    ids.extend(self.peer_identities(owner, namespace, peer, problems));
                }
                Peers::Identities(ids)
            }
            _ => Peers::Any,
        }
    }

    /// The identities one peer selects.
    fn peer_identities(
        &self,
        owner: &str,
        namespace: &str,
        peer: &NetworkPolicyPeer,
        problems: &mut BTreeSet<String>,
    ) -> BTreeSet<u32> {
        if peer.ip_block.is_some() {
            let Some(Block {
                cidr: Some(cidr),
                except,
            }) = block(owner, peer, problems)
            else {
                return BTreeSet::new();
            };
            // An identity is selected when every prefix the ipcache maps to it lies in the
            // block and outside each except; policy CIDRs are all in the ipcache, so the
            // prefixes of one identity agree on every block.
            let inside = |p: &Ipv4Net| cidr.contains(p) && !except.iter().any(|e| e.contains(p));
            let mut verdicts: BTreeMap<u32, bool> = BTreeMap::new();
            for (key, entry) in self.ipcache {
                let Ok(prefix) = Ipv4Net::new(key.addr(), key.prefixlen as u8) else {
                    continue;
                };
                let verdict = verdicts.entry(entry.identity).or_insert(true);
                *verdict &= inside(&prefix);
            }
            return verdicts
                .into_iter()
                .filter(|(_, v)| *v)
                .map(|(id, _)| id)
                .collect();
        }
        self.workloads
            .iter()
            .filter(|w| w.address.is_some())
            .filter(|w| {
                let namespace_ok = match &peer.namespace_selector {
                    None => w.namespace == namespace,
                    Some(s) => self
                        .namespaces
                        .get(w.namespace)
                        .is_some_and(|labels| selector::matches(s, labels)),
                };
                namespace_ok
                    && peer
                        .pod_selector
                        .as_ref()
                        .is_none_or(|s| selector::matches(s, &w.labels))
            })
            .map(|w| w.identity)
            .collect()
    }
}

impl Peers {
    fn ids(&self) -> Vec<u32> {
        match self {
            Peers::Any => vec![IDENTITY_ANY],
            Peers::Identities(ids) => ids.iter().copied().collect(),
        }
    }

    fn contains(&self, id: u32) -> bool {
        match self {
            Peers::Any => true,
            Peers::Identities(ids) => ids.contains(&id),
        }
    }
}

/// Numbers of the pod's container ports named `name` with protocol `proto`.
fn named(w: &Workload<'_>, name: &str, proto: u8) -> BTreeSet<u16> {
    w.ports
        .iter()
        .filter(|(n, p, _)| n == name && *p == proto)
        .map(|(_, _, number)| *number)
        .collect()
}

/// The smallest set of aligned power-of-two blocks covering `first..=last`, as (start,
/// number of fixed leading bits).
pub(crate) fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut start, last) = (u32::from(first), u32::from(last));
    while start <= last {
        // The largest block aligned at `start` that stays within the range.
        let mut size: u32 = if start == 0 {
            1 << 16
        } else {
            1 << start.trailing_zeros()
        };
        while start + size - 1 > last {
            size >>= 1;
        }
        // Both fit: start <= 65535 and size is a power of two up to 2^16.
        out.push((start as u16, (16 - size.trailing_zeros()) as u8));
        start += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::port_prefixes;

    #[test]
    fn port_ranges_become_aligned_blocks() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(8000, 8003), vec![(8000, 14)]);
        assert_eq!(port_prefixes(80, 90), vec![(80, 13), (88, 15), (90, 16)]);
        assert_eq!(port_prefixes(65535, 65535), vec![(65535, 16)]);
        for (first, last) in [(1, 65535), (1000, 2000), (7, 9)] {
            let covered: u32 = port_prefixes(first, last)
                .iter()
                .map(|(_, bits)| 1u32 << (16 - bits))
                .sum();
            assert_eq!(covered, u32::from(last - first) + 1);
        }
    }
}
