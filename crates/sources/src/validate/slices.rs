//! EndpointSlices.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};

use super::{
    Check, check_str, dns1123_label, dns1123_subdomain, invalid, one_of, port_number, protocol,
};

const ADDRESS_TYPES: &[&str] = &["IPv4", "IPv6", "FQDN"];
/// The API server's limit on addresses per endpoint of a slice.
const MAX_ENDPOINT_ADDRESSES: usize = 100;

pub(super) fn endpoint_slice(slice: &EndpointSlice) -> Check {
    let address_type = slice.address_type.as_str();
    if address_type.is_empty() {
        return Err(invalid("addressType", "is required"));
    }
    one_of("addressType", address_type, "address type", ADDRESS_TYPES)?;
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        let field = format!("endpoints[{i}].addresses");
        if endpoint.addresses.is_empty() || endpoint.addresses.len() > MAX_ENDPOINT_ADDRESSES {
            return Err(invalid(
                field,
                format!("must hold 1 to {MAX_ENDPOINT_ADDRESSES} addresses"),
            ));
        }
        for (j, address) in endpoint.addresses.iter().enumerate() {
            endpoint_address(&format!("{field}[{j}]"), address, address_type)?;
        }
    }
    let mut names = BTreeSet::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        endpoint_port(&field, port)?;
        let name = port.name.as_deref().unwrap_or("");
        if !names.insert(name) {
            return Err(invalid(
                format!("{field}.name"),
                format!("duplicate port name {name:?}"),
            ));
        }
    }
    Ok(())
}

fn endpoint_address(field: &str, address: &str, address_type: &str) -> Check {
    let valid = match address_type {
        "IPv4" => address.parse::<Ipv4Addr>().is_ok(),
        "IPv6" => address.parse::<Ipv6Addr>().is_ok(),
        _ => dns1123_subdomain(address).is_ok(),
    };
    if valid {
        return Ok(());
    }
    Err(invalid(
        field,
        format!("must be a valid {address_type} address (got {address:?})"),
    ))
}

fn endpoint_port(field: &str, port: &EndpointPort) -> Check {
    if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
        check_str(&format!("{field}.name"), name, "port name", dns1123_label)?;
    }
    if let Some(number) = port.port {
        port_number(&format!("{field}.port"), number)?;
    }
    protocol(&format!("{field}.protocol"), port.protocol.as_ref())
}
