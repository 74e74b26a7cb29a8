//! The controller and the nodePort allocator through `plan::apply` and `plan::delete`, as
//! `lab apply` and `lab delete` run them.

use std::path::Path;

use sluice_sources::Manifest;

use super::*;
use crate::{plan, spec::LabSpec};

fn lab(extra: &str) -> LabState {
    let text = format!(
        "apiVersion: sluice.dev/v1alpha1
kind: Lab
nodes: [{{name: a, podCIDR: 10.244.1.0/24}}, {{name: b, podCIDR: 10.244.2.0/24}}]
{extra}"
    );
    let spec = LabSpec::parse(Path::new("lab.yaml"), &text).unwrap();
    LabState::new("t", spec, false)
}

fn manifests(yaml: &str) -> Vec<Manifest> {
    sluice_sources::parse_str(Path::new("in.yaml"), yaml).unwrap()
}

/// A Service `name`; `extra` is more of its spec, indented by four.
fn service(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, protocol: TCP}}]
{extra}---
"
    )
}

fn lb(name: &str) -> String {
    service(name, "  type: LoadBalancer\n")
}

fn apply(st: &LabState, yaml: &str) -> (LabState, Vec<String>) {
    let plan = plan::apply(st, &manifests(yaml)).unwrap_or_else(|e| panic!("{e}"));
    let lines = plan.lines();
    (plan.state, lines)
}

fn vip(st: &LabState, name: &str) -> Option<Ipv4Addr> {
    vips(&st.services[&format!("default/{name}")].object)
        .first()
        .copied()
}

fn spec_of(st: &LabState, name: &str) -> k8s_openapi::api::core::v1::ServiceSpec {
    st.services[&format!("default/{name}")]
        .object
        .spec
        .clone()
        .unwrap()
}

fn node_port(st: &LabState, name: &str) -> Option<i32> {
    spec_of(st, name).ports.unwrap()[0].node_port
}

const POOL: &str = "loadBalancer: {pool: 198.51.100.0/29}\n";

#[test]
fn vips_come_from_the_pool_in_order_and_stay_across_applies() {
    let st = lab(POOL);
    let (st, _) = apply(&st, &(lb("lb-x") + &lb("web-y") + &service("c", "")));
    assert_eq!(vip(&st, "lb-x"), Some(Ipv4Addr::new(198, 51, 100, 1)));
    assert_eq!(vip(&st, "web-y"), Some(Ipv4Addr::new(198, 51, 100, 2)));
    assert_eq!(vip(&st, "c"), None, "a ClusterIP Service gets no VIP");
    let ingress = st.services["default/lb-x"].object.status.clone().unwrap();
    let ingress = ingress.load_balancer.unwrap().ingress.unwrap();
    assert_eq!(ingress[0].ip_mode.as_deref(), Some("VIP"));
    // Applied again, after a new Service that sorts first: nobody moves.
    let (st, lines) = apply(&st, &(lb("a") + &lb("lb-x")));
    assert_eq!(vip(&st, "lb-x"), Some(Ipv4Addr::new(198, 51, 100, 1)));
    assert_eq!(vip(&st, "a"), Some(Ipv4Addr::new(198, 51, 100, 3)));
    assert!(
        lines.contains(&"service/lb-x unchanged".to_string()),
        "{lines:?}"
    );
}

#[test]
fn load_balancer_ip_is_honoured_in_the_pool_and_pending_outside_it() {
    let st = lab(POOL);
    let yaml = service(
        "x",
        "  type: LoadBalancer\n  loadBalancerIP: 198.51.100.5\n",
    ) + &lb("web-y")
        + &service("z", "  type: LoadBalancer\n  loadBalancerIP: 203.0.113.7\n");
    let (st, lines) = apply(&st, &yaml);
    assert_eq!(vip(&st, "x"), Some(Ipv4Addr::new(198, 51, 100, 5)));
    assert_eq!(vip(&st, "web-y"), Some(Ipv4Addr::new(198, 51, 100, 1)));
    assert_eq!(vip(&st, "z"), None);
    let warning = lines.iter().find(|l| l.contains("default/z")).unwrap();
    assert!(
        warning.contains(
            "spec.loadBalancerIP 203.0.113.7 is not in the lab's loadBalancer.pool 198.51.100.0/29"
        ),
        "{warning}"
    );
    let conditions = st.services["default/z"].object.status.clone().unwrap();
    assert_eq!(conditions.conditions.unwrap()[0].type_, PENDING_CONDITION);
}

#[test]
fn an_exhausted_pool_leaves_the_service_pending_until_a_vip_is_released() {
    // A /30 has two host addresses.
    let st = lab("loadBalancer: {pool: 198.51.100.0/30}\n");
    let (st, lines) = apply(&st, &(lb("a") + &lb("b") + &lb("c")));
    assert_eq!(vip(&st, "a"), Some(Ipv4Addr::new(198, 51, 100, 1)));
    assert_eq!(vip(&st, "b"), Some(Ipv4Addr::new(198, 51, 100, 2)));
    assert_eq!(vip(&st, "c"), None);
    assert!(
        lines.contains(
            &"Warning: service/default/c: LoadBalancer pending: no free address in the lab's loadBalancer.pool 198.51.100.0/30 (2 in use)"
                .to_string()
        ),
        "{lines:?}"
    );
    // Deleting a frees its VIP for c, the cloud's controller would retry.
    let plan = plan::delete(&st, &manifests(&lb("a")), false).unwrap();
    assert_eq!(vip(&plan.state, "c"), Some(Ipv4Addr::new(198, 51, 100, 1)));
    assert!(
        plan.state.services["default/c"]
            .object
            .status
            .clone()
            .unwrap()
            .conditions
            .is_none()
    );
    // A Service that stops being a LoadBalancer releases its VIP.
    let (st, _) = apply(&plan.state, &service("b", "  type: ClusterIP\n"));
    assert_eq!(vip(&st, "b"), None);
    assert!(st.services["default/b"].object.status.is_none());
}

#[test]
fn without_a_pool_load_balancers_stay_pending() {
    let (st, lines) = apply(&lab(""), &lb("x"));
    assert_eq!(vip(&st, "x"), None);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("the lab file has no loadBalancer.pool")),
        "{lines:?}"
    );
}

#[test]
fn node_ports_are_allocated_kept_and_never_reused() {
    let st = lab("nodePortRange: 31000-31099\n");
    let given = "apiVersion: v1
kind: Service
metadata: {name: given}
spec:
  selector: {app: web}
  type: NodePort
  ports: [{port: 80, nodePort: 31016}]
---
";
    // `given`'s port is claimed before `np`, earlier in the input, is allocated.
    let yaml = service("np", "  type: NodePort\n") + given + &service("c", "");
    let (st, _) = apply(&st, &yaml);
    assert_eq!(node_port(&st, "given"), Some(31016));
    assert_eq!(
        node_port(&st, "np"),
        Some(31017),
        "steps around the given one"
    );
    assert_eq!(node_port(&st, "c"), None, "a ClusterIP Service gets none");
    // Re-applied without the number, np keeps its port.
    let (st, _) = apply(&st, &service("np", "  type: NodePort\n"));
    assert_eq!(node_port(&st, "np"), Some(31017));
    // A new one never gets a port in use.
    let (st, _) = apply(&st, &service("more", "  type: NodePort\n"));
    assert_eq!(node_port(&st, "more"), Some(31018));
}

#[test]
fn local_load_balancers_get_a_health_check_node_port() {
    let st = lab(POOL);
    let yaml = service(
        "local",
        "  type: LoadBalancer\n  externalTrafficPolicy: Local\n",
    ) + &service("cluster", "  type: LoadBalancer\n")
        + &service(
            "noports",
            "  type: LoadBalancer\n  allocateLoadBalancerNodePorts: false\n",
        );
    let (st, _) = apply(&st, &yaml);
    // Default range: the automatic band starts at 30086.
    assert_eq!(node_port(&st, "local"), Some(30086));
    assert_eq!(spec_of(&st, "local").health_check_node_port, Some(30087));
    assert_eq!(node_port(&st, "cluster"), Some(30088));
    assert_eq!(spec_of(&st, "cluster").health_check_node_port, None);
    assert_eq!(node_port(&st, "noports"), None);
    assert!(vip(&st, "noports").is_some());
}

#[test]
fn a_full_node_port_range_is_refused_naming_the_field() {
    let st = lab("nodePortRange: 31000-31001\n");
    let yaml = service("a", "  type: NodePort\n")
        + &service("b", "  type: NodePort\n")
        + &service("c", "  type: NodePort\n");
    let err = plan::apply(&st, &manifests(&yaml))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("spec.ports[0].nodePort"), "{err}");
    assert!(
        err.contains("no free port in the lab's nodePortRange 31000-31001"),
        "{err}"
    );
}
