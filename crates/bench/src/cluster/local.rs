//! The pods on the agent's own node as real veths: one namespace per pod wired as
//! `sluice-cni` wires it (`sluice_netns::wire_guest`, the node's router interface), each
//! recorded in the agent's CNI registry under its `--state-dir` before it starts, as a
//! restarted agent finds the pods the plugin attached. The agent then attaches its
//! programs to every veth and fills every endpoint's policy map.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path};

use sluice_agent::cni::Registry;
use sluice_api::cni::{CniAddRequest, CniAttachment};
use sluice_fake_apiserver::cluster::{LOCAL_NODE, Shape};
use sluice_netns::{Guest, Ipv4Net, add_router_interface, wire_guest};

use crate::{BenchError, netns::NetNs};

/// The pods' namespaces, deleted (with their veths) on drop.
pub struct LocalPods {
    pub pods: Vec<NetNs>,
}

/// Wires `shape.local_pods` pods to `node` and records them in the registry under
/// `state_dir`; the registry's IPAM must give each the address its Pod object has.
pub fn wire(node: &NetNs, shape: &Shape, state_dir: &Path) -> Result<LocalPods, BenchError> {
    let failed = |what: String| BenchError::Failed(what);
    let (mut registry, _published) =
        Registry::open(LOCAL_NODE, state_dir).map_err(|e| failed(format!("CNI registry: {e}")))?;
    let cidr = Ipv4Net::new(Shape::pod_cidr(0), 24).map_err(|e| failed(e.to_string()))?;
    let router = Ipv4Addr::from(u32::from(Shape::pod_cidr(0)) + 1);
    let netlink = node.netlink()?;
    add_router_interface(&netlink, router, None)?;
    let mut pods = Vec::with_capacity(shape.local_pods);
    for p in 0..shape.local_pods {
        let pod = NetNs::new("cp")?;
        let interface = format!("lxcb{p}");
        let (namespace, name) = shape
            .pod_key(p)
            .split_once('/')
            .map(|(n, p)| (n.to_owned(), p.to_owned()))
            .ok_or_else(|| failed(format!("pod key {}", shape.pod_key(p))))?;
        let endpoint = registry
            .add(
                &CniAddRequest {
                    attachment: CniAttachment {
                        container_id: format!("bench-{p}"),
                        ifname: "eth0".into(),
                    },
                    netns: pod.ns().path().display().to_string(),
                    namespace,
                    pod: name,
                    interface: interface.clone(),
                },
                cidr,
                &BTreeSet::new(),
            )
            .map_err(|e| failed(format!("CNI registry: {e}")))?;
        let address = shape.pod_address(p, 0);
        if endpoint.address != address {
            return Err(failed(format!(
                "IPAM gave pod {p} {} where its Pod object says {address}",
                endpoint.address
            )));
        }
        let guest = Guest {
            interface: &interface,
            device: "eth0",
            address,
            router,
            mtu: None,
            alias: None,
        };
        wire_guest(&netlink, pod.ns(), &guest)?;
        pods.push(pod);
    }
    Ok(LocalPods { pods })
}
