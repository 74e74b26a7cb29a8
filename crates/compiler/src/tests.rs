//! Inputs the manifest source would refuse but a snapshot may still hold (written by hand,
//! by an older agent, or by a future watcher): the compiler must skip them and say so.

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

use super::*;

fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("test object decodes")
}

fn service(name: &str, spec: serde_json::Value) -> Service {
    object(json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec}))
}

fn slice(name: &str, service: &str, body: serde_json::Value) -> std::sync::Arc<EndpointSlice> {
    let mut value = json!({
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
    });
    if let (Some(target), serde_json::Value::Object(fields)) = (value.as_object_mut(), body) {
        target.extend(fields);
    }
    object(value)
}

fn endpoint(pod: &str, interface: &str, ip: [u8; 4]) -> LocalEndpoint {
    LocalEndpoint {
        node: "node-a".into(),
        namespace: "default".into(),
        pod: pod.into(),
        interface: interface.into(),
        addresses: [Ipv4Addr::from(ip).into()].into(),
    }
}

/// Problems as the lines they render to.
fn problem_lines(state: &DesiredState) -> Vec<String> {
    state.problems.iter().map(ToString::to_string).collect()
}

fn node() -> NodeContext {
    NodeContext {
        node: "node-a".into(),
        interfaces: [("lxc1".to_string(), 11), ("lxc2".to_string(), 12)].into(),
        ..NodeContext::default()
    }
}

#[test]
fn odd_input_is_skipped_and_reported() {
    let snapshot = Snapshot {
        services: vec![
            object(json!({"metadata": {"name": "no-spec"}})),
            object(json!({"metadata": {"namespace": "default"}, "spec": {}})),
            service(
                "odd-type",
                json!({"type": "Internal", "clusterIP": "10.96.0.1"}),
            ),
            service(
                "v6",
                json!({"clusterIP": "fd00::1", "ports": [{"port": 80}]}),
            ),
            service("unallocated", json!({"ports": [{"port": 80}]})),
            service(
                "twice",
                json!({"clusterIP": "10.96.0.2", "ports": [{"port": 80}]}),
            ),
            service(
                "twice",
                json!({"clusterIP": "10.96.0.2", "ports": [{"port": 80}]}),
            ),
            service(
                "web",
                json!({"clusterIP": "10.96.0.10", "ports": [
                    {"name": "icmp", "port": 1, "protocol": "ICMP"},
                    {"name": "big", "port": 70000},
                    {"name": "http", "port": 80},
                    {"name": "nil", "port": 81},
                    {"name": "huge", "port": 82},
                ]}),
            ),
            // web's VIP; web sorts first and keeps it.
            service(
                "xweb",
                json!({"clusterIP": "10.96.0.10", "ports": [{"port": 83}]}),
            ),
            service(
                "dup-port",
                json!({"clusterIP": "10.96.0.4", "ports": [
                {"name": "a", "port": 80}, {"name": "b", "port": 80}]}),
            ),
        ],
        endpoint_slices: vec![slice(
            "web-1",
            "web",
            json!({
                "ports": [{"name": "http", "port": 8080}, {"name": "nil"},
                          {"name": "huge", "port": 70000}],
                "endpoints": [
                    {"addresses": ["10.244.1.5"]},
                    {"addresses": ["not-an-ip"]},
                    {"addresses": []},
                ],
            }),
        )],
        endpoints: vec![
            endpoint("a", "lxc1", [10, 244, 1, 5]),
            endpoint("b", "lxc1", [10, 244, 1, 6]),
            endpoint("c", "lxc9", [10, 244, 1, 7]),
        ],
        ..Snapshot::default()
    };
    let state = compile(&snapshot, &node());
    assert_eq!(
        problem_lines(&state),
        [
            "endpoint default/a: no Pod object: treated as a pod without labels",
            "endpoint default/b: interface lxc1 (ifindex 11) already belongs to endpoint default/a: skipped",
            "endpoint default/c: interface lxc9 not found on node node-a: skipped",
            "endpointslice default/web-1 port \"huge\": no usable port number (Some(70000)): skipped",
            "endpointslice default/web-1 port \"nil\": no usable port number (None): skipped",
            "endpointslice default/web-1: address \"not-an-ip\" is not IPv4: skipped",
            "endpointslice default/web-1: endpoint without an address: skipped",
            "service default/dup-port port \"b\": 10.96.0.4:80/TCP is listed twice: skipped",
            "service default/no-spec: no spec: skipped",
            "service default/odd-type: unsupported type \"Internal\": skipped",
            "service default/twice: defined 2 times: skipped",
            "service default/unallocated: no clusterIP allocated: skipped",
            "service default/v6: clusterIP \"fd00::1\" is not an IPv4 address: skipped",
            "service default/web port \"big\": out of range: skipped",
            "service default/web port \"icmp\": unsupported protocol \"ICMP\": skipped",
            "service default/xweb: clusterIP 10.96.0.10 already belongs to default/web: skipped",
            "service without a name in namespace default: skipped",
        ]
    );
    assert_eq!(
        state.dump(),
        "lb4_services 10.96.0.4:* -> count=0 flags=0x02
lb4_services 10.96.0.4:80/TCP slot 0 -> count=0 flags=0x01
lb4_services 10.96.0.10:* -> count=0 flags=0x02
lb4_services 10.96.0.10:80/TCP slot 0 -> count=1 flags=0x01
lb4_services 10.96.0.10:80/TCP slot 1 -> backend=10.244.1.5:8080
lb4_services 10.96.0.10:81/TCP slot 0 -> count=0 flags=0x01
lb4_services 10.96.0.10:82/TCP slot 0 -> count=0 flags=0x01
lb4_backends 10.244.1.5:8080/TCP -> active
endpoints ifindex 11 -> ipv4=10.244.1.5 identity=19487 flags=0x0
endpoint ifindex 11 default/a identity=19487 ingress=open egress=open rows=0 policies=[]
ipcache 0.0.0.0/0 -> identity=2
ipcache 10.244.1.5/32 -> identity=19487
identity 2 reserved:world
identity 19487 k8s:io.kubernetes.pod.namespace=default
interface lxc1
"
        .to_string()
            + &state
                .problems
                .iter()
                .map(|p| format!("problem: {p}\n"))
                .collect::<String>()
    );
}

#[test]
fn frontends_name_every_programmed_port() {
    let mut snapshot = Snapshot {
        services: vec![
            service(
                "web",
                json!({"type": "NodePort", "clusterIP": "10.96.0.20", "ports": [
                    {"name": "https", "port": 443, "targetPort": 8443, "nodePort": 30443},
                    {"name": "http", "port": 80, "targetPort": 8080},
                ]}),
            ),
            service(
                "dns",
                json!({"clusterIP": "10.96.0.3", "ports": [
                {"port": 53, "protocol": "UDP"}]}),
            ),
        ],
        endpoint_slices: vec![
            slice(
                "web-1",
                "web",
                json!({
                    "ports": [{"name": "http", "port": 8080}, {"name": "https", "port": 8443}],
                    "endpoints": [{"addresses": ["10.244.1.10"]}, {"addresses": ["10.244.1.9"]}],
                }),
            ),
            slice(
                "dns-1",
                "dns",
                json!({
                    "ports": [{"port": 53, "protocol": "UDP"}],
                    "endpoints": [{"addresses": ["10.244.2.2"]}],
                }),
            ),
        ],
        ..Snapshot::default()
    };
    snapshot.nodes = vec![object(json!({"metadata": {"name": "node-a"},
    "status": {"addresses": [
        {"type": "InternalIP", "address": "192.168.0.1"},
        {"type": "ExternalIP", "address": "203.0.113.1"},
        {"type": "Hostname", "address": "node-a"},
    ]}}))];
    let frontend = |service: &str, port_name: &str, frontend: FrontendKind| Frontend {
        service: service.into(),
        port_name: port_name.into(),
        kind: if service == "default/web" {
            ServiceKind::NodePort
        } else {
            ServiceKind::ClusterIP
        },
        frontend,
        local: false,
        address: Ipv4Addr::UNSPECIFIED,
        port: 0,
        protocol: IPPROTO_TCP,
        backends: Vec::new(),
    };
    let web = Ipv4Addr::new(10, 96, 0, 20);
    let (b9, b10) = (Ipv4Addr::new(10, 244, 1, 9), Ipv4Addr::new(10, 244, 1, 10));
    let https = vec![(b9, 8443), (b10, 8443)];
    let node_port = |address| Frontend {
        address,
        port: 30443,
        backends: https.clone(),
        ..frontend("default/web", "https", FrontendKind::NodePort)
    };
    let state = compile(&snapshot, &node());
    assert_eq!(
        state.frontends,
        [
            Frontend {
                address: Ipv4Addr::new(10, 96, 0, 3),
                port: 53,
                protocol: IPPROTO_UDP,
                backends: vec![(Ipv4Addr::new(10, 244, 2, 2), 53)],
                ..frontend("default/dns", "", FrontendKind::ClusterIP)
            },
            Frontend {
                address: web,
                port: 80,
                backends: vec![(b9, 8080), (b10, 8080)],
                ..frontend("default/web", "http", FrontendKind::ClusterIP)
            },
            Frontend {
                address: web,
                port: 443,
                backends: https.clone(),
                ..frontend("default/web", "https", FrontendKind::ClusterIP)
            },
            node_port(Ipv4Addr::new(192, 168, 0, 1)),
            node_port(Ipv4Addr::new(203, 0, 113, 1)),
        ]
    );
    assert_eq!(
        problem_lines(&state),
        ["service default/web port \"http\": no nodePort allocated: no node port frontend"]
    );
}

fn pod(name: &str, labels: serde_json::Value, status: serde_json::Value) -> sluice_store::Pod {
    pod_with(name, labels, status, false)
}

fn pod_with(
    name: &str,
    labels: serde_json::Value,
    status: serde_json::Value,
    host_network: bool,
) -> sluice_store::Pod {
    object(json!({
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "i"}], "hostNetwork": host_network},
        "status": status,
    }))
}

fn policy(name: &str, spec: serde_json::Value) -> k8s_openapi::api::networking::v1::NetworkPolicy {
    object(json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec}))
}

#[test]
fn odd_policy_input_fails_closed_and_is_reported() {
    let host_pod = pod_with(
        "host",
        json!({"app": "host"}),
        json!({"podIP": "192.168.0.1"}),
        true,
    );
    let snapshot = Snapshot {
        nodes: vec![object(json!({"metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}}))],
        pods: vec![
            // Defined twice: its endpoint cannot know its labels.
            pod("twin", json!({"app": "a"}), json!({"podIP": "10.244.1.5"})),
            pod("twin", json!({"app": "b"}), json!({"podIP": "10.244.1.5"})),
            host_pod,
            pod("thief", json!({}), json!({"podIP": "192.168.0.1"})),
            pod("first", json!({}), json!({"podIP": "10.244.1.9"})),
            pod("second", json!({}), json!({"podIP": "10.244.1.9"})),
        ],
        network_policies: vec![
            policy("dup", json!({"podSelector": {}})),
            policy("dup", json!({"podSelector": {}, "policyTypes": ["Egress"]})),
            policy(
                "bad-cidr",
                json!({"podSelector": {"matchLabels": {"app": "x"}},
                "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/99"}}]}]}),
            ),
            policy(
                "bad-port",
                json!({"podSelector": {"matchLabels": {"app": "x"}},
                "ingress": [{"ports": [{"port": 90, "endPort": 80}, {"port": 53, "protocol": "DNS"}]}]}),
            ),
        ],
        endpoints: vec![endpoint("twin", "lxc1", [10, 244, 1, 5])],
        ..Snapshot::default()
    };
    let state = compile(&snapshot, &node());
    assert_eq!(
        problem_lines(&state),
        [
            "networkpolicy default/bad-cidr: ipBlock \"10.0.0.0/99\" is not a CIDR: the peer matches nothing",
            "networkpolicy default/dup: defined 2 times: skipped",
            "pod default/second: address 10.244.1.9 already belongs to pod default/first: not in the ipcache",
            "pod default/thief: address 192.168.0.1 belongs to a node: not in the ipcache",
            "pod default/twin: defined 2 times: skipped",
        ]
    );
    let twin = state.endpoints[&11];
    assert_eq!(
        twin.flags,
        sluice_common::ENDPOINT_F_INGRESS_ENFORCED | sluice_common::ENDPOINT_F_EGRESS_ENFORCED
    );
    assert!(!state.policies.contains_key(&11), "no rows: fails closed");
    assert_eq!(
        state.ipcache[&IpcacheKey::new(Ipv4Addr::new(192, 168, 0, 1), 32)].identity,
        sluice_common::IDENTITY_HOST
    );
    // bad-port selects nothing here; its problems show once it selects a pod.
    let mut snapshot = snapshot;
    snapshot.pods.push(pod(
        "x",
        json!({"app": "x"}),
        json!({"podIP": "10.244.1.7"}),
    ));
    snapshot.endpoints = vec![endpoint("x", "lxc2", [10, 244, 1, 7])];
    let state = compile(&snapshot, &node());
    assert!(
        problem_lines(&state).contains(
            &"networkpolicy default/bad-port: port range 90..80 is empty or out of range: the port matches nothing".to_string()
        ) && problem_lines(&state).contains(
            &"networkpolicy default/bad-port: unsupported protocol \"DNS\": the port matches nothing".to_string()
        ),
        "{:?}",
        state.problems
    );
    let rows: Vec<String> = state.policies[&12]
        .rows
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(rows, ["ingress identity=1 ANY"]);
}

#[test]
fn frontends_claimed_twice_and_bad_addresses_are_reported() {
    let node_port = |name: &str, vip: &str, spec: serde_json::Value| {
        let mut spec_fields = json!({"type": "LoadBalancer", "clusterIP": vip});
        if let (Some(target), serde_json::Value::Object(fields)) =
            (spec_fields.as_object_mut(), spec)
        {
            target.extend(fields);
        }
        service(name, spec_fields)
    };
    let mut lb = node_port(
        "b-lb",
        "10.96.0.2",
        json!({"externalIPs": ["192.0.2.1", "not-an-ip"],
               "ports": [{"port": 80, "nodePort": 30080}, {"name": "again", "port": 81, "nodePort": 30080}]}),
    );
    lb.status = Some(object(
        json!({"loadBalancer": {"ingress": [{"ip": "2001:db8::1"}]}}),
    ));
    let snapshot = Snapshot {
        nodes: vec![object(json!({"metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}}))],
        services: vec![
            lb,
            // First by name: keeps node port 30080 and the external IP's port 80.
            node_port(
                "a-first",
                "10.96.0.1",
                json!({"externalIPs": ["192.0.2.1"], "ports": [{"port": 80, "nodePort": 30080}]}),
            ),
        ],
        ..Snapshot::default()
    };
    let state = compile(&snapshot, &node());
    assert_eq!(
        problem_lines(&state),
        [
            "service default/b-lb port \"again\": NodePort frontend 192.168.0.1:30080/TCP already belongs to default/a-first: skipped",
            "service default/b-lb port 80: ExternalIP frontend 192.0.2.1:80/TCP already belongs to default/a-first: skipped",
            "service default/b-lb port 80: NodePort frontend 192.168.0.1:30080/TCP already belongs to default/a-first: skipped",
            "service default/b-lb: spec.externalIPs \"not-an-ip\" is not an IPv4 address: left out",
            "service default/b-lb: status.loadBalancer.ingress[].ip \"2001:db8::1\" is not an IPv4 address: left out",
        ]
    );
    let kinds: Vec<(String, FrontendKind, Ipv4Addr, u16)> = state
        .frontends
        .iter()
        .map(|f| (f.service.clone(), f.frontend, f.address, f.port))
        .collect();
    let first = "default/a-first".to_string();
    let lb = "default/b-lb".to_string();
    assert_eq!(
        kinds,
        [
            (
                first.clone(),
                FrontendKind::ClusterIP,
                Ipv4Addr::new(10, 96, 0, 1),
                80
            ),
            (
                lb.clone(),
                FrontendKind::ClusterIP,
                Ipv4Addr::new(10, 96, 0, 2),
                80
            ),
            (
                lb.clone(),
                FrontendKind::ClusterIP,
                Ipv4Addr::new(10, 96, 0, 2),
                81
            ),
            (
                first.clone(),
                FrontendKind::ExternalIP,
                Ipv4Addr::new(192, 0, 2, 1),
                80
            ),
            (
                lb,
                FrontendKind::ExternalIP,
                Ipv4Addr::new(192, 0, 2, 1),
                81
            ),
            (
                first,
                FrontendKind::NodePort,
                Ipv4Addr::new(192, 168, 0, 1),
                30080
            ),
        ]
    );
}
