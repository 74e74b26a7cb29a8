//! IPv4 routes of one namespace over rtnetlink: added, listed by the protocol that
//! installed them, and deleted (what `ip route add|show proto|del` do).

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        route::{
            RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        },
    },
};

use crate::{NetNsError, Netlink};

/// An IPv4 route: `ip route add <destination> [via <gateway>] [dev <device>] [src <source>]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route<'a> {
    pub destination: Ipv4Net,
    pub device: Option<&'a str>,
    pub gateway: Option<Ipv4Addr>,
    pub source: Option<Ipv4Addr>,
    /// Who installed it (`proto`); None: `static`, as `ip route add` would say `boot`. A
    /// program that owns some routes marks them with a number of its own to find them again.
    pub protocol: Option<u8>,
}

/// In `ip route`'s words, for errors.
impl std::fmt::Display for Route<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.destination)?;
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        if let Some(device) = self.device {
            write!(f, " dev {device}")?;
        }
        if let Some(source) = self.source {
            write!(f, " src {source}")?;
        }
        if let Some(protocol) = self.protocol {
            write!(f, " proto {protocol}")?;
        }
        Ok(())
    }
}

impl<'a> Route<'a> {
    /// `<destination> dev <device>`: on-link, no gateway.
    pub fn device(destination: Ipv4Net, device: &'a str) -> Self {
        Self {
            destination,
            device: Some(device),
            gateway: None,
            source: None,
            protocol: None,
        }
    }

    /// `<destination> via <gateway>`.
    pub fn via(destination: Ipv4Net, gateway: Ipv4Addr) -> Self {
        Self {
            destination,
            device: None,
            gateway: Some(gateway),
            source: None,
            protocol: None,
        }
    }

    /// `default via <gateway>`.
    pub fn default_via(gateway: Ipv4Addr) -> Self {
        Self::via(Ipv4Net::default(), gateway)
    }

    pub fn dev(mut self, device: &'a str) -> Self {
        self.device = Some(device);
        self
    }

    pub fn src(mut self, source: Ipv4Addr) -> Self {
        self.source = Some(source);
        self
    }

    pub fn protocol(mut self, protocol: u8) -> Self {
        self.protocol = Some(protocol);
        self
    }
}

/// A route as the kernel lists it, devices by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteEntry {
    pub destination: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub device: Option<String>,
    pub source: Option<Ipv4Addr>,
    pub protocol: u8,
}

impl RouteEntry {
    /// The route to add or delete to get this one.
    pub fn route(&self) -> Route<'_> {
        Route {
            destination: self.destination,
            device: self.device.as_deref(),
            gateway: self.gateway,
            source: self.source,
            protocol: Some(self.protocol),
        }
    }
}

impl std::fmt::Display for RouteEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.route().fmt(f)
    }
}

impl Netlink {
    /// `ip route add ...`; a route without a gateway is on-link (scope link), as `ip` makes it.
    pub fn add_route(&self, route: &Route<'_>) -> Result<(), NetNsError> {
        let message = self.route_message(route)?;
        self.runtime
            .block_on(self.handle.route().add(message).execute())
            .map_err(self.fail("RTM_NEWROUTE", route.to_string()))
    }

    /// `ip route del ...`: the route of the main table that matches every field given.
    pub fn delete_route(&self, route: &Route<'_>) -> Result<(), NetNsError> {
        let message = self.route_message(route)?;
        self.runtime
            .block_on(self.handle.route().del(message).execute())
            .map_err(self.fail("RTM_DELROUTE", route.to_string()))
    }

    /// `ip route show table main proto <protocol>`: the IPv4 routes `protocol` installed.
    pub fn routes(&self, protocol: u8) -> Result<Vec<RouteEntry>, NetNsError> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let messages: Vec<RouteMessage> = self
            .runtime
            .block_on(async { self.handle.route().get(query).execute().try_collect().await })
            .map_err(self.fail("RTM_GETROUTE", "dump"))?;
        let names: std::collections::BTreeMap<u32, String> = self
            .links()?
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect();
        Ok(messages
            .into_iter()
            .filter(|m| {
                m.header.address_family == AddressFamily::Inet
                    && m.header.table == RouteHeader::RT_TABLE_MAIN
                    && u8::from(m.header.protocol) == protocol
            })
            .filter_map(|m| entry(m, &names))
            .collect())
    }

    fn route_message(&self, route: &Route<'_>) -> Result<RouteMessage, NetNsError> {
        let destination = route.destination.trunc();
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(destination.addr(), destination.prefix_len());
        if let Some(device) = route.device {
            builder = builder.output_interface(self.index(device)?);
        }
        builder = match route.gateway {
            Some(gateway) => builder.gateway(gateway),
            None => builder.scope(RouteScope::Link),
        };
        if let Some(source) = route.source {
            builder = builder.pref_source(source);
        }
        if let Some(protocol) = route.protocol {
            builder = builder.protocol(RouteProtocol::from(protocol));
        }
        Ok(builder.build())
    }
}

/// The route a dumped message describes; None for what is not a plain IPv4 unicast route.
fn entry(
    message: RouteMessage,
    names: &std::collections::BTreeMap<u32, String>,
) -> Option<RouteEntry> {
    let v4 = |a: RouteAddress| match a {
        RouteAddress::Inet(address) => Some(address),
        _ => None,
    };
    let mut destination = Ipv4Addr::UNSPECIFIED;
    let (mut gateway, mut device, mut source) = (None, None, None);
    for attribute in message.attributes {
        match attribute {
            RouteAttribute::Destination(a) => destination = v4(a)?,
            RouteAttribute::Gateway(a) => gateway = v4(a),
            RouteAttribute::PrefSource(a) => source = v4(a),
            RouteAttribute::Oif(index) => device = names.get(&index).cloned(),
            _ => {}
        }
    }
    Some(RouteEntry {
        destination: Ipv4Net::new(destination, message.header.destination_prefix_length).ok()?,
        gateway,
        device,
        source,
        protocol: message.header.protocol.into(),
    })
}
