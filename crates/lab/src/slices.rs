//! EndpointSlices for Services with a selector, derived the way Kubernetes' EndpointSlice
//! controller derives them.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Pod, Service, ServicePort},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};

use crate::{names, spec::NodeSpec};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "sluice-lab";

/// Generated names are at most 63 characters, like those from `generateName`.
const MAX_PREFIX: usize = 57;

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

pub fn protocol(p: Option<&String>) -> &str {
    p.map_or("TCP", String::as_str)
}

/// The slices of `service` over `pods` (any namespace; the service's own is filtered here),
/// each endpoint in the zone of its pod's node among `nodes`. Services without a selector
/// get none: their slices come from the user.
pub fn derive(service: &Service, pods: &[Pod], nodes: &[NodeSpec]) -> Vec<EndpointSlice> {
    let Some(spec) = service.spec.as_ref() else {
        return Vec::new();
    };
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let service_ports = spec.ports.as_deref().unwrap_or_default();

    // Pods with identical resolved ports share a slice, as in the controller.
    let mut groups: BTreeMap<Vec<PortKey>, Vec<Endpoint>> = BTreeMap::new();
    let mut selected: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref().unwrap_or("default") == namespace)
        .filter(|p| {
            let labels = p.metadata.labels.as_ref();
            selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some())
        .collect();
    selected.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for pod in selected {
        let ports: Vec<PortKey> = service_ports
            .iter()
            .filter_map(|sp| resolve(sp, pod))
            .collect();
        // A pod that serves none of the ports is not an endpoint of the service at all.
        if ports.is_empty() && !service_ports.is_empty() {
            continue;
        }
        groups
            .entry(ports)
            .or_default()
            .push(endpoint(pod, publish_not_ready, nodes));
    }
    if groups.is_empty() {
        // The controller keeps one empty slice so that "no endpoints" is observable.
        groups.insert(Vec::new(), Vec::new());
    }
    groups
        .into_iter()
        .map(|(ports, endpoints)| slice(service, namespace, ports, endpoints))
        .collect()
}

/// One resolved port of one pod: (name, port, protocol), ordered like the service's ports.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PortKey {
    name: String,
    port: i32,
    protocol: String,
}

fn resolve(service_port: &ServicePort, pod: &Pod) -> Option<PortKey> {
    let protocol = protocol(service_port.protocol.as_ref());
    let port = match &service_port.target_port {
        None => service_port.port,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(name)) => {
            // A named port is looked up per pod, with the service port's protocol.
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.as_deref().unwrap_or_default())
                .find(|cp| {
                    cp.name.as_deref() == Some(name.as_str())
                        && self::protocol(cp.protocol.as_ref()) == protocol
                })?
                .container_port
        }
    };
    Some(PortKey {
        name: service_port.name.clone().unwrap_or_default(),
        port,
        protocol: protocol.to_string(),
    })
}

fn endpoint(pod: &Pod, publish_not_ready: bool, nodes: &[NodeSpec]) -> Endpoint {
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let serving = publish_not_ready || is_ready(pod);
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default();
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    Endpoint {
        addresses: vec![ip],
        conditions: Some(EndpointConditions {
            // A terminating pod is never "ready", unless the service publishes unready ones.
            ready: Some(publish_not_ready || (serving && !terminating)),
            serving: Some(serving),
            terminating: Some(terminating),
        }),
        node_name: node_name.clone(),
        // As the controller does: the zone label of the pod's node.
        zone: node_name
            .and_then(|name| nodes.iter().find(|n| n.name == name))
            .and_then(|n| n.zone.clone()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: pod.metadata.namespace.clone(),
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(
    service: &Service,
    namespace: &str,
    ports: Vec<PortKey>,
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    let service_name = service.metadata.name.clone().unwrap_or_default();
    let prefix: String = service_name.chars().take(MAX_PREFIX).collect();
    let port_json = serde_json::to_vec(
        &ports
            .iter()
            .map(|p| (&p.name, p.port, &p.protocol))
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default();
    let name = format!("{prefix}-{}", names::short_hash(&port_json));
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_string()),
            labels: Some(
                [
                    (SERVICE_NAME_LABEL.to_string(), service_name.clone()),
                    (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                ]
                .into(),
            ),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Service".into(),
                name: service_name,
                uid: service.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints,
        ports: (!ports.is_empty()).then(|| {
            ports
                .into_iter()
                .map(|p| EndpointPort {
                    name: Some(p.name),
                    port: Some(p.port),
                    protocol: Some(p.protocol),
                    app_protocol: None,
                })
                .collect()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, ContainerPort, PodCondition, PodSpec, PodStatus, ServiceSpec,
    };

    fn pod(name: &str, app: &str, ready: bool, ports: &[(&str, i32, &str)]) -> Pod {
        let n = name.bytes().last().unwrap_or(b'0') - b'0';
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                uid: Some(format!("uid-{name}")),
                labels: Some([("app".to_string(), app.to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(
                        ports
                            .iter()
                            .map(|(pn, p, proto)| ContainerPort {
                                name: (!pn.is_empty()).then(|| pn.to_string()),
                                container_port: *p,
                                protocol: Some(proto.to_string()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some(format!("10.244.1.{n}")),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn service(
        selector: &[(&str, &str)],
        ports: &[(&str, i32, Option<IntOrString>, &str)],
    ) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("svc-uid".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: Some(
                    selector
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ports: Some(
                    ports
                        .iter()
                        .map(|(name, port, target, proto)| ServicePort {
                            name: (!name.is_empty()).then(|| name.to_string()),
                            port: *port,
                            target_port: target.clone(),
                            protocol: Some(proto.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: None,
        }
    }

    /// (endpoint pod names with ready/serving/terminating, ports as name:port/proto) per slice.
    fn summary(slices: &[EndpointSlice]) -> Vec<(Vec<String>, Vec<String>)> {
        slices
            .iter()
            .map(|s| {
                let eps = s
                    .endpoints
                    .iter()
                    .map(|e| {
                        let c = e.conditions.as_ref().unwrap();
                        let flag = |b: Option<bool>| if b == Some(true) { '1' } else { '0' };
                        format!(
                            "{}@{} {}{}{}",
                            e.target_ref.as_ref().unwrap().name.as_deref().unwrap(),
                            e.addresses[0],
                            flag(c.ready),
                            flag(c.serving),
                            flag(c.terminating)
                        )
                    })
                    .collect();
                let ports = s
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| {
                        format!(
                            "{}:{}/{}",
                            p.name.as_deref().unwrap(),
                            p.port.unwrap(),
                            p.protocol.as_deref().unwrap()
                        )
                    })
                    .collect();
                (eps, ports)
            })
            .collect()
    }

    #[test]
    fn selector_picks_pods_in_the_service_namespace_and_port_defaults_to_port() {
        let mut other_ns = pod("pod-3", "web", true, &[]);
        other_ns.metadata.namespace = Some("other".into());
        let pods = [
            pod("pod-2", "web", true, &[]),
            pod("pod-1", "web", true, &[]),
            pod("pod-4", "db", true, &[]),
            other_ns,
        ];
        let slices = derive(
            &service(&[("app", "web")], &[("", 80, None, "TCP")]),
            &pods,
            &[],
        );
        assert_eq!(
            summary(&slices),
            [(
                vec![
                    "pod-1@10.244.1.1 110".to_string(),
                    "pod-2@10.244.1.2 110".to_string()
                ],
                vec![":80/TCP".to_string()]
            )]
        );
        let s = &slices[0];
        assert_eq!(s.address_type, "IPv4");
        let labels = s.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], "sluice-lab");
        let name = s.metadata.name.as_deref().unwrap();
        assert!(
            name.starts_with("web-") && name.len() == "web-".len() + 5,
            "{name}"
        );
        assert_eq!(s.endpoints[0].node_name.as_deref(), Some("node-1"));
        assert_eq!(
            s.endpoints[0].target_ref.as_ref().unwrap().uid.as_deref(),
            Some("uid-pod-1")
        );
    }

    #[test]
    fn readiness_and_termination_become_conditions() {
        let mut terminating = pod("pod-3", "web", false, &[]);
        terminating.metadata.deletion_timestamp = Some(crate::state::now());
        let pods = [
            pod("pod-1", "web", true, &[]),
            pod("pod-2", "web", false, &[]),
            terminating,
        ];
        let svc = service(
            &[("app", "web")],
            &[("http", 80, Some(IntOrString::Int(8080)), "TCP")],
        );
        assert_eq!(
            summary(&derive(&svc, &pods, &[])),
            [(
                vec![
                    "pod-1@10.244.1.1 110".to_string(),
                    "pod-2@10.244.1.2 000".to_string(),
                    "pod-3@10.244.1.3 001".to_string()
                ],
                vec!["http:8080/TCP".to_string()]
            )]
        );
        let mut publish = svc.clone();
        publish.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
        let eps = &summary(&derive(&publish, &pods, &[]))[0].0;
        assert_eq!(eps[1], "pod-2@10.244.1.2 110");
        assert_eq!(eps[2], "pod-3@10.244.1.3 111");
    }

    #[test]
    fn named_target_ports_resolve_per_pod_and_group_pods_by_ports() {
        let pods = [
            pod(
                "pod-1",
                "web",
                true,
                &[("http", 8080, "TCP"), ("dns", 53, "UDP")],
            ),
            pod(
                "pod-2",
                "web",
                true,
                &[("http", 9090, "TCP"), ("dns", 53, "UDP")],
            ),
            pod(
                "pod-3",
                "web",
                true,
                &[("http", 8080, "TCP"), ("dns", 53, "UDP")],
            ),
            // Lacks "dns": an endpoint for http only.
            pod("pod-4", "web", true, &[("http", 8080, "TCP")]),
            // Lacks both: no endpoint at all.
            pod("pod-5", "web", true, &[("metrics", 9100, "TCP")]),
        ];
        let svc = service(
            &[("app", "web")],
            &[
                ("http", 80, Some(IntOrString::String("http".into())), "TCP"),
                ("dns", 53, Some(IntOrString::String("dns".into())), "UDP"),
            ],
        );
        let mut got = summary(&derive(&svc, &pods, &[]));
        got.sort();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let mut want = vec![
            (
                s(&["pod-1@10.244.1.1 110", "pod-3@10.244.1.3 110"]),
                s(&["http:8080/TCP", "dns:53/UDP"]),
            ),
            (
                s(&["pod-2@10.244.1.2 110"]),
                s(&["http:9090/TCP", "dns:53/UDP"]),
            ),
            (s(&["pod-4@10.244.1.4 110"]), s(&["http:8080/TCP"])),
        ];
        want.sort();
        assert_eq!(got, want);
        // Distinct port sets get distinct, stable names.
        let names: std::collections::BTreeSet<_> = derive(&svc, &pods, &[])
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names.len(), 3);
    }

    #[test]
    fn a_named_port_of_another_protocol_does_not_match() {
        let pods = [pod("pod-1", "web", true, &[("dns", 53, "TCP")])];
        let svc = service(
            &[("app", "web")],
            &[("dns", 53, Some(IntOrString::String("dns".into())), "UDP")],
        );
        // No endpoints, but the controller's empty placeholder slice.
        assert_eq!(summary(&derive(&svc, &pods, &[])), [(vec![], vec![])]);
    }

    #[test]
    fn services_without_selector_get_no_derived_slices() {
        let pods = [pod("pod-1", "web", true, &[])];
        assert!(derive(&service(&[], &[("", 80, None, "TCP")]), &pods, &[]).is_empty());
    }

    #[test]
    fn endpoints_are_in_the_zone_of_their_pods_node() {
        let pods = [pod("web-1", "web", true, &[])];
        let svc = service(&[("app", "web")], &[("", 80, None, "TCP")]);
        let node = |zone: Option<&str>| NodeSpec {
            name: "node-1".into(),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
            underlay_address: None,
            zone: zone.map(str::to_string),
        };
        let zone_of = |nodes: &[NodeSpec]| derive(&svc, &pods, nodes)[0].endpoints[0].zone.clone();
        assert_eq!(zone_of(&[node(Some("a"))]).as_deref(), Some("a"));
        assert_eq!(zone_of(&[node(None)]), None);
        assert_eq!(zone_of(&[]), None, "a pod on no known node has no zone");
    }
}
