//! `sluice lab ...`: thin glue from the command line to the `sluice-lab` library.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use sluice_lab::{
    Ipv4Net, Lab, LabBinaries, LabOptions, NodeSpec, ProbeOptions, ProbeRequest, Protocol, Via,
};

use crate::{Output, print_json, table};

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
    /// Create or update objects from manifests (files or directories), like kubectl apply -f.
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Delete the objects named in manifests.
    Delete {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// List pods, services or endpoints.
    Get { what: Resource },
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
}

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// Only pods of this namespace (repeatable; default: all).
    #[arg(short = 'n', long = "namespace", conflicts_with = "from")]
    namespaces: Vec<String>,
    /// Only pods with these labels: `k=v,k2=v2`.
    #[arg(short = 'l', long, conflicts_with = "from")]
    selector: Option<String>,
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

#[derive(Clone, Copy, ValueEnum)]
pub enum Resource {
    #[value(alias = "pod", alias = "po")]
    Pods,
    #[value(alias = "service", alias = "svc")]
    Services,
    #[value(alias = "endpoint", alias = "ep")]
    Endpoints,
    /// Hosts outside the cluster, from the lab file.
    #[value(alias = "world-hosts")]
    World,
}

pub fn options() -> anyhow::Result<LabOptions> {
    let state_root = std::env::var_os("SLUICE_LAB_STATE")
        .map_or_else(|| PathBuf::from("/run/sluice/labs"), PathBuf::from);
    Ok(LabOptions {
        binaries: LabBinaries::discover()?,
        state_root,
    })
}

pub fn run(command: &LabCommand, name: &str, output: Output) -> anyhow::Result<()> {
    let opts = options()?;
    match command {
        LabCommand::Up { file } if Lab::list(&opts)?.iter().any(|l| l == name) => {
            Lab::open(name, &opts)?.reapply(file)?;
            println!("lab {name} is up, its nodes as {} says", file.display());
        }
        LabCommand::Up { file } => {
            Lab::up(name, file, &opts)?;
            println!("lab {name} is up");
        }
        LabCommand::Node(NodeCommand::Add {
            name: node,
            pod_cidr,
            underlay_address,
            zone,
        }) => {
            Lab::open(name, &opts)?.add_node(NodeSpec {
                name: node.clone(),
                pod_cidr: *pod_cidr,
                underlay_address: *underlay_address,
                zone: zone.clone(),
            })?;
            println!("node {node} added to lab {name}");
        }
        LabCommand::Node(NodeCommand::Remove { name: node }) => {
            Lab::open(name, &opts)?.remove_node(node)?;
            println!("node {node} removed from lab {name}");
        }
        LabCommand::Apply { files } => report(Lab::open(name, &opts)?.apply(files)?),
        LabCommand::Delete { files } => report(Lab::open(name, &opts)?.delete(files)?),
        LabCommand::Get { what } => get(&Lab::open(name, &opts)?, *what, output)?,
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
        LabCommand::Probe(args) => match probe(name, &opts, args, output) {
            Ok(true) => {}
            Ok(false) => std::process::exit(1),
            // Exit status 1 means "denied", so errors take 2, as clap's usage errors do.
            Err(e) => {
                eprintln!("Error: {e}");
                std::process::exit(2);
            }
        },
        LabCommand::Down => {
            Lab::down(name, &opts)?;
            println!("lab {name} is down");
        }
        LabCommand::List => {
            for lab in Lab::list(&opts)? {
                println!("{lab}");
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
        if output == Output::Json {
            print_json(&p)?;
        } else {
            println!(
                "{} -> {} ({}:{}/{}): {} ({})",
                p.from,
                p.to,
                p.address,
                p.port,
                p.protocol,
                if p.allowed { "allowed" } else { "denied" },
                p.outcome.describe()
            );
        }
        return Ok(p.allowed);
    }
    let selector = match &args.selector {
        None => BTreeMap::new(),
        Some(text) => text
            .split(',')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .with_context(|| format!("--selector: {kv:?} is not key=value"))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let matrix = lab.probe(&ProbeRequest {
        namespaces: args.namespaces.clone(),
        selector,
        world: args.world || args.sources.contains(&SourceKind::World),
        nodes: args.sources.contains(&SourceKind::Nodes),
        ports: args.ports.clone(),
        protocols: args.protocols.clone(),
        options,
    })?;
    if output == Output::Json {
        print_json(&matrix)?;
    } else {
        print!("{}", matrix.render());
    }
    // Cells that could not run fail the matrix only when asked to.
    Ok(!(args.strict && matrix.not_runnable() > 0))
}

fn report(r: sluice_lab::ApplyReport) {
    for line in &r.lines {
        println!("{line}");
    }
    println!(
        "generation {} realized by every agent in {:.1} ms",
        r.generation,
        r.realized_in.as_secs_f64() * 1000.0
    );
}

fn get(lab: &Lab, what: Resource, output: Output) -> anyhow::Result<()> {
    match (what, output) {
        (Resource::Pods, Output::Json) => print_json(&lab.pods()),
        (Resource::Services, Output::Json) => print_json(&lab.services()),
        (Resource::Endpoints, Output::Json) => print_json(&lab.endpoints()),
        (Resource::World, Output::Json) => print_json(&lab.world_hosts()),
        (Resource::World, Output::Table) => {
            let rows: Vec<_> = lab
                .world_hosts()
                .into_iter()
                .map(|w| vec![w.name, w.address.to_string(), w.node, w.ports])
                .collect();
            table::print(&["NAME", "ADDRESS", "NODE", "PORT(S)"], &rows);
            Ok(())
        }
        (Resource::Pods, Output::Table) => {
            let rows: Vec<_> = lab
                .pods()
                .into_iter()
                .map(|p| {
                    let ready = if p.ready { "1/1" } else { "0/1" };
                    vec![
                        p.namespace,
                        p.name,
                        ready.into(),
                        p.status,
                        p.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                        p.node,
                    ]
                })
                .collect();
            table::print(
                &["NAMESPACE", "NAME", "READY", "STATUS", "IP", "NODE"],
                &rows,
            );
            Ok(())
        }
        (Resource::Services, Output::Table) => {
            let rows: Vec<_> = lab
                .services()
                .into_iter()
                .map(|s| {
                    vec![
                        s.namespace,
                        s.name,
                        s.kind,
                        s.cluster_ip,
                        s.external_ip,
                        s.ports,
                    ]
                })
                .collect();
            table::print(
                &[
                    "NAMESPACE",
                    "NAME",
                    "TYPE",
                    "CLUSTER-IP",
                    "EXTERNAL-IP",
                    "PORT(S)",
                ],
                &rows,
            );
            Ok(())
        }
        (Resource::Endpoints, Output::Table) => {
            let rows: Vec<_> = lab
                .endpoints()
                .into_iter()
                .map(|e| vec![e.namespace, e.name, e.endpoints])
                .collect();
            table::print(&["NAMESPACE", "NAME", "ENDPOINTS"], &rows);
            Ok(())
        }
    }
}
