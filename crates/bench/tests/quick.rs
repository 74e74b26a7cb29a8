//! CI smoke test of the benchmark (needs root; never skipped): quick mode with tiny
//! durations. It checks only that every variant produced numbers and that the traffic went
//! through the variant under test; it asserts no timing.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sluice_bench::{Config, Variant, report};

#[test]
fn quick_matrix_produces_numbers_through_every_variant() {
    let mut config = Config::quick();
    config.services = vec![1, 1_000];
    config.durations.rr = Duration::from_millis(200);
    config.durations.crr = Duration::from_millis(200);
    config.durations.stream = Duration::from_millis(100);
    config.convergence_endpoints = Some(100);
    // The agent is found as $SLUICE_AGENT_BIN or next to the test's target directory
    // (scripts/test.sh builds every binary first); missing, the run fails and says so.
    if let Some(load) = config.agent.as_mut() {
        load.services = 10;
        load.rate = 1_000.0;
        load.duration = Duration::from_millis(500);
    }
    let results = sluice_bench::run(&config, &mut |line| eprintln!("{line}")).unwrap();

    for &n in &config.services {
        for variant in Variant::ALL {
            let sample = results
                .samples
                .iter()
                .find(|s| s.services == n && s.variant == variant)
                .unwrap_or_else(|| panic!("no sample for {} at N={n}", variant.name()));
            let what = format!("{} at N={n}", variant.name());
            assert!(sample.rr.per_sec > 0.0, "{what}: no transactions");
            assert!(sample.crr.per_sec > 0.0, "{what}: no new connections");
            assert!(sample.stream_gbps > 0.0, "{what}: no stream");
            assert!(
                sample.proof.count > 0,
                "{what}: no traffic through it: {:?}",
                sample.proof
            );
            match variant {
                Variant::Bare => assert!(sample.program.is_none()),
                Variant::Sluice => {
                    let bpf = sample.bpf_rr.expect("BPF run-time stats");
                    assert!(
                        bpf.runs > 0 && bpf.from_container_ns > 0.0,
                        "{what}: {bpf:?}"
                    );
                    assert!(sample.program.is_some() && sample.incremental.is_some());
                }
                Variant::Iptables | Variant::Nftables => {
                    assert!(sample.program.is_some() && sample.incremental.is_some());
                }
            }
        }
    }
    for variant in sluice_bench::crossnode::CrossVariant::ALL {
        let sample = results
            .cross_node
            .iter()
            .find(|s| s.variant == variant)
            .unwrap_or_else(|| panic!("no sample for {}", variant.name()));
        let what = variant.name();
        assert!(sample.rr.per_sec > 0.0, "{what}: no transactions");
        assert!(sample.crr.per_sec > 0.0, "{what}: no new connections");
        assert!(sample.stream_gbps > 0.0, "{what}: no stream");
        assert!(sample.proof > 0, "{what}: no traffic through it");
        if variant == sluice_bench::crossnode::CrossVariant::Bare {
            assert!(sample.cost_rr.is_none());
        } else {
            let cost = sample.cost_rr.as_ref().expect("BPF run-time stats");
            assert!(cost.per_packet_ns > 0.0, "{what}: {cost:?}");
            // Tunnel traffic must have been decapsulated by from_tunnel; native never is.
            let decapsulated = cost
                .programs
                .contains_key(sluice_common::programs::FROM_TUNNEL);
            assert_eq!(
                decapsulated,
                variant == sluice_bench::crossnode::CrossVariant::Tunnel,
                "{what}: {cost:?}"
            );
        }
    }
    let convergence = results.convergence.expect("policy convergence measured");
    assert_eq!(convergence.endpoints, 100);
    let agent = results.agent.expect("agent cost measured");
    assert!(agent.achieved.per_sec > 0.0 && agent.rss_kib > 0);

    let dir = std::env::temp_dir().join(format!("sluice-bench-quick-{}", std::process::id()));
    report::write(&results, &config, &dir, "quick.rs").unwrap();
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(md.contains("## Summary: ratios to the bare path"));
    assert!(md.contains("## Across nodes"));
}
