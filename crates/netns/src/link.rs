//! Links, addresses and routes of one namespace over rtnetlink (what `ip link`, `ip addr`
//! and `ip route` do), synchronous for callers without a runtime of their own.

use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan,
    packet_route::{
        address::{AddressAttribute, AddressMessage},
        link::{InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
    },
};

use crate::{NetNs, NetNsError, error::io_err};

/// A link as `ip link show` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub alias: Option<String>,
    /// The bridge (or bond) it is a port of.
    pub controller: Option<u32>,
}

/// What kind of link a device is, as far as the callers here care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// A VXLAN device: its UDP port, and whether it takes remote and VNI from each packet
    /// (`external`, collect metadata).
    Vxlan { port: u16, external: bool },
    /// Anything else, by the kind the kernel names (`veth`, `bridge`...; empty for a
    /// physical device or loopback).
    Other(String),
}

/// A netlink route socket opened inside one namespace: it acts there from whichever thread
/// uses it. Requests run one at a time on a runtime of its own.
pub struct Netlink {
    pub(crate) runtime: tokio::runtime::Runtime,
    pub(crate) handle: Handle,
    pub(crate) netns: String,
}

impl NetNs {
    /// A netlink connection acting in this namespace.
    pub fn netlink(&self) -> Result<Netlink, NetNsError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(io_err("tokio runtime for", self.path()))?;
        // The socket belongs to the namespace of the thread that opens it.
        let (connection, handle, _) = self
            .run(|| {
                let _runtime = runtime.enter();
                rtnetlink::new_connection()
            })?
            .map_err(io_err("socket(NETLINK_ROUTE) in", self.path()))?;
        runtime.spawn(connection);
        Ok(Netlink {
            runtime,
            handle,
            netns: self.name().into(),
        })
    }
}

impl Netlink {
    /// A netlink connection acting in the calling thread's own namespace (a process that
    /// entered its namespace at start, like the agent).
    pub fn current() -> Result<Netlink, NetNsError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(io_err("tokio runtime for", "/proc/thread-self/ns/net"))?;
        let (connection, handle, _) = {
            let _runtime = runtime.enter();
            rtnetlink::new_connection()
        }
        .map_err(io_err(
            "socket(NETLINK_ROUTE) in",
            "/proc/thread-self/ns/net",
        ))?;
        runtime.spawn(connection);
        Ok(Netlink {
            runtime,
            handle,
            netns: "(current)".into(),
        })
    }

    pub(crate) fn fail(
        &self,
        call: &'static str,
        what: impl Into<String>,
    ) -> impl FnOnce(rtnetlink::Error) -> NetNsError {
        let (what, netns) = (what.into(), self.netns.clone());
        move |source| NetNsError::Netlink {
            call,
            what,
            netns,
            source: Box::new(source),
        }
    }

    /// The interface index of `name`.
    pub fn index(&self, name: &str) -> Result<u32, NetNsError> {
        Ok(self.link(name)?.header.index)
    }

    /// `name`'s MTU.
    pub fn mtu(&self, name: &str) -> Result<u32, NetNsError> {
        let link = self.link(name)?;
        link.attributes
            .into_iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(mtu) => Some(mtu),
                _ => None,
            })
            .ok_or_else(|| NetNsError::NoAttribute {
                netns: self.netns.clone(),
                interface: name.into(),
                attribute: "IFLA_MTU",
            })
    }

    /// `name`'s hardware address, as `ip link` prints it (`aa:bb:cc:dd:ee:ff`).
    pub fn mac(&self, name: &str) -> Result<String, NetNsError> {
        let link = self.link(name)?;
        link.attributes
            .into_iter()
            .find_map(|a| match a {
                LinkAttribute::Address(bytes) => Some(
                    bytes
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                ),
                _ => None,
            })
            .ok_or_else(|| NetNsError::NoAttribute {
                netns: self.netns.clone(),
                interface: name.into(),
                attribute: "IFLA_ADDRESS",
            })
    }

    /// `ip addr show dev <name>`: its addresses with their prefix lengths.
    pub fn addresses(&self, name: &str) -> Result<Vec<IpNet>, NetNsError> {
        let index = self.index(name)?;
        let messages: Vec<AddressMessage> = self
            .runtime
            .block_on(async {
                self.handle
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .execute()
                    .try_collect()
                    .await
            })
            .map_err(self.fail("RTM_GETADDR", name))?;
        Ok(messages
            .into_iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                let prefix = m.header.prefix_len;
                m.attributes.into_iter().find_map(|a| match a {
                    AddressAttribute::Address(address) => IpNet::new(address, prefix).ok(),
                    _ => None,
                })
            })
            .collect())
    }

    /// What kind of link `name` is.
    pub fn link_kind(&self, name: &str) -> Result<LinkKind, NetNsError> {
        let infos = self
            .link(name)?
            .attributes
            .into_iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => Some(infos),
                _ => None,
            })
            .unwrap_or_default();
        let mut kind = None;
        let mut vxlan = None;
        for info in infos {
            match info {
                LinkInfo::Kind(k) => kind = Some(k),
                LinkInfo::Data(InfoData::Vxlan(data)) => vxlan = Some(data),
                _ => {}
            }
        }
        Ok(match (kind, vxlan) {
            (Some(InfoKind::Vxlan), Some(data)) => {
                let mut port = 0;
                let mut external = false;
                for attribute in data {
                    match attribute {
                        InfoVxlan::Port(p) => port = p,
                        InfoVxlan::CollectMetadata(on) => external = on,
                        _ => {}
                    }
                }
                LinkKind::Vxlan { port, external }
            }
            (Some(other), _) => LinkKind::Other(other.to_string()),
            (None, _) => LinkKind::Other(String::new()),
        })
    }

    /// The link called `name`.
    fn link(&self, name: &str) -> Result<LinkMessage, NetNsError> {
        let found = self.runtime.block_on(async {
            self.handle
                .link()
                .get()
                .match_name(name)
                .execute()
                .try_next()
                .await
        });
        let missing = || NetNsError::NoInterface {
            netns: self.netns.clone(),
            interface: name.into(),
        };
        match found {
            Ok(Some(link)) => Ok(link),
            Ok(None) => Err(missing()),
            // A lookup by name of a link that does not exist is answered with ENODEV.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                Err(missing())
            }
            Err(e) => Err(self.fail("RTM_GETLINK", name)(e)),
        }
    }

    /// Every link of the namespace.
    pub fn links(&self) -> Result<Vec<Link>, NetNsError> {
        let messages: Vec<LinkMessage> = self
            .runtime
            .block_on(async { self.handle.link().get().execute().try_collect().await })
            .map_err(self.fail("RTM_GETLINK", "dump"))?;
        Ok(messages
            .into_iter()
            .map(|m| {
                let mut link = Link {
                    index: m.header.index,
                    name: String::new(),
                    alias: None,
                    controller: None,
                };
                for attribute in m.attributes {
                    match attribute {
                        LinkAttribute::IfName(name) => link.name = name,
                        LinkAttribute::IfAlias(alias) => link.alias = Some(alias),
                        LinkAttribute::Controller(index) => link.controller = Some(index),
                        _ => {}
                    }
                }
                link
            })
            .collect())
    }

    /// `ip link add <name> type veth peer name <peer> [netns <peer_netns>]`.
    pub fn add_veth(
        &self,
        name: &str,
        peer: &str,
        peer_netns: Option<&NetNs>,
    ) -> Result<(), NetNsError> {
        let mut peer_link = LinkUnspec::new_with_name(peer);
        // Held open until the request is answered: the kernel reads the fd then.
        let peer_file = match peer_netns {
            Some(ns) => {
                let file = std::fs::File::open(ns.path()).map_err(io_err("open", ns.path()))?;
                peer_link = peer_link.setns_by_fd(file.as_raw_fd());
                Some(file)
            }
            None => None,
        };
        let message = LinkVeth::new(name, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_link.build())))
            .build();
        let added = self
            .runtime
            .block_on(self.handle.link().add(message).execute());
        drop(peer_file);
        added.map_err(self.fail("RTM_NEWLINK", format!("veth {name} peer {peer}")))
    }

    /// `ip link add <name> type vxlan external dstport <port>`: a VXLAN device whose
    /// remote and VNI come with each packet (collect metadata, set by eBPF), down.
    pub fn add_vxlan_external(&self, name: &str, port: u16) -> Result<(), NetNsError> {
        // As `ip`'s `external`: no VNI of its own and no learning from received packets.
        let message = LinkMessageBuilder::<LinkVxlan>::new(name)
            .collect_metadata(true)
            .learning(false)
            .port(port)
            .down()
            .build();
        self.runtime
            .block_on(self.handle.link().add(message).execute())
            .map_err(self.fail(
                "RTM_NEWLINK",
                format!("vxlan {name} external dstport {port}"),
            ))
    }

    /// `ip link set <name> arp on|off`.
    pub fn set_arp(&self, name: &str, on: bool) -> Result<(), NetNsError> {
        let state = if on { "on" } else { "off" };
        self.set(
            LinkUnspec::new_with_name(name).arp(on).build(),
            format!("{name} arp {state}"),
        )
    }

    /// `ip link add <name> type bridge` (down, like `ip` leaves it).
    pub fn add_bridge(&self, name: &str) -> Result<(), NetNsError> {
        let message = LinkBridge::new(name).down().build();
        self.runtime
            .block_on(self.handle.link().add(message).execute())
            .map_err(self.fail("RTM_NEWLINK", format!("bridge {name}")))
    }

    /// `ip link set <link> master <bridge>`.
    pub fn set_controller(&self, link: &str, bridge: &str) -> Result<(), NetNsError> {
        let controller = self.index(bridge)?;
        self.set(
            LinkUnspec::new_with_name(link)
                .controller(controller)
                .build(),
            format!("{link} master {bridge}"),
        )
    }

    /// `ip link del <name>` (a veth takes its peer with it).
    pub fn delete_link(&self, name: &str) -> Result<(), NetNsError> {
        let message = LinkUnspec::new_with_name(name).build();
        self.runtime
            .block_on(self.handle.link().del_with_message(message).execute())
            .map_err(self.fail("RTM_DELLINK", name))
    }

    /// `ip link set <name> up`.
    pub fn set_up(&self, name: &str) -> Result<(), NetNsError> {
        self.set(
            LinkUnspec::new_with_name(name).up().build(),
            format!("{name} up"),
        )
    }

    /// `ip link set <name> down`.
    pub fn set_down(&self, name: &str) -> Result<(), NetNsError> {
        self.set(
            LinkUnspec::new_with_name(name).down().build(),
            format!("{name} down"),
        )
    }

    /// `ip link set <name> mtu <mtu>`.
    pub fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), NetNsError> {
        self.set(
            LinkUnspec::new_with_name(name).mtu(mtu).build(),
            format!("{name} mtu {mtu}"),
        )
    }

    /// `ip link set <name> alias <alias>`.
    pub fn set_alias(&self, name: &str, alias: &str) -> Result<(), NetNsError> {
        self.set(
            LinkUnspec::new_with_name(name).alias(alias).build(),
            format!("{name} alias {alias}"),
        )
    }

    /// RTM_SETLINK addressed by name (the kernel looks the name up when the index is 0).
    fn set(&self, message: LinkMessage, what: String) -> Result<(), NetNsError> {
        self.runtime
            .block_on(self.handle.link().set(message).execute())
            .map_err(self.fail("RTM_SETLINK", what))
    }

    /// `ip addr add <address> dev <device>`.
    pub fn add_address(&self, device: &str, address: IpNet) -> Result<(), NetNsError> {
        let index = self.index(device)?;
        let request = self
            .handle
            .address()
            .add(index, address.addr(), address.prefix_len());
        self.runtime
            .block_on(request.execute())
            .map_err(self.fail("RTM_NEWADDR", format!("{address} dev {device}")))
    }
}
