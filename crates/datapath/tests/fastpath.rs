//! The established path in place: real TCP request/response transactions between two pods
//! of one node through a ClusterIP, with BPF run-time statistics on, printing what each
//! program costs per run during the transactions (run with `--nocapture`). Needs root;
//! never skipped.
//!
//! ```text
//! client netns  eth0 10.0.1.2/24 ─veth─ lxc-c 10.0.1.1 ┐
//! backend netns eth0 10.0.2.2/24 ─veth─ lxc-b 10.0.2.1 ┴ node netns (forwarding, programs on lxc-*)
//! ```
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use sluice_common::{
    EndpointInfo, IPPROTO_TCP, IPPROTO_UDP, Lb4BackendKey, Lb4Key, Lb4Service, SVC_FLAG_CLUSTER_IP,
    programs::{FROM_CONTAINER, TO_CONTAINER},
};
use sluice_datapath::DatapathConfig;
use sluice_netns::NsThread;
use support::{
    NetNs,
    two_pods::{BACKEND, BACKEND_IDENTITY, TwoPods, VIP, WEB},
};

const TIMEOUT: Duration = Duration::from_secs(3);
/// Transactions measured (each a request and a response: one run of each program per
/// direction).
const TRANSACTIONS: u32 = 20_000;

/// Answers every byte it reads on its first connection with one byte, until the peer
/// closes it or falls silent for TIMEOUT (a connection the datapath cut never closes).
fn echo_server(netns: &NetNs, bind: SocketAddrV4) -> NsThread<()> {
    let (ready, is_ready) = std::sync::mpsc::channel();
    let thread = netns.spawn(move || {
        let listener = TcpListener::bind(bind).expect("bind");
        ready.send(()).unwrap();
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_nodelay(true).unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut byte = [0u8; 1];
        while matches!(conn.read(&mut byte), Ok(1)) {
            if conn.write_all(&byte).is_err() {
                break;
            }
        }
    });
    is_ready.recv_timeout(TIMEOUT).expect("server ready");
    thread
}

/// `count` one-byte transactions on `conn`.
fn transact(conn: &mut TcpStream, count: u32) -> std::io::Result<()> {
    let mut byte = [0u8; 1];
    for _ in 0..count {
        conn.write_all(b"x")?;
        conn.read_exact(&mut byte)?;
    }
    Ok(())
}

fn transactions(conn: &mut TcpStream, count: u32) {
    transact(conn, count).expect("transactions");
}

/// A new connection to the ClusterIP from the client pod.
fn connect(topo: &TwoPods) -> std::io::Result<TcpStream> {
    topo.client.run(|| {
        let conn = TcpStream::connect_timeout(&VIP.into(), TIMEOUT)?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(TIMEOUT))?;
        Ok(conn)
    })
}

/// Per-run costs of the programs on an established connection through a ClusterIP: the
/// profile the issue's target is about (≤ 150 ns per program run).
#[test]
fn established_flow_cost_in_place() {
    let mut topo = TwoPods::new(DatapathConfig::default());
    // Run-time statistics of every BPF program stay on while this fd is held.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let server = echo_server(&topo.backend, WEB);
    let mut conn = connect(&topo).expect("connect");
    // Warm up: the connection established, neighbours resolved, caches filled.
    transactions(&mut conn, 1_000);
    let before = topo.run_stats();
    let cache_before = topo.maps.flow_stats().expect("flow4_stats");
    let started = Instant::now();
    transactions(&mut conn, TRANSACTIONS);
    let took = started.elapsed();
    let after = topo.run_stats();
    let cache_after = topo.maps.flow_stats().expect("flow4_stats");
    drop(conn);
    server.join().expect("server thread");

    println!(
        "{TRANSACTIONS} transactions in {:.0} ms ({:.1} µs each)",
        took.as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e6 / f64::from(TRANSACTIONS)
    );
    for (name, (b, a)) in [FROM_CONTAINER, TO_CONTAINER]
        .into_iter()
        .zip(before.into_iter().zip(after))
    {
        let runs = a.1 - b.1;
        let ns = if runs == 0 {
            0.0
        } else {
            (a.0 - b.0) as f64 / runs as f64
        };
        println!("  {name:<15} {runs:>7} runs {ns:>7.0} ns/run");
    }
    let hits = cache_after.hits - cache_before.hits;
    let decided = cache_after.decided - cache_before.decided;
    println!("  flow cache: {hits} packets forwarded from it, {decided} decisions recorded");
    // Every request and every response crossed from_container once.
    let from_runs = after[0].1 - before[0].1;
    assert!(
        from_runs >= u64::from(2 * TRANSACTIONS),
        "{from_runs} runs of from_container"
    );
}

/// Both checksum kinds through the cache's single checksum update: with transmit
/// checksum offload off in both pods their TCP segments carry a complete checksum
/// (CHECKSUM_NONE) instead of the pseudo-header sum for offload (CHECKSUM_PARTIAL, the
/// other tests); a wrong one would be dropped by the receiver and the transactions
/// would stall.
#[test]
fn established_flow_through_the_cache_without_checksum_offload() {
    let topo = TwoPods::new(DatapathConfig::default());
    for pod in [&topo.client, &topo.backend] {
        pod.ns().set_tx_checksum("eth0", false).unwrap();
    }
    let server = echo_server(&topo.backend, WEB);
    let mut conn = connect(&topo).expect("connect");
    let before = topo.maps.flow_stats().expect("flow4_stats").hits;
    transactions(&mut conn, 1_000);
    let hits = topo.maps.flow_stats().expect("flow4_stats").hits - before;
    assert!(hits >= 1_900, "{hits} packets from the cache of 2,000");
    drop(conn);
    server.join().expect("server thread");
}

/// UDP request/response through the ClusterIP, with transmit checksum offload on (the
/// field holds the pseudo-header sum) and off (a complete checksum): every datagram
/// arrives intact, both directions from the cache once decided.
#[test]
fn established_udp_flow_through_the_cache() {
    for offload in [true, false] {
        let mut topo = TwoPods::new(DatapathConfig::default());
        support::add_service(&mut topo.maps, VIP, IPPROTO_UDP, &[WEB]);
        for pod in [&topo.client, &topo.backend] {
            pod.ns().set_tx_checksum("eth0", offload).unwrap();
        }
        let (ready, is_ready) = std::sync::mpsc::channel();
        let server = topo.backend.spawn(move || {
            let socket = UdpSocket::bind(WEB).expect("bind");
            socket.set_read_timeout(Some(TIMEOUT)).unwrap();
            ready.send(()).unwrap();
            let mut buf = [0u8; 64];
            // Echoes until the client falls silent.
            while let Ok((len, from)) = socket.recv_from(&mut buf) {
                socket.send_to(&buf[..len], from).expect("send_to");
            }
        });
        is_ready.recv_timeout(TIMEOUT).expect("server ready");
        let before = topo.maps.flow_stats().expect("flow4_stats").hits;
        let echoed = topo.client.run(|| {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(VIP)?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            let mut buf = [0u8; 64];
            for i in 0..1_000u32 {
                // Long enough for the cache, which reads a TCP header's worth of L4 bytes.
                let datagram = [i.to_be_bytes(); 8].concat();
                socket.send(&datagram)?;
                let len = socket.recv(&mut buf)?;
                assert_eq!(&buf[..len], &datagram, "datagram {i}");
            }
            std::io::Result::Ok(())
        });
        echoed.unwrap_or_else(|err| panic!("offload {offload}: {err}"));
        let hits = topo.maps.flow_stats().expect("flow4_stats").hits - before;
        assert!(
            hits >= 1_900,
            "offload {offload}: {hits} datagrams from the cache of 2,000"
        );
        server.join().expect("server thread");
    }
}

/// The cache is taken, and an established flow behaves through it as through the slow
/// path: a policy changed to deny all (then deleted) leaves it running, as verdicts judge
/// new connections only, while new connections follow the policy at once; its backend
/// removed, its next packet is refused at once, not served from the cache. The changes
/// are written as the realizer writes them, generation included.
#[test]
fn established_flows_through_the_cache_follow_policy_and_backends() {
    let mut topo = TwoPods::new(DatapathConfig::default());
    let server = echo_server(&topo.backend, WEB);
    let mut conn = connect(&topo).expect("connect");
    transactions(&mut conn, 100);
    let hits = |topo: &TwoPods| topo.maps.flow_stats().expect("flow4_stats").hits;
    let taken = hits(&topo);
    assert!(taken >= 150, "{taken} packets from the cache of 200");

    // The backend's policy now admits nothing: the established connection goes on (from
    // the cache again once decided anew), a new one is dropped.
    let backend_ifindex = topo.ifindex("lxc-b");
    let _deny_all = support::install_policy(&mut topo.maps, backend_ifindex, &[]);
    topo.maps
        .bump_flow_generation()
        .expect("bump the generation");
    transactions(&mut conn, 100);
    let after_deny = hits(&topo);
    assert!(
        after_deny >= taken + 150,
        "{} packets from the cache of 200",
        after_deny - taken
    );
    let refused = topo
        .client
        .run(|| TcpStream::connect_timeout(&VIP.into(), Duration::from_millis(500)).map(drop));
    assert!(
        refused.is_err(),
        "a new connection passed a deny-all policy"
    );

    // The policy deleted: new connections pass again, the established one still does.
    let mut endpoint = EndpointInfo::new(BACKEND, BACKEND_IDENTITY);
    endpoint.flags = 0;
    topo.maps
        .endpoints
        .insert(backend_ifindex, endpoint, 0)
        .unwrap();
    topo.maps
        .bump_flow_generation()
        .expect("bump the generation");
    transactions(&mut conn, 100);
    drop(connect(&topo).expect("a new connection once the policy is deleted"));

    // The backend removed, as the realizer removes it (the frontend keeps no slot): the
    // connection's next packet is refused, not delivered from the cache.
    topo.maps
        .backends
        .remove(&Lb4BackendKey::new(BACKEND, WEB.port(), IPPROTO_TCP))
        .unwrap();
    topo.maps
        .services
        .insert(
            Lb4Key::new(*VIP.ip(), VIP.port(), IPPROTO_TCP, 0),
            Lb4Service::frontend(0, SVC_FLAG_CLUSTER_IP),
            0,
        )
        .unwrap();
    // (Replies from the removed backend still reach the client, through the cache too,
    // as the slow path reverse-NATs them: only requests choose a backend.)
    topo.maps
        .bump_flow_generation()
        .expect("bump the generation");
    let broken = transact(&mut conn, 1);
    assert!(
        broken.is_err(),
        "a removed backend still served an established flow"
    );
    drop(conn);
    server.join().expect("server thread");
}
