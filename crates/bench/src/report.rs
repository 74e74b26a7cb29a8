//! The report: medians per (variant, N), ratios to the bare path, targets, machine details,
//! and PNG charts drawn with plotters.

use std::{collections::BTreeMap, fmt::Write, fs, path::Path, time::Duration};

use plotters::prelude::*;

use crate::{BenchError, Config, Results, Sample, Variant};

/// The row of sluice's per-packet ClusterIP path beside the socket-LB one.
const PER_PACKET: &str = "sluice, per-packet ClusterIP (no socket LB)";
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Medians of one (variant, N) over its repetitions.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub reps: usize,
    pub tps: f64,
    pub rr_p50: f64,
    pub rr_p99: f64,
    pub cps: f64,
    pub crr_p50: f64,
    pub crr_p99: f64,
    pub gbps: f64,
    pub program_s: Option<f64>,
    pub incremental_ms: Option<f64>,
    pub bpf_rr: Option<(f64, f64)>,
    pub bpf_crr: Option<(f64, f64)>,
    pub proof_min: u64,
    pub ct_per_connection: Option<f64>,
    pub per_packet: Option<PerPacketSummary>,
}

/// Medians of sluice's per-packet ClusterIP path, measured beside the socket-LB one.
#[derive(Clone, Copy, Debug)]
pub struct PerPacketSummary {
    pub tps: f64,
    pub cps: f64,
    pub crr_p50: f64,
    pub crr_p99: f64,
    pub bpf_crr: (f64, f64),
    pub ct_per_connection: f64,
}

fn per_packet_summary(samples: &[&Sample]) -> Option<PerPacketSummary> {
    let p: Vec<_> = samples.iter().filter_map(|s| s.per_packet).collect();
    let m = |f: fn(&crate::PerPacket) -> f64| median(p.iter().map(f).collect());
    (!p.is_empty()).then(|| PerPacketSummary {
        tps: m(|p| p.rr.per_sec),
        cps: m(|p| p.crr.per_sec),
        crr_p50: m(|p| p.crr.p50_us),
        crr_p99: m(|p| p.crr.p99_us),
        bpf_crr: (
            m(|p| p.bpf_crr.from_container_ns),
            m(|p| p.bpf_crr.to_container_ns),
        ),
        ct_per_connection: m(|p| p.ct_per_connection),
    })
}

fn opt_median(samples: &[&Sample], f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = samples.iter().filter_map(|s| f(s)).collect();
    (!v.is_empty()).then(|| median(v))
}

pub fn summarize(results: &Results) -> BTreeMap<(usize, Variant), Summary> {
    let mut groups: BTreeMap<(usize, Variant), Vec<&Sample>> = BTreeMap::new();
    for s in &results.samples {
        groups.entry((s.services, s.variant)).or_default().push(s);
    }
    groups
        .into_iter()
        .map(|(k, g)| {
            let m = |f: fn(&Sample) -> f64| median(g.iter().map(|s| f(s)).collect());
            let summary = Summary {
                reps: g.len(),
                tps: m(|s| s.rr.per_sec),
                rr_p50: m(|s| s.rr.p50_us),
                rr_p99: m(|s| s.rr.p99_us),
                cps: m(|s| s.crr.per_sec),
                crr_p50: m(|s| s.crr.p50_us),
                crr_p99: m(|s| s.crr.p99_us),
                gbps: m(|s| s.stream_gbps),
                program_s: opt_median(&g, |s| s.program.map(|d| d.as_secs_f64())),
                incremental_ms: opt_median(&g, |s| s.incremental.map(|d| d.as_secs_f64() * 1e3)),
                bpf_rr: opt_median(&g, |s| s.bpf_rr.map(|b| b.from_container_ns))
                    .zip(opt_median(&g, |s| s.bpf_rr.map(|b| b.to_container_ns))),
                bpf_crr: opt_median(&g, |s| s.bpf_crr.map(|b| b.from_container_ns))
                    .zip(opt_median(&g, |s| s.bpf_crr.map(|b| b.to_container_ns))),
                proof_min: g.iter().map(|s| s.proof.count).min().unwrap_or(0),
                ct_per_connection: opt_median(&g, |s| s.ct_per_connection),
                per_packet: per_packet_summary(&g),
            };
            (k, summary)
        })
        .collect()
}

fn read_first_line(path: &str, prefix: &str) -> String {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Kernel, CPU, cores, memory and tool versions.
pub fn machine(config: &Config) -> Vec<(String, String)> {
    let tool = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "not found".into())
    };
    vec![
        (
            "kernel".into(),
            fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
        ),
        ("CPU".into(), read_first_line("/proc/cpuinfo", "model name")),
        (
            "cores".into(),
            std::thread::available_parallelism()
                .map(|n| n.to_string())
                .unwrap_or_default(),
        ),
        (
            "memory".into(),
            read_first_line("/proc/meminfo", "MemTotal"),
        ),
        (
            "iptables".into(),
            tool(
                crate::iptables_binary(&config.iptables_restore),
                "--version",
            ),
        ),
        ("nft".into(), tool("nft", "--version")),
    ]
}

pub(crate) fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}x", a / b)
    } else {
        "–".into()
    }
}

pub(crate) fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let r = v.round() as i64;
    let s = r.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if r < 0 { format!("-{out}") } else { out }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "–".into())
}

/// Issue 18's target for an established packet: from_container's run time in the RR
/// phase.
const ESTABLISHED_NS: f64 = 150.0;

/// A target line for a ratio to bare of at least `wanted`.
pub(crate) fn ratio_target(out: &mut String, what: &str, wanted: f64, got: Option<f64>) {
    target_line(
        out,
        what,
        &format!(">= {wanted:.2}x bare"),
        got,
        |r| r >= wanted,
        |r| format!("{r:.2}x"),
        |r| format!("{:.0}% below the target", (wanted - r) / wanted * 100.0),
    );
}

pub(crate) fn target_line(
    out: &mut String,
    what: &str,
    target: &str,
    got: Option<f64>,
    ok: impl Fn(f64) -> bool,
    fmt: impl Fn(f64) -> String,
    miss: impl Fn(f64) -> String,
) {
    let (value, verdict) = match got {
        Some(v) if v.is_finite() => (
            fmt(v),
            if ok(v) {
                "met".to_owned()
            } else {
                format!("missed: {}", miss(v))
            },
        ),
        _ => ("not measured".into(), "–".into()),
    };
    let _ = writeln!(out, "| {what} | {target} | {value} | {verdict} |");
}

/// Writes `report.md` and the charts into `dir`.
pub fn write(
    results: &Results,
    config: &Config,
    dir: &Path,
    command: &str,
) -> Result<(), BenchError> {
    fs::create_dir_all(dir).map_err(|source| BenchError::Io {
        call: "mkdir",
        what: dir.display().to_string(),
        source,
    })?;
    let sums = summarize(results);
    let ns: Vec<usize> = config.services.clone();
    let get = |n: usize, v: Variant| sums.get(&(n, v));
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# sluice benchmarks: sluice, kube-proxy iptables and nftables, bare path\n"
    );
    let _ = writeln!(
        md,
        "Command: `{command}`; {} repetition(s) per point, variants interleaved (order rotated per repetition); each measurement on fresh namespaces. Total run time {:.0} s.\n",
        config.reps,
        results.elapsed.as_secs_f64()
    );
    let _ = writeln!(md, "## Machine\n\n| | |\n|---|---|");
    for (k, v) in machine(config) {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(md, "\n## Method\n");
    let _ = writeln!(
        md,
        "- Topology per measurement: client netns (10.1.0.2) and server netns (10.2.0.2-4, the measured service's three backends), each on a veth to a node netns that routes. Nothing runs in the root netns."
    );
    let _ = writeln!(
        md,
        "- N services: N-1 decoys (2 backends each) first, the measured ClusterIP 10.100.0.10:80 -> :{} last (last in KUBE-SERVICES: iptables' worst case).",
        crate::load::SERVER_PORT
    );
    let _ = writeln!(
        md,
        "- **bare**: the client connects straight to 10.2.0.2:{}. **sluice**: the datapath (tcx) on lxc-c and lxc-s, maps programmed by `sluice_compiler::compile` + `sluice_realizer::KernelTables::realize` (what the agent runs). **iptables**: kube-proxy's iptables-mode nat table (KUBE-SERVICES -> KUBE-SVC-* with statistic probability -> KUBE-SEP-* DNAT, KUBE-MARK-MASQ / KUBE-POSTROUTING) via `{}`. **nftables**: kube-proxy's nftables-mode table (service-ips verdict map, numgen random vmap per service, endpoint chains with dnat) via `nft -f`.",
        crate::load::SERVER_PORT,
        config.iptables_restore
    );
    if config.pod_client {
        let _ = writeln!(
            md,
            "- Client as a deployed pod: for every variant the same-node client is a process of its own (`sluice-bench-client`) in the client netns and in a cgroup v2 directory the benchmark makes for it (and removes); sluice attaches the pods' socket programs (`pod4_connect` & co., as `sluice-agent --pod-cgroup`) to that cgroup, so a connect() to the ClusterIP goes to a backend at once and no packet is NATed. **sluice, per-packet ClusterIP** is measured on the same namespaces right after, from the benchmark's threads (outside the cgroup): every packet NATed by the datapath, a service conntrack entry per connection."
        );
    }
    let _ = writeln!(
        md,
        "- Load: the crate's own Rust client and server (threads in the namespaces via setns). RR: 1-byte transactions on one persistent connection for {:?} (netperf TCP_RR). CRR: connect, 1-byte request and response, close, one at a time, for {:?} (TCP_CRR). Stream: one connection writing 128 KiB buffers for {:?}, counted by the receiver.",
        config.durations.rr, config.durations.crr, config.durations.stream
    );
    let _ = writeln!(
        md,
        "- Datapath cost: BPF_ENABLE_STATS(BPF_STATS_RUN_TIME) held during the run; run_time_ns / run_cnt deltas of each program over each phase (both programs run on both veths)."
    );
    let _ = writeln!(
        md,
        "- Programming: sluice = compile + realize of N services into empty maps; incremental = one more service (full compile + realize pass, as the agent does on every change). iptables = `iptables-restore` of the full table (flush mode); incremental = `--noflush` with KUBE-SERVICES rewritten and the new chains, as kube-proxy does since MinimizeIPTablesRestore. nftables = `nft -f` of the full table; incremental = one transaction adding the service's chains and map elements.\n"
    );

    let _ = writeln!(md, "## Summary: ratios to the bare path\n");
    let _ = writeln!(
        md,
        "| N | variant | tps / bare | conn/s / bare | stream / bare |\n|---:|---|---:|---:|---:|"
    );
    for &n in &ns {
        let Some(bare) = get(n, Variant::Bare) else {
            continue;
        };
        for v in [Variant::Sluice, Variant::Iptables, Variant::Nftables] {
            if let Some(s) = get(n, v) {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} |",
                    num(n as f64),
                    v.name(),
                    ratio(s.tps, bare.tps),
                    ratio(s.cps, bare.cps),
                    ratio(s.gbps, bare.gbps)
                );
                if let Some(p) = s.per_packet {
                    let _ = writeln!(
                        md,
                        "| {} | {PER_PACKET} | {} | {} | – |",
                        num(n as f64),
                        ratio(p.tps, bare.tps),
                        ratio(p.cps, bare.cps),
                    );
                }
            }
        }
    }

    let _ = writeln!(
        md,
        "\n## Targets\n\n| target | wanted | measured | verdict |\n|---|---|---|---|"
    );
    let worst = |f: fn(&Summary) -> f64| -> Option<f64> {
        ns.iter()
            .filter_map(|&n| Some(f(get(n, Variant::Sluice)?) / f(get(n, Variant::Bare)?)))
            .min_by(f64::total_cmp)
    };
    // Issue 18's targets: sluice at least as fast as the bare path, an established
    // packet for the price of one lookup.
    for (what, wanted, f) in [
        (
            "sluice transactions/s (same node), worst N",
            1.00,
            (|s| s.tps) as fn(&Summary) -> f64,
        ),
        ("sluice new connections/s, worst N", 0.95, |s| s.cps),
        ("sluice stream throughput, worst N", 1.00, |s| s.gbps),
    ] {
        ratio_target(&mut md, what, wanted, worst(f));
    }
    let established = ns
        .iter()
        .filter_map(|&n| Some(get(n, Variant::Sluice)?.bpf_rr?.0))
        .max_by(f64::total_cmp);
    target_line(
        &mut md,
        "established-flow cost (from_container per run in the RR phase, worst N; steps below)",
        "<= 150 ns/run",
        established,
        |v| v <= ESTABLISHED_NS,
        |v| format!("{v:.0} ns"),
        |v| format!("{:.0} ns over", v - ESTABLISHED_NS),
    );
    let p100k = get(100_000, Variant::Sluice).and_then(|s| s.program_s);
    if let Some(skip) = results
        .skipped
        .iter()
        .find(|s| s.variant == Variant::Sluice && s.services == 100_000)
    {
        let _ = writeln!(
            md,
            "| programming 100k services | <= 2 s | not measurable: {} | – |",
            skip.why
        );
    } else {
        target_line(
            &mut md,
            "programming 100k services",
            "<= 2 s",
            p100k,
            |v| v <= 2.0,
            |v| format!("{v:.2} s"),
            |v| format!("{:.2} s over", v - 2.0),
        );
    }
    target_line(
        &mut md,
        "agent CPU at 10k conn/s",
        "<= 2% of a core",
        results.agent.map(|a| a.cpu_fraction * 100.0),
        |v| v <= 2.0,
        |v| format!("{v:.1}%"),
        |v| format!("{:.1} points over", v - 2.0),
    );

    let _ = writeln!(
        md,
        "\n## Traffic (medians)\n\n| N | variant | reps | RR tps | RR p50 / p99 µs | conn/s | CRR p50 / p99 µs | stream Gbit/s | proof of path |\n|---:|---|---:|---:|---:|---:|---:|---:|---|"
    );
    for &n in &ns {
        for v in Variant::ALL {
            if let Some(s) = get(n, v) {
                let what = results
                    .samples
                    .iter()
                    .find(|x| x.services == n && x.variant == v)
                    .map(|x| x.proof.what)
                    .unwrap_or("");
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {:.0} / {:.0} | {} | {:.0} / {:.0} | {:.2} | {} {what} (min over reps) |",
                    num(n as f64),
                    v.name(),
                    s.reps,
                    num(s.tps),
                    s.rr_p50,
                    s.rr_p99,
                    num(s.cps),
                    s.crr_p50,
                    s.crr_p99,
                    s.gbps,
                    num(s.proof_min as f64)
                );
                if let Some(p) = s.per_packet {
                    let _ = writeln!(
                        md,
                        "| {} | {PER_PACKET} | {} | {} | – | {} | {:.0} / {:.0} | – | {:.2} conntrack entries created per connection (socket LB: {}) |",
                        num(n as f64),
                        s.reps,
                        num(p.tps),
                        num(p.cps),
                        p.crr_p50,
                        p.crr_p99,
                        p.ct_per_connection,
                        opt(s.ct_per_connection, |x| format!("{x:.2}"))
                    );
                }
            }
        }
    }
    if !results.skipped.is_empty() {
        let _ = writeln!(md, "\nNot measured:\n");
        for s in &results.skipped {
            let _ = writeln!(
                md,
                "- {} at N = {}: {}",
                s.variant.name(),
                num(s.services as f64),
                s.why
            );
        }
    }

    let _ = writeln!(
        md,
        "\n## Established-flow profile\n\nWhere from_container's run time on an established flow went, step by step (each measured in place by `crates/datapath/tests/fastpath.rs`, not by this run): [bench/results/profile.md](../profile.md)."
    );
    let _ = writeln!(
        md,
        "\n## Datapath cost (sluice, ns per program run, medians)\n\n| N | RR phase from_container | RR phase to_container | CRR phase from_container | CRR phase to_container | CRR per-packet ClusterIP from_container / to_container |\n|---:|---:|---:|---:|---:|---:|"
    );
    for &n in &ns {
        if let Some(s) = get(n, Variant::Sluice) {
            let f = |v: Option<(f64, f64)>, i: usize| {
                opt(v.map(|p| if i == 0 { p.0 } else { p.1 }), |x| {
                    format!("{x:.0}")
                })
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                num(n as f64),
                f(s.bpf_rr, 0),
                f(s.bpf_rr, 1),
                f(s.bpf_crr, 0),
                f(s.bpf_crr, 1),
                s.per_packet.map_or_else(
                    || "–".to_owned(),
                    |p| format!("{:.0} / {:.0}", p.bpf_crr.0, p.bpf_crr.1)
                )
            );
        }
    }

    let _ = writeln!(
        md,
        "\n## Programming time (medians)\n\n| N | variant | N services from empty | one more service |\n|---:|---|---:|---:|"
    );
    for &n in &ns {
        for v in [Variant::Sluice, Variant::Iptables, Variant::Nftables] {
            if let Some(s) = get(n, v) {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} |",
                    num(n as f64),
                    v.name(),
                    opt(s.program_s, |x| format!("{x:.3} s")),
                    opt(s.incremental_ms, |x| format!("{x:.1} ms"))
                );
            }
        }
    }

    if !results.cross_node.is_empty() {
        // Same-node figures at the smallest N measured, beside the cross-node ones.
        let same_node = ns
            .first()
            .map(|&n| {
                [Variant::Bare, Variant::Sluice]
                    .into_iter()
                    .filter_map(|v| Some((v, *get(n, v)?)))
                    .collect()
            })
            .unwrap_or_default();
        crate::crossnode::report(&mut md, &results.cross_node, &same_node);
    }
    crate::external::report::write(&mut md, &results.external, &config.external_services, dir);
    if let Some(c) = &results.convergence {
        let _ = writeln!(
            md,
            "\n## Policy convergence\n\nOne NetworkPolicy selecting {} local endpoints (synthetic interfaces: the realizer keys endpoints and policy maps by ifindex, so no veth is needed; the maps are the real kernel maps of a loaded datapath). The change adds a port to the policy, so every endpoint's policy map is rebuilt and swapped in; realized = the realizer pass returned, and a fresh read of every map then finds nothing left to do.\n",
            c.endpoints
        );
        let _ = writeln!(
            md,
            "| step | compile | realize | total |\n|---|---:|---:|---:|"
        );
        for (name, p) in [
            ("initial (from empty)", c.initial),
            ("one change reaching all endpoints", c.change),
        ] {
            let _ = writeln!(
                md,
                "| {name} | {:.1} ms | {:.1} ms | {:.1} ms |",
                ms(p.compile),
                ms(p.realize),
                ms(p.total())
            );
        }
    }
    if let Some(a) = &results.agent {
        let _ = writeln!(
            md,
            "\n## Agent cost\n\nA real `sluice-agent` (flow events on, as by default) programs {} services from a cluster file into a fresh topology; the client then opens connections through the ClusterIP, paced to {} per second, for {:.1} s. CPU = utime + stime delta from /proc/<pid>/stat over that time; RSS = VmRSS at the end.\n",
            num(a.services as f64),
            num(a.target_rate),
            a.seconds
        );
        let _ = writeln!(
            md,
            "| achieved conn/s | CRR p50 / p99 µs | agent CPU (% of a core) | agent RSS |\n|---:|---:|---:|---:|\n| {} | {:.0} / {:.0} | {:.2}% | {:.1} MiB |",
            num(a.achieved.per_sec),
            a.achieved.p50_us,
            a.achieved.p99_us,
            a.cpu_fraction * 100.0,
            a.rss_kib as f64 / 1024.0
        );
    }

    let charts = charts(&sums, &ns, dir);
    let _ = writeln!(md, "\n## Charts\n");
    match charts {
        Ok(files) => {
            for (file, title) in files {
                let _ = writeln!(md, "![{title}]({file})");
            }
        }
        Err(e) => {
            let _ = writeln!(md, "Charts could not be drawn: {e}");
        }
    }
    let path = dir.join("report.md");
    fs::write(&path, md).map_err(|source| BenchError::Io {
        call: "write",
        what: path.display().to_string(),
        source,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn color(v: Variant) -> RGBColor {
    match v {
        Variant::Bare => RGBColor(90, 90, 90),
        Variant::Sluice => RGBColor(0, 114, 178),
        Variant::Iptables => RGBColor(213, 94, 0),
        Variant::Nftables => RGBColor(0, 158, 115),
    }
}

fn chart_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(format!("chart: {e}"))
}

/// Registers DejaVu Sans (fonts-dejavu-core) as plotters' sans-serif.
pub(crate) fn register_font() -> Result<(), BenchError> {
    let bytes = fs::read(FONT).map_err(|source| BenchError::Io {
        call: "read",
        what: FONT.into(),
        source,
    })?;
    // plotters keeps the font for the process's lifetime.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| BenchError::Failed(format!("{FONT}: not a usable font")))
}

type Metric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Summary) -> Option<f64>,
);

fn charts(
    sums: &BTreeMap<(usize, Variant), Summary>,
    ns: &[usize],
    dir: &Path,
) -> Result<Vec<(String, String)>, BenchError> {
    register_font()?;
    let metrics: [Metric; 5] = [
        (
            "crr.png",
            "New connections per second (connect, request, close)",
            "conn/s",
            |s| Some(s.cps),
        ),
        (
            "rr.png",
            "Transactions per second on a persistent connection",
            "transactions/s",
            |s| Some(s.tps),
        ),
        ("crr_p99.png", "New connection p99 latency", "µs", |s| {
            Some(s.crr_p99)
        }),
        ("stream.png", "Stream throughput", "Gbit/s", |s| {
            Some(s.gbps)
        }),
        (
            "programming.png",
            "Programming N services from empty",
            "seconds",
            |s| s.program_s,
        ),
    ];
    let labels: Vec<String> = ns.iter().map(|&n| format!("N={}", num(n as f64))).collect();
    let mut out = Vec::new();
    for (file, title, unit, f) in metrics {
        let series: Vec<Series> = Variant::ALL
            .iter()
            .map(|&v| {
                let pts = ns
                    .iter()
                    .enumerate()
                    .filter_map(|(i, &n)| Some((i, f(sums.get(&(n, v))?)?)))
                    .collect::<Vec<_>>();
                (v.name().to_owned(), color(v), pts)
            })
            .collect();
        line_chart(&dir.join(file), title, unit, &labels, &series)?;
        out.push((file.to_owned(), title.to_owned()));
    }
    Ok(out)
}

/// One chart's line: its legend, colour and (x index, value) points.
pub(crate) type Series = (String, RGBColor, Vec<(usize, f64)>);

/// A line chart of `series` over the x positions `labels`, written to `path` as PNG;
/// empty series and points that are not finite are left out.
pub(crate) fn line_chart(
    path: &Path,
    title: &str,
    unit: &str,
    labels: &[String],
    series: &[Series],
) -> Result<(), BenchError> {
    // Each line as drawn: finite points at their x positions.
    let lines = series
        .iter()
        .map(|(name, c, pts)| {
            let line = pts
                .iter()
                .filter(|(_, y)| y.is_finite())
                .map(|(i, y)| (*i as f64, *y))
                .collect::<Vec<_>>();
            (name.as_str(), *c, line)
        })
        .filter(|(_, _, line)| !line.is_empty())
        .collect::<Vec<_>>();
    let ymax = lines
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|(_, y)| *y))
        .fold(0.0f64, f64::max)
        * 1.15;
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.3f64..(labels.len() as f64 - 0.7), 0.0f64..ymax.max(1e-9))
        .map_err(chart_err)?;
    chart
        .configure_mesh()
        .x_labels(labels.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(unit)
        .y_label_formatter(&|y| {
            if *y >= 100.0 {
                num(*y)
            } else {
                format!("{y:.2}")
            }
        })
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(chart_err)?;
    for (name, c, line) in lines {
        chart
            .draw_series(LineSeries::new(line.clone(), c.stroke_width(3)))
            .map_err(chart_err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart
            .draw_series(line.iter().map(|p| Circle::new(*p, 5, c.filled())))
            .map_err(chart_err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(chart_err)?;
    root.present().map_err(chart_err)
}

#[cfg(test)]
mod tests {
    use super::ratio_target;

    #[test]
    fn ratio_targets_are_judged_against_what_is_wanted() {
        let mut md = String::new();
        ratio_target(&mut md, "rr", 1.00, Some(1.02));
        ratio_target(&mut md, "crr", 0.95, Some(0.9025));
        ratio_target(&mut md, "stream", 1.00, None);
        assert_eq!(
            md,
            "| rr | >= 1.00x bare | 1.02x | met |\n\
             | crr | >= 0.95x bare | 0.90x | missed: 5% below the target |\n\
             | stream | >= 1.00x bare | not measured | – |\n"
        );
    }
}
