use super::*;

#[test]
fn a_denied_connection_is_logged_once_however_often_its_client_retries() {
    let mut denials = RecentDenials::default();
    let start = Instant::now();
    let connection = entry(false).connection;
    assert!(denials.first(&connection, start));
    assert!(!denials.first(&connection, start + Duration::from_secs(1)));
    assert!(!denials.first(&connection, start + Duration::from_secs(3)));
    let other = Connection {
        src_port: 40_001,
        ..connection.clone()
    };
    assert!(denials.first(&other, start + Duration::from_secs(3)));
    // Long after, the same tuple is another connection.
    assert!(denials.first(&connection, start + Duration::from_secs(60)));
}

fn entry(allowed: bool) -> PolicyLogEntry {
    PolicyLogEntry {
        connection: Connection {
            src_ip: Ipv4Addr::new(10, 0, 0, 5),
            dest_ip: Ipv4Addr::new(10, 0, 0, 9),
            src_port: 40_000,
            dest_port: 80,
            protocol: "tcp".into(),
            direction: "ingress",
        },
        disposition: if allowed { "allow" } else { "deny" },
        policies: if allowed {
            vec![PolicyRef {
                name: "allow-frontend".into(),
                namespace: "default".into(),
            }]
        } else {
            Vec::new()
        },
        reason: (!allowed).then_some("default deny"),
        src: Peer::pod("default", "client"),
        dest: Peer::pod("default", "nginx-1"),
        node_name: "node-a".into(),
        timestamp: "2020-06-16T03:10:37.993712906Z".into(),
    }
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sluice-policy-log-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Self(dir)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn config(dir: &Path, max_size: u64, rate: u32) -> PolicyLogConfig {
    PolicyLogConfig {
        mode: PolicyLogMode::All,
        path: dir.join("nodes/a/policy_action.log"),
        max_size,
        max_files: 3,
        rate,
    }
}

#[test]
fn lines_have_gkes_shape() {
    let allow = serde_json::to_string(&entry(true)).expect("json");
    assert_eq!(
        allow,
        r#"{"connection":{"src_ip":"10.0.0.5","dest_ip":"10.0.0.9","src_port":40000,"dest_port":80,"protocol":"tcp","direction":"ingress"},"disposition":"allow","policies":[{"name":"allow-frontend","namespace":"default"}],"src":{"pod_name":"client","pod_namespace":"default","namespace":"default"},"dest":{"pod_name":"nginx-1","pod_namespace":"default","namespace":"default"},"node_name":"node-a","timestamp":"2020-06-16T03:10:37.993712906Z"}"#
    );
    let deny = serde_json::to_value(entry(false)).expect("json");
    assert_eq!(deny["disposition"], "deny");
    assert_eq!(deny["policies"], serde_json::json!([]));
    assert_eq!(deny["reason"], "default deny");
    let world = serde_json::to_value(Peer::instance(Ipv4Addr::new(192, 0, 2, 1))).expect("json");
    assert_eq!(world, serde_json::json!({"instance": "192.0.2.1"}));
}

fn verdict_flow(denied: bool) -> Flow {
    let flow = serde_json::json!({
        "time": "2026-11-30T10:00:00.000000001Z",
        "verdict": if denied { "DROPPED" } else { "FORWARDED" },
        "drop_reason": if denied { 133 } else { 0 },
        "IP": {"source": "10.0.0.5", "destination": "10.0.0.9", "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 40000, "destination_port": 80}},
        "source": {"identity": 300, "namespace": "default", "pod_name": "client"},
        "destination": {"identity": 301, "namespace": "default", "pod_name": "nginx-1"},
        "Type": "L3_L4",
        "node_name": "node-a",
        "event_type": {"type": 5, "sub_type": 0},
        "traffic_direction": "INGRESS",
        "is_reply": false,
        "ingress_allowed_by": if denied {
            serde_json::json!([])
        } else {
            serde_json::json!([{"name": "allow-frontend", "namespace": "default",
                                 "kind": "NetworkPolicy"}])
        },
        "Summary": "TCP Flags: SYN",
    });
    serde_json::from_value(flow).expect("flow")
}

#[test]
fn entries_come_from_policy_verdict_flows() {
    let allow = PolicyLogEntry::from_flow(&verdict_flow(false)).expect("a verdict");
    assert_eq!(
        allow,
        PolicyLogEntry {
            timestamp: "2026-11-30T10:00:00.000000001Z".into(),
            ..entry(true)
        }
    );
    let deny = PolicyLogEntry::from_flow(&verdict_flow(true)).expect("a verdict");
    assert_eq!(deny.disposition, "deny");
    assert_eq!(deny.reason, Some("default deny"));
    assert!(deny.policies.is_empty());

    let mut world = verdict_flow(true);
    world.source = Endpoint::default();
    let entry = PolicyLogEntry::from_flow(&world).expect("a verdict");
    assert_eq!(entry.src, Peer::instance(Ipv4Addr::new(10, 0, 0, 5)));

    let mut trace = verdict_flow(false);
    trace.event_type.event_type = sluice_api::flow::EVENT_TYPE_TRACE;
    assert_eq!(PolicyLogEntry::from_flow(&trace), None);
}

#[test]
fn mode_selects_dispositions() {
    assert_eq!("deny".parse(), Ok(PolicyLogMode::Deny));
    assert!("sometimes".parse::<PolicyLogMode>().is_err());
    let dir = TempDir::new("mode");
    let mut cfg = config(&dir.0, 1 << 20, 0);
    cfg.mode = PolicyLogMode::Deny;
    let logger = PolicyLogger::start(&cfg, Counter::default()).expect("start");
    assert!(logger.wants(false));
    assert!(!logger.wants(true));
    logger.close();
}

#[test]
fn rotates_at_the_size_limit_and_keeps_max_files() {
    let dir = TempDir::new("rotate");
    let line_len = serde_json::to_string(&entry(true)).expect("json").len() as u64 + 1;
    // Two lines per file.
    let cfg = config(&dir.0, line_len * 2, 0);
    let suppressed = Counter::default();
    let mut logger = PolicyLogger::start(&cfg, suppressed.clone()).expect("start");
    let now = Instant::now();
    for _ in 0..9 {
        logger.log(&entry(true), now);
    }
    logger.close();
    assert_eq!(suppressed.get(), 0);
    let lines = |p: &Path| {
        fs::read_to_string(p)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    // 9 lines: 4 full files were written, only 3 are kept (the oldest 2 lines gone).
    assert_eq!(lines(&cfg.path), 1);
    assert_eq!(lines(&rotated(&cfg.path, 1)), 2);
    assert_eq!(lines(&rotated(&cfg.path, 2)), 2);
    assert!(!rotated(&cfg.path, 3).exists());
    for path in [cfg.path.clone(), rotated(&cfg.path, 1)] {
        for line in fs::read_to_string(&path).expect("read").lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("one JSON per line");
            assert_eq!(v["disposition"], "allow");
        }
        assert!(fs::metadata(&path).expect("stat").len() <= cfg.max_size);
    }
}

#[test]
fn rate_limit_counts_suppressed_lines() {
    let dir = TempDir::new("rate");
    let cfg = config(&dir.0, 1 << 20, 10);
    let suppressed = Counter::default();
    let mut logger = PolicyLogger::start(&cfg, suppressed.clone()).expect("start");
    let start = Instant::now();
    // A burst of 25 at once: the bucket holds 10.
    for _ in 0..25 {
        logger.log(&entry(false), start);
    }
    // Half a second later, 5 more tokens.
    for _ in 0..10 {
        logger.log(&entry(false), start + Duration::from_millis(500));
    }
    logger.suppress(3);
    logger.close();
    let written = fs::read_to_string(&cfg.path).expect("read").lines().count() as u64;
    assert_eq!(written, 15);
    assert_eq!(suppressed.get(), 15 + 5 + 3);
    assert_eq!(written + suppressed.get(), 35 + 3);
}
