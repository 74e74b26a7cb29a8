//! The pods as policy sees them: labels, namespace labels, the address the ipcache gives
//! them, and their named ports.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use sluice_common::{IDENTITY_WORLD, IpcacheEntry};
use sluice_store::{LocalEndpoint, Pod, Snapshot, selector::Labels};

use super::PolicyInput;
use crate::{
    ObjectKind, ObjectRef, Problem, namespace_or_default, problem::Problems, protocol_number,
};

/// A pod as policy sees it.
pub(super) struct Workload<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// Borrowed from the Pod (whose label sets are interned): a copy per pod would cost
    /// some 100 MiB at 200,000 Pods for each whole compile.
    pub labels: Cow<'a, Labels>,
    /// None when the namespace object is unknown: no namespaceSelector selects the pod then.
    pub namespace_labels: Option<&'a Labels>,
    /// The address the ipcache maps to the pod's identity, if it has one there.
    pub address: Option<Ipv4Addr>,
    /// The address the pod claims, before a node or an earlier pod takes it away.
    pub claimed: Option<Ipv4Addr>,
    /// The node the pod runs on: this node for a local endpoint, else `spec.nodeName`.
    pub node: Option<&'a str>,
    /// containerPorts as (name, protocol, number), for named ports.
    pub ports: Vec<(String, u8, u16)>,
    pub identity: u32,
}

/// Every pod with an address or a local endpoint, sorted by (namespace, name), with the
/// local endpoints that have no Pod object at all as pods without labels. Of two pods
/// claiming one address the first keeps it; node addresses win over pods.
pub(super) fn workloads<'a>(
    input: &PolicyInput<'a>,
    namespaces: &'a BTreeMap<String, Labels>,
    node_addresses: &BTreeMap<Ipv4Addr, IpcacheEntry>,
    problems: &mut Problems,
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
        problems.insert(Problem::EndpointWithoutPod {
            endpoint: ObjectRef::new(ObjectKind::Endpoint, &endpoint.namespace, &endpoint.pod),
        });
        workloads.extend(workload(
            &endpoint.namespace,
            &endpoint.pod,
            None,
            Some(endpoint),
            namespaces,
        ));
    }
    workloads.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));
    claim_addresses(&mut workloads, node_addresses, problems);
    workloads
}

/// Takes the address from a pod that claims a node's address or another pod's.
fn claim_addresses(
    workloads: &mut [Workload<'_>],
    node_addresses: &BTreeMap<Ipv4Addr, IpcacheEntry>,
    problems: &mut Problems,
) {
    let mut address_owner: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for w in workloads {
        let Some(address) = w.address else { continue };
        let pod = ObjectRef::new(ObjectKind::Pod, w.namespace, w.name);
        if node_addresses.contains_key(&address) {
            problems.insert(Problem::PodAddressOfNode { pod, address });
            w.address = None;
        } else if let Some(holder) = address_owner.get(&address) {
            problems.insert(Problem::PodAddressTaken {
                pod,
                address,
                holder: holder.clone(),
            });
            w.address = None;
        } else {
            address_owner.insert(address, format!("{}/{}", w.namespace, w.name));
        }
    }
}

/// A pod with its namespace and name.
type NamedPod<'a> = (&'a str, &'a str, &'a Pod);

/// Pods by (namespace, name), skipping names defined twice, and the local endpoints that
/// have no Pod object at all.
fn pods_in_order<'a>(
    snapshot: &'a Snapshot,
    local: &BTreeMap<(&'a str, &'a str), &'a LocalEndpoint>,
    problems: &mut Problems,
) -> (Vec<NamedPod<'a>>, Vec<&'a LocalEndpoint>) {
    let mut by_name: BTreeMap<(&str, &str), Vec<&Pod>> = BTreeMap::new();
    for pod in &snapshot.pods {
        let namespace = namespace_or_default(pod.namespace());
        let name = pod.name().unwrap_or("");
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
                problems.insert(Problem::Duplicate {
                    object: ObjectRef::new(ObjectKind::Pod, namespace, name),
                    copies: copies.len(),
                });
            }
        }
    }
    (pods, missing)
}

/// The pod as policy sees it, or None if it neither has an address nor is a local endpoint.
pub(super) fn workload<'a>(
    namespace: &'a str,
    name: &'a str,
    pod: Option<&'a Pod>,
    endpoint: Option<&'a LocalEndpoint>,
    namespaces: &'a BTreeMap<String, Labels>,
) -> Option<Workload<'a>> {
    // A host-network pod is the node as far as addresses go, and a terminated one has
    // none; either still matters if it is a local endpoint, for its flags and rows.
    let host_network = pod.and_then(Pod::host_network) == Some(true);
    let terminated = matches!(pod.and_then(Pod::phase), Some("Succeeded" | "Failed"));
    if (host_network || terminated) && endpoint.is_none() {
        return None;
    }
    let address = if host_network || terminated {
        None
    } else {
        pod.and_then(Pod::pod_ip)
            .and_then(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .or(endpoint.and_then(LocalEndpoint::ipv4))
    };
    // Without an address or a local endpoint a pod can be neither reached nor judged.
    if address.is_none() && endpoint.is_none() {
        return None;
    }
    let ports = pod
        .into_iter()
        .flat_map(Pod::containers)
        .flat_map(|c| c.ports.iter())
        .filter_map(|p| {
            let name = p.name.to_string();
            let proto = protocol_number(p.protocol.as_ref())?;
            let number = u16::try_from(p.container_port).ok()?;
            Some((name, proto, number))
        })
        .collect();
    Some(Workload {
        namespace,
        name,
        labels: pod
            .and_then(Pod::labels)
            .map_or_else(|| Cow::Owned(Labels::new()), Cow::Borrowed),
        namespace_labels: namespaces.get(namespace),
        address,
        claimed: address,
        node: endpoint
            .map(|e| e.node.as_str())
            .or(pod.and_then(Pod::node_name)),
        ports,
        identity: IDENTITY_WORLD,
    })
}
