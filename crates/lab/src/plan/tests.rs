use std::path::Path;

use super::*;
use crate::{slices, spec::LabSpec};

const NGINX: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: nginx-deployment
spec:
  replicas: 2
  selector:
    matchLabels:
      app: nginx
  template:
    metadata:
      labels:
        app: nginx
    spec:
      containers:
      - name: nginx
        image: nginx:latest
        ports:
        - containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: nginx-service
spec:
  selector:
    app: nginx
  ports:
  - protocol: TCP
    port: 80
    targetPort: 80
  type: ClusterIP
";

fn lab(nodes: &[(&str, &str)]) -> LabState {
    let mut text = String::from("apiVersion: sluice.dev/v1alpha1\nkind: Lab\nnodes:\n");
    for (name, cidr) in nodes {
        text.push_str(&format!("  - name: {name}\n    podCIDR: {cidr}\n"));
    }
    let spec = LabSpec::parse(Path::new("lab.yaml"), &text).unwrap();
    LabState::new("t", spec, false)
}

fn one_node() -> LabState {
    lab(&[("node-1", "10.244.1.0/24")])
}

fn manifests(file: &str, yaml: &str) -> Vec<Manifest> {
    sluice_sources::parse_str(Path::new(file), yaml).unwrap()
}

/// Applies and "runs" the plan as the lab would: created pods become ready, removed go.
fn apply_ok(st: &LabState, yaml: &str) -> (LabState, Plan) {
    let plan = apply(st, &manifests("in.yaml", yaml)).unwrap_or_else(|e| panic!("{e}"));
    (settle(&plan), plan)
}

fn settle(plan: &Plan) -> LabState {
    let mut st = plan.state.clone();
    for k in &plan.create {
        st.pods.get_mut(k).unwrap().ready = true;
    }
    for k in &plan.remove {
        st.pods.remove(k);
    }
    st
}

fn apply_err(st: &LabState, file: &str, yaml: &str) -> String {
    match apply(st, &manifests(file, yaml)) {
        Ok(_) => panic!("apply of {file} succeeded"),
        Err(e) => e.to_string(),
    }
}

fn deployment_pods(st: &LabState) -> Vec<&PodRecord> {
    let mut pods: Vec<_> = st.pods.values().filter(|p| p.owner.is_some()).collect();
    pods.sort_by_key(|p| p.seq);
    pods
}

#[test]
fn the_seed_manifest_makes_two_named_pods_and_a_cluster_ip() {
    let (st, plan) = apply_ok(&one_node(), NGINX);
    assert_eq!(
        plan.lines(),
        [
            "deployment.apps/nginx-deployment created",
            "service/nginx-service created"
        ]
    );
    assert_eq!(plan.create.len(), 2);
    assert!(plan.remove.is_empty());
    let pods = deployment_pods(&st);
    let hash = &pods[0].owner.as_ref().unwrap().template_hash;
    for (i, p) in pods.iter().enumerate() {
        let name = p.name();
        let suffix = name
            .strip_prefix(&format!("nginx-deployment-{hash}-"))
            .unwrap();
        assert_eq!(suffix.len(), 5, "{name}");
        assert_eq!(hash.len(), 10);
        let labels = p.pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["app"], "nginx");
        assert_eq!(&labels["pod-template-hash"], hash);
        assert_eq!(p.ip.to_string(), format!("10.244.1.{}", i + 2));
        assert_eq!(p.node, "node-1");
        assert_eq!(
            p.pod.spec.as_ref().unwrap().node_name.as_deref(),
            Some("node-1")
        );
        assert!(p.interface.starts_with("lxc") && p.interface.len() == 11);
        assert_eq!(p.netns, format!("sluice-t-default-{name}"));
        assert_eq!(p.ports(), (vec![80], vec![]));
    }
    let svc = &st.services["default/nginx-service"].object;
    let spec = svc.spec.as_ref().unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    assert_eq!(
        spec.cluster_ips.as_deref(),
        Some(&["10.96.0.10".to_string()][..])
    );

    let snapshot = st.snapshot();
    assert_eq!(snapshot.pods.len(), 2);
    assert_eq!(snapshot.endpoints.len(), 2);
    assert_eq!(snapshot.endpoint_slices.len(), 1);
    assert_eq!(snapshot.endpoint_slices[0].endpoints.len(), 2);
    let names: Vec<_> = snapshot
        .namespaces
        .iter()
        .map(|n| n.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["default", "kube-system"]);
    assert_eq!(snapshot.pods[0].phase(), Some("Running"));
    assert!(slices::is_ready(&st.pod_objects()[0]));
}

#[test]
fn reapplying_is_unchanged_and_keeps_everything() {
    let (st, _) = apply_ok(&one_node(), NGINX);
    let (again, plan) = apply_ok(&st, NGINX);
    assert_eq!(
        plan.lines(),
        [
            "deployment.apps/nginx-deployment unchanged",
            "service/nginx-service unchanged"
        ]
    );
    assert!(plan.create.is_empty() && plan.remove.is_empty());
    assert_eq!(
        serde_json::to_value(&again).unwrap(),
        serde_json::to_value(&st).unwrap()
    );
}

#[test]
fn scaling_adds_pods_and_removes_the_newest() {
    let (st, _) = apply_ok(&one_node(), NGINX);
    let two: Vec<String> = deployment_pods(&st)
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    let (st, plan) = apply_ok(&st, &NGINX.replace("replicas: 2", "replicas: 3"));
    assert_eq!(
        plan.lines()[0],
        "deployment.apps/nginx-deployment configured"
    );
    assert_eq!(plan.changes[0].fields, ["spec.replicas"]);
    assert_eq!(plan.create.len(), 1);
    let three = deployment_pods(&st);
    assert_eq!(three.len(), 3);
    assert_eq!(three[2].ip.to_string(), "10.244.1.4");
    let newest = three[2].name().to_string();

    let plan = apply(
        &st,
        &manifests("in.yaml", &NGINX.replace("replicas: 2", "replicas: 1")),
    )
    .unwrap();
    let mut removed: Vec<&str> = plan
        .remove
        .iter()
        .map(|k| k.split_once('/').unwrap().1)
        .collect();
    removed.sort();
    let mut expect = vec![newest.as_str(), two[1].as_str()];
    expect.sort();
    assert_eq!(removed, expect, "the two newest go");
    for k in &plan.remove {
        assert!(plan.state.pods[k].deleting.is_some(), "terminating first");
    }
    // Terminating endpoints are neither ready nor serving in the slice.
    let snapshot = plan.state.snapshot();
    let conditions: Vec<_> = snapshot.endpoint_slices[0]
        .endpoints
        .iter()
        .map(|e| e.conditions.clone().unwrap())
        .collect();
    assert_eq!(
        conditions
            .iter()
            .filter(|c| c.terminating == Some(true))
            .count(),
        2
    );
    assert_eq!(
        conditions.iter().filter(|c| c.ready == Some(true)).count(),
        1
    );
    let st = settle(&plan);
    assert_eq!(deployment_pods(&st).len(), 1);
    assert_eq!(deployment_pods(&st)[0].name(), two[0]);
}

#[test]
fn a_changed_template_replaces_every_pod() {
    let (st, _) = apply_ok(&one_node(), NGINX);
    let old: Vec<String> = st.pods.keys().cloned().collect();
    let plan = apply(
        &st,
        &manifests("in.yaml", &NGINX.replace("nginx:latest", "nginx:1.27")),
    )
    .unwrap();
    assert_eq!(plan.create.len(), 2);
    let mut remove = plan.remove.clone();
    remove.sort();
    assert_eq!(remove, old);
    let st = settle(&plan);
    let pods = deployment_pods(&st);
    assert_eq!(pods.len(), 2);
    // New pods got fresh addresses while the old ones still held theirs.
    assert_eq!(pods[0].ip.to_string(), "10.244.1.4");
}

#[test]
fn pods_go_to_the_least_loaded_node_or_the_named_one() {
    let st = lab(&[("node-1", "10.244.1.0/24"), ("node-2", "10.244.2.0/24")]);
    let (st, _) = apply_ok(&st, &NGINX.replace("replicas: 2", "replicas: 3"));
    let mut nodes: Vec<_> = deployment_pods(&st)
        .iter()
        .map(|p| (p.node.clone(), p.ip.to_string()))
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        [
            ("node-1".to_string(), "10.244.1.2".to_string()),
            ("node-1".to_string(), "10.244.1.3".to_string()),
            ("node-2".to_string(), "10.244.2.2".to_string())
        ]
    );
    let pinned = "apiVersion: v1\nkind: Pod\nmetadata: {name: pinned}\nspec:\n  nodeName: node-1\n  containers: [{name: c, image: x}]\n";
    let (st, _) = apply_ok(&st, pinned);
    assert_eq!(st.pods["default/pinned"].node, "node-1");
    let free = "apiVersion: v1\nkind: Pod\nmetadata: {name: free}\nspec:\n  containers: [{name: c, image: x}]\n";
    let (st, _) = apply_ok(&st, free);
    assert_eq!(st.pods["default/free"].node, "node-2");
}

#[test]
fn lab_level_errors_name_file_object_and_field() {
    let (st, _) = apply_ok(&one_node(), NGINX);
    let cases = [
        (
            "ns.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: nowhere}\nspec: {containers: [{name: c, image: x}]}\n",
            "ns.yaml: document 1: Pod nowhere/p: metadata.namespace: namespace \"nowhere\" does not exist",
        ),
        (
            "lonely.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: lonely}\nspec:\n  ports: [{port: 80}]\n",
            "lonely.yaml: document 1: Service default/lonely: spec.selector: required",
        ),
        (
            "outside.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  clusterIP: 10.97.0.1\n  selector: {app: x}\n  ports: [{port: 80}]\n",
            "outside.yaml: document 1: Service default/x: spec.clusterIP: 10.97.0.1 is not in the lab's serviceCIDR 10.96.0.0/16",
        ),
        (
            "taken.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: x}\n  ports: [{port: 80}]\n",
            "taken.yaml: document 1: Service default/x: spec.clusterIP: 10.96.0.10 is already allocated to Service default/nginx-service",
        ),
        (
            "immutable.yaml",
            &NGINX.replace(
                "  type: ClusterIP",
                "  type: ClusterIP\n  clusterIP: 10.96.0.20",
            ),
            "immutable.yaml: document 2: Service default/nginx-service: spec.clusterIP: field is immutable",
        ),
        (
            "dup-port.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - {name: a, image: x, ports: [{containerPort: 80}]}\n  - {name: b, image: x, ports: [{containerPort: 53, protocol: UDP}, {containerPort: 80, protocol: TCP}]}\n",
            "dup-port.yaml: document 1: Pod default/p: spec.containers[1].ports[1].containerPort: duplicate port 80/TCP: also spec.containers[0].ports[0].containerPort",
        ),
        (
            "node.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  nodeName: node-9\n  containers: [{name: c, image: x}]\n",
            "node.yaml: document 1: Pod default/p: spec.nodeName: node \"node-9\" is not a node of the lab (nodes: node-1)",
        ),
    ];
    for (file, yaml, expect) in cases {
        let err = apply_err(&st, file, yaml);
        assert!(
            err.starts_with(expect),
            "{file}\n  got: {err}\n want: {expect}"
        );
    }
    let nginx_pod = st.pods.values().next().unwrap().name().to_string();
    let collide = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {nginx_pod}}}\nspec: {{containers: [{{name: c, image: x}}]}}\n"
    );
    let err = apply_err(&st, "collide.yaml", &collide);
    assert!(
        err.contains("metadata.name: a pod named default/")
            && err.contains("of Deployment default/nginx-deployment"),
        "{err}"
    );
}

#[test]
fn every_violation_is_reported_at_once() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: nowhere}\nspec: {selector: {app: b}, ports: [{port: 80}]}\n";
    let err = apply_err(&one_node(), "two.yaml", yaml);
    assert_eq!(err.lines().count(), 2, "{err}");
    assert!(err.contains("Service default/a: spec.selector"), "{err}");
    assert!(
        err.contains("Service nowhere/b: metadata.namespace"),
        "{err}"
    );
}

#[test]
fn namespaces_and_selectorless_services_may_come_in_the_same_apply() {
    let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec:\n  ports: [{port: 5432}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: db-1\n  namespace: shop\n  labels: {kubernetes.io/service-name: db}\naddressType: IPv4\nendpoints:\n- addresses: [10.244.1.50]\nports:\n- {port: 5432}\n";
    let (st, plan) = apply_ok(&one_node(), yaml);
    assert_eq!(
        plan.lines(),
        [
            "namespace/shop created",
            "service/db created",
            "endpointslice.discovery.k8s.io/db-1 created"
        ]
    );
    let snapshot = st.snapshot();
    assert_eq!(
        snapshot.endpoint_slices.len(),
        1,
        "the user's slice, no derived one"
    );
    let shop = snapshot
        .namespaces
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some("shop"))
        .unwrap();
    assert_eq!(
        shop.metadata.labels.as_ref().unwrap()["kubernetes.io/metadata.name"],
        "shop"
    );
}

#[test]
fn pod_addresses_run_out_as_an_error_not_a_crash() {
    let st = lab(&[("node-1", "10.244.1.0/30")]);
    let err = apply_err(&st, "nginx.yaml", NGINX);
    assert!(
        err.contains("no free address in podCIDR 10.244.1.0/30 of node node-1"),
        "{err}"
    );
}

#[test]
fn bare_pods_accept_label_changes_only() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: client, labels: {app: client}}\nspec: {containers: [{name: c, image: x}]}\n";
    let (st, _) = apply_ok(&one_node(), pod);
    let (st, plan) = apply_ok(&st, &pod.replace("app: client", "app: other"));
    assert_eq!(plan.lines(), ["pod/client configured"]);
    assert_eq!(
        st.pods["default/client"]
            .pod
            .metadata
            .labels
            .as_ref()
            .unwrap()["app"],
        "other"
    );
    let err = apply_err(&st, "pod.yaml", &pod.replace("image: x", "image: other"));
    assert!(
        err.contains("Pod default/client: spec: pod updates may not change"),
        "{err}"
    );
}

#[test]
fn delete_terminates_pods_and_drops_the_rest() {
    let (st, _) = apply_ok(&one_node(), NGINX);
    let plan = delete(&st, &manifests("nginx.yaml", NGINX), false).unwrap();
    assert_eq!(
        plan.lines(),
        [
            "deployment.apps \"nginx-deployment\" deleted",
            "service \"nginx-service\" deleted"
        ]
    );
    assert_eq!(plan.remove.len(), 2);
    assert!(plan.state.services.is_empty() && plan.state.deployments.is_empty());
    let st = settle(&plan);
    assert!(st.pods.is_empty());
    let err = match delete(&st, &manifests("nginx.yaml", NGINX), false) {
        Ok(_) => panic!("deleting twice succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("Deployment default/nginx-deployment: metadata.name: not found"),
        "{err}"
    );
    let default_ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n";
    assert!(delete(&st, &manifests("ns.yaml", default_ns), false).is_err());
    // --ignore-not-found: what is not there is skipped, and nothing is said about it.
    let plan = delete(&st, &manifests("nginx.yaml", NGINX), true).unwrap();
    assert!(plan.changes.is_empty() && plan.remove.is_empty());
}

#[test]
fn deleting_a_namespace_deletes_its_objects() {
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";
    let (st, _) = apply_ok(&one_node(), ns);
    let in_shop = NGINX
        .replace(
            "  name: nginx-deployment",
            "  name: nginx-deployment\n  namespace: shop",
        )
        .replace(
            "  name: nginx-service",
            "  name: nginx-service\n  namespace: shop",
        );
    let (st, _) = apply_ok(&st, &in_shop);
    assert_eq!(st.pods.len(), 2);
    let plan = delete(&st, &manifests("ns.yaml", ns), false).unwrap();
    assert_eq!(plan.remove.len(), 2);
    let st = settle(&plan);
    assert!(st.pods.is_empty() && st.services.is_empty() && st.deployments.is_empty());
    assert!(!st.namespaces.contains_key("shop"));
}

#[test]
fn network_policies_reach_the_agents_as_applied() {
    let policy = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all}
spec:
  podSelector: {}
  policyTypes: [Ingress]
";
    let (st, plan) = apply_ok(&one_node(), policy);
    assert_eq!(
        plan.lines(),
        ["networkpolicy.networking.k8s.io/deny-all created"]
    );
    let snapshot = st.snapshot();
    assert_eq!(snapshot.network_policies.len(), 1);
    let applied = &manifests("p.yaml", policy)[0].object;
    assert!(matches!(applied, Object::NetworkPolicy(p) if *p == snapshot.network_policies[0]));
    let (_, plan) = apply_ok(&st, policy);
    assert_eq!(
        plan.lines(),
        ["networkpolicy.networking.k8s.io/deny-all unchanged"]
    );
}

#[test]
fn a_node_port_taken_by_another_service_or_outside_the_range_is_refused() {
    let node_port = |name: &str, port: i32| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: NodePort\n  \
             selector: {{app: {name}}}\n  ports: [{{port: 80, nodePort: {port}}}]\n"
        )
    };
    let (st, _) = apply_ok(&one_node(), &node_port("zeta", 30080));
    // Named at the newcomer, whatever the names' order.
    assert_eq!(
        apply_err(&st, "alpha.yaml", &node_port("alpha", 30080)),
        "alpha.yaml: document 1: Service default/alpha: spec.ports[0].nodePort: 30080/TCP is already used by Service default/zeta (spec.ports[0].nodePort)"
    );
    assert_eq!(
        apply_err(&st, "low.yaml", &node_port("low", 80)),
        "low.yaml: document 1: Service default/low: spec.ports[0].nodePort: 80 is outside the node port range 30000-32767"
    );
    // Nothing changed: the port is still zeta's, and free once zeta moves off it.
    let moved = format!(
        "{}---\n{}",
        node_port("zeta", 30081),
        node_port("alpha", 30080)
    );
    apply_ok(&st, &moved);
}

fn fixed_pod(name: &str, node: Option<&str>, ip_field: &str) -> String {
    let node = node.map_or(String::new(), |n| format!("  nodeName: {n}\n"));
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n{}spec:\n{node}  containers: [{{name: c, image: x}}]\n{}",
        ip_field
            .strip_prefix("annotation:")
            .map_or(String::new(), |ip| format!(
                "  annotations: {{sluice.dev/pod-ip: \"{ip}\"}}\n"
            )),
        ip_field
            .strip_prefix("status:")
            .map_or(String::new(), |ip| format!("status: {{podIP: {ip}}}\n")),
    )
}

#[test]
fn a_pod_gets_the_fixed_address_its_manifest_asks_for() {
    let st = lab(&[("node-1", "10.244.1.0/24"), ("node-2", "10.244.2.0/24")]);
    // status.podIP, with no nodeName: the node whose podCIDR holds it.
    let (st, _) = apply_ok(&st, &fixed_pod("a", None, "status:10.244.2.77"));
    assert_eq!(st.pods["default/a"].ip.to_string(), "10.244.2.77");
    assert_eq!(st.pods["default/a"].node, "node-2");
    // The annotation, on a named node.
    let (st, _) = apply_ok(
        &st,
        &fixed_pod("b", Some("node-1"), "annotation:10.244.1.9"),
    );
    assert_eq!(st.pods["default/b"].ip.to_string(), "10.244.1.9");
    // Pods without one skip the fixed addresses.
    let (st, _) = apply_ok(&st, &fixed_pod("c", Some("node-2"), ""));
    assert_eq!(st.pods["default/c"].ip.to_string(), "10.244.2.2");
    // Applied again unchanged: nothing to do.
    let (st, _) = apply_ok(&st, &fixed_pod("a", None, "status:10.244.2.77"));
    assert_eq!(st.pods["default/a"].ip.to_string(), "10.244.2.77");
}

#[test]
fn a_fixed_address_that_clashes_or_lies_outside_is_refused_and_nothing_changes() {
    let st = lab(&[("node-1", "10.244.1.0/24"), ("node-2", "10.244.2.0/24")]);
    let (st, _) = apply_ok(&st, &fixed_pod("a", None, "status:10.244.2.77"));
    let cases = [
        (
            fixed_pod("b", None, "status:10.244.2.77"),
            "Pod default/b: status.podIP: 10.244.2.77 is the address of pod default/a",
        ),
        (
            fixed_pod("b", None, "status:10.245.0.5"),
            "Pod default/b: status.podIP: 10.245.0.5 is in no node's podCIDR (node-1 10.244.1.0/24, node-2 10.244.2.0/24)",
        ),
        (
            fixed_pod("b", Some("node-1"), "annotation:10.244.2.5"),
            "Pod default/b: metadata.annotations[sluice.dev/pod-ip]: 10.244.2.5 is outside the podCIDR of node node-1",
        ),
        (
            fixed_pod("b", None, "status:10.244.1.1"),
            "Pod default/b: status.podIP: 10.244.1.1 is the network, router or broadcast address of podCIDR 10.244.1.0/24",
        ),
        (
            fixed_pod("b", None, "status:not-an-ip"),
            "Pod default/b: status.podIP: \"not-an-ip\" is not an IPv4 address",
        ),
        (
            fixed_pod("a", None, "status:10.244.2.78"),
            "Pod default/a: status.podIP: pod default/a has address 10.244.2.77; a pod's address cannot change",
        ),
        (
            NGINX.replace(
                "      labels:\n        app: nginx\n",
                "      labels:\n        app: nginx\n      annotations: {sluice.dev/pod-ip: 10.244.1.5}\n",
            ),
            "Deployment default/nginx-deployment: spec.template.metadata.annotations[sluice.dev/pod-ip]: a fixed pod address is for a bare Pod",
        ),
    ];
    for (yaml, expect) in cases {
        // A second, valid pod in the same apply must not be half-applied.
        let both = format!("{yaml}---\n{}", fixed_pod("other", Some("node-1"), ""));
        let err = apply_err(&st, "fixed.yaml", &both);
        assert!(err.contains(expect), "\n  got: {err}\n want: {expect}");
    }
    assert_eq!(st.pods.len(), 1);
}
