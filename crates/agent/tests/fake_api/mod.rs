//! A fake API server on the loopback of a network namespace the test owns, its kubeconfig
//! in a file, and API objects written as the API reference shows them; all removed on drop,
//! also when the test panics. The CNI plugin's tests use it too (`#[path]`), with the
//! server on their node's namespace.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::{path::PathBuf, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    serde::de::DeserializeOwned,
};
use serde_json::json;
use sluice_fake_apiserver::FakeApiServer;
use sluice_netns::{NetNs, OwnedNetNs};
use sluice_store::Snapshot;

/// A fake API server on the loopback of a namespace someone else owns (and drops after
/// this), with its kubeconfig in a file removed on drop.
pub struct Served {
    pub server: FakeApiServer,
    pub kubeconfig: PathBuf,
}

impl Served {
    pub fn start(ns: &NetNs) -> Self {
        let listener = ns
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .expect("enter the test namespace")
            .expect("bind the fake API server on the namespace's loopback");
        let server = FakeApiServer::start(listener).expect("start the fake API server");
        let kubeconfig = std::env::temp_dir().join(format!("{}.kubeconfig", ns.name()));
        std::fs::write(&kubeconfig, server.kubeconfig()).expect("write the kubeconfig");
        Self { server, kubeconfig }
    }

    pub fn apply<K: k8s_openapi::Resource + serde::Serialize>(&self, object: &K) -> u64 {
        self.server.apply(object).expect("apply to the fake API")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// A fake API server in a namespace of its own. Fields drop in order: the server before
/// its namespace.
pub struct FakeApi {
    served: Served,
    pub ns: OwnedNetNs,
}

impl std::ops::Deref for FakeApi {
    type Target = Served;

    fn deref(&self) -> &Served {
        &self.served
    }
}

impl FakeApi {
    pub fn start(prefix: &str) -> Self {
        let ns = OwnedNetNs::unique(prefix).expect("create the test namespace");
        Self {
            served: Served::start(&ns),
            ns,
        }
    }

    /// A namespace, a node, two Services with one slice each, two pods and a policy.
    pub fn seed(&self) {
        self.apply(&namespace("default"));
        self.apply(&node("node-1", "10.244.1.0/24", "172.16.0.1"));
        for (i, name) in ["svc-a", "svc-b"].into_iter().enumerate() {
            self.apply(&service(name, &format!("10.96.0.{}", 10 + i)));
            self.apply(&slice(name, &[&format!("10.244.1.{}", 10 + i)]));
        }
        self.apply(&pod("web-0", "10.244.1.10"));
        self.apply(&pod("web-1", "10.244.1.11"));
        self.apply(&policy("web"));
    }
}

fn from<K: DeserializeOwned>(value: serde_json::Value) -> K {
    serde_json::from_value(value).expect("a valid object")
}

pub fn namespace(name: &str) -> Namespace {
    from(json!({"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}}))
}

pub fn node(name: &str, pod_cidr: &str, address: &str) -> Node {
    from(json!({
        "metadata": {"name": name},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": address},
                                 {"type": "Hostname", "address": name}]},
    }))
}

pub fn service(name: &str, cluster_ip: &str) -> Service {
    from(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
    }))
}

pub fn slice(service: &str, addresses: &[&str]) -> EndpointSlice {
    let endpoints: Vec<_> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true, "serving": true, "terminating": false},
                        "nodeName": "node-1"}))
        .collect();
    from(json!({
        "metadata": {"name": format!("{service}-abcde"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }))
}

pub fn pod(name: &str, ip: &str) -> Pod {
    from(json!({
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "web", "image": "nginx"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "172.16.0.1"},
    }))
}

pub fn policy(name: &str) -> NetworkPolicy {
    from(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                              "ports": [{"protocol": "TCP", "port": 8080}]}]},
    }))
}

/// `namespace/name` of each object, in the snapshot's order.
pub fn names<
    K: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
>(
    objects: &[K],
) -> Vec<String> {
    objects
        .iter()
        .map(|o| sluice_store::object_ref(o.metadata()))
        .collect()
}

/// `namespace/name` of each pod, as [`names`] gives other objects'.
pub fn pod_names(pods: &[sluice_store::Pod]) -> Vec<String> {
    pods.iter()
        .map(|p| {
            format!(
                "{}/{}",
                p.namespace().unwrap_or("default"),
                p.name().unwrap_or("")
            )
        })
        .collect()
}

pub type Shared = Arc<Snapshot>;
