//! Connection churn never breaks a live connection (issue 18 item 4): a real agent with a
//! small conntrack table (`--ct-max-entries 4096`) on a node with a client pod and two
//! backend pods behind a ClusterIP; an idle TCP connection and a connected UDP socket, a
//! churn of 20,000 short TCP connections to the same Service, each reset as it closes
//! (a clean close removes a connection's entries with its last ACK, and would leave the
//! table nothing to evict; a reset one keeps them for the closing lifetime), then both
//! idle flows send again and must reach the backend they had (needs root and bpffs;
//! never skipped).
//!
//! ```text
//! client eth0 10.244.1.2 ─veth─ lxc-cl ┐
//! back-0 eth0 10.244.1.3 ─veth─ lxc-b0 ├ node (router 10.244.1.1, the agent)
//! back-1 eth0 10.244.1.4 ─veth─ lxc-b1 ┘
//! ```
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_common::{CT_SERVICE, Ct4Key, IPPROTO_TCP, IPPROTO_UDP};
use sluice_datapath::PinnedMaps;
use sluice_netns::{NsThread, OwnedNetNs};
use support::{Agent, NODE, routed_node, wired_pod};

const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const BACKENDS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 244, 1, 3), Ipv4Addr::new(10, 244, 1, 4)];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 7);
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const TARGET_PORT: u16 = 8080;
const CT_MAX: u32 = 4096;
const CHURN: usize = 20_000;
const TRIALS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(3);
const METRICS: &str = "127.0.0.1:9977";

/// The cluster file: node-1 with the three pods, and the Service on TCP and UDP with both
/// backends ready.
fn cluster() -> sluice_store::Snapshot {
    let pod = |name: &str, address: Ipv4Addr, app: &str| {
        serde_json::json!({"metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"nodeName": NODE, "containers": [{"name": "c"}]},
            "status": {"podIP": address.to_string()}})
    };
    let endpoint = |name: &str, interface: &str, address: Ipv4Addr| {
        serde_json::json!({"node": NODE, "namespace": "default", "pod": name,
            "interface": interface, "addresses": [address.to_string()]})
    };
    let ready = BACKENDS
        .map(|b| serde_json::json!({"addresses": [b.to_string()], "conditions": {"ready": true}}));
    serde_json::from_value(serde_json::json!({
        "revision": 1,
        "nodes": [{"metadata": {"name": NODE}, "spec": {"podCIDR": "10.244.1.0/24"},
                   "status": {"addresses": [{"type": "InternalIP", "address": "172.31.0.1"}]}}],
        "namespaces": [{"metadata": {"name": "default",
                                      "labels": {"kubernetes.io/metadata.name": "default"}}}],
        "pods": [pod("client", CLIENT, "client"), pod("back-0", BACKENDS[0], "back"),
                 pod("back-1", BACKENDS[1], "back")],
        "endpoints": [endpoint("client", "lxc-cl", CLIENT), endpoint("back-0", "lxc-b0", BACKENDS[0]),
                      endpoint("back-1", "lxc-b1", BACKENDS[1])],
        "services": [{"metadata": {"name": "churn", "namespace": "default"},
            "spec": {"type": "ClusterIP", "clusterIP": VIP.to_string(), "ports": [
                {"name": "tcp", "port": TCP_PORT, "protocol": "TCP", "targetPort": TARGET_PORT},
                {"name": "udp", "port": UDP_PORT, "protocol": "UDP", "targetPort": TARGET_PORT}]}}],
        "endpointSlices": [{"metadata": {"name": "churn-1", "namespace": "default",
                                         "labels": {"kubernetes.io/service-name": "churn"}},
            "addressType": "IPv4", "endpoints": ready,
            "ports": [{"name": "tcp", "port": TARGET_PORT, "protocol": "TCP"},
                      {"name": "udp", "port": TARGET_PORT, "protocol": "UDP"}]}],
    }))
    .unwrap()
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A backend's servers, stopped and joined on drop: TCP answers each line with the
/// backend's address, UDP each datagram.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<NsThread<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                eprintln!("a server thread panicked");
            }
        }
    }
}

fn serve(pod: &OwnedNetNs, address: Ipv4Addr) -> Servers {
    let stop = Arc::new(AtomicBool::new(false));
    let bind = SocketAddrV4::new(address, TARGET_PORT);
    let tcp = pod
        .spawn({
            let stop = stop.clone();
            move || serve_tcp(TcpListener::bind(bind).expect("bind TCP"), address, &stop)
        })
        .unwrap();
    let udp = pod
        .spawn({
            let stop = stop.clone();
            move || {
                let socket = UdpSocket::bind(bind).expect("bind UDP");
                socket
                    .set_read_timeout(Some(Duration::from_millis(20)))
                    .unwrap();
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                        socket
                            .send_to(address.to_string().as_bytes(), peer)
                            .unwrap();
                    }
                }
            }
        })
        .unwrap();
    Servers {
        stop,
        threads: vec![tcp, udp],
    }
}

/// One thread for every connection, none per connection (the churn opens 20,000 a trial):
/// accepts what is pending, answers each line a held connection sent with `address`, and
/// lets go of those the peer closed. Sleeps a millisecond only when nothing happened.
fn serve_tcp(listener: TcpListener, address: Ipv4Addr, stop: &AtomicBool) {
    listener.set_nonblocking(true).unwrap();
    let mut held: Vec<TcpStream> = Vec::new();
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        let mut busy = false;
        loop {
            match listener.accept() {
                Ok((conn, _)) => {
                    conn.set_nonblocking(true).unwrap();
                    held.push(conn);
                    busy = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("accept: {e}"),
            }
        }
        held.retain_mut(|conn| match conn.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                busy = true;
                let lines = buf[..n].iter().filter(|b| **b == b'\n').count();
                (0..lines).all(|_| writeln!(conn, "{address}").is_ok())
            }
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        });
        if !busy {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The node with its pods wired, the backends serving, and the agent.
/// Fields drop in order: servers and agent before the namespaces they run in.
struct Node {
    _servers: Vec<Servers>,
    agent: Agent,
    client: OwnedNetNs,
    _backends: Vec<OwnedNetNs>,
    node: OwnedNetNs,
    _dir: TempDir,
}

impl Node {
    fn new() -> Self {
        let (node, on_node) = routed_node("sct-node-", ROUTER);
        let pod = |prefix: &str, interface: &str, address: Ipv4Addr| {
            wired_pod(&on_node, prefix, interface, address, ROUTER)
        };
        let client = pod("sct-client-", "lxc-cl", CLIENT);
        // 20,000 connections per trial close from the client side: their TIME_WAIT
        // sockets must not run the client out of ports.
        client
            .set_sysctls(&[
                ("net.ipv4.tcp_tw_reuse", "1"),
                ("net.ipv4.ip_local_port_range", "1024 65000"),
            ])
            .unwrap();
        let backends = vec![
            pod("sct-back0-", "lxc-b0", BACKENDS[0]),
            pod("sct-back1-", "lxc-b1", BACKENDS[1]),
        ];
        let servers = backends
            .iter()
            .zip(BACKENDS)
            .map(|(ns, address)| serve(ns, address))
            .collect();

        let dir = TempDir(std::env::temp_dir().join(sluice_netns::unique_name("sct-cluster-")));
        std::fs::create_dir_all(&dir.0).unwrap();
        let cluster_file = dir.0.join("cluster.json");
        cluster().write_file(&cluster_file).unwrap();
        let ct_max = CT_MAX.to_string();
        let args = [
            "--ct-max-entries",
            &ct_max,
            "--ct-pressure-interval",
            "0.2",
            "--reconcile-interval",
            "1",
            "--metrics-address",
            METRICS,
        ];
        let mut agent = Agent::start_node("ct-churn", NODE, node.name(), &cluster_file, &args);
        agent.wait_realized(1);
        Self {
            _servers: servers,
            agent,
            client,
            _backends: backends,
            node,
            _dir: dir,
        }
    }

    /// GET /metrics from the agent, inside the node's namespace.
    fn metrics(&self) -> String {
        self.node
            .run(|| {
                let mut conn = TcpStream::connect(METRICS).expect("connect to /metrics");
                conn.set_read_timeout(Some(TIMEOUT)).unwrap();
                write!(
                    conn,
                    "GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let mut text = String::new();
                conn.read_to_string(&mut text).expect("read /metrics");
                text
            })
            .unwrap()
    }
}

/// The value of the sample `name` (with its labels) in a metrics text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// What one trial saw.
#[derive(Debug, Default)]
struct Trial {
    tcp_broken: bool,
    udp_broken: bool,
    /// Whether the idle flows' CT_SERVICE entries were gone before they sent again.
    tcp_entry_lost: bool,
    udp_entry_lost: bool,
    /// Churn connections that failed (the churn may lose some; it is not what is judged).
    churn_failed: usize,
    churn_time: Duration,
}

/// Asks on the idle TCP connection which backend serves it.
fn tcp_ask(reader: &mut BufReader<TcpStream>) -> io::Result<String> {
    writeln!(reader.get_mut(), "who")?;
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim().to_owned())
}

fn udp_ask(socket: &UdpSocket) -> io::Result<String> {
    socket.send(b"who")?;
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Makes `conn` close with a reset (SO_LINGER of zero seconds) when dropped.
fn reset_on_close(conn: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `conn` is an open socket and `linger` a live value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
}

/// One trial inside the client pod: open the idle flows, churn, ask again.
fn trial(maps: &PinnedMaps) -> Trial {
    let frontend = SocketAddrV4::new(VIP, TCP_PORT);
    let stream = TcpStream::connect_timeout(&frontend.into(), TIMEOUT).expect("idle connection");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let local = stream.local_addr().unwrap();
    let mut idle = BufReader::new(stream);
    let tcp_first = tcp_ask(&mut idle).expect("the idle connection answers");
    let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
    udp.connect(SocketAddrV4::new(VIP, UDP_PORT)).unwrap();
    udp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let udp_local = udp.local_addr().unwrap();
    let udp_first = udp_ask(&udp).expect("the connected UDP socket answers");

    let started = Instant::now();
    let mut churn_failed = 0;
    for _ in 0..CHURN {
        match TcpStream::connect(frontend) {
            Ok(conn) => reset_on_close(&conn),
            Err(_) => churn_failed += 1,
        }
    }
    let churn_time = started.elapsed();

    let port = |addr: std::net::SocketAddr| addr.port();
    let service_key = |local_port, dport, proto| {
        Ct4Key::new((CLIENT, local_port), (VIP, dport), proto, CT_SERVICE)
    };
    let tcp_entry_lost = maps
        .conntrack
        .get(&service_key(port(local), TCP_PORT, IPPROTO_TCP), 0)
        .is_err();
    let udp_entry_lost = maps
        .conntrack
        .get(&service_key(port(udp_local), UDP_PORT, IPPROTO_UDP), 0)
        .is_err();

    let tcp_then = tcp_ask(&mut idle);
    let udp_then = udp_ask(&udp);
    if tcp_then.as_deref().ok() != Some(tcp_first.as_str()) {
        eprintln!("TCP: first {tcp_first}, after the churn {tcp_then:?}");
    }
    if udp_then.as_deref().ok() != Some(udp_first.as_str()) {
        eprintln!("UDP: first {udp_first}, after the churn {udp_then:?}");
    }
    Trial {
        tcp_broken: tcp_then.ok().as_ref() != Some(&tcp_first),
        udp_broken: udp_then.ok().as_ref() != Some(&udp_first),
        tcp_entry_lost,
        udp_entry_lost,
        churn_failed,
        churn_time,
    }
}

#[test]
fn idle_connections_keep_their_backend_through_a_churn_many_times_the_table() {
    let node = Node::new();
    let maps = Arc::new(PinnedMaps::open(node.agent.pins.path()).unwrap());
    let started = Instant::now();
    let mut trials = Vec::new();
    for n in 0..TRIALS {
        let maps = Arc::clone(&maps);
        let result = node.client.run(move || trial(&maps)).unwrap();
        let status = node.agent.status();
        let pressure = status
            .conntrack_pressure
            .clone()
            .expect("conntrack pressure in status");
        println!(
            "trial {n}: {CHURN} connections in {:.1} s ({:.0}/s, {} failed); idle TCP entry \
             lost {}, UDP entry lost {}; broken TCP {}, UDP {}; status: fill {} of {}, {} \
             removed under pressure, {} service entries found lost",
            result.churn_time.as_secs_f64(),
            CHURN as f64 / result.churn_time.as_secs_f64(),
            result.churn_failed,
            result.tcp_entry_lost,
            result.udp_entry_lost,
            result.tcp_broken,
            result.udp_broken,
            pressure.entries,
            pressure.max_entries,
            pressure.removed_under_pressure,
            pressure.service_entries_lost,
        );
        trials.push(result);
    }
    let metrics = node.metrics();
    let lost = sample(&metrics, "sluice_conntrack_service_entries_lost_total");
    let pressure = sample(
        &metrics,
        "sluice_conntrack_gc_deleted_total{reason=\"pressure\"}",
    );
    let fill = sample(&metrics, "sluice_conntrack_fill_ratio");
    let tcp_breaks = trials.iter().filter(|t| t.tcp_broken).count();
    let udp_breaks = trials.iter().filter(|t| t.udp_broken).count();
    let tcp_lost = trials.iter().filter(|t| t.tcp_entry_lost).count();
    let udp_lost = trials.iter().filter(|t| t.udp_entry_lost).count();
    println!(
        "{TRIALS} trials of {CHURN} connections with ct4 at {CT_MAX} entries in {:.1} s: \
         breaks TCP {tcp_breaks}, UDP {udp_breaks}; the idle flows' service entries were \
         gone before they sent again in {tcp_lost} (TCP) and {udp_lost} (UDP) trials; \
         metrics: {lost} service entries found lost, {pressure} entries removed under \
         pressure, fill {fill:.2}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        (tcp_breaks, udp_breaks),
        (0, 0),
        "idle flows broken by the churn"
    );
    // Otherwise the trials never exercised the loss they are about.
    assert!(
        tcp_lost + udp_lost > 0,
        "the churn never evicted the idle flows' entries"
    );
    assert!(
        lost >= tcp_lost as f64,
        "every lost TCP service entry is counted"
    );
    let status = node.agent.status();
    assert_eq!(
        status.conntrack_pressure.map(|p| p.max_entries),
        Some(CT_MAX)
    );
}
