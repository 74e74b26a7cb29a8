//! sluice-netns on the real kernel: namespaces, links, addresses, routes, sysctls, offloads
//! and processes, with real packets between namespaces. Needs root; fails (never skips)
//! without it. Every namespace is an OwnedNetNs with a unique name, deleted even when a
//! test fails.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step must fail the test"
)]

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use sluice_netns::{
    Ipv4Net, LinkKind, MultipathEntry, MultipathRoute, NetNs, NetNsError, Netlink, OwnedNetNs,
    Route, RouteEntry,
};

fn net(text: &str) -> Ipv4Net {
    text.parse().unwrap()
}

#[test]
fn create_list_enter_and_delete() {
    let ns = OwnedNetNs::unique("snt-a-").unwrap();
    let name = ns.name().to_string();
    assert!(ns.exists());
    assert!(NetNs::list().contains(&name));
    assert_eq!(NetNs::list_with_prefix(&name), vec![name.clone()]);
    assert!(matches!(NetNs::create(&name), Err(NetNsError::Exists(n)) if n == name));

    // A thread inside sees its own namespace: another inode than ours, with lo up.
    let (inside, links) = ns
        .run(|| {
            let inode = std::fs::metadata("/proc/thread-self/ns/net").unwrap();
            use std::os::unix::fs::MetadataExt;
            (inode.ino(), std::fs::read_dir("/sys/class/net").is_ok())
        })
        .unwrap();
    assert_eq!(Some(inside), ns.id().map(|(_, ino)| ino));
    assert!(links);
    let outside = std::fs::metadata("/proc/self/ns/net").unwrap();
    assert_ne!(
        std::os::unix::fs::MetadataExt::ino(&outside),
        inside,
        "the caller's thread did not move"
    );
    let lo = ns.netlink().unwrap().links().unwrap();
    assert_eq!(lo.len(), 1);
    assert_eq!(lo[0].name, "lo");
    assert_eq!(ns.sysctl("net.ipv4.conf.lo.forwarding").unwrap(), "0");

    // A panic inside goes on in the caller.
    let panicked = std::panic::catch_unwind(|| ns.run(|| panic!("inside")));
    assert!(panicked.is_err());

    drop(ns);
    assert!(!NetNs::named(name.as_str()).exists());
    assert!(matches!(NetNs::open(&name), Err(NetNsError::NotFound(_))));
    // Deleting what is gone is fine.
    NetNs::delete(&name).unwrap();
}

/// Two namespaces joined by a veth pair, addressed and routed like a pod and its node:
/// TCP crosses it both ways.
#[test]
fn veth_addresses_routes_and_real_packets() {
    let node = OwnedNetNs::unique("snt-node-").unwrap();
    let pod = OwnedNetNs::unique("snt-pod-").unwrap();
    let (router, pod_ip) = (Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 1, 2));
    let n = node.netlink().unwrap();
    n.add_veth("lxc-t", "eth0", Some(&pod)).unwrap();
    n.add_address("lxc-t", net(&format!("{router}/32")).into())
        .unwrap();
    n.set_up("lxc-t").unwrap();
    n.add_route(&Route::device(net(&format!("{pod_ip}/32")), "lxc-t").src(router))
        .unwrap();
    let p = pod.netlink().unwrap();
    p.set_alias("eth0", "sluice-test").unwrap();
    p.add_address("eth0", net(&format!("{pod_ip}/32")).into())
        .unwrap();
    p.set_mtu("eth0", 1400).unwrap();
    p.set_up("eth0").unwrap();
    p.add_route(&Route::device(net(&format!("{router}/32")), "eth0"))
        .unwrap();
    p.add_route(&Route::default_via(router).dev("eth0"))
        .unwrap();

    let eth0 = p.links().unwrap().into_iter().find(|l| l.name == "eth0");
    assert_eq!(eth0.unwrap().alias.as_deref(), Some("sluice-test"));
    assert_eq!(pod.sysctl("net/ipv4/conf/eth0/forwarding").unwrap(), "0");
    assert!(n.index("lxc-t").unwrap() > 1);
    assert!(matches!(
        n.index("eth0"),
        Err(NetNsError::NoInterface { .. })
    ));

    let listener = node
        .run(|| TcpListener::bind((router, 0)).unwrap())
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        peer
    });
    let echoed = pod
        .run(move || {
            let to = SocketAddr::from((router, port));
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
            s.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).unwrap();
            buf
        })
        .unwrap();
    assert_eq!(&echoed, b"ping");
    assert_eq!(server.join().unwrap().ip(), std::net::IpAddr::V4(pod_ip));

    // Deleting one end removes the pair.
    n.delete_link("lxc-t").unwrap();
    assert!(!p.links().unwrap().iter().any(|l| l.name == "eth0"));
}

#[test]
fn sysctls_offloads_and_bridges() {
    let ns = OwnedNetNs::unique("snt-k-").unwrap();
    ns.set_sysctls(&[
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
    ])
    .unwrap();
    assert_eq!(ns.sysctl("net.ipv4.ip_forward").unwrap(), "1");
    // Only inside: a fresh namespace next to it keeps the default.
    let other = OwnedNetNs::unique("snt-k-").unwrap();
    assert_eq!(other.sysctl("net.ipv4.ip_forward").unwrap(), "0");

    let nl = ns.netlink().unwrap();
    nl.add_veth("v0", "v1", None).unwrap();
    assert!(ns.tx_checksum("v0").unwrap(), "veth starts with offload on");
    ns.set_tx_checksum("v0", false).unwrap();
    assert!(!ns.tx_checksum("v0").unwrap());
    ns.set_tx_checksum("v0", true).unwrap();
    assert!(ns.tx_checksum("v0").unwrap());
    assert!(ns.tx_checksum("nope").is_err());

    nl.add_bridge("br0").unwrap();
    nl.set_controller("v1", "br0").unwrap();
    nl.set_up("br0").unwrap();
    nl.set_down("br0").unwrap();
    let bridge = nl.index("br0").unwrap();
    let v1 = nl.links().unwrap().into_iter().find(|l| l.name == "v1");
    assert_eq!(v1.unwrap().controller, Some(bridge));
}

#[test]
fn routes_listed_by_protocol_and_deleted() {
    const OURS: u8 = 199;
    let ns = OwnedNetNs::unique("snt-r-").unwrap();
    let nl = ns.netlink().unwrap();
    nl.add_veth("r0", "r1", None).unwrap();
    nl.add_address("r0", net("192.0.2.1/24").into()).unwrap();
    nl.set_up("r0").unwrap();
    nl.set_up("r1").unwrap();
    let via = Route::via(net("10.9.0.0/16"), "192.0.2.2".parse().unwrap())
        .dev("r0")
        .protocol(OURS);
    let on_link = Route::device(net("10.8.0.0/24"), "r0")
        .src("192.0.2.1".parse().unwrap())
        .protocol(OURS);
    nl.add_route(&via).unwrap();
    nl.add_route(&on_link).unwrap();
    // Someone else's route: never listed as ours.
    nl.add_route(&Route::device(net("10.7.0.0/24"), "r0"))
        .unwrap();

    let mut ours = nl.routes(OURS).unwrap();
    ours.sort();
    let expected = vec![
        RouteEntry {
            destination: net("10.8.0.0/24"),
            gateway: None,
            device: Some("r0".into()),
            source: Some("192.0.2.1".parse().unwrap()),
            protocol: OURS,
        },
        RouteEntry {
            destination: net("10.9.0.0/16"),
            gateway: Some("192.0.2.2".parse().unwrap()),
            device: Some("r0".into()),
            source: None,
            protocol: OURS,
        },
    ];
    assert_eq!(ours, expected);
    // A listed route deletes itself.
    nl.delete_route(&ours[1].route()).unwrap();
    assert_eq!(nl.routes(OURS).unwrap(), expected[..1]);
    assert!(nl.delete_route(&ours[1].route()).is_err(), "already gone");
    assert_eq!(nl.routes(4).unwrap().len(), 1, "the static route stays");
}

#[test]
fn multipath_routes_are_replaced_listed_and_deleted() {
    const OURS: u8 = 198;
    let ns = OwnedNetNs::unique("snt-m-").unwrap();
    let nl = ns.netlink().unwrap();
    nl.add_veth("m0", "m1", None).unwrap();
    nl.add_address("m0", net("192.0.2.1/24").into()).unwrap();
    nl.set_up("m0").unwrap();
    nl.set_up("m1").unwrap();
    let (a, b): (Ipv4Addr, Ipv4Addr) =
        ("192.0.2.11".parse().unwrap(), "192.0.2.12".parse().unwrap());
    let vip = net("198.51.100.1/32");
    let route = |gateways: Vec<Ipv4Addr>| MultipathRoute {
        destination: vip,
        device: "m0",
        gateways,
        protocol: OURS,
    };
    nl.replace_multipath_route(&route(vec![a, b])).unwrap();
    let listed = |nl: &Netlink| nl.multipath_routes(OURS).unwrap();
    assert_eq!(
        listed(&nl),
        vec![MultipathEntry {
            destination: vip,
            gateways: vec![a, b]
        }]
    );
    // Replaced in place: one next hop left (the kernel keeps it as a plain route).
    nl.replace_multipath_route(&route(vec![b])).unwrap();
    assert_eq!(listed(&nl)[0].gateways, vec![b]);
    nl.replace_multipath_route(&route(vec![b, a])).unwrap();
    assert_eq!(listed(&nl)[0].gateways, vec![b, a]);
    assert_eq!(nl.routes(4).unwrap(), vec![], "nothing else was added");
    nl.delete_route_of(vip, OURS).unwrap();
    assert!(listed(&nl).is_empty());
    assert!(nl.delete_route_of(vip, OURS).is_err(), "already gone");
}

#[test]
fn link_kinds_mtu_and_the_current_namespace() {
    let ns = OwnedNetNs::unique("snt-l-").unwrap();
    let nl = ns.netlink().unwrap();
    nl.add_vxlan_external("vx0", 8472).unwrap();
    nl.add_veth("k0", "k1", None).unwrap();
    nl.set_mtu("k0", 1400).unwrap();
    assert_eq!(
        nl.link_kind("vx0").unwrap(),
        LinkKind::Vxlan {
            port: 8472,
            external: true
        }
    );
    assert_eq!(nl.link_kind("k0").unwrap(), LinkKind::Other("veth".into()));
    assert_eq!(nl.mtu("k0").unwrap(), 1400);
    assert!(matches!(
        nl.link_kind("nope"),
        Err(NetNsError::NoInterface { interface, .. }) if interface == "nope"
    ));
    // A connection opened on a thread inside the namespace acts there.
    let index = ns
        .run(|| Netlink::current().unwrap().index("k1").unwrap())
        .unwrap();
    assert_eq!(index, nl.index("k1").unwrap());
}

#[test]
fn commands_run_inside_the_namespace() {
    let ns = OwnedNetNs::unique("snt-c-").unwrap();
    let out = ns
        .command("stat")
        .unwrap()
        .args(["-L", "-c", "%i", "/proc/self/ns/net"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let inode: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(Some(inode), ns.id().map(|(_, ino)| ino));

    let gone = NetNs::named("snt-never-made");
    assert!(matches!(gone.command("true"), Err(NetNsError::NotFound(_))));
    assert!(matches!(gone.run(|| ()), Err(NetNsError::NotFound(_))));
}

#[test]
fn spawned_threads_stay_inside() {
    let ns = OwnedNetNs::unique("snt-s-").unwrap();
    let thread = ns
        .spawn(|| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        })
        .unwrap();
    let port = thread.join().unwrap();
    assert!(port > 0);
    let ns_ino = ns.id().map(|(_, ino)| ino);
    let seen = ns
        .spawn(|| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(Some(seen), ns_ino);
}
