//! A simulated cluster, generated in memory: Nodes, Namespaces, Pods, Services (some of
//! them LoadBalancers), their EndpointSlices and NetworkPolicies at any size up to GKE's
//! published limits, with the changes a churning cluster makes (pods replaced, Services
//! rolled, a node leaving and joining). Every object is a pure function of the shape and
//! its index, so a benchmark knows what the agent must realize for each change.
//!
//! Addresses: node `n` has InternalIP 172.16.0.0 + n + 1 and pod CIDR
//! 10.(64 + n / 256).(n % 256).0/24 (inside [`CLUSTER_CIDR`]); Service `s` has ClusterIP
//! 10.96.0.0 + s + 1, port 80 to 8080/TCP; LoadBalancer `s` (1 ..= load_balancers) has
//! nodePort 30000 + s and VIP 198.18.0.0 + s. Node 0 is the agent's own and holds the
//! first `local_pods` pods; the others are spread round-robin over the other nodes.
//! The objects carry what real ones do beside the fields sluice reads (owner references,
//! container specs, conditions, images), so the agent's memory is measured against
//! realistic objects.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::{FakeApiServer, FakeError, Resource};

/// The cluster's pod network: every Node's pod CIDR lies inside.
pub const CLUSTER_CIDR: &str = "10.64.0.0/10";
/// Endpoints per EndpointSlice, the EndpointSlice controller's default maximum.
pub const ENDPOINTS_PER_SLICE: usize = 100;
/// A pod's address is `pod CIDR + 2 + slot`, its slot moved by this when it is replaced
/// (so the new pod has a new address); a node holds at most this many pods.
const REPLACED_OFFSET: u32 = 126;
/// The Service port every generated Service serves, and its target port.
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// The node the agent under test runs as.
pub const LOCAL_NODE: &str = "node-0";

/// How big the cluster is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub nodes: usize,
    /// Every Pod, the local ones included.
    pub pods: usize,
    /// Pods on [`LOCAL_NODE`].
    pub local_pods: usize,
    pub namespaces: usize,
    pub services: usize,
    /// Endpoints over all EndpointSlices.
    pub endpoints: usize,
    /// Endpoints of Service 0, the largest.
    pub largest_service: usize,
    /// Services 1 ..= this are LoadBalancers.
    pub load_balancers: usize,
    pub network_policies: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("cluster shape {shape:?}: {problem}")]
pub struct ShapeError {
    shape: Shape,
    problem: &'static str,
}

impl Shape {
    /// GKE Dataplane V2's published limits: 7,500 nodes, 200,000 pods, 10,000 Services,
    /// 260,000 backends, 10,000 behind one Service, 750 LoadBalancers; with 110 pods on
    /// the agent's node (the kubelet's default maximum) and 1,000 NetworkPolicies.
    pub fn gke_limits() -> Self {
        Self {
            nodes: 7_500,
            pods: 200_000,
            local_pods: 110,
            namespaces: 100,
            services: 10_000,
            endpoints: 260_000,
            largest_service: 10_000,
            load_balancers: 750,
            network_policies: 1_000,
        }
    }

    /// The limits times `factor` (each count at least 1; the local pods stay).
    pub fn scaled(factor: f64) -> Self {
        let full = Self::gke_limits();
        let scale = |n: usize| ((n as f64 * factor).round() as usize).max(1);
        Self {
            nodes: scale(full.nodes).max(2),
            pods: scale(full.pods).max(full.local_pods + 1),
            local_pods: full.local_pods,
            namespaces: scale(full.namespaces),
            services: scale(full.services).max(2),
            endpoints: scale(full.endpoints),
            largest_service: scale(full.largest_service),
            load_balancers: scale(full.load_balancers),
            network_policies: scale(full.network_policies),
        }
    }

    /// A few of everything, for CI.
    pub fn tiny() -> Self {
        Self {
            nodes: 4,
            pods: 40,
            local_pods: 4,
            namespaces: 2,
            services: 6,
            endpoints: 30,
            largest_service: 10,
            load_balancers: 2,
            network_policies: 3,
        }
    }

    /// Refuses a shape the address plan cannot hold.
    pub fn check(&self) -> Result<(), ShapeError> {
        let fail = |problem| {
            Err(ShapeError {
                shape: *self,
                problem,
            })
        };
        if self.nodes < 2 || self.nodes > 16_384 {
            return fail("nodes must be 2 to 16,384 (the pod CIDRs of 10.64.0.0/10)");
        }
        if self.local_pods >= self.pods || self.local_pods as u32 > REPLACED_OFFSET {
            return fail("local_pods must be fewer than pods and at most 126");
        }
        if self.pods_per_remote_node() > REPLACED_OFFSET as usize {
            return fail("more than 126 pods on a node");
        }
        if self.services < 2 || self.load_balancers >= self.services {
            return fail("services must be at least 2 and more than load_balancers");
        }
        if self.load_balancers > 2_767 {
            return fail("more LoadBalancers than node ports");
        }
        if self.largest_service > self.endpoints || self.namespaces == 0 {
            return fail("largest_service exceeds endpoints, or no namespace");
        }
        Ok(())
    }

    fn pods_per_remote_node(&self) -> usize {
        (self.pods - self.local_pods).div_ceil(self.nodes - 1)
    }

    /// Objects in all: what an agent lists at start.
    pub fn objects(&self) -> usize {
        self.nodes
            + self.namespaces
            + self.pods
            + self.services
            + (0..self.services)
                .map(|s| self.endpoint_count(s).div_ceil(ENDPOINTS_PER_SLICE).max(1))
                .sum::<usize>()
            + self.network_policies
    }

    /// Endpoints of Service `s`.
    pub fn endpoint_count(&self, s: usize) -> usize {
        if s == 0 {
            return self.largest_service;
        }
        let rest = self.endpoints - self.largest_service;
        let others = self.services - 1;
        rest / others + usize::from(s - 1 < rest % others)
    }

    /// Index of Service `s`'s first endpoint among all endpoints.
    fn endpoint_offset(&self, s: usize) -> usize {
        if s == 0 {
            return 0;
        }
        let rest = self.endpoints - self.largest_service;
        let others = self.services - 1;
        let (base, extra) = (rest / others, rest % others);
        let before = s - 1;
        self.largest_service + before * base + before.min(extra)
    }

    /// The node and slot of pod `p`.
    fn placement(&self, p: usize) -> (usize, usize) {
        if p < self.local_pods {
            return (0, p);
        }
        let q = p - self.local_pods;
        (1 + q % (self.nodes - 1), q / (self.nodes - 1))
    }

    pub fn node_name(n: usize) -> String {
        format!("node-{n}")
    }

    pub fn node_address(n: usize) -> Ipv4Addr {
        offset(Ipv4Addr::new(172, 16, 0, 0), n as u32 + 1)
    }

    /// Node `n`'s pod CIDR: its network address (the prefix is /24).
    pub fn pod_cidr(n: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 64 + (n / 256) as u8, (n % 256) as u8, 0)
    }

    /// Pod `p`'s address in its `generation` (each replacement flips it).
    pub fn pod_address(&self, p: usize, generation: u32) -> Ipv4Addr {
        let (node, slot) = self.placement(p);
        let moved = if generation % 2 == 1 {
            REPLACED_OFFSET
        } else {
            0
        };
        offset(Self::pod_cidr(node), 2 + slot as u32 + moved)
    }

    pub fn cluster_ip(s: usize) -> Ipv4Addr {
        offset(Ipv4Addr::new(10, 96, 0, 0), s as u32 + 1)
    }

    fn namespace(&self, i: usize) -> String {
        format!("ns-{}", i % self.namespaces)
    }

    /// Namespace and name of pod `p`.
    pub fn pod_key(&self, p: usize) -> String {
        format!("{}/pod-{p}", self.namespace(p))
    }

    /// Namespace and name of Service `s`.
    pub fn service_key(&self, s: usize) -> String {
        format!("{}/svc-{s}", self.namespace(s))
    }
}

fn offset(base: Ipv4Addr, by: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + by)
}

fn node_conditions() -> Vec<Value> {
    let kinds = ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"];
    kinds
        .iter()
        .map(|t| {
            json!({
                "type": t, "status": if *t == "Ready" { "True" } else { "False" },
                "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z",
                "reason": format!("Kubelet{t}"), "message": "kubelet is posting ready status",
            })
        })
        .collect()
}

fn pod_conditions() -> Vec<Value> {
    let kinds = [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ];
    kinds
        .iter()
        .map(|t| json!({"type": t, "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}))
        .collect()
}

pub fn node(n: usize) -> Value {
    let name = Shape::node_name(n);
    json!({
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "e2-standard-4",
                "topology.kubernetes.io/region": "europe-west1",
                "topology.kubernetes.io/zone": format!("europe-west1-{}", ["b", "c", "d"][n % 3]),
                "cloud.google.com/gke-nodepool": "default-pool",
                "cloud.google.com/gke-os-distribution": "cos",
            },
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "podCIDR": format!("{}/24", Shape::pod_cidr(n)),
            "podCIDRs": [format!("{}/24", Shape::pod_cidr(n))],
            "providerID": format!("gce://project/europe-west1-b/{name}"),
        },
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": Shape::node_address(n).to_string()},
                {"type": "Hostname", "address": name},
            ],
            "capacity": {"cpu": "4", "memory": "16393220Ki", "pods": "110", "ephemeral-storage": "98831908Ki"},
            "allocatable": {"cpu": "3920m", "memory": "13440004Ki", "pods": "110", "ephemeral-storage": "47060071478"},
            "conditions": node_conditions(),
            "nodeInfo": {
                "machineID": format!("{n:032x}"), "systemUUID": format!("{n:032x}"), "bootID": format!("{n:032x}"),
                "kernelVersion": "6.6.56+", "osImage": "Container-Optimized OS from Google",
                "containerRuntimeVersion": "containerd://1.7.24", "kubeletVersion": "v1.34.1-gke.1000",
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
            },
            "images": (0..5).map(|i| json!({
                "names": [format!("registry.example/image-{i}@sha256:{:064x}", i)],
                "sizeBytes": 20_000_000 + i,
            })).collect::<Vec<_>>(),
        },
    })
}

pub fn namespace(shape: &Shape, i: usize) -> Value {
    let name = shape.namespace(i);
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, "team": format!("team-{}", i % 7)}},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// Pod `p` in its `generation`: replaced pods get a new address and uid-bearing owner.
pub fn pod(shape: &Shape, p: usize, generation: u32) -> Value {
    let (node, _) = shape.placement(p);
    let address = shape.pod_address(p, generation).to_string();
    let app = format!("app-{}", p % shape.services);
    json!({
        "metadata": {
            "name": format!("pod-{p}"),
            "namespace": shape.namespace(p),
            "generateName": format!("{app}-5d8f9c7b6-"),
            "labels": {"app": app, "pod-template-hash": "5d8f9c7b6"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-5d8f9c7b6"),
                                 "uid": format!("rs-{}", p % shape.services), "controller": true, "blockOwnerDeletion": true}],
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "nodeName": Shape::node_name(node),
            "containers": [{
                "name": "app",
                "image": "registry.example/app:1.27.3",
                "ports": [{"name": "http", "containerPort": TARGET_PORT, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "env": [{"name": "MODE", "value": "production"}, {"name": "LOG_LEVEL", "value": "info"}],
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                "terminationMessagePath": "/dev/termination-log",
                "imagePullPolicy": "IfNotPresent",
            }],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ],
        },
        "status": {
            "phase": "Running",
            "conditions": pod_conditions(),
            "hostIP": Shape::node_address(node).to_string(),
            "hostIPs": [{"ip": Shape::node_address(node).to_string()}],
            "podIP": address,
            "podIPs": [{"ip": address}],
            "startTime": "2026-01-01T00:00:00Z",
            "containerStatuses": [{"name": "app", "ready": true, "started": true, "restartCount": 0,
                "image": "registry.example/app:1.27.3", "imageID": format!("registry.example/app@sha256:{:064x}", 1),
                "containerID": format!("containerd://{p:064x}"), "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}],
            "qosClass": "Burstable",
        },
    })
}

pub fn service(shape: &Shape, s: usize) -> Value {
    let load_balancer = (1..=shape.load_balancers).contains(&s);
    let mut port =
        json!({"name": "http", "port": SERVICE_PORT, "targetPort": TARGET_PORT, "protocol": "TCP"});
    let mut spec = json!({
        "type": "ClusterIP",
        "clusterIP": Shape::cluster_ip(s).to_string(),
        "clusterIPs": [Shape::cluster_ip(s).to_string()],
        "selector": {"app": format!("app-{s}")},
        "sessionAffinity": "None",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "internalTrafficPolicy": "Cluster",
    });
    let mut status = json!({"loadBalancer": {}});
    if load_balancer {
        port["nodePort"] = json!(30_000 + s);
        spec["type"] = json!("LoadBalancer");
        spec["externalTrafficPolicy"] = json!("Cluster");
        spec["allocateLoadBalancerNodePorts"] = json!(true);
        let vip = offset(Ipv4Addr::new(198, 18, 0, 0), s as u32).to_string();
        status = json!({"loadBalancer": {"ingress": [{"ip": vip, "ipMode": "VIP"}]}});
    }
    spec["ports"] = json!([port]);
    json!({
        "metadata": {
            "name": format!("svc-{s}"),
            "namespace": shape.namespace(s),
            "labels": {"app": format!("app-{s}")},
            "annotations": {"cloud.google.com/neg": "{\"ingress\":true}"},
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": spec,
        "status": status,
    })
}

/// Service `s`'s EndpointSlices; `surge` adds one more endpoint (a rolling update's new
/// pod before the old one goes).
pub fn endpoint_slices(shape: &Shape, s: usize, surge: bool) -> Vec<Value> {
    let first = shape.endpoint_offset(s);
    let count = shape.endpoint_count(s) + usize::from(surge);
    let pods: Vec<usize> = (first..first + count).map(|e| e % shape.pods).collect();
    let chunks: Vec<&[usize]> = if pods.is_empty() {
        vec![&[]]
    } else {
        pods.chunks(ENDPOINTS_PER_SLICE).collect()
    };
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| slice(shape, s, i, chunk))
        .collect()
}

/// Namespace and name of Service `s`'s slice `i`.
pub fn slice_key(shape: &Shape, s: usize, i: usize) -> String {
    format!("{}/svc-{s}-{i}", shape.namespace(s))
}

fn slice(shape: &Shape, s: usize, i: usize, pods: &[usize]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|&p| {
            let (node, _) = shape.placement(p);
            json!({
                "addresses": [shape.pod_address(p, 0).to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": Shape::node_name(node),
                "targetRef": {"kind": "Pod", "namespace": shape.namespace(p), "name": format!("pod-{p}")},
                "zone": format!("europe-west1-{}", ["b", "c", "d"][node % 3]),
            })
        })
        .collect();
    json!({
        "metadata": {
            "name": format!("svc-{s}-{i}"),
            "namespace": shape.namespace(s),
            "labels": {"kubernetes.io/service-name": format!("svc-{s}"),
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": format!("svc-{s}"),
                                 "uid": format!("svc-{s}"), "controller": true, "blockOwnerDeletion": true}],
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// Policy `i`: the pods of one app admit another app's pods and a CIDR on the target port.
pub fn network_policy(shape: &Shape, i: usize) -> Value {
    let target = (i * 7) % shape.services;
    let peer = (i * 7 + 1) % shape.services;
    json!({
        "metadata": {"name": format!("allow-{i}"), "namespace": shape.namespace(i)},
        "spec": {
            "podSelector": {"matchLabels": {"app": format!("app-{target}")}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [
                    {"podSelector": {"matchLabels": {"app": format!("app-{peer}")}}, "namespaceSelector": {}},
                    {"ipBlock": {"cidr": "192.168.0.0/16"}},
                ],
                "ports": [{"protocol": "TCP", "port": TARGET_PORT}],
            }],
        },
    })
}

impl FakeApiServer {
    /// Creates every object of `shape`.
    pub fn load_cluster(&self, shape: &Shape) -> Result<(), FakeError> {
        for n in 0..shape.nodes {
            self.apply_json(Resource::Nodes, node(n))?;
        }
        for i in 0..shape.namespaces {
            self.apply_json(Resource::Namespaces, namespace(shape, i))?;
        }
        for p in 0..shape.pods {
            self.apply_json(Resource::Pods, pod(shape, p, 0))?;
        }
        for s in 0..shape.services {
            self.apply_json(Resource::Services, service(shape, s))?;
            for slice in endpoint_slices(shape, s, false) {
                self.apply_json(Resource::EndpointSlices, slice)?;
            }
        }
        for i in 0..shape.network_policies {
            self.apply_json(Resource::NetworkPolicies, network_policy(shape, i))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limits_hold_their_counts_and_addresses_do_not_collide() {
        for shape in [Shape::gke_limits(), Shape::scaled(0.1), Shape::tiny()] {
            shape.check().unwrap_or_else(|e| panic!("{e}"));
            let endpoints: usize = (0..shape.services).map(|s| shape.endpoint_count(s)).sum();
            assert_eq!(endpoints, shape.endpoints);
            assert_eq!(
                shape.endpoint_offset(shape.services - 1)
                    + shape.endpoint_count(shape.services - 1),
                shape.endpoints
            );
            let mut seen = std::collections::BTreeSet::new();
            for p in 0..shape.pods {
                for generation in 0..2 {
                    assert!(seen.insert(shape.pod_address(p, generation)), "pod {p}");
                }
            }
        }
        let local = Shape::gke_limits();
        assert_eq!(
            (0..local.pods)
                .filter(|&p| local.placement(p).0 == 0)
                .count(),
            110
        );
    }
}
