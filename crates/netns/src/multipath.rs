//! Routes spread over several gateways (ECMP), as a router in front of a cluster's nodes
//! spreads a load balancer's VIP: `ip route replace <destination> proto <p> nexthop via A
//! dev D nexthop via B dev D`, and the same routes read back.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::{
    RouteMessageBuilder, RouteNextHopBuilder,
    packet_route::{
        AddressFamily,
        route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol},
    },
};

use crate::{NetNsError, Netlink};

/// An IPv4 route over every gateway of `gateways`, all behind `device`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultipathRoute<'a> {
    pub destination: Ipv4Net,
    pub device: &'a str,
    /// Equal weights; one gateway makes a plain route, as the kernel stores it.
    pub gateways: Vec<Ipv4Addr>,
    /// Who installed it (`proto`), so that its owner finds its routes again.
    pub protocol: u8,
}

impl std::fmt::Display for MultipathRoute<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} proto {}", self.destination, self.protocol)?;
        for gateway in &self.gateways {
            write!(f, " nexthop via {gateway} dev {}", self.device)?;
        }
        Ok(())
    }
}

/// A route of the main table as listed: its destination and every gateway it spreads over.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MultipathEntry {
    pub destination: Ipv4Net,
    /// In the kernel's order (that of the route as added).
    pub gateways: Vec<Ipv4Addr>,
}

impl Netlink {
    /// `ip route replace ...`: adds the route, or changes its next hops in one message, so
    /// traffic to the destination never finds it missing.
    pub fn replace_multipath_route(&self, route: &MultipathRoute<'_>) -> Result<(), NetNsError> {
        let index = self.index(route.device)?;
        let destination = route.destination.trunc();
        let next_hops = route
            .gateways
            .iter()
            .map(|gateway| {
                let mut hop = RouteNextHopBuilder::new_ipv4().interface(index).build();
                hop.attributes
                    .push(RouteAttribute::Gateway(RouteAddress::Inet(*gateway)));
                hop
            })
            .collect();
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(destination.addr(), destination.prefix_len())
            .protocol(RouteProtocol::from(route.protocol))
            .multipath(next_hops)
            .build();
        self.runtime
            .block_on(self.handle.route().add(message).replace().execute())
            .map_err(self.fail("RTM_NEWROUTE", route.to_string()))
    }

    /// `ip route del <destination> proto <protocol>`: the route of the main table to
    /// `destination` that `protocol` installed, whatever its gateways.
    pub fn delete_route_of(&self, destination: Ipv4Net, protocol: u8) -> Result<(), NetNsError> {
        let destination = destination.trunc();
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(destination.addr(), destination.prefix_len())
            .protocol(RouteProtocol::from(protocol))
            .build();
        self.runtime
            .block_on(self.handle.route().del(message).execute())
            .map_err(self.fail("RTM_DELROUTE", format!("{destination} proto {protocol}")))
    }

    /// `ip route show table main proto <protocol>` with every route's gateways, whether it
    /// has one (a plain route) or several.
    pub fn multipath_routes(&self, protocol: u8) -> Result<Vec<MultipathEntry>, NetNsError> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let messages: Vec<RouteMessage> = self
            .runtime
            .block_on(async { self.handle.route().get(query).execute().try_collect().await })
            .map_err(self.fail("RTM_GETROUTE", "dump"))?;
        let mut entries: Vec<MultipathEntry> = messages
            .into_iter()
            .filter(|m| {
                m.header.address_family == AddressFamily::Inet
                    && m.header.table == RouteHeader::RT_TABLE_MAIN
                    && u8::from(m.header.protocol) == protocol
            })
            .filter_map(multipath_entry)
            .collect();
        entries.sort();
        Ok(entries)
    }
}

fn v4(address: &RouteAddress) -> Option<Ipv4Addr> {
    match address {
        RouteAddress::Inet(a) => Some(*a),
        _ => None,
    }
}

fn multipath_entry(message: RouteMessage) -> Option<MultipathEntry> {
    let mut destination = Ipv4Addr::UNSPECIFIED;
    let mut gateways = Vec::new();
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(a) => destination = v4(a)?,
            RouteAttribute::Gateway(a) => gateways.extend(v4(a)),
            RouteAttribute::MultiPath(hops) => {
                gateways.extend(hops.iter().flat_map(|hop| {
                    hop.attributes.iter().filter_map(|a| match a {
                        RouteAttribute::Gateway(g) => v4(g),
                        _ => None,
                    })
                }));
            }
            _ => {}
        }
    }
    Some(MultipathEntry {
        destination: Ipv4Net::new(destination, message.header.destination_prefix_length).ok()?,
        gateways,
    })
}
