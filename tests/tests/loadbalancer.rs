//! Seed 003's scenario end to end (issue 11): a LoadBalancer Service fronting three nginx
//! pods on two nodes, in the lab of examples/lab-seed003.yaml (the lab plays the cloud: a
//! VIP from its pool, a router spreading it over both nodes, a health check with seed 003's
//! 6 s delay) with the real agents. One Service is three frontends in `service list`; ten
//! requests from a client on the internet through the VIP all succeed with
//! externalTrafficPolicy Cluster; with Local and one replica, what the load balancer still
//! sends to the pod-less node is refused at once, not black-holed, the pod sees the client's
//! own address, and the VIP converges once the health check takes the node out.
//!
//! The NodePort and VIP frontends, ETP=Local refusal and SNAT are the datapath's
//! (bpf/host.c) and the compiler's, the per-frontend `service list` the CLI's: the last two
//! tests pass once those are in. The first, the lab's own part with the real agents, passes
//! alone; crates/lab/tests/loadbalancer.rs tests the lab without any agent.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    fs,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use sluice_integration::{TestLab, examples, in_netns};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const CLIENT_HOST: &str = "world/client";
const SERVICE: &str = "nginx";
/// The example's loadBalancer.healthCheck.delay.
const HEALTH_CHECK_DELAY: Duration = Duration::from_secs(6);

/// The lab of examples/lab-seed003.yaml with examples/seed003-nginx.yaml applied.
fn seed_003(prefix: &str) -> TestLab {
    let text = fs::read_to_string(examples().join("lab-seed003.yaml")).unwrap();
    let mut lab = TestLab::up(prefix, &text);
    lab.lab
        .apply(&[examples().join("seed003-nginx.yaml")])
        .unwrap_or_else(|e| panic!("apply seed003-nginx.yaml: {e}"));
    lab
}

/// The Service's VIP, nodePort and ClusterIP, as `lab get services` shows them.
fn frontends(lab: &TestLab) -> (Ipv4Addr, u16, Ipv4Addr) {
    let view = lab
        .lab
        .services()
        .into_iter()
        .find(|s| s.name == SERVICE)
        .unwrap();
    let vip: Ipv4Addr = view
        .external_ip
        .parse()
        .unwrap_or_else(|_| panic!("no VIP: EXTERNAL-IP {}", view.external_ip));
    let node_port = view
        .ports
        .split([':', '/'])
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    (vip, node_port, view.cluster_ip.parse().unwrap())
}

/// What one HTTP GET from the client got: the answering pod and the address it saw, or
/// the error, with the time at the client.
struct Answer {
    result: std::io::Result<(String, String)>,
    took: Duration,
}

fn get_from_client(lab: &TestLab, addr: SocketAddr) -> Answer {
    let netns = lab.lab.netns_of(CLIENT_HOST).unwrap();
    in_netns(&netns, move || {
        let started = Instant::now();
        let result = (|| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(6))?;
            s.set_read_timeout(Some(Duration::from_secs(6)))?;
            s.write_all(
                format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
            if !head.starts_with("HTTP/1.1 200") {
                return Err(std::io::Error::other(format!("answered {head:?}")));
            }
            let client = head
                .lines()
                .find_map(|l| l.strip_prefix("X-Client-Address: "))
                .and_then(|a| a.rsplit_once(':'))
                .map(|(ip, _)| ip.to_string())
                .unwrap_or_default();
            Ok((body.trim().to_string(), client))
        })();
        Answer {
            result,
            took: started.elapsed(),
        }
    })
}

fn pod_nodes(lab: &TestLab) -> Vec<(String, String)> {
    lab.lab
        .pods()
        .into_iter()
        .filter(|p| p.namespace == "netflow-test" && p.status == "Running")
        .map(|p| (p.name, p.node))
        .collect()
}

fn underlay_address(lab: &TestLab, node: &str) -> Ipv4Addr {
    lab.lab
        .spec()
        .node(node)
        .and_then(|n| n.underlay_address)
        .unwrap()
}

/// What the lab owns, with the real agents: the VIP in the Service's status, the router's
/// ECMP route over both nodes, and the client behind the router reaching every pod by its
/// address, which sees the client's own address. Passes without the NodePort datapath.
#[test]
fn seed_003_lab_gives_the_vip_and_routes_the_client_to_the_pods() {
    let lab = seed_003("seed3r");
    let (vip, node_port, _) = frontends(&lab);
    assert!(
        "198.51.100.0/28"
            .parse::<sluice_lab::Ipv4Net>()
            .unwrap()
            .contains(&vip)
    );
    assert!((30000..=32767).contains(&node_port));
    let routes = sluice_netns::NetNs::named(lab.lab.router_netns())
        .netlink()
        .unwrap()
        .multipath_routes(sluice_lab::VIP_ROUTE_PROTOCOL)
        .unwrap();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0].destination.addr(), vip);
    assert_eq!(
        routes[0].gateways,
        vec![
            underlay_address(&lab, "node-1"),
            underlay_address(&lab, "node-2")
        ]
    );
    for pod in lab
        .lab
        .pods()
        .into_iter()
        .filter(|p| p.namespace == "netflow-test")
    {
        let a = get_from_client(&lab, (pod.ip.unwrap(), 80).into());
        let (by, client) = a
            .result
            .unwrap_or_else(|e| panic!("client -> {} on {}: {e}", pod.name, pod.node));
        assert_eq!((by, client), (pod.name.clone(), CLIENT.to_string()));
    }
}

#[test]
fn seed_003_cluster_then_local_failover() {
    let mut lab = seed_003("seed3");
    let (vip, node_port, _) = frontends(&lab);
    let pods = pod_nodes(&lab);
    assert_eq!(pods.len(), 3);
    let nodes: BTreeSet<&str> = pods.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["node-1", "node-2"]), "{pods:?}");

    // externalTrafficPolicy Cluster: ten requests through the VIP all succeed.
    let mut answered = BTreeSet::new();
    for i in 0..10 {
        let a = get_from_client(&lab, (vip, 80).into());
        let (pod, _) = a
            .result
            .unwrap_or_else(|e| panic!("request {i} through {vip}: {e}"));
        eprintln!("ETP=Cluster {vip}:80 -> 200 {pod} in {:?}", a.took);
        answered.insert(pod);
    }
    eprintln!("ETP=Cluster: 10 of 10 through the VIP answered, by {answered:?}");
    // And each node's NodePort, whichever node the backend is on.
    for node in ["node-1", "node-2"] {
        let addr = SocketAddr::from((underlay_address(&lab, node), node_port));
        let a = get_from_client(&lab, addr);
        assert!(
            a.result.is_ok(),
            "ETP=Cluster NodePort {addr}: {:?}",
            a.result.err()
        );
    }

    // externalTrafficPolicy Local, one replica.
    let scaled = Instant::now();
    lab.lab
        .apply(&[examples().join("seed003-local.yaml")])
        .unwrap_or_else(|e| panic!("apply seed003-local.yaml: {e}"));
    let pods = pod_nodes(&lab);
    assert_eq!(pods.len(), 1, "{pods:?}");
    let (pod, pod_node) = pods[0].clone();
    let empty = if pod_node == "node-1" {
        "node-2"
    } else {
        "node-1"
    };

    // The pod-less node refuses at once, at its NodePort...
    let addr = SocketAddr::from((underlay_address(&lab, empty), node_port));
    let a = get_from_client(&lab, addr);
    let err = a.result.expect_err("the pod-less node answered");
    eprintln!(
        "ETP=Local: the pod-less node's NodePort {addr} refused the client after {:.2} ms ({err}; target < 50 ms)",
        a.took.as_secs_f64() * 1e3
    );
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert!(
        a.took < Duration::from_millis(50),
        "refused after {:?}",
        a.took
    );

    // ... and what the load balancer still sends it through the VIP, until the health
    // check takes it out: refused, never black-holed.
    let mut refused = Vec::new();
    let mut served = 0;
    while refused.is_empty() && scaled.elapsed() < HEALTH_CHECK_DELAY {
        let a = get_from_client(&lab, (vip, 80).into());
        match a.result {
            Ok((by, client)) => {
                assert_eq!(by, pod);
                assert_eq!(
                    client,
                    CLIENT.to_string(),
                    "ETP=Local keeps the client's address"
                );
                served += 1;
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
                refused.push(a.took);
            }
        }
    }
    let window = scaled.elapsed();
    match refused.first() {
        Some(took) => eprintln!(
            "ETP=Local through the VIP within the health check's window: a request landing on the pod-less node refused after {:.2} ms ({served} served first)",
            took.as_secs_f64() * 1e3
        ),
        None => eprintln!(
            "ETP=Local through the VIP: {served} requests in the first {window:?} all reached {pod_node}"
        ),
    }
    assert!(
        refused.iter().all(|t| *t < Duration::from_millis(50)),
        "{refused:?}"
    );

    // The pod sees the client's own address at its node's NodePort.
    let addr = SocketAddr::from((underlay_address(&lab, &pod_node), node_port));
    let (by, client) = get_from_client(&lab, addr).result.unwrap();
    assert_eq!((by.as_str(), client.as_str()), (pod.as_str(), "192.0.2.10"));

    // Convergence: once the health check has taken the pod-less node out, every request
    // through the VIP succeeds.
    let mut in_a_row = 0;
    while in_a_row < 20 {
        assert!(
            scaled.elapsed() < HEALTH_CHECK_DELAY * 5,
            "the VIP did not converge within {:?}",
            HEALTH_CHECK_DELAY * 5
        );
        match get_from_client(&lab, (vip, 80).into()).result {
            Ok(_) => in_a_row += 1,
            Err(_) => in_a_row = 0,
        }
    }
    eprintln!(
        "ETP=Local: 20 requests in a row through the VIP succeed {:?} after the scale to one replica (health check delay {HEALTH_CHECK_DELAY:?}; seed 003's legacy dataplane: ~130 s, 6 s per black-holed request)",
        scaled.elapsed()
    );
}

#[test]
fn seed_003_service_list_shows_three_frontends() {
    let lab = seed_003("seed3l");
    let (vip, node_port, cluster_ip) = frontends(&lab);
    let services = lab.cli_json(&["--node", "node-1", "service", "list"]);
    let ours: Vec<&serde_json::Value> = services
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["service"]
                .as_str()
                .is_some_and(|n| n.starts_with("netflow-test/nginx"))
        })
        .collect();
    // Each frontend's kind, as the agent's API names it (`frontend`), like Cilium's list.
    let has = |kind: &str, address: Ipv4Addr, port: u16| {
        ours.iter().any(|s| {
            s["frontend"] == kind
                && s["port"] == port
                && s["address"] == address.to_string()
                && s["backends"].as_array().is_some_and(|b| b.len() == 3)
        })
    };
    assert!(has("ClusterIP", cluster_ip, 80), "{ours:#?}");
    // node-1's agent: its own address at the nodePort.
    let node_1 = underlay_address(&lab, "node-1");
    assert!(has("NodePort", node_1, node_port), "{ours:#?}");
    assert!(has("LoadBalancer", vip, 80), "{ours:#?}");
    eprintln!("{}", lab.cli(&["--node", "node-1", "service", "list"]));
}
