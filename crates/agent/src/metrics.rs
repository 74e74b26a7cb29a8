//! Prometheus metrics, in the text exposition format.
//!
//! Datapath figures are read from the kernel maps at scrape time, never mirrored in the
//! agent: the maps are the truth, so a restarted agent or a map changed behind its back
//! cannot make the figures drift. Only what happens in the agent itself (reconcile passes,
//! suppressed policy log lines) is counted here.

use std::{fmt, time::Duration};

use aya::maps::{MapData, PerCpuArray};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge,
        histogram::Histogram, info::Info,
    },
    registry::{Registry, Unit},
};
use sluice_common::{
    CtStats, DropReason, EVENT_CLOSE, EVENT_DROP, EVENT_POLICY_VERDICT, EVENT_TRACE, EventCounter,
    METRIC_DIR_EGRESS, METRIC_DIR_INGRESS, MapId, MetricsValue, event_counter_index, metrics_index,
    names, registry,
};
use sluice_datapath::{MigratedMap, PinnedMaps};

/// Why the agent removed conntrack entries: the label of `sluice_conntrack_gc_deleted`.
pub use crate::conntrack::Removal;
use crate::{AgentError, faults::Repairs, source::kubernetes::SourceStats};

/// Content type of [`Metrics::render`]'s output: OpenMetrics text, which Prometheus reads.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Metrics the agent itself produces; cheap clones share the same values.
#[derive(Clone, Debug)]
pub struct Metrics {
    reconcile_duration: Histogram,
    reconcile_errors: Counter,
    policy_log_suppressed: Counter,
    ct_gc_runs: Counter,
    ct_gc_duration: Histogram,
    /// Conntrack entries removed by the agent, by [`Removal`].
    ct_removed: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// What the Kubernetes source did (zero with a cluster file).
    source: SourceStats,
    /// Passes that failed because a map was full, by map.
    map_full: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Faults repaired behind the agent's back.
    repairs: Repairs,
    /// Maps converted from an earlier layout at start, by map.
    maps_migrated: Family<Vec<(&'static str, &'static str)>, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            // 1 ms to ~16 s: a pass that swaps many policy maps takes tens of ms.
            reconcile_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
            ),
            reconcile_errors: Counter::default(),
            policy_log_suppressed: Counter::default(),
            ct_gc_runs: Counter::default(),
            // 1 ms to ~4 s: a run walks up to the whole table.
            ct_gc_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 13),
            ),
            ct_removed: Family::default(),
            source: SourceStats::default(),
            map_full: Family::default(),
            repairs: Repairs::default(),
            maps_migrated: Family::default(),
        }
    }
}

impl Metrics {
    pub fn observe_reconcile(&self, elapsed: Duration, ok: bool) {
        self.reconcile_duration.observe(elapsed.as_secs_f64());
        if !ok {
            self.reconcile_errors.inc();
        }
    }

    /// One run of the conntrack garbage collector, which removed `removed` entries.
    pub fn observe_ct_gc(&self, elapsed: Duration, reason: Removal, removed: u64) {
        self.ct_gc_runs.inc();
        self.ct_gc_duration.observe(elapsed.as_secs_f64());
        self.count_ct_removed(reason, removed);
    }

    /// Conntrack entries the agent removed, and why.
    pub fn count_ct_removed(&self, reason: Removal, removed: u64) {
        self.ct_removed
            .get_or_create(&vec![("reason", reason.as_str())])
            .inc_by(removed);
    }

    /// Conntrack entries the agent removed for `reason` since it started.
    pub fn ct_removed(&self, reason: Removal) -> u64 {
        self.ct_removed
            .get_or_create(&vec![("reason", reason.as_str())])
            .get()
    }

    /// A pass that failed because `map` was full.
    pub fn count_map_full(&self, map: &'static str) {
        self.map_full.get_or_create(&vec![("map", map)]).inc();
    }

    /// The maps the datapath converted from an earlier layout when this agent started.
    pub fn count_migrated(&self, migrated: &[MigratedMap]) {
        for m in migrated {
            self.maps_migrated
                .get_or_create(&vec![("map", m.map)])
                .inc();
        }
    }

    /// The faults repaired behind the agent's back, shared with whoever repairs them.
    pub fn repairs(&self) -> Repairs {
        self.repairs.clone()
    }

    /// The counter of policy log lines not written (rate limit or full queue).
    pub fn policy_log_suppressed(&self) -> Counter {
        self.policy_log_suppressed.clone()
    }

    /// The Kubernetes source's counters.
    pub fn source_stats(&self) -> SourceStats {
        self.source.clone()
    }

    /// Reads the kernel maps and encodes every metric; the realized maps' sizes are those
    /// the reconcile loop last `counted` (see `views::map_entries`).
    pub fn render(
        &self,
        maps: &PinnedMaps,
        counted: &[(MapId, sluice_realizer::Counted)],
    ) -> Result<String, AgentError> {
        self.encode(KernelSample::read(maps, counted)?)
    }

    /// The agent's own metrics, with no kernel maps: for tests of the HTTP server.
    #[cfg(test)]
    pub(crate) fn render_agent_only(&self) -> String {
        self.encode(KernelSample::default()).unwrap_or_default()
    }

    fn encode(&self, sample: KernelSample) -> Result<String, AgentError> {
        let mut registry = Registry::default();
        registry.register_with_unit(
            "sluice_reconcile_duration",
            "Duration of the agent's reconcile passes (compile, diff against the kernel, apply)",
            Unit::Seconds,
            self.reconcile_duration.clone(),
        );
        registry.register(
            "sluice_reconcile_errors",
            "Reconcile passes that failed and will be retried",
            self.reconcile_errors.clone(),
        );
        registry.register(
            "sluice_policy_log_suppressed",
            "Policy action log lines not written because of the rate limit or a full queue",
            self.policy_log_suppressed.clone(),
        );
        registry.register(
            "sluice_conntrack_gc_runs",
            "Runs of the conntrack garbage collector",
            self.ct_gc_runs.clone(),
        );
        registry.register_with_unit(
            "sluice_conntrack_gc_duration",
            "Duration of the conntrack garbage collector's runs (a walk of the table)",
            Unit::Seconds,
            self.ct_gc_duration.clone(),
        );
        // Every reason from the start, so a rate over it exists before the first removal.
        for reason in Removal::ALL {
            self.count_ct_removed(reason, 0);
        }
        registry.register(
            "sluice_conntrack_gc_deleted",
            "Conntrack entries the agent removed: expired (garbage collector), \
             backend_removed (purged after their backend left the service) or pressure \
             (closed and half-open TCP connections, removed early because the table \
             passed --ct-pressure-threshold)",
            self.ct_removed.clone(),
        );
        registry.register(
            "sluice_kubernetes_watch_events",
            "Watch events the Kubernetes source applied to its stores (initial lists included)",
            self.source.events.clone(),
        );
        registry.register(
            "sluice_kubernetes_snapshots",
            "Snapshots the Kubernetes source made: one per burst of watch events",
            self.source.snapshots.clone(),
        );
        registry.register(
            "sluice_kubernetes_relists",
            "Lists after the first of their kind: the API server said 410 Gone to a watch",
            self.source.relists.clone(),
        );
        registry.register(
            "sluice_map_full",
            "Reconcile passes that failed because a map could not take the desired entries \
             (the kernel said E2BIG or ENOSPC), by map; status names the map until a pass \
             succeeds",
            self.map_full.clone(),
        );
        registry.register(
            "sluice_maps_migrated",
            "Pinned maps converted from an earlier layout when this agent started, by map \
             (new map filled, programs swapped into their links, pin replaced)",
            self.maps_migrated.clone(),
        );
        registry.register_collector(Box::new(self.repairs.clone()));
        registry.register(
            "sluice_build",
            "Agent build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(sample));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .map_err(|_| AgentError::Query("encoding metrics failed".into()))?;
        Ok(out)
    }
}

const DIRECTIONS: [(u32, &str); 2] = [
    (METRIC_DIR_EGRESS, "egress"),
    (METRIC_DIR_INGRESS, "ingress"),
];

/// Drop reasons as Hubble's `drop_reason_desc` names them (as `sluice observe` does);
/// a code the datapath should not produce keeps its number, so labels stay unique.
pub fn reason_label(code: u8) -> String {
    if DropReason::from_code(code).is_some() {
        sluice_observer::drop_reason_desc(code)
    } else {
        format!("UNKNOWN_{code}")
    }
}

const EVENT_TYPES: [(u8, &str); 4] = [
    (EVENT_DROP, "drop"),
    (EVENT_TRACE, "trace"),
    (EVENT_POLICY_VERDICT, "policy-verdict"),
    (EVENT_CLOSE, "close"),
];

/// One read of the kernel maps, encoded by the registry at scrape time.
#[derive(Debug, Default)]
struct KernelSample {
    /// (reason, direction) -> summed over CPUs; reason 0 is forwarded traffic.
    traffic: Vec<(u8, u32, MetricsValue)>,
    /// (type, direction) -> summed over CPUs.
    events: Vec<(u8, u32, EventCounter)>,
    /// (map, entries, max_entries), by map name.
    maps: Vec<(MapId, u64, u32)>,
    /// The datapath's conntrack counters, summed over CPUs.
    ct_stats: CtStats,
}

impl KernelSample {
    fn read(
        maps: &PinnedMaps,
        counted: &[(MapId, sluice_realizer::Counted)],
    ) -> Result<Self, AgentError> {
        let mut traffic = Vec::new();
        for reason in 0..=u8::MAX {
            for (dir, _) in DIRECTIONS {
                let value = per_cpu_sum(&maps.metrics, metrics_index(reason, dir))?;
                let known = reason == 0 || DropReason::from_code(reason).is_some();
                if known || value.packets != 0 {
                    traffic.push((reason, dir, value));
                }
            }
        }
        let events = event_counts(&maps.event_counters)?;
        // Sorted by name, as the registry's order means nothing to a dashboard.
        let mut sizes = registry::counted()
            .map(|def| {
                let (entries, _, _) = crate::views::map_entries(&maps.inventory, counted, def.id)?;
                Ok((def.id, entries, maps.inventory.capacity(def.id)))
            })
            .collect::<Result<Vec<_>, AgentError>>()?;
        sizes.sort_by_key(|(id, _, _)| id.name());
        Ok(Self {
            traffic,
            events,
            maps: sizes,
            ct_stats: maps.ct_stats()?,
        })
    }

    /// Entries over capacity (0 for a map not sampled).
    fn fill(&self, map: MapId) -> f64 {
        self.maps
            .iter()
            .find(|(id, _, _)| *id == map)
            .filter(|(_, _, capacity)| *capacity > 0)
            .map_or(0.0, |(_, entries, capacity)| {
                *entries as f64 / f64::from(*capacity)
            })
    }

    fn entries(&self, map: MapId) -> u64 {
        self.maps
            .iter()
            .find(|(id, _, _)| *id == map)
            .map_or(0, |(_, entries, _)| *entries)
    }

    /// Policy verdicts on new connections in `dir`: (allowed, denied).
    ///
    /// Denied is exact whatever the event configuration: every denied packet is judged
    /// (it created no conntrack entry) and counted in `metrics` under reason 133 or 212.
    /// The datapath offers every verdict, allowed or denied, to the event path, which counts
    /// it as emitted, suppressed or lost; so allowed = those minus the denied ones. That is
    /// exact while events are enabled, the agent's default: with events off nothing is
    /// counted and allowed reads 0.
    fn policy_verdicts(&self, dir: u32) -> (u64, u64) {
        let denied = [DropReason::Policy, DropReason::PolicyUnavailable]
            .into_iter()
            .map(|r| self.traffic(r.code(), dir).packets)
            .sum::<u64>();
        let offered = self
            .events
            .iter()
            .filter(|(t, d, _)| *t == EVENT_POLICY_VERDICT && *d == dir)
            .map(|(_, _, c)| c.emitted + c.suppressed + c.lost)
            .sum::<u64>();
        (offered.saturating_sub(denied), denied)
    }

    fn traffic(&self, reason: u8, dir: u32) -> MetricsValue {
        self.traffic
            .iter()
            .find(|(r, d, _)| *r == reason && *d == dir)
            .map_or_else(MetricsValue::default, |(_, _, v)| *v)
    }
}

/// The event counters by type and direction, summed over CPUs.
fn event_counts(
    map: &PerCpuArray<MapData, EventCounter>,
) -> Result<Vec<(u8, u32, EventCounter)>, AgentError> {
    let mut events = Vec::new();
    for (type_, _) in EVENT_TYPES {
        for (dir, _) in DIRECTIONS {
            let index = event_counter_index(type_, dir);
            let values = map.get(&index, 0).map_err(|source| AgentError::Map {
                map: names::EVENT_COUNTERS,
                source,
            })?;
            let sum = values
                .iter()
                .fold(EventCounter::default(), |acc, v| EventCounter {
                    emitted: acc.emitted + v.emitted,
                    suppressed: acc.suppressed + v.suppressed,
                    lost: acc.lost + v.lost,
                });
            events.push((type_, dir, sum));
        }
    }
    Ok(events)
}

/// Events of every type and direction the datapath could not write to a full ring.
pub(crate) fn events_lost(map: &PerCpuArray<MapData, EventCounter>) -> Result<u64, AgentError> {
    Ok(event_counts(map)?.iter().map(|(_, _, c)| c.lost).sum())
}

fn per_cpu_sum(
    map: &PerCpuArray<MapData, MetricsValue>,
    index: u32,
) -> Result<MetricsValue, AgentError> {
    let values = map.get(&index, 0).map_err(|source| AgentError::Map {
        map: names::METRICS,
        source,
    })?;
    Ok(values
        .iter()
        .fold(MetricsValue::default(), |acc, v| MetricsValue {
            packets: acc.packets + v.packets,
            bytes: acc.bytes + v.bytes,
        }))
}

impl Collector for KernelSample {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        for (name, help, field) in [
            (
                "sluice_forward_packets",
                "Packets the datapath forwarded, by direction (egress leaves the pod)",
                (|v: &MetricsValue| v.packets) as fn(&MetricsValue) -> u64,
            ),
            (
                "sluice_forward_bytes",
                "Bytes the datapath forwarded, by direction",
                |v: &MetricsValue| v.bytes,
            ),
        ] {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (dir, direction) in DIRECTIONS {
                let labels = [("direction", direction)];
                ConstCounter::new(field(&self.traffic(0, dir)))
                    .encode(metric.encode_family(&labels)?)?;
            }
        }
        for (name, help, field) in [
            (
                "sluice_drop_packets",
                "Packets the datapath dropped, by reason and direction",
                (|v: &MetricsValue| v.packets) as fn(&MetricsValue) -> u64,
            ),
            (
                "sluice_drop_bytes",
                "Bytes the datapath dropped, by reason and direction",
                |v: &MetricsValue| v.bytes,
            ),
        ] {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (reason, dir, value) in self.traffic.iter().filter(|(r, _, _)| *r != 0) {
                let labels = [
                    ("reason", reason_label(*reason)),
                    ("direction", direction_name(*dir).to_string()),
                ];
                ConstCounter::new(field(value)).encode(metric.encode_family(&labels)?)?;
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "sluice_policy_verdicts",
                "NetworkPolicy verdicts on new connections, by direction and verdict",
                None,
                MetricType::Counter,
            )?;
            for (dir, direction) in DIRECTIONS {
                let (allowed, denied) = self.policy_verdicts(dir);
                for (verdict, n) in [("allowed", allowed), ("denied", denied)] {
                    let labels = [("direction", direction), ("verdict", verdict)];
                    ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "sluice_events",
                "Flow events by type and direction: emitted to the ring buffer, suppressed by \
                 the rate limit, or lost to a full ring",
                None,
                MetricType::Counter,
            )?;
            for (type_, dir, counter) in &self.events {
                let name = EVENT_TYPES
                    .iter()
                    .find(|(t, _)| t == type_)
                    .map_or("unknown", |(_, n)| n);
                for (outcome, n) in [
                    ("emitted", counter.emitted),
                    ("suppressed", counter.suppressed),
                    ("lost", counter.lost),
                ] {
                    let labels = [
                        ("type", name),
                        ("direction", direction_name(*dir)),
                        ("outcome", outcome),
                    ];
                    ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        {
            let metric = encoder.encode_descriptor(
                "sluice_conntrack_entries",
                "Entries in the conntrack table",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(gauge(self.entries(MapId::Conntrack))).encode(metric)?;
        }
        {
            let metric = encoder.encode_descriptor(
                "sluice_conntrack_fill_ratio",
                "Entries in the conntrack table over its capacity; the LRU evicts live \
                 connections near 1",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(self.fill(MapId::Conntrack)).encode(metric)?;
        }
        {
            let metric = encoder.encode_descriptor(
                "sluice_conntrack_service_entries_lost",
                "TCP segments of live connections to a service that found their conntrack \
                 entry gone (evicted or removed); the flow hash sent each to its backend again",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(self.ct_stats.service_lost).encode(metric)?;
        }
        {
            let metric = encoder.encode_descriptor(
                "sluice_conntrack_entries_created",
                "Conntrack entries the datapath wrote for new connections (a stale entry \
                 written again included)",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(self.ct_stats.created).encode(metric)?;
        }
        {
            let metric = encoder.encode_descriptor(
                "sluice_endpoints",
                "Local endpoints the datapath knows",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(gauge(self.entries(MapId::Endpoints))).encode(metric)?;
        }
        {
            let mut metric = encoder.encode_descriptor(
                "sluice_map_entries",
                "Entries in each datapath map",
                None,
                MetricType::Gauge,
            )?;
            for (map, entries, _) in &self.maps {
                ConstGauge::new(gauge(*entries))
                    .encode(metric.encode_family(&[("map", map.name())])?)?;
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "sluice_map_capacity",
                "Maximum entries of each datapath map",
                None,
                MetricType::Gauge,
            )?;
            for (map, _, capacity) in &self.maps {
                ConstGauge::new(i64::from(*capacity))
                    .encode(metric.encode_family(&[("map", map.name())])?)?;
            }
        }
        Ok(())
    }
}

fn direction_name(dir: u32) -> &'static str {
    if dir == METRIC_DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_names_by_prometheus_conventions() {
        let metrics = Metrics::default();
        metrics.observe_reconcile(Duration::from_millis(3), true);
        metrics.observe_reconcile(Duration::from_millis(5), false);
        metrics.count_map_full(names::SERVICES);
        metrics.count_migrated(&[MigratedMap {
            map: names::CONNTRACK,
            from: "LruHash key 16 (Ct4Key) value 40 (Ct4EntryV1)".into(),
            to: "LruHash key 16 (Ct4Key) value 48 (Ct4Entry)".into(),
            entries: 2,
            late_entries: 0,
            late_unconvertible: 0,
        }]);
        metrics
            .repairs()
            .record(sluice_api::Fault::PinRemoved, names::CONNTRACK.into());
        let sample = KernelSample {
            traffic: vec![
                (
                    0,
                    METRIC_DIR_EGRESS,
                    MetricsValue {
                        packets: 7,
                        bytes: 700,
                    },
                ),
                (
                    133,
                    METRIC_DIR_INGRESS,
                    MetricsValue {
                        packets: 2,
                        bytes: 120,
                    },
                ),
            ],
            events: vec![(
                EVENT_POLICY_VERDICT,
                METRIC_DIR_INGRESS,
                EventCounter {
                    emitted: 4,
                    suppressed: 1,
                    lost: 0,
                },
            )],
            maps: vec![(MapId::Conntrack, 3, 65536), (MapId::Endpoints, 2, 1024)],
            ct_stats: CtStats {
                created: 9,
                service_lost: 5,
            },
        };
        let text = metrics.encode(sample).expect("encode");
        for line in [
            "sluice_forward_packets_total{direction=\"egress\"} 7",
            "sluice_forward_bytes_total{direction=\"egress\"} 700",
            "sluice_forward_packets_total{direction=\"ingress\"} 0",
            "sluice_drop_packets_total{reason=\"POLICY_DENIED\",direction=\"ingress\"} 2",
            "sluice_drop_bytes_total{reason=\"POLICY_DENIED\",direction=\"ingress\"} 120",
            "sluice_policy_verdicts_total{direction=\"ingress\",verdict=\"allowed\"} 3",
            "sluice_policy_verdicts_total{direction=\"ingress\",verdict=\"denied\"} 2",
            "sluice_policy_verdicts_total{direction=\"egress\",verdict=\"allowed\"} 0",
            "sluice_events_total{type=\"policy-verdict\",direction=\"ingress\",outcome=\"suppressed\"} 1",
            "sluice_conntrack_entries 3",
            "sluice_conntrack_service_entries_lost_total 5",
            "sluice_conntrack_entries_created_total 9",
            "sluice_conntrack_gc_deleted_total{reason=\"pressure\"} 0",
            "sluice_endpoints 2",
            "sluice_map_entries{map=\"ct4\"} 3",
            "sluice_map_capacity{map=\"ct4\"} 65536",
            "sluice_reconcile_duration_seconds_count 2",
            "sluice_reconcile_errors_total 1",
            "sluice_policy_log_suppressed_total 0",
            "sluice_map_full_total{map=\"lb4_services\"} 1",
            "sluice_maps_migrated_total{map=\"ct4\"} 1",
            "sluice_faults_repaired_total{fault=\"pin-removed\",object=\"ct4\"} 1",
            "sluice_build_info{version=\"",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn reasons_use_hubble_names() {
        assert_eq!(reason_label(133), "POLICY_DENIED");
        assert_eq!(reason_label(212), "POLICY_UNAVAILABLE");
        assert_eq!(reason_label(9), "UNKNOWN_9");
    }
}
