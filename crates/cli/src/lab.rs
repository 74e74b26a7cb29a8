//! `sluice lab ...`: thin glue from the command line to the `sluice-lab` library.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use sluice_lab::{Lab, LabBinaries, LabOptions};

use crate::{Output, print_json, table};

#[derive(Subcommand)]
pub enum LabCommand {
    /// Create the lab's nodes (network namespaces) and start one agent per node.
    Up {
        /// Lab file: nodes, pod CIDRs, service CIDR.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
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
    /// Run a command inside a pod's network namespace: lab exec ns/pod -- curl ...
    Exec {
        /// `namespace/pod`, or `pod` in the default namespace.
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
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
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Resource {
    #[value(alias = "pod", alias = "po")]
    Pods,
    #[value(alias = "service", alias = "svc")]
    Services,
    #[value(alias = "endpoint", alias = "ep")]
    Endpoints,
}

fn options() -> anyhow::Result<LabOptions> {
    let state_root = std::env::var_os("SLUICE_LAB_STATE")
        .map_or_else(|| PathBuf::from("/run/sluice/labs"), PathBuf::from);
    Ok(LabOptions {
        binaries: LabBinaries::discover()?,
        state_root,
    })
}

/// The agent socket of `node` (default: the first) in lab `name`, if that lab exists.
pub fn agent_socket(name: &str, node: Option<&str>) -> anyhow::Result<Option<PathBuf>> {
    let opts = options()?;
    if !Lab::list(&opts)?.iter().any(|l| l == name) {
        return Ok(None);
    }
    let lab = Lab::open(name, &opts)?;
    let node = match node {
        Some(n) => n.to_string(),
        None => lab
            .nodes()
            .into_iter()
            .next()
            .context("the lab has no nodes")?,
    };
    Ok(Some(lab.agent_socket(&node)))
}

pub fn run(command: &LabCommand, name: &str, output: Output) -> anyhow::Result<()> {
    let opts = options()?;
    match command {
        LabCommand::Up { file } => {
            Lab::up(name, file, &opts)?;
            println!("lab {name} is up");
        }
        LabCommand::Apply { files } => report(Lab::open(name, &opts)?.apply(files)?),
        LabCommand::Delete { files } => report(Lab::open(name, &opts)?.delete(files)?),
        LabCommand::Get { what } => get(&Lab::open(name, &opts)?, *what, output)?,
        LabCommand::Exec { pod, command } => {
            let lab = Lab::open(name, &opts)?;
            let pod = if pod.contains('/') {
                pod.clone()
            } else {
                format!("default/{pod}")
            };
            let (program, args) = command.split_first().context("no command given")?;
            let err = lab.pod_command(&pod, program)?.args(args).exec();
            bail!("exec {program} in {pod}: {err}");
        }
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
    }
    Ok(())
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
                .map(|s| vec![s.namespace, s.name, s.kind, s.cluster_ip, s.ports])
                .collect();
            table::print(
                &["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "PORT(S)"],
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
