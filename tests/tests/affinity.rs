//! sessionAffinity ClientIP end to end: a lab with a real agent, pods making real TCP
//! connections to a ClusterIP, one new connection per request.
// Test helpers outside #[test] functions: a failed request is a failed test.
#![allow(clippy::expect_used)]

use std::{collections::BTreeMap, net::SocketAddr, thread, time::Duration};

use sluice_integration::{ONE_NODE_LAB, TestLab, http_get};

/// Four backends behind two Services: `sticky` with ClientIP affinity (2 s), `plain`
/// without; two client pods.
const WEB: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 4
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:latest
        ports:
        - containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: sticky
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}
  ports:
  - {port: 80}
---
apiVersion: v1
kind: Service
metadata:
  name: plain
spec:
  selector: {app: web}
  ports:
  - {port: 80}
---
apiVersion: v1
kind: Pod
metadata:
  name: client-a
spec:
  containers:
  - {name: client, image: curlimages/curl:latest, command: [sleep, infinity]}
---
apiVersion: v1
kind: Pod
metadata:
  name: client-b
spec:
  containers:
  - {name: client, image: curlimages/curl:latest, command: [sleep, infinity]}
";

const CONNECTIONS: usize = 50;

/// Backend name -> requests it answered, of `n` requests (each a new connection) from `pod`.
fn answers(lab: &TestLab, pod: &str, vip: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let names = lab.in_pod(pod, move || {
        (0..n)
            .map(|_| http_get(vip).expect("request through the VIP"))
            .collect::<Vec<_>>()
    });
    let mut per_backend = BTreeMap::new();
    for name in names {
        *per_backend.entry(name).or_default() += 1;
    }
    per_backend
}

/// The share of the requests the most used backend answered.
fn hit_rate(per_backend: &BTreeMap<String, usize>) -> f64 {
    let top = per_backend.values().max().copied().unwrap_or(0);
    top as f64 / per_backend.values().sum::<usize>() as f64
}

#[test]
fn client_ip_affinity_keeps_each_client_on_one_backend_until_the_timeout() {
    let mut lab = TestLab::up("affinity", ONE_NODE_LAB);
    lab.apply_yaml("web.yaml", WEB);
    let sticky = SocketAddr::from((lab.cluster_ip("sticky"), 80));
    let plain = SocketAddr::from((lab.cluster_ip("plain"), 80));

    let listed = lab.cli_json(&["service", "list"]);
    let entry = |name: &str| {
        listed
            .as_array()
            .and_then(|l| l.iter().find(|s| s["service"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {listed}"))
    };
    assert_eq!(entry("default/sticky")["affinity_timeout"], 2);
    assert_eq!(entry("default/sticky")["algorithm"], "random");
    assert!(entry("default/plain").get("affinity_timeout").is_none());
    assert!(
        lab.cli(&["service", "list"])
            .contains("random, ClientIP 2s")
    );

    let a = answers(&lab, "default/client-a", sticky, CONNECTIONS);
    eprintln!(
        "affinity: client-a, {CONNECTIONS} connections: hit rate {:.0}% {a:?}",
        100.0 * hit_rate(&a)
    );
    assert_eq!(a.len(), 1, "client-a stays on one backend: {a:?}");

    let b = answers(&lab, "default/client-b", sticky, CONNECTIONS);
    eprintln!(
        "affinity: client-b, {CONNECTIONS} connections: hit rate {:.0}% {b:?}",
        100.0 * hit_rate(&b)
    );
    assert_eq!(b.len(), 1, "client-b stays on one backend: {b:?}");

    let spread = answers(&lab, "default/client-a", plain, CONNECTIONS);
    eprintln!("no affinity: client-a, {CONNECTIONS} connections: {spread:?}");
    assert!(
        spread.len() > 1,
        "without affinity one client spreads: {spread:?}"
    );

    // Idle past the 2 s timeout before each request: every one chooses anew. Eight rounds
    // over four backends all landing on one backend would happen once in 16,384 runs.
    let mut chosen = Vec::new();
    for _ in 0..8 {
        thread::sleep(Duration::from_millis(2300));
        let round = answers(&lab, "default/client-a", sticky, 3);
        assert_eq!(
            round.len(),
            1,
            "within the timeout the backend holds: {round:?}"
        );
        chosen.extend(round.into_keys());
    }
    eprintln!("affinity: after each timeout client-a went to {chosen:?}");
    chosen.sort();
    chosen.dedup();
    assert!(
        chosen.len() > 1,
        "after the timeout the backend is chosen again"
    );
}
