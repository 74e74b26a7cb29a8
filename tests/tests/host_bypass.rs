//! Issue 14 item 5: a pod denied by policy cannot reach the pod by going through a node's
//! own address. The node's agent allows its own host (as Cilium does, for the kubelet's
//! probes), so a path that handed the denied client's connection to the backend with the
//! node's address as its source would open the policy. In a three-node lab the backend
//! `web` on node-1 admits only `app: friend`; a NodePort Service (externalTrafficPolicy
//! Cluster) selects it. The denied client, on node-1 and on node-2, tries the pod, the
//! ClusterIP and every node's address at the node port, both from the pod's cgroup (socket
//! LB, `lab exec`) and from a thread in its namespace (the per-packet path); `friend` does
//! the same and gets through wherever its own address reaches `web`, so each path is shown
//! to work. Through a third node's address the connection arrives from that node (it
//! translates and masquerades, as kube-proxy does for externalTrafficPolicy Cluster), and
//! `web`'s policy, which admits no node, refuses the friend there too.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use sluice_integration::{
    TestLab,
    multinode::{Mode, pod_on, three_nodes, underlay_address},
    netpol::connects,
};

const NODE_PORT: u16 = 30480;

fn workload() -> String {
    let mut yaml = String::new();
    for (pod, node, labels) in [
        ("web", "node-1", "app: web"),
        ("client", "node-1", "app: client"),
        ("client-2", "node-2", "app: client"),
        ("friend", "node-1", "app: friend"),
        ("friend-2", "node-2", "app: friend"),
    ] {
        yaml += &pod_on("default", pod, node, labels);
        yaml += "---\n";
    }
    yaml + &format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 80, nodePort: {NODE_PORT}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-friends-only}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: friend}}}}}}]
"
    )
}

/// How the client's connection is made.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// `lab exec` in the pod's cgroup: the node's socket programs translate connect().
    Socket,
    /// A thread in the pod's namespace only: every packet goes through the tc programs.
    Packet,
}

fn reaches(lab: &TestLab, pod: &str, via: Via, to: SocketAddr) -> bool {
    match via {
        Via::Packet => lab.in_pod(pod, move || connects(to, "TCP", Duration::from_secs(2))),
        Via::Socket => {
            let url = format!("http://{to}/");
            let out = lab.cli_output(&[
                "lab",
                "exec",
                pod,
                "--",
                "curl",
                "-sS",
                "--max-time",
                "2",
                &url,
            ]);
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("web")
        }
    }
}

#[test]
fn a_denied_pod_cannot_reach_the_pod_through_a_node_address() {
    let mut lab = three_nodes("hostbyp", Mode::Tunnel);
    lab.apply_yaml("web.yaml", &workload());
    let web: Ipv4Addr = lab.pod_ip("default/web");
    let cluster_ip = lab.cluster_ip("web");
    // (what, address, on which node the translation happens: None for no node port)
    let mut targets = vec![
        ("the pod".to_string(), SocketAddr::from((web, 80)), None),
        (
            "the ClusterIP".to_string(),
            SocketAddr::from((cluster_ip, 80)),
            None,
        ),
    ];
    for k in 0..3 {
        let node = underlay_address(k);
        targets.push((
            format!("node-{} {node}", k + 1),
            SocketAddr::from((node, NODE_PORT)),
            Some(format!("node-{}", k + 1)),
        ));
    }

    // One thread per client: a refused probe waits out its timeout.
    let lab_ref = &lab;
    let targets = &targets;
    let wrong: Vec<String> = std::thread::scope(|scope| {
        let clients = [
            ("default/friend", "node-1", true),
            ("default/friend-2", "node-2", true),
            ("default/client", "node-1", false),
            ("default/client-2", "node-2", false),
        ];
        let handles: Vec<_> = clients
            .into_iter()
            .map(|(pod, node, friend)| {
                scope.spawn(move || {
                    let mut wrong = Vec::new();
                    for via in [Via::Socket, Via::Packet] {
                        for (what, to, translated_on) in targets {
                            // The client's own address reaches web when no third node
                            // stands between.
                            let own_address = translated_on
                                .as_deref()
                                .is_none_or(|n| n == node || n == "node-1");
                            let allowed = friend && own_address;
                            let got = reaches(lab_ref, pod, via, *to);
                            println!("{pod} -> {what} ({to}) by {via:?}: reached {got}");
                            if got != allowed {
                                wrong.push(format!(
                                    "{pod} -> {what} ({to}) by {via:?}: reached {got}, want {allowed}"
                                ));
                            }
                        }
                    }
                    wrong
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    lab.verify_every_node("a NodePort behind an ingress policy");
}
