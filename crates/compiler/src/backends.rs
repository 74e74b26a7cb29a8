//! The backends of a service port, from the EndpointSlices of its Service.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use sluice_store::Snapshot;

use crate::{
    ObjectKind, ObjectRef, Problem, SERVICE_NAME_LABEL, namespace_of, port_number,
    problem::Problems, protocol_number,
};

/// IPv4 EndpointSlices by the (namespace, name) of the Service they belong to.
pub(crate) fn slices_by_service(
    snapshot: &Snapshot,
) -> BTreeMap<(&str, &str), Vec<&EndpointSlice>> {
    let mut slices: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for slice in &snapshot.endpoint_slices {
        // IPv6 and FQDN slices are for other consumers; the datapath is IPv4 only.
        if slice.address_type != "IPv4" {
            continue;
        }
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let Some(service) = service {
            let namespace = namespace_of(slice.metadata.namespace.as_ref());
            slices
                .entry((namespace, service.as_str()))
                .or_default()
                .push(slice);
        }
    }
    slices
}

/// Ready endpoints of `slices` on the slice port named `port_name` with protocol `proto`,
/// deduplicated and sorted so slot order does not depend on slice order.
pub(crate) fn backends_for(
    port_name: &str,
    proto: u8,
    slices: &[&EndpointSlice],
    problems: &mut Problems,
) -> Vec<(Ipv4Addr, u16)> {
    let mut backends = BTreeSet::new();
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
            // The API documents a nil `ready` as ready.
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            // Addresses are fungible and consumers may use only the first, as kube-proxy does.
            let Some(address) = endpoint.addresses.first() else {
                problems.insert(Problem::SliceEndpointWithoutAddress {
                    slice: slice_name.clone(),
                });
                continue;
            };
            match address.parse::<Ipv4Addr>() {
                Ok(address) => {
                    backends.insert((address, number));
                }
                Err(_) => {
                    problems.insert(Problem::SliceAddressNotIpv4 {
                        slice: slice_name.clone(),
                        address: address.clone(),
                    });
                }
            }
        }
    }
    backends.into_iter().collect()
}

/// The slice port matching a service port: same name (both empty for an unnamed port) and
/// same protocol.
fn slice_port<'a>(slice: &'a EndpointSlice, name: &str, proto: u8) -> Option<&'a EndpointPort> {
    slice.ports.iter().flatten().find(|p| {
        p.name.as_deref().unwrap_or("") == name
            && protocol_number(p.protocol.as_ref()) == Some(proto)
    })
}
