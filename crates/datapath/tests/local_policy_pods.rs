//! externalTrafficPolicy Local from inside the cluster, through BPF_PROG_TEST_RUN (needs
//! root; never skipped): a pod reaching an external frontend with traffic policy Local is
//! balanced over the frontend's cluster-wide slots (LB4_SCOPE_INTERNAL), as kube-proxy's
//! KUBE-EXT chain sends cluster traffic on to the Service's KUBE-SVC chain, even on a node
//! without a local backend; a client outside the cluster is still refused there.
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddrV4};

use sluice_common::{
    DropReason, IPPROTO_TCP, IPPROTO_UDP, LB4_SCOPE_INTERNAL, Lb4Key, Lb4Service,
    METRIC_DIR_EGRESS, METRIC_DIR_INGRESS, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_LOCAL,
    SVC_FLAG_TWO_SCOPES,
    programs::{FROM_CONTAINER, FROM_NETDEV},
};
use sluice_datapath::{Datapath, PinnedMaps};
use support::{Frame, PinDir, TC_ACT_OK, TCP_SYN, run, tcp, udp};

const LB_VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const PORT: u16 = 80;
/// A backend on another node: the only one, so this node has no local backend.
const REMOTE_BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 9, 2), 8080);
const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const WORLD: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

struct Fixture {
    datapath: Datapath,
    maps: PinnedMaps,
    _pins: PinDir,
}

impl Fixture {
    /// The load balancer frontend of `proto` with traffic policy Local on a node without
    /// a local backend: no slot in the default scope, and the remote backend in the
    /// internal scope beside it.
    fn new(proto: u8) -> Self {
        let (pins, datapath) = support::load();
        let mut maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
        let key = Lb4Key::new(LB_VIP, PORT, proto, 0);
        let flags = SVC_FLAG_LOAD_BALANCER | SVC_FLAG_LOCAL | SVC_FLAG_TWO_SCOPES;
        let cluster = key.in_scope(LB4_SCOPE_INTERNAL);
        let slot = Lb4Key { slot: 1, ..cluster };
        let backend = Lb4Service::slot(*REMOTE_BACKEND.ip(), REMOTE_BACKEND.port());
        maps.services.insert(slot, backend, 0).unwrap();
        support::add_backend(&mut maps, REMOTE_BACKEND, proto);
        let frontend = Lb4Service::frontend(1, SVC_FLAG_LOAD_BALANCER);
        maps.services.insert(cluster, frontend, 0).unwrap();
        maps.services
            .insert(key, Lb4Service::frontend(0, flags), 0)
            .unwrap();
        Self {
            datapath,
            maps,
            _pins: pins,
        }
    }

    fn run(&mut self, program: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        let out = run(self.datapath.program(program).unwrap(), packet);
        (out.verdict, out.packet)
    }

    fn no_service(&self, direction: u32) -> u64 {
        let reason = DropReason::NoService.code();
        self.maps.counted(reason, direction).unwrap().packets
    }
}

fn lb() -> SocketAddrV4 {
    SocketAddrV4::new(LB_VIP, PORT)
}

#[test]
fn pods_reach_a_local_external_frontend_through_its_cluster_wide_slots() {
    let mut fx = Fixture::new(IPPROTO_TCP);
    for port in [40000, 40001, 40002] {
        let client = SocketAddrV4::new(POD, port);
        let (verdict, packet) = fx.run(FROM_CONTAINER, &tcp(client, lb(), TCP_SYN, b""));
        assert_eq!(verdict, TC_ACT_OK, "{client}: balanced, not refused");
        let frame = Frame(&packet);
        assert_eq!(frame.dst(), REMOTE_BACKEND, "{client}");
        assert_eq!(frame.src(), client, "a pod's source stays as it is");
        frame.assert_checksums();
    }
    assert_eq!(fx.no_service(METRIC_DIR_EGRESS), 0);

    // UDP alike.
    let mut fx = Fixture::new(IPPROTO_UDP);
    let client = SocketAddrV4::new(POD, 5000);
    let (verdict, packet) = fx.run(FROM_CONTAINER, &udp(client, lb(), b"query"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(Frame(&packet).dst(), REMOTE_BACKEND);
}

#[test]
fn clients_outside_the_cluster_are_still_refused_without_a_local_backend() {
    let mut fx = Fixture::new(IPPROTO_TCP);
    let world = SocketAddrV4::new(WORLD, 40000);
    let (verdict, packet) = fx.run(FROM_NETDEV, &tcp(world, lb(), TCP_SYN, b""));
    assert_ne!(verdict, TC_ACT_OK, "refused, not passed on");
    assert_ne!(
        Frame(&packet).dst(),
        REMOTE_BACKEND,
        "never sent to the cluster-wide backend"
    );
    assert_eq!(fx.no_service(METRIC_DIR_INGRESS), 1);
}

#[test]
fn without_the_internal_slots_the_local_ones_serve_pods_too() {
    // While the realizer has not written the internal frontend (or is removing it).
    let mut fx = Fixture::new(IPPROTO_TCP);
    let internal = Lb4Key::new(LB_VIP, PORT, IPPROTO_TCP, 0).in_scope(LB4_SCOPE_INTERNAL);
    fx.maps.services.remove(&internal).unwrap();
    let client = SocketAddrV4::new(POD, 40000);
    let (verdict, _) = fx.run(FROM_CONTAINER, &tcp(client, lb(), TCP_SYN, b""));
    assert_ne!(verdict, TC_ACT_OK, "no local backend: refused");
    assert_eq!(fx.no_service(METRIC_DIR_EGRESS), 1);
}
