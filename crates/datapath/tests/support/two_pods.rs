//! One node and two pods, a client and a backend behind a ClusterIP, with the datapath
//! attached to both pods' veths and kept loaded, so a test can read its programs'
//! statistics and maps:
//!
//! ```text
//! client netns  eth0 10.0.1.2/24 ─veth─ lxc-c 10.0.1.1 ┐
//! backend netns eth0 10.0.2.2/24 ─veth─ lxc-b 10.0.2.1 ┴ node netns (forwarding, programs on lxc-*)
//! ```
// Test set-up: a failed step panics with its cause, which is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::lpm_trie::Key;
use sluice_common::{
    ENDPOINT_F_EGRESS_ENFORCED, ENDPOINT_F_INGRESS_ENFORCED, EndpointInfo, IDENTITY_ANY,
    IDENTITY_HOST, IDENTITY_WORLD, IPPROTO_TCP, IpcacheEntry, POLICY_EGRESS, POLICY_INGRESS,
    PolicyKey, addr_be,
    programs::{FROM_CONTAINER, TO_CONTAINER},
};
use sluice_datapath::{AttachRole, Datapath, DatapathConfig, PinnedMaps};
use sluice_netns::{Ipv4Net, Route};

use super::{NetNs, PinDir};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
pub const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
pub const WEB: SocketAddrV4 = SocketAddrV4::new(BACKEND, 8080);
pub const CLIENT_IDENTITY: u32 = 300;
pub const BACKEND_IDENTITY: u32 = 301;

/// The node and its two pods.
pub struct TwoPods {
    pub client: NetNs,
    pub backend: NetNs,
    pub datapath: Datapath,
    pub maps: PinnedMaps,
    // Removing the pins detaches the programs and releases the maps.
    pub pins: PinDir,
    pub node: NetNs,
}

impl TwoPods {
    pub fn new(config: DatapathConfig) -> Self {
        let node = NetNs::new();
        let client = NetNs::new();
        let backend = NetNs::new();
        node.ns()
            .set_sysctls(&[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ])
            .unwrap();
        let on_node = node.netlink();
        for (pod, lxc, subnet) in [(&client, "lxc-c", 1), (&backend, "lxc-b", 2)] {
            let gateway = Ipv4Addr::new(10, 0, subnet, 1);
            let in_pod = pod.netlink();
            on_node.add_veth(lxc, "eth0", Some(pod.ns())).unwrap();
            on_node
                .add_address(lxc, Ipv4Net::new(gateway, 24).unwrap().into())
                .unwrap();
            on_node.set_up(lxc).unwrap();
            let address = Ipv4Net::new(Ipv4Addr::new(10, 0, subnet, 2), 24).unwrap();
            in_pod.add_address("eth0", address.into()).unwrap();
            in_pod.set_up("eth0").unwrap();
            in_pod.add_route(&Route::default_via(gateway)).unwrap();
        }
        let pins = PinDir::unique("sluice-test-");
        let pin_dir = pins.path().to_owned();
        let datapath = node.run(move || {
            let mut datapath = Datapath::load(&pin_dir, &config).expect("load");
            for lxc in ["lxc-c", "lxc-b"] {
                datapath
                    .attach(AttachRole::PodVeth, lxc)
                    .unwrap_or_else(|e| panic!("attach {lxc}: {e}"));
            }
            datapath
        });
        let maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
        let mut topo = Self {
            client,
            backend,
            datapath,
            maps,
            pins,
            node,
        };
        topo.add_endpoints();
        topo
    }

    pub fn ifindex(&self, lxc: &'static str) -> u32 {
        self.node
            .run(move || nix::net::if_::if_nametoindex(lxc))
            .unwrap_or_else(|err| panic!("if_nametoindex {lxc}: {err}"))
    }

    /// Both pods as endpoints with both directions enforced, each admitting any peer (the
    /// common case once policy is in use), the ipcache as the realizer writes it, and
    /// the ClusterIP with the backend.
    fn add_endpoints(&mut self) {
        let enforced = ENDPOINT_F_INGRESS_ENFORCED | ENDPOINT_F_EGRESS_ENFORCED;
        for (lxc, address, identity) in [
            ("lxc-c", CLIENT, CLIENT_IDENTITY),
            ("lxc-b", BACKEND, BACKEND_IDENTITY),
        ] {
            let ifindex = self.ifindex(lxc);
            let mut endpoint = EndpointInfo::new(address, identity);
            endpoint.flags = enforced;
            self.maps.endpoints.insert(ifindex, endpoint, 0).unwrap();
            super::install_policy(
                &mut self.maps,
                ifindex,
                &[
                    PolicyKey::any(IDENTITY_ANY, POLICY_INGRESS),
                    PolicyKey::any(IDENTITY_ANY, POLICY_EGRESS),
                ],
            );
        }
        for (address, prefixlen, identity) in [
            (CLIENT, 32, CLIENT_IDENTITY),
            (BACKEND, 32, BACKEND_IDENTITY),
            (Ipv4Addr::new(10, 0, 1, 1), 32, IDENTITY_HOST),
            (Ipv4Addr::new(10, 0, 2, 1), 32, IDENTITY_HOST),
            (Ipv4Addr::UNSPECIFIED, 0, IDENTITY_WORLD),
        ] {
            self.maps
                .ipcache
                .insert(
                    &Key::new(prefixlen, addr_be(address)),
                    IpcacheEntry::local(identity),
                    0,
                )
                .unwrap();
        }
        super::add_service(&mut self.maps, VIP, IPPROTO_TCP, &[WEB]);
    }

    /// Cumulative (run time ns, run count) of from_container and to_container.
    pub fn run_stats(&mut self) -> [(u64, u64); 2] {
        [FROM_CONTAINER, TO_CONTAINER].map(|name| {
            let info = self.datapath.program_info(name).expect("program info");
            (info.run_time().as_nanos() as u64, info.run_count())
        })
    }
}
