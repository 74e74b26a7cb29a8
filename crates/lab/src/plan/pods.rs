//! Pods: lab-level checks of pod specs, scheduling and addresses for new pods, and the
//! label-only updates the API server allows.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::core::v1::{Pod, PodSpec},
    apimachinery::pkg::apis::meta::v1::Time,
};
use serde_json::Value;
use sluice_sources::Manifest;

use ipnet::Ipv4Net;

use super::{Apply, change, new_uid};
use crate::{
    changes::Action,
    ipam, names, slices,
    spec::LabSpec,
    state::{LabState, Owner, PodRecord, key, now},
};

impl Apply<'_> {
    /// A bare Pod: created, or its labels and annotations updated.
    pub(super) fn pod(&mut self, m: &Manifest, pod: &Pod, applied: Value) {
        self.check_pod_spec(m, pod.spec.as_ref(), "");
        let k = key(m.namespace(), m.name());
        let fixed = match fixed_ip(pod) {
            Ok(fixed) => fixed,
            Err((field, message)) => return self.violation(m, field, message),
        };
        if let Some(existing) = self.st.pods.get(&k)
            && let Some((ip, field)) = fixed
            && ip != existing.ip
        {
            return self.violation(
                m,
                field,
                format!(
                    "pod {k} has address {}; a pod's address cannot change, delete the pod first",
                    existing.ip
                ),
            );
        }
        let Some(existing) = self.st.pods.get_mut(&k) else {
            if let Some((ip, field)) = fixed
                && let Err(message) = check_fixed_ip(&self.st, pod, ip)
            {
                return self.violation(m, field, message);
            }
            match add_pod(
                &mut self.st,
                pod.clone(),
                None,
                Some(applied),
                fixed.map(|(ip, _)| ip),
            ) {
                Ok(k) => {
                    self.changes.push(change(m, Action::Created, Vec::new()));
                    self.create.push(k);
                }
                Err(message) => self.violation(m, "", message),
            }
            return;
        };
        if existing.owner.is_some() || existing.deleting.is_some() {
            let why = match &existing.owner {
                Some(o) => format!("of Deployment {}", o.deployment),
                None => "terminating".into(),
            };
            self.violation(
                m,
                "metadata.name",
                format!("a pod named {k} already exists ({why})"),
            );
            return;
        }
        let before = existing.applied.as_ref().and_then(|a| a.get("spec"));
        if before != applied.get("spec") {
            self.violation(
                m,
                "spec",
                "pod updates may not change fields other than labels and annotations; delete the pod first",
            );
            return;
        }
        let previous = existing.applied.clone();
        existing.pod.metadata.labels = pod.metadata.labels.clone();
        existing.pod.metadata.annotations = pod.metadata.annotations.clone();
        existing.applied = Some(applied.clone());
        self.line(m, Some(&previous), &applied);
    }

    /// Lab-level checks of a pod spec (a Pod's or a Deployment's template).
    pub(super) fn check_pod_spec(
        &mut self,
        m: &Manifest,
        pod_spec: Option<&PodSpec>,
        prefix: &str,
    ) {
        for (field, message) in duplicate_ports(pod_spec, prefix) {
            self.violation(m, &field, message);
        }
        if let Some(node) = pod_spec.and_then(|s| s.node_name.as_deref())
            && self.st.spec.node(node).is_none()
        {
            let nodes: Vec<_> = self.st.spec.nodes.iter().map(|n| n.name.as_str()).collect();
            self.violation(
                m,
                &format!("{prefix}spec.nodeName"),
                format!(
                    "node {node:?} is not a node of the lab (nodes: {})",
                    nodes.join(", ")
                ),
            );
        }
    }
}

/// The annotation that gives a pod a fixed address, as `status.podIP` in its manifest does.
pub const POD_IP_ANNOTATION: &str = "sluice.dev/pod-ip";

/// The address a Pod manifest asks for, with the field that asks: `status.podIP`, or the
/// annotation; both must agree. Err: (field, message).
fn fixed_ip(pod: &Pod) -> Result<Option<(Ipv4Addr, &'static str)>, (&'static str, String)> {
    let status = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
    let annotation = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(POD_IP_ANNOTATION))
        .map(String::as_str);
    const STATUS: &str = "status.podIP";
    const ANNOTATION: &str = "metadata.annotations[sluice.dev/pod-ip]";
    let parse = |value: &str, field: &'static str| {
        value
            .parse::<Ipv4Addr>()
            .map_err(|_| (field, format!("{value:?} is not an IPv4 address")))
    };
    match (status, annotation) {
        (None, None) => Ok(None),
        (Some(s), None) => Ok(Some((parse(s, STATUS)?, STATUS))),
        (None, Some(a)) => Ok(Some((parse(a, ANNOTATION)?, ANNOTATION))),
        (Some(s), Some(a)) => {
            let (ip, other) = (parse(s, STATUS)?, parse(a, ANNOTATION)?);
            if ip != other {
                return Err((
                    ANNOTATION,
                    format!("{other} differs from status.podIP {ip}"),
                ));
            }
            Ok(Some((ip, STATUS)))
        }
    }
}

/// Whether a new pod may have the fixed address `ip`: inside its node's podCIDR (the node
/// it names, else the node whose podCIDR holds `ip`), neither the CIDR's network, router nor
/// broadcast address, and no other pod's.
fn check_fixed_ip(st: &LabState, pod: &Pod, ip: Ipv4Addr) -> Result<(), String> {
    let requested = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let cidr = match requested {
        Some(node) => st.spec.node(node).map(|n| n.pod_cidr),
        None => node_holding(&st.spec, ip).map(|(_, cidr)| cidr),
    };
    let Some(cidr) = cidr.filter(|c| c.contains(&ip)) else {
        let cidrs: Vec<String> = st
            .spec
            .nodes
            .iter()
            .map(|n| format!("{} {}", n.name, n.pod_cidr))
            .collect();
        return Err(match requested {
            Some(node) => format!(
                "{ip} is outside the podCIDR of node {node} ({})",
                cidrs.join(", ")
            ),
            None => format!("{ip} is in no node's podCIDR ({})", cidrs.join(", ")),
        });
    };
    let offset = u32::from(ip) - u32::from(cidr.network());
    if offset < ipam::FIRST_POD_OFFSET || ip == cidr.broadcast() {
        return Err(format!(
            "{ip} is the network, router or broadcast address of podCIDR {cidr}"
        ));
    }
    if let Some((other, _)) = st.pods.iter().find(|(_, p)| p.ip == ip) {
        return Err(format!("{ip} is the address of pod {other}"));
    }
    Ok(())
}

/// The node whose podCIDR holds `ip`, with that CIDR.
fn node_holding(spec: &LabSpec, ip: Ipv4Addr) -> Option<(&str, Ipv4Net)> {
    spec.nodes
        .iter()
        .find(|n| n.pod_cidr.contains(&ip))
        .map(|n| (n.name.as_str(), n.pod_cidr))
}

/// The node for a new pod: the one it names, else the one whose podCIDR holds its fixed
/// address, else the one with the fewest pods (ties: the first in the lab file).
/// Terminating pods do not count; they are on their way out.
fn schedule(
    spec: &LabSpec,
    pods: &BTreeMap<String, PodRecord>,
    requested: Option<&str>,
    fixed: Option<Ipv4Addr>,
) -> String {
    if let Some(node) = requested {
        return node.to_string();
    }
    if let Some((node, _)) = fixed.and_then(|ip| node_holding(spec, ip)) {
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

/// Adds a pod on a scheduled node with its `fixed` address (checked by check_fixed_ip), or
/// the lowest free address there.
pub(super) fn add_pod(
    st: &mut LabState,
    mut pod: Pod,
    owner: Option<Owner>,
    applied: Option<Value>,
    fixed: Option<Ipv4Addr>,
) -> Result<String, String> {
    let requested = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let node = schedule(&st.spec, &st.pods, requested.as_deref(), fixed);
    let cidr = st
        .spec
        .node(&node)
        .map(|n| n.pod_cidr)
        .ok_or_else(|| format!("node {node:?} is not a node of the lab"))?;
    let used: BTreeSet<Ipv4Addr> = st.pods.values().map(|p| p.ip).collect();
    let ip = match fixed {
        Some(ip) => ip,
        None => ipam::lowest_free(cidr, ipam::FIRST_POD_OFFSET, &used)
            .ok_or_else(|| format!("no free address in podCIDR {cidr} of node {node}"))?,
    };
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let netns = pod_netns(st, &namespace, &name)?;
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

/// The network namespace name of a new pod, unless a pod, a node or a world host has it:
/// names join with '-', so `a-b/c` and `a/b-c`, or a pod and a node, could meet.
fn pod_netns(st: &LabState, namespace: &str, name: &str) -> Result<String, String> {
    let netns = names::pod_netns(&st.name, namespace, name);
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
    Ok(netns)
}

pub(super) fn mark_deleting(st: &mut LabState, pod_key: &str, when: &Time) {
    if let Some(p) = st.pods.get_mut(pod_key)
        && p.deleting.is_none()
    {
        p.deleting = Some(when.clone());
    }
}
