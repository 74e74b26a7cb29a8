//! The lab playing the cloud for LoadBalancer Services (issue 11), on the real kernel and
//! without any dataplane (bare routing): VIPs from the lab file's pool in the Services'
//! status, the router namespace's ECMP route per VIP over every node, world hosts behind the
//! router reaching nodes and pods, and the router's health check taking a failing node out
//! of a Local Service's next hops after its delay. The datapath's side (NodePort and VIP
//! frontends, refusal, SNAT) is tested end to end in tests/tests/loadbalancer.rs. Needs
//! root; fails (never skips) without it.

// Helpers outside #[test] functions are test code too.
#![allow(clippy::unwrap_used)]

mod support;

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_lab::{Lab, NodeSpec, ProbeOptions, ProbeRequest, Protocol, VIP_ROUTE_PROTOCOL, Via};
use sluice_netns::{IpNet, Ipv4Net, NetNs};
use support::{Agent, TestLab, netns_of, unique};

const NODE_1: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 11);
const NODE_2: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 12);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// Two nodes on an underlay, a pool of `pool`, `extra` lab file lines, and a client behind
/// the router.
fn lab_file(pool: &str, extra: &str) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1
kind: Lab
clusterCIDR: 10.244.0.0/16
underlay: {{cidr: 172.30.0.0/24}}
loadBalancer:
  pool: {pool}
{extra}nodes:
- {{name: node-1, podCIDR: 10.244.1.0/24}}
- {{name: node-2, podCIDR: 10.244.2.0/24}}
world:
- {{name: client, address: {CLIENT}, attach: router, ports: [{{port: 80}}]}}
"
    )
}

/// A LoadBalancer Service `name` for the pods labelled app=web; `extra` more of its spec.
fn lb_service(name: &str, extra: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  type: LoadBalancer
  selector: {{app: web}}
  ports: [{{port: 80, protocol: TCP}}]
{extra}"
    )
}

fn web_pod(name: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: web}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: nginx\n    ports: [{{containerPort: 80}}]\n"
    )
}

/// The router's VIP routes: destination and next hops.
fn vip_routes(lab: &Lab) -> Vec<(Ipv4Net, Vec<Ipv4Addr>)> {
    NetNs::named(lab.router_netns())
        .netlink()
        .unwrap()
        .multipath_routes(VIP_ROUTE_PROTOCOL)
        .unwrap()
        .into_iter()
        .map(|e| (e.destination, e.gateways))
        .collect()
}

fn external_ip(lab: &Lab, name: &str) -> String {
    lab.services()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
        .external_ip
}

fn vip(lab: &Lab, name: &str) -> Ipv4Addr {
    external_ip(lab, name).parse().unwrap()
}

fn host(address: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::from(address)
}

#[test]
fn vips_are_assigned_routed_over_every_node_and_released() {
    let name = unique("lb");
    // A /30: two VIPs.
    let mut t = TestLab::up(&name, &lab_file("198.51.100.0/30", ""), Agent::None);
    assert!(netns_of(&name).contains(&t.lab.router_netns()));
    let file = t.write(
        "web.yaml",
        &(web_pod("web-1", "node-1") + &lb_service("web", "")),
    );
    let report = t.lab.apply(&[file]).unwrap();
    assert!(!report.lines().iter().any(|l| l.contains("Warning")));
    let web = vip(&t.lab, "web");
    assert_eq!(web, Ipv4Addr::new(198, 51, 100, 1));
    let view = t
        .lab
        .services()
        .into_iter()
        .find(|s| s.name == "web")
        .unwrap();
    let node_port: u16 = view
        .ports
        .split([':', '/'])
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!((30000..=32767).contains(&node_port), "{}", view.ports);
    // What the agents read: the VIP in the Service's status.
    let snapshot = t.snapshot();
    let status = snapshot.services[0].status.clone().unwrap();
    let ingress = status.load_balancer.unwrap().ingress.unwrap();
    assert_eq!(ingress[0].ip.as_deref(), Some("198.51.100.1"));
    assert_eq!(
        vip_routes(&t.lab),
        vec![(host(web), vec![NODE_1, NODE_2])],
        "one ECMP route over both nodes"
    );

    // A node that joins is a next hop at once, one that leaves is no more.
    t.lab
        .add_node(NodeSpec {
            name: "node-3".into(),
            pod_cidr: "10.244.3.0/24".parse().unwrap(),
            underlay_address: None,
            zone: None,
        })
        .unwrap();
    let node_3 = Ipv4Addr::new(172, 30, 0, 13);
    assert_eq!(
        vip_routes(&t.lab),
        vec![(host(web), vec![NODE_1, NODE_2, node_3])]
    );
    t.lab.remove_node("node-3").unwrap();
    assert_eq!(vip_routes(&t.lab), vec![(host(web), vec![NODE_1, NODE_2])]);

    let file = t.write(
        "more.yaml",
        &(lb_service("more", "") + &lb_service("most", "")),
    );
    let report = t.lab.apply(&[file]).unwrap();
    let lines = report.lines();
    let warning = lines.iter().find(|l| l.starts_with("Warning")).unwrap();
    assert_eq!(
        warning,
        "Warning: service/default/most: LoadBalancer pending: no free address in the lab's loadBalancer.pool 198.51.100.0/30 (2 in use)"
    );
    assert_eq!(external_ip(&t.lab, "most"), "<pending>");
    assert_eq!(vip_routes(&t.lab).len(), 2, "no route for a pending VIP");

    // web goes: its VIP is released and given to the pending Service.
    let file = t.write("gone.yaml", &lb_service("web", ""));
    t.lab.delete(&[file]).unwrap();
    assert_eq!(vip(&t.lab, "most"), web);
    let routes = vip_routes(&t.lab);
    assert_eq!(
        routes.iter().map(|(d, _)| *d).collect::<Vec<_>>(),
        vec![host(web), host(vip(&t.lab, "more"))]
    );
    let file = t.write(
        "all.yaml",
        &(lb_service("more", "") + &lb_service("most", "")),
    );
    t.lab.delete(&[file]).unwrap();
    assert!(
        vip_routes(&t.lab).is_empty(),
        "released VIPs leave no route"
    );
}

/// Serves `answer(peer)` on `address:port` inside `netns` until `stop`; one line per
/// connection.
fn serve(
    netns: &str,
    address: Ipv4Addr,
    port: u16,
    answer: impl Fn(SocketAddr) -> String + Send + 'static,
) -> Arc<AtomicBool> {
    let listener = NetNs::named(netns)
        .run(move || TcpListener::bind((address, port)).unwrap())
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut conn, peer)) => {
                    // Answer, then wait for the client to close: closing with its request
                    // unread would reset the connection under the answer.
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = conn.write_all(answer(peer).as_bytes());
                    let _ = conn.shutdown(std::net::Shutdown::Write);
                    let _ = conn.read_to_end(&mut Vec::new());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    stop
}

fn read_from(netns: &str, addr: SocketAddr) -> String {
    NetNs::named(netns)
        .run(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok::<_, std::io::Error>(out)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("{addr} from {netns}: {e}"))
}

#[test]
fn a_world_host_behind_the_router_reaches_nodes_pods_and_every_node_through_a_vip() {
    let name = unique("lw");
    // With a host on the underlay and one behind node-1 too.
    let text = lab_file("198.51.100.0/28", "")
        + "- {name: segment, address: 172.30.0.50, attach: underlay, ports: [{port: 80}]}\n"
        + "- {name: branch, address: 203.0.113.20, attach: node-1, ports: [{port: 80}]}\n";
    let mut t = TestLab::up(&name, &text, Agent::None);
    let client = format!("sluice-{name}-world-client");
    let file = t.write(
        "web.yaml",
        &(web_pod("web-2", "node-2") + &lb_service("web", "")),
    );
    t.lab.apply(&[file]).unwrap();

    // A node's address, through the router: the node sees the client's own address.
    let node_1 = t.lab.node_netns("node-1");
    let _stop = serve(&node_1, NODE_1, 7100, |peer| peer.ip().to_string());
    assert_eq!(
        read_from(&client, (NODE_1, 7100).into()),
        CLIENT.to_string()
    );

    // A pod, by its address (the router routes each pod CIDR to its node): it sees the
    // client's address too.
    let pod_ip = t
        .lab
        .pods()
        .into_iter()
        .find(|p| p.name == "web-2")
        .unwrap()
        .ip
        .unwrap();
    let answer = NetNs::named(&client)
        .run(move || {
            let mut s = TcpStream::connect_timeout(&(pod_ip, 80).into(), Duration::from_secs(2))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok::<_, std::io::Error>(out)
        })
        .unwrap()
        .unwrap();
    assert!(answer.ends_with("\r\n\r\nweb-2\n"), "{answer}");
    assert!(
        answer.contains(&format!("X-Client-Address: {CLIENT}:")),
        "{answer}"
    );

    // The client behind the router and the pod and the other world hosts reach each other,
    // whichever way each is attached.
    let matrix = t
        .lab
        .probe(&ProbeRequest {
            namespaces: Vec::new(),
            selector: Default::default(),
            world: true,
            nodes: false,
            ports: vec![80],
            protocols: vec![Protocol::Tcp],
            options: ProbeOptions {
                via: Via::PodIp,
                timeout: Duration::from_secs(2),
            },
        })
        .unwrap();
    // (Between the others, a lab without agents has no routes to other nodes' pods.)
    let ours: Vec<_> = matrix
        .probes
        .iter()
        .filter(|p| p.from != p.to && (p.from == "world/client" || p.to == "world/client"))
        .collect();
    assert_eq!(ours.len(), 6, "{ours:?}");
    assert!(ours.iter().all(|p| p.allowed), "{ours:?}");

    // The VIP, with no dataplane to answer it: each node takes it as a local address, as
    // a NodePort frontend would, and says who it is. The router spreads the client's
    // connections over both.
    let web = vip(&t.lab, "web");
    let mut stops = Vec::new();
    for node in ["node-1", "node-2"] {
        let netns = t.lab.node_netns(node);
        NetNs::named(&netns)
            .netlink()
            .unwrap()
            .add_address("lo", IpNet::V4(host(web)))
            .unwrap();
        stops.push(serve(&netns, web, 80, move |_| node.to_string()));
    }
    let answered: BTreeSet<String> = (0..40)
        .map(|_| read_from(&client, (web, 80).into()))
        .collect();
    assert_eq!(
        answered,
        BTreeSet::from(["node-1".to_string(), "node-2".to_string()]),
        "40 connections through the VIP reach both nodes"
    );
    for stop in stops {
        stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn the_health_check_takes_a_failing_node_out_of_a_local_vip_after_its_delay() {
    let name = unique("lh");
    let text = lab_file(
        "198.51.100.0/28",
        "  healthCheck: {delay: 1s, interval: 100ms}\n",
    );
    let mut t = TestLab::up(&name, &text, Agent::None);
    let file = t.write(
        "web.yaml",
        &(web_pod("web-1", "node-1")
            + &lb_service("web", "  externalTrafficPolicy: Local\n")
            + &lb_service("cluster", "")),
    );
    t.lab.apply(&[file]).unwrap();
    let view = t
        .lab
        .services()
        .into_iter()
        .find(|s| s.name == "web")
        .unwrap();
    let port = u16::try_from(view.health_check_node_port.unwrap()).unwrap();
    let (web, cluster) = (vip(&t.lab, "web"), vip(&t.lab, "cluster"));
    let routes_of = |lab: &Lab, vip: Ipv4Addr| {
        vip_routes(lab)
            .into_iter()
            .find(|(d, _)| *d == host(vip))
            .map(|(_, hops)| hops)
            .unwrap()
    };
    let wait_for = |lab: &Lab, want: Vec<Ipv4Addr>, what: &str| {
        let started = Instant::now();
        while routes_of(lab, web) != want {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{what}: next hops still {:?}",
                routes_of(lab, web)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        started.elapsed()
    };

    // Only node-1 answers 200, as an agent with a local endpoint would; node-2 refuses.
    let healthy = |_| "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_string();
    let node_1 = serve(&t.lab.node_netns("node-1"), NODE_1, port, healthy);
    let out = wait_for(&t.lab, vec![NODE_1], "node-2 failing");
    eprintln!(
        "node-2 left the Local VIP's next hops {out:?} after its checks began failing (delay 1s)"
    );
    assert_eq!(
        routes_of(&t.lab, cluster),
        vec![NODE_1, NODE_2],
        "an externalTrafficPolicy=Cluster VIP is not health checked"
    );

    // node-2 answers 200 as well: it is back at its first good answer.
    let node_2 = serve(&t.lab.node_netns("node-2"), NODE_2, port, healthy);
    let back = wait_for(&t.lab, vec![NODE_1, NODE_2], "node-2 healthy again");
    eprintln!("node-2 back in the next hops {back:?} after it answered 200");

    // Every node failing: the load balancer sends to all of them, as a target pool does.
    node_1.store(true, Ordering::Relaxed);
    node_2.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(routes_of(&t.lab, web), vec![NODE_1, NODE_2]);
}
