//! Flow events on crafted packets through BPF_PROG_TEST_RUN (needs root; never
//! skipped): after each run the test drains the `events` ring buffer from user space and
//! checks every field of what the datapath wrote, and the emitted, suppressed and lost
//! counters.
//!
//! The test run's device is `lo` (ifindex 1), so the endpoint under test is the one keyed
//! by ifindex 1: POD, whose from_container sees what it sends (egress) and whose
//! to_container sees what it receives (ingress).
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::{MapData, PerCpuValues, RingBuf};
use sluice_common::{
    DropReason, ENDPOINT_F_EGRESS_ENFORCED, ENDPOINT_F_INGRESS_ENFORCED,
    ENDPOINT_F_POLICY_OVERFLOW, EVENT_CLOSE, EVENT_CONFIG_F_ENABLED, EVENT_DROP, EVENT_F_DENIED,
    EVENT_F_HOST_ROW, EVENT_F_REPLY, EVENT_F_SERVICE, EVENT_POLICY_VERDICT, EVENT_TRACE,
    EventConfig, EventCounter, FlowEvent, IDENTITY_HOST, IPPROTO_TCP, IPPROTO_UDP,
    METRIC_DIR_EGRESS, METRIC_DIR_INGRESS, POLICY_EGRESS, POLICY_INGRESS, PolicyKey, addr_be,
    event_counter_index,
    programs::{FROM_CONTAINER, TO_CONTAINER},
};
use sluice_datapath::{Datapath, PinnedMaps, open_events};
use support::{
    ETH_HLEN, PinDir, TC_ACT_OK, TC_ACT_SHOT, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, run, tcp, udp,
    world::{
        self, IFINDEX, PEER, PEER_IDENTITY, POD_IDENTITY, STRANGER, STRANGER_IDENTITY, VIP, peer,
        pod,
    },
};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
const BOTH: u32 = ENDPOINT_F_INGRESS_ENFORCED | ENDPOINT_F_EGRESS_ENFORCED;
const EVENT_TYPES: [u8; 4] = [EVENT_DROP, EVENT_TRACE, EVENT_POLICY_VERDICT, EVENT_CLOSE];

fn stranger(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(STRANGER, port)
}

fn port_row(identity: u32, direction: u8, port: u16) -> PolicyKey {
    PolicyKey::ports(identity, direction, IPPROTO_TCP, port, 16)
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock of `time_ns`).
fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// Keeps the calling thread on the CPU it runs on, so every test run uses the same
/// per-CPU token bucket.
fn pin_to_current_cpu() {
    use nix::sched::{CpuSet, sched_getcpu, sched_setaffinity};
    let mut set = CpuSet::new();
    set.set(sched_getcpu().unwrap()).unwrap();
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

struct Fixture {
    datapath: Datapath,
    maps: PinnedMaps,
    ring: RingBuf<MapData>,
    _pins: PinDir,
}

impl Fixture {
    /// A datapath with POD as the endpoint on IFINDEX (with `flags`), the ipcache naming
    /// POD, PEER, STRANGER and the node (host), and events enabled without a limit.
    fn new(flags: u32) -> Self {
        let (pins, datapath) = support::load();
        let maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
        let ring = open_events(pins.path()).expect("open the events ring");
        let mut fx = Self {
            datapath,
            maps,
            ring,
            _pins: pins,
        };
        world::install(&mut fx.maps, flags);
        fx.ipcache(NODE, 32, IDENTITY_HOST);
        fx.configure(EVENT_CONFIG_F_ENABLED, 0, 0);
        fx
    }

    fn set_endpoint(&mut self, flags: u32) {
        world::set_endpoint(&mut self.maps, flags);
    }

    fn ipcache(&mut self, address: Ipv4Addr, prefixlen: u32, identity: u32) {
        world::ipcache(&mut self.maps, address, prefixlen, identity);
    }

    fn configure(&mut self, flags: u32, rate: u32, burst: u32) {
        let config = EventConfig {
            flags,
            rate,
            burst,
            pad: 0,
        };
        self.maps.event_config.set(0, config, 0).unwrap();
    }

    fn egress(&mut self, packet: &[u8]) -> u32 {
        run(self.datapath.program(FROM_CONTAINER).unwrap(), packet).verdict
    }

    fn ingress(&mut self, packet: &[u8]) -> u32 {
        run(self.datapath.program(TO_CONTAINER).unwrap(), packet).verdict
    }

    /// Every event in the ring, oldest first; reading them frees their space.
    fn events(&mut self) -> Vec<FlowEvent> {
        let mut events = Vec::new();
        while let Some(record) = self.ring.next() {
            events.push(FlowEvent::from_bytes(&record).expect("a whole flow_event"));
        }
        events
    }

    /// The one event the last runs wrote.
    fn event(&mut self) -> FlowEvent {
        let events = self.events();
        assert_eq!(events.len(), 1, "{events:#?}");
        events[0]
    }

    /// The counters of (`type_`, `dir`), summed over CPUs.
    fn counter(&self, type_: u8, dir: u32) -> EventCounter {
        let values: PerCpuValues<EventCounter> = self
            .maps
            .event_counters
            .get(&event_counter_index(type_, dir), 0)
            .unwrap();
        values
            .iter()
            .fold(EventCounter::default(), |sum, v| EventCounter {
                emitted: sum.emitted + v.emitted,
                suppressed: sum.suppressed + v.suppressed,
                lost: sum.lost + v.lost,
            })
    }

    /// The counters of every type and direction, summed.
    fn total(&self) -> EventCounter {
        let mut total = EventCounter::default();
        for type_ in EVENT_TYPES {
            for dir in [METRIC_DIR_EGRESS, METRIC_DIR_INGRESS] {
                let c = self.counter(type_, dir);
                total.emitted += c.emitted;
                total.suppressed += c.suppressed;
                total.lost += c.lost;
            }
        }
        total
    }

    /// Packets counted in `metrics` for `reason` in `dir`, summed over CPUs.
    fn metric(&self, reason: DropReason, dir: u32) -> u64 {
        self.maps.counted(reason.code(), dir).unwrap().packets
    }
}

/// The event a packet from `src` to `dst` yields, with the fields that do not depend on
/// the run (time_ns, len) taken from `actual`.
fn expected(actual: &FlowEvent, src: SocketAddrV4, dst: SocketAddrV4) -> FlowEvent {
    FlowEvent {
        time_ns: actual.time_ns,
        len: actual.len,
        ifindex: IFINDEX,
        proto: IPPROTO_TCP,
        saddr: addr_be(*src.ip()),
        daddr: addr_be(*dst.ip()),
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        ..FlowEvent::default()
    }
}

#[test]
fn trace_of_a_new_connection_and_nothing_for_established_packets() {
    let mut fx = Fixture::new(0);
    let before = monotonic_ns();
    let syn = tcp(pod(40000), peer(8080), TCP_SYN, b"");
    assert_eq!(fx.egress(&syn), TC_ACT_OK);
    let after = monotonic_ns();
    let event = fx.event();
    assert_eq!(
        event,
        FlowEvent {
            type_: EVENT_TRACE,
            direction: METRIC_DIR_EGRESS as u8,
            tcp_flags: TCP_SYN,
            src_identity: POD_IDENTITY,
            dst_identity: PEER_IDENTITY,
            ..expected(&event, pod(40000), peer(8080))
        }
    );
    assert!(before <= event.time_ns && event.time_ns <= after);
    assert_eq!(event.len as usize, syn.len());

    // The rest of the connection, both ways, writes nothing.
    assert_eq!(
        fx.ingress(&tcp(peer(8080), pod(40000), TCP_SYN | TCP_ACK, b"")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.egress(&tcp(pod(40000), peer(8080), TCP_ACK, b"")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.egress(&tcp(pod(40000), peer(8080), TCP_ACK, b"data")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.ingress(&tcp(peer(8080), pod(40000), TCP_ACK, b"data")),
        TC_ACT_OK
    );
    assert_eq!(fx.events(), []);

    // An inbound connection is traced where it enters the pod.
    assert_eq!(
        fx.ingress(&tcp(peer(33000), pod(80), TCP_SYN, b"")),
        TC_ACT_OK
    );
    let event = fx.event();
    assert_eq!(
        event,
        FlowEvent {
            type_: EVENT_TRACE,
            direction: METRIC_DIR_INGRESS as u8,
            tcp_flags: TCP_SYN,
            src_identity: PEER_IDENTITY,
            dst_identity: POD_IDENTITY,
            ..expected(&event, peer(33000), pod(80))
        }
    );
    assert_eq!(
        fx.egress(&tcp(pod(80), peer(33000), TCP_SYN | TCP_ACK, b"")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.ingress(&tcp(peer(33000), pod(80), TCP_ACK, b"")),
        TC_ACT_OK
    );
    assert_eq!(fx.events(), []);

    let trace = fx.counter(EVENT_TRACE, METRIC_DIR_EGRESS);
    assert_eq!((trace.emitted, trace.suppressed, trace.lost), (1, 0, 0));
    assert_eq!(fx.total().emitted, 2);
}

#[test]
fn trace_of_a_service_connection_names_frontend_and_backend() {
    let mut fx = Fixture::new(0);
    let frontend = SocketAddrV4::new(VIP, 80);
    let backend = peer(8080);
    support::add_service(&mut fx.maps, frontend, IPPROTO_TCP, &[backend]);

    assert_eq!(
        fx.egress(&tcp(pod(40000), frontend, TCP_SYN, b"")),
        TC_ACT_OK
    );
    let event = fx.event();
    assert_eq!(
        event,
        FlowEvent {
            type_: EVENT_TRACE,
            direction: METRIC_DIR_EGRESS as u8,
            tcp_flags: TCP_SYN,
            flags: EVENT_F_SERVICE,
            src_identity: POD_IDENTITY,
            dst_identity: PEER_IDENTITY,
            orig_daddr: addr_be(VIP),
            orig_dport: 80u16.to_be(),
            ..expected(&event, pod(40000), backend)
        }
    );
    // Established through the service, and the reply: nothing.
    assert_eq!(
        fx.egress(&tcp(pod(40000), frontend, TCP_ACK, b"x")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.ingress(&tcp(backend, pod(40000), TCP_ACK, b"y")),
        TC_ACT_OK
    );
    assert_eq!(fx.events(), []);

    // UDP to the service: one event for the flow, none for its next datagram.
    support::add_service(
        &mut fx.maps,
        SocketAddrV4::new(VIP, 53),
        IPPROTO_UDP,
        &[peer(5353)],
    );
    let query = udp(pod(41000), SocketAddrV4::new(VIP, 53), b"q");
    assert_eq!(fx.egress(&query), TC_ACT_OK);
    assert_eq!(fx.egress(&query), TC_ACT_OK);
    let event = fx.event();
    assert_eq!(
        (event.type_, event.proto, event.flags),
        (EVENT_TRACE, IPPROTO_UDP, EVENT_F_SERVICE)
    );
    assert_eq!((event.daddr, event.dport), (addr_be(PEER), 5353u16.to_be()));
    assert_eq!(
        (event.orig_daddr, event.orig_dport),
        (addr_be(VIP), 53u16.to_be())
    );
}

#[test]
fn policy_verdicts_allowed_and_denied() {
    let mut fx = Fixture::new(BOTH);
    let allowed = port_row(PEER_IDENTITY, POLICY_EGRESS, 8080);
    support::install_policy(
        &mut fx.maps,
        IFINDEX,
        &[
            allowed,
            port_row(PEER_IDENTITY, POLICY_INGRESS, 80),
            PolicyKey::any(IDENTITY_HOST, POLICY_INGRESS),
        ],
    );

    // Allowed: the verdict, then the trace of the new connection.
    assert_eq!(
        fx.egress(&tcp(pod(40000), peer(8080), TCP_SYN, b"")),
        TC_ACT_OK
    );
    let events = fx.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(
        events[0],
        FlowEvent {
            type_: EVENT_POLICY_VERDICT,
            direction: METRIC_DIR_EGRESS as u8,
            tcp_flags: TCP_SYN,
            src_identity: POD_IDENTITY,
            dst_identity: PEER_IDENTITY,
            ..expected(&events[0], pod(40000), peer(8080))
        }
    );
    assert_eq!(
        events[1],
        FlowEvent {
            type_: EVENT_TRACE,
            time_ns: events[1].time_ns,
            ..events[0]
        }
    );

    // Denied: the verdict with its reason, and the drop.
    assert_eq!(
        fx.egress(&tcp(pod(40001), stranger(8080), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
    let events = fx.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    let denied = FlowEvent {
        type_: EVENT_POLICY_VERDICT,
        direction: METRIC_DIR_EGRESS as u8,
        reason: DropReason::Policy.code(),
        tcp_flags: TCP_SYN,
        flags: EVENT_F_DENIED,
        src_identity: POD_IDENTITY,
        dst_identity: STRANGER_IDENTITY,
        ..expected(&events[0], pod(40001), stranger(8080))
    };
    assert_eq!(events[0], denied);
    assert_eq!(
        events[1],
        FlowEvent {
            type_: EVENT_DROP,
            flags: 0,
            time_ns: events[1].time_ns,
            ..denied
        }
    );

    // Ingress, denied: the stranger is the source.
    assert_eq!(
        fx.ingress(&tcp(stranger(33000), pod(80), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
    let events = fx.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(
        events[0],
        FlowEvent {
            type_: EVENT_POLICY_VERDICT,
            direction: METRIC_DIR_INGRESS as u8,
            reason: DropReason::Policy.code(),
            tcp_flags: TCP_SYN,
            flags: EVENT_F_DENIED,
            src_identity: STRANGER_IDENTITY,
            dst_identity: POD_IDENTITY,
            ..expected(&events[0], stranger(33000), pod(80))
        }
    );
    assert_eq!((events[1].type_, events[1].reason), (EVENT_DROP, 133));

    // Admitted by the reserved:host row: flagged.
    let node = SocketAddrV4::new(NODE, 50000);
    assert_eq!(fx.ingress(&tcp(node, pod(9999), TCP_SYN, b"")), TC_ACT_OK);
    let events = fx.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(events[0].type_, EVENT_POLICY_VERDICT);
    assert_eq!(events[0].flags, EVENT_F_HOST_ROW);
    assert_eq!(events[0].src_identity, IDENTITY_HOST);
    assert_eq!((events[1].type_, events[1].flags), (EVENT_TRACE, 0));

    // An unenforced direction is not judged: a trace only.
    fx.set_endpoint(ENDPOINT_F_INGRESS_ENFORCED);
    assert_eq!(
        fx.egress(&tcp(pod(40002), stranger(8080), TCP_SYN, b"")),
        TC_ACT_OK
    );
    assert_eq!(fx.event().type_, EVENT_TRACE);

    // Fail closed on overflow: denied with reason 212.
    fx.set_endpoint(BOTH | ENDPOINT_F_POLICY_OVERFLOW);
    assert_eq!(
        fx.egress(&tcp(pod(40003), peer(8080), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
    let events = fx.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(
        (events[0].type_, events[0].flags, events[0].reason),
        (
            EVENT_POLICY_VERDICT,
            EVENT_F_DENIED,
            DropReason::PolicyUnavailable.code()
        )
    );
    assert_eq!(
        (events[1].type_, events[1].reason),
        (EVENT_DROP, DropReason::PolicyUnavailable.code())
    );

    let verdicts = fx.counter(EVENT_POLICY_VERDICT, METRIC_DIR_EGRESS);
    assert_eq!(verdicts.emitted, 3);
    assert_eq!(fx.counter(EVENT_DROP, METRIC_DIR_EGRESS).emitted, 2);
}

#[test]
fn service_connection_denied_names_the_backend() {
    let mut fx = Fixture::new(ENDPOINT_F_EGRESS_ENFORCED);
    support::install_policy(&mut fx.maps, IFINDEX, &[]);
    let frontend = SocketAddrV4::new(VIP, 80);
    support::add_service(&mut fx.maps, frontend, IPPROTO_TCP, &[peer(8080)]);

    assert_eq!(
        fx.egress(&tcp(pod(40000), frontend, TCP_SYN, b"")),
        TC_ACT_SHOT
    );
    let events = fx.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    for (event, type_) in events.iter().zip([EVENT_POLICY_VERDICT, EVENT_DROP]) {
        assert_eq!(event.type_, type_);
        assert_eq!(event.reason, DropReason::Policy.code());
        assert_eq!(event.flags & EVENT_F_SERVICE, EVENT_F_SERVICE);
        assert_eq!((event.daddr, event.dport), (addr_be(PEER), 8080u16.to_be()));
        assert_eq!(
            (event.orig_daddr, event.orig_dport),
            (addr_be(VIP), 80u16.to_be())
        );
        assert_eq!(event.dst_identity, PEER_IDENTITY);
    }
    assert_eq!(events[0].flags, EVENT_F_SERVICE | EVENT_F_DENIED);
}

#[test]
fn drops_carry_their_reason_and_what_was_parsed() {
    let mut fx = Fixture::new(0);

    // A TCP header whose data offset is below 5 words: ports parsed, then refused.
    let mut malformed = tcp(pod(40000), peer(8080), TCP_SYN, b"");
    malformed[ETH_HLEN + 20 + 12] = 4 << 4;
    assert_eq!(fx.egress(&malformed), TC_ACT_SHOT);
    let event = fx.event();
    assert_eq!(
        event,
        FlowEvent {
            type_: EVENT_DROP,
            direction: METRIC_DIR_EGRESS as u8,
            reason: DropReason::Invalid.code(),
            src_identity: POD_IDENTITY,
            dst_identity: PEER_IDENTITY,
            ..expected(&event, pod(40000), peer(8080))
        }
    );

    // A segment cut short inside its TCP header: the addresses are known, the ports
    // are not.
    let truncated = &tcp(peer(80), pod(40000), TCP_SYN, b"")[..ETH_HLEN + 20 + 10];
    assert_eq!(fx.ingress(truncated), TC_ACT_SHOT);
    let event = fx.event();
    assert_eq!(
        event,
        FlowEvent {
            type_: EVENT_DROP,
            direction: METRIC_DIR_INGRESS as u8,
            reason: DropReason::Invalid.code(),
            src_identity: PEER_IDENTITY,
            dst_identity: POD_IDENTITY,
            ..expected(&event, SocketAddrV4::new(PEER, 0), pod(0))
        }
    );

    // A spoofed source: the endpoint's own identity, the forged address.
    let spoofed = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 99), 40000);
    assert_eq!(
        fx.egress(&tcp(spoofed, peer(80), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
    let event = fx.event();
    assert_eq!(
        event,
        FlowEvent {
            type_: EVENT_DROP,
            direction: METRIC_DIR_EGRESS as u8,
            reason: DropReason::InvalidSource.code(),
            tcp_flags: TCP_SYN,
            src_identity: POD_IDENTITY,
            dst_identity: PEER_IDENTITY,
            ..expected(&event, spoofed, peer(80))
        }
    );

    // A known VIP on a port it does not serve.
    support::add_service(
        &mut fx.maps,
        SocketAddrV4::new(VIP, 80),
        IPPROTO_TCP,
        &[peer(8080)],
    );
    assert_eq!(
        fx.egress(&tcp(pod(40001), SocketAddrV4::new(VIP, 81), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
    let event = fx.event();
    assert_eq!(event.reason, DropReason::ServicePortUnknown.code());
    assert_eq!((event.daddr, event.dport), (addr_be(VIP), 81u16.to_be()));

    assert_eq!(fx.counter(EVENT_DROP, METRIC_DIR_EGRESS).emitted, 3);
    assert_eq!(fx.counter(EVENT_DROP, METRIC_DIR_INGRESS).emitted, 1);
}

#[test]
fn close_on_the_first_fin_or_rst_once_per_connection() {
    let mut fx = Fixture::new(0);
    assert_eq!(
        fx.egress(&tcp(pod(40000), peer(8080), TCP_SYN, b"")),
        TC_ACT_OK
    );
    assert_eq!(fx.event().type_, EVENT_TRACE);
    assert_eq!(
        fx.ingress(&tcp(peer(8080), pod(40000), TCP_SYN | TCP_ACK, b"")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.egress(&tcp(pod(40000), peer(8080), TCP_ACK, b"")),
        TC_ACT_OK
    );
    assert_eq!(fx.events(), []);

    let fin = tcp(pod(40000), peer(8080), TCP_FIN | TCP_ACK, b"");
    assert_eq!(fx.egress(&fin), TC_ACT_OK);
    let event = fx.event();
    assert_eq!(
        event,
        FlowEvent {
            type_: EVENT_CLOSE,
            direction: METRIC_DIR_EGRESS as u8,
            tcp_flags: TCP_FIN | TCP_ACK,
            src_identity: POD_IDENTITY,
            dst_identity: PEER_IDENTITY,
            ..expected(&event, pod(40000), peer(8080))
        }
    );
    // The peer's FIN, a retransmitted FIN and the last ACK: the connection closed once.
    assert_eq!(
        fx.ingress(&tcp(peer(8080), pod(40000), TCP_FIN | TCP_ACK, b"")),
        TC_ACT_OK
    );
    assert_eq!(fx.egress(&fin), TC_ACT_OK);
    assert_eq!(
        fx.egress(&tcp(pod(40000), peer(8080), TCP_ACK, b"")),
        TC_ACT_OK
    );
    assert_eq!(fx.events(), []);

    // An inbound connection the pod resets: the close is seen on the reply.
    assert_eq!(
        fx.ingress(&tcp(peer(33000), pod(80), TCP_SYN, b"")),
        TC_ACT_OK
    );
    assert_eq!(fx.event().type_, EVENT_TRACE);
    let rst = tcp(pod(80), peer(33000), TCP_RST | TCP_ACK, b"");
    assert_eq!(fx.egress(&rst), TC_ACT_OK);
    let event = fx.event();
    assert_eq!(
        event,
        FlowEvent {
            type_: EVENT_CLOSE,
            direction: METRIC_DIR_EGRESS as u8,
            tcp_flags: TCP_RST | TCP_ACK,
            flags: EVENT_F_REPLY,
            src_identity: POD_IDENTITY,
            dst_identity: PEER_IDENTITY,
            ..expected(&event, pod(80), peer(33000))
        }
    );
    assert_eq!(fx.egress(&rst), TC_ACT_OK);
    assert_eq!(fx.events(), []);

    // Through a service: the close names the backend and the frontend.
    let frontend = SocketAddrV4::new(VIP, 80);
    support::add_service(&mut fx.maps, frontend, IPPROTO_TCP, &[peer(8081)]);
    assert_eq!(
        fx.egress(&tcp(pod(40001), frontend, TCP_SYN, b"")),
        TC_ACT_OK
    );
    assert_eq!(fx.event().type_, EVENT_TRACE);
    assert_eq!(
        fx.egress(&tcp(pod(40001), frontend, TCP_FIN | TCP_ACK, b"")),
        TC_ACT_OK
    );
    let event = fx.event();
    assert_eq!((event.type_, event.flags), (EVENT_CLOSE, EVENT_F_SERVICE));
    assert_eq!((event.daddr, event.dport), (addr_be(PEER), 8081u16.to_be()));
    assert_eq!(
        (event.orig_daddr, event.orig_dport),
        (addr_be(VIP), 80u16.to_be())
    );

    assert_eq!(fx.counter(EVENT_CLOSE, METRIC_DIR_EGRESS).emitted, 3);
    assert_eq!(fx.counter(EVENT_CLOSE, METRIC_DIR_INGRESS).emitted, 0);
}

#[test]
fn disabled_events_emit_and_count_nothing() {
    let mut fx = Fixture::new(BOTH);
    support::install_policy(
        &mut fx.maps,
        IFINDEX,
        &[port_row(PEER_IDENTITY, POLICY_EGRESS, 8080)],
    );
    fx.configure(0, 0, 0);

    assert_eq!(
        fx.egress(&tcp(pod(40000), peer(8080), TCP_SYN, b"")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.egress(&tcp(pod(40000), peer(8080), TCP_FIN | TCP_ACK, b"")),
        TC_ACT_OK
    );
    assert_eq!(
        fx.egress(&tcp(pod(40001), stranger(8080), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
    assert_eq!(
        fx.ingress(&tcp(stranger(1), pod(80), TCP_SYN, b"")),
        TC_ACT_SHOT
    );
    assert_eq!(fx.events(), []);
    assert_eq!(fx.total(), EventCounter::default());
    // The drops are counted all the same.
    assert_eq!(fx.metric(DropReason::Policy, METRIC_DIR_EGRESS), 1);
    assert_eq!(fx.metric(DropReason::Policy, METRIC_DIR_INGRESS), 1);

    // Enabled again: events flow.
    fx.configure(EVENT_CONFIG_F_ENABLED, 0, 0);
    assert_eq!(
        fx.egress(&tcp(pod(40002), peer(8080), TCP_SYN, b"")),
        TC_ACT_OK
    );
    assert_eq!(fx.events().len(), 2);
}

#[test]
fn rate_limit_suppresses_and_counts() {
    // One CPU, one bucket: the burst is exactly what gets through.
    pin_to_current_cpu();
    let mut fx = Fixture::new(0);
    fx.configure(EVENT_CONFIG_F_ENABLED, 1, 2);

    let attempts = 10;
    for port in 0..attempts {
        let syn = tcp(pod(40000 + port), peer(8080), TCP_SYN, b"");
        assert_eq!(fx.egress(&syn), TC_ACT_OK);
    }
    let trace = fx.counter(EVENT_TRACE, METRIC_DIR_EGRESS);
    assert_eq!(trace.emitted, 2, "{trace:?}");
    assert_eq!(trace.emitted + trace.suppressed, u64::from(attempts));
    assert_eq!(trace.lost, 0);
    let events = fx.events();
    assert_eq!(events.len(), 2);
    assert_eq!(
        events
            .iter()
            .map(|e| u16::from_be(e.sport))
            .collect::<Vec<_>>(),
        [40000, 40001]
    );

    // Drops beyond the limit: no event, but every packet is counted in `metrics`.
    let mut malformed = tcp(pod(40000), peer(8080), TCP_SYN, b"");
    malformed[ETH_HLEN + 20 + 12] = 4 << 4;
    for _ in 0..attempts {
        assert_eq!(fx.egress(&malformed), TC_ACT_SHOT);
    }
    assert_eq!(
        fx.metric(DropReason::Invalid, METRIC_DIR_EGRESS),
        u64::from(attempts)
    );
    let drops = fx.counter(EVENT_DROP, METRIC_DIR_EGRESS);
    assert_eq!((drops.emitted, drops.suppressed), (0, u64::from(attempts)));
    assert_eq!(fx.events(), []);
}

#[test]
fn a_full_ring_counts_lost_events() {
    let mut fx = Fixture::new(0);
    // Every run of a malformed packet is dropped with an event: more than the 1 MiB ring
    // holds (64 bytes a record) when nobody reads it.
    let runs = 20_000u32;
    let mut syn = tcp(pod(40000), peer(8080), TCP_SYN, b"");
    syn[ETH_HLEN + 20 + 12] = 4 << 4;
    let program = fx.datapath.program(FROM_CONTAINER).unwrap();
    let mut out = vec![0u8; syn.len() + 256];
    let result = aya::programs::TestRun::test_run(
        program,
        aya::programs::TestRunOptions {
            data_in: Some(&syn),
            data_out: Some(&mut out),
            repeat: runs,
            ..Default::default()
        },
    )
    .expect("BPF_PROG_TEST_RUN");
    assert_eq!(result.return_value, TC_ACT_SHOT);

    let trace = fx.counter(EVENT_DROP, METRIC_DIR_EGRESS);
    assert!(trace.lost > 0, "{trace:?}");
    assert_eq!(trace.emitted + trace.lost, u64::from(runs));
    assert_eq!(fx.events().len() as u64, trace.emitted);
    // Read, the ring takes events again.
    assert_eq!(
        fx.egress(&tcp(pod(40001), peer(8080), TCP_SYN, b"")),
        TC_ACT_OK
    );
    assert_eq!(fx.event().sport, 40001u16.to_be());
}

#[test]
fn the_reader_is_woken_once_a_batch_is_waiting() {
    use std::{
        os::fd::AsRawFd,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        time::{Duration, Instant},
    };
    let mut fx = Fixture::new(0);
    let fd = fx.ring.as_raw_fd();
    let woken = Arc::new(AtomicBool::new(false));
    let reader = {
        let woken = Arc::clone(&woken);
        std::thread::spawn(move || {
            let mut pollfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; the fixture keeps the ring's fd open until joined.
            let ready = unsafe { libc::poll(&mut pollfd, 1, 5_000) };
            woken.store(true, Ordering::SeqCst);
            (ready, pollfd.revents)
        })
    };
    // Let the reader block on the empty ring first.
    std::thread::sleep(Duration::from_millis(200));

    // EVENT_WAKEUP_EVENTS in bpf/lib/events.h.
    const BATCH: u16 = 1024;
    // One event short of the batch: nobody is woken (the reader would drain them later).
    for port in 0..BATCH - 1 {
        let syn = tcp(pod(40000 + port), peer(8080), TCP_SYN, b"");
        assert_eq!(fx.egress(&syn), TC_ACT_OK);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !woken.load(Ordering::SeqCst),
        "woken before a batch was waiting"
    );

    // The last one completes the batch.
    let start = Instant::now();
    assert_eq!(
        fx.egress(&tcp(pod(40000 + BATCH), peer(8080), TCP_SYN, b"")),
        TC_ACT_OK
    );
    let (ready, revents) = support::join(reader);
    assert_eq!(ready, 1, "poll timed out instead of being woken");
    assert_ne!(revents & libc::POLLIN, 0);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(fx.events().len(), usize::from(BATCH));
}
