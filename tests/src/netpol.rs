//! The upstream NetworkPolicy conformance model (namespaces x, y, z; pods a, b, c; ports 80
//! and 81 over TCP and UDP), probed with real sockets and judged by the reference evaluator.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use sluice_policy_reference::{Cluster, Connection, Peer};
use sluice_store::Snapshot;

use crate::{TestLab, in_netns};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
pub const PORTS: [u16; 2] = [80, 81];
pub const PROTOCOLS: [&str; 2] = ["TCP", "UDP"];

/// y/b's address in the one-node model (podCIDR 10.244.1.0/24), fixed by `status.podIP`:
/// the ipBlock case with `except` names it before the pod exists, as a policy written
/// for known addresses would.
pub const FIXED_Y_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 200);

/// The model's namespaces and pods, as the upstream suite labels them (`ns=<name>`,
/// `pod=<name>`), each pod serving 80 and 81 over TCP and UDP under the upstream port names.
pub fn model_yaml() -> String {
    let mut out = String::new();
    for ns in NAMESPACES {
        out += &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"{ns}\"\n  labels: {{ns: \"{ns}\"}}\n---\n"
        );
        for pod in PODS {
            out += &pod_yaml(ns, pod, &format!("pod: {pod}"));
            if (ns, pod) == ("y", "b") {
                out += &format!("status: {{podIP: {FIXED_Y_B}}}\n");
            }
            out += "---\n";
        }
    }
    out
}

/// A model pod `ns/name` with `labels` (YAML flow-map content), serving the model's ports.
pub fn pod_yaml(ns: &str, name: &str, labels: &str) -> String {
    pod_yaml_on(ns, name, labels, None)
}

/// The model spread over `nodes`: pod k of the nine (x/a, x/b, ... z/c) on node k mod n, so
/// every pair of nodes carries traffic both ways.
pub fn model_yaml_on(nodes: &[&str]) -> String {
    let mut out = String::new();
    for ns in NAMESPACES {
        out += &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"{ns}\"\n  labels: {{ns: \"{ns}\"}}\n---\n"
        );
        for pod in PODS {
            let node = node_for(ns, pod, nodes);
            out += &pod_yaml_on(ns, pod, &format!("pod: {pod}"), Some(node));
            out += "---\n";
        }
    }
    out
}

/// The node [`model_yaml_on`] places `ns/pod` on; relabelled pods keep it.
pub fn node_for<'a>(ns: &str, pod: &str, nodes: &[&'a str]) -> &'a str {
    let i = NAMESPACES.iter().position(|n| *n == ns).unwrap_or(0) * PODS.len()
        + PODS.iter().position(|p| *p == pod).unwrap_or(0);
    nodes[i % nodes.len()]
}

/// [`pod_yaml`] with `spec.nodeName` when `node` is given.
pub fn pod_yaml_on(ns: &str, name: &str, labels: &str, node: Option<&str>) -> String {
    let node_name = node.map_or(String::new(), |n| format!("  nodeName: {n}\n"));
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: \"{ns}\"
  labels: {{{labels}}}
spec:
{node_name}  containers:
  - name: cont
    image: agnhost
    ports:
    - {{name: serve-80-tcp, containerPort: 80, protocol: TCP}}
    - {{name: serve-81-tcp, containerPort: 81, protocol: TCP}}
    - {{name: serve-80-udp, containerPort: 80, protocol: UDP}}
    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}
"
    )
}

/// Every pod of the model as `ns/pod`.
pub fn model_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// One probe: from a pod to a pod on a port and protocol.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: &'static str,
}

/// The verdict of the reference evaluator for each probe, given the lab's current objects.
pub fn expected(snapshot: &Snapshot, probes: &[Probe]) -> BTreeMap<Probe, bool> {
    // The reference reads Kubernetes Pods: the snapshot's, written back as they are.
    let pods: Vec<Pod> = snapshot.pods.iter().cloned().map(Pod::from).collect();
    let pod = |name: &str| -> &Pod {
        let (ns, pod) = name.split_once('/').expect("ns/pod");
        pods.iter()
            .find(|p| {
                p.metadata.namespace.as_deref() == Some(ns)
                    && p.metadata.name.as_deref() == Some(pod)
            })
            .unwrap_or_else(|| panic!("pod {name} not in the snapshot"))
    };
    let cluster = Cluster {
        namespaces: &snapshot.namespaces,
        policies: &snapshot.network_policies,
    };
    probes
        .iter()
        .map(|p| {
            let allowed = cluster.allows(&Connection {
                from: Peer::Pod(pod(&p.from)),
                to: Peer::Pod(pod(&p.to)),
                port: p.port,
                protocol: p.protocol,
            });
            (p.clone(), allowed)
        })
        .collect()
}

/// Whether a connection gets through: TCP connects and its payload comes back answered,
/// UDP gets its datagram echoed.
pub fn connects(addr: SocketAddr, protocol: &str, timeout: Duration) -> bool {
    match protocol {
        "TCP" => TcpStream::connect_timeout(&addr, timeout).is_ok_and(|mut s| {
            let _ = s.set_read_timeout(Some(timeout));
            let mut buf = [0u8; 64];
            s.write_all(b"probe\n").is_ok() && s.read(&mut buf).is_ok_and(|n| n > 0)
        }),
        "UDP" => UdpSocket::bind("0.0.0.0:0").is_ok_and(|s| {
            let _ = s.set_read_timeout(Some(timeout));
            let mut buf = [0u8; 64];
            s.connect(addr).is_ok()
                && s.send(b"probe").is_ok()
                && s.recv(&mut buf).is_ok_and(|n| n > 0)
        }),
        other => panic!("cannot probe {other} here"),
    }
}

/// Runs every probe from its source pod's network namespace, all in parallel. A probe whose
/// answer disagrees with `expected` is tried once more with a longer timeout, so a slow
/// machine cannot turn "allowed" into "denied".
pub fn probe_all(
    lab: &TestLab,
    probes: &[Probe],
    expected: &BTreeMap<Probe, bool>,
) -> BTreeMap<Probe, bool> {
    let handles: Vec<_> = probes
        .iter()
        .map(|p| {
            let netns = lab.lab.pod_netns(&p.from).expect("source netns");
            let addr = SocketAddr::from((lab.pod_ip(&p.to), p.port));
            let probe = p.clone();
            let want = expected.get(p).copied();
            std::thread::spawn(move || {
                in_netns(&netns, move || {
                    let mut got = connects(addr, probe.protocol, Duration::from_millis(400));
                    if Some(got) != want {
                        got = connects(addr, probe.protocol, Duration::from_millis(1500));
                    }
                    (probe, got)
                })
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("probe thread"))
        .collect()
}

/// Every probe of the full model: 9 x 9 pods x 2 ports x 2 protocols.
pub fn full_matrix() -> Vec<Probe> {
    matrix(&model_pods())
}

/// Every probe between distinct `pods` (`ns/pod`) on the model's ports and protocols.
pub fn matrix(pods: &[String]) -> Vec<Probe> {
    let mut probes = Vec::new();
    for from in pods {
        for to in pods {
            if from == to {
                // A pod reaches itself over loopback, which no policy governs.
                continue;
            }
            for port in PORTS {
                for protocol in PROTOCOLS {
                    probes.push(Probe {
                        from: from.clone(),
                        to: to.clone(),
                        port,
                        protocol,
                    });
                }
            }
        }
    }
    probes
}

/// The probes whose real verdict differs from the reference, as a readable report.
pub fn mismatches(expected: &BTreeMap<Probe, bool>, actual: &BTreeMap<Probe, bool>) -> String {
    let verdict = |allowed: bool| if allowed { "allowed" } else { "denied" };
    expected
        .iter()
        .filter(|(p, want)| actual.get(*p) != Some(*want))
        .map(|(p, want)| {
            format!(
                "{} -> {} {}/{}: reference {}, datapath {}\n",
                p.from,
                p.to,
                p.port,
                p.protocol,
                verdict(*want),
                actual.get(p).map_or("not probed", |a| verdict(*a))
            )
        })
        .collect()
}

/// The lab's current objects, as the agents read them.
pub fn snapshot(lab: &TestLab) -> Snapshot {
    Snapshot::read_file(&lab.lab.cluster_file()).expect("read the lab's cluster file")
}

/// A NetworkPolicy `namespace/name` with `spec` (indented YAML).
pub fn policy(name: &str, namespace: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: \"{namespace}\"\nspec:\n{spec}"
    )
}

/// Policies from the upstream suite (test/e2e/network/netpol), each applied alone.
pub fn upstream_cases() -> Vec<(&'static str, String)> {
    vec![
        (
            "default-deny-ingress",
            policy(
                "deny-ingress",
                "x",
                "  podSelector: {}\n  policyTypes: [Ingress]\n",
            ),
        ),
        (
            "default-deny-egress",
            policy(
                "deny-egress",
                "x",
                "  podSelector: {}\n  policyTypes: [Egress]\n",
            ),
        ),
        (
            "allow-from-namespace-y-to-x-a",
            policy(
                "allow-ns-y",
                "x",
                "  podSelector:\n    matchLabels: {pod: a}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {ns: \"y\"}\n",
            ),
        ),
        (
            "and-namespace-y-pod-b",
            policy(
                "and-peer",
                "x",
                "  podSelector:\n    matchLabels: {pod: a}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {ns: \"y\"}\n      podSelector:\n        matchLabels: {pod: b}\n",
            ),
        ),
        (
            "or-namespace-y-or-pod-b",
            policy(
                "or-peer",
                "x",
                "  podSelector:\n    matchLabels: {pod: a}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {ns: \"y\"}\n    - podSelector:\n        matchLabels: {pod: b}\n",
            ),
        ),
        (
            "namespace-not-in-y",
            policy(
                "not-in-y",
                "x",
                "  podSelector:\n    matchLabels: {pod: a}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: ns, operator: NotIn, values: [\"y\"]}\n",
            ),
        ),
        (
            "pod-exists-and-not-c",
            policy(
                "exists",
                "x",
                "  podSelector:\n    matchExpressions:\n    - {key: pod, operator: Exists}\n  ingress:\n  - from:\n    - namespaceSelector: {}\n      podSelector:\n        matchExpressions:\n        - {key: pod, operator: In, values: [a, b]}\n",
            ),
        ),
        (
            "named-port-81-tcp-only",
            policy(
                "named-port",
                "x",
                "  podSelector: {}\n  ingress:\n  - ports:\n    - {port: serve-81-tcp}\n",
            ),
        ),
        (
            "named-port-wrong-protocol-matches-nothing",
            policy(
                "named-wrong",
                "x",
                "  podSelector: {}\n  ingress:\n  - ports:\n    - {port: serve-80-tcp, protocol: UDP}\n",
            ),
        ),
        (
            "end-port-udp-80-81",
            policy(
                "end-port",
                "x",
                "  podSelector: {}\n  ingress:\n  - ports:\n    - {port: 80, endPort: 81, protocol: UDP}\n",
            ),
        ),
        (
            "egress-to-y-port-80",
            policy(
                "egress-y",
                "x",
                "  podSelector: {}\n  egress:\n  - to:\n    - namespaceSelector:\n        matchLabels: {ns: \"y\"}\n    ports:\n    - {port: 80}\n",
            ),
        ),
        (
            "named-egress-port-per-destination",
            policy(
                "egress-named",
                "x",
                "  podSelector:\n    matchLabels: {pod: a}\n  egress:\n  - ports:\n    - {port: serve-81-udp, protocol: UDP}\n",
            ),
        ),
        (
            "ingress-and-egress-types-without-egress-rules",
            policy(
                "both-types",
                "y",
                "  podSelector:\n    matchLabels: {pod: b}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - {}\n",
            ),
        ),
        (
            "ip-block-with-except",
            policy(
                "ip-block",
                "x",
                "  podSelector:\n    matchLabels: {pod: a}\n  ingress:\n  - from:\n    - ipBlock:\n        cidr: 10.244.0.0/16\n        except: [EXCEPT/32]\n",
            ),
        ),
    ]
}

/// What the random sequence has created so far, to delete later.
#[derive(Default)]
pub struct Created {
    pub policies: Vec<String>,
    /// `(ns/pod, yaml)` of pods added to the model.
    pub pods: Vec<(String, String)>,
}

/// One random change to the model: a policy applied or deleted, a pod added, deleted or
/// relabelled, a namespace relabelled.
///
/// With `nodes`, a relabelled model pod stays on the node [`model_yaml_on`] gave it and a new
/// pod goes to a random one of them.
pub fn random_change(
    rng: &mut fastrand::Rng,
    step: usize,
    created: &mut Created,
    nodes: &[&str],
) -> Change {
    let ns = NAMESPACES[rng.usize(..3)];
    let value = |rng: &mut fastrand::Rng| ["a", "b", "c"][rng.usize(..3)];
    match rng.u8(..12) {
        0..=4 => {
            let name = format!("p{step}");
            let peer = match rng.u8(..5) {
                0 => format!("    - podSelector:\n        matchLabels: {{pod: {}}}\n", value(rng)),
                1 => format!(
                    "    - namespaceSelector:\n        matchLabels: {{ns: \"{}\"}}\n",
                    NAMESPACES[rng.usize(..3)]
                ),
                2 => format!(
                    "    - namespaceSelector:\n        matchExpressions:\n        - {{key: ns, operator: NotIn, values: [\"{}\"]}}\n      podSelector:\n        matchLabels: {{pod: {}}}\n",
                    NAMESPACES[rng.usize(..3)],
                    value(rng)
                ),
                3 => "    - podSelector:\n        matchExpressions:\n        - {key: tier, operator: Exists}\n".to_string(),
                _ => "    - ipBlock: {cidr: 10.244.1.0/25}\n".to_string(),
            };
            let ports = match rng.u8(..4) {
                0 => String::new(),
                1 => format!("    ports:\n    - {{port: {}}}\n", 80 + rng.u16(..2)),
                2 => "    ports:\n    - {port: serve-81-udp, protocol: UDP}\n".to_string(),
                _ => "    ports:\n    - {port: 80, endPort: 81, protocol: UDP}\n".to_string(),
            };
            let (direction, peers) = if rng.bool() {
                ("ingress", "from")
            } else {
                ("egress", "to")
            };
            let spec = format!(
                "  podSelector:\n    matchLabels: {{pod: {}}}\n  {direction}:\n  - {peers}:\n{peer}{ports}",
                value(rng)
            );
            let yaml = policy(&name, ns, &spec);
            created.policies.push(yaml.clone());
            Change::Apply(format!("policy {ns}/{name}"), yaml)
        }
        5..=6 if !created.policies.is_empty() => {
            let yaml = created.policies.remove(rng.usize(..created.policies.len()));
            Change::Delete("delete a policy".into(), yaml)
        }
        7 => {
            // A new pod that shares a label with the model's pods, so policies select it.
            let name = format!("d{step}");
            let yaml = pod_yaml_on(
                ns,
                &name,
                &format!("pod: {}", value(rng)),
                (!nodes.is_empty()).then(|| nodes[rng.usize(..nodes.len())]),
            );
            created.pods.push((format!("{ns}/{name}"), yaml.clone()));
            Change::Apply(format!("add pod {ns}/{name}"), yaml)
        }
        8 if !created.pods.is_empty() => {
            let (pod, yaml) = created.pods.remove(rng.usize(..created.pods.len()));
            Change::Delete(format!("delete pod {pod}"), yaml)
        }
        8..=9 => {
            let pod = value(rng);
            let tier = if rng.bool() { "tier: web, " } else { "" };
            Change::Apply(
                format!("relabel pod {ns}/{pod}"),
                pod_yaml_on(
                    ns,
                    pod,
                    &format!("{tier}pod: {pod}"),
                    (!nodes.is_empty()).then(|| node_for(ns, pod, nodes)),
                ),
            )
        }
        _ => {
            let team = ["red", "blue"][rng.usize(..2)];
            Change::Apply(
                format!("relabel namespace {ns}"),
                format!(
                    "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"{ns}\"\n  labels: {{ns: \"{ns}\", team: {team}}}\n"
                ),
            )
        }
    }
}

pub enum Change {
    /// What it does, and the YAML to apply.
    Apply(String, String),
    /// What it does, and the YAML of what to delete.
    Delete(String, String),
}

/// The property tests' seed and number of steps: `SLUICE_PROPERTY_SEED` and
/// `SLUICE_PROPERTY_STEPS` when set (to replay a run), else a random seed and
/// `default_steps`. The seed is printed so a failure can be replayed.
pub fn property_seed_and_steps(default_steps: usize) -> (u64, usize) {
    let seed = std::env::var("SLUICE_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let steps = std::env::var("SLUICE_PROPERTY_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_steps);
    eprintln!("property seed {seed} ({steps} steps; rerun with SLUICE_PROPERTY_SEED={seed})");
    (seed, steps)
}
