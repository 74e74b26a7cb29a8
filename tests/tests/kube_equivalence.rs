//! The lab source and the Kubernetes source feed the same store: the objects a lab made
//! from an example lab file and the seed's manifests, served by a fake API server (on the
//! loopback of a namespace the test owns) and read back through kube-rs watchers, give the
//! same objects and byte-identical compiler output on every node.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test: a failed step must fail the test loudly"
)]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde_json::Value;
use sluice_agent::source::{Kubernetes, KubernetesConfig, Source, Updates};
use sluice_compiler::NodeContext;
use sluice_fake_apiserver::FakeApiServer;
use sluice_integration::{TestLab, examples};
use sluice_netns::OwnedNetNs;
use sluice_store::Snapshot;
use tokio::sync::watch;

/// The objects of a kind as JSON, without what only an API server adds, by name.
fn normalized<T: k8s_openapi::serde::Serialize>(objects: &[T]) -> BTreeMap<String, Value> {
    objects
        .iter()
        .map(|o| {
            let mut v = serde_json::to_value(o).unwrap();
            let meta = v["metadata"].as_object_mut().unwrap();
            meta.remove("resourceVersion");
            meta.remove("uid");
            let key = format!(
                "{}/{}",
                meta.get("namespace").and_then(Value::as_str).unwrap_or(""),
                meta["name"].as_str().unwrap()
            );
            (key, v)
        })
        .collect()
}

/// Each node's compiled maps, with the same interface indexes for both snapshots.
fn compiled(snapshot: &Snapshot) -> BTreeMap<String, String> {
    snapshot
        .nodes
        .iter()
        .map(|node| {
            let name = node.metadata.name.clone().unwrap();
            let interfaces = snapshot
                .endpoints_on(&name)
                .enumerate()
                .map(|(i, e)| (e.interface.clone(), 100 + u32::try_from(i).unwrap()))
                .collect();
            let context = NodeContext {
                node: name.clone(),
                interfaces,
                ..NodeContext::default()
            };
            (name, sluice_compiler::compile(snapshot, &context).dump())
        })
        .collect()
}

#[test]
fn lab_and_kubernetes_sources_compile_to_identical_maps() {
    let read = |file: &str| std::fs::read_to_string(examples().join(file)).unwrap();
    let mut lab = TestLab::up("kube-eq", &read("lab-3nodes.yaml"));
    for file in ["nginx.yaml", "client.yaml", "policy.yaml"] {
        lab.apply_yaml(file, &read(file));
    }
    // What the lab source hands its agents: the cluster file.
    let from_lab = Snapshot::read_file(&lab.lab.cluster_file()).unwrap();
    assert!(from_lab.pods.len() >= 4 && from_lab.network_policies.len() == 1);

    let ns = OwnedNetNs::unique("sk-eq-").unwrap();
    let listener = ns
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let server = FakeApiServer::start(listener).unwrap();
    for o in &from_lab.namespaces {
        server.apply(o).unwrap();
    }
    for o in &from_lab.nodes {
        server.apply(o).unwrap();
    }
    for o in &from_lab.pods {
        server
            .apply(&k8s_openapi::api::core::v1::Pod::from(o.clone()))
            .unwrap();
    }
    for o in &from_lab.services {
        server.apply(o).unwrap();
    }
    for o in &from_lab.endpoint_slices {
        server.apply(&**o).unwrap();
    }
    for o in &from_lab.network_policies {
        server.apply(o).unwrap();
    }
    let kubeconfig = std::env::temp_dir().join(format!("{}.kubeconfig", ns.name()));
    std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
    let source = Kubernetes::open(
        KubernetesConfig {
            kubeconfig: Some(kubeconfig.clone()),
            // The flag that states what the lab file states.
            cluster_cidr: from_lab.cluster_cidr,
            ..KubernetesConfig::default()
        },
        Default::default(),
    )
    .expect("read the kubeconfig");
    let (tx, mut rx) = watch::channel(Arc::new(Snapshot::default()));
    let updates = Updates::new(tx, Default::default());
    let _thread = ns.spawn(move || Box::new(source).run(&updates)).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(25), rx.changed()).await })
        .expect("a snapshot within 25 s")
        .expect("the source runs");
    let mut from_api = Snapshot::clone(&rx.borrow());
    drop(rx);
    let _ = std::fs::remove_file(&kubeconfig);

    // The same store: every kind holds the same objects, as the source slims them (the
    // maps below are compiled from the lab's whole objects).
    let slim_lab = sluice_agent::source::slimmed(from_lab.clone());
    assert_eq!(normalized(&from_api.nodes), normalized(&slim_lab.nodes));
    assert_eq!(
        normalized(&from_api.namespaces),
        normalized(&slim_lab.namespaces)
    );
    assert_eq!(normalized(&from_api.pods), normalized(&slim_lab.pods));
    assert_eq!(
        normalized(&from_api.services),
        normalized(&slim_lab.services)
    );
    assert_eq!(
        normalized(&from_api.endpoint_slices),
        normalized(&slim_lab.endpoint_slices)
    );
    assert_eq!(
        normalized(&from_api.network_policies),
        normalized(&slim_lab.network_policies)
    );
    assert_eq!(from_api.cluster_cidr, from_lab.cluster_cidr);
    // Local endpoints come from the CNI plugin on a real node, as the agent merges them.
    assert!(from_api.endpoints.is_empty());
    from_api.endpoints = from_lab.endpoints.clone();

    let (lab_maps, api_maps) = (compiled(&from_lab), compiled(&from_api));
    assert_eq!(lab_maps.len(), 3);
    for (node, dump) in &lab_maps {
        assert!(dump.lines().count() > 10, "{node}: {dump}");
        assert_eq!(&api_maps[node], dump, "{node}: the compiled maps differ");
        eprintln!("{node}: {} identical lines", dump.lines().count());
    }
}
