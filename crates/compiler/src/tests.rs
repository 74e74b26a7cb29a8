//! Inputs the manifest source would refuse but a snapshot may still hold (written by hand,
//! by an older agent, or by a future watcher): the compiler must skip them and say so.

use serde_json::json;

use super::*;

fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("test object decodes")
}

fn service(name: &str, spec: serde_json::Value) -> Service {
    object(json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec}))
}

fn slice(name: &str, service: &str, body: serde_json::Value) -> EndpointSlice {
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
    let snapshot = Snapshot {
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
    let frontend = |service: &str,
                    port_name: &str,
                    kind: &str,
                    address,
                    port,
                    protocol,
                    backends: &[(Ipv4Addr, u16)]| Frontend {
        service: service.into(),
        port_name: port_name.into(),
        kind: kind.parse().expect("a service type"),
        address,
        port,
        protocol,
        backends: backends.to_vec(),
    };
    let web = Ipv4Addr::new(10, 96, 0, 20);
    let (b9, b10) = (Ipv4Addr::new(10, 244, 1, 9), Ipv4Addr::new(10, 244, 1, 10));
    assert_eq!(
        compile(&snapshot, &node()).frontends,
        [
            frontend(
                "default/dns",
                "",
                "ClusterIP",
                Ipv4Addr::new(10, 96, 0, 3),
                53,
                IPPROTO_UDP,
                &[(Ipv4Addr::new(10, 244, 2, 2), 53)]
            ),
            frontend(
                "default/web",
                "http",
                "NodePort",
                web,
                80,
                IPPROTO_TCP,
                &[(b9, 8080), (b10, 8080)]
            ),
            frontend(
                "default/web",
                "https",
                "NodePort",
                web,
                443,
                IPPROTO_TCP,
                &[(b9, 8443), (b10, 8443)]
            ),
        ]
    );
}

fn pod(
    name: &str,
    labels: serde_json::Value,
    status: serde_json::Value,
) -> k8s_openapi::api::core::v1::Pod {
    object(json!({
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "i"}]},
        "status": status,
    }))
}

fn policy(name: &str, spec: serde_json::Value) -> k8s_openapi::api::networking::v1::NetworkPolicy {
    object(json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec}))
}

#[test]
fn odd_policy_input_fails_closed_and_is_reported() {
    let mut host_pod = pod(
        "host",
        json!({"app": "host"}),
        json!({"podIP": "192.168.0.1"}),
    );
    if let Some(spec) = &mut host_pod.spec {
        spec.host_network = Some(true);
    }
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
