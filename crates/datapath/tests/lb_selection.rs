//! Backend selection for new connections through the real `from_container` program
//! (BPF_PROG_TEST_RUN on crafted packets; needs root, never skipped): Maglev tables as the
//! compiler computes them, sessionAffinity ClientIP, and the flow hash that sends a
//! connection whose conntrack entry was lost back to its backend.
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use sluice_common::{
    CT_SERVICE, Ct4Key, IPPROTO_TCP, IPPROTO_UDP, Lb4AffinityKey, Lb4Key, Lb4Service,
    SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP, SVC_FLAG_MAGLEV, programs::FROM_CONTAINER,
};
use sluice_compiler::maglev::{self, TableSize};
use sluice_datapath::{Datapath, PinnedMaps, create_maglev_table};
use support::{Frame, PinDir, TC_ACT_OK, TCP_ACK, TCP_SYN, run, tcp, udp};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Another node's address, as a NodePort frontend would have it there.
const NODE_B: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 12);
const NS_PER_SEC: u64 = 1_000_000_000;

fn backends(n: u8) -> Vec<SocketAddrV4> {
    (1..=n)
        .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 0, i, 2), 8080))
        .collect()
}

/// A loaded datapath in its own pin dir: one node.
struct Node {
    datapath: Datapath,
    maps: PinnedMaps,
    _pins: PinDir,
}

impl Node {
    fn new() -> Self {
        let (pins, datapath) = support::load();
        let maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
        Self {
            datapath,
            maps,
            _pins: pins,
        }
    }

    /// `frontend` with `backends` in slot order, its value `frontend_value` (count set here).
    fn add_service(
        &mut self,
        frontend: SocketAddrV4,
        proto: u8,
        backends: &[SocketAddrV4],
        frontend_value: Lb4Service,
    ) {
        support::add_service(&mut self.maps, frontend, proto, backends);
        let key = Lb4Key::new(*frontend.ip(), frontend.port(), proto, 0);
        let value = Lb4Service {
            count: u16::try_from(backends.len()).unwrap(),
            ..frontend_value
        };
        self.maps.services.insert(key, value, 0).unwrap();
    }

    /// A Maglev frontend whose table the compiler computes from `backends`, installed as
    /// the realizer does.
    fn add_maglev_service(
        &mut self,
        frontend: SocketAddrV4,
        backends: &[SocketAddrV4],
        size: TableSize,
    ) {
        let value = Lb4Service {
            maglev_size: size.get(),
            ..Lb4Service::frontend(0, SVC_FLAG_CLUSTER_IP | SVC_FLAG_MAGLEV)
        };
        self.add_service(frontend, IPPROTO_UDP, backends, value);
        let named: Vec<(Ipv4Addr, u16)> = backends.iter().map(|b| (*b.ip(), b.port())).collect();
        let table = maglev::table(&named, size);
        let mut map = create_maglev_table(table.len()).unwrap();
        for (index, chunk) in (0u32..).zip(table.chunks(4)) {
            let mut lanes = [0u16; 4];
            lanes[..chunk.len()].copy_from_slice(chunk);
            map.set(index, lanes, 0).unwrap();
        }
        let key = Lb4Key::new(*frontend.ip(), frontend.port(), IPPROTO_UDP, 0);
        self.maps.maglev.insert(key, &map, 0).unwrap();
    }

    /// The backend the program sends `packet` to.
    fn backend_of(&mut self, packet: &[u8]) -> SocketAddrV4 {
        let out = run(self.datapath.program(FROM_CONTAINER).unwrap(), packet);
        assert_eq!(out.verdict, TC_ACT_OK);
        Frame(&out.packet).dst()
    }

    fn udp_backend(&mut self, client: SocketAddrV4, frontend: SocketAddrV4) -> SocketAddrV4 {
        self.backend_of(&udp(client, frontend, b"flow"))
    }

    fn tcp_backend(&mut self, client: SocketAddrV4, frontend: SocketAddrV4) -> SocketAddrV4 {
        self.backend_of(&tcp(client, frontend, TCP_SYN, b""))
    }
}

/// 10,240 flows: 10 client addresses with 1,024 source ports each.
fn flows() -> Vec<SocketAddrV4> {
    (0..10u8)
        .flat_map(|c| (0..1024u16).map(move |p| (c, p)))
        .map(|(c, p)| SocketAddrV4::new(Ipv4Addr::new(10, 1, c, 2), 20000 + p * 7))
        .collect()
}

fn spread(chosen: &[SocketAddrV4]) -> BTreeMap<SocketAddrV4, usize> {
    let mut counts = BTreeMap::new();
    for backend in chosen {
        *counts.entry(*backend).or_insert(0) += 1;
    }
    counts
}

#[test]
fn maglev_removing_one_of_five_backends_moves_few_other_flows() {
    let all = backends(5);
    let removed = all[2];
    let rest: Vec<_> = all.iter().copied().filter(|b| *b != removed).collect();
    let frontend = SocketAddrV4::new(VIP, 53);
    let size = TableSize::default();
    let flows = flows();

    let mut before_node = Node::new();
    before_node.add_maglev_service(frontend, &all, size);
    let before: Vec<_> = flows
        .iter()
        .map(|c| before_node.udp_backend(*c, frontend))
        .collect();
    drop(before_node);
    let counts = spread(&before);
    println!("maglev: {} flows over 5 backends: {counts:?}", flows.len());
    for (backend, n) in &counts {
        let share = *n as f64 / flows.len() as f64;
        assert!(
            (0.15..0.25).contains(&share),
            "{backend} took {share:.3} of the flows"
        );
    }

    // The node after the backend went: its own conntrack is empty, so every flow is
    // chosen again from the new table.
    let mut after_node = Node::new();
    after_node.add_maglev_service(frontend, &rest, size);
    let after: Vec<_> = flows
        .iter()
        .map(|c| after_node.udp_backend(*c, frontend))
        .collect();

    let own = before.iter().filter(|b| **b == removed).count();
    let moved_others = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| **b != removed && a != b)
        .count();
    assert!(after.iter().all(|b| *b != removed));
    let total = flows.len() as f64;
    println!(
        "maglev disruption: removing 1 of 5 backends moved {} of {} flows ({:.2}%): the removed \
         backend's own {own} ({:.2}%) and {moved_others} others ({:.2}%)",
        own + moved_others,
        flows.len(),
        100.0 * (own + moved_others) as f64 / total,
        100.0 * own as f64 / total,
        100.0 * moved_others as f64 / total,
    );
    assert!(
        (moved_others as f64) / total <= 1.0 / 5.0,
        "more than 1/N of the flows of surviving backends moved"
    );
}

#[test]
fn maglev_a_flow_keeps_its_backend_on_another_node() {
    // The table size is small here to show it is the node's setting that sizes the table.
    let size = TableSize::new(251).unwrap();
    let all = backends(4);
    let mut a = Node::new();
    a.add_maglev_service(SocketAddrV4::new(VIP, 53), &all, size);
    // Node b reaches the same Service through its own address (a NodePort frontend): the
    // hash leaves the frontend address out, so the flow lands on the same backend.
    let mut b = Node::new();
    b.add_maglev_service(SocketAddrV4::new(NODE_B, 53), &all, size);
    let flows = &flows()[..2000];
    let mut used = BTreeMap::new();
    for client in flows {
        let on_a = a.udp_backend(*client, SocketAddrV4::new(VIP, 53));
        let on_b = b.udp_backend(*client, SocketAddrV4::new(NODE_B, 53));
        assert_eq!(on_a, on_b, "flow from {client}");
        *used.entry(on_a).or_insert(0) += 1;
    }
    assert_eq!(used.len(), 4, "every backend takes flows: {used:?}");
}

#[test]
fn maglev_without_its_table_falls_back_to_the_slot_hash() {
    let mut node = Node::new();
    let frontend = SocketAddrV4::new(VIP, 53);
    let value = Lb4Service {
        maglev_size: 16381,
        ..Lb4Service::frontend(0, SVC_FLAG_CLUSTER_IP | SVC_FLAG_MAGLEV)
    };
    node.add_service(frontend, IPPROTO_UDP, &backends(3), value);
    let chosen: Vec<_> = flows()[..300]
        .iter()
        .map(|c| node.udp_backend(*c, frontend))
        .collect();
    assert_eq!(
        spread(&chosen).len(),
        3,
        "still balanced over every backend"
    );
}

/// Sets the affinity entry of `client` for `frontend` as last used `ago_ns` before now.
fn age_affinity(node: &mut Node, client: Ipv4Addr, frontend: SocketAddrV4, ago_ns: u64) {
    let key = Lb4AffinityKey::new(client, *frontend.ip(), frontend.port(), IPPROTO_TCP);
    let mut entry = node.maps.affinity.get(&key, 0).expect("affinity entry");
    entry.last_used_ns = entry.last_used_ns.saturating_sub(ago_ns);
    node.maps.affinity.insert(key, entry, 0).unwrap();
}

#[test]
fn affinity_keeps_a_client_on_its_backend_until_the_timeout() {
    let mut node = Node::new();
    let frontend = SocketAddrV4::new(VIP, 80);
    let value = Lb4Service {
        affinity_timeout: 5,
        ..Lb4Service::frontend(0, SVC_FLAG_CLUSTER_IP | SVC_FLAG_AFFINITY)
    };
    node.add_service(frontend, IPPROTO_TCP, &backends(5), value);
    let client = |c: u8, port: u16| SocketAddrV4::new(Ipv4Addr::new(10, 1, c, 2), port);

    // 50 new connections of one client: one backend.
    let first = node.tcp_backend(client(1, 30000), frontend);
    let hits = (1..50)
        .filter(|i| node.tcp_backend(client(1, 30000 + i), frontend) == first)
        .count()
        + 1;
    println!("affinity: {hits}/50 connections of one client hit {first}");
    assert_eq!(hits, 50);

    // Other clients spread over the backends.
    let others: Vec<_> = (2..42)
        .map(|c| node.tcp_backend(client(c, 30000), frontend))
        .collect();
    assert!(
        spread(&others).len() > 1,
        "clients spread: {:?}",
        spread(&others)
    );

    // Used 4 s ago, within 5 s: kept, and the use refreshes it.
    age_affinity(&mut node, *client(1, 0).ip(), frontend, 4 * NS_PER_SEC);
    assert_eq!(node.tcp_backend(client(1, 31000), frontend), first);
    age_affinity(&mut node, *client(1, 0).ip(), frontend, 4 * NS_PER_SEC);
    assert_eq!(node.tcp_backend(client(1, 31001), frontend), first);

    // Idle for longer than the timeout: the choice is made anew (and sticks again).
    let mut fresh = Vec::new();
    for i in 0..40 {
        age_affinity(&mut node, *client(1, 0).ip(), frontend, 6 * NS_PER_SEC);
        let chosen = node.tcp_backend(client(1, 32000 + i), frontend);
        assert_eq!(node.tcp_backend(client(1, 33000 + i), frontend), chosen);
        fresh.push(chosen);
    }
    assert!(
        spread(&fresh).len() > 1,
        "after the timeout the backend is chosen again: {:?}",
        spread(&fresh)
    );
}

#[test]
fn without_affinity_one_client_spreads() {
    let mut node = Node::new();
    let frontend = SocketAddrV4::new(VIP, 80);
    node.add_service(
        frontend,
        IPPROTO_TCP,
        &backends(5),
        Lb4Service::frontend(0, SVC_FLAG_CLUSTER_IP),
    );
    let chosen: Vec<_> = (0..50)
        .map(|i| {
            node.tcp_backend(
                SocketAddrV4::new(Ipv4Addr::new(10, 1, 1, 2), 30000 + i),
                frontend,
            )
        })
        .collect();
    let counts = spread(&chosen);
    println!("no affinity: 50 connections of one client: {counts:?}");
    assert!(counts.len() >= 3, "{counts:?}");
}

/// A connection whose CT_SERVICE entry is lost (the LRU evicted it under churn) goes back
/// to its backend with its next segment, and the datapath counts the loss; a new
/// connection's SYN finds nothing lost.
#[test]
fn a_connection_that_lost_its_entry_returns_to_its_backend() {
    let mut node = Node::new();
    let frontend = SocketAddrV4::new(VIP, 80);
    node.add_service(
        frontend,
        IPPROTO_TCP,
        &backends(3),
        Lb4Service::frontend(0, SVC_FLAG_CLUSTER_IP),
    );
    let clients: Vec<_> = flows().into_iter().step_by(10).collect();
    let first: Vec<_> = clients
        .iter()
        .map(|c| node.tcp_backend(*c, frontend))
        .collect();
    assert_eq!(node.maps.ct_stats().unwrap().service_lost, 0);
    for client in &clients {
        let key = Ct4Key::new(
            (*client.ip(), client.port()),
            (*frontend.ip(), frontend.port()),
            IPPROTO_TCP,
            CT_SERVICE,
        );
        node.maps.conntrack.remove(&key).unwrap();
    }
    let again: Vec<_> = clients
        .iter()
        .map(|c| node.backend_of(&tcp(*c, frontend, TCP_ACK, b"more")))
        .collect();
    let moved = first.iter().zip(&again).filter(|(a, b)| a != b).count();
    let lost = node.maps.ct_stats().unwrap().service_lost;
    println!(
        "{} connections over 3 backends {:?}: {moved} moved after losing their entry, {lost} \
         losses counted",
        clients.len(),
        spread(&first)
    );
    assert_eq!(moved, 0);
    assert_eq!(lost, clients.len() as u64);
    assert_eq!(spread(&first).len(), 3, "the hash spreads flows");
}
