//! `sluice-bench`: runs the benchmark matrix and writes the report (see the crate docs).

use std::{io::IsTerminal, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use sluice_bench::{
    Config, Variant,
    cluster::{self, ClusterConfig},
    report,
};
use sluice_fake_apiserver::cluster::Shape;

#[derive(Parser)]
#[command(
    name = "sluice-bench",
    about = "sluice vs kube-proxy iptables/nftables vs the bare path"
)]
struct Args {
    /// Quick mode: N = 1 and 1k, one repetition, short durations.
    #[arg(long)]
    quick: bool,
    /// Directory for report.md and the charts (default bench/results/latest, with
    /// --cluster bench/results/cluster, with --agent-idle bench/results/agent-idle).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Instead of the matrix: the simulated cluster at GKE's limits (one agent fed by the
    /// fake API server through the Kubernetes source, then churn).
    #[arg(long)]
    cluster: bool,
    /// With --cluster: the limits times this factor (1 = 7,500 nodes, 200,000 pods...).
    #[arg(long, default_value_t = 1.0, requires = "cluster")]
    cluster_scale: f64,
    /// With --cluster: this many Services instead (issue 19's drift bound: 100,000).
    #[arg(long, requires = "cluster")]
    cluster_services: Option<usize>,
    /// With --cluster: this many endpoints over all EndpointSlices instead (1,000,000).
    #[arg(long, requires = "cluster")]
    cluster_endpoints: Option<usize>,
    /// With --cluster: seconds of churn.
    #[arg(long, default_value_t = 60.0, requires = "cluster")]
    churn_seconds: f64,
    /// With --cluster: seconds of the steady-state measurement (longer than the drift
    /// check's 48 s cycle to see what it costs at large sizes).
    #[arg(long, default_value_t = 20.0, requires = "cluster")]
    steady_seconds: f64,
    /// Comma-separated service counts (overrides the mode's).
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<usize>>,
    /// Repetitions per point (overrides the mode's).
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds per traffic test (RR and CRR; stream gets two thirds).
    #[arg(long)]
    seconds: Option<f64>,
    /// iptables-restore binary (iptables-legacy-restore or iptables-nft-restore).
    #[arg(long)]
    iptables_restore: Option<String>,
    /// Skip the agent-cost measurement.
    #[arg(long)]
    no_agent: bool,
    /// Skip the cross-node variants.
    #[arg(long)]
    no_cross_node: bool,
    /// Comma-separated service counts of the NodePort and LoadBalancer variants
    /// (overrides the mode's).
    #[arg(long, value_delimiter = ',')]
    external_services: Option<Vec<usize>>,
    /// Skip the NodePort and LoadBalancer variants.
    #[arg(long)]
    no_external: bool,
    /// Measure sluice's NodePort and LoadBalancer variants in native routing mode only.
    #[arg(long)]
    no_external_tunnel: bool,
    /// Same-node clients are the benchmark's threads, not a pod's process in a cgroup
    /// with sluice's socket programs (sluice then measures its per-packet ClusterIP path
    /// only).
    #[arg(long)]
    threads_client: bool,
    /// Only measure the idle agent at these service counts (comma-separated), for
    /// `--idle-seconds` each; the report goes to --out.
    #[arg(long, value_delimiter = ',')]
    agent_idle: Option<Vec<usize>>,
    /// Seconds of each idle measurement.
    #[arg(long, default_value_t = 20.0)]
    idle_seconds: f64,
    /// Only measure the agent at 10k new connections/s for this many seconds, second by
    /// second (CPU and RSS), and print it.
    #[arg(long)]
    agent_churn: Option<f64>,
    /// With --agent-churn: seconds of churn before the measurement (fills conntrack).
    #[arg(long, default_value_t = 0.0, requires = "agent_churn")]
    churn_warmup: f64,
}

/// What the benchmark is doing: on a terminal a spinner with the elapsed time and the
/// current step above the log of finished ones; elsewhere the log lines alone.
struct Progress(Option<ProgressBar>);

impl Progress {
    fn new() -> Self {
        if !std::io::stderr().is_terminal() {
            return Self(None);
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed}] {msg}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(Some(bar))
    }

    /// The sink the benchmark reports each step to.
    fn line(&self) -> impl FnMut(&str) + '_ {
        move |line| match &self.0 {
            Some(bar) => {
                bar.println(line);
                bar.set_message(line.trim().to_string());
            }
            None => eprintln!("{line}"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let progress = Progress::new();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    if let Some(counts) = &args.agent_idle {
        let out = args
            .out
            .unwrap_or_else(|| "bench/results/agent-idle".into());
        let costs = sluice_bench::idle::run(
            counts,
            Duration::from_secs_f64(args.idle_seconds),
            &mut progress.line(),
        )
        .context("idle agent benchmark failed")?;
        sluice_bench::idle::write(&costs, &out, &command).context("writing the report")?;
        eprintln!("report: {}", out.join("report.md").display());
        return Ok(());
    }
    if let Some(seconds) = args.agent_churn {
        let cost = sluice_bench::churn::measure(
            &sluice_bench::services(1_000),
            10_000.0,
            Duration::from_secs_f64(args.churn_warmup),
            Duration::from_secs_f64(seconds),
            &mut progress.line(),
        )
        .context("agent churn benchmark failed")?;
        drop(progress);
        print!("{}", sluice_bench::churn::render(&cost));
        return Ok(());
    }
    if args.cluster {
        let mut shape = Shape::scaled(args.cluster_scale);
        shape.services = args.cluster_services.unwrap_or(shape.services);
        shape.endpoints = args.cluster_endpoints.unwrap_or(shape.endpoints);
        let mut config = ClusterConfig::with_shape(shape);
        config.churn = Duration::from_secs_f64(args.churn_seconds);
        config.steady = Duration::from_secs_f64(args.steady_seconds);
        let out = args.out.unwrap_or_else(|| "bench/results/cluster".into());
        let results =
            cluster::run(&config, &mut progress.line()).context("simulated cluster failed")?;
        cluster::report::write(&results, &config, &out, &command).context("writing the report")?;
        eprintln!("report: {}", out.join("report.md").display());
        return Ok(());
    }
    let mut config = if args.quick {
        Config::quick()
    } else {
        Config::standard()
    };
    if let Some(services) = args.services {
        config.services = services;
    }
    if let Some(reps) = args.reps {
        config.reps = reps;
    }
    if let Some(s) = args.seconds {
        config.durations.rr = Duration::from_secs_f64(s);
        config.durations.crr = Duration::from_secs_f64(s);
        config.durations.stream = Duration::from_secs_f64(s * 2.0 / 3.0);
    }
    if let Some(bin) = args.iptables_restore {
        config.iptables_restore = bin;
    }
    if args.no_agent {
        config.agent = None;
    }
    if args.no_cross_node {
        config.cross_node = false;
    }
    if let Some(services) = args.external_services {
        config.external_services = services;
    }
    if args.no_external {
        config.external_services.clear();
    }
    if args.no_external_tunnel {
        config.external_tunnel = false;
    }
    if args.threads_client {
        config.pod_client = false;
    }
    config.variants = Variant::ALL.to_vec();
    let out = args.out.unwrap_or_else(|| "bench/results/latest".into());
    let results = sluice_bench::run(&config, &mut progress.line()).context("benchmark failed")?;
    report::write(&results, &config, &out, &command).context("writing the report")?;
    eprintln!("report: {}", out.join("report.md").display());
    Ok(())
}
