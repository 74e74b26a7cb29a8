//! Clients on a node itself (issue 11 item 10), end to end: in the three-node lab of
//! `examples/lab-3nodes.yaml`, a process run on node-1 with `lab exec --node` (in the
//! node's namespace and cgroup) reaches a ClusterIP whose backends are on the other nodes,
//! by TCP and UDP, through the socket programs the node's agent attached to that cgroup;
//! and node ports with externalTrafficPolicy Local that have no backend on node-1 reach
//! the other nodes' backends from node-1 itself (as kube-proxy serves the node's own
//! traffic), with sessionAffinity and Maglev holding on that path.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeSet, fs, process::Output};

use sluice_integration::{
    TestLab, examples,
    multinode::{pod_on, underlay_address},
};

/// `web-2` on node-2 and `web-3` on node-3 behind the ClusterIP `web`, TCP and UDP.
fn workload() -> String {
    let mut yaml = String::new();
    for (pod, node) in [("web-2", "node-2"), ("web-3", "node-3")] {
        yaml += &pod_on("default", pod, node, "app: web");
        yaml += "---\n";
    }
    yaml + "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 80, protocol: TCP}
  - {name: dns, port: 80, targetPort: 80, protocol: UDP}
"
}

/// `command` run on `node` by `sluice lab exec --node`; its stdout, or the failure.
fn on_node(lab: &TestLab, node: &str, command: &[&str]) -> String {
    let mut args = vec!["lab", "exec", "--node", node, "--"];
    args.extend_from_slice(command);
    let Output {
        status,
        stdout,
        stderr,
    } = lab.cli_output(&args);
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    assert!(
        status.success(),
        "{command:?} on {node} failed ({status}): {stdout}{}",
        String::from_utf8_lossy(&stderr)
    );
    stdout
}

#[test]
fn node_process_reaches_cluster_ip_with_backends_on_other_nodes() {
    let lab_yaml = fs::read_to_string(examples().join("lab-3nodes.yaml")).unwrap();
    let mut lab = TestLab::up("hostlb", &lab_yaml);
    lab.apply_yaml("web.yaml", &workload());
    let cluster_ip = lab.cluster_ip("web");

    // TCP: the pod's HTTP server answers with its name; curl reports the peer it sees.
    let url = format!("http://{cluster_ip}/");
    let mut answers = BTreeSet::new();
    for _ in 0..20 {
        let out = on_node(
            &lab,
            "node-1",
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-w",
                " %{remote_ip}:%{remote_port}",
                &url,
            ],
        );
        let (name, peer) = out.trim().rsplit_once(' ').unwrap();
        assert_eq!(
            peer,
            format!("{cluster_ip}:80"),
            "the peer is the ClusterIP"
        );
        answers.insert(name.trim().to_owned());
    }
    println!("20 TCP requests from node-1 answered by {answers:?}");
    assert_eq!(
        answers,
        BTreeSet::from(["web-2".to_owned(), "web-3".to_owned()]),
        "both backends, on node-2 and node-3"
    );

    // UDP (connected, as socat does): a `hostname` datagram gets the pod's name.
    let target = format!("UDP4:{cluster_ip}:80");
    let out = on_node(
        &lab,
        "node-1",
        &[
            "sh",
            "-c",
            &format!("printf hostname | socat -T 5 - {target}"),
        ],
    );
    assert!(
        ["web-2", "web-3"].contains(&out.trim()),
        "UDP answer {out:?}"
    );

    // The nodes' cgroups go with the lab.
    let cgroups: Vec<_> = lab
        .lab
        .nodes()
        .iter()
        .map(|node| lab.lab.node_cgroup(node).unwrap())
        .collect();
    assert!(cgroups.iter().all(|c| c.is_dir()), "{cgroups:?}");
    drop(lab);
    assert!(
        !cgroups.iter().any(|c| c.exists()),
        "left behind: {cgroups:?}"
    );
}

/// Two node ports with externalTrafficPolicy Local over web-2 and web-3: one with
/// sessionAffinity ClientIP, one balanced by Maglev.
const LOCAL_NODE_PORTS: &str = "apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  sessionAffinity: ClientIP
  selector: {app: web}
  ports: [{port: 80, targetPort: 80, nodePort: 30091}]
---
apiVersion: v1
kind: Service
metadata:
  name: hashed
  annotations: {service.sluice.dev/lb-algorithm: maglev}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{port: 80, targetPort: 80, nodePort: 30092}]
";

/// The pods that answered `requests` HTTP requests from `node` to `address:port` (each a
/// new connection; the peer curl sees is the frontend).
fn answers(
    lab: &TestLab,
    node: &str,
    address: std::net::Ipv4Addr,
    port: u16,
    requests: usize,
) -> Vec<String> {
    let url = format!("http://{address}:{port}/");
    (0..requests)
        .map(|_| {
            let out = on_node(
                lab,
                node,
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "-w",
                    " %{remote_ip}:%{remote_port}",
                    &url,
                ],
            );
            let (name, peer) = out.trim().rsplit_once(' ').unwrap();
            assert_eq!(
                peer,
                format!("{address}:{port}"),
                "the peer is the node port"
            );
            name.trim().to_owned()
        })
        .collect()
}

#[test]
fn node_process_reaches_a_local_node_port_without_a_local_backend() {
    const REQUESTS: usize = 20;
    let lab_yaml = fs::read_to_string(examples().join("lab-3nodes.yaml")).unwrap();
    let mut lab = TestLab::up("hostetp", &lab_yaml);
    lab.apply_yaml("web.yaml", &workload());
    lab.apply_yaml("local.yaml", LOCAL_NODE_PORTS);
    let node_1 = underlay_address(0);

    let sticky = answers(&lab, "node-1", node_1, 30091, REQUESTS);
    let distinct: BTreeSet<_> = sticky.iter().collect();
    println!("{REQUESTS} requests from node-1 to its Local node port with affinity: {distinct:?}");
    assert_eq!(distinct.len(), 1, "one backend by affinity: {sticky:?}");
    assert!(
        ["web-2", "web-3"].contains(&sticky[0].as_str()),
        "{sticky:?}"
    );

    let hashed = answers(&lab, "node-1", node_1, 30092, REQUESTS);
    let distinct: BTreeSet<_> = hashed.iter().collect();
    let on_2 = hashed.iter().filter(|n| *n == "web-2").count();
    println!(
        "{REQUESTS} requests from node-1 to its Local Maglev node port: web-2 {on_2}, web-3 {}",
        REQUESTS - on_2
    );
    assert_eq!(
        distinct.len(),
        2,
        "each socket hashes on its own: {hashed:?}"
    );
    lab.verify_every_node("Local node ports with internal slots");
}
