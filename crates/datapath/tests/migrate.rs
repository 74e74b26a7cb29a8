//! Upgrading a datapath whose maps were pinned with an earlier layout (needs root; never
//! skipped). The previous agent's datapath is the objects built with layout 1
//! (`ObjectBuild::LayoutV1`: 32-bit conntrack counters, a 32-bit service `count` moved);
//! the new loader is today's. Real programs on veths, a real TCP connection held through a
//! ClusterIP across the upgrade:
//!
//! ```text
//! client netns eth0 10.0.1.2/24 ─veth─ lxc-c 10.0.1.1 ┐
//! web-a netns  eth0 10.0.2.2/24 ─veth─ lxc-a 10.0.2.1 ┼ node netns (forwarding)
//! web-b netns  eth0 10.0.3.2/24 ─veth─ lxc-b 10.0.3.1 ┘
//! ```
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    collections::{BTreeSet, HashSet},
    io::{self, BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use sluice_common::{
    BACKEND_STATE_ACTIVE, Ct4EntryV1, Ct4Key, IPPROTO_TCP, Lb4Backend, Lb4BackendKey, Lb4Key,
    Lb4Service, Lb4ServiceV1, MapId, SVC_FLAG_CLUSTER_IP, SVC_FLAG_WILDCARD, addr_be, names,
};
use sluice_datapath::{
    AttachRole, Datapath, DatapathConfig, DatapathError, ObjectBuild, PinnedMaps, sys,
};
use sluice_netns::{Ipv4Net, Route};
use support::{NetNs, PinDir, Server};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 80;
const TIMEOUT: Duration = Duration::from_secs(3);
const LXCS: [&str; 3] = ["lxc-c", "lxc-a", "lxc-b"];

fn backends() -> [SocketAddrV4; 2] {
    [
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 8080),
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 3, 2), 8080),
    ]
}

/// The node, a client and two backends, with the layout 1 datapath attached to every lxc
/// and a ClusterIP written as an agent of that layout wrote it.
struct Topology {
    node: NetNs,
    client: NetNs,
    _servers: Vec<Server>,
    _web: Vec<NetNs>,
    // Removing the pins detaches the programs and releases the maps.
    pins: PinDir,
}

impl Topology {
    fn new() -> Self {
        let node = NetNs::new();
        node.ns()
            .set_sysctls(&[
                ("net.ipv4.ip_forward", "1"),
                // Rev-NATed replies come from the VIP, which has no route back.
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ])
            .unwrap();
        let client = NetNs::new();
        let web = vec![NetNs::new(), NetNs::new()];
        let on_node = node.netlink();
        for (subnet, (pod, lxc)) in (1..).zip([&client, &web[0], &web[1]].into_iter().zip(LXCS)) {
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

        let pins = PinDir::unique("sluice-test-migrate-");
        let pin_dir = pins.path().to_owned();
        node.run(move || {
            let mut old =
                Datapath::load_build(&pin_dir, &DatapathConfig::default(), ObjectBuild::LayoutV1)
                    .expect("loading the layout 1 datapath");
            for lxc in LXCS {
                old.attach(AttachRole::PodVeth, lxc).expect("attach");
            }
        });
        write_v1_service(pins.path());
        let servers = web
            .iter()
            .zip(backends())
            .map(|(netns, bind)| echo_server(netns, bind))
            .collect();
        Self {
            node,
            client,
            _servers: servers,
            _web: web,
            pins,
        }
    }

    fn pin_dir(&self) -> &Path {
        self.pins.path()
    }

    /// The new agent's loader, in the node's namespace; how long it took.
    fn load_today(&self) -> (Result<Datapath, DatapathError>, Duration) {
        let pin_dir = self.pin_dir().to_owned();
        self.node.run(move || {
            let started = Instant::now();
            let loaded = Datapath::load(&pin_dir, &DatapathConfig::default());
            (loaded, started.elapsed())
        })
    }

    /// The id of the program each pinned pod link runs, by lxc.
    fn linked_programs(&self) -> Vec<u32> {
        LXCS.iter()
            .flat_map(|lxc| ["ingress", "egress"].map(|hook| format!("{lxc}_{hook}")))
            .map(|name| {
                let path = self.pin_dir().join("links/pod").join(name);
                let fd = sys::obj_get(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                sys::obj_info(std::os::fd::AsFd::as_fd(&fd), true)
                    .unwrap()
                    .program
            })
            .collect()
    }

    fn value_size(&self, map: &str) -> u32 {
        MapInfo::from_pin(self.pin_dir().join(map))
            .unwrap()
            .value_size()
    }
}

fn open_hash<K: aya::Pod, V: aya::Pod>(pin_dir: &Path, name: &str) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(pin_dir.join(name)).unwrap();
    HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap()
}

/// The ClusterIP VIP:80 over both backends, in layout 1, as the earlier realizer wrote it.
fn write_v1_service(pin_dir: &Path) {
    let mut services: HashMap<MapData, Lb4Key, Lb4ServiceV1> = open_hash(pin_dir, names::SERVICES);
    let mut backend_map: HashMap<MapData, Lb4BackendKey, Lb4Backend> =
        open_hash(pin_dir, names::BACKENDS);
    for (key, value) in v1_service_entries() {
        services.insert(key, value, 0).unwrap();
    }
    for backend in backends() {
        let key = Lb4BackendKey::new(*backend.ip(), backend.port(), IPPROTO_TCP);
        let value = Lb4Backend {
            state: BACKEND_STATE_ACTIVE,
            pad: [0; 3],
        };
        backend_map.insert(key, value, 0).unwrap();
    }
}

fn v1_service_entries() -> Vec<(Lb4Key, Lb4ServiceV1)> {
    let frontend = |count, flags| Lb4ServiceV1 {
        count,
        flags,
        ..Lb4ServiceV1::default()
    };
    let mut entries = vec![
        (
            Lb4Key::new(VIP, PORT, IPPROTO_TCP, 0),
            frontend(2, SVC_FLAG_CLUSTER_IP),
        ),
        (Lb4Key::wildcard(VIP), frontend(0, SVC_FLAG_WILDCARD)),
    ];
    for (slot, backend) in (1..).zip(backends()) {
        entries.push((
            Lb4Key::new(VIP, PORT, IPPROTO_TCP, slot),
            Lb4ServiceV1 {
                backend_address: addr_be(*backend.ip()),
                backend_port: backend.port().to_be(),
                ..Lb4ServiceV1::default()
            },
        ));
    }
    entries
}

/// The same service in today's layout: what the realizer would write, so what `verify`
/// compares the kernel with.
fn today_service_entries() -> HashSet<(Lb4Key, Lb4Service)> {
    let mut entries = HashSet::from([
        (
            Lb4Key::new(VIP, PORT, IPPROTO_TCP, 0),
            Lb4Service::frontend(2, SVC_FLAG_CLUSTER_IP),
        ),
        (
            Lb4Key::wildcard(VIP),
            Lb4Service::frontend(0, SVC_FLAG_WILDCARD),
        ),
    ]);
    for (slot, backend) in (1..).zip(backends()) {
        entries.insert((
            Lb4Key::new(VIP, PORT, IPPROTO_TCP, slot),
            Lb4Service::slot(*backend.ip(), backend.port()),
        ));
    }
    entries
}

/// Answers each line of every connection with "<bind> <line>", one thread a connection,
/// until the client closes it.
fn echo_server(netns: &NetNs, bind: SocketAddrV4) -> Server {
    Server::tcp(netns, bind, move |conn, _| {
        std::thread::spawn(move || echo(conn, bind));
    })
}

fn echo(conn: TcpStream, bind: SocketAddrV4) {
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = conn.try_clone().unwrap();
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if writeln!(writer, "{bind} {line}").is_err() {
            return;
        }
    }
}

/// A connection through the VIP held open across the upgrade.
struct Held {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Held {
    fn connect() -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&SocketAddrV4::new(VIP, PORT).into(), TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// Sends `line` and returns the backend that answered.
    fn ask(&mut self, line: &str) -> io::Result<String> {
        writeln!(self.stream, "{line}")?;
        let mut reply = String::new();
        self.reader.read_line(&mut reply)?;
        let (backend, echoed) = reply
            .trim_end()
            .split_once(' ')
            .ok_or_else(|| io::Error::other(format!("reply {reply:?}")))?;
        if echoed != line {
            return Err(io::Error::other(format!("{line:?} echoed as {echoed:?}")));
        }
        Ok(backend.to_owned())
    }
}

/// Which backend answers a new connection through the VIP; a failure names the client's
/// port.
fn new_connection() -> io::Result<String> {
    let mut held = Held::connect()?;
    let port = held.stream.local_addr()?.port();
    held.ask("new")
        .map_err(|e| io::Error::new(e.kind(), format!("port {port}: {e}")))
}

#[test]
fn an_upgrade_migrates_conntrack_and_services_and_keeps_the_connection() {
    let topo = Topology::new();
    let (mut held, first) = topo.client.run(|| {
        let mut held = Held::connect().expect("connect through the layout 1 datapath");
        let first = held.ask("before").expect("an answer before the upgrade");
        (held, first)
    });
    let old_programs = topo.linked_programs();
    assert_eq!(topo.value_size(names::CONNTRACK), 40);
    assert_eq!(topo.value_size(names::SERVICES), 20);

    // Requests on the held connection, one after the other, while the new loader runs.
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = topo.client.spawn({
        let stop = stop.clone();
        move || {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let line = format!("during-{}", answers.len());
                answers.push(held.ask(&line));
            }
            (held, answers)
        }
    });
    // And new connections, one after the other: none may find an empty map.
    let connector = topo.client.spawn({
        let stop = stop.clone();
        move || {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                answers.push(new_connection());
            }
            answers
        }
    });
    let (loaded, took) = topo.load_today();
    stop.store(true, Ordering::Relaxed);
    let (mut held, during) = pinger.join().expect("the client thread");
    let connected = connector.join().expect("the connecting thread");
    let datapath = loaded.expect("the new loader migrates the layout 1 maps");
    // A connection opened in the moment between the last copy and the swap may find its
    // replies unmatched (a known limit, see README); counted, not asserted.
    let refused: Vec<_> = connected.iter().filter(|a| a.is_err()).collect();
    println!(
        "upgrade: {} new connections during the load, {} failed: {refused:?}",
        connected.len(),
        refused.len()
    );

    let migrated = datapath.migrated();
    println!("upgrade: load with migration took {took:?}; {migrated:#?}");
    let by_name = |name: &str| {
        migrated
            .iter()
            .find(|m| m.map == name)
            .unwrap_or_else(|| panic!("{name} migrated: {migrated:?}"))
    };
    assert_eq!(by_name(names::SERVICES).entries, 4);
    assert!(by_name(names::CONNTRACK).entries >= 2, "{migrated:?}");
    assert_eq!(migrated.len(), 2, "{migrated:?}");

    // The pins are today's layout, with no staging left.
    assert_eq!(topo.value_size(names::CONNTRACK), 48);
    assert_eq!(topo.value_size(names::SERVICES), 16);
    assert!(!topo.pin_dir().join("migrating").exists());
    // Every link runs the new programs: swapped in, never detached.
    let new_programs = topo.linked_programs();
    assert!(
        new_programs.iter().all(|id| !old_programs.contains(id)),
        "{old_programs:?} -> {new_programs:?}"
    );
    for lxc in LXCS {
        assert!(topo.node.run(|| datapath.runs(AttachRole::PodVeth, lxc)));
    }

    // The held connection went on, to the same backend, without a reset.
    let failed: Vec<_> = during.iter().filter(|a| a.is_err()).collect();
    assert!(failed.is_empty(), "during the upgrade: {failed:?}");
    assert!(during.iter().all(|a| a.as_ref().ok() == Some(&first)));
    println!(
        "upgrade: {} requests on the held connection during the load, all answered by {first}",
        during.len()
    );
    // Still held open: a connection that closes leaves no conntrack entry to check below.
    let (held, backends_seen) = topo.client.run(move || {
        assert_eq!(held.ask("after").expect("the held connection after"), first);
        let seen = (0..20)
            .map(|_| new_connection().expect("a new connection after the upgrade"))
            .collect::<BTreeSet<_>>();
        (held, seen)
    });
    println!("upgrade: 20 new connections answered by {backends_seen:?}");

    // A restart on the migrated pins: nothing to migrate, for the load time without it.
    drop(datapath);
    let (reloaded, reload_took) = topo.load_today();
    assert!(reloaded.expect("a restart").migrated().is_empty());
    println!("upgrade: a restart's load on the migrated pins took {reload_took:?}");

    // The maps hold what today's realizer would write (verify clean), and the held
    // connection's conntrack entries kept their counters.
    let maps = PinnedMaps::open(topo.pin_dir()).expect("today's typed handles open");
    let services: HashSet<_> = maps.services.iter().map(|entry| entry.unwrap()).collect();
    assert_eq!(services, today_service_entries());
    let held_entries: Vec<(Ct4Key, u64)> = maps
        .conntrack
        .iter()
        .map(|entry| entry.unwrap())
        .filter(|(key, _)| key.src().0 == CLIENT || key.dst().0 == CLIENT)
        .map(|(key, entry)| (key, entry.packets))
        .collect();
    assert!(
        held_entries.iter().any(|(_, packets)| *packets > 2),
        "{held_entries:?}"
    );
    drop(held);
}

#[test]
fn a_layout_without_a_migration_is_refused_and_the_old_datapath_keeps_forwarding() {
    let topo = Topology::new();
    let (mut held, first) = topo.client.run(|| {
        let mut held = Held::connect().expect("connect through the layout 1 datapath");
        let first = held.ask("before").expect("an answer");
        (held, first)
    });
    let old_programs = topo.linked_programs();
    let pins_before = pin_listing(topo.pin_dir());

    // An entry today's layout cannot hold: a frontend of 70,000 slots.
    let mut services: HashMap<MapData, Lb4Key, Lb4ServiceV1> =
        open_hash(topo.pin_dir(), names::SERVICES);
    let huge = Lb4Key::new(Ipv4Addr::new(10, 96, 0, 11), 81, IPPROTO_TCP, 0);
    let huge_value = Lb4ServiceV1 {
        count: 70_000,
        flags: SVC_FLAG_CLUSTER_IP,
        ..Lb4ServiceV1::default()
    };
    services.insert(huge, huge_value, 0).unwrap();
    let (refused, took) = topo.load_today();
    let err = refused.expect_err("an entry that does not convert");
    println!("refused after {took:?}: {err}");
    assert!(
        matches!(&err, DatapathError::Unconvertible { migration, count: 1, .. } if migration.map == MapId::Services),
        "{err}"
    );
    let message = err.to_string();
    for part in [
        "lb4_services",
        "Lb4ServiceV1",
        "Lb4Service)",
        "count",
        "70000",
    ] {
        assert!(message.contains(part), "{part} in {message}");
    }
    assert_untouched(&topo, &old_programs, &pins_before);
    services.remove(&huge).unwrap();

    // A map of a layout with no migration: the pinned sessionAffinity map replaced by one
    // of another value size (the earlier programs keep the map they hold). Refused before
    // anything is made, though conntrack and the services would migrate.
    let affinity = topo.pin_dir().join(names::AFFINITY);
    std::fs::remove_file(&affinity).unwrap();
    let foreign: HashMap<MapData, Lb4Key, u64> = HashMap::create(16, 0).expect("create map");
    foreign.pin(&affinity).expect("pin map");
    let (refused, took) = topo.load_today();
    let err = refused.expect_err("a layout with no migration");
    println!("refused after {took:?}: {err}");
    assert!(
        matches!(&err, DatapathError::IncompatibleMap { map, .. } if *map == names::AFFINITY),
        "{err}"
    );
    let message = err.to_string();
    for part in ["lb4_affinity", "value 8", "Lb4Affinity", "no migration"] {
        assert!(message.contains(part), "{part} in {message}");
    }
    assert_untouched(&topo, &old_programs, &pins_before);

    // The old datapath still forwards: the held connection and new ones.
    let answers = topo.client.run(move || {
        let again = held.ask("after the refusals").expect("the held connection");
        let new: BTreeSet<_> = (0..10)
            .map(|_| new_connection().expect("a new connection through the old datapath"))
            .collect();
        (again, new)
    });
    assert_eq!(answers.0, first);
    println!(
        "after the refusals: new connections answered by {:?}",
        answers.1
    );
}

/// The old programs in every link, layout 1 maps pinned, no staging directory.
fn assert_untouched(topo: &Topology, old_programs: &[u32], pins_before: &BTreeSet<String>) {
    assert_eq!(topo.linked_programs(), old_programs);
    assert_eq!(topo.value_size(names::CONNTRACK), 40);
    assert_eq!(topo.value_size(names::SERVICES), 20);
    assert_eq!(&pin_listing(topo.pin_dir()), pins_before);
    // The conntrack entries are still layout 1.
    let ct: HashMap<MapData, Ct4Key, Ct4EntryV1> = open_hash(topo.pin_dir(), names::CONNTRACK);
    assert!(ct.iter().count() >= 2);
}

/// Every file and directory under the pin directory.
fn pin_listing(dir: &Path) -> BTreeSet<String> {
    let mut listing = BTreeSet::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path.clone());
            }
            listing.insert(path.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    listing
}

/// The flow cache and its per-CPU scratch pinned in an earlier build's layout (an LRU hash
/// map, a shorter note): the new loader replaces them with empty maps of today's layout
/// instead of refusing the upgrade, and the held connection goes on through the new
/// programs, its flow decided again.
#[test]
fn a_flow_cache_of_another_layout_starts_empty_at_an_upgrade() {
    let topo = Topology::new();
    let (mut held, first) = topo.client.run(|| {
        let mut held = Held::connect().expect("connect through the layout 1 datapath");
        let first = held.ask("before").expect("an answer");
        (held, first)
    });
    // The earlier programs keep the maps they hold; the pins name the earlier layouts.
    let unpin = |name: &str| {
        let path = topo.pin_dir().join(name);
        std::fs::remove_file(&path).unwrap();
        path
    };
    let cache: HashMap<MapData, [u8; 20], [u8; 48]> = HashMap::create(16, 0).expect("create");
    cache.pin(unpin(names::FLOW_CACHE)).expect("pin map");
    let notes: HashMap<MapData, u32, [u8; 40]> = HashMap::create(1, 0).expect("create");
    notes.pin(unpin(names::FLOW_NOTES)).expect("pin map");
    let (loaded, took) = topo.load_today();
    let datapath = loaded.expect("the flow cache's layout does not refuse the upgrade");
    let migrated = datapath.migrated();
    println!("upgrade: load took {took:?}; {migrated:#?}");
    for name in [names::FLOW_CACHE, names::FLOW_NOTES] {
        let map = migrated
            .iter()
            .find(|m| m.map == name)
            .unwrap_or_else(|| panic!("{name} replaced: {migrated:?}"));
        assert_eq!(map.entries, 0, "{map:?}");
        assert!(map.from.contains("Hash"), "{map:?}");
    }
    assert_eq!(topo.value_size(names::FLOW_CACHE), 80);
    let answer = topo
        .client
        .run(move || held.ask("after").expect("the held connection after"));
    assert_eq!(answer, first);
}
