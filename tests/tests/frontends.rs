//! A Service's frontends and its terminating endpoints in a live lab, through real
//! packets from a pod: `service list` names each frontend's kind, the node port and the
//! external IP answer like the ClusterIP, loadBalancerSourceRanges restrict the load
//! balancer frontend only, and a terminating endpoint keeps its established connections
//! while new ones go to the ready endpoints (KEP-1669).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use sluice_integration::{ONE_NODE_LAB, TestLab, examples, http_get};

const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);

const WEB: &str = "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: nginx}
  externalIPs: [192.0.2.50]
  ports: [{port: 80, nodePort: 30080}]
";

fn lab_with_nginx(prefix: &str, lab_file: &str) -> TestLab {
    let mut lab = TestLab::up(prefix, lab_file);
    lab.lab
        .apply(&[
            examples().join("nginx.yaml"),
            examples().join("client.yaml"),
        ])
        .unwrap_or_else(|e| panic!("apply nginx + client: {e}"));
    lab
}

#[test]
fn node_port_and_external_ip_frontends_are_listed_and_answer() {
    let mut lab = lab_with_nginx("frontends", ONE_NODE_LAB);
    lab.apply_yaml("web.yaml", WEB);
    let vip = lab.cluster_ip("web");

    let services = lab.cli_json(&["service", "list"]);
    let mut web: Vec<(String, String)> = services
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["service"] == "default/web")
        .map(|s| {
            assert_eq!(s["kind"], "NodePort", "{s}");
            assert_eq!(s["backends"].as_array().unwrap().len(), 2, "{s}");
            let frontend = format!("{}:{}", s["address"].as_str().unwrap(), s["port"]);
            (s["frontend"].as_str().unwrap().to_string(), frontend)
        })
        .collect();
    web.sort();
    let node_ports: Vec<&(String, String)> = web.iter().filter(|(k, _)| k == "NodePort").collect();
    assert!(
        !node_ports.is_empty(),
        "a node port on the node's address: {web:?}"
    );
    assert!(
        web.contains(&("ClusterIP".into(), format!("{vip}:80")))
            && web.contains(&("ExternalIP".into(), format!("{EXTERNAL_IP}:80"))),
        "{web:?}"
    );
    let table = lab.cli(&["service", "list"]);
    assert!(
        table.contains("ExternalIP") && table.contains("NodePort") && table.contains("ClusterIP"),
        "{table}"
    );

    // From a pod, every frontend reaches the nginx pods.
    let node_port: SocketAddr = node_ports[0].1.parse().unwrap();
    for target in [
        SocketAddr::from((vip, 80)),
        SocketAddr::from((EXTERNAL_IP, 80)),
        node_port,
    ] {
        let answer = lab.in_pod("default/client", move || http_get(target));
        assert!(
            answer
                .as_deref()
                .is_ok_and(|a| a.starts_with("nginx-deployment-")),
            "{target}: {answer:?}"
        );
    }
}

/// A Service without a selector whose EndpointSlice lists the nginx pods with the given
/// conditions (`ready`, `serving`, `terminating`).
fn manual(pods: &[(Ipv4Addr, [bool; 3])]) -> String {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: manual}\nspec:\n  ports: [{port: 80}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: manual-1\n  \
         labels: {kubernetes.io/service-name: manual}\naddressType: IPv4\nports: [{port: 80}]\nendpoints:\n",
    );
    for (ip, [ready, serving, terminating]) in pods {
        yaml.push_str(&format!(
            "- addresses: [{ip}]\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n"
        ));
    }
    yaml
}

/// One request on an open keep-alive connection; the pod's name.
fn ask(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: manual\r\n\r\n")
        .unwrap_or_else(|e| panic!("write: {e}"));
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read: {e}"));
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&response));
        response.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&response).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|l| l.trim().parse().ok())
                .unwrap_or_else(|| panic!("no Content-Length: {head}"));
            if body.len() >= length {
                return body.trim().to_string();
            }
        }
    }
}

#[test]
fn a_terminating_endpoint_keeps_its_connections_and_gets_no_new_ones() {
    let mut lab = lab_with_nginx("terminating", ONE_NODE_LAB);
    let pods = lab.pods_named("nginx-deployment-");
    assert_eq!(pods.len(), 2);
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| lab.pod_ip(p)).collect();
    let name_of = |ip: Ipv4Addr| pods[ips.iter().position(|&i| i == ip).unwrap()].clone();
    const READY: [bool; 3] = [true, true, false];
    const SERVING_TERMINATING: [bool; 3] = [false, true, true];

    lab.apply_yaml("manual.yaml", &manual(&[(ips[0], READY), (ips[1], READY)]));
    let vip = SocketAddr::from((lab.cluster_ip("manual"), 80));
    let mut stream = lab
        .in_pod("default/client", move || {
            TcpStream::connect_timeout(&vip, Duration::from_secs(2))
        })
        .unwrap_or_else(|e| panic!("connect {vip}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let first = ask(&mut stream);
    let (draining, staying) = if name_of(ips[0]).ends_with(&first) {
        (ips[0], ips[1])
    } else {
        (ips[1], ips[0])
    };
    assert!(
        name_of(draining).ends_with(&first),
        "{first} is one of {pods:?}"
    );

    // The backend of the open connection starts terminating: the connection keeps it...
    lab.apply_yaml(
        "manual.yaml",
        &manual(&[(draining, SERVING_TERMINATING), (staying, READY)]),
    );
    assert_eq!(
        ask(&mut stream),
        first,
        "the established connection keeps its pod"
    );
    // ...and every new connection goes to the ready one.
    let staying_name = name_of(staying);
    for _ in 0..10 {
        let answer = lab.in_pod("default/client", move || http_get(vip));
        assert!(
            answer.as_deref().is_ok_and(|a| staying_name.ends_with(a)),
            "a new connection: {answer:?}, want {staying_name}"
        );
    }

    // With none ready, the serving-terminating endpoints take new connections.
    lab.apply_yaml(
        "manual.yaml",
        &manual(&[
            (draining, SERVING_TERMINATING),
            (staying, SERVING_TERMINATING),
        ]),
    );
    let answer = lab.in_pod("default/client", move || http_get(vip));
    assert!(
        answer
            .as_deref()
            .is_ok_and(|a| a.starts_with("nginx-deployment-")),
        "with no endpoint ready: {answer:?}"
    );
    assert_eq!(ask(&mut stream), first);
}

const LB_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 60);

const OUTSIDER: &str = "apiVersion: v1
kind: Pod
metadata: {name: outsider, labels: {app: outsider}}
spec:
  containers: [{name: c, image: curlimages/curl:latest, command: [sleep, infinity]}]
";

/// One node with a load balancer pool holding LB_VIP: the lab plays the cloud and writes
/// the VIP it gives into the Service's status (a manifest's own status is ignored, as the
/// API server ignores it).
const LOAD_BALANCER_LAB: &str = "apiVersion: sluice.dev/v1alpha1
kind: Lab
serviceCIDR: 10.96.0.0/16
txChecksumOffload: false
underlay: {cidr: 172.30.9.0/24, mtu: 1500}
loadBalancer: {pool: 192.0.2.56/29}
nodes:
  - name: node-1
    podCIDR: 10.244.1.0/24
";

/// A LoadBalancer Service whose load balancer admits `range` only, asking the lab's pool
/// for LB_VIP.
fn load_balancer(range: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: lb}}
spec:
  type: LoadBalancer
  loadBalancerIP: {LB_VIP}
  selector: {{app: nginx}}
  loadBalancerSourceRanges: [{range}]
  ports: [{{port: 80, nodePort: 30081}}]
"
    )
}

#[test]
fn source_ranges_restrict_the_load_balancer_frontend_only() {
    let mut lab = lab_with_nginx("srcrange", LOAD_BALANCER_LAB);
    lab.apply_yaml("outsider.yaml", OUTSIDER);
    let client = lab.pod_ip("default/client");
    lab.apply_yaml("lb.yaml", &load_balancer(&format!("{client}/32")));
    let vip = lab.cluster_ip("lb");
    let lb = SocketAddr::from((LB_VIP, 80));

    let frontends = lab.cli_json(&["service", "list"]);
    assert!(
        frontends
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["frontend"] == "LoadBalancer" && s["address"] == LB_VIP.to_string()),
        "{frontends}"
    );
    let from_client = lab.in_pod("default/client", move || http_get(lb));
    assert!(
        from_client
            .as_deref()
            .is_ok_and(|a| a.starts_with("nginx-deployment-")),
        "the client is in the range: {from_client:?}"
    );
    let maps = sluice_datapath::PinnedMaps::open(&lab.lab.pin_dir(&lab.node())).unwrap();
    let refused = || {
        maps.counted(
            sluice_common::DropReason::NotInSrcRange.code(),
            sluice_common::METRIC_DIR_EGRESS,
        )
        .unwrap()
        .packets
    };
    assert_eq!(refused(), 0);
    let from_outsider = lab.in_pod("default/outsider", move || http_get(lb));
    assert!(
        from_outsider.is_err(),
        "outside the range: {from_outsider:?}"
    );
    assert!(refused() > 0, "dropped as NOT_IN_SRC_RANGE");
    // The Service's other frontends admit everyone.
    let cluster_ip = SocketAddr::from((vip, 80));
    let answer = lab.in_pod("default/outsider", move || http_get(cluster_ip));
    assert!(
        answer.is_ok(),
        "the ClusterIP from outside the range: {answer:?}"
    );

    // Widened to the pod CIDR: the outsider gets through too.
    lab.apply_yaml("lb.yaml", &load_balancer("10.244.0.0/16"));
    let answer = lab.in_pod("default/outsider", move || http_get(lb));
    assert!(answer.is_ok(), "inside the widened range: {answer:?}");
}

/// `GET /` on `addr`: the status line's code and the body.
fn status_and_body(addr: SocketAddr) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok((code, body.trim().to_string()))
}

#[test]
fn the_agent_serves_the_health_check_node_port_of_a_local_load_balancer() {
    let mut lab = lab_with_nginx("healthcheck", ONE_NODE_LAB);
    let service = |replicas_selector: &str| {
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: local}}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  selector: {{app: {replicas_selector}}}
  ports: [{{port: 80, nodePort: 30082}}]
"
        )
    };
    lab.apply_yaml("local.yaml", &service("nginx"));
    let node_port = lab
        .cli_json(&["service", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["frontend"] == "NodePort" && s["service"] == "default/local")
        .map(|s| s["address"].as_str().unwrap().parse::<Ipv4Addr>().unwrap())
        .expect("a node port frontend on the node's address");
    let health = SocketAddr::from((node_port, 32000));
    let answer = lab.in_pod("default/client", move || status_and_body(health));
    assert_eq!(
        answer.unwrap_or_else(|e| panic!("GET {health}: {e}")),
        (
            200,
            r#"{"service":{"namespace":"default","name":"local"},"localEndpoints":2}"#.into()
        )
    );
    // No pod selected: no local endpoint, 503.
    lab.apply_yaml("local.yaml", &service("nothing"));
    let answer = lab.in_pod("default/client", move || status_and_body(health));
    assert_eq!(
        answer.unwrap_or_else(|e| panic!("GET {health}: {e}")),
        (
            503,
            r#"{"service":{"namespace":"default","name":"local"},"localEndpoints":0}"#.into()
        )
    );
}
