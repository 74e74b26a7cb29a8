//! `sluice lab get`: pods, services, endpoints and world hosts with kubectl's habits
//! (`-n`, `-A`, `-l`, `-o wide`).

use std::collections::BTreeMap;

use anyhow::bail;
use clap::{Args, ValueEnum};
use sluice_lab::Lab;

use crate::{Output, output::print_doc, selector::Selector, table};

#[derive(Args)]
pub struct GetArgs {
    what: Resource,
    /// Only objects of this namespace (default: `default`).
    #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
    namespace: Option<String>,
    /// Objects of every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Only objects whose labels match: `k=v`, `k!=v`, `k`, `!k`, joined by commas.
    #[arg(short = 'l', long, value_parser = Selector::parse)]
    selector: Option<Selector>,
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

impl GetArgs {
    /// Whether an object of `namespace` with `labels` is asked for.
    fn wants(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        let in_namespace =
            self.all_namespaces || namespace == self.namespace.as_deref().unwrap_or("default");
        in_namespace && self.selector.as_ref().is_none_or(|s| s.matches(labels))
    }
}

pub fn get(lab: &Lab, args: &GetArgs, output: Output) -> anyhow::Result<()> {
    match args.what {
        Resource::Pods => pods(lab, args, output),
        Resource::Services => services(lab, args, output),
        Resource::Endpoints => endpoints(lab, args, output),
        Resource::World => world(lab, args, output),
    }
}

/// The NAMESPACE column leads only with -A, as kubectl's.
fn columns<'a>(args: &GetArgs, rest: &[&'a str]) -> Vec<&'a str> {
    let namespace = args.all_namespaces.then_some("NAMESPACE");
    namespace.into_iter().chain(rest.iter().copied()).collect()
}

fn row(args: &GetArgs, namespace: &str, rest: Vec<String>) -> Vec<String> {
    let namespace = args.all_namespaces.then(|| namespace.to_string());
    namespace.into_iter().chain(rest).collect()
}

fn pods(lab: &Lab, args: &GetArgs, output: Output) -> anyhow::Result<()> {
    let mut pods: Vec<_> = lab
        .pods()
        .into_iter()
        .filter(|p| args.wants(&p.namespace, &p.labels))
        .collect();
    // Identities are the agents' to say: asked only when shown.
    if output.structured() || output == Output::Wide {
        let (identities, failed) = lab.pod_identities();
        for (node, e) in failed {
            eprintln!("node {node}: no identities: {e}");
        }
        for p in &mut pods {
            p.identity = identities
                .get(&format!("{}/{}", p.namespace, p.name))
                .copied();
        }
    }
    if output.structured() {
        return print_doc(output, &pods);
    }
    let wide = output == Output::Wide;
    let mut header = columns(args, &["NAME", "READY", "STATUS"]);
    if wide {
        header.extend(["IP", "NODE", "IDENTITY"]);
    }
    let rows: Vec<_> = pods
        .into_iter()
        .map(|p| {
            let ready = if p.ready { "1/1" } else { "0/1" };
            let mut cells = vec![p.name, ready.into(), p.status];
            if wide {
                cells.extend([
                    p.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                    p.node,
                    p.identity
                        .map_or_else(|| "<none>".into(), |i| i.to_string()),
                ]);
            }
            row(args, &p.namespace, cells)
        })
        .collect();
    table::print(&header, &rows);
    Ok(())
}

fn services(lab: &Lab, args: &GetArgs, output: Output) -> anyhow::Result<()> {
    let services: Vec<_> = lab
        .services()
        .into_iter()
        .filter(|s| args.wants(&s.namespace, &s.labels))
        .collect();
    if output.structured() {
        return print_doc(output, &services);
    }
    let wide = output == Output::Wide;
    let mut header = columns(
        args,
        &["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"],
    );
    if wide {
        header.push("SELECTOR");
    }
    let rows: Vec<_> = services
        .into_iter()
        .map(|s| {
            let mut cells = vec![s.name, s.kind, s.cluster_ip, s.external_ip, s.ports];
            if wide {
                let selector: Vec<String> =
                    s.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                cells.push(if selector.is_empty() {
                    "<none>".into()
                } else {
                    selector.join(",")
                });
            }
            row(args, &s.namespace, cells)
        })
        .collect();
    table::print(&header, &rows);
    Ok(())
}

fn endpoints(lab: &Lab, args: &GetArgs, output: Output) -> anyhow::Result<()> {
    let endpoints: Vec<_> = lab
        .endpoints()
        .into_iter()
        .filter(|e| args.wants(&e.namespace, &e.labels))
        .collect();
    if output.structured() {
        return print_doc(output, &endpoints);
    }
    let rows: Vec<_> = endpoints
        .into_iter()
        .map(|e| row(args, &e.namespace, vec![e.name, e.endpoints]))
        .collect();
    table::print(&columns(args, &["NAME", "ENDPOINTS"]), &rows);
    Ok(())
}

fn world(lab: &Lab, args: &GetArgs, output: Output) -> anyhow::Result<()> {
    if args.namespace.is_some() || args.selector.is_some() {
        bail!("world hosts have no namespace or labels: -n and -l do not apply to them");
    }
    let hosts = lab.world_hosts();
    if output.structured() {
        return print_doc(output, &hosts);
    }
    let rows: Vec<_> = hosts
        .into_iter()
        .map(|w| vec![w.name, w.address.to_string(), w.node, w.ports])
        .collect();
    table::print(&["NAME", "ADDRESS", "NODE", "PORT(S)"], &rows);
    Ok(())
}
