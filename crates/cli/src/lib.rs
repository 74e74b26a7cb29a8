//! `sluice`: the command line for an agent (status, services, conntrack, verify) and the lab.
//!
//! Every command prints a table or prose for people, or with `-o json` / `-o yaml` one
//! document; every command exits 0 when all is well, 1 for a denied probe or a drift, and 2
//! for an error (clap's usage errors included).

mod agents;
mod docs;
mod get;
mod lab;
mod observe;
mod output;
mod policy;
mod selector;
mod table;

use std::{path::PathBuf, process::ExitCode};

use anyhow::bail;
use clap::{CommandFactory, Parser, Subcommand};
use serde::Serialize;
use sluice_api::{
    AgentStatus, Client, CtEntry, FailsClosed, ServiceEntry, VerifyReport, VerifyRequest,
};

pub use crate::output::Output;
use crate::{
    agents::{Agent, Agents},
    output::{Tone, paint, print_doc},
};

/// Exit status of a denied probe or a drift.
pub const EXIT_DENIED: u8 = 1;
/// Exit status of an error: bad usage or input, an unreachable agent, a failed operation.
pub const EXIT_ERROR: u8 = 2;

#[derive(Parser)]
#[command(name = "sluice", version, about = "eBPF dataplane for Kubernetes")]
struct Cli {
    /// Agent API socket. Defaults to the agent of --lab/--node if that lab exists, else /run/sluice/agent.sock.
    #[arg(long, global = true, env = "SLUICE_SOCKET")]
    socket: Option<PathBuf>,
    /// Lab name (for `lab` commands, and to reach a lab node's agent).
    #[arg(long, global = true, env = "SLUICE_LAB", default_value = "sluice")]
    lab: String,
    /// Lab node whose agent to talk to (default: the first node; for `observe` and
    /// `verify` every node, for `endpoint get` and `policy get` the pod's own).
    #[arg(long, global = true)]
    node: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Agent health and every map with its fill level.
    Status,
    /// Services as the datapath holds them.
    Service {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Conntrack entries.
    Ct {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Compare every map in the kernel with the desired state, on every node of a lab (or
    /// --node's); exit 1 on drift, naming each node that drifts, 2 when the maps match but
    /// some endpoint fails closed (its policy does not fit its map).
    Verify {
        /// Also write the desired content where it drifted.
        #[arg(long)]
        repair: bool,
    },
    /// Local endpoints: identity, labels, policy enforcement.
    Endpoint {
        #[command(subcommand)]
        command: policy::EndpointCommand,
    },
    /// Security identities and their labels.
    Identity {
        #[command(subcommand)]
        command: policy::IdentityCommand,
    },
    /// An endpoint's policy map in the kernel, and why a flow is allowed or denied.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Flows the agent observed: drops, connections, policy verdicts (like `hubble
    /// observe`; filters apply in the agent). `-o json` prints Hubble's flow JSON.
    Observe(observe::ObserveArgs),
    /// A local cluster in network namespaces.
    Lab {
        #[command(subcommand)]
        command: lab::LabCommand,
    },
    /// Print a shell completion script for sluice.
    Completion(docs::CompletionArgs),
    /// Write the manual pages of sluice and every subcommand.
    Man(docs::ManArgs),
}

#[derive(Subcommand)]
enum ListCommand {
    List,
}

/// The whole command tree, as clap sees it (for completions, manual pages and tests).
pub fn command() -> clap::Command {
    Cli::command()
}

/// Parses the command line and runs it; an error is printed and exits 2.
pub fn main() -> ExitCode {
    // Die quietly when the reader of our output goes away (`sluice ct list | head`), as
    // command-line tools do, instead of panicking on a failed print.
    // SAFETY: restoring the default disposition before any thread exists.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let node = cli.node.as_deref();
    let agents = || {
        let sockets = match (&cli.command, &cli.socket) {
            (Command::Observe(args), _) if !args.agents.is_empty() => args.agents.clone(),
            (_, socket) => socket.iter().cloned().collect(),
        };
        Agents::find(sockets, &cli.lab)
    };
    let one = || anyhow::Ok(agents()?.one(node)?.client());
    match &cli.command {
        Command::Lab { command } => lab::run(command, &cli.lab, cli.output),
        Command::Status => status(&one()?, cli.output),
        Command::Service {
            command: ListCommand::List,
        } => service_list(&one()?, cli.output),
        Command::Ct {
            command: ListCommand::List,
        } => ct_list(&one()?, cli.output),
        Command::Verify { repair } => verify(&agents()?.selected(node)?, *repair, cli.output),
        Command::Endpoint { command } => {
            let agent = match command {
                policy::EndpointCommand::Get { endpoint } => {
                    agents()?.of_endpoint(node, endpoint)?
                }
                policy::EndpointCommand::List => agents()?.one(node)?,
            };
            policy::endpoint(&agent.client(), command, cli.output)
        }
        Command::Identity { command } => policy::identity(&one()?, command, cli.output),
        Command::Policy {
            command: policy::PolicyCommand::Get { endpoint },
        } => {
            let agent = agents()?.of_endpoint(node, endpoint)?;
            policy::policy(&agent.client(), endpoint, cli.output)
        }
        Command::Policy {
            command: policy::PolicyCommand::Explain(args),
        } => policy::explain(agents, node, args, cli.output),
        Command::Observe(args) => {
            let agents = agents()?;
            // Outside a lab --node filters the flows; in a lab it picks the agent.
            let selected = agents.selected(node)?;
            observe::run(&selected, node, args, cli.output)
        }
        Command::Completion(args) => {
            docs::completion(args);
            Ok(())
        }
        Command::Man(args) => docs::man(args, cli.output),
    }
}

fn status(client: &Client, output: Output) -> anyhow::Result<()> {
    let s: AgentStatus = client.status()?;
    if output.structured() {
        print_doc(output, &s)?;
        if !s.healthy {
            bail!("agent is not healthy");
        }
        return Ok(());
    }
    println!("Node:       {}", s.node);
    println!("Version:    {}", s.version);
    let health = if s.healthy {
        paint("Ok", Tone::Good)
    } else {
        paint("Failing", Tone::Bad)
    };
    println!("Health:     {health}");
    if let Some(e) = &s.last_error {
        println!("Last error: {e}");
    }
    println!(
        "Generation: desired {}, realized {}",
        s.desired_generation, s.realized_generation
    );
    println!("Reconciles: {}", s.reconciles);
    println!("Endpoints:  {}", s.endpoints);
    let mut routing = s.routing.mode.to_string();
    if let Some(tunnel) = &s.routing.tunnel_device {
        routing.push_str(&format!(", tunnel device {tunnel}"));
    }
    if let Some(underlay) = &s.routing.underlay_device {
        routing.push_str(&format!(", underlay device {underlay}"));
    }
    match &s.routing.non_masquerade_cidrs {
        Some(cidrs) => {
            let cidrs: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
            routing.push_str(&format!(
                ", masquerade on (nonMasqueradeCIDRs {})",
                cidrs.join(" ")
            ));
        }
        None => routing.push_str(", masquerade off"),
    }
    println!("Routing:    {routing}");
    if let Some(ct) = &s.conntrack {
        println!(
            "Conntrack:  idle lifetimes TCP SYN {}s, established {}s, closing {}s, other {}s",
            ct.tcp_syn_s, ct.tcp_established_s, ct.tcp_closing_s, ct.non_tcp_s
        );
    }
    if let Some(p) = &s.conntrack_pressure {
        let fill = 100.0 * p.entries as f64 / f64::from(p.max_entries.max(1));
        println!(
            "            fill {fill:.1}% ({} of {}), pressure from {:.0}%: {} closed or \
             half-open removed early, {} service entries found lost",
            p.entries,
            p.max_entries,
            100.0 * p.threshold,
            p.removed_under_pressure,
            p.service_entries_lost
        );
    }
    println!();
    let rows: Vec<_> = s
        .maps
        .iter()
        .map(|m| {
            let pct = if m.max_entries == 0 {
                0.0
            } else {
                100.0 * m.entries as f64 / f64::from(m.max_entries)
            };
            vec![
                m.name.clone(),
                m.entries.to_string(),
                m.max_entries.to_string(),
                format!("{pct:.1}%"),
                counted(m),
            ]
        })
        .collect();
    table::print(&["MAP", "ENTRIES", "MAX", "FILL", "COUNTED"], &rows);
    if !s.fails_closed.is_empty() {
        println!();
        println!(
            "WARNING: {} endpoint(s) fail closed: their policy does not fit the policy map \
             (raise --policy-map-max)",
            s.fails_closed.len()
        );
        print_fails_closed(&s.fails_closed);
    }
    if s.events_lost > 0 {
        println!();
        println!(
            "WARNING: {} flow event(s) lost to a full ring buffer: observe, the policy log \
             and the flow metrics miss them",
            s.events_lost
        );
    }
    if !s.repaired.is_empty() {
        println!();
        println!("Repaired behind the agent's back:");
        let rows: Vec<_> = s
            .repaired
            .iter()
            .map(|r| {
                vec![
                    r.fault.as_str().to_string(),
                    r.object.clone(),
                    r.count.to_string(),
                ]
            })
            .collect();
        table::print(&["FAULT", "OBJECT", "COUNT"], &rows);
    }
    if !s.unsupported.is_empty() {
        println!();
        println!("Not implemented (the rest of each object is programmed):");
        let rows: Vec<_> = s
            .unsupported
            .iter()
            .map(|u| {
                let object = format!("{} {}/{}", u.kind, u.namespace, u.name);
                vec![
                    object,
                    u.field.clone(),
                    u.value.clone(),
                    u.programmed.clone(),
                ]
            })
            .collect();
        table::print(&["OBJECT", "FIELD", "VALUE", "PROGRAMMED"], &rows);
    }
    if !s.healthy {
        bail!("agent is not healthy");
    }
    Ok(())
}

fn service_list(client: &Client, output: Output) -> anyhow::Result<()> {
    let services: Vec<ServiceEntry> = client.services()?;
    if output.structured() {
        return print_doc(output, &services);
    }
    let mut rows = Vec::new();
    for (id, s) in (1..).zip(&services) {
        let frontend = format!("{}:{}/{}", s.address, s.port, s.protocol);
        let name = s.service.clone().unwrap_or_default();
        let balancing = match s.affinity_timeout {
            Some(timeout) => format!("{}, ClientIP {timeout}s", s.algorithm),
            None => s.algorithm.to_string(),
        };
        // The frontend's columns on its first row only.
        let first = vec![id.to_string(), frontend, s.frontend.to_string()];
        let last = vec![name, balancing];
        if s.backends.is_empty() {
            rows.push([first.clone(), vec![String::new()], last.clone()].concat());
        }
        for (n, b) in (1..).zip(&s.backends) {
            let backend = format!(
                "{n} => {}:{}/{} ({})",
                b.address, b.port, s.protocol, b.state
            );
            if n == 1 {
                rows.push([first.clone(), vec![backend], last.clone()].concat());
            } else {
                let mut row = vec![String::new(); 6];
                row[3] = backend;
                rows.push(row);
            }
        }
    }
    table::print(
        &[
            "ID",
            "FRONTEND",
            "SERVICE TYPE",
            "BACKEND",
            "SERVICE",
            "BALANCING",
        ],
        &rows,
    );
    Ok(())
}

fn ct_list(client: &Client, output: Output) -> anyhow::Result<()> {
    let entries: Vec<CtEntry> = client.conntrack()?;
    if output.structured() {
        return print_doc(output, &entries);
    }
    let rows: Vec<_> = entries
        .iter()
        .map(|e| {
            vec![
                e.protocol.to_string(),
                e.scope.as_str().to_uppercase(),
                format!("{} -> {}", e.source, e.destination),
                e.nat.clone().unwrap_or_default(),
                e.packets.to_string(),
                e.bytes.to_string(),
                format!("{}s", e.age_seconds),
                format!("{}s", e.idle_seconds),
                format!("{}s", e.expires_seconds),
                e.flags
                    .iter()
                    .map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    table::print(
        &[
            "PROTO", "SCOPE", "TUPLE", "NAT", "PACKETS", "BYTES", "AGE", "IDLE", "EXPIRES", "FLAGS",
        ],
        &rows,
    );
    Ok(())
}

/// One node's verify report, as `verify -o json` lists them in a lab.
#[derive(Serialize)]
struct NodeReport {
    node: String,
    report: VerifyReport,
}

/// Verifies every agent in turn; exit 1 naming each node that drifts (or could not be
/// verified), else 2 if an endpoint fails closed.
fn verify(agents: &[Agent], repair: bool, output: Output) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    let mut unreachable = Vec::new();
    for agent in agents {
        match agent.client().verify(VerifyRequest { repair }) {
            Ok(report) => reports.push((agent, report)),
            Err(e) => {
                eprintln!("{}: {e}", agent.name());
                unreachable.push(agent.name());
            }
        }
    }
    if reports.is_empty() {
        bail!("no agent could be verified");
    }
    let in_lab = agents.iter().any(|a| a.node.is_some());
    match (output, in_lab, &reports[..]) {
        // One agent outside a lab: its report as it always was.
        (Output::Json | Output::Yaml, false, [(_, report)]) => print_doc(output, report)?,
        (Output::Json | Output::Yaml, _, _) => print_doc(
            output,
            &reports
                .iter()
                .map(|(agent, report)| NodeReport {
                    node: agent.name(),
                    report: report.clone(),
                })
                .collect::<Vec<_>>(),
        )?,
        (Output::Table | Output::Wide, _, _) => {
            for (agent, report) in &reports {
                let prefix = if in_lab {
                    format!("node {}: ", agent.name())
                } else {
                    String::new()
                };
                print_verify(&prefix, report);
            }
        }
    }
    let drifting: Vec<String> = reports
        .iter()
        .filter(|(_, r)| !r.drift.is_empty() && !r.repaired)
        .map(|(agent, _)| agent.name())
        .collect();
    if !drifting.is_empty() {
        eprintln!("drift on: {}", drifting.join(", "));
    }
    if !unreachable.is_empty() {
        eprintln!("not verified: {}", unreachable.join(", "));
    }
    if !drifting.is_empty() || !unreachable.is_empty() {
        std::process::exit(EXIT_DENIED.into());
    }
    // Realized as computed, but not as intended: those endpoints drop new connections.
    if reports.iter().any(|(_, r)| !r.fails_closed.is_empty()) {
        std::process::exit(EXIT_ERROR.into());
    }
    Ok(())
}

fn print_verify(prefix: &str, report: &VerifyReport) {
    if report.drift.is_empty() && report.fails_closed.is_empty() {
        println!(
            "{prefix}generation {}: every map matches the desired state",
            report.generation
        );
    } else if report.drift.is_empty() {
        println!(
            "{prefix}generation {}: every map matches the desired state, but {} endpoint(s) \
             fail closed: their policy does not fit the policy map (raise --policy-map-max)",
            report.generation,
            report.fails_closed.len()
        );
    } else {
        println!(
            "{prefix}generation {}: {}",
            report.generation,
            paint(&format!("{} entries drift", report.drift.len()), Tone::Bad)
        );
        let rows: Vec<_> = report
            .drift
            .iter()
            .map(|d| {
                vec![
                    d.map.clone(),
                    d.kind.to_string(),
                    d.key.clone(),
                    d.desired.clone().unwrap_or_else(|| "-".into()),
                    d.actual.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        table::print(&["MAP", "DRIFT", "KEY", "DESIRED", "ACTUAL"], &rows);
        if report.repaired {
            println!("repaired {} entries", report.drift.len());
        }
    }
    print_fails_closed(&report.fails_closed);
}

/// When and how a map's entries were counted: `now`, or `sweep 3s ago` (the drift
/// check read them) or `pass 1s ago` (the last pass wrote them).
fn counted(m: &sluice_api::MapStatus) -> String {
    match m.counted_by {
        sluice_api::CountedBy::Now => "now".to_string(),
        by => format!("{} {:.0}s ago", by.as_str(), m.counted_ago_s),
    }
}

fn print_fails_closed(endpoints: &[FailsClosed]) {
    for e in endpoints {
        println!(
            "FAILS CLOSED: {} (ifindex {}): policy needs {} rows, map holds {}",
            e.endpoint, e.ifindex, e.rows_needed, e.map_max
        );
    }
}
