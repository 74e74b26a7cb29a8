//! CI smoke test of the benchmark (needs root; never skipped): quick mode with tiny
//! durations. It checks only that every variant (same node, across nodes, NodePort and
//! LoadBalancer from a world host) produced numbers and that the traffic went through the
//! variant under test; it asserts no timing.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sluice_bench::{
    Config, Variant,
    external::{self, ExternalSample, Forwarding, Frontend},
    report,
};

#[test]
fn quick_matrix_produces_numbers_through_every_variant() {
    let mut config = Config::quick();
    config.services = vec![1, 1_000];
    config.external_services = vec![1, 1_000];
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
                    // The pod client's connections went to the backend at the socket:
                    // no service entry, so fewer entries per connection than the
                    // per-packet ClusterIP path's egress, ingress and service entries.
                    let per_packet = sample.per_packet.expect("the per-packet row");
                    let socket_lb = sample.ct_per_connection.expect("conntrack counted");
                    assert!(per_packet.crr.per_sec > 0.0, "{what}: {per_packet:?}");
                    assert!(
                        socket_lb + 0.5 < per_packet.ct_per_connection,
                        "{what}: {socket_lb:.2} entries per socket-LB connection, {:.2} per \
                         per-packet one",
                        per_packet.ct_per_connection
                    );
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
            // Tunnel traffic is decapsulated by from_netdev itself: the tunnel device's
            // from_tunnel sees stray packets at most (a neighbour not yet resolved).
            let runs = |program| cost.programs.get(program).map_or(0, |(_, runs)| *runs);
            let by_device = runs(sluice_common::programs::FROM_TUNNEL);
            assert!(
                by_device * 10 <= runs(sluice_common::programs::FROM_NETDEV),
                "{what}: {cost:?}"
            );
        }
    }
    for &n in &config.external_services {
        check_external(&results.external, n);
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
    assert!(md.contains("## NodePort and LoadBalancer"));
}

/// Every variant at `n` services reached the pod from the world host, through each
/// frontend (bare: straight), and the frontend's own count saw the connections.
fn check_external(samples: &[ExternalSample], n: usize) {
    use sluice_common::programs::{FROM_CONTAINER, FROM_NETDEV, FROM_TUNNEL};
    for variant in Variant::ALL {
        let frontends: Vec<Option<Frontend>> = match variant {
            Variant::Bare => vec![None],
            _ => Frontend::ALL.into_iter().map(Some).collect(),
        };
        let forwardings = match variant {
            Variant::Sluice => Forwarding::ALL.into_iter().map(Some).collect(),
            _ => vec![None],
        };
        for (frontend, forwarding) in frontends
            .iter()
            .flat_map(|f| forwardings.iter().map(move |r| (*f, *r)))
        {
            let what = external::label(variant, forwarding, frontend) + &format!(" at N={n}");
            let sample = samples
                .iter()
                .find(|s| {
                    (s.services, s.variant, s.forwarding, s.frontend)
                        == (n, variant, forwarding, frontend)
                })
                .unwrap_or_else(|| panic!("no sample for {what}"));
            assert!(sample.rr.per_sec > 0.0, "{what}: no transactions");
            assert!(sample.crr.per_sec > 0.0, "{what}: no new connections");
            assert!(sample.stream_gbps > 0.0, "{what}: no stream");
            assert!(
                sample.proof > 0,
                "{what}: no connection counted by {}",
                sample.proof_what
            );
            assert_eq!(sample.program.is_some(), variant != Variant::Bare, "{what}");
            if variant == Variant::Sluice {
                // node-a's from_netdev translated the requests, node-b's pod veth saw them.
                let cost = sample.cost_rr.as_ref().expect("BPF run-time stats");
                let ran = |node: &str, program: &str| {
                    cost.programs
                        .iter()
                        .any(|p| p.node == node && p.program == program && p.runs > 0)
                };
                for (node, program) in [("node-a", FROM_NETDEV), ("node-b", FROM_CONTAINER)] {
                    assert!(
                        ran(node, program),
                        "{what}: {node} {program} never ran: {cost:?}"
                    );
                }
                // node-b's from_netdev takes the packets in either mode, decapsulating
                // VXLAN itself: the tunnel device's from_tunnel sees stray ones at most.
                let runs = |node: &str, program: &str| {
                    cost.programs
                        .iter()
                        .filter(|p| p.node == node && p.program == program)
                        .map(|p| p.runs)
                        .sum::<u64>()
                };
                assert!(
                    runs("node-b", FROM_TUNNEL) * 10 <= runs("node-b", FROM_NETDEV),
                    "{what}: {cost:?}"
                );
            } else {
                assert!(sample.cost_rr.is_none(), "{what}");
            }
        }
    }
}
