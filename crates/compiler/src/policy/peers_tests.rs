//! Peers matched per group of pods against peers matched per pod, the way the compiler did
//! before `PeerGroups`: random namespaces, pods (labels a selector names and labels it
//! does not, high-cardinality keys, labels that spell the namespace's, missing, shared and
//! node addresses, named ports) and NetworkPolicies; every peer of every rule must select
//! the same identities, and every named port the same (identity, number) pairs.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use sluice_common::{POLICY_EGRESS, POLICY_INGRESS};

use super::{PolicyInput, Problems, peers::Peers, resolve, rules, workloads::Workload};
use crate::{NodeContext, Snapshot};
use sluice_store::{LocalEndpoint, selector};

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const KEYS: [(&str, &[&str]); 5] = [
    ("app", &["web", "db", "cache"]),
    ("tier", &["front", "back"]),
    ("pod-template-hash", &["h1", "h2"]),
    ("io.kubernetes.pod.namespace", &["a", "b"]),
    ("unselected", &["x", "y", "z"]),
];
const PORT_NAMES: [&str; 2] = ["http", "dns"];
const EXCEPTS: [&[&str]; 3] = [&[], &["10.0.1.0/25"], &["10.0.2.0/24", "10.0.0.8/29"]];

fn pick<'a, T>(rng: &mut fastrand::Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

fn object<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"))
}

fn labels(rng: &mut fastrand::Rng, keys: &[(&str, &[&str])]) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for (k, values) in keys {
        if rng.bool() {
            out.insert((*k).to_string(), json!(pick(rng, values)));
        }
    }
    out
}

fn label_selector(rng: &mut fastrand::Rng) -> Value {
    // Never on `unselected`: its values must stay out of the groups.
    let keys = &KEYS[..4];
    let named = rng.usize(..keys.len());
    let mut s = json!({"matchLabels": labels(rng, &keys[..named])});
    if rng.u8(..3) == 0 {
        let (key, values) = pick(rng, keys);
        let operator = pick(rng, &["In", "NotIn", "Exists", "DoesNotExist"]);
        let mut expression = json!({"key": key, "operator": operator});
        if matches!(*operator, "In" | "NotIn") {
            expression["values"] = json!([pick(rng, values)]);
        }
        s["matchExpressions"] = json!([expression]);
    }
    s
}

fn peer(rng: &mut fastrand::Rng) -> Value {
    match rng.u8(..5) {
        0 => json!({"podSelector": label_selector(rng)}),
        1 => json!({"namespaceSelector": {"matchLabels": {"team": pick(rng, &["red", "blue"])}}}),
        2 => json!({"namespaceSelector": {}, "podSelector": label_selector(rng)}),
        3 => {
            let cidr = pick(
                rng,
                &["10.0.0.0/16", "10.0.1.0/24", "10.0.0.0/8", "0.0.0.0/0"],
            );
            let except = pick(rng, &EXCEPTS);
            json!({"ipBlock": {"cidr": cidr, "except": except}})
        }
        _ => json!({"podSelector": {}}),
    }
}

fn snapshot(rng: &mut fastrand::Rng) -> Snapshot {
    let mut s = Snapshot::default();
    for ns in NAMESPACES {
        if rng.u8(..4) == 0 {
            continue;
        }
        let team = pick(rng, &["red", "blue"]);
        s.namespaces.push(object(
            json!({"metadata": {"name": ns, "labels": {"team": team}}}),
        ));
    }
    for i in 0..rng.usize(0..40) {
        let address = match rng.u8(..10) {
            0 => Value::Null,
            1 => json!("172.16.0.1"),
            _ => json!(format!("10.0.{}.{}", rng.u8(..3), rng.u8(..30))),
        };
        let ports: Vec<Value> = (0..rng.usize(0..3))
            .map(|_| {
                json!({"name": pick(rng, &PORT_NAMES), "containerPort": pick(rng, &[53, 80, 8080]),
                       "protocol": pick(rng, &["TCP", "UDP"])})
            })
            .collect();
        s.pods.push(object(json!({
            "metadata": {"name": format!("p{i}"), "namespace": pick(rng, &NAMESPACES),
                         "labels": labels(rng, &KEYS)},
            "spec": {"nodeName": pick(rng, &["node-a", "node-b"]),
                     "containers": [{"name": "c", "ports": ports}]},
            "status": {"phase": "Running", "podIP": address},
        })));
    }
    for (name, cidr, address) in [
        ("node-a", "10.0.1.0/24", "172.16.0.1"),
        ("node-b", "10.0.2.0/24", "10.0.0.9"),
    ] {
        s.nodes.push(object(json!({
            "metadata": {"name": name},
            "spec": {"podCIDR": cidr},
            "status": {"addresses": [{"type": "InternalIP", "address": address}]},
        })));
    }
    for i in 0..rng.usize(1..5) {
        let rule = |rng: &mut fastrand::Rng, side: &str| {
            let mut r = json!({});
            if rng.u8(..4) != 0 {
                r[side] = json!((0..rng.usize(1..3)).map(|_| peer(rng)).collect::<Vec<_>>());
            }
            if rng.bool() {
                r["ports"] = json!([{"port": pick(rng, &PORT_NAMES), "protocol": pick(rng, &["TCP", "UDP"])}]);
            }
            r
        };
        let ingress: Vec<Value> = (0..rng.usize(0..3)).map(|_| rule(rng, "from")).collect();
        let egress: Vec<Value> = (0..rng.usize(0..3)).map(|_| rule(rng, "to")).collect();
        s.network_policies.push(object(json!({
            "metadata": {"name": format!("np{i}"), "namespace": pick(rng, &NAMESPACES)},
            "spec": {"podSelector": label_selector(rng), "ingress": ingress, "egress": egress,
                     "policyTypes": ["Ingress", "Egress"]},
        })));
    }
    s
}

/// The identities a peer selects, matched against every pod with an address.
fn per_pod(
    workloads: &[Workload<'_>],
    world: &super::World<'_>,
    namespace: &str,
    peer: &k8s_openapi::api::networking::v1::NetworkPolicyPeer,
) -> BTreeSet<u32> {
    workloads
        .iter()
        .filter(|w| w.address.is_some())
        .filter(|w| {
            let namespace_ok = match &peer.namespace_selector {
                None => w.namespace == namespace,
                Some(s) => world
                    .namespaces
                    .get(w.namespace)
                    .is_some_and(|labels| selector::matches(s, labels)),
            };
            namespace_ok
                && peer
                    .pod_selector
                    .as_ref()
                    .is_none_or(|s| selector::matches(s, &w.labels))
        })
        .map(|w| w.identity)
        .collect()
}

/// The identities an ipBlock selects, judged prefix by prefix: those whose every prefix
/// in the ipcache (router addresses that are no node's address left out) lies in the block
/// and outside each except.
fn block_per_prefix(
    ipcache: &crate::ipcache::Ipcache,
    routers: &BTreeSet<std::net::Ipv4Addr>,
    cidr: ipnet::Ipv4Net,
    except: &[ipnet::Ipv4Net],
) -> BTreeSet<u32> {
    let mut verdicts: std::collections::BTreeMap<u32, bool> = Default::default();
    for (prefix, identity) in crate::ipcache::prefixes(ipcache) {
        if prefix.prefix_len() == 32 && routers.contains(&prefix.addr()) {
            continue;
        }
        let inside = cidr.contains(&prefix) && !except.iter().any(|e| e.contains(&prefix));
        *verdicts.entry(identity).or_insert(true) &= inside;
    }
    verdicts
        .into_iter()
        .filter(|(_, v)| *v)
        .map(|(id, _)| id)
        .collect()
}

/// (identity, number) of every pod with an address in `peers` with a port `name`/`proto`.
fn named_per_pod(
    workloads: &[Workload<'_>],
    peers: &Peers,
    name: &str,
    proto: u8,
) -> BTreeSet<(u32, u16)> {
    workloads
        .iter()
        .filter(|d| d.address.is_some() && peers.contains(d.identity))
        .flat_map(|d| {
            super::ports::named(d, name, proto)
                .into_iter()
                .map(|n| (d.identity, n))
        })
        .collect()
}

/// The first pod, when it is in namespace a, as the one local endpoint (`lxc0`).
fn s_endpoints(snapshot: &mut Snapshot) {
    snapshot.endpoints.push(LocalEndpoint {
        node: "node-a".into(),
        namespace: "a".into(),
        pod: "p0".into(),
        interface: "lxc0".into(),
        addresses: ["10.0.1.2"
            .parse::<std::net::IpAddr>()
            .unwrap_or_else(|e| panic!("{e}"))]
        .into(),
    });
}

#[test]
fn peers_matched_per_group_equal_peers_matched_per_pod() {
    let (mut peers_checked, mut blocks_checked, mut groups_smaller) = (0, 0, 0);
    for seed in 0..400 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut snapshot = snapshot(&mut rng);
        let node = NodeContext {
            node: "node-a".into(),
            ..NodeContext::default()
        };
        let mut node = node;
        node.interfaces.insert("lxc0".into(), 7);
        s_endpoints(&mut snapshot);
        let (mut compilation, local) = crate::Compilation::for_policy(&snapshot, &node);
        let routers = compilation
            .state
            .nodes
            .addresses(&snapshot, "node-a")
            .router_only;
        let input = PolicyInput {
            snapshot: &snapshot,
            node: &node,
            endpoints: &local,
        };
        let state = &mut compilation.state;
        let mut problems = Problems::default();
        resolve(&input, state, &mut problems, |world, policies, _| {
            let with_address = world
                .workloads
                .iter()
                .filter(|w| w.address.is_some())
                .count();
            groups_smaller += usize::from(world.peers.len() < with_address);
            for p in policies {
                for ((direction, list, _), resolved) in rules(p.policy).zip(&p.peers) {
                    for peer in list.into_iter().flatten() {
                        let mut ignored = Problems::default();
                        let grouped =
                            world.peer_identities(&p.object, p.namespace, peer, &mut ignored);
                        if let Some(block) = &peer.ip_block {
                            let parse = |c: &str| {
                                c.parse::<ipnet::Ipv4Net>()
                                    .unwrap_or_else(|e| panic!("{e}"))
                            };
                            let except: Vec<_> =
                                block.except.iter().flatten().map(|e| parse(e)).collect();
                            let per_prefix = block_per_prefix(
                                world.ipcache,
                                &routers,
                                parse(&block.cidr),
                                &except,
                            );
                            assert_eq!(grouped, per_prefix, "seed {seed}, {} {block:?}", p.owner);
                            blocks_checked += 1;
                        } else {
                            assert_eq!(
                                grouped,
                                per_pod(world.workloads, world, p.namespace, peer),
                                "seed {seed}, {}",
                                p.owner
                            );
                            peers_checked += 1;
                        }
                    }
                    assert!(direction == POLICY_INGRESS || direction == POLICY_EGRESS);
                    for name in PORT_NAMES {
                        for proto in [6, 17] {
                            let grouped: BTreeSet<(u32, u16)> =
                                world.peers.named_ports(resolved, name, proto).collect();
                            assert_eq!(
                                grouped,
                                named_per_pod(world.workloads, resolved, name, proto),
                                "seed {seed}, {}",
                                p.owner
                            );
                        }
                    }
                }
            }
        });
    }
    println!(
        "{peers_checked} peers and {blocks_checked} ipBlocks compared; \
         fewer groups than pods in {groups_smaller} of 400 cases"
    );
    // The comparison would say little if no group ever held two pods.
    assert!(peers_checked > 1000 && blocks_checked > 200 && groups_smaller > 100);
}
