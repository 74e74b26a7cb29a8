//! A pod attached by the plugin gets traffic and policy like a lab pod, with an agent fed
//! only by a fake Kubernetes API server (Node with its podCIDR, Namespace, Pods, a Service
//! and its EndpointSlice, NetworkPolicies) on the node namespace's loopback: the pod
//! reaches the ClusterIP and another pod before any Pod object carries its address (the
//! agent uses the endpoint's), a policy served by the API drops a pod's first packet, and
//! a policy deleted through the API's watch stops blocking a long-lived pod. Prints the
//! time from that deletion to the first allowed connection (needs root and bpffs; never
//! skipped).

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "test")]

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::{core::v1, networking::v1::NetworkPolicy};
use serde_json::json;
use sluice_api::flow::{Flow, FlowFilter, ObserveRequest, Verdict};
use sluice_fake_apiserver::Resource;
use support::{
    Echo, NODE, Node, POD_CIDR, Pod, add, assert_policy_drop, del, exchange, exchange_within,
    fake_api, median, net_conf, pod,
};

const PORT: u16 = 8080;
/// `fake_api::service` gives port 80 to targetPort 8080.
const SERVICE_IP: &str = "10.96.0.60";

/// The Pod object as the API serves it.
fn api_pod(name: &str, app: &str, port: Option<u16>) -> v1::Pod {
    serde_json::from_value(pod(name, app, port)).expect("a valid Pod")
}

/// The Pod object once the kubelet wrote the address CNI ADD gave it.
fn api_pod_running(name: &str, app: &str, port: Option<u16>, ip: &str) -> v1::Pod {
    let mut object = pod(name, app, port);
    object["status"] = json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]});
    serde_json::from_value(object).expect("a valid Pod")
}

/// A policy denying every egress of the pods labelled `app`.
fn deny_egress(name: &str, app: &str) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Egress"]},
    }))
    .expect("a valid NetworkPolicy")
}

/// The server admits only the client and the long-lived pod: a connection from either
/// needs the ipcache to know its address as its identity's.
fn web_ingress() -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": "web-ingress", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                                  {"key": "app", "operator": "In", "values": ["client", "long"]}]}}],
                              "ports": [{"protocol": "TCP", "port": PORT}]}]},
    }))
    .expect("a valid NetworkPolicy")
}

/// The pods of the test: (name, app label, container port).
const PODS: [(&str, &str, Option<u16>); 4] = [
    ("server", "web", Some(PORT)),
    ("client", "client", None),
    ("denied", "denied", None),
    ("long", "long", None),
];

#[test]
fn a_pod_attached_by_the_plugin_gets_traffic_and_policy_from_the_kubernetes_api() {
    let node = Node::start_kubernetes("cni-kube", &[], |api| {
        api.apply(&fake_api::namespace("default"));
        api.apply(&fake_api::node(NODE, POD_CIDR, "172.16.7.1"));
        for (name, app, port) in PODS {
            api.apply(&api_pod(name, app, port));
        }
        api.apply(&deny_egress("deny-egress", "denied"));
        api.apply(&deny_egress("hold", "long"));
        api.apply(&web_ingress());
    });
    let api = node.api();
    let conf = net_conf("1.0.0", &node.socket).to_string();
    let (server, server_add) = add(&node, &conf, "server");
    let (client, client_add) = add(&node, &conf, "client");
    let _echo = Echo::start(&server.netns, PORT);

    // The endpoint controller's part: the Service and a slice holding the server's
    // address, while no Pod object carries it yet: the agent knows the pods' addresses
    // from their endpoints, and the server's policy admits the client by them.
    let endpoint = node.client().endpoint("default/client").unwrap();
    assert_eq!(endpoint.ipv4.to_string(), client.address, "{endpoint:?}");
    assert!(
        node.client()
            .endpoint("default/server")
            .unwrap()
            .ingress_enforced
    );
    api.apply(&fake_api::service("web", SERVICE_IP));
    api.apply(&fake_api::slice("web", &[&server.address]));
    wait_for_service(&node);
    reaches(&client, &server);

    // The kubelet's part: status.podIP of each attached pod. The traffic stays the same.
    let pod_ip = |p: &Pod, (name, app, port): (&str, &str, Option<u16>)| {
        api.apply(&api_pod_running(name, app, port, &p.address))
    };
    pod_ip(&server, PODS[0]);
    pod_ip(&client, PODS[1]);
    reaches(&client, &server);

    // A policy the API served before the pod existed drops its first packet.
    let (denied, denied_add) = add(&node, &conf, "denied");
    let refused = exchange(&denied.netns, &format!("{}:{PORT}", server.address));
    assert!(refused.is_err(), "the denied pod's first connection passed");
    let refused = exchange(&denied.netns, &format!("{SERVICE_IP}:80"));
    assert!(refused.is_err(), "the denied pod reached the ClusterIP");
    assert!(
        node.client()
            .endpoint("default/denied")
            .unwrap()
            .egress_enforced
    );
    assert_policy_drop(&node, "default/denied");

    // A long-lived pod blocked by a policy, its address written by the kubelet, through
    // several periodic passes: the policy's deletion reaches it by the watch alone.
    let (long, long_add) = add(&node, &conf, "long");
    println!(
        "CNI ADD latency with the Kubernetes source: {:?}",
        [server_add, client_add, denied_add, long_add]
    );
    pod_ip(&long, PODS[3]);
    let target = format!("{SERVICE_IP}:80");
    for _ in 0..3 {
        assert!(
            exchange(&long.netns, &target).is_err(),
            "hold let it through"
        );
    }
    assert_policy_drop(&node, "default/long");
    let mut samples = vec![unblocked_by_deletion(&node, &long, &target)];
    assert_forwarded(&node, "default/long");
    // The view is published when the pass ends, just after the maps that let it through.
    let deadline = Instant::now() + Duration::from_secs(30);
    while node
        .client()
        .endpoint("default/long")
        .unwrap()
        .egress_enforced
    {
        assert!(
            Instant::now() < deadline,
            "the endpoint view still shows the deleted policy"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // More samples: the policy served again blocks the pod's next connection, and its
    // deletion unblocks it again.
    for _ in 0..4 {
        api.apply(&deny_egress("hold", "long"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while exchange_within(&long.netns, &target, Duration::from_millis(200)).is_ok() {
            assert!(Instant::now() < deadline, "hold served again never blocked");
        }
        samples.push(unblocked_by_deletion(&node, &long, &target));
    }
    println!(
        "policy deleted through the watch -> first allowed connection: median {:?} of {} \
         ({samples:?}; the first on the long-lived pod)",
        median(&mut samples.clone()),
        samples.len()
    );
    // The other policy still holds.
    assert!(exchange(&denied.netns, &target).is_err());

    for pod in [&server, &client, &denied, &long] {
        del(&node, &conf, pod);
    }
    assert_eq!(node.client().cni_status().unwrap().allocated, 0);
}

/// Deletes the policy `hold` through the fake API and measures the time from the watch
/// event to the first connection of `pod` to `target` that passes (attempts of 10 ms: a
/// dropped SYN is not sent again before a second).
fn unblocked_by_deletion(node: &Node, pod: &Pod, target: &str) -> Duration {
    let deleted = Instant::now();
    node.api()
        .server
        .delete(Resource::NetworkPolicies, "default/hold")
        .expect("the policy existed");
    let deadline = deleted + Duration::from_secs(30);
    while exchange_within(&pod.netns, target, Duration::from_millis(10)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the deleted policy still blocks the pod\n{}",
            node.log_text()
        );
    }
    deleted.elapsed()
}

/// Waits until the agent serves the ClusterIP with the server as its one backend.
fn wait_for_service(node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let services = node.client().services().unwrap();
        if services
            .iter()
            .any(|s| s.address.to_string() == SERVICE_IP && s.backends.len() == 1)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{services:?}\n{}",
            node.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `client` reaches the server pod through the ClusterIP and directly.
fn reaches(client: &Pod, server: &Pod) {
    exchange(&client.netns, &format!("{SERVICE_IP}:80")).expect("client to the ClusterIP");
    exchange(&client.netns, &format!("{}:{PORT}", server.address)).expect("client to the pod");
}

/// The datapath forwarded a connection of `pod`: its flow, read from the ring buffer by the
/// agent a moment after the packet.
fn assert_forwarded(node: &Node, pod: &str) {
    let request = ObserveRequest {
        last: None,
        follow: false,
        filter: FlowFilter {
            from_pod: vec![pod.into()],
            verdict: vec![Verdict::Forwarded],
            ..FlowFilter::default()
        },
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let flows: Vec<Flow> = node
            .client()
            .observe(&request)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        if !flows.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "no forwarded flow from {pod}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
