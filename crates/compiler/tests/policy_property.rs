//! The compiled policy, read the way the datapath reads it, against the reference reading
//! of the NetworkPolicy spec.
//!
//! Each case is a random cluster (namespaces, labelled pods with container ports, policies
//! with selectors, expressions, ipBlocks, numeric, ranged and named ports, policyTypes), all
//! of whose pods are local endpoints of the node. Random new connections (pod to pod, pod to
//! an outside address, outside address to pod) are judged by a small model of the datapath
//! over the compiled maps (ipcache LPM lookup, endpoint flags, the exact-then-ANY row
//! lookup) and by `sluice_policy_reference`; the verdicts must agree.
//! `SLUICE_POLICY_SEED=<n>` replays one case.
//!
//! The same cases run again with the pods spread over two nodes (by pod CIDR): each node's
//! state is compiled on its own, egress is judged on the sender's node and ingress on the
//! receiver's, with the identity the tunnel carries (the sender's endpoint identity),
//! which must equal what the receiver's ipcache says of the sender's address (native
//! routing). Policy must not depend on where pods run.
//!
//! Every 15th connection is also explained (`sluice_compiler::explain`, what `policy explain`
//! prints), and the explanation's verdict must equal the reference's too.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};
use serde_json::{Value, json};
use sluice_common::{
    ENDPOINT_F_EGRESS_ENFORCED, ENDPOINT_F_INGRESS_ENFORCED, ENDPOINT_F_POLICY_OVERFLOW,
    IDENTITY_ANY, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, POLICY_EGRESS, POLICY_INGRESS,
    POLICY_PREFIX_ANY_PROTO,
};
use sluice_compiler::{DesiredState, FlowEnd, FlowQuery, NodeContext, compile, explain};
use sluice_policy_reference::{Cluster, Connection, Peer};
use sluice_store::{LocalEndpoint, Snapshot};

const NODE: &str = "node-a";
const OTHER_NODE: &str = "node-b";
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const CIDRS: [&str; 7] = [
    "10.0.0.0/16",
    "10.0.1.0/24",
    "10.0.2.0/24",
    "10.0.1.16/28",
    "192.0.2.0/24",
    "0.0.0.0/0",
    "10.0.1.12/32",
];
const EXCEPTS: [&str; 6] = [
    "10.0.1.0/24",
    "10.0.1.16/28",
    "10.0.2.0/25",
    "192.0.2.128/25",
    "10.0.1.12/32",
    "10.0.0.0/8",
];
/// Outside the cluster; some inside policy CIDRs, none a pod's address.
const EXTERNAL: [Ipv4Addr; 6] = [
    Ipv4Addr::new(10, 0, 1, 200),
    Ipv4Addr::new(10, 0, 1, 30),
    Ipv4Addr::new(10, 0, 9, 9),
    Ipv4Addr::new(192, 0, 2, 7),
    Ipv4Addr::new(192, 0, 2, 200),
    Ipv4Addr::new(198, 51, 100, 1),
];
const PORTS: [u16; 12] = [
    53, 80, 81, 82, 443, 1000, 8000, 8080, 8081, 8100, 9090, 65535,
];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];
const PORT_NAMES: [&str; 4] = ["http", "dns", "metrics", "nope"];

fn pick<'a, T>(rng: &mut fastrand::Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

fn labels(rng: &mut fastrand::Rng, choices: &[(&str, &[&str])]) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for (key, values) in choices {
        if rng.u8(0..3) != 0 {
            out.insert((*key).into(), json!(pick(rng, values)));
        }
    }
    out
}

const POD_LABELS: &[(&str, &[&str])] = &[
    ("app", &["a", "b", "c"]),
    ("tier", &["fe", "be"]),
    ("pod-template-hash", &["h1", "h2", "h3"]),
];
const NAMESPACE_LABELS: &[(&str, &[&str])] = &[("team", &["a", "b"]), ("env", &["prod", "dev"])];

/// Container ports follow the app label, so pods sharing an identity share their ports
/// (named ports resolve per destination identity).
fn container_ports(app: Option<&str>) -> Value {
    match app {
        Some("a") => {
            json!([{"name": "http", "containerPort": 80}, {"name": "dns", "containerPort": 53, "protocol": "UDP"}])
        }
        Some("b") => {
            json!([{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090},
                            {"name": "dns", "containerPort": 53, "protocol": "TCP"}])
        }
        Some("c") => json!([{"name": "http", "containerPort": 81, "protocol": "UDP"}]),
        _ => json!([]),
    }
}

fn selector(rng: &mut fastrand::Rng, choices: &[(&str, &[&str])]) -> Value {
    match rng.u8(0..4) {
        0 => json!({}),
        1 => json!({"matchLabels": labels(rng, choices)}),
        _ => {
            let mut expressions = Vec::new();
            for _ in 0..rng.usize(1..3) {
                let (key, values) = pick(rng, choices);
                let operator = *pick(rng, &["In", "NotIn", "Exists", "DoesNotExist"]);
                let mut e = json!({"key": key, "operator": operator});
                if matches!(operator, "In" | "NotIn") {
                    let chosen: Vec<&str> = values.iter().copied().filter(|_| rng.bool()).collect();
                    let chosen = if chosen.is_empty() {
                        vec![values[0]]
                    } else {
                        chosen
                    };
                    e["values"] = json!(chosen);
                }
                expressions.push(e);
            }
            let mut s = json!({"matchExpressions": expressions});
            if rng.bool() {
                s["matchLabels"] = Value::Object(labels(rng, &choices[..1]));
            }
            s
        }
    }
}

fn peer(rng: &mut fastrand::Rng) -> Value {
    match rng.u8(0..4) {
        0 => json!({"podSelector": selector(rng, POD_LABELS)}),
        1 => json!({"namespaceSelector": selector(rng, NAMESPACE_LABELS)}),
        2 => json!({"podSelector": selector(rng, POD_LABELS),
                    "namespaceSelector": selector(rng, NAMESPACE_LABELS)}),
        _ => {
            let cidr = *pick(rng, &CIDRS);
            let net: ipnet::Ipv4Net = cidr.parse().unwrap_or_default();
            let except: Vec<&str> = EXCEPTS
                .iter()
                .copied()
                .filter(|e| {
                    let e: ipnet::Ipv4Net = e.parse().unwrap_or_default();
                    net.contains(&e) && e.prefix_len() > net.prefix_len()
                })
                .filter(|_| rng.bool())
                .collect();
            json!({"ipBlock": {"cidr": cidr, "except": except}})
        }
    }
}

fn port(rng: &mut fastrand::Rng) -> Value {
    let mut p = match rng.u8(0..5) {
        0 => json!({}),
        1 | 2 => json!({"port": pick(rng, &PORTS)}),
        3 => {
            let (first, last) = *pick(
                rng,
                &[(80, 85), (8000, 8100), (1, 1024), (53, 53), (81, 65535)],
            );
            json!({"port": first, "endPort": last})
        }
        _ => json!({"port": pick(rng, &PORT_NAMES)}),
    };
    if let Some(protocol) = pick(rng, &[None, Some("TCP"), Some("UDP"), Some("SCTP")]) {
        p["protocol"] = json!(protocol);
    }
    p
}

fn rules(rng: &mut fastrand::Rng, peers_field: &str) -> Option<Value> {
    if rng.u8(0..3) == 0 {
        return None;
    }
    let rules: Vec<Value> = (0..rng.usize(0..3))
        .map(|_| {
            let mut rule = json!({});
            match rng.u8(0..4) {
                0 => {}
                1 => rule[peers_field] = json!([]),
                _ => {
                    rule[peers_field] =
                        Value::Array((0..rng.usize(1..3)).map(|_| peer(rng)).collect())
                }
            }
            match rng.u8(0..4) {
                0 => {}
                1 => rule["ports"] = json!([]),
                _ => {
                    rule["ports"] = Value::Array((0..rng.usize(1..3)).map(|_| port(rng)).collect())
                }
            }
            rule
        })
        .collect();
    Some(Value::Array(rules))
}

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"))
}

/// A random cluster, on node-a alone or, if `spread`, over node-a (pod CIDR 10.0.1.0/24)
/// and node-b (10.0.2.0/24).
fn cluster(rng: &mut fastrand::Rng, spread: bool) -> (Snapshot, NodeContext) {
    let mut snapshot = Snapshot::default();
    for ns in NAMESPACES {
        snapshot.namespaces.push(from_json(
            json!({"metadata": {"name": ns, "labels": labels(rng, NAMESPACE_LABELS)}}),
        ));
    }
    let mut node = NodeContext {
        node: NODE.into(),
        ..NodeContext::default()
    };
    let mut replicas: Vec<(&str, serde_json::Map<String, Value>)> = Vec::new();
    for i in 0..rng.u8(2..10) {
        let mut namespace = *pick(rng, &NAMESPACES);
        let name = format!("p{i}");
        let mut pod_labels = labels(rng, POD_LABELS);
        // Often a replica of an earlier pod: same namespace and labels but another
        // pod-template-hash, which shares its identity unless a policy selects on the hash.
        if let Some((ns, earlier)) = replicas.get(rng.usize(..replicas.len().max(1)))
            && rng.bool()
        {
            namespace = ns;
            pod_labels = earlier.clone();
            pod_labels.insert(
                "pod-template-hash".into(),
                json!(pick(rng, &["h1", "h2", "h3"])),
            );
        }
        replicas.push((namespace, pod_labels.clone()));
        let ports = container_ports(pod_labels.get("app").and_then(Value::as_str));
        let ip = Ipv4Addr::new(10, 0, rng.u8(1..3), 10 + i);
        let on = if spread && ip.octets()[2] == 2 {
            OTHER_NODE
        } else {
            NODE
        };
        snapshot.pods.push(from_json(json!({
            "metadata": {"name": name, "namespace": namespace, "labels": pod_labels},
            "spec": {"nodeName": on, "containers": [{"name": "c", "image": "i", "ports": ports}]},
            "status": {"phase": "Running", "podIP": ip.to_string()},
        })));
        let interface = format!("lxc{i}");
        node.interfaces
            .insert(interface.clone(), 100 + u32::from(i));
        snapshot.endpoints.push(LocalEndpoint {
            node: on.into(),
            namespace: namespace.into(),
            pod: name,
            interface,
            addresses: [ip.into()].into(),
        });
    }
    for (name, address, pod_cidr) in [
        (NODE, "172.16.0.1", "10.0.1.0/24"),
        (OTHER_NODE, "172.16.0.2", "10.0.2.0/24"),
    ] {
        snapshot.nodes.push(from_json(json!({
            "metadata": {"name": name},
            "spec": {"podCIDR": spread.then_some(pod_cidr)},
            "status": {"addresses": [{"type": "InternalIP", "address": address}]},
        })));
    }
    for i in 0..rng.usize(0..5) {
        let mut spec = json!({"podSelector": selector(rng, POD_LABELS)});
        if let Some(types) = pick(
            rng,
            &[
                None,
                Some(&[][..]),
                Some(&["Ingress"][..]),
                Some(&["Egress"][..]),
                Some(&["Ingress", "Egress"][..]),
            ],
        ) {
            spec["policyTypes"] = json!(types);
        }
        if let Some(r) = rules(rng, "from") {
            spec["ingress"] = r;
        }
        if let Some(r) = rules(rng, "to") {
            spec["egress"] = r;
        }
        snapshot.network_policies.push(from_json(json!({
            "metadata": {"name": format!("np{i}"), "namespace": pick(rng, &NAMESPACES)},
            "spec": spec,
        })));
    }
    (snapshot, node)
}

/// The identity the datapath finds for an address: the longest ipcache prefix holding it.
fn lookup_identity(state: &DesiredState, address: Ipv4Addr) -> u32 {
    state
        .ipcache
        .iter()
        .filter(|(k, _)| {
            let net = ipnet::Ipv4Net::new(k.addr(), k.prefixlen as u8).unwrap_or_default();
            net.contains(&address)
        })
        .max_by_key(|(k, _)| k.prefixlen)
        .map(|(_, e)| e.identity)
        .unwrap_or_else(|| panic!("no ipcache entry holds {address}"))
}

fn proto_number(protocol: &str) -> u8 {
    match protocol {
        "TCP" => IPPROTO_TCP,
        "UDP" => IPPROTO_UDP,
        _ => IPPROTO_SCTP,
    }
}

/// One endpoint's verdict for a new connection in `direction` with the peer `identity`.
fn endpoint_allows(
    state: &DesiredState,
    ifindex: u32,
    direction: u8,
    identity: u32,
    proto: u8,
    port: u16,
) -> bool {
    let endpoint = state.endpoints[&ifindex];
    let flag = if direction == POLICY_INGRESS {
        ENDPOINT_F_INGRESS_ENFORCED
    } else {
        ENDPOINT_F_EGRESS_ENFORCED
    };
    if endpoint.flags & flag == 0 {
        return true;
    }
    if endpoint.flags & ENDPOINT_F_POLICY_OVERFLOW != 0 {
        return false;
    }
    let Some(policy) = state.policies.get(&ifindex) else {
        return false;
    };
    [identity, IDENTITY_ANY].iter().any(|&id| {
        policy.rows.keys().any(|k| {
            k.rule.identity == id
                && k.rule.direction == direction
                && (k.prefixlen == POLICY_PREFIX_ANY_PROTO
                    || (k.rule.proto == proto
                        && k.port_range().is_some_and(|(a, b)| (a..=b).contains(&port))))
        })
    })
}

fn pod_ip(pod: &Pod) -> Ipv4Addr {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .unwrap_or(Ipv4Addr::UNSPECIFIED)
}

fn ifindex(node: &NodeContext, snapshot: &Snapshot, pod: &Pod) -> u32 {
    let name = pod.metadata.name.as_deref().unwrap_or("");
    let endpoint = snapshot
        .endpoints
        .iter()
        .find(|e| e.pod == name)
        .map(|e| &e.interface);
    endpoint
        .and_then(|i| node.interfaces.get(i))
        .copied()
        .unwrap_or_default()
}

fn describe(peer: &Peer<'_>) -> String {
    match peer {
        Peer::Pod(p) => format!(
            "pod {}/{} ({})",
            p.metadata.namespace.as_deref().unwrap_or(""),
            p.metadata.name.as_deref().unwrap_or(""),
            pod_ip(p)
        ),
        Peer::External(ip) => format!("external {ip}"),
    }
}

/// The node a pod runs on.
fn node_of(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or(NODE)
}

/// The explanation of `connection` (what `policy explain` prints) must give the
/// reference's verdict; it is judged on one node whichever node the pods run on.
fn explains(snapshot: &Snapshot, node: &NodeContext, seed: u64, connection: &Connection<'_>) {
    let end = |p: &Peer<'_>| match p {
        Peer::Pod(pod) => FlowEnd::Pod {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
        },
        Peer::External(ip) => FlowEnd::Address(*ip),
    };
    let flow = FlowQuery {
        from: end(&connection.from),
        to: end(&connection.to),
        port: connection.port,
        protocol: proto_number(connection.protocol),
    };
    let explained = explain(snapshot, node, &flow)
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"))
        .allowed();
    let reference = Cluster {
        namespaces: &snapshot.namespaces,
        policies: &snapshot.network_policies,
    };
    let expected = reference.allows(connection);
    assert_eq!(
        explained,
        expected,
        "seed {seed} (replay with SLUICE_POLICY_SEED={seed}): {} -> {} {}/{}: explain \
         {explained}, reference {expected}",
        describe(&connection.from),
        describe(&connection.to),
        connection.port,
        connection.protocol
    );
}

/// Verdicts of one case: (allowed, denied).
fn run_case(seed: u64, spread: bool) -> (usize, usize) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (snapshot, node) = cluster(&mut rng, spread);
    let states: BTreeMap<&str, DesiredState> = [NODE, OTHER_NODE]
        .into_iter()
        .map(|name| {
            let context = NodeContext {
                node: name.into(),
                ..node.clone()
            };
            (name, compile(&snapshot, &context))
        })
        .collect();
    for state in states.values() {
        assert!(
            state.problems.is_empty(),
            "seed {seed}: problems {:?}",
            state.problems
        );
    }
    let state_of = |pod: &Pod| &states[node_of(pod)];
    let reference = Cluster {
        namespaces: &snapshot.namespaces,
        policies: &snapshot.network_policies,
    };
    // The reference reads Kubernetes Pods: the snapshot's, written back as they are.
    let pods: Vec<Pod> = snapshot.pods.iter().cloned().map(Pod::from).collect();
    let pods = &pods;
    let mut verdicts = (0, 0);
    for n in 0..150 {
        let (from, to) = match rng.u8(0..4) {
            0 => (
                Peer::External(*pick(&mut rng, &EXTERNAL)),
                Peer::Pod(pick(&mut rng, pods)),
            ),
            1 => (
                Peer::Pod(pick(&mut rng, pods)),
                Peer::External(*pick(&mut rng, &EXTERNAL)),
            ),
            _ => {
                let a = rng.usize(..pods.len());
                // A pod reaching itself stays on its loopback and is never judged.
                let b = (a + rng.usize(1..pods.len())) % pods.len();
                (Peer::Pod(&pods[a]), Peer::Pod(&pods[b]))
            }
        };
        let protocol = *pick(&mut rng, &PROTOCOLS);
        // Often a port the destination serves, under any protocol, so that named ports
        // (and their protocols) are exercised.
        let served: Vec<u16> = match to {
            Peer::Pod(pod) => pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| u16::try_from(p.container_port).ok())
                .collect(),
            Peer::External(_) => Vec::new(),
        };
        let port = match rng.u8(0..8) {
            0 => rng.u16(1..),
            1..=3 if !served.is_empty() => *pick(&mut rng, &served),
            _ => *pick(&mut rng, &PORTS),
        };
        let connection = Connection {
            from,
            to,
            port,
            protocol,
        };
        let expected = reference.allows(&connection);
        let address = |p: &Peer<'_>| match p {
            Peer::Pod(pod) => pod_ip(pod),
            Peer::External(ip) => *ip,
        };
        let proto = proto_number(protocol);
        let egress = match from {
            Peer::Pod(pod) => endpoint_allows(
                state_of(pod),
                ifindex(&node, &snapshot, pod),
                POLICY_EGRESS,
                lookup_identity(state_of(pod), address(&to)),
                proto,
                port,
            ),
            Peer::External(_) => true,
        };
        let ingress = match to {
            Peer::Pod(pod) => {
                let state = state_of(pod);
                let identity = lookup_identity(state, address(&from));
                if let Peer::Pod(sender) = from {
                    // What the tunnel carries: the sender's identity on its own node.
                    let carried =
                        state_of(sender).endpoints[&ifindex(&node, &snapshot, sender)].identity;
                    assert_eq!(
                        carried,
                        identity,
                        "seed {seed}: {} has identity {carried} on its node, {identity} in \
                         the receiver's ipcache",
                        describe(&from)
                    );
                }
                endpoint_allows(
                    state,
                    ifindex(&node, &snapshot, pod),
                    POLICY_INGRESS,
                    identity,
                    proto,
                    port,
                )
            }
            Peer::External(_) => true,
        };
        // Every 15th: an explanation compiles the policy part again.
        if n % 15 == 0 {
            explains(&snapshot, &node, seed, &connection);
        }
        if expected {
            verdicts.0 += 1;
        } else {
            verdicts.1 += 1;
        }
        if (egress && ingress) != expected {
            let policies: Vec<String> = snapshot
                .network_policies
                .iter()
                .map(|p: &NetworkPolicy| serde_json::to_string(p).unwrap_or_default())
                .collect();
            let pods: Vec<String> = pods
                .iter()
                .map(|p| {
                    serde_json::to_string(&p.metadata).unwrap_or_default()
                        + &format!(" ip {} on {}", pod_ip(p), node_of(p))
                })
                .collect();
            let namespaces: Vec<String> = snapshot
                .namespaces
                .iter()
                .map(|n| serde_json::to_string(&n.metadata).unwrap_or_default())
                .collect();
            panic!(
                "seed {seed} (replay with SLUICE_POLICY_SEED={seed}): {} -> {} {port}/{protocol}: \
                 reference {expected}, compiled maps egress {egress} ingress {ingress}\n\
                 namespaces:\n{}\npods:\n{}\npolicies:\n{}\n\ncompiled:\n{}",
                describe(&from),
                describe(&to),
                namespaces.join("\n"),
                pods.join("\n"),
                policies.join("\n"),
                states
                    .iter()
                    .map(|(name, state)| format!("on {name}:\n{}", state.dump()))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    verdicts
}

#[test]
fn compiled_policy_agrees_with_the_reference() {
    agrees_with_the_reference(false);
}

#[test]
fn compiled_policy_agrees_with_the_reference_across_nodes() {
    agrees_with_the_reference(true);
}

fn agrees_with_the_reference(spread: bool) {
    if let Some(seed) = std::env::var("SLUICE_POLICY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_case(seed, spread);
        return;
    }
    let (mut allowed, mut denied) = (0, 0);
    for seed in 0..1000 {
        let (a, d) = run_case(seed, spread);
        allowed += a;
        denied += d;
    }
    println!("{allowed} connections allowed, {denied} denied");
    // Both verdicts must be common, or the comparison says little.
    assert!(
        allowed > 20_000 && denied > 20_000,
        "allowed {allowed}, denied {denied}"
    );
}
