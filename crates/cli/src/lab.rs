//! `sluice lab ...`: thin glue from the command line to the `sluice-lab` library.

use std::{
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use serde::Serialize;
use sluice_lab::{
    AgentStop, ApplyReport, ChangeOptions, Ipv4Net, Lab, LabBinaries, LabOptions, NodeSpec,
    PodProgress, ProbeOptions, ProbeRequest, Protocol, Via,
};

use crate::{
    EXIT_DENIED, Output,
    get::{GetArgs, get},
    output::{Tone, paint, pods_bar, print_doc, with_spinner},
    selector::Selector,
};

#[derive(Subcommand)]
pub enum LabCommand {
    /// Create the lab's underlay and nodes (network namespaces) and start one agent per
    /// node. On a running lab, adds and removes nodes to match the file.
    Up {
        /// Lab file: nodes, pod CIDRs, service CIDR, routing mode, underlay.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Add or remove a node of a running lab.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Create or update objects from manifests, like kubectl apply -f; nothing changes
    /// unless all of them are valid.
    Apply {
        /// A file, a directory (every *.yaml, *.yml and *.json in it) or `-` for stdin
        /// (repeatable).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Print what would be created, configured (with the fields that change) and
        /// deleted, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete the objects named in manifests; each must exist (else exit 2 naming it, and
    /// nothing is deleted) unless --ignore-not-found.
    Delete {
        /// As for apply.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Skip objects that are not there.
        #[arg(long)]
        ignore_not_found: bool,
        /// Print what would be deleted, and delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List pods, services or endpoints (of the default namespace unless -n or -A), or the
    /// world hosts; `-o wide` adds the pods' IP, node and identity, the services' selector.
    Get(GetArgs),
    /// Run a command inside a pod's or a world host's network namespace: lab exec ns/pod -- curl ...
    /// or on a node (its namespace and cgroup, as a process of the node): lab exec --node n -- curl ...
    Exec {
        /// `namespace/pod`, `pod` in the default namespace, or `world/<host>`.
        #[arg(required_unless_present = "node", conflicts_with = "node")]
        pod: Option<String>,
        /// A node of the lab: the command's connections to ClusterIPs and NodePorts are
        /// load-balanced by the node's socket programs.
        #[arg(long)]
        node: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Reachability between pods (and world hosts) with real connections: a truth table per
    /// port and protocol (`.` allowed, `X` denied), or with --from/--to one probe whose exit
    /// status is the verdict (0 connected, 1 denied, 2 usage or lab error).
    Probe(ProbeArgs),
    /// Stop every agent and pod and remove every namespace, pin and file of the lab.
    Down,
    /// Labs that exist on this machine.
    List,
    /// Serve a pod's containerPorts (started by the lab inside each pod).
    #[command(hide = true)]
    PodServer {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        name: String,
        #[arg(long, value_delimiter = ',')]
        tcp: Vec<u16>,
        #[arg(long, value_delimiter = ',')]
        udp: Vec<u16>,
        #[arg(long)]
        ready_file: PathBuf,
    },
    /// The router's health check of the nodes (started by the lab inside the router's
    /// namespace when the lab file sets loadBalancer.healthCheck).
    #[command(hide = true)]
    RouterHealth {
        #[arg(long)]
        lab_dir: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// A new node: its namespace, underlay link and agent; every other agent learns it.
    Add {
        name: String,
        /// Inside the lab's clusterCIDR, overlapping no other node's.
        #[arg(long)]
        pod_cidr: Ipv4Net,
        /// Default: the lowest free address of the underlay from network + 11.
        #[arg(long)]
        underlay_address: Option<Ipv4Addr>,
        /// The Node's topology.kubernetes.io/zone label, and its pods' endpoints' zone.
        #[arg(long)]
        zone: Option<String>,
    },
    /// Delete the node's pods, stop its agent, remove its namespace and Node object.
    Remove { name: String },
    /// Stop the node's agent (SIGTERM, or SIGKILL with --kill) and start it again; returns
    /// once the new agent has realized the lab's current state. Traffic keeps flowing on
    /// the pinned datapath meanwhile.
    RestartAgent {
        name: String,
        /// kill -9 instead of a graceful stop.
        #[arg(long)]
        kill: bool,
    },
}

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// Only pods of this namespace (repeatable; default: all).
    #[arg(short = 'n', long = "namespace", conflicts_with = "from")]
    namespaces: Vec<String>,
    /// Only pods with these labels: `k=v,k2=v2`.
    #[arg(short = 'l', long, conflicts_with = "from", value_parser = Selector::parse)]
    selector: Option<Selector>,
    /// The lab's world hosts too, as sources and destinations.
    #[arg(long, conflicts_with = "from")]
    world: bool,
    /// Sources beside the pods: `nodes` (each node's own namespace: `host` on its node,
    /// `remote-node` on the others) and `world` (as --world). Pods are always probed.
    #[arg(long, value_enum, value_delimiter = ',', conflicts_with = "from")]
    sources: Vec<SourceKind>,
    /// Port to probe (repeatable).
    #[arg(long = "port", required = true)]
    ports: Vec<u16>,
    /// TCP, UDP or SCTP (repeatable).
    #[arg(long = "protocol", default_value = "TCP")]
    protocols: Vec<Protocol>,
    /// Connect to each destination pod's IP, or to the ClusterIP of a Service whose only
    /// ready endpoint is that pod and that has the probed port.
    #[arg(long, value_enum, default_value_t = ViaArg::PodIp)]
    via: ViaArg,
    /// Per probe: `1s`, `500ms`, or seconds.
    #[arg(long, default_value = "1s", value_parser = parse_timeout)]
    timeout: Duration,
    /// Exit non-zero when a cell could not run (SCTP without SCTP sockets, ...); without it
    /// such cells are marked and counted but do not fail the matrix.
    #[arg(long, conflicts_with = "from")]
    strict: bool,
    /// Single probe from `namespace/pod`, `world/<host>` or `node/<node>`.
    #[arg(long, requires = "to")]
    from: Option<String>,
    /// Single probe to `namespace/pod`, `world/<host>` or an IPv4 address.
    #[arg(long, requires = "from")]
    to: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SourceKind {
    Pods,
    Nodes,
    World,
}

#[derive(Clone, Copy, ValueEnum)]
enum ViaArg {
    PodIp,
    Service,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else {
        (text.strip_suffix('s').unwrap_or(text), 1.0)
    };
    number
        .parse::<f64>()
        .ok()
        .and_then(|n| Duration::try_from_secs_f64(n * scale).ok())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a timeout like 1s, 500ms or 0.5"))
}

pub fn options() -> anyhow::Result<LabOptions> {
    let state_root = std::env::var_os("SLUICE_LAB_STATE")
        .map_or_else(|| PathBuf::from("/run/sluice/labs"), PathBuf::from);
    Ok(LabOptions {
        binaries: LabBinaries::discover()?,
        state_root,
    })
}

/// `lab up` and `lab node add|remove`: the lab's nodes afterwards.
#[derive(Serialize)]
struct NodesDoc {
    lab: String,
    /// False when `lab up` found the lab running and matched its nodes to the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
    added: Vec<String>,
    removed: Vec<String>,
    nodes: Vec<NodeDoc>,
    generation: u64,
    took_ms: f64,
}

#[derive(Serialize)]
struct NodeDoc {
    name: String,
    pod_cidr: Ipv4Net,
    agent_socket: PathBuf,
}

/// `lab node restart-agent`.
#[derive(Serialize)]
struct RestartDoc {
    node: String,
    signal: &'static str,
    stopped_ms: f64,
    realized_ms: f64,
}

/// `lab down`.
#[derive(Serialize)]
struct DownDoc {
    lab: String,
    down: bool,
}

impl NodesDoc {
    fn new(lab: &Lab, before: &[String], started: Instant) -> Self {
        let after = lab.nodes();
        Self {
            lab: lab.name().to_string(),
            created: None,
            added: after
                .iter()
                .filter(|n| !before.contains(n))
                .cloned()
                .collect(),
            removed: before
                .iter()
                .filter(|n| !after.contains(n))
                .cloned()
                .collect(),
            nodes: lab
                .spec()
                .nodes
                .iter()
                .map(|n| NodeDoc {
                    name: n.name.clone(),
                    pod_cidr: n.pod_cidr,
                    agent_socket: lab.agent_socket(&n.name),
                })
                .collect(),
            generation: lab.generation(),
            took_ms: started.elapsed().as_secs_f64() * 1000.0,
        }
    }

    fn print(&self, output: Output, prose: String) -> anyhow::Result<()> {
        if output.structured() {
            return print_doc(output, self);
        }
        println!("{prose}");
        Ok(())
    }
}

pub fn run(command: &LabCommand, name: &str, output: Output) -> anyhow::Result<()> {
    let opts = options()?;
    let started = Instant::now();
    match command {
        LabCommand::Up { file } if Lab::list(&opts)?.iter().any(|l| l == name) => {
            let mut lab = Lab::open(name, &opts)?;
            let before = lab.nodes();
            with_spinner(
                format!("matching lab {name}'s nodes to {}", file.display()),
                || lab.reapply(file),
            )?;
            let mut doc = NodesDoc::new(&lab, &before, started);
            doc.created = Some(false);
            doc.print(
                output,
                format!("lab {name} is up, its nodes as {} says", file.display()),
            )?;
        }
        LabCommand::Up { file } => {
            let lab = with_spinner(
                format!("creating lab {name}: nodes, agents loading the datapath"),
                || Lab::up(name, file, &opts),
            )?;
            let mut doc = NodesDoc::new(&lab, &[], started);
            doc.created = Some(true);
            doc.print(output, format!("lab {name} is up"))?;
        }
        LabCommand::Node(NodeCommand::Add {
            name: node,
            pod_cidr,
            underlay_address,
            zone,
        }) => {
            let mut lab = Lab::open(name, &opts)?;
            let before = lab.nodes();
            with_spinner(format!("adding node {node}"), || {
                lab.add_node(NodeSpec {
                    name: node.clone(),
                    pod_cidr: *pod_cidr,
                    underlay_address: *underlay_address,
                    zone: zone.clone(),
                })
            })?;
            NodesDoc::new(&lab, &before, started)
                .print(output, format!("node {node} added to lab {name}"))?;
        }
        LabCommand::Node(NodeCommand::Remove { name: node }) => {
            let mut lab = Lab::open(name, &opts)?;
            let before = lab.nodes();
            with_spinner(format!("removing node {node}"), || lab.remove_node(node))?;
            NodesDoc::new(&lab, &before, started)
                .print(output, format!("node {node} removed from lab {name}"))?;
        }
        LabCommand::Node(NodeCommand::RestartAgent { name: node, kill }) => {
            let lab = Lab::open(name, &opts)?;
            let (how, signal) = if *kill {
                (AgentStop::Kill, "SIGKILL")
            } else {
                (AgentStop::Graceful, "SIGTERM")
            };
            let restart = with_spinner(format!("restarting the agent of node {node}"), || {
                lab.restart_agent(node, how)
            })?;
            let doc = RestartDoc {
                node: node.clone(),
                signal,
                stopped_ms: restart.stopped.as_secs_f64() * 1e3,
                realized_ms: restart.realized.as_secs_f64() * 1e3,
            };
            if output.structured() {
                print_doc(output, &doc)?;
            } else {
                println!(
                    "agent of node {node} restarted ({signal}): stopped in {:.0} ms, realized {:.0} ms after its start",
                    doc.stopped_ms, doc.realized_ms
                );
            }
        }
        LabCommand::Apply { files, dry_run } => {
            let mut lab = Lab::open(name, &opts)?;
            let bar = pods_bar("applying: pods started");
            let progress = |done: usize, total: usize| {
                if let Some(bar) = &bar {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                }
            };
            let options = ChangeOptions {
                dry_run: *dry_run,
                ignore_not_found: false,
                progress: bar.is_some().then_some(&progress as PodProgress),
            };
            let r = lab.apply_with(files, options);
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            report(&r?, output)?;
        }
        LabCommand::Delete {
            files,
            ignore_not_found,
            dry_run,
        } => {
            let mut lab = Lab::open(name, &opts)?;
            let options = ChangeOptions {
                dry_run: *dry_run,
                ignore_not_found: *ignore_not_found,
                progress: None,
            };
            let r = with_spinner("deleting", || lab.delete_with(files, options))?;
            report(&r, output)?;
        }
        LabCommand::Get(args) => get(&Lab::open(name, &opts)?, args, output)?,
        LabCommand::Exec { pod, node, command } => {
            let lab = Lab::open(name, &opts)?;
            let (program, args) = command.split_first().context("no command given")?;
            let (mut cmd, target) = match (pod, node) {
                (_, Some(node)) => (lab.command_on_node(node, program)?, format!("node {node}")),
                (Some(pod), None) => {
                    let pod = if pod.contains('/') {
                        pod.clone()
                    } else {
                        format!("default/{pod}")
                    };
                    (lab.command_in(&pod, program)?, pod)
                }
                (None, None) => bail!("lab exec needs a pod or --node"),
            };
            let err = cmd.args(args).exec();
            bail!("exec {program} in {target}: {err}");
        }
        LabCommand::Probe(args) => {
            if !probe(name, &opts, args, output)? {
                std::process::exit(EXIT_DENIED.into());
            }
        }
        LabCommand::Down => {
            with_spinner(format!("removing lab {name}"), || Lab::down(name, &opts))?;
            if output.structured() {
                print_doc(
                    output,
                    &DownDoc {
                        lab: name.to_string(),
                        down: true,
                    },
                )?;
            } else {
                println!("lab {name} is down");
            }
        }
        LabCommand::List => {
            let labs = Lab::list(&opts)?;
            if output.structured() {
                print_doc(output, &labs)?;
            } else {
                for lab in labs {
                    println!("{lab}");
                }
            }
        }
        LabCommand::PodServer {
            netns,
            name,
            tcp,
            udp,
            ready_file,
        } => {
            sluice_lab::serve_pod(netns, name, tcp, udp, Path::new(ready_file))?;
        }
        LabCommand::RouterHealth { lab_dir } => sluice_lab::run_router_health(lab_dir)?,
    }
    Ok(())
}

/// Runs the probe or the matrix and prints it; false for a single probe that was denied.
fn probe(name: &str, opts: &LabOptions, args: &ProbeArgs, output: Output) -> anyhow::Result<bool> {
    let lab = Lab::open(name, opts)?;
    let options = ProbeOptions {
        via: match args.via {
            ViaArg::PodIp => Via::PodIp,
            ViaArg::Service => Via::Service,
        },
        timeout: args.timeout,
    };
    if let (Some(from), Some(to)) = (&args.from, &args.to) {
        let ([port], [protocol]) = (&args.ports[..], &args.protocols[..]) else {
            bail!("a single probe (--from/--to) takes one --port and one --protocol");
        };
        let p = lab.probe_one(from, to, *port, *protocol, &options)?;
        if output.structured() {
            print_doc(output, &p)?;
        } else {
            let verdict = if p.allowed {
                paint("allowed", Tone::Good)
            } else {
                paint("denied", Tone::Bad)
            };
            println!(
                "{} -> {} ({}:{}/{}): {verdict} ({})",
                p.from,
                p.to,
                p.address,
                p.port,
                p.protocol,
                // What answered, or why nothing did.
                if p.allowed {
                    p.detail.clone()
                } else {
                    p.outcome.describe()
                }
            );
        }
        return Ok(p.allowed);
    }
    let selector = match &args.selector {
        None => Default::default(),
        Some(selector) => selector
            .equalities()
            .map_err(|e| anyhow::anyhow!("--selector: {e}"))?,
    };
    let request = ProbeRequest {
        namespaces: args.namespaces.clone(),
        selector,
        world: args.world || args.sources.contains(&SourceKind::World),
        nodes: args.sources.contains(&SourceKind::Nodes),
        ports: args.ports.clone(),
        protocols: args.protocols.clone(),
        options,
    };
    let matrix = with_spinner("probing", || lab.probe(&request))?;
    if output.structured() {
        print_doc(output, &matrix)?;
    } else {
        print!("{}", matrix.render());
    }
    // Cells that could not run fail the matrix only when asked to.
    Ok(!(args.strict && matrix.not_runnable() > 0))
}

/// kubectl's lines (a dry run also lists the pods controllers would create or remove, and
/// the fields each configured object changes), or the report as one document.
fn report(r: &ApplyReport, output: Output) -> anyhow::Result<()> {
    if output.structured() {
        return print_doc(output, r);
    }
    if r.dry_run {
        for c in &r.changes {
            let mut line = format!("{} (dry run)", c.line());
            if let Some(owner) = &c.owner {
                line.push_str(&format!(", by {owner}"));
            }
            if !c.fields.is_empty() {
                line.push_str(&format!(": {}", c.fields.join(", ")));
            }
            println!("{line}");
        }
        for w in &r.warnings {
            println!("{}", paint(&format!("Warning: {w}"), Tone::Warn));
        }
        return Ok(());
    }
    for line in r.lines() {
        println!("{line}");
    }
    println!(
        "generation {} realized by every agent in {:.1} ms",
        r.generation,
        r.realized_in.as_secs_f64() * 1000.0
    );
    Ok(())
}
