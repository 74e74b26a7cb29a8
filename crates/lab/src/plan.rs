//! What an apply or a delete means for the lab, decided before anything on the machine
//! changes: the API server's admission (lab-level checks), the controllers (ClusterIPs,
//! Deployment pods), the scheduler and IPAM. Pure: it only computes the next [`LabState`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Pod, PodSpec, Service},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
};
use serde_json::Value;
use sluice_sources::{Manifest, ManifestError, Object};

use crate::{
    LabError, ipam, names,
    slices::{self, SERVICE_NAME_LABEL},
    spec::LabSpec,
    state::{self, LabState, Owner, PodRecord, Stored, key, now},
};

/// The lab after the change, and the pods to start and to stop to get there.
pub struct Plan {
    /// New pods are in it (not ready yet); pods to remove are marked terminating.
    pub state: LabState,
    /// Keys of the pods to create.
    pub create: Vec<String>,
    /// Keys of the terminating pods, to remove once every agent has realized that.
    pub remove: Vec<String>,
    /// kubectl's output lines.
    pub lines: Vec<String>,
}

impl Plan {
    fn finish(state: LabState, create: Vec<String>, lines: Vec<String>) -> Self {
        // Includes pods a failed earlier call left terminating.
        let remove = state
            .pods
            .iter()
            .filter(|(_, p)| p.deleting.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        Plan {
            state,
            create,
            remove,
            lines,
        }
    }
}

fn violation(m: &Manifest, field: &str, message: impl Into<String>) -> ManifestError {
    ManifestError {
        file: m.file.clone(),
        document: Some(m.document),
        object: Some(m.describe()),
        field: (!field.is_empty()).then(|| field.to_string()),
        message: message.into(),
    }
}

/// `deployment.apps/web`, as kubectl names what it applied.
fn resource(m: &Manifest) -> String {
    format!("{}/{}", resource_type(m), m.name())
}

fn resource_type(m: &Manifest) -> &'static str {
    match m.object {
        Object::Namespace(_) => "namespace",
        Object::Pod(_) => "pod",
        Object::Deployment(_) => "deployment.apps",
        Object::Service(_) => "service",
        Object::EndpointSlice(_) => "endpointslice.discovery.k8s.io",
        Object::NetworkPolicy(_) => "networkpolicy.networking.k8s.io",
    }
}

fn applied_json(m: &Manifest) -> Value {
    let value = match &m.object {
        Object::Namespace(o) => serde_json::to_value(o),
        Object::Pod(o) => serde_json::to_value(o),
        Object::Deployment(o) => serde_json::to_value(o),
        Object::Service(o) => serde_json::to_value(o),
        Object::EndpointSlice(o) => serde_json::to_value(o),
        Object::NetworkPolicy(o) => serde_json::to_value(o),
    };
    // The k8s-openapi types always serialize; Null would only make the object "configured".
    value.unwrap_or(Value::Null)
}

fn verb(previous: Option<&Option<Value>>, applied: &Value) -> &'static str {
    match previous {
        None => "created",
        Some(Some(p)) if p == applied => "unchanged",
        Some(_) => "configured",
    }
}

fn new_uid() -> String {
    let hex = |n: usize| -> String {
        (0..n)
            .map(|_| char::from_digit(fastrand::u32(..16), 16).unwrap_or('0'))
            .collect()
    };
    format!("{}-{}-{}-{}-{}", hex(8), hex(4), hex(4), hex(4), hex(12))
}

/// The node for a new pod: the one it names, else the one with the fewest pods (ties: the
/// first in the lab file). Terminating pods do not count; they are on their way out.
pub fn schedule(
    spec: &LabSpec,
    pods: &BTreeMap<String, PodRecord>,
    requested: Option<&str>,
) -> String {
    if let Some(node) = requested {
        return node.to_string();
    }
    let count = |node: &str| {
        pods.values()
            .filter(|p| p.node == node && p.deleting.is_none())
            .count()
    };
    spec.nodes
        .iter()
        .min_by_key(|n| count(&n.name))
        .map(|n| n.name.clone())
        .unwrap_or_default()
}

/// `spec.containers[i].ports[j]` fields that repeat a (containerPort, protocol) of the pod.
fn duplicate_ports(spec: Option<&PodSpec>, prefix: &str) -> Vec<(String, String)> {
    let mut seen: BTreeMap<(i32, String), String> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, c) in spec.iter().flat_map(|s| s.containers.iter()).enumerate() {
        for (j, p) in c.ports.iter().flatten().enumerate() {
            let field = format!("{prefix}spec.containers[{i}].ports[{j}].containerPort");
            let proto = slices::protocol(p.protocol.as_ref()).to_string();
            let id = (p.container_port, proto.clone());
            if let Some(first) = seen.get(&id) {
                out.push((
                    field,
                    format!("duplicate port {}/{proto}: also {first}", p.container_port),
                ));
            } else {
                seen.insert(id, field);
            }
        }
    }
    out
}

/// Lab-level checks of a pod spec (a Pod's or a Deployment's template).
fn check_pod_spec(
    spec: &LabSpec,
    m: &Manifest,
    pod_spec: Option<&PodSpec>,
    prefix: &str,
    errors: &mut Vec<ManifestError>,
) {
    for (field, message) in duplicate_ports(pod_spec, prefix) {
        errors.push(violation(m, &field, message));
    }
    if let Some(node) = pod_spec.and_then(|s| s.node_name.as_deref())
        && spec.node(node).is_none()
    {
        let nodes: Vec<_> = spec.nodes.iter().map(|n| n.name.as_str()).collect();
        errors.push(violation(
            m,
            &format!("{prefix}spec.nodeName"),
            format!(
                "node {node:?} is not a node of the lab (nodes: {})",
                nodes.join(", ")
            ),
        ));
    }
}

/// Adds a pod on a scheduled node with the lowest free address there.
fn add_pod(
    st: &mut LabState,
    mut pod: Pod,
    owner: Option<Owner>,
    applied: Option<Value>,
) -> Result<String, String> {
    let requested = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let node = schedule(&st.spec, &st.pods, requested.as_deref());
    let cidr = st
        .spec
        .node(&node)
        .map(|n| n.pod_cidr)
        .ok_or_else(|| format!("node {node:?} is not a node of the lab"))?;
    let used: BTreeSet<Ipv4Addr> = st.pods.values().map(|p| p.ip).collect();
    let ip = ipam::lowest_free(cidr, ipam::FIRST_POD_OFFSET, &used)
        .ok_or_else(|| format!("no free address in podCIDR {cidr} of node {node}"))?;
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    // Names join with '-', so `a-b/c` and `a/b-c`, or a pod and a node, could meet.
    let netns = names::pod_netns(&st.name, &namespace, &name);
    let node_netns = st
        .spec
        .nodes
        .iter()
        .map(|n| names::node_netns(&st.name, &n.name));
    let world_netns = st
        .spec
        .world
        .iter()
        .map(|w| names::world_netns(&st.name, &w.name));
    if let Some(other) = node_netns
        .chain(world_netns)
        .chain(st.pods.values().map(|p| p.netns.clone()))
        .find(|n| *n == netns)
    {
        return Err(format!(
            "the pod's network namespace name {other} is taken by another pod, a node or a world host; rename the pod"
        ));
    }
    let taken: BTreeSet<&str> = st.pods.values().map(|p| p.interface.as_str()).collect();
    let interface = (0..)
        .map(|salt| names::interface_name(&namespace, &name, salt))
        .find(|i| !taken.contains(i.as_str()))
        .unwrap_or_default();
    pod.metadata.uid = Some(new_uid());
    pod.metadata.creation_timestamp = Some(now());
    pod.spec.get_or_insert_with(Default::default).node_name = Some(node.clone());
    pod.status = None;
    let k = key(&namespace, &name);
    st.pods.insert(
        k.clone(),
        PodRecord {
            netns,
            pod,
            node,
            ip,
            interface,
            seq: st.next_seq,
            owner,
            applied,
            ready: false,
            deleting: None,
        },
    );
    st.next_seq += 1;
    Ok(k)
}

fn mark_deleting(st: &mut LabState, pod_key: &str, when: &Time) {
    if let Some(p) = st.pods.get_mut(pod_key)
        && p.deleting.is_none()
    {
        p.deleting = Some(when.clone());
    }
}

fn has_selector(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|s| !s.is_empty())
}

/// `kubectl apply -f`: validates the whole input against the lab, then computes the result.
pub fn apply(current: &LabState, manifests: &[Manifest]) -> Result<Plan, LabError> {
    let mut st = current.clone();
    let mut errors = Vec::new();
    let mut lines = Vec::new();
    let mut create = Vec::new();
    let when = now();

    // Namespaces first: the other objects of the same apply may live in them.
    for m in manifests {
        let Object::Namespace(ns) = &m.object else {
            continue;
        };
        let applied = applied_json(m);
        let previous = st.namespaces.get(m.name()).map(|s| s.applied.clone());
        lines.push(format!(
            "{} {}",
            resource(m),
            verb(previous.as_ref(), &applied)
        ));
        st.namespaces.insert(
            m.name().to_string(),
            Stored {
                applied: Some(applied),
                object: state::namespace_object(m.name(), &ns.metadata),
            },
        );
    }
    for m in manifests {
        if !matches!(m.object, Object::Namespace(_)) && !st.namespaces.contains_key(m.namespace()) {
            errors.push(violation(
                m,
                "metadata.namespace",
                format!(
                    "namespace {:?} does not exist (apply a Namespace named so first, or with it)",
                    m.namespace()
                ),
            ));
        }
    }

    // ClusterIPs a Service asks for, so automatic allocation steps around them.
    let mut claimed: BTreeMap<Ipv4Addr, String> = st
        .services
        .iter()
        .filter_map(|(k, s)| Some((cluster_ip(&s.object)?, k.clone())))
        .collect();
    for m in manifests {
        let Object::Service(svc) = &m.object else {
            continue;
        };
        let k = key(m.namespace(), m.name());
        let previous = st.services.get(&k).and_then(|s| cluster_ip(&s.object));
        let requested = svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref());
        match requested {
            None | Some("" | "None") => {}
            Some(text) => {
                let field = "spec.clusterIP";
                let Ok(ip) = text.parse::<Ipv4Addr>() else {
                    errors.push(violation(
                        m,
                        field,
                        format!("{text:?} is not an IPv4 address"),
                    ));
                    continue;
                };
                if !ipam::is_assignable(st.spec.service_cidr, ip) {
                    errors.push(violation(
                        m,
                        field,
                        format!(
                            "{ip} is not in the lab's serviceCIDR {}",
                            st.spec.service_cidr
                        ),
                    ));
                } else if previous.is_some_and(|p| p != ip) {
                    errors.push(violation(
                        m,
                        field,
                        format!(
                            "field is immutable: the Service has {}",
                            previous.map(|p| p.to_string()).unwrap_or_default()
                        ),
                    ));
                } else if let Some(other) = claimed.get(&ip).filter(|o| **o != k) {
                    errors.push(violation(
                        m,
                        field,
                        format!("{ip} is already allocated to Service {other}"),
                    ));
                } else {
                    claimed.insert(ip, k);
                }
            }
        }
    }

    for m in manifests {
        let k = key(m.namespace(), m.name());
        let applied = applied_json(m);
        match &m.object {
            Object::Namespace(_) => {}
            Object::Service(svc) => {
                let previous = st.services.get(&k).cloned();
                let mut svc = svc.clone();
                if !has_selector(&svc)
                    && !is_external_name(&svc)
                    && !has_user_slices(&st, manifests, m.namespace(), m.name())
                {
                    errors.push(violation(
                        m,
                        "spec.selector",
                        format!(
                            "required: without a selector the Service needs EndpointSlices labelled {SERVICE_NAME_LABEL}={} (none exist or are applied with it)",
                            m.name()
                        ),
                    ));
                }
                let spec = svc.spec.get_or_insert_with(Default::default);
                let type_ = spec.type_.get_or_insert_with(|| "ClusterIP".into()).clone();
                if type_ != "ExternalName" {
                    let ip = match spec.cluster_ip.as_deref() {
                        Some("None") => Some("None".to_string()),
                        Some(text) if !text.is_empty() => Some(text.to_string()),
                        _ => match previous.as_ref().and_then(|p| cluster_ip(&p.object)) {
                            Some(ip) => Some(ip.to_string()),
                            None => {
                                let used = claimed.keys().copied().collect();
                                match ipam::lowest_free(
                                    st.spec.service_cidr,
                                    ipam::FIRST_CLUSTER_IP_OFFSET,
                                    &used,
                                ) {
                                    Some(ip) => {
                                        claimed.insert(ip, k.clone());
                                        Some(ip.to_string())
                                    }
                                    None => {
                                        errors.push(violation(
                                            m,
                                            "spec.clusterIP",
                                            format!(
                                                "no free address in serviceCIDR {}",
                                                st.spec.service_cidr
                                            ),
                                        ));
                                        None
                                    }
                                }
                            }
                        },
                    };
                    spec.cluster_ips = ip.clone().map(|ip| vec![ip]);
                    spec.cluster_ip = ip;
                }
                svc.metadata.uid = previous
                    .as_ref()
                    .and_then(|p| p.object.metadata.uid.clone())
                    .or_else(|| Some(new_uid()));
                svc.metadata.creation_timestamp = previous
                    .as_ref()
                    .and_then(|p| p.object.metadata.creation_timestamp.clone())
                    .or_else(|| Some(when.clone()));
                lines.push(format!(
                    "{} {}",
                    resource(m),
                    verb(previous.as_ref().map(|p| &p.applied), &applied)
                ));
                st.services.insert(
                    k,
                    Stored {
                        applied: Some(applied),
                        object: svc,
                    },
                );
            }
            Object::EndpointSlice(slice) => {
                let previous = st.endpoint_slices.get(&k).map(|s| s.applied.clone());
                lines.push(format!(
                    "{} {}",
                    resource(m),
                    verb(previous.as_ref(), &applied)
                ));
                st.endpoint_slices.insert(
                    k,
                    Stored {
                        applied: Some(applied),
                        object: slice.clone(),
                    },
                );
            }
            Object::NetworkPolicy(policy) => {
                let previous = st.network_policies.get(&k).map(|s| s.applied.clone());
                lines.push(format!(
                    "{} {}",
                    resource(m),
                    verb(previous.as_ref(), &applied)
                ));
                st.network_policies.insert(
                    k,
                    Stored {
                        applied: Some(applied),
                        object: policy.clone(),
                    },
                );
            }
            Object::Pod(pod) => {
                check_pod_spec(&st.spec, m, pod.spec.as_ref(), "", &mut errors);
                match st.pods.get_mut(&k) {
                    Some(existing) if existing.owner.is_some() || existing.deleting.is_some() => {
                        let why = match &existing.owner {
                            Some(o) => format!("of Deployment {}", o.deployment),
                            None => "terminating".into(),
                        };
                        errors.push(violation(
                            m,
                            "metadata.name",
                            format!("a pod named {k} already exists ({why})"),
                        ));
                    }
                    Some(existing) => {
                        let before = existing.applied.as_ref().and_then(|a| a.get("spec"));
                        if before != applied.get("spec") {
                            errors.push(violation(
                                m,
                                "spec",
                                "pod updates may not change fields other than labels and annotations; delete the pod first",
                            ));
                            continue;
                        }
                        lines.push(format!(
                            "{} {}",
                            resource(m),
                            verb(Some(&existing.applied), &applied)
                        ));
                        existing.pod.metadata.labels = pod.metadata.labels.clone();
                        existing.pod.metadata.annotations = pod.metadata.annotations.clone();
                        existing.applied = Some(applied);
                    }
                    None => match add_pod(&mut st, pod.clone(), None, Some(applied)) {
                        Ok(k) => {
                            lines.push(format!("{} created", resource(m)));
                            create.push(k);
                        }
                        Err(message) => errors.push(violation(m, "", message)),
                    },
                }
            }
            Object::Deployment(deployment) => {
                let template = deployment
                    .spec
                    .as_ref()
                    .map(|s| s.template.clone())
                    .unwrap_or_default();
                check_pod_spec(
                    &st.spec,
                    m,
                    template.spec.as_ref(),
                    "spec.template.",
                    &mut errors,
                );
                let previous = st.deployments.get(&k).map(|s| s.applied.clone());
                lines.push(format!(
                    "{} {}",
                    resource(m),
                    verb(previous.as_ref(), &applied)
                ));
                let mut stored = deployment.clone();
                stored.metadata.uid = st
                    .deployments
                    .get(&k)
                    .and_then(|d| d.object.metadata.uid.clone())
                    .or_else(|| Some(new_uid()));
                st.deployments.insert(
                    k.clone(),
                    Stored {
                        applied: Some(applied),
                        object: stored.clone(),
                    },
                );
                match reconcile_deployment(&mut st, &k, &stored, &when) {
                    Ok(new) => create.extend(new),
                    Err(message) => errors.push(violation(m, "", message)),
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(LabError::Invalid(errors));
    }
    Ok(Plan::finish(st, create, lines))
}

fn is_external_name(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ExternalName")
}

/// Whether EndpointSlices for Service `namespace/name` exist or come with this apply.
fn has_user_slices(st: &LabState, manifests: &[Manifest], namespace: &str, name: &str) -> bool {
    let names_service = |meta: &ObjectMeta| {
        meta.namespace.as_deref() == Some(namespace)
            && meta
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|s| s == name)
    };
    st.endpoint_slices
        .values()
        .any(|s| names_service(&s.object.metadata))
        || manifests
            .iter()
            .any(|m| matches!(&m.object, Object::EndpointSlice(s) if names_service(&s.metadata)))
}

pub fn cluster_ip(svc: &Service) -> Option<Ipv4Addr> {
    svc.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok()
}

/// The ReplicaSet part of a Deployment: `replicas` pods of the current template; pods of an
/// older template, and the newest surplus ones, terminate. Returns the pods to create.
fn reconcile_deployment(
    st: &mut LabState,
    deployment_key: &str,
    deployment: &Deployment,
    when: &Time,
) -> Result<Vec<String>, String> {
    let spec = deployment.spec.clone().unwrap_or_default();
    let replicas = usize::try_from(spec.replicas.unwrap_or(1)).unwrap_or(0);
    let hash = names::template_hash(&spec.template).map_err(|e| e.to_string())?;
    let namespace = deployment
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = deployment.metadata.name.clone().unwrap_or_default();

    let mut current: Vec<(u64, String)> = Vec::new();
    let mut outdated = Vec::new();
    for (k, p) in &st.pods {
        match &p.owner {
            Some(o) if o.deployment == deployment_key && p.deleting.is_none() => {
                if o.template_hash == hash {
                    current.push((p.seq, k.clone()));
                } else {
                    outdated.push(k.clone());
                }
            }
            _ => {}
        }
    }
    current.sort();
    for k in outdated {
        mark_deleting(st, &k, when);
    }
    while current.len() > replicas {
        if let Some((_, k)) = current.pop() {
            mark_deleting(st, &k, when);
        }
    }

    let template_meta = spec.template.metadata.clone().unwrap_or_default();
    let replica_set = format!("{name}-{hash}");
    let mut created = Vec::new();
    for _ in current.len()..replicas {
        let pod_name = loop {
            let candidate = format!("{replica_set}-{}", names::random_suffix());
            if !st.pods.contains_key(&key(&namespace, &candidate)) {
                break candidate;
            }
        };
        let mut labels = template_meta.labels.clone().unwrap_or_default();
        labels.insert("pod-template-hash".into(), hash.clone());
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(pod_name),
                namespace: Some(namespace.clone()),
                labels: Some(labels),
                annotations: template_meta.annotations.clone(),
                owner_references: Some(vec![OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "ReplicaSet".into(),
                    name: replica_set.clone(),
                    uid: deployment.metadata.uid.clone().unwrap_or_default(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..Default::default()
            },
            spec: spec.template.spec.clone(),
            status: None,
        };
        let owner = Owner {
            deployment: deployment_key.to_string(),
            template_hash: hash.clone(),
        };
        created.push(add_pod(st, pod, Some(owner), None)?);
    }
    Ok(created)
}

/// `kubectl delete -f`: every object must exist; pods terminate, everything else goes now.
pub fn delete(current: &LabState, manifests: &[Manifest]) -> Result<Plan, LabError> {
    let mut st = current.clone();
    let mut errors = Vec::new();
    let mut lines = Vec::new();
    let when = now();
    for m in manifests {
        let k = key(m.namespace(), m.name());
        let found = match &m.object {
            Object::Namespace(_) => {
                if state::BUILTIN_NAMESPACES.contains(&m.name()) {
                    errors.push(violation(
                        m,
                        "metadata.name",
                        format!("namespace {:?} may not be deleted", m.name()),
                    ));
                    continue;
                }
                let found = st.namespaces.remove(m.name()).is_some();
                if found {
                    delete_namespace_content(&mut st, m.name(), &when);
                }
                found
            }
            Object::Pod(_) => {
                let found = st.pods.get(&k).is_some_and(|p| p.deleting.is_none());
                mark_deleting(&mut st, &k, &when);
                found
            }
            Object::Deployment(_) => {
                let found = st.deployments.remove(&k).is_some();
                let owned: Vec<String> = st
                    .pods
                    .iter()
                    .filter(|(_, p)| p.owner.as_ref().is_some_and(|o| o.deployment == k))
                    .map(|(pk, _)| pk.clone())
                    .collect();
                for pk in owned {
                    mark_deleting(&mut st, &pk, &when);
                }
                found
            }
            Object::Service(_) => st.services.remove(&k).is_some(),
            Object::EndpointSlice(_) => st.endpoint_slices.remove(&k).is_some(),
            Object::NetworkPolicy(_) => st.network_policies.remove(&k).is_some(),
        };
        if found {
            lines.push(format!("{} {:?} deleted", resource_type(m), m.name()));
        } else {
            errors.push(violation(m, "metadata.name", "not found in the lab"));
        }
    }
    if !errors.is_empty() {
        return Err(LabError::Invalid(errors));
    }
    Ok(Plan::finish(st, Vec::new(), lines))
}

/// Deleting a namespace deletes everything in it, as the namespace controller does.
fn delete_namespace_content(st: &mut LabState, namespace: &str, when: &Time) {
    let prefix = format!("{namespace}/");
    st.deployments.retain(|k, _| !k.starts_with(&prefix));
    st.services.retain(|k, _| !k.starts_with(&prefix));
    st.endpoint_slices.retain(|k, _| !k.starts_with(&prefix));
    st.network_policies.retain(|k, _| !k.starts_with(&prefix));
    let pods: Vec<String> = st
        .pods
        .keys()
        .filter(|k| k.starts_with(&prefix))
        .cloned()
        .collect();
    for k in pods {
        mark_deleting(st, &k, when);
    }
}

#[cfg(test)]
mod tests;
