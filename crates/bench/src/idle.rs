//! The growth curve: the real agent's CPU and RSS with no traffic and no change after it
//! programmed N services, the kernel memory of its maps, its first (full) pass and the pass
//! one more Service costs, for each N asked (issue 19: N = 1, 1k, 10k, 100k), written as
//! `report.md` of its own directory with a chart.

use std::{fmt::Write, fs, path::Path, time::Duration};

use plotters::style::RGBColor;

use crate::{
    BenchError,
    agent::{self, IdleCost},
    report::{Series, line_chart, register_font},
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

const MIB: f64 = 1024.0;

/// The report of a growth curve.
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
        "| N services | map entries (service / backend) | programmed after | first pass | one more Service: pass / seen | idle CPU, % of one core | RSS | map memory | status, slowest of 5 |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let ms =
        |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3));
    for c in costs {
        let _ = writeln!(
            md,
            "| {} | {} / {} | {:.1} s | {} | {} / {:.0} ms | {:.2}% | {:.0} MiB | {:.0} MiB | {:.1} ms |",
            thousands(c.services),
            thousands(c.service_entries),
            thousands(c.backend_entries),
            c.programmed.as_secs_f64(),
            ms(c.first_pass),
            ms(c.one_change),
            c.one_change_seen.as_secs_f64() * 1e3,
            c.cpu_fraction * 100.0,
            c.rss_kib as f64 / MIB,
            c.map_memory as f64 / (MIB * 1024.0),
            c.status.as_secs_f64() * 1e3
        );
    }
    md.push_str(
        "\n*first pass* and *one more Service: pass* are the `elapsed` of the agent's `realized` \
         log lines (compile and write); *seen* runs from the replaced cluster file to the new \
         frontend in the kernel's map, so it adds reading and parsing the whole file. *map \
         memory* is the `memlock` of every pinned map: hash maps are preallocated, so it \
         follows the capacities more than N.\n\n![growth](growth.png)\n",
    );
    md
}

/// Writes the report of `costs` to `dir/report.md`.
pub fn write(costs: &[IdleCost], dir: &Path, command: &str) -> Result<(), BenchError> {
    fs::create_dir_all(dir).map_err(|source| BenchError::Io {
        call: "mkdir",
        what: dir.display().to_string(),
        source,
    })?;
    chart(costs, &dir.join("growth.png"))?;
    let path = dir.join("report.md");
    fs::write(&path, markdown(costs, command)).map_err(|source| BenchError::Io {
        call: "write",
        what: path.display().to_string(),
        source,
    })
}

/// One line of the growth chart: its legend, colour and value at one N.
type Figure = (&'static str, RGBColor, fn(&IdleCost) -> f64);

/// Each figure of the curve as a share of its largest value, over N: how the costs grow.
fn chart(costs: &[IdleCost], path: &Path) -> Result<(), BenchError> {
    register_font()?;
    let labels: Vec<String> = costs.iter().map(|c| thousands(c.services)).collect();
    let figures: [Figure; 5] = [
        ("idle CPU", RGBColor(213, 94, 0), |c| c.cpu_fraction),
        ("RSS", RGBColor(0, 114, 178), |c| c.rss_kib as f64),
        ("map memory", RGBColor(0, 158, 115), |c| c.map_memory as f64),
        ("first pass", RGBColor(230, 159, 0), |c| {
            c.first_pass.map_or(f64::NAN, |d| d.as_secs_f64())
        }),
        ("one more Service", RGBColor(204, 121, 167), |c| {
            c.one_change.map_or(f64::NAN, |d| d.as_secs_f64())
        }),
    ];
    let series: Vec<Series> = figures
        .iter()
        .map(|(name, colour, figure)| {
            let top = costs
                .iter()
                .map(figure)
                .filter(|v| v.is_finite())
                .fold(0.0, f64::max);
            let points = costs
                .iter()
                .enumerate()
                .map(|(i, c)| (i, if top > 0.0 { figure(c) / top } else { f64::NAN }))
                .collect();
            (name.to_string(), *colour, points)
        })
        .collect();
    line_chart(
        path,
        "Agent cost over N Services (each as a share of its largest value)",
        "share of the largest",
        &labels,
        &series,
    )
}
