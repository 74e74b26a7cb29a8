//! The lab file's cloud fields: their defaults, and each bad value refused naming its field.

use std::{net::Ipv4Addr, path::Path};

use crate::{
    WorldAttach,
    spec::{LabSpec, router_address},
};

fn parse(text: &str) -> Result<LabSpec, String> {
    LabSpec::parse(Path::new("lab.yaml"), text).map_err(|e| e.to_string())
}

const HEAD: &str = "apiVersion: sluice.dev/v1alpha1\nkind: Lab\n";

#[test]
fn the_cloud_fields_parse_with_their_defaults() {
    let nodes = "nodes: [{name: a, podCIDR: 10.244.1.0/24}, {name: b, podCIDR: 10.244.2.0/24}]\n";
    let spec = parse(&format!("{HEAD}{nodes}")).unwrap();
    assert_eq!(spec.node_port_range, None);
    assert_eq!(spec.load_balancer, None);
    assert!(!spec.has_router());
    let spec = parse(&format!(
        "{HEAD}{nodes}nodePortRange: 31000-31999
loadBalancer: {{pool: 198.51.100.0/28, healthCheck: {{delay: 6s}}}}
world:
  - {{name: client, address: 192.0.2.10, attach: router}}
"
    ))
    .unwrap();
    assert_eq!(
        spec.node_port_range.map(|r| r.to_string()).as_deref(),
        Some("31000-31999")
    );
    let lb = spec.load_balancer.clone().unwrap();
    assert_eq!(lb.pool.to_string(), "198.51.100.0/28");
    let check = lb.health_check.unwrap();
    assert_eq!(check.delay, std::time::Duration::from_secs(6));
    assert_eq!(check.interval, std::time::Duration::from_millis(500));
    assert_eq!(spec.world[0].attach, WorldAttach::Router);
    assert!(spec.has_router());
    assert_eq!(router_address(&spec), Some(Ipv4Addr::new(172, 30, 0, 1)));
}

#[test]
fn bad_cloud_fields_are_refused_naming_the_field() {
    let nodes = "nodes: [{name: a, podCIDR: 10.244.1.0/24}, {name: b, podCIDR: 10.244.2.0/24}]\n";
    let cases = [
        ("nodePortRange: 32767-30000\n", "nodePortRange"),
        (
            "nodePortRange: ports\n",
            "nodePortRange: invalid node port range \"ports\"",
        ),
        ("loadBalancer: {}\n", "loadBalancer.pool: required"),
        (
            "loadBalancer: {pool: 10.96.1.0/28}\n",
            "loadBalancer.pool: 10.96.1.0/28 overlaps serviceCIDR",
        ),
        (
            "loadBalancer: {pool: 172.30.0.0/28}\n",
            "loadBalancer.pool: 172.30.0.0/28 overlaps underlay.cidr",
        ),
        (
            "loadBalancer: {pool: 198.51.100.0/28, healthCheck: {delay: soon}}\n",
            "loadBalancer.healthCheck.delay",
        ),
        (
            "loadBalancer: {pool: 198.51.100.0/28}\nworld: [{name: c, address: 198.51.100.3, attach: router}]\n",
            "world[0].address: 198.51.100.3 is in loadBalancer.pool",
        ),
        (
            "world: [{name: c, address: 172.30.0.1, attach: underlay}, {name: d, address: 192.0.2.1, attach: router}]\n",
            "world[0].address: 172.30.0.1 is the load balancer router's address",
        ),
        (
            "world: [{name: c, address: 172.30.0.77, attach: router}]\n",
            "world[0].address: 172.30.0.77 is in underlay.cidr",
        ),
    ];
    for (extra, want) in cases {
        let e = parse(&format!("{HEAD}{nodes}{extra}")).unwrap_err();
        assert!(e.contains(want), "{extra}: {e}");
    }
    let one = "nodes: [{name: a, podCIDR: 10.244.1.0/24}]\n";
    let e = parse(&format!(
        "{HEAD}{one}loadBalancer: {{pool: 198.51.100.0/28}}\n"
    ))
    .unwrap_err();
    assert!(
        e.contains("loadBalancer: the router in front of the nodes needs an underlay"),
        "{e}"
    );
    let e = parse(&format!(
        "{HEAD}nodes: [{{name: router, podCIDR: 10.244.1.0/24}}, {{name: b, podCIDR: 10.244.2.0/24}}]\n"
    ))
    .unwrap_err();
    assert!(e.contains("nodes[0].name"), "{e}");
}
