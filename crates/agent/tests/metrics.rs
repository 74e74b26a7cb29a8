//! The metrics endpoint's families, read from a real loaded datapath (needs root and
//! bpffs; never skipped).

use std::net::Ipv4Addr;

use aya::maps::PerCpuValues;
use sluice_agent::metrics::{Metrics, Removal};
use sluice_common::{
    CT_EGRESS, Ct4Entry, Ct4Key, DropReason, EVENT_DROP, EVENT_POLICY_VERDICT, EventCounter,
    IPPROTO_TCP, METRIC_DIR_EGRESS, METRIC_DIR_INGRESS, MetricsValue, event_counter_index,
    metrics_index,
};
use sluice_datapath::{Datapath, DatapathConfig, PinDir, PinnedMaps};

/// `value` on the first CPU, zero on the others: the sum is what a scrape must show.
fn on_cpu0<T: aya::Pod + Default>(value: T) -> PerCpuValues<T> {
    let cpus = aya::util::nr_cpus().unwrap_or_else(|(call, e)| panic!("{call}: {e}"));
    let mut values = vec![T::default(); cpus];
    values[0] = value;
    PerCpuValues::try_from(values).unwrap_or_else(|e| panic!("per-CPU values: {e}"))
}

#[test]
fn scrape_reads_the_kernel_maps() {
    let pins = PinDir::unique("sluice-test-metrics-");
    let config = DatapathConfig {
        ct_max_entries: 4096,
        ..DatapathConfig::default()
    };
    let _datapath = Datapath::load(pins.path(), &config)
        .unwrap_or_else(|e| panic!("loading the datapath into {}: {e}", pins.path().display()));
    let mut maps = PinnedMaps::open(pins.path()).expect("open pinned maps");

    let set = |maps: &mut PinnedMaps, reason: u8, dir: u32, packets: u64, bytes: u64| {
        maps.metrics
            .set(
                metrics_index(reason, dir),
                on_cpu0(MetricsValue { packets, bytes }),
                0,
            )
            .expect("write metrics");
    };
    set(&mut maps, 0, METRIC_DIR_EGRESS, 10, 1000);
    set(&mut maps, 0, METRIC_DIR_INGRESS, 8, 800);
    set(
        &mut maps,
        DropReason::Policy.code(),
        METRIC_DIR_INGRESS,
        3,
        180,
    );
    set(
        &mut maps,
        DropReason::PolicyUnavailable.code(),
        METRIC_DIR_INGRESS,
        1,
        60,
    );
    maps.event_counters
        .set(
            event_counter_index(EVENT_POLICY_VERDICT, METRIC_DIR_INGRESS),
            on_cpu0(EventCounter {
                emitted: 5,
                suppressed: 2,
                lost: 1,
            }),
            0,
        )
        .expect("write event counters");
    maps.event_counters
        .set(
            event_counter_index(EVENT_DROP, METRIC_DIR_INGRESS),
            on_cpu0(EventCounter {
                emitted: 4,
                suppressed: 0,
                lost: 0,
            }),
            0,
        )
        .expect("write event counters");
    for port in [40_000, 40_001] {
        let key = Ct4Key::new(
            (Ipv4Addr::new(10, 0, 1, 2), port),
            (Ipv4Addr::new(10, 0, 2, 2), 80),
            IPPROTO_TCP,
            CT_EGRESS,
        );
        maps.conntrack
            .insert(key, Ct4Entry::default(), 0)
            .expect("write conntrack");
    }

    let metrics = Metrics::default();
    metrics.observe_reconcile(std::time::Duration::from_millis(12), true);
    metrics.observe_ct_gc(std::time::Duration::from_millis(3), Removal::Expired, 5);
    metrics.count_ct_removed(Removal::BackendRemoved, 2);
    // Nothing counted by a reconcile loop: every map is counted for the scrape.
    let text = metrics.render(&maps, &[]).expect("render");
    for line in [
        "sluice_forward_packets_total{direction=\"egress\"} 10",
        "sluice_forward_bytes_total{direction=\"ingress\"} 800",
        "sluice_drop_packets_total{reason=\"POLICY_DENIED\",direction=\"ingress\"} 3",
        "sluice_drop_bytes_total{reason=\"POLICY_DENIED\",direction=\"ingress\"} 180",
        "sluice_drop_packets_total{reason=\"POLICY_UNAVAILABLE\",direction=\"ingress\"} 1",
        "sluice_drop_packets_total{reason=\"INVALID_SOURCE_IP\",direction=\"egress\"} 0",
        // 8 verdicts offered to the event path, 4 of them denied (133 and 212).
        "sluice_policy_verdicts_total{direction=\"ingress\",verdict=\"allowed\"} 4",
        "sluice_policy_verdicts_total{direction=\"ingress\",verdict=\"denied\"} 4",
        "sluice_events_total{type=\"policy-verdict\",direction=\"ingress\",outcome=\"emitted\"} 5",
        "sluice_events_total{type=\"policy-verdict\",direction=\"ingress\",outcome=\"suppressed\"} 2",
        "sluice_events_total{type=\"policy-verdict\",direction=\"ingress\",outcome=\"lost\"} 1",
        "sluice_events_total{type=\"drop\",direction=\"ingress\",outcome=\"emitted\"} 4",
        "sluice_conntrack_entries 2",
        // 2 of 4096.
        "sluice_conntrack_fill_ratio 0.00048828125",
        "sluice_conntrack_gc_runs_total 1",
        "sluice_conntrack_gc_duration_seconds_count 1",
        "sluice_conntrack_gc_deleted_total{reason=\"expired\"} 5",
        "sluice_conntrack_gc_deleted_total{reason=\"backend_removed\"} 2",
        "sluice_map_entries{map=\"ct4\"} 2",
        "sluice_map_capacity{map=\"ct4\"} 4096",
        "sluice_map_capacity{map=\"policy\"} 4096",
        "sluice_map_entries{map=\"lb4_services\"} 0",
        "sluice_endpoints 0",
        "sluice_reconcile_duration_seconds_count 1",
        "sluice_reconcile_errors_total 0",
        "sluice_build_info{version=\"",
        "# EOF",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}
