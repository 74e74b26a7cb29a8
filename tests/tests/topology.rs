//! trafficDistribution PreferClose across two zones: the lab labels each Node with its zone
//! and puts each endpoint in the zone of its pod's node, so a client in zone a reaches only
//! the zone-a backend of a Service, and the zone-b one once zone a has none left.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, net::SocketAddr};

use sluice_integration::{
    TestLab, http_get,
    multinode::{Mode, lab_yaml, pod_on},
};

const CONNECTIONS: usize = 20;

/// One backend Deployment per node (its template names the node), both behind `close`.
fn web_on(name: &str, node: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: web, site: {name}}}
  template:
    metadata:
      labels: {{app: web, site: {name}}}
    spec:
      nodeName: {node}
      containers:
      - name: c
        image: agnhost
        ports: [{{containerPort: 80}}]
"
    )
}

const CLOSE: &str = "apiVersion: v1
kind: Service
metadata: {name: close}
spec:
  trafficDistribution: PreferClose
  selector: {app: web}
  ports: [{port: 80}]
";

/// The lab file of [`lab_yaml`] with node k in zone `zones[k]`.
fn zoned_lab(zones: &[&str]) -> String {
    let mut yaml = lab_yaml(Mode::Tunnel, zones.len(), 1500);
    for (k, zone) in zones.iter().enumerate() {
        let node = format!("{{name: node-{}, ", k + 1);
        yaml = yaml.replace(&node, &format!("{node}zone: {zone}, "));
    }
    yaml
}

/// How many of `CONNECTIONS` new connections from `client` to `vip` each pod answered.
fn answers(lab: &TestLab, client: &str, vip: SocketAddr) -> BTreeMap<String, usize> {
    lab.in_pod(client, move || {
        let mut count = BTreeMap::new();
        for _ in 0..CONNECTIONS {
            let pod = http_get(vip).unwrap_or_else(|e| format!("error: {e}"));
            *count.entry(pod).or_insert(0) += 1;
        }
        count
    })
}

#[test]
fn prefer_close_keeps_connections_in_the_clients_zone_and_falls_back() {
    let mut lab = TestLab::up("zones", &zoned_lab(&["a", "b"]));
    let backends = [web_on("web-a", "node-1"), web_on("web-b", "node-2")].join("---\n");
    lab.apply_yaml("web.yaml", &backends);
    lab.apply_yaml(
        "client.yaml",
        &pod_on("default", "client", "node-1", "app: client"),
    );
    lab.apply_yaml("close.yaml", CLOSE);
    let vip = SocketAddr::from((lab.cluster_ip("close"), 80));
    let [near] = lab.pods_named("web-a").try_into().expect("one web-a pod");
    let [far] = lab.pods_named("web-b").try_into().expect("one web-b pod");
    assert_eq!(lab.node_of(&near), "node-1");
    assert_eq!(lab.node_of(&far), "node-2");
    let name = |pod: &str| pod.split_once('/').unwrap().1.to_string();

    let close = answers(&lab, "default/client", vip);
    println!("PreferClose from zone a, backends in a and b: {close:?}");
    assert_eq!(
        close,
        BTreeMap::from([(name(&near), CONNECTIONS)]),
        "every connection stays in zone a"
    );

    // Zone a loses its backend: the Service falls back to the other zone's.
    lab.delete_yaml("web-a.yaml", &web_on("web-a", "node-1"));
    assert!(lab.pods_named("web-a").is_empty(), "web-a's pod is gone");
    let fallback = answers(&lab, "default/client", vip);
    println!("PreferClose from zone a, backend in b only: {fallback:?}");
    assert_eq!(
        fallback,
        BTreeMap::from([(name(&far), CONNECTIONS)]),
        "every connection falls back to zone b"
    );
}
