//! The simulated cluster's report: `report.md` with the run's figures and, from them, the
//! API server's side for one agent and for every node's agent.

use std::{fmt::Write as _, fs, path::Path};

use sluice_fake_apiserver::{Resource, Traffic};

use super::{ClusterConfig, ClusterResults};
use crate::BenchError;

/// GKE's reservation for the dataplane's largest maps: 0.25% of node memory.
const GKE_MAP_SHARE: f64 = 0.0025;
/// A typical node's memory for the comparison (e2-standard-4: 16 GiB).
const TYPICAL_NODE_BYTES: f64 = 16.0 * 1024.0 * 1024.0 * 1024.0;
/// One entry of a compact identity-and-address feed (address, identity, node address,
/// a revision: 4 + 4 + 4 + 8 bytes, framed), for the narrower design's estimate.
const COMPACT_ENTRY_BYTES: f64 = 32.0;

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn machine_memory_bytes() -> f64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib * 1024.0)
}

/// Writes `out/report.md`.
pub fn write(
    results: &ClusterResults,
    config: &ClusterConfig,
    out: &Path,
    command: &str,
) -> Result<(), BenchError> {
    fs::create_dir_all(out).map_err(|source| BenchError::Io {
        call: "mkdir",
        what: out.display().to_string(),
        source,
    })?;
    let path = out.join("report.md");
    fs::write(&path, render(results, config, command)).map_err(|source| BenchError::Io {
        call: "write",
        what: path.display().to_string(),
        source,
    })
}

/// The report's text (writing to a String cannot fail, so `writeln!`'s results are
/// dropped).
pub fn render(results: &ClusterResults, config: &ClusterConfig, command: &str) -> String {
    let s = &config.shape;
    let mut r = String::new();
    let _ = writeln!(r, "# Simulated cluster at GKE's limits\n");
    let _ = writeln!(r, "`{command}`\n");
    let _ = writeln!(
        r,
        "One real `sluice-agent` (`--source kubernetes`, release build, default flags: \
         reconcile interval 2 s) on a {}-core machine with {:.1} GiB, fed by the fake API \
         server on its node namespace's loopback.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        machine_memory_bytes() / 1024.0_f64.powi(3)
    );
    let _ = writeln!(r, "| objects | count |\n|---|---:|");
    for (what, n) in [
        ("Nodes", s.nodes),
        ("Namespaces", s.namespaces),
        ("Pods", s.pods),
        (
            "  of them on the agent's node, as real veths in namespaces",
            s.local_pods,
        ),
        ("Services", s.services),
        ("  of them LoadBalancer", s.load_balancers),
        ("endpoints in EndpointSlices", s.endpoints),
        ("  of the largest Service", s.largest_service),
        ("NetworkPolicies", s.network_policies),
        ("objects listed in all", results.objects),
    ] {
        let _ = writeln!(r, "| {what} | {n} |");
    }
    let _ = writeln!(r, "\n## Start, steady state, churn\n");
    let _ = writeln!(r, "| figure | value |\n|---|---:|");
    let rows = [
        (
            format!(
                "wiring the {} local pods (a namespace and veth each)",
                s.local_pods
            ),
            format!("{:.1} s", results.wire_seconds),
        ),
        (
            "start to first realized (`/readyz` 200)".to_string(),
            format!("{:.1} s", results.start_to_ready),
        ),
        (
            format!("steady CPU ({:.0} s)", results.steady.seconds),
            format!("{:.1}% of a core", results.steady.cpu_fraction * 100.0),
        ),
        (
            "`status` at steady state, slowest of 5".into(),
            format!("{:.1} ms", results.steady_status.as_secs_f64() * 1e3),
        ),
        (
            "steady RSS".into(),
            format!("{:.0} MiB", results.steady.rss_kib as f64 / 1024.0),
        ),
        (
            "peak RSS (VmHWM, start included)".into(),
            format!("{:.0} MiB", results.peak_rss_kib as f64 / 1024.0),
        ),
        (
            format!(
                "churn: {} watch events in {:.0} s ({:.0} pod events/s, {} Services rolled at a time)",
                results.churn_events,
                results.churn.seconds,
                config.pod_events_per_second,
                config.rolling_services
            ),
            format!("{:.1}% of a core", results.churn.cpu_fraction * 100.0),
        ),
        (
            "RSS after the churn".into(),
            format!("{:.0} MiB", results.churn.rss_kib as f64 / 1024.0),
        ),
    ];
    for (what, value) in rows {
        let _ = writeln!(r, "| {what} | {value} |");
    }
    let _ = writeln!(
        r,
        "\n### Watch event to realized maps\n\nFrom the change applied to the fake server to \
         the map entry it makes, read by a poller every millisecond (debounce included).\n"
    );
    let _ = writeln!(
        r,
        "| change | n | p50 | p99 | max | not seen within {:.0} s |\n|---|---:|---:|---:|---:|---:|",
        config.change_timeout.as_secs_f64()
    );
    for (change, samples) in &results.latencies {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let ms = |v: f64| format!("{:.0} ms", v * 1000.0);
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} | {} | {} |",
            change.name(),
            sorted.len(),
            ms(percentile(&sorted, 0.5)),
            ms(percentile(&sorted, 0.99)),
            ms(percentile(&sorted, 1.0)),
            results.missed.get(change).copied().unwrap_or(0)
        );
    }
    for (change, missed) in &results.missed {
        if !results.latencies.contains_key(change) {
            let _ = writeln!(r, "| {} | 0 | - | - | - | {missed} |", change.name());
        }
    }
    maps(&mut r, results);
    api_server(&mut r, results, config);
    let _ = writeln!(r, "\n## The agent's counters at the end\n\n```");
    for line in &results.agent_metrics {
        let _ = writeln!(r, "{line}");
    }
    let _ = writeln!(r, "```");
    r
}

fn maps(r: &mut String, results: &ClusterResults) {
    let _ = writeln!(
        r,
        "\n## Map fill and kernel memory\n\n| map | entries | capacity | fill | kernel memory |\n|---|---:|---:|---:|---:|"
    );
    let mut total = 0.0;
    for m in &results.maps {
        total += m.memlock as f64;
        let _ = writeln!(
            r,
            "| {} | {} | {} | {:.1}% | {:.1} MiB |",
            m.name,
            m.entries,
            m.capacity,
            m.entries as f64 * 100.0 / f64::from(m.capacity.max(1)),
            mib(m.memlock as f64)
        );
    }
    let machine = machine_memory_bytes();
    let _ = writeln!(
        r,
        "\nAll maps: {:.1} MiB of kernel memory (`memlock` in each map's fdinfo: a hash \
         map is charged for its capacity, preallocated; an LPM trie for its entries; the \
         endpoints' policy maps, inner maps of `policy`, are not counted here): {:.2}% of \
         this machine's memory, {:.2}% of a 16 GiB node, against the {:.2}% GKE reserves \
         ({:.0} MiB of a 16 GiB node).",
        mib(total),
        total * 100.0 / machine.max(1.0),
        total * 100.0 / TYPICAL_NODE_BYTES,
        GKE_MAP_SHARE * 100.0,
        mib(GKE_MAP_SHARE * TYPICAL_NODE_BYTES)
    );
}

fn sum(traffic: &std::collections::BTreeMap<Resource, Traffic>, of: &[Resource]) -> Traffic {
    of.iter()
        .filter_map(|r| traffic.get(r))
        .fold(Traffic::default(), |a, t| Traffic {
            watch_events: a.watch_events + t.watch_events,
            watch_bytes: a.watch_bytes + t.watch_bytes,
            list_pages: a.list_pages + t.list_pages,
            list_bytes: a.list_bytes + t.list_bytes,
        })
}

fn api_server(r: &mut String, results: &ClusterResults, config: &ClusterConfig) {
    let nodes = config.shape.nodes as f64;
    let seconds = results.churn.seconds.max(1e-9);
    let start = sum(&results.traffic_start, &Resource::ALL);
    let _ = writeln!(
        r,
        "\n## The API server's side\n\nThe initial sync sent this agent {} list pages, \
         {:.0} MiB ({:.1} GiB for {} agents starting together).\n",
        start.list_pages,
        mib(start.list_bytes as f64),
        start.list_bytes as f64 * nodes / 1024.0_f64.powi(3),
        config.shape.nodes
    );
    let _ = writeln!(
        r,
        "During the churn, per watched resource (events and bytes the server sent this agent):\n\n\
         | resource | events/s | KiB/s, one agent | MiB/s, {} agents |\n|---|---:|---:|---:|",
        config.shape.nodes
    );
    for (resource, t) in &results.traffic_churn {
        let _ = writeln!(
            r,
            "| {resource} | {:.1} | {:.1} | {:.1} |",
            t.watch_events as f64 / seconds,
            t.watch_bytes as f64 / seconds / 1024.0,
            mib(t.watch_bytes as f64 / seconds * nodes)
        );
    }
    let all = sum(&results.traffic_churn, &Resource::ALL);
    let pods = sum(&results.traffic_churn, &[Resource::Pods]);
    let per_pod_event = pods.watch_bytes as f64 / (pods.watch_events.max(1) as f64);
    // Narrower: each agent watches only its own node's Pods (1 / nodes of the pod events,
    // whole) and gets a compact entry for every other pod event.
    let narrow_pods =
        pods.watch_events as f64 / seconds * (per_pod_event / nodes + COMPACT_ENTRY_BYTES);
    let wide_pods = pods.watch_bytes as f64 / seconds;
    let rest = (all.watch_bytes - pods.watch_bytes) as f64 / seconds;
    let _ = writeln!(
        r,
        "| all | {:.1} | {:.1} | {:.1} |\n\n\
         A pod event averaged {per_pod_event:.0} bytes on the wire (slimming happens in the \
         agent, after the bytes are sent). **Narrower design** (agents watch their own \
         node's Pods with a field selector `spec.nodeName`, plus a compact feed of \
         (address, identity, node) for the cluster's other pods, {COMPACT_ENTRY_BYTES:.0} \
         bytes an entry): pod traffic per agent falls from {:.1} KiB/s to {:.2} KiB/s, \
         for {} agents from {:.1} MiB/s to {:.2} MiB/s; Services and EndpointSlices \
         ({:.1} KiB/s per agent here) are needed by every node's load balancer and stay.",
        all.watch_events as f64 / seconds,
        all.watch_bytes as f64 / seconds / 1024.0,
        mib(all.watch_bytes as f64 / seconds * nodes),
        wide_pods / 1024.0,
        narrow_pods / 1024.0,
        config.shape.nodes,
        mib(wide_pods * nodes),
        mib(narrow_pods * nodes),
        rest / 1024.0
    );
}
