//! Properties of the compiled state across the nodes of a random cluster: a node removed
//! from the snapshot leaves nothing of itself in any other node's ipcache or node list,
//! and every node sees every pod with the same identity, routed to where it runs.
//! `SLUICE_NODES_SEED=<n>` replays one case.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{Value, json};
use sluice_common::{IpcacheEntry, IpcacheKey, addr_be};
use sluice_compiler::{DesiredState, NodeContext, compile};
use sluice_store::Snapshot;

const CIDRS: [&str; 6] = [
    "10.244.0.0/16",
    "10.244.1.0/24",
    "10.244.2.128/25",
    "10.244.3.0/24",
    "0.0.0.0/0",
    "10.0.0.0/8",
];

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).unwrap_or_else(|e| panic!("test object: {e}"))
}

fn internal_ip(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, 11 + k)
}

fn pod_cidr(k: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 244, k, 0), 24).unwrap_or_else(|e| panic!("{e}"))
}

fn node_name(k: u8) -> String {
    format!("node-{k}")
}

/// Nodes 0..n with their pods (a few unscheduled, in a node's pod CIDR), and ipBlock
/// policies whose CIDRs overlap the pod CIDRs in every way.
fn cluster(rng: &mut fastrand::Rng) -> (Snapshot, u8) {
    let count = rng.u8(3..7);
    let mut snapshot = Snapshot::default();
    for k in 0..count {
        snapshot.nodes.push(from_json(json!({
            "metadata": {"name": node_name(k)},
            "spec": {"podCIDR": pod_cidr(k).to_string()},
            "status": {"addresses": [{"type": "InternalIP", "address": internal_ip(k).to_string()}]},
        })));
        for i in 0..rng.u8(0..5) {
            let scheduled = rng.u8(0..6) != 0;
            snapshot.pods.push(from_json(json!({
                "metadata": {"name": format!("p{k}-{i}"), "namespace": "x",
                             "labels": {"app": format!("a{}", rng.u8(0..3))}},
                "spec": {"nodeName": scheduled.then(|| node_name(k)),
                         "containers": [{"name": "c", "image": "i"}]},
                "status": {"phase": "Running", "podIP": Ipv4Addr::new(10, 244, k, 10 + i).to_string()},
            })));
        }
    }
    for i in 0..rng.usize(0..3) {
        let cidr = CIDRS[rng.usize(..CIDRS.len())];
        let except: Vec<&str> = CIDRS
            .iter()
            .copied()
            .filter(|e| {
                let (e, c): (Ipv4Net, Ipv4Net) = (parse(e), parse(cidr));
                e != c && c.contains(&e) && rng.bool()
            })
            .collect();
        snapshot.network_policies.push(from_json(json!({
            "metadata": {"name": format!("np{i}"), "namespace": "x"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"from": [{"ipBlock": {"cidr": cidr, "except": except}}]}],
                     "egress": [{"to": [{"ipBlock": {"cidr": cidr, "except": except}}]}]},
        })));
    }
    (snapshot, count)
}

fn parse(s: &str) -> Ipv4Net {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn compile_for(snapshot: &Snapshot, k: u8) -> DesiredState {
    compile(
        snapshot,
        &NodeContext {
            node: node_name(k),
            ..NodeContext::default()
        },
    )
}

fn key(address: Ipv4Addr, prefix_len: u8) -> IpcacheKey {
    IpcacheKey::new(address, prefix_len)
}

/// `snapshot` without node `gone` and the pods scheduled on it.
fn without(snapshot: &Snapshot, gone: u8) -> Snapshot {
    let name = node_name(gone);
    let mut out = snapshot.clone();
    out.nodes
        .retain(|n| n.metadata.name.as_deref() != Some(&name));
    out.pods.retain(|p| p.node_name() != Some(&name));
    out
}

/// Every CIDR the snapshot's ipBlocks name, as cidr or except.
fn policy_cidrs(snapshot: &Snapshot) -> Vec<Ipv4Net> {
    snapshot
        .network_policies
        .iter()
        .filter_map(|p| p.spec.as_ref())
        .flat_map(|s| {
            let from = s
                .ingress
                .iter()
                .flatten()
                .flat_map(|r| r.from.iter().flatten());
            let to = s
                .egress
                .iter()
                .flatten()
                .flat_map(|r| r.to.iter().flatten());
            from.chain(to)
        })
        .filter_map(|peer| peer.ip_block.as_ref())
        .flat_map(|b| std::iter::once(&b.cidr).chain(b.except.iter().flatten()))
        .map(|c| parse(c))
        .collect()
}

fn seeds() -> Vec<u64> {
    match std::env::var("SLUICE_NODES_SEED") {
        Ok(seed) => vec![seed.parse().unwrap_or_else(|e| panic!("seed: {e}"))],
        Err(_) => (0..60).collect(),
    }
}

#[test]
fn a_removed_node_leaves_nothing_of_itself() {
    for seed in seeds() {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (snapshot, count) = cluster(&mut rng);
        let gone = rng.u8(0..count);
        let reduced = without(&snapshot, gone);
        let policy_cidrs = policy_cidrs(&snapshot);
        let gone_pods: Vec<Ipv4Addr> = snapshot
            .pods
            .iter()
            .filter(|p| !reduced.pods.contains(p))
            .filter_map(|p| match p.pod_ip()? {
                std::net::IpAddr::V4(v4) => Some(v4),
                std::net::IpAddr::V6(_) => None,
            })
            .collect();
        let tunnel = addr_be(internal_ip(gone));
        for this in (0..count).filter(|&k| k != gone) {
            let before = compile_for(&snapshot, this);
            let after = compile_for(&reduced, this);
            let context = format!("seed {seed}: node-{gone} removed, compiled for node-{this}");
            // What the removed node owned goes; what only routed through it stays, unrouted.
            let owned = |k: &IpcacheKey| {
                let cidr = pod_cidr(gone);
                *k == key(internal_ip(gone), 32)
                    || *k == key(Ipv4Addr::new(10, 244, gone, 1), 32)
                    || (*k == key(cidr.network(), cidr.prefix_len())
                        && !policy_cidrs.contains(&cidr))
                    || gone_pods.iter().any(|&a| *k == key(a, 32))
            };
            let expected: Vec<(IpcacheKey, IpcacheEntry)> = before
                .ipcache
                .iter()
                .filter(|(k, _)| !owned(k))
                .map(|(&k, &e)| {
                    let tunnel_endpoint = if e.tunnel_endpoint == tunnel {
                        0
                    } else {
                        e.tunnel_endpoint
                    };
                    (
                        k,
                        IpcacheEntry {
                            tunnel_endpoint,
                            ..e
                        },
                    )
                })
                .collect();
            let actual: Vec<(IpcacheKey, IpcacheEntry)> =
                after.ipcache.iter().map(|(&k, &e)| (k, e)).collect();
            assert_eq!(actual, expected, "{context}");
            assert!(
                after.ipcache.values().all(|e| e.tunnel_endpoint != tunnel),
                "{context}: an entry still routes to the removed node"
            );
            let mut remote = before.nodes.remote.clone();
            remote.retain(|n| n.name != node_name(gone));
            assert_eq!(after.nodes.remote, remote, "{context}");
            assert_eq!(after.nodes.local, before.nodes.local, "{context}");
        }
    }
}

#[test]
fn every_node_sees_every_pod_alike_and_routes_it_home() {
    for seed in seeds() {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (snapshot, count) = cluster(&mut rng);
        let states: Vec<DesiredState> = (0..count).map(|k| compile_for(&snapshot, k)).collect();
        for pod in &snapshot.pods {
            let Some(std::net::IpAddr::V4(address)) = pod.pod_ip() else {
                continue;
            };
            // The pod CIDR it lies in says where it runs, scheduled or not.
            let home = address.octets()[2];
            let identities: Vec<u32> = states
                .iter()
                .map(|s| s.ipcache.get(&key(address, 32)).map_or(0, |e| e.identity))
                .collect();
            assert!(
                identities.windows(2).all(|w| w[0] == w[1]) && identities[0] > 255,
                "seed {seed}: {address} has identities {identities:?} across nodes"
            );
            for (k, state) in (0..count).zip(&states) {
                let entry = state.ipcache[&key(address, 32)];
                let expected = if k == home {
                    0
                } else {
                    addr_be(internal_ip(home))
                };
                assert_eq!(
                    entry.tunnel_endpoint, expected,
                    "seed {seed}: {address} compiled for node-{k}"
                );
            }
        }
        for (k, state) in (0..count).zip(&states) {
            let local = state.nodes.local.as_ref().map(|n| n.name.clone());
            assert_eq!(local, Some(node_name(k)), "seed {seed}");
            assert_eq!(
                state.nodes.remote.len(),
                usize::from(count) - 1,
                "seed {seed}"
            );
            assert!(
                state.problems.is_empty(),
                "seed {seed}: {:?}",
                state.problems
            );
        }
    }
}
