//! The programs run on crafted packets through BPF_PROG_TEST_RUN (needs root; never
//! skipped). Every test loads its own datapath into its own pin dir.
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddrV4};

use sluice_common::{
    CT_EGRESS, CT_FLAG_CLOSING, CT_FLAG_LOOPBACK, CT_FLAG_SEEN_REPLY, CT_INGRESS, CT_SERVICE,
    Ct4Entry, Ct4Key, DropReason, IPPROTO_TCP, IPPROTO_UDP, LOOPBACK_IPV4, Lb4BackendKey, Lb4Key,
    Lb4Service, METRIC_DIR_EGRESS, METRIC_DIR_INGRESS, MetricsValue, SVC_FLAG_CLUSTER_IP,
    programs::{FROM_CONTAINER, TO_CONTAINER},
};
use sluice_datapath::{Datapath, PinnedMaps};
use support::{
    ETH_HLEN, Frame, IPPROTO_ICMP, NODE_MAC, POD_MAC, PinDir, RunResult, TC_ACT_OK,
    TC_ACT_REDIRECT, TC_ACT_SHOT, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, run, tcp, udp,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND_1: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 8080);
const BACKEND_2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 3, 2), 8080);
const NS_PER_SEC: u64 = 1_000_000_000;

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT, port)
}

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

/// A loaded datapath in its own pin dir, with the pinned maps open.
struct Fixture {
    datapath: Datapath,
    maps: PinnedMaps,
    _pins: PinDir,
}

impl Fixture {
    fn new() -> Self {
        let (pins, datapath) = support::load();
        let maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
        Self {
            datapath,
            maps,
            _pins: pins,
        }
    }

    fn add_service(&mut self, frontend: SocketAddrV4, proto: u8, backends: &[SocketAddrV4]) {
        support::add_service(&mut self.maps, frontend, proto, backends);
    }

    fn add_backend(&mut self, backend: SocketAddrV4, proto: u8) {
        support::add_backend(&mut self.maps, backend, proto);
    }

    fn run_from_container(&mut self, packet: &[u8]) -> RunResult {
        run(self.datapath.program(FROM_CONTAINER).unwrap(), packet)
    }

    fn run_to_container(&mut self, packet: &[u8]) -> RunResult {
        run(self.datapath.program(TO_CONTAINER).unwrap(), packet)
    }

    fn ct(&self, src: SocketAddrV4, dst: SocketAddrV4, proto: u8, scope: u8) -> Option<Ct4Entry> {
        let key = Ct4Key::new(
            (*src.ip(), src.port()),
            (*dst.ip(), dst.port()),
            proto,
            scope,
        );
        self.maps.conntrack.get(&key, 0).ok()
    }

    fn set_ct(
        &mut self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        proto: u8,
        scope: u8,
        entry: Ct4Entry,
    ) {
        let key = Ct4Key::new(
            (*src.ip(), src.port()),
            (*dst.ip(), dst.port()),
            proto,
            scope,
        );
        self.maps.conntrack.insert(key, entry, 0).unwrap();
    }

    /// Packets and bytes counted for `reason` in `dir`, summed over CPUs.
    fn metric(&self, reason: u8, dir: u32) -> MetricsValue {
        self.maps.counted(reason, dir).unwrap()
    }

    /// The backend a TCP packet from `src` to the VIP is sent to.
    fn tcp_backend(&mut self, src: SocketAddrV4, flags: u8) -> SocketAddrV4 {
        let out = self.run_from_container(&tcp(src, vip(80), flags, b""));
        assert_eq!(out.verdict, TC_ACT_OK);
        Frame(&out.packet).dst()
    }
}

/// CLOCK_MONOTONIC, the clock bpf_ktime_get_ns reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * NS_PER_SEC + ts.tv_nsec as u64
}

#[test]
fn dnat_tcp_syn_to_the_backend() {
    let mut fx = Fixture::new();
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_1]);

    let syn = tcp(client(40000), vip(80), TCP_SYN, b"");
    let out = fx.run_from_container(&syn);
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.packet.len(), syn.len());
    let frame = Frame(&out.packet);
    assert_eq!(frame.src(), client(40000));
    assert_eq!(frame.dst(), BACKEND_1);
    assert_eq!((frame.eth_src(), frame.eth_dst()), (POD_MAC, NODE_MAC));
    frame.assert_checksums();

    let service = fx
        .ct(client(40000), vip(80), IPPROTO_TCP, CT_SERVICE)
        .expect("CT_SERVICE");
    assert_eq!(service.nat(), Some((*BACKEND_1.ip(), BACKEND_1.port())));
    assert_eq!(service.packets, 1);
    assert_eq!(service.bytes, syn.len() as u64);
    assert_eq!(service.tcp_flags_seen, TCP_SYN);
    assert_eq!(service.ifindex, 1, "lo, the test run's device");
    assert!(service.created_ns > 0 && service.created_ns == service.last_seen_ns);

    let egress = fx
        .ct(client(40000), BACKEND_1, IPPROTO_TCP, CT_EGRESS)
        .expect("CT_EGRESS");
    assert_eq!(egress.nat(), Some((VIP, 80)));
    assert_eq!(egress.flags & CT_FLAG_LOOPBACK, 0);

    let forwarded = fx.metric(0, METRIC_DIR_EGRESS);
    assert_eq!(forwarded.packets, 1);
    assert_eq!(forwarded.bytes, syn.len() as u64);
}

#[test]
fn dnat_udp_datagram_to_the_backend() {
    let mut fx = Fixture::new();
    let dns = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 3), 5353);
    fx.add_service(vip(53), IPPROTO_UDP, &[dns]);

    let query = udp(client(50000), vip(53), b"a DNS query, more or less");
    let out = fx.run_from_container(&query);
    assert_eq!(out.verdict, TC_ACT_OK);
    let frame = Frame(&out.packet);
    assert_eq!(frame.src(), client(50000));
    assert_eq!(frame.dst(), dns);
    frame.assert_checksums();

    // A datagram without checksum keeps none after translation.
    let mut unchecked = udp(client(50001), vip(53), b"no checksum");
    unchecked[ETH_HLEN + 20 + 6..ETH_HLEN + 20 + 8].fill(0);
    let out = fx.run_from_container(&unchecked);
    assert_eq!(out.verdict, TC_ACT_OK);
    let frame = Frame(&out.packet);
    assert_eq!(frame.dst(), dns);
    assert_eq!(&frame.l4()[6..8], &[0, 0]);
}

#[test]
fn service_conntrack_keeps_the_backend() {
    let mut fx = Fixture::new();
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_1, BACKEND_2]);

    let chosen = fx.tcp_backend(client(40001), TCP_SYN);
    for _ in 0..32 {
        assert_eq!(fx.tcp_backend(client(40001), TCP_ACK | TCP_PSH), chosen);
    }
    let service = fx
        .ct(client(40001), vip(80), IPPROTO_TCP, CT_SERVICE)
        .unwrap();
    assert_eq!(service.packets, 33);
    assert_eq!(service.tcp_flags_seen, TCP_SYN | TCP_ACK | TCP_PSH);
    assert_eq!(service.flags & CT_FLAG_CLOSING, 0);

    // FIN marks the connection closing; it still goes to its backend.
    assert_eq!(fx.tcp_backend(client(40001), TCP_FIN | TCP_ACK), chosen);
    let service = fx
        .ct(client(40001), vip(80), IPPROTO_TCP, CT_SERVICE)
        .unwrap();
    assert_ne!(service.flags & CT_FLAG_CLOSING, 0);
}

#[test]
fn reply_is_rev_natted_to_the_frontend() {
    let mut fx = Fixture::new();
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_1]);
    assert_eq!(fx.tcp_backend(client(40002), TCP_SYN), BACKEND_1);

    let synack = tcp(BACKEND_1, client(40002), TCP_SYN | TCP_ACK, b"");
    let out = fx.run_to_container(&synack);
    assert_eq!(out.verdict, TC_ACT_OK);
    let frame = Frame(&out.packet);
    assert_eq!(frame.src(), vip(80));
    assert_eq!(frame.dst(), client(40002));
    frame.assert_checksums();

    let egress = fx
        .ct(client(40002), BACKEND_1, IPPROTO_TCP, CT_EGRESS)
        .unwrap();
    assert_ne!(egress.flags & CT_FLAG_SEEN_REPLY, 0);
    assert_eq!(egress.packets, 2);
    assert_eq!(fx.metric(0, METRIC_DIR_INGRESS).packets, 1);

    // A UDP reply with payload, the other checksum layout.
    let dns = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 3), 5353);
    fx.add_service(vip(53), IPPROTO_UDP, &[dns]);
    assert_eq!(
        fx.run_from_container(&udp(client(50002), vip(53), b"q"))
            .verdict,
        TC_ACT_OK
    );
    let out = fx.run_to_container(&udp(dns, client(50002), b"an answer"));
    let frame = Frame(&out.packet);
    assert_eq!(frame.src(), vip(53));
    frame.assert_checksums();
}

#[test]
fn replies_keep_the_backend_choice_alive() {
    let mut fx = Fixture::new();
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_1]);
    fx.tcp_backend(client(40003), TCP_SYN);
    let mut service = fx
        .ct(client(40003), vip(80), IPPROTO_TCP, CT_SERVICE)
        .unwrap();
    service.last_seen_ns = 1;
    fx.set_ct(client(40003), vip(80), IPPROTO_TCP, CT_SERVICE, service);

    let out = fx.run_to_container(&tcp(BACKEND_1, client(40003), TCP_ACK, b"data"));
    assert_eq!(out.verdict, TC_ACT_OK);
    let service = fx
        .ct(client(40003), vip(80), IPPROTO_TCP, CT_SERVICE)
        .unwrap();
    assert!(service.last_seen_ns > 1);
}

fn assert_port_unreachable(original: &[u8], out: &RunResult) {
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(out.packet.len(), ETH_HLEN + 20 + 8 + 28);
    let frame = Frame(&out.packet);
    assert_eq!((frame.eth_src(), frame.eth_dst()), (NODE_MAC, POD_MAC));
    assert_eq!(frame.proto(), IPPROTO_ICMP);
    assert_eq!(frame.ihl(), 20);
    assert_eq!(frame.tot_len(), 20 + 8 + 28);
    let original = Frame(original);
    assert_eq!(frame.src_ip(), original.dst_ip());
    assert_eq!(frame.dst_ip(), original.src_ip());
    let icmp = frame.l4();
    assert_eq!((icmp[0], icmp[1]), (3, 3), "destination / port unreachable");
    assert_eq!(&icmp[4..8], &[0; 4]);
    assert_eq!(&icmp[8..28], &original.ip()[..20], "quotes the IP header");
    assert_eq!(&icmp[28..36], &original.l4()[..8], "quotes 8 bytes of L4");
    frame.assert_checksums();
}

#[test]
fn service_without_backends_is_rejected_with_icmp() {
    let mut fx = Fixture::new();
    fx.add_service(vip(80), IPPROTO_TCP, &[]);
    fx.add_service(vip(53), IPPROTO_UDP, &[]);

    // A 54-byte SYN grows into the 70-byte ICMP message...
    let syn = tcp(client(40004), vip(80), TCP_SYN, b"");
    let out = fx.run_from_container(&syn);
    assert_port_unreachable(&syn, &out);

    // ...and a large datagram shrinks into it.
    let big = udp(client(50003), vip(53), &[0x5a; 900]);
    let out = fx.run_from_container(&big);
    assert_port_unreachable(&big, &out);

    let rejected = fx.metric(DropReason::NoService.code(), METRIC_DIR_EGRESS);
    assert_eq!(rejected.packets, 2);
    assert_eq!(rejected.bytes, (syn.len() + big.len()) as u64);
    assert!(
        fx.ct(client(40004), vip(80), IPPROTO_TCP, CT_SERVICE)
            .is_none()
    );
}

#[test]
fn unknown_port_on_a_known_vip_is_dropped() {
    let mut fx = Fixture::new();
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_1]);

    let out = fx.run_from_container(&tcp(client(40005), vip(81), TCP_SYN, b""));
    assert_eq!(out.verdict, TC_ACT_SHOT);
    // Same port, other protocol: not a frontend either.
    let out = fx.run_from_container(&udp(client(40005), vip(80), b"x"));
    assert_eq!(out.verdict, TC_ACT_SHOT);

    let dropped = fx.metric(DropReason::ServicePortUnknown.code(), METRIC_DIR_EGRESS);
    assert_eq!(dropped.packets, 2);
    assert_eq!(fx.metric(0, METRIC_DIR_EGRESS).packets, 0);
}

#[test]
fn missing_backend_slot_is_dropped() {
    let mut fx = Fixture::new();
    // The frontend claims two backends but only slot 1 exists.
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_1]);
    fx.maps
        .services
        .insert(
            Lb4Key::new(VIP, 80, IPPROTO_TCP, 0),
            Lb4Service::frontend(2, SVC_FLAG_CLUSTER_IP),
            0,
        )
        .unwrap();
    let mut dropped = 0;
    for port in 41000..41064 {
        let out = fx.run_from_container(&tcp(client(port), vip(80), TCP_SYN, b""));
        if out.verdict == TC_ACT_SHOT {
            dropped += 1;
        } else {
            assert_eq!(Frame(&out.packet).dst(), BACKEND_1);
        }
    }
    assert!(dropped > 0);
    let metric = fx.metric(DropReason::NoBackendSlot.code(), METRIC_DIR_EGRESS);
    assert_eq!(metric.packets, dropped);
}

#[test]
fn a_slot_whose_backend_is_gone_is_dropped_and_counted() {
    let mut fx = Fixture::new();
    // Slot 2 names backend 2, which lb4_backends no longer holds: a dangling slot, what
    // the realizer's write order (backends before slots, removed after them) rules out.
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_1, BACKEND_2]);
    fx.maps
        .backends
        .remove(&Lb4BackendKey::new(
            *BACKEND_2.ip(),
            BACKEND_2.port(),
            IPPROTO_TCP,
        ))
        .unwrap();
    let mut dropped = 0;
    for port in 41100..41164 {
        let out = fx.run_from_container(&tcp(client(port), vip(80), TCP_SYN, b""));
        if out.verdict == TC_ACT_SHOT {
            dropped += 1;
        } else {
            assert_eq!(Frame(&out.packet).dst(), BACKEND_1);
        }
    }
    assert!(dropped > 0);
    let metric = fx.metric(DropReason::SlotBackendMissing.code(), METRIC_DIR_EGRESS);
    assert_eq!(metric.packets, dropped);
}

#[test]
fn hairpin_goes_through_the_loopback_address_and_back() {
    let mut fx = Fixture::new();
    let own = SocketAddrV4::new(CLIENT, 8080);
    fx.add_service(vip(80), IPPROTO_TCP, &[own]);

    // The pod connects to its own service: source becomes the loopback address.
    let out = fx.run_from_container(&tcp(client(40006), vip(80), TCP_SYN, b""));
    assert_eq!(out.verdict, TC_ACT_OK);
    let frame = Frame(&out.packet);
    assert_eq!(frame.src(), SocketAddrV4::new(LOOPBACK_IPV4, 40006));
    assert_eq!(frame.dst(), own);
    frame.assert_checksums();
    let egress = fx
        .ct(
            SocketAddrV4::new(LOOPBACK_IPV4, 40006),
            own,
            IPPROTO_TCP,
            CT_EGRESS,
        )
        .unwrap();
    assert_eq!(egress.nat(), Some((VIP, 80)));
    assert_ne!(egress.flags & CT_FLAG_LOOPBACK, 0);

    // The node routes it back into the pod: an inbound connection there.
    let translated = out.packet.clone();
    assert_eq!(fx.run_to_container(&translated).verdict, TC_ACT_OK);
    assert!(
        fx.ct(
            SocketAddrV4::new(LOOPBACK_IPV4, 40006),
            own,
            IPPROTO_TCP,
            CT_INGRESS
        )
        .is_some()
    );

    // The pod answers the loopback address: turned around into the pod as the VIP.
    let synack = tcp(
        own,
        SocketAddrV4::new(LOOPBACK_IPV4, 40006),
        TCP_SYN | TCP_ACK,
        b"",
    );
    let out = fx.run_from_container(&synack);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let frame = Frame(&out.packet);
    assert_eq!(frame.src(), vip(80));
    assert_eq!(frame.dst(), client(40006));
    assert_eq!((frame.eth_src(), frame.eth_dst()), (NODE_MAC, POD_MAC));
    frame.assert_checksums();

    // On its way into the pod it is recognised as the reply it is, and left alone.
    let reply = out.packet.clone();
    let out = fx.run_to_container(&reply);
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.packet, reply);
    let service = fx
        .ct(client(40006), vip(80), IPPROTO_TCP, CT_SERVICE)
        .unwrap();
    assert_ne!(service.flags & CT_FLAG_SEEN_REPLY, 0);
}

#[test]
fn pure_syn_on_a_reused_port_selects_again() {
    let mut fx = Fixture::new();
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_1, BACKEND_2]);

    let first = fx.tcp_backend(client(40007), TCP_SYN);
    let other = if first == BACKEND_1 {
        BACKEND_2
    } else {
        BACKEND_1
    };
    // The slots change places: the flow's hash now gives the slot that holds `other`.
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_2, BACKEND_1]);
    // Until the connection closes, a SYN is a retransmission and keeps its backend.
    for _ in 0..16 {
        assert_eq!(fx.tcp_backend(client(40007), TCP_SYN), first);
    }
    // After a FIN, a pure SYN is a new connection on a reused port: chosen again.
    fx.tcp_backend(client(40007), TCP_FIN | TCP_ACK);
    assert_eq!(fx.tcp_backend(client(40007), TCP_SYN), other);
    assert_eq!(fx.tcp_backend(client(40007), TCP_ACK), other);
    let service = fx
        .ct(client(40007), vip(80), IPPROTO_TCP, CT_SERVICE)
        .unwrap();
    assert_eq!(service.nat(), Some((*other.ip(), other.port())));
}

#[test]
fn an_entry_stamped_by_a_cpu_whose_clock_runs_ahead_is_not_expired() {
    let mut fx = Fixture::new();
    fx.run_from_container(&tcp(client(40021), BACKEND_1, TCP_SYN, b""));
    let key = Ct4Key::new(
        (CLIENT, 40021),
        (*BACKEND_1.ip(), BACKEND_1.port()),
        IPPROTO_TCP,
        CT_EGRESS,
    );
    let mut entry = fx.maps.conntrack.get(&key, 0).unwrap();
    // Another CPU's reply stamped the entry a little "later" than this CPU's clock reads.
    entry.last_seen_ns = monotonic_ns() + 1_000_000_000;
    fx.maps.conntrack.insert(key, entry, 0).unwrap();

    fx.run_from_container(&tcp(client(40021), BACKEND_1, TCP_ACK, b""));
    let after = fx.maps.conntrack.get(&key, 0).unwrap();
    assert_eq!(
        after.created_ns, entry.created_ns,
        "the entry was kept, not made anew"
    );
    assert_eq!(after.packets, entry.packets + 1);
}

#[test]
fn a_stray_rst_passes_but_opens_no_connection() {
    let mut fx = Fixture::new();
    let out = fx.run_from_container(&tcp(client(40020), BACKEND_1, TCP_RST | TCP_ACK, b""));
    assert_eq!(out.verdict, TC_ACT_OK);
    assert!(
        fx.ct(client(40020), BACKEND_1, IPPROTO_TCP, CT_EGRESS)
            .is_none()
    );
}

#[test]
fn direct_connection_reusing_a_service_tuple_is_not_rev_natted() {
    let mut fx = Fixture::new();
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_1]);
    fx.tcp_backend(client(40008), TCP_SYN);

    // Later the client connects straight to the backend from the same port.
    let out = fx.run_from_container(&tcp(client(40008), BACKEND_1, TCP_SYN, b""));
    assert_eq!(out.verdict, TC_ACT_OK);
    let egress = fx
        .ct(client(40008), BACKEND_1, IPPROTO_TCP, CT_EGRESS)
        .unwrap();
    assert_eq!(egress.nat(), None);

    let out = fx.run_to_container(&tcp(BACKEND_1, client(40008), TCP_SYN | TCP_ACK, b""));
    assert_eq!(Frame(&out.packet).src(), BACKEND_1);
}

#[test]
fn removed_backend_is_not_reused() {
    let mut fx = Fixture::new();
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_1]);
    assert_eq!(fx.tcp_backend(client(40009), TCP_SYN), BACKEND_1);

    // The service moves to backend 2 while backend 1 still exists: the connection stays.
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_2]);
    assert_eq!(fx.tcp_backend(client(40009), TCP_ACK), BACKEND_1);

    // Backend 1 is removed: the connection moves.
    fx.maps
        .backends
        .remove(&Lb4BackendKey::new(
            *BACKEND_1.ip(),
            BACKEND_1.port(),
            IPPROTO_TCP,
        ))
        .unwrap();
    assert_eq!(fx.tcp_backend(client(40009), TCP_ACK), BACKEND_2);
    let service = fx
        .ct(client(40009), vip(80), IPPROTO_TCP, CT_SERVICE)
        .unwrap();
    assert_eq!(service.nat(), Some((*BACKEND_2.ip(), BACKEND_2.port())));
}

#[test]
fn expired_service_entries_select_again() {
    let mut fx = Fixture::new();
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_1]);
    fx.add_service(vip(53), IPPROTO_UDP, &[BACKEND_1]);
    // A backend that exists but is in no slot: only an existing entry can lead there.
    let pinned = SocketAddrV4::new(Ipv4Addr::new(10, 0, 9, 9), 8080);
    fx.add_backend(pinned, IPPROTO_TCP);
    fx.add_backend(pinned, IPPROTO_UDP);
    let now = monotonic_ns();
    let entry = |age_s: u64, flags: u8| {
        let last_seen_ns = now
            .checked_sub(age_s * NS_PER_SEC)
            .expect("the machine has been up for longer than the ages used here");
        Ct4Entry {
            created_ns: last_seen_ns,
            last_seen_ns,
            nat_address: sluice_common::addr_be(*pinned.ip()),
            nat_port: pinned.port().to_be(),
            flags,
            ..Ct4Entry::default()
        }
    };
    let udp_to = |fx: &mut Fixture| {
        let out = fx.run_from_container(&udp(client(50004), vip(53), b"x"));
        Frame(&out.packet).dst()
    };

    // UDP: 60 s.
    fx.set_ct(
        client(50004),
        vip(53),
        IPPROTO_UDP,
        CT_SERVICE,
        entry(30, 0),
    );
    assert_eq!(udp_to(&mut fx), pinned);
    fx.set_ct(
        client(50004),
        vip(53),
        IPPROTO_UDP,
        CT_SERVICE,
        entry(61, 0),
    );
    assert_eq!(udp_to(&mut fx), BACKEND_1);

    // TCP: 60 s before a reply (SYN), hours once established (well past the UDP
    // lifetime), 10 s once closing.
    fx.set_ct(
        client(40010),
        vip(80),
        IPPROTO_TCP,
        CT_SERVICE,
        entry(100, CT_FLAG_SEEN_REPLY),
    );
    assert_eq!(fx.tcp_backend(client(40010), TCP_ACK), pinned);
    fx.set_ct(
        client(40011),
        vip(80),
        IPPROTO_TCP,
        CT_SERVICE,
        entry(30, 0),
    );
    assert_eq!(fx.tcp_backend(client(40011), TCP_SYN), pinned);
    fx.set_ct(
        client(40011),
        vip(80),
        IPPROTO_TCP,
        CT_SERVICE,
        entry(61, 0),
    );
    assert_eq!(fx.tcp_backend(client(40011), TCP_SYN), BACKEND_1);
    fx.set_ct(
        client(40010),
        vip(80),
        IPPROTO_TCP,
        CT_SERVICE,
        entry(5, CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING),
    );
    assert_eq!(fx.tcp_backend(client(40010), TCP_ACK), pinned);
    fx.set_ct(
        client(40010),
        vip(80),
        IPPROTO_TCP,
        CT_SERVICE,
        entry(11, CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING),
    );
    assert_eq!(fx.tcp_backend(client(40010), TCP_ACK), BACKEND_1);
}

#[test]
fn inbound_connection_and_its_replies() {
    let mut fx = Fixture::new();
    let peer = SocketAddrV4::new(Ipv4Addr::new(10, 0, 5, 5), 33000);
    let server = SocketAddrV4::new(CLIENT, 8080);

    let out = fx.run_to_container(&tcp(peer, server, TCP_SYN, b""));
    assert_eq!(out.verdict, TC_ACT_OK);
    let ingress = fx
        .ct(peer, server, IPPROTO_TCP, CT_INGRESS)
        .expect("CT_INGRESS");
    assert_eq!(ingress.nat(), None);

    let synack = tcp(server, peer, TCP_SYN | TCP_ACK, b"");
    let out = fx.run_from_container(&synack);
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.packet, synack, "replies pass untouched");
    let ingress = fx.ct(peer, server, IPPROTO_TCP, CT_INGRESS).unwrap();
    assert_ne!(ingress.flags & CT_FLAG_SEEN_REPLY, 0);
    assert_eq!(ingress.packets, 2);
    assert!(fx.ct(server, peer, IPPROTO_TCP, CT_EGRESS).is_none());
}

#[test]
fn other_traffic_passes_untouched() {
    let mut fx = Fixture::new();
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_1]);

    // ICMP echo to the VIP (not balanced: only ports are), ARP, and an ICMP error.
    let mut icmp = support::ipv4_header(CLIENT, VIP, IPPROTO_ICMP, 8);
    icmp.extend_from_slice(&[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
    let icmp = support::ethernet(POD_MAC, NODE_MAC, &icmp);
    let mut arp = support::ethernet(POD_MAC, [0xff; 6], &[0u8; 28]);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let mut unreachable = support::ipv4_header(CLIENT, VIP, IPPROTO_ICMP, 8);
    unreachable.extend_from_slice(&[3, 1, 0xfc, 0xfe, 0, 0, 0, 0]);
    let unreachable = support::ethernet(POD_MAC, NODE_MAC, &unreachable);

    for packet in [icmp, arp, unreachable] {
        for to_container in [false, true] {
            let out = if to_container {
                fx.run_to_container(&packet)
            } else {
                fx.run_from_container(&packet)
            };
            assert_eq!(out.verdict, TC_ACT_OK);
            assert_eq!(out.packet, packet);
        }
    }
    assert_eq!(fx.metric(0, METRIC_DIR_EGRESS).packets, 3);
    assert_eq!(fx.metric(0, METRIC_DIR_INGRESS).packets, 3);
}

#[test]
fn malformed_packets_are_dropped_as_invalid() {
    let mut fx = Fixture::new();
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_1]);
    let good = tcp(client(40012), vip(80), TCP_SYN, b"");

    // (The kernel's test run refuses IPv4 frames shorter than an IP header, so the
    // shortest header case is a tot_len below 20.)
    let mut tot_len_below_header = good.clone();
    tot_len_below_header[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&12u16.to_be_bytes());
    let mut bad_ihl = good.clone();
    bad_ihl[ETH_HLEN] = 0x43;
    let mut bad_version = good.clone();
    bad_version[ETH_HLEN] = 0x65;
    let truncated_tcp = good[..ETH_HLEN + 20 + 12].to_vec();
    let mut tcp_cut_by_tot_len = good.clone();
    tcp_cut_by_tot_len[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&30u16.to_be_bytes());
    let mut tot_len_past_the_end = good.clone();
    tot_len_past_the_end[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&1000u16.to_be_bytes());
    let mut ihl_past_tot_len = good.clone();
    ihl_past_tot_len[ETH_HLEN] = 0x4f;
    let mut bad_doff = good.clone();
    bad_doff[ETH_HLEN + 20 + 12] = 4 << 4;
    let truncated_udp = udp(client(50005), vip(53), b"")[..ETH_HLEN + 20 + 4].to_vec();

    let cases = [
        ("tot_len shorter than the IP header", tot_len_below_header),
        ("ihl 3", bad_ihl),
        ("version 6 in an IPv4 frame", bad_version),
        ("truncated TCP header", truncated_tcp),
        ("tot_len cuts the TCP header", tcp_cut_by_tot_len),
        ("tot_len past the end", tot_len_past_the_end),
        ("ihl past tot_len", ihl_past_tot_len),
        ("TCP data offset 4", bad_doff),
        ("truncated UDP header", truncated_udp),
    ];
    for (name, packet) in &cases {
        assert_eq!(fx.run_from_container(packet).verdict, TC_ACT_SHOT, "{name}");
        assert_eq!(fx.run_to_container(packet).verdict, TC_ACT_SHOT, "{name}");
    }
    let n = cases.len() as u64;
    let invalid = DropReason::Invalid.code();
    assert_eq!(fx.metric(invalid, METRIC_DIR_EGRESS).packets, n);
    assert_eq!(fx.metric(invalid, METRIC_DIR_INGRESS).packets, n);
    assert!(
        fx.ct(client(40012), vip(80), IPPROTO_TCP, CT_SERVICE)
            .is_none()
    );
}

#[test]
fn random_garbage_never_breaks_the_programs() {
    let mut fx = Fixture::new();
    fx.add_service(vip(80), IPPROTO_TCP, &[BACKEND_1]);
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let good = tcp(client(40013), vip(80), TCP_SYN, b"");

    // The kernel's test run refuses IPv4 frames shorter than Ethernet + IP header.
    let min_ipv4 = ETH_HLEN + 20;
    for i in 0..2000 {
        let packet: Vec<u8> = match i % 4 {
            // Pure noise with an IPv4 ethertype.
            0 => {
                let mut p: Vec<u8> = (0..rng.usize(min_ipv4..120)).map(|_| rng.u8(..)).collect();
                p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                p
            }
            // Pure noise, any other ethertype, any length.
            1 => {
                let mut p: Vec<u8> = (0..rng.usize(ETH_HLEN..120)).map(|_| rng.u8(..)).collect();
                if p[12..14] == [0x08, 0x00] {
                    p[13] = 0x06;
                }
                p
            }
            // A valid SYN with a few bytes flipped past the Ethernet header.
            2 => {
                let mut p = good.clone();
                for _ in 0..rng.usize(1..4) {
                    let at = rng.usize(ETH_HLEN..p.len());
                    p[at] = rng.u8(..);
                }
                p
            }
            // A valid SYN cut short.
            _ => good[..rng.usize(min_ipv4..good.len())].to_vec(),
        };
        for verdict in [
            fx.run_from_container(&packet).verdict,
            fx.run_to_container(&packet).verdict,
        ] {
            assert!(
                [TC_ACT_OK, TC_ACT_SHOT].contains(&verdict),
                "verdict {verdict} for {packet:02x?}"
            );
        }
    }
}
