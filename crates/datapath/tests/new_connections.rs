//! New connections in place (the benchmark's CRR phase): real TCP connections, each
//! connect, one one-byte request and response, close, from a client pod to a backend pod
//! of one node through a ClusterIP and straight to the pod, with BPF run-time statistics
//! on. Prints what the slow path costs per run and per connection and what the closed
//! connections leave in the conntrack and flow tables (run with `--nocapture`). Needs
//! root; never skipped.
//!
//! ```text
//! client netns  eth0 10.0.1.2/24 ─veth─ lxc-c 10.0.1.1 ┐
//! backend netns eth0 10.0.2.2/24 ─veth─ lxc-b 10.0.2.1 ┴ node netns (forwarding, programs on lxc-*)
//! ```
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    io::{self, Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData};
use sluice_common::{
    Flow4Key, Flow4Slot, IPPROTO_TCP, MapId,
    programs::{FROM_CONTAINER, TO_CONTAINER},
};
use sluice_datapath::DatapathConfig;
use support::{
    NetNs, Server,
    two_pods::{BACKEND, TwoPods, VIP, WEB},
};

const TIMEOUT: Duration = Duration::from_secs(3);
/// A connection slower than this waited for a retransmission (the first SYN
/// retransmission comes after a second): counted as a stall.
const STALL: Duration = Duration::from_millis(200);

/// What this test reads of the two pods' node.
trait Counted {
    fn conntrack_entries(&self) -> usize;
    fn flow_entries(&self) -> usize;
}

/// The two pods with enough client ports for thousands of connections in seconds, as the
/// benchmark's clients have.
fn topology(config: DatapathConfig) -> TwoPods {
    let topo = TwoPods::new(config);
    topo.client
        .ns()
        .set_sysctls(&[("net.ipv4.ip_local_port_range", "1024 65535")])
        .unwrap();
    topo
}

impl Counted for TwoPods {
    /// Entries of the conntrack table.
    fn conntrack_entries(&self) -> usize {
        self.maps.conntrack.keys().filter_map(Result::ok).count()
    }

    /// Decisions in the flow cache: its slots that hold a key (a forgotten or never
    /// written slot's key is zero; the registry leaves the cache uncounted).
    fn flow_entries(&self) -> usize {
        let path = self.pins.path().join(MapId::FlowCache.name());
        let data = MapData::from_pin(&path).expect("open flow4");
        let slots: Array<_, Flow4Slot> =
            Array::try_from(Map::Array(data)).expect("flow4 as an array");
        slots
            .iter()
            .filter_map(Result::ok)
            .filter(|slot| slot.key != Flow4Key::default())
            .count()
    }
}

/// Which end of a connection closes first; the other closes once it read the EOF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closer {
    /// As in the benchmark's CRR phase.
    Client,
    Server,
}

/// Accepts connections on `bind`, answers each one-byte request with its byte and closes
/// as `closer` says; counts the connections it served in `served`.
fn crr_server(netns: &NetNs, bind: SocketAddrV4, closer: Closer, served: Arc<AtomicU64>) -> Server {
    Server::tcp(netns, bind, move |conn, _| {
        // A connection the datapath broke is the client's to report.
        if serve_one(conn, closer).is_ok() {
            served.fetch_add(1, Ordering::Relaxed);
        }
    })
}

fn serve_one(mut conn: TcpStream, closer: Closer) -> io::Result<()> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte)?;
    conn.write_all(&byte)?;
    if closer == Closer::Client {
        until_eof(&mut conn)?;
    }
    Ok(())
}

/// Reads until the peer's FIN.
fn until_eof(conn: &mut TcpStream) -> io::Result<()> {
    let mut byte = [0u8; 1];
    while conn.read(&mut byte)? > 0 {}
    Ok(())
}

/// The client's TCP counters of retransmission: (TcpExt TCPSynRetrans, Tcp RetransSegs),
/// from its own namespace's /proc/net (it shows the namespace of the thread reading it).
fn retransmissions(client: &NetNs) -> (u64, u64) {
    client.run(|| {
        let field = |file: &str, table: &str, name: &str| -> u64 {
            let text = std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
                .unwrap_or_else(|err| panic!("reading /proc/net/{file}: {err}"));
            let mut lines = text.lines().filter(|l| l.starts_with(&format!("{table}:")));
            let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
            let at = names
                .split_whitespace()
                .position(|n| n == name)
                .unwrap_or_else(|| panic!("{table} {name} in /proc/net/{file}"));
            values.split_whitespace().nth(at).unwrap().parse().unwrap()
        };
        (
            field("netstat", "TcpExt", "TCPSynRetrans"),
            field("snmp", "Tcp", "RetransSegs"),
        )
    })
}

/// What `count` connections to `to` took: each connected, one transaction, closed.
struct Crr {
    elapsed: Duration,
    failed: u64,
    stalled: u64,
}

/// `count` connections from the client pod to `to`, one at a time, closed as `closer`
/// says.
fn connect_request_close(topo: &TwoPods, to: SocketAddrV4, count: u32, closer: Closer) -> Crr {
    topo.client.run(move || {
        let mut crr = Crr {
            elapsed: Duration::ZERO,
            failed: 0,
            stalled: 0,
        };
        let started = Instant::now();
        for _ in 0..count {
            let t = Instant::now();
            let result = (|| -> io::Result<()> {
                let mut conn = TcpStream::connect_timeout(&to.into(), TIMEOUT)?;
                conn.set_nodelay(true)?;
                conn.set_read_timeout(Some(TIMEOUT))?;
                conn.write_all(b"x")?;
                let mut byte = [0u8; 1];
                conn.read_exact(&mut byte)?;
                if closer == Closer::Server {
                    until_eof(&mut conn)?;
                }
                Ok(())
            })();
            if result.is_err() {
                crr.failed += 1;
            } else if t.elapsed() > STALL {
                crr.stalled += 1;
            }
        }
        crr.elapsed = started.elapsed();
        crr
    })
}

/// Waits until the server has seen every connection close (its last FIN answered), so
/// the tables hold what the closed connections left.
fn wait_served(served: &AtomicU64, count: u64) {
    let deadline = Instant::now() + TIMEOUT;
    while served.load(Ordering::Relaxed) < count && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The client's last ACK crosses the datapath after the server's FIN.
    std::thread::sleep(Duration::from_millis(50));
}

/// What the connections left in the tables once closed.
#[derive(Debug, PartialEq, Eq)]
struct Left {
    conntrack: usize,
    flows: usize,
}

/// One measured run of `count` connections to `to`, closed as `closer` says, printed
/// under `what`; returns what they left in the tables once closed.
fn measure(topo: &mut TwoPods, to: SocketAddrV4, count: u32, closer: Closer, what: &str) -> Left {
    let served = Arc::new(AtomicU64::new(0));
    let server = crr_server(&topo.backend, WEB, closer, served.clone());
    // Warm up: neighbours resolved.
    let warm = connect_request_close(topo, to, 10, closer);
    assert_eq!(warm.failed, 0, "{what}: warm-up connections failed");
    wait_served(&served, 10);
    let ct_before = topo.conntrack_entries();
    let before = topo.run_stats();
    let retrans_before = retransmissions(&topo.client);
    let crr = connect_request_close(topo, to, count, closer);
    let after = topo.run_stats();
    let retrans_after = retransmissions(&topo.client);
    wait_served(&served, u64::from(count) + 10);
    drop(server);
    let (ct_after, flows) = (topo.conntrack_entries(), topo.flow_entries());

    println!(
        "{what}: {count} connections in {:.0} ms ({:.0}/s, {:.1} µs each), {} failed, {} \
         stalled over {} ms; SYN retransmissions {}, retransmitted segments {}",
        crr.elapsed.as_secs_f64() * 1e3,
        f64::from(count) / crr.elapsed.as_secs_f64(),
        crr.elapsed.as_secs_f64() * 1e6 / f64::from(count),
        crr.failed,
        crr.stalled,
        STALL.as_millis(),
        retrans_after.0 - retrans_before.0,
        retrans_after.1 - retrans_before.1,
    );
    let mut total_ns = 0;
    for (name, (b, a)) in [FROM_CONTAINER, TO_CONTAINER]
        .into_iter()
        .zip(before.into_iter().zip(after))
    {
        let runs = a.1 - b.1;
        let ns = a.0 - b.0;
        total_ns += ns;
        println!(
            "  {name:<15} {runs:>7} runs ({:.1} per connection) {:>6.0} ns/run",
            runs as f64 / f64::from(count),
            if runs == 0 {
                0.0
            } else {
                ns as f64 / runs as f64
            }
        );
    }
    println!(
        "  eBPF per connection: {:.0} ns; conntrack entries {ct_before} before, {ct_after} \
         after; flow cache entries after: {flows}",
        total_ns as f64 / f64::from(count)
    );
    assert_eq!(crr.failed, 0, "{what}: connections failed");
    Left {
        conntrack: ct_after,
        flows,
    }
}

/// What the slow path costs a new connection, through a ClusterIP and straight to the
/// pod, with conntrack far from full: the per-run and per-connection figures the
/// benchmark's CRR phase is made of.
#[test]
fn new_connection_cost_in_place() {
    let mut topo = topology(DatapathConfig::default());
    // Run-time statistics of every BPF program stay on while this fd is held.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    measure(
        &mut topo,
        VIP,
        5_000,
        Closer::Client,
        "through the ClusterIP",
    );
    measure(&mut topo, WEB, 5_000, Closer::Client, "straight to the pod");
}

/// The same with a conntrack table that the closed connections would fill many times
/// over if they stayed for their closing lifetime (4,096 entries, 8,000 connections of
/// three entries each): they leave nothing, so no new connection pays for evictions.
#[test]
fn new_connection_cost_with_a_small_table() {
    let mut topo = topology(DatapathConfig {
        ct_max_entries: 4_096,
        ..DatapathConfig::default()
    });
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let left = measure(
        &mut topo,
        VIP,
        8_000,
        Closer::Client,
        "through the ClusterIP, 4,096 conntrack entries",
    );
    assert_eq!(
        left,
        Left {
            conntrack: 0,
            flows: 0
        }
    );
}

/// A connection closed cleanly (a FIN each way, then the last ACK) leaves no conntrack
/// entry and no flow cache decision, whichever end closed first, through a service or
/// straight to the pod; a connection still open keeps its entries (three through a
/// service: the client's choice of backend, its egress and the backend's ingress).
#[test]
fn closed_connections_leave_no_entries() {
    let mut topo = topology(DatapathConfig::default());
    // An open connection through another port of the service, one transaction done; its
    // server echoes until the client closes.
    let (vip_open, web_open) = (
        SocketAddrV4::new(*VIP.ip(), 81),
        SocketAddrV4::new(BACKEND, 8081),
    );
    support::add_service(&mut topo.maps, vip_open, IPPROTO_TCP, &[web_open]);
    let (ready, is_ready) = std::sync::mpsc::channel();
    let echo = topo.backend.spawn(move || {
        let listener = TcpListener::bind(web_open).expect("bind");
        ready.send(()).unwrap();
        let (mut conn, _) = listener.accept().expect("accept");
        let mut byte = [0u8; 1];
        while matches!(conn.read(&mut byte), Ok(1)) {
            conn.write_all(&byte).expect("echo");
        }
    });
    is_ready.recv_timeout(TIMEOUT).expect("echo server ready");
    let mut open = topo
        .client
        .run(|| {
            let mut conn = TcpStream::connect_timeout(&vip_open.into(), TIMEOUT)?;
            conn.set_read_timeout(Some(TIMEOUT))?;
            conn.write_all(b"x")?;
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte)?;
            io::Result::Ok(conn)
        })
        .expect("the open connection");
    let open_left = Left {
        conntrack: topo.conntrack_entries(),
        flows: topo.flow_entries(),
    };
    assert_eq!(open_left.conntrack, 3, "the open connection's entries");

    for closer in [Closer::Client, Closer::Server] {
        for to in [VIP, WEB] {
            let left = measure(
                &mut topo,
                to,
                200,
                closer,
                &format!("to {to}, {closer:?} closes first"),
            );
            assert_eq!(left, open_left, "to {to}, {closer:?} closes first");
        }
    }

    // The open connection still works, its entries all there.
    open.write_all(b"y").expect("write on the open connection");
    let mut byte = [0u8; 1];
    open.read_exact(&mut byte)
        .expect("read on the open connection");
    drop(open);
    echo.join().expect("echo server");
}
