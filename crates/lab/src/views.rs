//! What `lab get` shows: pods, services, endpoints and world hosts, in kubectl's shapes.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Serialize;
use sluice_api::Client;

use crate::{Lab, loadbalancer, names, slices};

#[derive(Clone, Debug, Serialize)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub ready: bool,
    /// `Running` or `Terminating`, as kubectl shows it.
    pub status: String,
    pub ip: Option<Ipv4Addr>,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// The security identity its node's agent gave it ([`Lab::pod_identities`]); None
    /// until asked, or when the agent does not know the pod (yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    /// ClusterIP, NodePort, LoadBalancer or ExternalName.
    pub kind: String,
    /// The address, `None` for a headless service, empty for ExternalName.
    pub cluster_ip: String,
    /// As kubectl shows it: a LoadBalancer's VIPs, `<pending>` while it has none, else
    /// `<none>`.
    pub external_ip: String,
    /// An externalTrafficPolicy=Local LoadBalancer's port for the load balancer's health
    /// check.
    pub health_check_node_port: Option<i32>,
    /// `80/TCP,53/UDP` (`80:30080/TCP` with a nodePort).
    pub ports: String,
    pub labels: BTreeMap<String, String>,
    /// `spec.selector`; empty for a Service without one.
    pub selector: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointsView {
    pub namespace: String,
    pub name: String,
    /// The Service's labels, as the Endpoints object carries them.
    pub labels: BTreeMap<String, String>,
    /// Ready endpoints as `ip:port,...`, like `kubectl get endpoints`; empty if none.
    pub endpoints: String,
}

/// A host outside the cluster, as `lab get world` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct WorldHostView {
    pub name: String,
    pub address: Ipv4Addr,
    /// The node it hangs off, `underlay` or `router`.
    pub node: String,
    /// `80/TCP,53/UDP`.
    pub ports: String,
    pub netns: String,
}

impl Lab {
    pub fn pods(&self) -> Vec<PodView> {
        self.state
            .pods
            .values()
            .map(|p| PodView {
                namespace: p.namespace().into(),
                name: p.name().into(),
                ready: p.ready && p.deleting.is_none(),
                status: if p.deleting.is_some() {
                    "Terminating"
                } else {
                    "Running"
                }
                .into(),
                ip: Some(p.ip),
                node: p.node.clone(),
                labels: p.pod.metadata.labels.clone().unwrap_or_default(),
                identity: None,
            })
            .collect()
    }

    /// The identity of every pod the agents know, by `namespace/name`, asked of every
    /// node's agent; the nodes whose agent did not answer are returned with why.
    pub fn pod_identities(&self) -> (BTreeMap<String, u32>, Vec<(String, sluice_api::ApiError)>) {
        let mut identities = BTreeMap::new();
        let mut failed = Vec::new();
        if !self.state.agents {
            return (identities, failed);
        }
        for node in self.nodes() {
            match Client::new(self.agent_socket(&node)).endpoints() {
                Ok(endpoints) => identities.extend(
                    endpoints
                        .into_iter()
                        .map(|e| (format!("{}/{}", e.namespace, e.pod), e.identity)),
                ),
                Err(e) => failed.push((node, e)),
            }
        }
        (identities, failed)
    }

    pub fn services(&self) -> Vec<ServiceView> {
        self.state
            .services
            .values()
            .map(|s| {
                let spec = s.object.spec.clone().unwrap_or_default();
                let ports = spec
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| {
                        let proto = slices::protocol(p.protocol.as_ref());
                        match p.node_port {
                            Some(np) => format!("{}:{np}/{proto}", p.port),
                            None => format!("{}/{proto}", p.port),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                let vips = loadbalancer::vips(&s.object);
                let external_ip = if !vips.is_empty() {
                    vips.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                } else if loadbalancer::is_load_balancer(&s.object) {
                    "<pending>".into()
                } else {
                    "<none>".into()
                };
                ServiceView {
                    external_ip,
                    health_check_node_port: spec.health_check_node_port,
                    namespace: s.object.metadata.namespace.clone().unwrap_or_default(),
                    name: s.object.metadata.name.clone().unwrap_or_default(),
                    kind: spec.type_.unwrap_or_else(|| "ClusterIP".into()),
                    cluster_ip: spec.cluster_ip.unwrap_or_default(),
                    ports,
                    labels: s.object.metadata.labels.clone().unwrap_or_default(),
                    selector: spec.selector.unwrap_or_default(),
                }
            })
            .collect()
    }

    pub fn endpoints(&self) -> Vec<EndpointsView> {
        let pods = self.state.pod_objects();
        let all = self.state.endpoint_slices(&pods);
        self.state
            .services
            .values()
            .map(|s| {
                let namespace = s.object.metadata.namespace.clone().unwrap_or_default();
                let name = s.object.metadata.name.clone().unwrap_or_default();
                let mut endpoints = Vec::new();
                let of_service = all.iter().filter(|slice| {
                    slice.metadata.namespace.as_deref() == Some(&namespace)
                        && slice
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(slices::SERVICE_NAME_LABEL))
                            == Some(&name)
                });
                for slice in of_service {
                    // An unset `ready` means ready, per the EndpointSlice API.
                    let ready = slice
                        .endpoints
                        .iter()
                        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true));
                    let ports: Vec<i32> = slice
                        .ports
                        .iter()
                        .flatten()
                        .filter_map(|p| p.port)
                        .collect();
                    for address in ready.flat_map(|e| &e.addresses) {
                        let ip = address.parse().unwrap_or(Ipv4Addr::UNSPECIFIED);
                        if ports.is_empty() {
                            endpoints.push((ip, None, address.clone()));
                        }
                        endpoints.extend(
                            ports
                                .iter()
                                .map(|p| (ip, Some(*p), format!("{address}:{p}"))),
                        );
                    }
                }
                // In address order, as the Endpoints object lists them.
                endpoints.sort();
                let endpoints: Vec<String> =
                    endpoints.into_iter().map(|(_, _, text)| text).collect();
                EndpointsView {
                    namespace,
                    name,
                    labels: s.object.metadata.labels.clone().unwrap_or_default(),
                    endpoints: endpoints.join(","),
                }
            })
            .collect()
    }

    /// The lab's hosts outside the cluster, in lab file order.
    pub fn world_hosts(&self) -> Vec<WorldHostView> {
        self.state
            .spec
            .world
            .iter()
            .map(|w| WorldHostView {
                name: w.name.clone(),
                address: w.address,
                node: w.attach.to_string(),
                ports: w
                    .ports
                    .iter()
                    .map(|p| format!("{}/{}", p.port, p.protocol))
                    .collect::<Vec<_>>()
                    .join(","),
                netns: names::world_netns(&self.state.name, &w.name),
            })
            .collect()
    }
}
