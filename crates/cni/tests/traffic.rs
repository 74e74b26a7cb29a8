//! A pod attached by the plugin gets traffic and policy like a lab pod: it reaches a
//! ClusterIP service and another pod, and a NetworkPolicy denying its egress holds from
//! its first packet, sent the moment ADD returns. Prints the ADD and DEL latencies (needs
//! root and bpffs; never skipped).

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "test")]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{
    Echo, Node, Pod, add, assert_policy_drop, del, exchange, median, net_conf, pod, snapshot,
};

const SERVICE_IP: &str = "10.96.0.50";
const PORT: u16 = 8080;

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
    let _echo = Echo::start(&server.netns, PORT);

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
