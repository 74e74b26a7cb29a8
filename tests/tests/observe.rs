//! Flow observability end to end: seed 003's policy scenario seen through `sluice observe`,
//! `policy get`, the Prometheus endpoint and the policy action log; and a connection load
//! test in which every connection is either an event or a counted suppression.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failed step must fail the test loudly"
)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_integration::{TestLab, examples, http_get};

const OBSERVED_LAB: &str = "apiVersion: sluice.dev/v1alpha1
kind: Lab
serviceCIDR: 10.96.0.0/16
txChecksumOffload: false
nodes:
  - name: node-1
    podCIDR: 10.244.1.0/24
observability: {metrics: true, policyLog: all}
";

fn seed_lab(prefix: &str) -> TestLab {
    let mut lab = TestLab::up(prefix, OBSERVED_LAB);
    lab.lab
        .apply(&[
            examples().join("nginx.yaml"),
            examples().join("client.yaml"),
            examples().join("policy.yaml"),
        ])
        .unwrap_or_else(|e| panic!("apply the seed's scenario: {e}"));
    lab
}

/// The flows the agent holds, as `sluice observe -o json` prints them.
fn observe(lab: &TestLab, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["observe", "--last", "1000", "-o", "json"];
    all.extend(args);
    lab.cli(&all)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| v["flow"].clone())
        .collect()
}

fn has_label(endpoint: &serde_json::Value, label: &str) -> bool {
    endpoint["labels"]
        .as_array()
        .is_some_and(|ls| ls.iter().any(|l| l == label))
}

/// Seed 003: nginx accepts ingress only from role=frontend. The frontend gets 200, the other
/// client times out, and every observability surface tells why.
#[test]
fn seed_003_policy_drop_is_visible_everywhere() {
    let lab = seed_lab("seed003");
    let vip = SocketAddr::from((lab.cluster_ip("nginx-service"), 80));
    let answer = lab.in_pod("default/frontend", move || http_get(vip));
    assert!(
        answer
            .expect("the frontend is answered")
            .starts_with("nginx"),
        "answered by an nginx pod"
    );
    let denied = lab.in_pod("default/client", move || {
        TcpStream::connect_timeout(&vip, Duration::from_secs(1))
    });
    assert_eq!(
        denied.expect_err("the client times out").kind(),
        std::io::ErrorKind::TimedOut
    );

    // observe: the DROPPED flow with its reason and both identities with their labels.
    let deadline = Instant::now() + Duration::from_secs(5);
    let drop = loop {
        let flows = observe(
            &lab,
            &["--verdict", "DROPPED", "--from-pod", "default/client"],
        );
        if let Some(f) = flows
            .into_iter()
            .find(|f| f["drop_reason_desc"] == "POLICY_DENIED")
        {
            break f;
        }
        assert!(Instant::now() < deadline, "no POLICY_DENIED flow observed");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("observed: {drop}");
    assert_eq!(drop["verdict"], "DROPPED");
    assert_eq!(drop["traffic_direction"], "INGRESS");
    assert_eq!(drop["source"]["pod_name"], "client");
    assert_eq!(drop["source"]["namespace"], "default");
    assert!(has_label(&drop["source"], "k8s:app=client"), "{drop}");
    assert!(drop["source"]["identity"].as_u64().unwrap() >= 256);
    assert!(
        drop["destination"]["pod_name"]
            .as_str()
            .unwrap()
            .starts_with("nginx-deployment-")
    );
    assert!(has_label(&drop["destination"], "k8s:app=nginx"), "{drop}");
    assert_eq!(drop["l4"]["TCP"]["destination_port"], 80);
    let compact = lab.cli(&["observe", "--last", "1000", "--verdict", "DROPPED"]);
    assert!(compact.contains("Policy denied"), "{compact}");

    // The allowed connection's verdict names the policy that allowed it.
    let allowed = observe(
        &lab,
        &["--type", "policy-verdict", "--from-pod", "default/frontend"],
    );
    assert!(
        allowed
            .iter()
            .any(|f| f["ingress_allowed_by"][0]["name"] == "nginx-from-frontend"),
        "{allowed:?}"
    );

    // policy get: the frontend row of one of the nginx endpoints counted the connection.
    let counted: u64 = lab
        .pods_named("nginx-deployment")
        .iter()
        .map(|pod| {
            let policy = lab.cli_json(&["policy", "get", pod]);
            policy["rows"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| {
                    r["identity_labels"]
                        .as_array()
                        .is_some_and(|ls| ls.iter().any(|l| l == "k8s:role=frontend"))
                })
                .map(|r| r["packets"].as_u64().unwrap())
                .sum::<u64>()
        })
        .sum();
    assert!(counted >= 1, "the frontend row counted its connection");

    // Metrics: the drop, by reason and direction.
    let metrics = lab.lab.scrape_metrics(&lab.node()).expect("scrape metrics");
    let dropped = metrics
        .lines()
        .find(|l| {
            l.starts_with("sluice_drop_packets_total")
                && l.contains("POLICY_DENIED")
                && l.contains("ingress")
        })
        .unwrap_or_else(|| panic!("no policy drop in the metrics:\n{metrics}"));
    let value: f64 = dropped.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value >= 1.0, "{dropped}");
    assert!(metrics.contains("sluice_build_info"), "build info");

    // The deny log has the entry (the writer flushes asynchronously).
    let log = lab.lab.policy_log(&lab.node());
    let deadline = Instant::now() + Duration::from_secs(5);
    let client_ip = lab.pod_ip("default/client").to_string();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let entry = text.lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["disposition"] == "deny" && v["connection"]["src_ip"] == client_ip.as_str())
                .then_some(v)
        });
        if let Some(entry) = entry {
            eprintln!("policy log: {entry}");
            assert_eq!(entry["src"]["pod_name"], "client");
            assert_eq!(entry["connection"]["dest_port"], 80);
            assert!(
                text.lines()
                    .any(|l| l.contains("\"allow\"") && l.contains("nginx-from-frontend")),
                "the allowed connection is logged with its policy:\n{text}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no deny entry in {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sums the kernel's event counters for one event type and direction.
fn event_counts(lab: &TestLab, type_: u8, direction: u32) -> (u64, u64, u64) {
    let maps = sluice_datapath::PinnedMaps::open(&lab.lab.pin_dir(&lab.node())).unwrap();
    let index = sluice_common::event_counter_index(type_, direction);
    maps.event_counters
        .get(&index, 0)
        .unwrap()
        .iter()
        .fold((0, 0, 0), |(e, s, l), c| {
            (e + c.emitted, s + c.suppressed, l + c.lost)
        })
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// 5,000 short connections per second for 10 s through a service with observation on:
/// every connection is one trace event at the client, emitted or counted as suppressed.
#[test]
fn every_connection_under_load_is_an_event_or_a_counted_suppression() {
    let lab = seed_lab("load");
    let vip = SocketAddr::from((lab.cluster_ip("nginx-service"), 80));
    let agent = lab.agent_pids()[0];
    let (before_emitted, before_suppressed, before_lost) = event_counts(
        &lab,
        sluice_common::EVENT_TRACE,
        sluice_common::METRIC_DIR_EGRESS,
    );
    let ticks_before = cpu_ticks(agent);
    let rate: u64 = 5_000;
    let seconds: u64 = 10;
    let threads: u64 = 8;
    let attempts = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    {
        let attempts = attempts.clone();
        let failures = failures.clone();
        lab.in_pod("default/frontend", move || {
            std::thread::scope(|scope| {
                for t in 0..threads {
                    let attempts = attempts.clone();
                    let failures = failures.clone();
                    scope.spawn(move || {
                        let per_thread = rate / threads;
                        let interval = Duration::from_secs(1) / per_thread as u32;
                        let begin = Instant::now() + interval * t as u32 / threads as u32;
                        for i in 0..per_thread * seconds {
                            let due = begin + interval * i as u32;
                            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                            attempts.fetch_add(1, Ordering::Relaxed);
                            let ok = TcpStream::connect_timeout(&vip, Duration::from_secs(2))
                                .and_then(|mut s| {
                                    s.write_all(b"x")?;
                                    // The pod server echoes the byte.
                                    let mut echo = [0u8; 1];
                                    s.read_exact(&mut echo)?;
                                    // Close with a RST: 50,000 TIME_WAIT sockets would use up
                                    // the client's ephemeral ports.
                                    nix::sys::socket::setsockopt(
                                        &s,
                                        nix::sys::socket::sockopt::Linger,
                                        &nix::libc::linger {
                                            l_onoff: 1,
                                            l_linger: 0,
                                        },
                                    )
                                    .map_err(std::io::Error::from)
                                })
                                .is_ok();
                            if !ok {
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
        });
    }
    let elapsed = started.elapsed();
    // Let the agent drain its ring (it does every 100 ms).
    std::thread::sleep(Duration::from_millis(500));
    let ticks = cpu_ticks(agent) - ticks_before;
    let (emitted, suppressed, lost) = event_counts(
        &lab,
        sluice_common::EVENT_TRACE,
        sluice_common::METRIC_DIR_EGRESS,
    );
    let (emitted, suppressed, lost) = (
        emitted - before_emitted,
        suppressed - before_suppressed,
        lost - before_lost,
    );
    let connections = attempts.load(Ordering::Relaxed);
    let ticks_per_second = 100.0; // USER_HZ on Linux
    eprintln!(
        "{connections} connections in {elapsed:?} ({:.0}/s), {} failed; trace events: {emitted} emitted, \
         {suppressed} suppressed, {lost} lost; agent CPU {:.1}% of a core",
        connections as f64 / elapsed.as_secs_f64(),
        failures.load(Ordering::Relaxed),
        ticks as f64 / ticks_per_second / (elapsed.as_secs_f64() + 0.5) * 100.0
    );
    assert_eq!(
        emitted + suppressed + lost,
        connections,
        "every connection is an event or a counted suppression"
    );
}
