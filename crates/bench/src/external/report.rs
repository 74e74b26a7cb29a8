//! The report's section on the NodePort and LoadBalancer variants: medians per (N,
//! variant, frontend), ratios to bare at the same N, sluice's eBPF time on the path.

use std::{collections::BTreeMap, fmt::Write, path::Path};

use plotters::style::RGBColor;

use crate::{
    BenchError, Variant,
    report::{Series, color, line_chart, median, num, ratio, register_font},
};

use super::{ExternalSample, Forwarding, Frontend, LOAD_BALANCER_IP, NODE_PORT, PathCost, label};

/// Medians of one (N, variant, frontend) over its repetitions.
struct Summary {
    reps: usize,
    tps: f64,
    rr_p50: f64,
    rr_p99: f64,
    cps: f64,
    crr_p50: f64,
    crr_p99: f64,
    gbps: f64,
    program_s: Option<f64>,
    proof_min: u64,
    proof_what: &'static str,
    per_transaction_ns: Option<f64>,
    per_connection_ns: Option<f64>,
    /// Summed over the repetitions: CRR connections that stalled, failed, and the world
    /// host's SYN retransmissions and retransmitted segments during the CRR phases.
    crr_stalled: u64,
    crr_failed: u64,
    crr_syn_retransmissions: u64,
    crr_retransmitted: u64,
    /// The largest conntrack fill node-a started a CRR phase with, and the service entries
    /// of live connections it lost during them, summed (sluice).
    conntrack_before_crr: Option<u64>,
    service_lost_crr: Option<u64>,
    /// (node, program) -> median mean ns per run, RR phase.
    programs_rr: BTreeMap<(&'static str, &'static str), f64>,
}

type Key = (usize, Variant, Option<Forwarding>, Option<Frontend>);

fn opt_median(v: Vec<f64>) -> Option<f64> {
    (!v.is_empty()).then(|| median(v))
}

fn summarize(samples: &[ExternalSample]) -> BTreeMap<Key, Summary> {
    let mut groups: BTreeMap<Key, Vec<&ExternalSample>> = BTreeMap::new();
    for s in samples {
        groups
            .entry((s.services, s.variant, s.forwarding, s.frontend))
            .or_default()
            .push(s);
    }
    groups
        .into_iter()
        .map(|(key, g)| {
            let m = |f: fn(&ExternalSample) -> f64| median(g.iter().map(|s| f(s)).collect());
            let cost = |f: fn(&ExternalSample) -> Option<&PathCost>| {
                opt_median(
                    g.iter()
                        .filter_map(|s| f(s))
                        .map(|c| c.per_operation_ns)
                        .collect(),
                )
            };
            let mut programs: BTreeMap<(&'static str, &'static str), Vec<f64>> = BTreeMap::new();
            for c in g.iter().filter_map(|s| s.cost_rr.as_ref()) {
                for p in &c.programs {
                    programs
                        .entry((p.node, p.program))
                        .or_default()
                        .push(p.mean_ns);
                }
            }
            let summary = Summary {
                reps: g.len(),
                tps: m(|s| s.rr.per_sec),
                rr_p50: m(|s| s.rr.p50_us),
                rr_p99: m(|s| s.rr.p99_us),
                cps: m(|s| s.crr.per_sec),
                crr_p50: m(|s| s.crr.p50_us),
                crr_p99: m(|s| s.crr.p99_us),
                gbps: m(|s| s.stream_gbps),
                program_s: opt_median(
                    g.iter()
                        .filter_map(|s| s.program.map(|d| d.as_secs_f64()))
                        .collect(),
                ),
                proof_min: g.iter().map(|s| s.proof).min().unwrap_or(0),
                proof_what: g.first().map_or("", |s| s.proof_what),
                per_transaction_ns: cost(|s| s.cost_rr.as_ref()),
                per_connection_ns: cost(|s| s.cost_crr.as_ref()),
                programs_rr: programs.into_iter().map(|(k, v)| (k, median(v))).collect(),
                crr_stalled: g.iter().map(|s| s.crr.stalled).sum(),
                crr_failed: g.iter().map(|s| s.crr.errors).sum(),
                crr_syn_retransmissions: g.iter().map(|s| s.crr_retransmissions.syn).sum(),
                crr_retransmitted: g.iter().map(|s| s.crr_retransmissions.segments).sum(),
                conntrack_before_crr: g.iter().filter_map(|s| s.conntrack_before_crr).max(),
                service_lost_crr: g
                    .iter()
                    .filter_map(|s| s.service_lost_crr)
                    .reduce(|a, b| a + b),
            };
            (key, summary)
        })
        .collect()
}

/// Appends the section to `md`, its charts drawn into `dir`; nothing when no sample was
/// taken.
pub fn write(md: &mut String, samples: &[ExternalSample], ns: &[usize], dir: &Path) {
    if samples.is_empty() {
        return;
    }
    let sums = summarize(samples);
    let _ = writeln!(
        md,
        "\n## NodePort and LoadBalancer: world host -> node-a -> pod on node-b\n"
    );
    let _ = writeln!(
        md,
        "A world host, node-a and node-b on an underlay bridge (namespaces); the backend pod on node-b. N LoadBalancer services with externalTrafficPolicy Cluster (N-1 decoys with two backends, node ports from 20000, load balancer IPs from 198.18.0.0; the measured one last, its one backend the pod): the world host connects to node-a:{NODE_PORT} (NodePort) or {LOAD_BALANCER_IP}:80 (LoadBalancer, routed to node-a by the world host, as the cloud's load balancer would), so node-a DNATs to the pod, SNATs to its own address and forwards to node-b; replies return through node-a. **bare**: the world host connects to the pod's address, routed through node-a both ways, no translation. **sluice**: the datapath on both nodes, maps from the compiler and the realizer (`from_netdev` on node-a's underlay device does the translation and sends the packet to node-b: **native** with `bpf_redirect_neigh`, **tunnel** through the VXLAN device, pod MTU 1,450). **iptables** / **nftables**: kube-proxy's rules for the N services in node-a (`KUBE-NODEPORTS`, `KUBE-SERVICES` load balancer IP rules, `KUBE-EXT-*` marking for masquerade / the `service-nodeports` map, `nodeport-ips`, `external-*` chains; iptables: the nat table only, as above), plain routing. Each measurement loads the rules once and measures both frontends on them; same load and durations as above.\n"
    );
    ratios(md, &sums, ns);
    traffic(md, &sums);
    stalls(md, &sums);
    ebpf(md, &sums);
    match charts(&sums, ns, dir) {
        Ok(files) => {
            let _ = writeln!(md);
            for (file, title) in files {
                let _ = writeln!(md, "![{title}]({file})");
            }
        }
        Err(e) => {
            let _ = writeln!(md, "\nCharts could not be drawn: {e}");
        }
    }
}

/// New connections/s against N through each frontend, one line per variant.
fn charts(
    sums: &BTreeMap<Key, Summary>,
    ns: &[usize],
    dir: &Path,
) -> Result<Vec<(String, String)>, BenchError> {
    register_font()?;
    let lines = [
        (Variant::Bare, None, color(Variant::Bare)),
        (
            Variant::Sluice,
            Some(Forwarding::Native),
            color(Variant::Sluice),
        ),
        (
            Variant::Sluice,
            Some(Forwarding::Tunnel),
            RGBColor(86, 180, 233),
        ),
        (Variant::Iptables, None, color(Variant::Iptables)),
        (Variant::Nftables, None, color(Variant::Nftables)),
    ];
    let labels: Vec<String> = ns.iter().map(|&n| format!("N={}", num(n as f64))).collect();
    let mut out = Vec::new();
    for frontend in Frontend::ALL {
        let series: Vec<Series> = lines
            .iter()
            .map(|&(v, forwarding, c)| {
                // Bare has no frontend: its line is the same on both charts.
                let frontend = (v != Variant::Bare).then_some(frontend);
                let pts = ns
                    .iter()
                    .enumerate()
                    .filter_map(|(i, &n)| Some((i, sums.get(&(n, v, forwarding, frontend))?.cps)))
                    .collect();
                (label(v, forwarding, None), c, pts)
            })
            .collect();
        let file = format!("external_crr_{}.png", frontend.name().to_lowercase());
        let title = format!(
            "New connections per second, world host -> {} -> pod on another node",
            frontend.name()
        );
        line_chart(&dir.join(&file), &title, "conn/s", &labels, &series)?;
        out.push((file, title));
    }
    Ok(out)
}

/// Each variant and frontend against bare at the same N.
fn ratios(md: &mut String, sums: &BTreeMap<Key, Summary>, ns: &[usize]) {
    let _ = writeln!(
        md,
        "| N | variant | tps / bare | conn/s / bare | stream / bare |\n|---:|---|---:|---:|---:|"
    );
    for &n in ns {
        let Some(bare) = sums.get(&(n, Variant::Bare, None, None)) else {
            continue;
        };
        for frontend in Frontend::ALL {
            for (v, forwarding) in [
                (Variant::Sluice, Some(Forwarding::Native)),
                (Variant::Sluice, Some(Forwarding::Tunnel)),
                (Variant::Iptables, None),
                (Variant::Nftables, None),
            ] {
                if let Some(s) = sums.get(&(n, v, forwarding, Some(frontend))) {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} |",
                        num(n as f64),
                        label(v, forwarding, Some(frontend)),
                        ratio(s.tps, bare.tps),
                        ratio(s.cps, bare.cps),
                        ratio(s.gbps, bare.gbps)
                    );
                }
            }
        }
    }
}

fn traffic(md: &mut String, sums: &BTreeMap<Key, Summary>) {
    let _ = writeln!(
        md,
        "\n| N | variant | reps | RR tps | RR p50 / p99 µs | conn/s | CRR p50 / p99 µs | stream Gbit/s | N services programmed | proof of path |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for ((n, v, forwarding, frontend), s) in sums {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} / {:.0} | {} | {:.0} / {:.0} | {:.2} | {} | {} {} (min over reps) |",
            num(*n as f64),
            label(*v, *forwarding, *frontend),
            s.reps,
            num(s.tps),
            s.rr_p50,
            s.rr_p99,
            num(s.cps),
            s.crr_p50,
            s.crr_p99,
            s.gbps,
            s.program_s.map_or("–".into(), |x| format!("{x:.3} s")),
            num(s.proof_min as f64),
            s.proof_what
        );
    }
}

/// What the rates hide: a connection that waits for a SYN retransmission costs a second,
/// some ten thousand times a connection's time, without moving the percentiles.
fn stalls(md: &mut String, sums: &BTreeMap<Key, Summary>) {
    let _ = writeln!(
        md,
        "\nThe CRR phases' stalls, summed over the repetitions: connections slower than {} ms, connections that failed, the world host's SYN retransmissions and retransmitted segments (its own /proc/net) during the phase; for sluice, the most entries node-a's conntrack table held when a CRR phase started, and the segments of live connections it found without their service entry (evicted) during the phases.\n",
        crate::load::STALL.as_millis()
    );
    let _ = writeln!(
        md,
        "| N | variant | stalled | failed | SYN retransmissions | segments retransmitted | node-a conntrack entries at the start | service entries lost |\n|---:|---|---:|---:|---:|---:|---:|---:|"
    );
    for ((n, v, forwarding, frontend), s) in sums {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            num(*n as f64),
            label(*v, *forwarding, *frontend),
            s.crr_stalled,
            s.crr_failed,
            s.crr_syn_retransmissions,
            s.crr_retransmitted,
            s.conntrack_before_crr.map_or("–".into(), |x| num(x as f64)),
            s.service_lost_crr.map_or("–".into(), |x| num(x as f64))
        );
    }
}

/// sluice's programs on the path, per operation and per run.
fn ebpf(md: &mut String, sums: &BTreeMap<Key, Summary>) {
    let columns: Vec<(&'static str, &'static str)> = {
        let mut seen: Vec<(&'static str, &'static str)> = sums
            .values()
            .flat_map(|s| s.programs_rr.keys().copied())
            .collect();
        seen.sort_unstable();
        seen.dedup();
        seen
    };
    if columns.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\nsluice's eBPF time on the path (medians): every program's run time on both nodes over the RR phase divided by its transactions (a request and a reply, each through both nodes), over the CRR phase by its connections; then each program's mean ns per run in the RR phase.\n"
    );
    let mut header =
        String::from("| N | variant | per transaction (RR) ns | per connection (CRR) ns |");
    let mut rule = String::from("|---:|---|---:|---:|");
    for (node, program) in &columns {
        let _ = write!(header, " {node} {program} |");
        rule.push_str("---:|");
    }
    let _ = writeln!(md, "{header}\n{rule}");
    for ((n, v, forwarding, frontend), s) in sums {
        if *v != Variant::Sluice {
            continue;
        }
        let mut row = format!(
            "| {} | {} | {} | {} |",
            num(*n as f64),
            label(*v, *forwarding, *frontend),
            s.per_transaction_ns
                .map_or("–".into(), |x| format!("{x:.0}")),
            s.per_connection_ns
                .map_or("–".into(), |x| format!("{x:.0}"))
        );
        for key in &columns {
            let cell = s
                .programs_rr
                .get(key)
                .map_or("–".into(), |x| format!("{x:.0}"));
            let _ = write!(row, " {cell} |");
        }
        let _ = writeln!(md, "{row}");
    }
}
