//! Socket load balancing (`bpf/sock.c`) with real sockets (needs root; never skipped): a
//! client process in a cgroup made for the test, in the node's network namespace, reaches
//! a backend in a pod namespace through a ClusterIP that is configured nowhere; an
//! externalTrafficPolicy Local node port through its cluster-wide slots; and the backend
//! choice follows sessionAffinity and Maglev as on the tc path.
//!
//! ```text
//! node netns (cgroup <test>: the client process only) lxc-b 10.0.2.1 ─veth─ eth0 10.0.2.2 backend netns
//! ```
//!
//! The client is this test binary run again (the `node_client` test, ignored otherwise):
//! cgroup membership is per process, so the test's own threads cannot be the client
//! without putting the test runner itself in the cgroup.
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    process::Output,
    time::Duration,
};

use aya::maps::lpm_trie::Key;
use sluice_common::{
    DropReason, IPPROTO_TCP, IPPROTO_UDP, LB4_SCOPE_INTERNAL, Lb4Key, Lb4Service,
    Lb4SourceRangeKey, METRIC_DIR_EGRESS, NodeConfig, RoutingMode, SOURCE_RANGE_ALLOWED,
    SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_LOCAL,
    SVC_FLAG_MAGLEV, SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES,
};
use sluice_compiler::maglev::{self, TableSize};
use sluice_datapath::{Datapath, DatapathConfig, PinnedMaps, create_maglev_table};
use sluice_netns::{Ipv4Net, OwnedCgroup};
use support::{NetNs, PinDir, add_backend, add_service};

const NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
/// Frontends without a backend.
const EMPTY_TCP_PORT: u16 = 81;
const EMPTY_UDP_PORT: u16 = 54;
/// Three backends on one more port, each answering with its own address.
const BACKENDS: [Ipv4Addr; 3] = [
    BACKEND,
    Ipv4Addr::new(10, 0, 2, 3),
    Ipv4Addr::new(10, 0, 2, 4),
];
const WHO_PORT: u16 = 8081;
/// A node port with externalTrafficPolicy Local on the node's own address, without a
/// backend on this node; ClusterIP ports with the three backends, with and without
/// sessionAffinity, and with Maglev.
const LOCAL_NODE_PORT: u16 = 30081;
const AFFINITY_PORT: u16 = 82;
const SPREAD_PORT: u16 = 83;
const MAGLEV_PORT: u16 = 84;
/// A load balancer VIP with loadBalancerSourceRanges: its port that admits the node's
/// address, and its port (TCP and UDP) that admits only [`OUTSIDE_RANGE`].
const LB_VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 30);
const ADMITTED_PORT: u16 = 85;
const DENIED_PORT: u16 = 86;
const OUTSIDE_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(203, 0, 113, 0), 24);
/// [`CLIENT_ENV`]'s value for the checks of source ranges.
const RANGES: &str = "ranges";
/// Connections each of those frontends gets.
const PARITY_CONNECTIONS: usize = 30;
/// [`CLIENT_ENV`]'s value for the checks of backend choice.
const PARITY: &str = "parity";
const BACKEND_TCP: SocketAddrV4 = SocketAddrV4::new(BACKEND, 8080);
const BACKEND_UDP: SocketAddrV4 = SocketAddrV4::new(BACKEND, 5353);
const TCP_REPLY: &str = "backend";
const TIMEOUT: Duration = Duration::from_secs(3);
/// Set in the client's environment; the `node_client` test does nothing without it.
const CLIENT_ENV: &str = "SLUICE_SOCK_LB_CLIENT";
/// [`CLIENT_ENV`]'s value that also times connections.
const MEASURE: &str = "measure";
/// Connections timed each way.
const TIMED_CONNECTIONS: u32 = 300;

fn vip(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, port))
}

/// The node and pod namespaces, the backend servers, the socket programs on a cgroup of
/// the test's own, and the frontends. Fields drop in order: the cgroup (killing what is
/// left in it), the pins (detaching the programs), the namespaces.
struct Topology {
    cgroup: OwnedCgroup,
    maps: PinnedMaps,
    pins: PinDir,
    node: NetNs,
    _backend: NetNs,
}

impl Topology {
    fn new() -> Self {
        let node = NetNs::new();
        let backend = NetNs::new();
        let on_node = node.netlink();
        on_node
            .add_veth("lxc-b", "eth0", Some(backend.ns()))
            .unwrap();
        on_node
            .add_address("lxc-b", Ipv4Net::new(NODE, 24).unwrap().into())
            .unwrap();
        on_node.set_up("lxc-b").unwrap();
        let in_pod = backend.netlink();
        for address in BACKENDS {
            in_pod
                .add_address("eth0", Ipv4Net::new(address, 24).unwrap().into())
                .unwrap();
        }
        in_pod.set_up("eth0").unwrap();
        serve(&backend);

        let cgroup = OwnedCgroup::unique("sluice-test-")
            .unwrap_or_else(|err| panic!("creating the test's cgroup: {err}"));
        let pins = PinDir::unique("sluice-test-");
        let mut datapath = Datapath::load(pins.path(), &DatapathConfig::default())
            .unwrap_or_else(|err| panic!("loading the datapath: {err}"));
        datapath
            .attach_cgroup(sluice_datapath::AttachRole::HostCgroup, cgroup.path())
            .unwrap_or_else(|err| panic!("attaching to {}: {err}", cgroup.path().display()));
        // The pinned links keep the programs attached once the loader is gone.
        drop(datapath);

        let mut maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
        add_service(
            &mut maps,
            SocketAddrV4::new(VIP, TCP_PORT),
            IPPROTO_TCP,
            &[BACKEND_TCP],
        );
        add_service(
            &mut maps,
            SocketAddrV4::new(VIP, UDP_PORT),
            IPPROTO_UDP,
            &[BACKEND_UDP],
        );
        add_service(
            &mut maps,
            SocketAddrV4::new(VIP, EMPTY_TCP_PORT),
            IPPROTO_TCP,
            &[],
        );
        add_service(
            &mut maps,
            SocketAddrV4::new(VIP, EMPTY_UDP_PORT),
            IPPROTO_UDP,
            &[],
        );
        Self {
            cgroup,
            maps,
            pins,
            node,
            _backend: backend,
        }
    }

    /// Runs the `node_client` test of this binary in the node namespace and the cgroup
    /// (the only process ever in it), and returns its `RESULT` lines.
    fn run_client(&self) -> Vec<String> {
        self.run_client_with("1")
    }

    /// [`Self::run_client`] in `mode`: [`MEASURE`] also times connections through the
    /// ClusterIP and straight to the backend, [`PARITY`] checks the backend choice only.
    fn run_client_with(&self, mode: &str) -> Vec<String> {
        let exe = std::env::current_exe().unwrap();
        let mut command = self.node.ns().command(&exe).unwrap();
        command
            .args([
                "node_client",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CLIENT_ENV, mode);
        self.cgroup.enter_on_exec(&mut command).unwrap();
        let Output {
            status,
            stdout,
            stderr,
        } = command.output().unwrap();
        let stdout = String::from_utf8_lossy(&stdout);
        assert!(
            status.success(),
            "client failed ({status}):\n{stdout}\n{}",
            String::from_utf8_lossy(&stderr)
        );
        // libtest may print "test node_client ... " before the first line.
        let results: Vec<String> = stdout
            .lines()
            .filter_map(|l| l.split_once("RESULT "))
            .map(|(_, result)| result.to_owned())
            .collect();
        println!("client in the node's cgroup:\n  {}", results.join("\n  "));
        results
    }
}

/// The backend: a TCP server answering every connection with its name, a UDP server
/// echoing every datagram; they live as long as the process (the namespace goes first).
fn serve(backend: &NetNs) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let who_ready = ready_tx.clone();
    let _who = backend.spawn(move || {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, WHO_PORT)).unwrap();
        who_ready.send(()).unwrap();
        for mut stream in listener.incoming().flatten() {
            let me = stream.local_addr().map(|a| a.ip().to_string());
            let _ = stream.write_all(me.unwrap_or_default().as_bytes());
        }
    });
    let _tcp = backend.spawn(move || {
        let listener = TcpListener::bind(BACKEND_TCP).unwrap();
        let udp = UdpSocket::bind(BACKEND_UDP).unwrap();
        ready_tx.send(()).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                let mut reply = b"echo:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = udp.send_to(&reply, from);
            }
        });
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(TCP_REPLY.as_bytes());
        }
    });
    for _ in 0..2 {
        ready_rx
            .recv_timeout(TIMEOUT)
            .expect("backend servers ready");
    }
}

/// The client's side, run by [`Topology::run_client`] in the cgroup: one line per check.
#[test]
#[ignore = "the client process of the other tests, run by them in the node's cgroup"]
fn node_client() {
    let Some(mode) = std::env::var_os(CLIENT_ENV) else {
        return;
    };
    if mode == RANGES {
        ranges_client();
        return;
    }
    if mode == PARITY {
        for (label, to) in [
            ("local-node-port", SocketAddrV4::new(NODE, LOCAL_NODE_PORT)),
            ("affinity", SocketAddrV4::new(VIP, AFFINITY_PORT)),
            ("spread", SocketAddrV4::new(VIP, SPREAD_PORT)),
            ("maglev", SocketAddrV4::new(VIP, MAGLEV_PORT)),
        ] {
            let mut reached = std::collections::BTreeMap::<String, usize>::new();
            for _ in 0..PARITY_CONNECTIONS {
                let mut stream = TcpStream::connect_timeout(&to.into(), TIMEOUT).unwrap();
                stream.set_read_timeout(Some(TIMEOUT)).unwrap();
                let mut who = String::new();
                stream.read_to_string(&mut who).unwrap();
                *reached.entry(who).or_default() += 1;
            }
            let reached: Vec<String> = reached.iter().map(|(b, n)| format!("{b}={n}")).collect();
            println!("RESULT {label} {}", reached.join(" "));
        }
        return;
    }
    // TCP: connect() to the ClusterIP; getpeername shows it.
    let mut stream = TcpStream::connect_timeout(&vip(TCP_PORT), TIMEOUT).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    println!("RESULT tcp {} {reply}", stream.peer_addr().unwrap());

    // Unconnected UDP: sendto the ClusterIP; recvfrom shows it as the sender.
    let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
    udp.set_read_timeout(Some(TIMEOUT)).unwrap();
    udp.send_to(b"ping", vip(UDP_PORT)).unwrap();
    let mut buf = [0u8; 512];
    let (n, from) = udp.recv_from(&mut buf).unwrap();
    println!("RESULT udp {from} {}", String::from_utf8_lossy(&buf[..n]));

    // Connected UDP: connect() translates once; the peer stays the ClusterIP.
    let connected = UdpSocket::bind("0.0.0.0:0").unwrap();
    connected.set_read_timeout(Some(TIMEOUT)).unwrap();
    connected.connect(vip(UDP_PORT)).unwrap();
    connected.send(b"pong").unwrap();
    let n = connected.recv(&mut buf).unwrap();
    println!(
        "RESULT udp-connected {} {}",
        connected.peer_addr().unwrap(),
        String::from_utf8_lossy(&buf[..n])
    );

    // Frontends without a backend refuse at once.
    let refused = TcpStream::connect_timeout(&vip(EMPTY_TCP_PORT), TIMEOUT);
    println!("RESULT tcp-empty {}", outcome(refused.map(drop)));
    let refused =
        UdpSocket::bind("0.0.0.0:0").and_then(|udp| udp.send_to(b"ping", vip(EMPTY_UDP_PORT)));
    println!("RESULT udp-empty {}", outcome(refused.map(drop)));

    if mode == MEASURE {
        for (what, to) in [
            ("through the ClusterIP", vip(TCP_PORT)),
            ("straight to the backend", SocketAddr::V4(BACKEND_TCP)),
        ] {
            let started = std::time::Instant::now();
            for _ in 0..TIMED_CONNECTIONS {
                let mut stream = TcpStream::connect_timeout(&to, TIMEOUT).unwrap();
                stream.set_read_timeout(Some(TIMEOUT)).unwrap();
                let mut reply = String::new();
                stream.read_to_string(&mut reply).unwrap();
            }
            let each = started.elapsed() / TIMED_CONNECTIONS;
            println!(
                "RESULT timing {TIMED_CONNECTIONS} TCP connections {what}: {each:?} each (connect, reply, close)"
            );
        }
    }
}

/// The client's side of the source range checks: what a TCP connection to each port of
/// the load balancer VIP gets, and an unconnected UDP datagram to the denied one.
fn ranges_client() {
    for (label, port) in [("in-range", ADMITTED_PORT), ("out-of-range", DENIED_PORT)] {
        let to = SocketAddr::V4(SocketAddrV4::new(LB_VIP, port));
        let answer = TcpStream::connect_timeout(&to, TIMEOUT).and_then(|mut stream| {
            stream.set_read_timeout(Some(TIMEOUT))?;
            let mut who = String::new();
            stream.read_to_string(&mut who)?;
            Ok(who)
        });
        let answer =
            answer.unwrap_or_else(|err| format!("errno={}", err.raw_os_error().unwrap_or(0)));
        println!("RESULT {label} {answer}");
    }
    let sent = UdpSocket::bind("0.0.0.0:0")
        .and_then(|udp| udp.send_to(b"ping", SocketAddrV4::new(LB_VIP, DENIED_PORT)));
    println!("RESULT udp-out-of-range {}", outcome(sent.map(drop)));
}

/// `ok`, or the errno of the failure.
fn outcome(result: std::io::Result<()>) -> String {
    match result {
        Ok(()) => "ok".to_owned(),
        Err(err) => format!("errno={}", err.raw_os_error().unwrap_or(0)),
    }
}

#[test]
fn node_process_reaches_cluster_ip_and_sees_it_as_peer() {
    let topology = Topology::new();
    let results = topology.run_client_with(MEASURE);
    let expect = |line: &str| {
        assert!(
            results.iter().any(|r| r == line),
            "expected {line:?} among {results:?}"
        );
    };
    expect(&format!("tcp {VIP}:{TCP_PORT} {TCP_REPLY}"));
    expect(&format!("udp {VIP}:{UDP_PORT} echo:ping"));
    expect(&format!("udp-connected {VIP}:{UDP_PORT} echo:pong"));
    expect(&format!("tcp-empty errno={}", libc::ECONNREFUSED));
    expect(&format!("udp-empty errno={}", libc::ECONNREFUSED));

    // The reverse translation is keyed by socket and backend, and names the frontend.
    let frontends: Vec<_> = topology
        .maps
        .revnat_sockets
        .iter()
        .map(|entry| entry.unwrap().1.frontend())
        .collect();
    assert!(frontends.contains(&(VIP, TCP_PORT)), "{frontends:?}");
    assert!(frontends.contains(&(VIP, UDP_PORT)), "{frontends:?}");
}

#[test]
fn processes_outside_the_cgroup_are_not_translated() {
    let topology = Topology::new();
    // The test's own thread is in the node namespace but not in the cgroup: the ClusterIP
    // is configured nowhere and the node has no route to it.
    let direct = topology
        .node
        .run(|| TcpStream::connect_timeout(&vip(TCP_PORT), TIMEOUT).map(drop));
    let err = direct.expect_err("a connection to the ClusterIP from outside the cgroup");
    assert_eq!(err.raw_os_error(), Some(libc::ENETUNREACH), "{err}");
    // The cgroup's own process still is.
    let results = topology.run_client();
    assert!(
        results.contains(&format!("tcp {VIP}:{TCP_PORT} {TCP_REPLY}")),
        "{results:?}"
    );
}

#[test]
fn host_cgroup_check_refuses_the_root_and_foreign_processes() {
    use sluice_netns::{Cgroup, CgroupRefusal, NetNsError, cgroup2_root};
    let node = NetNs::new();
    let cgroup = OwnedCgroup::unique("sluice-test-").unwrap();
    let root = Cgroup::at(cgroup2_root().unwrap());
    let refusal = |cgroup: &Cgroup| {
        let cgroup = cgroup.clone();
        node.run(move || match cgroup.check_confined() {
            Err(NetNsError::CgroupRefused { reason, .. }) => Some(reason),
            Ok(()) => None,
            Err(err) => panic!("checking {}: {err}", cgroup.path().display()),
        })
    };
    assert_eq!(refusal(&root), Some(CgroupRefusal::Root));
    // Empty: nothing else would be load-balanced.
    assert_eq!(refusal(&cgroup), None);

    // A process of the root namespace in it: refused from the node's namespace.
    let mut command = std::process::Command::new("sleep");
    command.arg("60");
    cgroup.enter_on_exec(&mut command).unwrap();
    let mut sleeper = command.spawn().unwrap();
    let pid = i32::try_from(sleeper.id()).unwrap();
    assert_eq!(
        refusal(&cgroup),
        Some(CgroupRefusal::ForeignProcess {
            pid,
            cgroup: std::fs::canonicalize(cgroup.path()).unwrap()
        })
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();

    // One in the node's namespace is the node's own.
    let mut command = node.ns().command("sleep").unwrap();
    command.arg("60");
    cgroup.enter_on_exec(&mut command).unwrap();
    let mut sleeper = command.spawn().unwrap();
    assert_eq!(refusal(&cgroup), None);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// (link id, program id) of the connect4 link pinned under `pins`.
fn connect_link(pins: &PinDir) -> (u32, u32) {
    use aya::programs::links::{FdLink, PinnedLink};
    let program = sluice_datapath::PROGRAMS
        .iter()
        .find(|p| p.name == sluice_common::programs::SOCK4_CONNECT)
        .unwrap();
    let path =
        sluice_datapath::link_pin_path(pins.path(), program, sluice_datapath::HOST_CGROUP_TARGET);
    let info = FdLink::from(PinnedLink::from_pin(&path).unwrap())
        .info()
        .unwrap();
    (info.id(), info.program_id())
}

#[test]
fn a_restarted_loader_swaps_its_programs_into_the_pinned_links() {
    use sluice_datapath::{AttachRole, HOST_CGROUP_TARGET};
    let topology = Topology::new();
    let (link, old_program) = connect_link(&topology.pins);

    // A new loader on the same pins (an agent restart): the same links, its programs.
    let mut datapath = Datapath::load(topology.pins.path(), &DatapathConfig::default()).unwrap();
    datapath
        .attach_cgroup(
            sluice_datapath::AttachRole::HostCgroup,
            topology.cgroup.path(),
        )
        .unwrap();
    let new_program = datapath
        .program_info(sluice_common::programs::SOCK4_CONNECT)
        .unwrap()
        .id();
    assert_eq!(connect_link(&topology.pins), (link, new_program));
    assert_ne!(old_program, new_program);
    let results = topology.run_client();
    assert!(
        results.contains(&format!("tcp {VIP}:{TCP_PORT} {TCP_REPLY}")),
        "{results:?}"
    );

    // Detached: the pins go, and the cgroup's sockets are left alone again.
    datapath
        .detach(AttachRole::HostCgroup, HOST_CGROUP_TARGET)
        .unwrap();
    assert!(
        datapath
            .attached(AttachRole::HostCgroup)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn the_node_and_pod_cgroups_keep_links_of_their_own() {
    use sluice_datapath::{AttachRole, HOST_CGROUP_TARGET, POD_CGROUP_TARGET};
    let pins = PinDir::unique("sluice-test-");
    let host = OwnedCgroup::unique("sluice-test-host-").unwrap();
    let pods = OwnedCgroup::unique("sluice-test-pods-").unwrap();
    let mut datapath = Datapath::load(pins.path(), &DatapathConfig::default()).unwrap();
    datapath
        .attach_cgroup(AttachRole::HostCgroup, host.path())
        .unwrap();
    datapath
        .attach_cgroup(AttachRole::PodCgroup, pods.path())
        .unwrap();
    let targets = |datapath: &Datapath, role| {
        datapath
            .attached(role)
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        targets(&datapath, AttachRole::HostCgroup),
        [HOST_CGROUP_TARGET]
    );
    assert_eq!(
        targets(&datapath, AttachRole::PodCgroup),
        [POD_CGROUP_TARGET]
    );
    assert!(
        datapath
            .stale_cgroup_links(AttachRole::PodCgroup)
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        datapath.attach(AttachRole::PodCgroup, "lxc0"),
        Err(sluice_datapath::DatapathError::NotADeviceRole(_))
    ));
    assert!(matches!(
        datapath.attach_cgroup(AttachRole::PodVeth, pods.path()),
        Err(sluice_datapath::DatapathError::NotACgroupRole(_))
    ));

    // The pods' programs come off; the node's stay.
    datapath
        .detach(AttachRole::PodCgroup, POD_CGROUP_TARGET)
        .unwrap();
    assert!(targets(&datapath, AttachRole::PodCgroup).is_empty());
    assert_eq!(
        targets(&datapath, AttachRole::HostCgroup),
        [HOST_CGROUP_TARGET]
    );
    assert_eq!(
        datapath
            .stale_cgroup_links(AttachRole::PodCgroup)
            .unwrap()
            .len(),
        4
    );
    drop(datapath);
}

/// Frontend `key` with `value` (its count set) and `backends` on WHO_PORT in its slots.
fn add_frontend(maps: &mut PinnedMaps, key: Lb4Key, value: Lb4Service, backends: &[Ipv4Addr]) {
    for (slot, backend) in (1..).zip(backends) {
        let slot_key = Lb4Key { slot, ..key };
        maps.services
            .insert(slot_key, Lb4Service::slot(*backend, WHO_PORT), 0)
            .unwrap();
        add_backend(maps, SocketAddrV4::new(*backend, WHO_PORT), key.proto);
    }
    let count = u16::try_from(backends.len()).unwrap();
    maps.services
        .insert(key, Lb4Service { count, ..value }, 0)
        .unwrap();
}

/// The Maglev table of `key` (positions to backend slots), installed as the realizer does.
fn add_maglev_table(maps: &mut PinnedMaps, key: Lb4Key, table: &[u16]) {
    let mut map = create_maglev_table(table.len()).unwrap();
    for (index, chunk) in (0u32..).zip(table.chunks(4)) {
        let mut lanes = [0u16; 4];
        lanes[..chunk.len()].copy_from_slice(chunk);
        map.set(index, lanes, 0).unwrap();
    }
    maps.maglev.insert(key, &map, 0).unwrap();
}

/// How many of the client's connections through `label` reached each backend, from its
/// `RESULT <label> <backend>=<n> ...` line.
fn reached(results: &[String], label: &str) -> Vec<(Ipv4Addr, usize)> {
    let line = results
        .iter()
        .find_map(|r| r.strip_prefix(&format!("{label} ")))
        .unwrap_or_else(|| panic!("no {label} line among {results:?}"));
    line.split(' ')
        .map(|pair| {
            let (backend, n) = pair.split_once('=').unwrap();
            (backend.parse().unwrap(), n.parse().unwrap())
        })
        .collect()
}

/// The node's own connections to an externalTrafficPolicy Local node port with no backend
/// on this node reach a backend elsewhere (its internal slots, as kube-proxy does), and
/// the socket path chooses backends as the tc path does: by the frontend's Maglev table
/// (the internal slots' own), by the client's affinity, or at random.
#[test]
fn node_clients_get_the_cluster_wide_slots_affinity_and_maglev() {
    let mut topology = Topology::new();
    let maps = &mut topology.maps;
    let size = TableSize::new(251).unwrap();

    // The node port: no local backend; its internal slots hold all three and their
    // Maglev table sends every flow to the second.
    let node_port = Lb4Key::new(NODE, LOCAL_NODE_PORT, IPPROTO_TCP, 0);
    let local = SVC_FLAG_NODE_PORT | SVC_FLAG_LOCAL | SVC_FLAG_TWO_SCOPES;
    add_frontend(maps, node_port, Lb4Service::frontend(0, local), &[]);
    let internal = node_port.in_scope(LB4_SCOPE_INTERNAL);
    add_maglev_table(maps, internal, &[2; 251]);
    let maglev_value = Lb4Service {
        maglev_size: size.get(),
        ..Lb4Service::frontend(0, SVC_FLAG_NODE_PORT | SVC_FLAG_MAGLEV)
    };
    add_frontend(maps, internal, maglev_value, &BACKENDS);

    let cluster_ip = |port| Lb4Key::new(VIP, port, IPPROTO_TCP, 0);
    let affinity = Lb4Service {
        affinity_timeout: 60,
        ..Lb4Service::frontend(0, SVC_FLAG_CLUSTER_IP | SVC_FLAG_AFFINITY)
    };
    add_frontend(maps, cluster_ip(AFFINITY_PORT), affinity, &BACKENDS);
    let plain = Lb4Service::frontend(0, SVC_FLAG_CLUSTER_IP);
    add_frontend(maps, cluster_ip(SPREAD_PORT), plain, &BACKENDS);
    // A real table: each socket hashes to its own position.
    let named: Vec<(Ipv4Addr, u16)> = BACKENDS.iter().map(|b| (*b, WHO_PORT)).collect();
    add_maglev_table(maps, cluster_ip(MAGLEV_PORT), &maglev::table(&named, size));
    let maglev_value = Lb4Service {
        maglev_size: size.get(),
        ..Lb4Service::frontend(0, SVC_FLAG_CLUSTER_IP | SVC_FLAG_MAGLEV)
    };
    add_frontend(maps, cluster_ip(MAGLEV_PORT), maglev_value, &BACKENDS);

    let results = topology.run_client_with(PARITY);
    assert_eq!(
        reached(&results, "local-node-port"),
        [(BACKENDS[1], PARITY_CONNECTIONS)],
        "every connection to the Local node port through its internal Maglev table"
    );
    let affine = reached(&results, "affinity");
    assert_eq!(
        affine.len(),
        1,
        "one backend for the node's client: {affine:?}"
    );
    let spread = reached(&results, "spread");
    assert!(spread.len() > 1, "random slots spread: {spread:?}");
    let hashed = reached(&results, "maglev");
    assert!(
        hashed.len() > 1,
        "sockets hash to several backends: {hashed:?}"
    );
}

/// Frontend `key` of the load balancer VIP, restricted to `ranges`, with BACKEND in its slot.
fn add_ranged_frontend(maps: &mut PinnedMaps, key: Lb4Key, ranges: &[(Ipv4Addr, u8)]) {
    let flags = SVC_FLAG_LOAD_BALANCER | SVC_FLAG_SOURCE_RANGES;
    add_frontend(maps, key, Lb4Service::frontend(0, flags), &[BACKEND]);
    for &(source, prefix) in ranges {
        let range = Lb4SourceRangeKey::new(LB_VIP, key.port(), key.proto, source, prefix);
        maps.source_ranges
            .insert(
                &Key::new(range.prefixlen, range.range),
                SOURCE_RANGE_ALLOWED,
                0,
            )
            .unwrap();
    }
}

/// loadBalancerSourceRanges judge the node's processes by the node's address: inside a
/// range they are balanced, outside every range connect() and sendto() fail with EPERM
/// and each refusal is counted as DROP_NOT_IN_SRC_RANGE, as the tc path counts its drops.
#[test]
fn source_ranges_judge_node_processes_by_the_node_address() {
    let mut topology = Topology::new();
    let maps = &mut topology.maps;
    let config = NodeConfig::new(RoutingMode::Native, 0, 0).with_node_address(NODE);
    maps.node_config.set(0, config, 0).unwrap();
    let lb = |port, proto| Lb4Key::new(LB_VIP, port, proto, 0);
    add_ranged_frontend(
        maps,
        lb(ADMITTED_PORT, IPPROTO_TCP),
        &[OUTSIDE_RANGE, (NODE, 32)],
    );
    add_ranged_frontend(maps, lb(DENIED_PORT, IPPROTO_TCP), &[OUTSIDE_RANGE]);
    add_ranged_frontend(maps, lb(DENIED_PORT, IPPROTO_UDP), &[OUTSIDE_RANGE]);

    let results = topology.run_client_with(RANGES);
    let expect = |line: &str| {
        assert!(
            results.iter().any(|r| r == line),
            "expected {line:?} among {results:?}"
        );
    };
    expect(&format!("in-range {BACKEND}"));
    expect(&format!("out-of-range errno={}", libc::EPERM));
    expect(&format!("udp-out-of-range errno={}", libc::EPERM));
    let refused = topology
        .maps
        .counted(DropReason::NotInSrcRange.code(), METRIC_DIR_EGRESS)
        .unwrap();
    assert_eq!(refused.packets, 2, "the TCP connect and the UDP sendto");
}
