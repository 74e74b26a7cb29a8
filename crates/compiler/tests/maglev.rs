//! Maglev tables as the compiler emits them: the same on every node (a flow that lands on
//! another node keeps its backend), the node's default algorithm and table size applied,
//! and the annotation overriding the default.

use serde_json::{Value, json};
use sluice_common::{Lb4Key, SVC_FLAG_MAGLEV};
use sluice_compiler::{
    Balancing, DesiredState, LbAlgorithm, NodeContext, compile, maglev::TableSize,
};
use sluice_store::Snapshot;

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).unwrap_or_else(|e| panic!("test object: {e}"))
}

/// Services `web` (no annotation) and `pinned` (annotated random), each with `n` backends,
/// the backends of `web` on two nodes.
fn snapshot(n: u8) -> Snapshot {
    let service = |name: &str, ip: &str, annotations: Value| {
        from_json(json!({
            "metadata": {"name": name, "namespace": "default", "annotations": annotations},
            "spec": {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080}]}
        }))
    };
    let slice = |service: &str| {
        let endpoints: Vec<Value> = (1..=n)
            .map(|i| {
                json!({"addresses": [format!("10.244.{}.{i}", i % 2)],
                       "nodeName": format!("node-{}", i % 2)})
            })
            .collect();
        from_json(json!({
            "metadata": {"name": format!("{service}-1"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": endpoints
        }))
    };
    Snapshot {
        revision: 1,
        services: vec![
            service("web", "10.96.0.10", json!({})),
            service(
                "pinned",
                "10.96.0.11",
                json!({"service.sluice.dev/lb-algorithm": "random"}),
            ),
        ],
        endpoint_slices: vec![slice("web"), slice("pinned")],
        ..Snapshot::default()
    }
}

fn compile_on(node: &str, snapshot: &Snapshot, balancing: Balancing) -> DesiredState {
    compile(
        snapshot,
        &NodeContext {
            node: node.into(),
            balancing,
            ..NodeContext::default()
        },
    )
}

#[test]
fn every_node_computes_the_same_table() {
    let maglev = Balancing {
        algorithm: LbAlgorithm::Maglev,
        maglev_table_size: TableSize::new(251).unwrap_or_default(),
    };
    let snap = snapshot(5);
    let a = compile_on("node-0", &snap, maglev);
    let b = compile_on("node-1", &snap, maglev);
    let web = Lb4Key::new([10, 96, 0, 10].into(), 80, 6, 0);
    let table = a.maglev.get(&web).expect("web has a Maglev table");
    assert_eq!(table.len(), 251);
    assert_eq!(
        a.maglev, b.maglev,
        "node-0 and node-1 compute the same tables"
    );
    let frontend = a.services[&web];
    assert_eq!(frontend.flags & SVC_FLAG_MAGLEV, SVC_FLAG_MAGLEV);
    assert_eq!(frontend.maglev_size, 251);

    // The annotation keeps `pinned` random whatever the node's default.
    let pinned = Lb4Key::new([10, 96, 0, 11].into(), 80, 6, 0);
    assert!(!a.maglev.contains_key(&pinned));
    assert_eq!(a.services[&pinned].flags & SVC_FLAG_MAGLEV, 0);
    assert_eq!(a.services[&pinned].maglev_size, 0);

    // The node's default random: no tables at all.
    let random = compile_on("node-0", &snap, Balancing::default());
    assert!(random.maglev.is_empty());
}

#[test]
fn each_backend_holds_about_m_over_n_positions() {
    let maglev = Balancing {
        algorithm: LbAlgorithm::Maglev,
        ..Balancing::default()
    };
    for n in [2u8, 5, 9] {
        let state = compile_on("node-0", &snapshot(n), maglev);
        let web = Lb4Key::new([10, 96, 0, 10].into(), 80, 6, 0);
        let table = &state.maglev[&web];
        assert_eq!(table.len(), 16381);
        for slot in 1..=u16::from(n) {
            let held = table.iter().filter(|&&s| s == slot).count();
            let fair = 16381.0 / f64::from(n);
            assert!(
                (held as f64 / fair - 1.0).abs() < 0.1,
                "n={n}: slot {slot} holds {held}, fair is {fair:.0}"
            );
        }
    }
}

#[test]
fn the_cost_of_tables_is_printed() {
    let backends: Vec<(std::net::Ipv4Addr, u16)> = (1..=10u8)
        .map(|i| (std::net::Ipv4Addr::new(10, 244, 1, i), 8080))
        .collect();
    let started = std::time::Instant::now();
    for _ in 0..100 {
        let table = sluice_compiler::maglev::table(&backends, TableSize::default());
        assert_eq!(table.len(), 16381);
    }
    println!(
        "maglev: one table of 16,381 positions for 10 backends takes {:?}",
        started.elapsed() / 100
    );
}

#[test]
fn frontends_with_the_same_backends_share_one_table() {
    let service = from_json(json!({
        "metadata": {"name": "two", "namespace": "default",
                     "annotations": {"service.sluice.dev/lb-algorithm": "maglev"}},
        "spec": {"clusterIP": "10.96.0.20",
                 "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 81}]}
    }));
    let slice = from_json(json!({
        "metadata": {"name": "two-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "two"}},
        "addressType": "IPv4",
        "ports": [{"name": "a", "port": 8080}, {"name": "b", "port": 8080}],
        "endpoints": [{"addresses": ["10.244.0.1"]}, {"addresses": ["10.244.0.2"]}]
    }));
    let snap = Snapshot {
        revision: 1,
        services: vec![service],
        endpoint_slices: vec![slice],
        ..Snapshot::default()
    };
    let state = compile_on("node-0", &snap, Balancing::default());
    let a = &state.maglev[&Lb4Key::new([10, 96, 0, 20].into(), 80, 6, 0)];
    let b = &state.maglev[&Lb4Key::new([10, 96, 0, 20].into(), 81, 6, 0)];
    assert!(std::sync::Arc::ptr_eq(a, b), "one table for both ports");
}
