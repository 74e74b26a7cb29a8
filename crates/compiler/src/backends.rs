//! The backends of a service port, from the EndpointSlices of its Service.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use sluice_store::Snapshot;

use crate::{
    ObjectKind, ObjectRef, Problem, SERVICE_NAME_LABEL, namespace_of, port_number,
    problem::Problems,
    protocol_number,
    topology::{Distribution, Place},
};

/// IPv4 EndpointSlices by the (namespace, name) of the Service they belong to.
pub(crate) fn slices_by_service(
    snapshot: &Snapshot,
) -> BTreeMap<(&str, &str), Vec<&EndpointSlice>> {
    let mut slices: BTreeMap<_, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &snapshot.endpoint_slices {
        if let Some(service) = served_service(slice) {
            let namespace = namespace_of(slice.metadata.namespace.as_ref());
            slices.entry((namespace, service)).or_default().push(slice);
        }
    }
    slices
}

/// The name of the Service (in the slice's namespace) whose backends `slice` lists, if the
/// datapath reads it: IPv6 and FQDN slices are for other consumers.
pub(crate) fn served_service(slice: &EndpointSlice) -> Option<&str> {
    if slice.address_type != "IPv4" {
        return None;
    }
    slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .map(String::as_str)
}

/// One endpoint of a Service's slices, for one service port, with the conditions that
/// decide whether it takes new connections (KEP-1669).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SliceBackend {
    pub(crate) address: Ipv4Addr,
    pub(crate) port: u16,
    /// The slice's `nodeName`: where the endpoint runs, for traffic policy Local.
    pub(crate) node: Option<String>,
    /// The endpoint's `zone`, for traffic distribution.
    pub(crate) zone: Option<String>,
    /// Its `hints.forZones` and `hints.forNodes`: who should use it; None when not given.
    pub(crate) zone_hints: Option<BTreeSet<String>>,
    pub(crate) node_hints: Option<BTreeSet<String>>,
    pub(crate) ready: bool,
    /// Serving while terminating: used only when no endpoint is ready.
    pub(crate) serving_terminating: bool,
}

impl SliceBackend {
    /// Whether connections may reach it: new ones when ready, established ones (and new
    /// ones when nothing is ready) while it is serving and terminating. These are the
    /// backends `lb4_backends` holds.
    pub(crate) fn may_take_traffic(&self) -> bool {
        self.ready || self.serving_terminating
    }
}

/// The endpoints of `slices` on the slice port named `port_name` with protocol `proto`
/// that may take traffic, deduplicated by (address, port) and sorted so slot order does
/// not depend on slice order. An address listed twice is as ready as its readiest copy.
pub(crate) fn backends_for(
    port_name: &str,
    proto: u8,
    slices: &[&EndpointSlice],
    problems: &mut Problems,
) -> Vec<SliceBackend> {
    let mut backends: BTreeMap<(Ipv4Addr, u16), SliceBackend> = BTreeMap::new();
    for slice in slices {
        let slice_name = ObjectRef::new(
            ObjectKind::EndpointSlice,
            namespace_of(slice.metadata.namespace.as_ref()),
            slice.metadata.name.as_deref().unwrap_or(""),
        );
        let Some(port) = slice_port(slice, port_name, proto) else {
            continue;
        };
        let Some(number) = port.port.and_then(port_number) else {
            problems.insert(Problem::SlicePortNumber {
                slice: slice_name.clone(),
                port_name: port_name.to_string(),
                number: port.port,
            });
            continue;
        };
        for endpoint in &slice.endpoints {
            // The API documents nil `ready` and `serving` as true, nil `terminating` as false.
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready) != Some(false);
            let serving = conditions.and_then(|c| c.serving) != Some(false);
            let terminating = conditions.and_then(|c| c.terminating) == Some(true);
            let serving_terminating = serving && terminating;
            if !ready && !serving_terminating {
                continue;
            }
            // Addresses are fungible and consumers may use only the first, as kube-proxy does.
            let Some(address) = endpoint.addresses.first() else {
                problems.insert(Problem::SliceEndpointWithoutAddress {
                    slice: slice_name.clone(),
                });
                continue;
            };
            let Ok(address) = address.parse::<Ipv4Addr>() else {
                problems.insert(Problem::SliceAddressNotIpv4 {
                    slice: slice_name.clone(),
                    address: address.clone(),
                });
                continue;
            };
            let hints = endpoint.hints.as_ref();
            let backend = SliceBackend {
                address,
                port: number,
                node: endpoint.node_name.clone(),
                zone: endpoint.zone.clone().filter(|z| !z.is_empty()),
                zone_hints: hint_names(hints.and_then(|h| h.for_zones.as_ref()), |z| &z.name),
                node_hints: hint_names(hints.and_then(|h| h.for_nodes.as_ref()), |n| &n.name),
                ready,
                serving_terminating,
            };
            backends
                .entry((address, number))
                .and_modify(|known| {
                    known.ready |= backend.ready;
                    known.serving_terminating |= backend.serving_terminating;
                    // The smallest names and all hints, so the result does not depend on
                    // slice order.
                    smallest(&mut known.node, &backend.node);
                    smallest(&mut known.zone, &backend.zone);
                    union(&mut known.zone_hints, &backend.zone_hints);
                    union(&mut known.node_hints, &backend.node_hints);
                })
                .or_insert(backend);
        }
    }
    backends.into_values().collect()
}

/// The names of a list of hints; None when there are none, as an empty list gives none.
fn hint_names<T>(hints: Option<&Vec<T>>, name: impl Fn(&T) -> &String) -> Option<BTreeSet<String>> {
    hints
        .filter(|h| !h.is_empty())
        .map(|h| h.iter().map(|hint| name(hint).clone()).collect())
}

fn smallest(known: &mut Option<String>, other: &Option<String>) {
    if other.is_some() && (known.is_none() || other < known) {
        known.clone_from(other);
    }
}

fn union(known: &mut Option<BTreeSet<String>>, other: &Option<BTreeSet<String>>) {
    if let Some(other) = other {
        known.get_or_insert_default().extend(other.iter().cloned());
    }
}

/// Which of a port's backends a frontend may use.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Scope<'a> {
    /// Traffic policy Local: those on this node.
    Node(&'a str),
    /// Traffic policy Cluster: any, narrowed among the ready ones by the Service's traffic
    /// distribution, as seen from this node's place.
    Cluster(Distribution, Place<'a>),
}

/// The backends a frontend's slots hold, in slot order: the ready ones in `scope`, or when
/// none is ready the serving-terminating ones (KEP-1669), so a Service whose pods are all
/// rolling out still answers. Topology narrows only the ready ones, as kube-proxy does.
pub(crate) fn slot_backends(backends: &[SliceBackend], scope: Scope<'_>) -> Vec<(Ipv4Addr, u16)> {
    let candidates: Vec<&SliceBackend> = backends
        .iter()
        .filter(|b| match scope {
            Scope::Node(node) => b.node.as_deref() == Some(node),
            Scope::Cluster(..) => true,
        })
        .collect();
    let ready: Vec<&SliceBackend> = candidates.iter().copied().filter(|b| b.ready).collect();
    if !ready.is_empty() {
        let chosen = match scope {
            Scope::Node(_) => ready,
            Scope::Cluster(distribution, place) => distribution.closest(ready, place),
        };
        return chosen.iter().map(|b| (b.address, b.port)).collect();
    }
    candidates
        .iter()
        .filter(|b| b.serving_terminating)
        .map(|b| (b.address, b.port))
        .collect()
}

/// How many distinct endpoints of `slices` on `node` are ready: what a Service's
/// healthCheckNodePort reports for the node, as kube-proxy's does.
pub(crate) fn local_ready_endpoints(slices: &[&EndpointSlice], node: &str) -> usize {
    let addresses: BTreeSet<&str> = slices
        .iter()
        .flat_map(|slice| &slice.endpoints)
        .filter(|e| e.node_name.as_deref() == Some(node))
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.addresses.first().map(String::as_str))
        .collect();
    addresses.len()
}

/// The slice port matching a service port: same name (both empty for an unnamed port) and
/// same protocol.
fn slice_port<'a>(slice: &'a EndpointSlice, name: &str, proto: u8) -> Option<&'a EndpointPort> {
    slice.ports.iter().flatten().find(|p| {
        p.name.as_deref().unwrap_or("") == name
            && protocol_number(p.protocol.as_ref()) == Some(proto)
    })
}
