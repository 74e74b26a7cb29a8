//! NetworkPolicy end to end: a lab with a real agent, policy enforced by the eBPF datapath on
//! every pod's veth, real TCP, UDP and ICMP between pod namespaces.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failed step must fail the test loudly"
)]

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use sluice_integration::{ONE_NODE_LAB, TestLab, http_get, udp_ask};

/// Namespace `app`: `probe` (the long-lived client), `db` (a server on 27017 and 8000-8031).
const APP: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: app
  labels: {team: payments}
---
apiVersion: v1
kind: Pod
metadata:
  name: probe
  namespace: app
  labels: {app: probe}
spec:
  containers:
  - name: probe
    image: netshoot
    ports:
    - {containerPort: 80}
---
apiVersion: v1
kind: Pod
metadata:
  name: db
  namespace: app
  labels: {app: db}
spec:
  containers:
  - name: db
    image: mongo
    ports:
    - {name: mongo, containerPort: 27017}
    - {containerPort: 8005}
    - {containerPort: 8011}
    - {name: dns, containerPort: 5353, protocol: UDP}
";

const DENY_EGRESS: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-egress
  namespace: app
spec:
  podSelector:
    matchLabels: {app: probe}
  policyTypes: [Egress]
";

/// A TCP connect with a short timeout: a policy drop shows as a timeout.
fn tcp_connects(addr: SocketAddr, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&addr, timeout).is_ok()
}

fn app_lab(prefix: &str) -> TestLab {
    let mut lab = TestLab::up(prefix, ONE_NODE_LAB);
    lab.apply_yaml("app.yaml", APP);
    lab
}

/// Tries `probe` from inside `pod` every 20 ms until it succeeds or `limit` passes; returns
/// how long it took.
fn first_success(
    lab: &TestLab,
    pod: &str,
    limit: Duration,
    probe: impl Fn() -> bool + Send + 'static,
) -> Option<Duration> {
    let start = Instant::now();
    lab.in_pod(pod, move || {
        while start.elapsed() < limit {
            if probe() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    })
}

fn verify_is_clean(lab: &TestLab) {
    let out = lab.cli(&["verify"]);
    assert!(out.contains("every map matches"), "verify: {out}");
}

/// The incumbent's field failure: a NetworkPolicy is deleted and a long-lived pod stays
/// blocked until it restarts. Here the running pod connects at once, a new pod too, and
/// verify finds nothing stale.
#[test]
fn a_deleted_policy_unblocks_the_running_pod_without_a_restart() {
    let mut lab = app_lab("fieldfail");
    let db = SocketAddr::from((lab.pod_ip("app/db"), 27017));
    assert!(
        lab.in_pod("app/probe", move || tcp_connects(
            db,
            Duration::from_secs(1)
        )),
        "db reachable before any policy"
    );

    lab.apply_yaml("deny.yaml", DENY_EGRESS);
    assert!(
        !lab.in_pod("app/probe", move || tcp_connects(
            db,
            Duration::from_millis(500)
        )),
        "default-deny egress blocks the probe"
    );

    let deleted = Instant::now();
    let report = lab.delete_yaml("deny.yaml", DENY_EGRESS);
    let reconnect = first_success(&lab, "app/probe", Duration::from_secs(5), move || {
        tcp_connects(db, Duration::from_millis(200))
    })
    .expect("the same running pod connects after the policy is deleted");
    let total = deleted.elapsed().min(reconnect + report.realized_in);
    eprintln!(
        "policy deleted -> realized in {:?}; running pod connected {:?} after delete returned",
        report.realized_in, reconnect
    );
    assert!(
        report.realized_in + reconnect < Duration::from_secs(1),
        "the running pod connected {total:?} after the delete, more than 1 s"
    );

    lab.apply_yaml(
        "new.yaml",
        "apiVersion: v1
kind: Pod
metadata:
  name: probe-2
  namespace: app
  labels: {app: probe}
spec:
  containers:
  - name: probe
    image: netshoot
",
    );
    assert!(
        lab.in_pod("app/probe-2", move || tcp_connects(
            db,
            Duration::from_secs(1)
        )),
        "a new pod connects too"
    );
    verify_is_clean(&lab);
}

#[test]
fn end_port_ranges_are_enforced() {
    let mut lab = app_lab("endport");
    lab.apply_yaml(
        "policy.yaml",
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: range
  namespace: app
spec:
  podSelector:
    matchLabels: {app: db}
  ingress:
  - ports:
    - {port: 8000, endPort: 8010}
",
    );
    let ip = lab.pod_ip("app/db");
    let (inside, outside, mongo) = lab.in_pod("app/probe", move || {
        let t = Duration::from_millis(500);
        (
            tcp_connects((ip, 8005).into(), t),
            tcp_connects((ip, 8011).into(), t),
            tcp_connects((ip, 27017).into(), t),
        )
    });
    assert!(inside, "8005 is inside 8000-8010");
    assert!(!outside, "8011 is outside 8000-8010");
    assert!(!mongo, "27017 is not allowed");
}

/// Service traffic is judged after DNAT, against the backend pod and its target port.
#[test]
fn service_traffic_is_judged_against_the_backend() {
    let mut lab = app_lab("svcpolicy");
    lab.apply_yaml(
        "svc.yaml",
        "apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: app
spec:
  selector: {app: db}
  ports:
  - {name: mongo, port: 80, targetPort: mongo}
",
    );
    let vip = SocketAddr::from((lab.cluster_ip("db"), 80));
    let policy = |port: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: db-ingress
  namespace: app
spec:
  podSelector:
    matchLabels: {{app: db}}
  ingress:
  - from:
    - podSelector:
        matchLabels: {{app: probe}}
    ports:
    - port: {port}
"
        )
    };
    lab.apply_yaml("p.yaml", &policy("80"));
    assert!(
        !lab.in_pod("app/probe", move || tcp_connects(
            vip,
            Duration::from_millis(500)
        )),
        "a rule for the service port does not admit traffic to the target port"
    );
    lab.apply_yaml("p.yaml", &policy("mongo"));
    assert!(
        lab.in_pod("app/probe", move || tcp_connects(
            vip,
            Duration::from_secs(1)
        )),
        "the named target port admits the connection through the VIP"
    );
}

/// Replies to allowed connections pass even when the replying pod is isolated for egress.
#[test]
fn replies_pass_and_policy_is_stateful() {
    let mut lab = app_lab("stateful");
    lab.apply_yaml(
        "policy.yaml",
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: db-no-egress
  namespace: app
spec:
  podSelector:
    matchLabels: {app: db}
  policyTypes: [Egress]
",
    );
    let db = lab.pod_ip("app/db");
    let (tcp, udp) = lab.in_pod("app/probe", move || {
        (
            http_get((db, 27017).into()),
            udp_ask((db, 5353).into(), b"ping"),
        )
    });
    assert_eq!(tcp.expect("TCP request answered"), "db");
    assert_eq!(udp.expect("UDP echoed").0, "ping");
    let probe = lab.pod_ip("app/probe");
    assert!(
        !lab.in_pod("app/db", move || tcp_connects(
            (probe, 80).into(),
            Duration::from_millis(500)
        )),
        "new connections from db are denied"
    );
}

/// A 3,000-byte ping is fragmented at MTU 1500; every fragment of an allowed flow passes.
#[test]
fn fragmented_ping_between_allowed_pods_works() {
    let mut lab = app_lab("frag");
    lab.apply_yaml(
        "policy.yaml",
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: db-from-probe
  namespace: app
spec:
  podSelector:
    matchLabels: {app: db}
  ingress:
  - from:
    - podSelector:
        matchLabels: {app: probe}
",
    );
    let db = lab.pod_ip("app/db").to_string();
    let out = lab
        .lab
        .pod_command("app/probe", "ping")
        .unwrap()
        .args(["-c", "3", "-W", "2", "-s", "3000", &db])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ping -s 3000: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pod that sends from an address that is not its own is dropped (anti-spoofing).
#[test]
fn spoofed_sources_are_dropped() {
    let lab = app_lab("spoof");
    let spoofed = Ipv4Addr::new(10, 244, 1, 250);
    let add = lab
        .lab
        .pod_command("app/probe", "ip")
        .unwrap()
        .args(["addr", "add", &format!("{spoofed}/32"), "dev", "eth0"])
        .status()
        .unwrap();
    assert!(add.success(), "add a second address inside the pod");
    let db = SocketAddr::from((lab.pod_ip("app/db"), 5353));
    let (honest, forged) = lab.in_pod("app/probe", move || {
        let honest = udp_ask(db, b"honest").is_ok();
        let s = std::net::UdpSocket::bind((spoofed, 0)).unwrap();
        s.connect(db).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.send(b"forged").unwrap();
        let mut buf = [0u8; 64];
        (honest, s.recv(&mut buf).is_ok())
    });
    assert!(honest, "from its own address the pod is answered");
    assert!(!forged, "from a forged address nothing comes back");
}

/// The time from a policy change to enforcement on every affected endpoint, for 100
/// endpoints: the apply returns once the agent has realized the change; every endpoint is
/// then probed.
#[test]
fn a_policy_change_reaches_100_endpoints() {
    let mut lab = TestLab::up("hundred", ONE_NODE_LAB);
    lab.apply_yaml(
        "web.yaml",
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 100
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: agnhost
        ports:
        - {containerPort: 80}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  labels: {app: client}
spec:
  containers:
  - name: client
    image: netshoot
",
    );
    let targets: Vec<SocketAddr> = lab
        .pods_named("web-")
        .iter()
        .map(|p| SocketAddr::from((lab.pod_ip(p), 80)))
        .collect();
    assert_eq!(targets.len(), 100);
    let reachable = |lab: &TestLab, timeout: Duration| {
        let targets = targets.clone();
        lab.in_pod("default/client", move || {
            let handles: Vec<_> = targets
                .into_iter()
                .map(|t| std::thread::spawn(move || tcp_connects(t, timeout)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|ok| *ok)
                .count()
        })
    };
    assert_eq!(reachable(&lab, Duration::from_secs(2)), 100);

    let deny = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-deny
spec:
  podSelector:
    matchLabels: {app: web}
  policyTypes: [Ingress]
";
    let start = Instant::now();
    let report = lab.apply_yaml("deny.yaml", deny);
    let applied = start.elapsed();
    let open = reachable(&lab, Duration::from_millis(500));
    eprintln!(
        "deny on 100 endpoints: realized in {:?} (apply call {applied:?}); {open} still reachable",
        report.realized_in
    );
    assert_eq!(open, 0, "every endpoint enforces the new policy");

    let start = Instant::now();
    let report = lab.delete_yaml("deny.yaml", deny);
    let applied = start.elapsed();
    let open = reachable(&lab, Duration::from_secs(2));
    eprintln!(
        "delete on 100 endpoints: realized in {:?} (delete call {applied:?}); {open} reachable",
        report.realized_in
    );
    assert_eq!(open, 100, "every endpoint is open again");
}

/// A policy row written straight into the kernel is reported by verify and removed by the
/// periodic reconcile; the endpoint's traffic follows the desired policy again.
#[test]
fn a_wrong_policy_row_in_the_kernel_is_reported_and_repaired() {
    let mut lab = app_lab("policydrift");
    lab.apply_yaml("deny.yaml", DENY_EGRESS);
    let api = lab.client();
    let clean: sluice_api::VerifyReport = api.verify(sluice_api::VerifyRequest::default()).unwrap();
    assert!(clean.drift.is_empty(), "no drift: {:?}", clean.drift);

    // Allow probe -> db:27017 behind the agent's back.
    let probe_ip = lab.pod_ip("app/probe");
    let db_ip = lab.pod_ip("app/db");
    let maps = sluice_datapath::PinnedMaps::open(&lab.lab.pin_dir(&lab.node())).unwrap();
    let ifindex = maps
        .endpoints
        .iter()
        .map(|e| e.unwrap())
        .find(|(_, info)| info.ip() == probe_ip)
        .map(|(ifindex, _)| ifindex)
        .expect("probe's endpoint");
    let db_identity = maps
        .ipcache
        .get(
            &aya::maps::lpm_trie::Key::new(32, sluice_common::addr_be(db_ip)),
            0,
        )
        .unwrap()
        .identity;
    let mut inner = maps.policy.get(&ifindex, 0).expect("probe's policy map");
    let row = sluice_common::PolicyKey::ports(
        db_identity,
        sluice_common::POLICY_EGRESS,
        sluice_common::IPPROTO_TCP,
        27017,
        16,
    );
    inner
        .insert(
            &aya::maps::lpm_trie::Key::new(row.prefixlen, row.rule),
            sluice_common::PolicyEntry::default(),
            0,
        )
        .unwrap();
    let db = SocketAddr::from((db_ip, 27017));
    assert!(
        lab.in_pod("app/probe", move || tcp_connects(
            db,
            Duration::from_secs(1)
        )),
        "the forged row admits the connection"
    );

    let report: sluice_api::VerifyReport =
        api.verify(sluice_api::VerifyRequest::default()).unwrap();
    assert!(
        report
            .drift
            .iter()
            .any(|d| d.map == sluice_common::names::POLICY && d.key.contains("27017")),
        "verify names the forged row: {:?}",
        report.drift
    );

    let started = Instant::now();
    loop {
        let r: sluice_api::VerifyReport = api.verify(sluice_api::VerifyRequest::default()).unwrap();
        if r.drift.is_empty() {
            eprintln!(
                "periodic reconcile removed the forged row after {:?}",
                started.elapsed()
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not repaired: {:?}",
            r.drift
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !lab.in_pod("app/probe", move || tcp_connects(
            db,
            Duration::from_millis(500)
        )),
        "denied again once repaired"
    );
}

/// `endpoint list`, `identity list` and `policy get` show who is who and which rows admitted
/// traffic, with counters read from the kernel.
#[test]
fn debug_commands_show_endpoints_identities_and_row_counters() {
    let mut lab = app_lab("debugcmds");
    lab.apply_yaml(
        "policy.yaml",
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: db-from-probe
  namespace: app
spec:
  podSelector:
    matchLabels: {app: db}
  ingress:
  - from:
    - podSelector:
        matchLabels: {app: probe}
    ports:
    - {port: 8000, endPort: 8015}
",
    );
    let db = lab.pod_ip("app/db");
    assert!(lab.in_pod("app/probe", move || tcp_connects(
        (db, 8005).into(),
        Duration::from_secs(1)
    )));

    let endpoints = lab.cli_json(&["endpoint", "list"]);
    let db_endpoint = endpoints
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["pod"] == "db")
        .expect("db in endpoint list")
        .clone();
    assert_eq!(db_endpoint["ingress_enforced"], true);
    assert_eq!(db_endpoint["egress_enforced"], false);
    assert!(
        db_endpoint["labels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "k8s:app=db"),
        "{db_endpoint}"
    );
    let table = lab.cli(&["endpoint", "list"]);
    assert!(table.contains("app/db") || table.contains("db"), "{table}");

    let identities = lab.cli_json(&["identity", "list"]);
    let probe_identity = identities
        .as_array()
        .unwrap()
        .iter()
        .find(|i| {
            i["labels"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l == "k8s:app=probe")
        })
        .expect("probe's identity")["id"]
        .as_u64()
        .unwrap();
    let one = lab.cli_json(&["identity", "get", &probe_identity.to_string()]);
    assert_eq!(one["id"].as_u64(), Some(probe_identity));

    let policy = lab.cli_json(&["policy", "get", "app/db"]);
    let rows = policy["rows"].as_array().unwrap();
    let row = rows
        .iter()
        .find(|r| r["identity"].as_u64() == Some(probe_identity))
        .unwrap_or_else(|| panic!("a row for probe's identity: {policy}"));
    assert_eq!(row["direction"], "ingress");
    assert_eq!(row["protocol"], "TCP");
    assert_eq!(row["ports"], serde_json::json!([8000, 8015]));
    assert_eq!(row["allowed_by"], serde_json::json!(["app/db-from-probe"]));
    assert!(row["packets"].as_u64().unwrap() >= 1, "{row}");
    assert!(
        rows.iter()
            .any(|r| r["identity"] == 1 && r["allowed_by"] == serde_json::json!(["reserved:host"])),
        "the node's own row: {policy}"
    );
    let table = lab.cli(&["policy", "get", "app/db"]);
    assert!(table.contains("8000-8015/TCP"), "{table}");
}

/// A policy that needs more rows than the endpoint's map holds fails closed and is reported
/// by status and verify; it never leaves an empty or partial map.
#[test]
fn an_endpoint_whose_policy_does_not_fit_fails_closed_and_is_reported() {
    let mut lab = TestLab::up("overflow", &format!("{ONE_NODE_LAB}policyMapMax: 3\n"));
    lab.apply_yaml("app.yaml", APP);
    lab.apply_yaml(
        "policy.yaml",
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: many-ports
  namespace: app
spec:
  podSelector:
    matchLabels: {app: db}
  ingress:
  - from:
    - podSelector:
        matchLabels: {app: probe}
    ports:
    - {port: 27017}
    - {port: 8005}
    - {port: 8011}
    - {port: 5353, protocol: UDP}
",
    );
    let db = lab.pod_ip("app/db");
    assert!(
        !lab.in_pod("app/probe", move || tcp_connects(
            (db, 27017).into(),
            Duration::from_millis(500)
        )),
        "an allowed peer is still refused: the endpoint fails closed"
    );
    let status = lab.cli(&["status"]);
    assert!(status.to_lowercase().contains("fail"), "{status}");
    assert!(status.contains("app/db"), "{status}");

    let out = lab.cli_output(&["verify"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "verify: {text}");
    assert!(
        text.contains("FAILS CLOSED") && text.contains("app/db"),
        "{text}"
    );

    // The policy of the other pod fits, and it is enforced normally.
    let probe = lab.pod_ip("app/probe");
    assert!(
        lab.in_pod("app/db", move || tcp_connects(
            (probe, 80).into(),
            Duration::from_secs(1)
        )),
        "probe is not selected and accepts connections"
    );
}

/// Kubernetes requires that a pod's own node reaches it whatever the policy (kubelet probes).
#[test]
fn the_pods_own_node_reaches_an_isolated_pod() {
    let mut lab = app_lab("fromnode");
    lab.apply_yaml(
        "deny.yaml",
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-all
  namespace: app
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
",
    );
    let db = SocketAddr::from((lab.pod_ip("app/db"), 27017));
    assert!(
        !lab.in_pod("app/probe", move || tcp_connects(
            db,
            Duration::from_millis(500)
        )),
        "pods are isolated"
    );
    let node = lab.lab.node_netns(&lab.node());
    assert_eq!(
        sluice_integration::in_netns(&node, move || http_get(db)).expect("node -> pod"),
        "db"
    );
}

/// Rewriting an endpoint's policy swaps in a complete map: a connection its policy allows
/// throughout never fails while the policy is rewritten over and over.
#[test]
fn rewriting_a_policy_never_opens_a_window_of_denial() {
    let mut lab = app_lab("atomicswap");
    let policy = |extra_port: u16| {
        format!(
            "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: db-ingress
  namespace: app
spec:
  podSelector:
    matchLabels: {{app: db}}
  ingress:
  - from:
    - podSelector:
        matchLabels: {{app: probe}}
    ports:
    - {{port: 27017}}
    - {{port: {extra_port}}}
"
        )
    };
    lab.apply_yaml("p.yaml", &policy(9000));
    let db = SocketAddr::from((lab.pod_ip("app/db"), 27017));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_probe = stop.clone();
    let netns = lab.lab.pod_netns("app/probe").unwrap();
    let prober = std::thread::spawn(move || {
        sluice_integration::in_netns(&netns, move || {
            let (mut ok, mut failed) = (0u32, 0u32);
            while !stop_probe.load(std::sync::atomic::Ordering::Relaxed) {
                match TcpStream::connect_timeout(&db, Duration::from_millis(500)) {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        })
    });
    for i in 0..20u16 {
        lab.apply_yaml("p.yaml", &policy(9001 + i));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = prober.join().unwrap();
    let denied = policy_drops(&lab, sluice_common::METRIC_DIR_INGRESS);
    eprintln!(
        "20 policy rewrites: {ok} connections succeeded, {failed} failed, {denied} packets denied by policy"
    );
    assert!(ok > 20, "the probe ran throughout ({ok})");
    // A connect can also time out when the pod server's accept queue overflows under this
    // loop; what must never happen is a policy verdict against an allowed connection.
    assert_eq!(denied, 0, "no packet was denied during the rewrites");
    assert!(
        failed <= ok / 100,
        "{failed} of {} connections failed",
        ok + failed
    );
}

/// Packets dropped in `direction` because policy denied them or was not realized.
fn policy_drops(lab: &TestLab, direction: u32) -> u64 {
    let maps = sluice_datapath::PinnedMaps::open(&lab.lab.pin_dir(&lab.node())).unwrap();
    [
        sluice_common::DropReason::Policy,
        sluice_common::DropReason::PolicyUnavailable,
    ]
    .into_iter()
    .map(|reason| {
        let index = sluice_common::metrics_index(reason.code(), direction);
        maps.metrics
            .get(&index, 0)
            .unwrap()
            .iter()
            .map(|v| v.packets)
            .sum::<u64>()
    })
    .sum()
}
