use serde_json::json;

use super::*;

fn service(name: &str, spec: serde_json::Value) -> Service {
    serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec}),
    )
    .expect("service decodes")
}

fn node_port(name: &str, ports: serde_json::Value) -> Service {
    service(name, json!({"type": "NodePort", "ports": ports}))
}

fn refusal(services: &[Service], range: NodePortRange) -> String {
    match validate_services(services, range) {
        Ok(()) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn distinct_ports_in_range_pass() {
    let services = [
        node_port("a", json!([{"port": 80, "nodePort": 30080}])),
        // The same number for another protocol, and 0 (allocate one) twice.
        node_port(
            "b",
            json!([{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30080},
                   {"name": "x", "port": 81, "nodePort": 0}, {"name": "y", "port": 82, "nodePort": 0}]),
        ),
        service("c", json!({"type": "ClusterIP", "ports": [{"port": 80}]})),
    ];
    assert_eq!(
        validate_services(&services, NodePortRange::default()),
        Ok(())
    );
}

#[test]
fn a_node_port_outside_the_range_is_refused() {
    let services = [node_port("web", json!([{"port": 80, "nodePort": 29999}]))];
    assert_eq!(
        refusal(&services, NodePortRange::default()),
        "Service default/web: spec.ports[0].nodePort: 29999 is outside the node port range 30000-32767"
    );
    let range = "20000-29999".parse().expect("range");
    assert_eq!(validate_services(&services, range), Ok(()));
}

#[test]
fn a_node_port_on_two_services_names_both() {
    let services = [
        node_port("zeta", json!([{"port": 80, "nodePort": 30080}])),
        node_port("alpha", json!([{"port": 8080, "nodePort": 30080}])),
    ];
    assert_eq!(
        refusal(&services, NodePortRange::default()),
        "Service default/alpha: spec.ports[0].nodePort: 30080/TCP is already used by Service default/zeta (spec.ports[0].nodePort)"
    );
}

#[test]
fn a_node_port_twice_in_one_service_is_refused() {
    let services = [node_port(
        "web",
        json!([{"name": "a", "port": 80, "nodePort": 30080}, {"name": "b", "port": 81, "nodePort": 30080}]),
    )];
    assert_eq!(
        refusal(&services, NodePortRange::default()),
        "Service default/web: spec.ports[1].nodePort: 30080/TCP is already used by spec.ports[0].nodePort"
    );
}

#[test]
fn health_check_node_ports_are_checked_like_node_ports() {
    let lb = |name: &str, health: i32| {
        service(
            name,
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                   "healthCheckNodePort": health, "ports": [{"port": 80, "nodePort": 30080}]}),
        )
    };
    assert_eq!(
        refusal(&[lb("web", 40000)], NodePortRange::default()),
        "Service default/web: spec.healthCheckNodePort: 40000 is outside the node port range 30000-32767"
    );
    assert_eq!(
        refusal(&[lb("web", 30080)], NodePortRange::default()),
        "Service default/web: spec.healthCheckNodePort: 30080/TCP is already used by spec.ports[0].nodePort"
    );
    let other = node_port("other", json!([{"port": 80, "nodePort": 31000}]));
    assert_eq!(
        refusal(&[other, lb("web", 31000)], NodePortRange::default()),
        "Service default/web: spec.healthCheckNodePort: 31000/TCP is already used by Service default/other (spec.ports[0].nodePort)"
    );
}

#[test]
fn ranges_parse_and_bad_ones_say_what_is_wanted() {
    assert_eq!(
        "30000-32767".parse::<NodePortRange>(),
        Ok(NodePortRange::default())
    );
    for bad in ["30000", "32767-30000", "0-10", "a-b", "1-70000"] {
        let e = bad.parse::<NodePortRange>().expect_err(bad);
        assert!(e.contains("want FIRST-LAST"), "{e}");
    }
}
