//! The idle-cost curve: the real agent's CPU and RSS with no traffic and no change, after it
//! programmed N services, for each N asked (issue 19: N = 1, 1k, 10k, 100k), written as
//! `report.md` of its own directory.

use std::{fmt::Write, fs, path::Path, time::Duration};

use crate::{
    BenchError,
    agent::{self, IdleCost},
    services,
};

/// Measures the idle agent at each of `counts` services, for `duration` each.
pub fn run(
    counts: &[usize],
    duration: Duration,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<IdleCost>, BenchError> {
    let mut out = Vec::with_capacity(counts.len());
    for &n in counts {
        progress(&format!("idle agent, {n} services"));
        let cost = agent::measure_idle(&services(n), duration)?;
        progress(&format!(
            "  programmed in {:.1} s; idle CPU {:.2}% of a core, RSS {:.1} MiB",
            cost.programmed.as_secs_f64(),
            cost.cpu_fraction * 100.0,
            cost.rss_kib as f64 / 1024.0
        ));
        out.push(cost);
    }
    Ok(out)
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The report of an idle curve.
pub fn markdown(costs: &[IdleCost], command: &str) -> String {
    let mut md = String::from("# Agent cost at idle\n\n");
    let seconds = costs.first().map_or(0.0, |c| c.seconds);
    let _ = writeln!(
        md,
        "The real `sluice-agent` (release build, default flags: `--reconcile-interval 2`) on the \
         benchmark topology programs N ClusterIP Services (N - 1 decoys with 2 backends each, \
         the measured one with 3) from a cluster file; then, with no traffic and no change, its \
         CPU time (utime + stime from /proc/<pid>/stat) is measured over {seconds:.0} s, 5 s \
         after the Services were programmed, and its RSS (VmRSS) at the end; then the slowest of five \
         `status` calls.\n\nCommand: `{command}`\n"
    );
    md.push_str(
        "| N services | map entries (service / backend) | programmed after | idle CPU, % of one core | RSS | status, slowest of 5 |\n\
         |---:|---|---:|---:|---:|---:|\n",
    );
    for c in costs {
        let _ = writeln!(
            md,
            "| {} | {} / {} | {:.1} s | {:.2}% | {:.0} MiB | {:.1} ms |",
            thousands(c.services),
            thousands(c.service_entries),
            thousands(c.backend_entries),
            c.programmed.as_secs_f64(),
            c.cpu_fraction * 100.0,
            c.rss_kib as f64 / 1024.0,
            c.status.as_secs_f64() * 1e3
        );
    }
    md
}

/// Writes the report of `costs` to `dir/report.md`.
pub fn write(costs: &[IdleCost], dir: &Path, command: &str) -> Result<(), BenchError> {
    fs::create_dir_all(dir).map_err(|source| BenchError::Io {
        call: "mkdir",
        what: dir.display().to_string(),
        source,
    })?;
    let path = dir.join("report.md");
    fs::write(&path, markdown(costs, command)).map_err(|source| BenchError::Io {
        call: "write",
        what: path.display().to_string(),
        source,
    })
}
