//! A pod attached by the plugin gets traffic and policy like a lab pod: it reaches a
//! ClusterIP service and another pod, and a NetworkPolicy denying its egress holds from
//! its first packet, sent the moment ADD returns. Prints the ADD and DEL latencies (needs
//! root and bpffs; never skipped).

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "test")]

mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use sluice_api::flow::{Flow, FlowFilter, ObserveRequest, Verdict};
use sluice_netns::{NetNs, NsThread, OwnedNetNs};
use support::{Node, median, net_conf, pod, pod_args, snapshot, vars};

const SERVICE_IP: &str = "10.96.0.50";
const PORT: u16 = 8080;

/// A pod namespace the plugin attached, with its address.
struct Pod {
    netns: OwnedNetNs,
    container: String,
    address: String,
}

fn add(node: &Node, conf: &str, name: &str) -> (Pod, Duration) {
    let netns = OwnedNetNs::unique(&format!("sluice-test-cni-{name}-")).unwrap();
    let path = netns.path().display().to_string();
    static ADDED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = ADDED.fetch_add(1, Ordering::Relaxed);
    let container = format!("{name}-{}-{n}", std::process::id());
    let args = pod_args("default", name);
    let run = node.plugin(&vars("ADD", &container, &path, &args), conf);
    let result = run.result();
    let address = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.strip_suffix("/32"))
        .expect("a /32")
        .to_string();
    (
        Pod {
            netns,
            container,
            address,
        },
        run.elapsed,
    )
}

fn del(node: &Node, conf: &str, pod: &Pod) -> Duration {
    let path = pod.netns.path().display().to_string();
    let run = node.plugin(&vars("DEL", &pod.container, &path, ""), conf);
    assert!(run.success, "{}", run.stdout);
    run.elapsed
}

/// An echo server on the pod's port, stopped on drop.
struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<NsThread<()>>,
}

impl Echo {
    fn start(netns: &NetNs) -> Self {
        let listener = netns
            .run(|| TcpListener::bind(("0.0.0.0", PORT)))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = netns
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            stream.set_nonblocking(false).unwrap();
                            let mut buf = [0; 64];
                            if let Ok(n) = stream.read(&mut buf) {
                                let _ = stream.write_all(&buf[..n]);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
            .unwrap();
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects from `netns` to `to` and exchanges a line; the error if it could not.
fn exchange(netns: &NetNs, to: &str) -> Result<(), String> {
    let to: SocketAddr = to.parse().unwrap();
    netns
        .run(move || {
            let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(1))
                .map_err(|e| format!("connect {to}: {e}"))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            stream.write_all(b"ping").map_err(|e| e.to_string())?;
            let mut answer = [0; 4];
            stream
                .read_exact(&mut answer)
                .map_err(|e| format!("read from {to}: {e}"))?;
            assert_eq!(&answer, b"ping");
            Ok(())
        })
        .unwrap()
}

fn objects(extra: &[Value]) -> Value {
    let mut pods = vec![
        pod("server", "server", Some(PORT)),
        pod("client", "client", None),
        pod("denied", "denied", None),
    ];
    pods.extend((0..5).map(|i| pod(&format!("lat-{i}"), "latency", None)));
    let mut objects = json!({
        "pods": pods,
        "networkPolicies": [{
            "metadata": {"name": "deny-egress", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "denied"}}, "policyTypes": ["Egress"]},
        }],
    });
    for e in extra {
        for (k, v) in e.as_object().unwrap() {
            objects[k] = v.clone();
        }
    }
    objects
}

#[test]
fn a_pod_attached_by_the_plugin_gets_traffic_and_policy_like_a_lab_pod() {
    let mut node = Node::start("cni-traffic", &snapshot(1, objects(&[])), &[]);
    let conf = net_conf("1.0.0", &node.socket).to_string();
    let (server, _) = add(&node, &conf, "server");
    let (client, _) = add(&node, &conf, "client");
    let _echo = Echo::start(&server.netns);

    // The endpoint controller's part: a ClusterIP Service whose slice holds the server.
    let service = json!({
        "services": [{
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "ClusterIP", "clusterIP": SERVICE_IP,
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": PORT}]},
        }],
        "endpointSlices": [{
            "metadata": {"name": "web-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [server.address], "conditions": {"ready": true}}],
            "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
        }],
    });
    node.apply(&snapshot(2, objects(&[service])));

    exchange(&client.netns, &format!("{SERVICE_IP}:80")).expect("client to the ClusterIP");
    exchange(&client.netns, &format!("{}:{PORT}", server.address)).expect("client to the pod");
    let services = node.client().services().unwrap();
    assert!(
        services
            .iter()
            .any(|s| s.address.to_string() == SERVICE_IP && s.backends.len() == 1),
        "{services:?}"
    );

    // The first packet of a pod denied egress, sent the moment ADD returns, is dropped.
    let (denied, _) = add(&node, &conf, "denied");
    let refused = exchange(&denied.netns, &format!("{}:{PORT}", server.address));
    assert!(refused.is_err(), "the denied pod's first connection passed");
    let refused = exchange(&denied.netns, &format!("{SERVICE_IP}:80"));
    assert!(refused.is_err(), "the denied pod reached the ClusterIP");
    let entry = node.client().endpoint("default/denied").unwrap();
    assert!(entry.egress_enforced, "{entry:?}");
    // Dropped by policy (reason 133), not lost on the way: the datapath says so.
    assert_policy_drop(&node, "default/denied");
    // While a pod without the policy, added just the same, gets through at once.
    let (free, _) = add(&node, &conf, "lat-0");
    exchange(&free.netns, &format!("{SERVICE_IP}:80")).expect("a pod without policy");

    sequential_latency(&node, &conf, &free);
    concurrent_adds(&node, &conf);
    for pod in [&server, &client, &denied] {
        del(&node, &conf, pod);
    }
    assert_eq!(node.client().cni_status().unwrap().allocated, 0);
}

/// The endpoint's datapath dropped a connection of `pod` by policy (reason 133).
fn assert_policy_drop(node: &Node, pod: &str) {
    let drops: Vec<Flow> = node
        .client()
        .observe(&ObserveRequest {
            last: None,
            follow: false,
            filter: FlowFilter {
                from_pod: vec![pod.into()],
                verdict: vec![Verdict::Dropped],
                ..FlowFilter::default()
            },
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        drops.iter().any(|f| f.drop_reason == 133),
        "no policy drop from {pod}: {drops:?}"
    );
}

/// ADD (allocate, wire, realize, attach) and DEL of several pods, one after the other:
/// their medians are printed.
fn sequential_latency(node: &Node, conf: &str, free: &Pod) {
    let mut adds = Vec::new();
    let mut dels = vec![del(node, conf, free)];
    for i in 1..5 {
        let (pod, elapsed) = add(node, conf, &format!("lat-{i}"));
        adds.push(elapsed);
        dels.push(del(node, conf, &pod));
    }
    println!(
        "CNI ADD latency: median {:?} of {} ({adds:?})",
        median(&mut adds),
        adds.len()
    );
    println!(
        "CNI DEL latency: median {:?} of {} ({dels:?})",
        median(&mut dels),
        dels.len()
    );
}

/// Four ADDs at once, as a runtime starting several sandboxes makes them: distinct
/// addresses, each pod policed and reaching the ClusterIP.
fn concurrent_adds(node: &Node, conf: &str) {
    let started = std::time::Instant::now();
    let batch: Vec<(Pod, Duration)> = std::thread::scope(|scope| {
        let threads: Vec<_> = (1..5)
            .map(|i| scope.spawn(move || add(node, conf, &format!("lat-{i}"))))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let wall = started.elapsed();
    let mut addresses: Vec<&str> = batch.iter().map(|(p, _)| p.address.as_str()).collect();
    addresses.sort_unstable();
    addresses.dedup();
    assert_eq!(addresses.len(), 4, "{addresses:?}");
    for (pod, _) in &batch {
        exchange(&pod.netns, &format!("{SERVICE_IP}:80")).expect("a pod of the batch");
    }
    let mut each: Vec<Duration> = batch.iter().map(|(_, d)| *d).collect();
    println!(
        "4 concurrent CNI ADDs: all done after {wall:?}, each median {:?}",
        median(&mut each)
    );
    for (pod, _) in &batch {
        del(node, conf, pod);
    }
}
