//! Maglev by annotation end to end: a lab with a real agent that computes the table,
//! realizes it into `lb4_maglev`, and real TCP connections from a pod that the datapath
//! spreads by the flow hash.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use sluice_common::{IPPROTO_TCP, Lb4Key, SVC_FLAG_MAGLEV};
use sluice_integration::{ONE_NODE_LAB, TestLab, examples, http_get};

const HASHED: &str = "apiVersion: v1
kind: Service
metadata:
  name: hashed
  annotations: {service.sluice.dev/lb-algorithm: maglev}
spec:
  selector: {app: nginx}
  ports:
  - {port: 80}
";

#[test]
fn a_maglev_service_is_realized_verified_and_spreads_connections() {
    let mut lab = TestLab::up("maglev", ONE_NODE_LAB);
    lab.lab
        .apply(&[
            examples().join("nginx.yaml"),
            examples().join("client.yaml"),
        ])
        .unwrap_or_else(|e| panic!("apply nginx + client: {e}"));
    lab.apply_yaml("hashed.yaml", HASHED);
    let vip = lab.cluster_ip("hashed");

    let maps = sluice_datapath::PinnedMaps::open(&lab.lab.pin_dir(&lab.node())).unwrap();
    let key = Lb4Key::new(vip, 80, IPPROTO_TCP, 0);
    let frontend = maps.services.get(&key, 0).unwrap();
    assert_eq!(frontend.flags & SVC_FLAG_MAGLEV, SVC_FLAG_MAGLEV);
    assert_eq!(frontend.maglev_size, 16381, "the agent's default M");
    let table = maps.maglev.get(&key, 0).expect("the frontend's table");
    let mut held = BTreeMap::<u16, usize>::new();
    for lanes in table.iter() {
        for slot in lanes.unwrap() {
            *held.entry(slot).or_default() += 1;
        }
    }
    eprintln!("maglev table positions per slot (0: padding): {held:?}");
    assert_eq!(held.keys().copied().collect::<Vec<_>>(), [0, 1, 2]);

    let listed = lab.cli_json(&["service", "list"]);
    let hashed = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "default/hashed")
        .unwrap_or_else(|| panic!("hashed in {listed}"));
    assert_eq!(hashed["algorithm"], "maglev", "{hashed}");
    assert!(lab.cli(&["service", "list"]).contains("maglev"));

    let report = lab
        .client()
        .verify(sluice_api::VerifyRequest::default())
        .unwrap();
    assert!(report.drift.is_empty(), "no drift: {:?}", report.drift);

    // Each connection has its own source port, so its own hash: both backends answer.
    let to = SocketAddr::from((vip, 80));
    let answers = lab.in_pod("default/client", move || {
        (0..40)
            .map(|_| http_get(to).expect("request through the VIP"))
            .collect::<Vec<_>>()
    });
    let mut per_backend = BTreeMap::<String, usize>::new();
    for a in answers {
        *per_backend.entry(a).or_default() += 1;
    }
    eprintln!("maglev: 40 connections per backend: {per_backend:?}");
    assert_eq!(per_backend.len(), 2, "{per_backend:?}");

    // The annotation removed: the table goes with the next pass.
    lab.apply_yaml("hashed.yaml", &HASHED.replace("maglev", "random"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while maps.maglev.get(&key, 0).is_ok() {
        assert!(std::time::Instant::now() < deadline, "table still there");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        maps.services.get(&key, 0).unwrap().flags & SVC_FLAG_MAGLEV,
        0
    );
}

const SPREAD: &str = "apiVersion: v1
kind: Service
metadata:
  name: spread
  annotations: {service.sluice.dev/lb-algorithm: maglev}
spec:
  selector: {app: spread}
  ports:
  - {port: 80}
";

#[test]
fn every_node_realizes_the_same_table_and_a_client_reaches_every_backend() {
    use sluice_integration::multinode::{Mode, NODES, pod_on, three_nodes};

    let mut lab = three_nodes("maglev-nodes", Mode::Tunnel);
    let mut pods = String::from(SPREAD);
    for (i, node) in NODES.iter().enumerate() {
        pods.push_str("---\n");
        pods.push_str(&pod_on(
            "default",
            &format!("spread-{i}"),
            node,
            "app: spread",
        ));
    }
    lab.apply_yaml("spread.yaml", &pods);
    let vip = lab.cluster_ip("spread");
    let key = Lb4Key::new(vip, 80, IPPROTO_TCP, 0);

    let tables: Vec<Vec<[u16; 4]>> = NODES
        .iter()
        .map(|node| {
            let maps = sluice_datapath::PinnedMaps::open(&lab.lab.pin_dir(node)).unwrap();
            let table = maps
                .maglev
                .get(&key, 0)
                .unwrap_or_else(|e| panic!("{node} has no table: {e}"));
            table.iter().map(Result::unwrap).collect()
        })
        .collect();
    assert_eq!(tables[0].len(), 16384 / 4);
    assert_eq!(
        tables[0], tables[1],
        "node-1 and node-2 hold the same table"
    );
    assert_eq!(
        tables[0], tables[2],
        "node-1 and node-3 hold the same table"
    );
    lab.verify_every_node("a Maglev service on three nodes");

    // From a pod on node-1, connections (each its own source port, so its own hash) reach
    // backends on every node.
    let to = SocketAddr::from((vip, 80));
    let answers = lab.in_pod("default/spread-0", move || {
        (0..30)
            .map(|_| http_get(to).expect("request through the VIP"))
            .collect::<std::collections::BTreeSet<_>>()
    });
    eprintln!("maglev across nodes: answered by {answers:?}");
    assert_eq!(answers.len(), 3, "{answers:?}");
}
