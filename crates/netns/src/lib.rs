//! Network namespaces and what lives in them: veth pairs, bridges, addresses, routes, link
//! state and MTU over rtnetlink; sysctls; transmit checksum offload; code and processes run
//! inside a namespace; the cgroup v2 directories that hold a node's processes. One place
//! for the lab, the benchmark, the tests and the CNI plugin, instead of each
//! running `ip`, `sysctl`, `ethtool` and `nsenter` and entering namespaces by hand.
//!
//! Namespaces are named under /run/netns exactly as `ip netns add` names them, so `ip netns`
//! and every other tool sees them; nothing here changes the caller's own namespace.

mod cgroup;
mod error;
mod guest;
mod link;
mod multipath;
mod ns;
mod offload;
mod route;
mod sockets;
mod sysctl;

pub use cgroup::{Cgroup, CgroupRefusal, OwnedCgroup, cgroup2_root};
pub use error::NetNsError;
pub use guest::{Guest, ROUTER_INTERFACE, add_router_interface, wire_guest};
pub use ipnet::{IpNet, Ipv4Net};
pub use link::{Link, LinkKind, Netlink};
pub use multipath::{MultipathEntry, MultipathRoute};
pub use ns::{NETNS_DIR, NetNs, NsThread, OwnedNetNs, orphans, reap_orphans, unique_name};
pub use route::{Route, RouteEntry};
pub use sockets::{ConnectedUdp, connected_udp4, destroy_udp4};
